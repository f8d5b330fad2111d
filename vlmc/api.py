"""The Python API the CLI is a thin layer over: compile, inspect, run, profile."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

from vlmc.bundle import Bundle
from vlmc.errors import VlmcError
from vlmc.recipe import Recipe, build

ProgressFn = Optional[Callable[[str], None]]


def compile(recipe: Union[Recipe, dict, None] = None, out: Union[str, Path] = "build/model", force: bool = False,
            progress: ProgressFn = None) -> Bundle:
    """Export, verify and write a bundle: `vlmc.compile({"model": "shapes-llava", "targets": ["onnx"]}, "build/m")`."""
    from vlmc.exporter.build import export_bundle

    if not isinstance(recipe, Recipe):
        recipe = build(recipe or {})
    return Bundle(export_bundle(recipe, Path(out), force=force, progress=progress))


def inspect(bundle: Union[str, Path]) -> dict:
    """The manifest, with every file's hash checked."""
    b = Bundle(bundle)
    for name in b.manifest["files"]:
        b.file(name)
    return b.manifest


def session(bundle: Bundle, runtime: str, profile_ops: bool = False, shares_cpu: bool = False):
    """A runtime session of a bundle; `eager` rebuilds the PyTorch programs with the bundle's passes."""
    from vlmc.runtimes import check_runtime, open_session
    from vlmc.runtimes.base import DecoderShape

    check_runtime(runtime)
    if runtime != "eager":
        return open_session(bundle, runtime, profile_ops, shares_cpu)
    from vlmc.exporter.build import prepare
    from vlmc.runtimes.eager_runner import EagerSession

    prepared = prepare(build(bundle.manifest["recipe"], f"{bundle.path}/manifest.json"))
    return EagerSession(prepared.loaded.model, DecoderShape.from_manifest(bundle.manifest))


def _prompt_inputs(b: Bundle, image: Union[str, Path], prompt: str):
    """A bundle's tokenizer, prompt ids and preprocessed image for one question."""
    from vlmc.models_zoo.tokenizer import TextTokenizer
    from vlmc.runtimes.image import load_image

    b.file("tokenizer.json")
    p = b.manifest["prompt"]
    tok = TextTokenizer(b.path)
    pixels = load_image(image, p["image_size"], p.get("image_resize"))
    unknown = tok.unknown_words(prompt)
    if unknown:
        raise VlmcError(f"prompt words outside the model's vocabulary: {', '.join(dict.fromkeys(unknown))}")
    return tok, tok.prompt(p["template"], prompt, p["num_image_tokens"], p["image_token_id"], p["bos_token_id"]), pixels


def run(bundle: Union[str, Path], runtime: str, image: Union[str, Path], prompt: str, max_new_tokens: int = 16,
        device: Optional[str] = None, devices_file: Optional[str] = None) -> dict:
    """Image + prompt -> text with greedy decoding on one runtime, here or on a device (vlmc devices)."""
    from dataclasses import asdict

    from vlmc.devices import resolve
    from vlmc.runtimes import check_runtime
    from vlmc.runtimes.generate import generate, record

    check_runtime(runtime)
    target_device = resolve(device, devices_file)
    if max_new_tokens < 1:
        raise VlmcError("--max-new-tokens must be at least 1")
    b = Bundle(bundle)
    tok, ids, pixels = _prompt_inputs(b, image, prompt)
    if target_device.is_local:
        out = record(generate(session(b, runtime), ids, pixels, max_new_tokens, set(b.manifest["prompt"]["eos_token_ids"])))
    else:
        out = target_device.generate(b, runtime, asdict(ids), pixels, max_new_tokens)
    return {"runtime": runtime, "device": target_device.name, "prompt": prompt, "text": tok.decode(out["tokens"]),
            "pieces": [tok.piece(t) for t in out["tokens"]], **out}


def compare(bundle: Union[str, Path], runtime: str, image: Union[str, Path], prompt: str, device: str,
            devices_file: Optional[str] = None, max_new_tokens: int = 4) -> dict:
    """The same question on a device and on this host, same runtime: do the device's kernels give the host's
    numbers? First-token logits within the bundle's verify tolerance (its relative-error bound when the
    bundle is quantized: int8 kernels round differently per ISA) and the same greedy tokens."""
    import numpy as np
    from dataclasses import asdict

    from vlmc.devices import LocalDevice, DeviceConfig, resolve
    from vlmc.exporter.verify import check_row
    from vlmc.recipe import VerifyOptions
    from vlmc.runtimes import check_runtime

    check_runtime(runtime)
    target_device = resolve(device, devices_file)
    if target_device.is_local:
        raise VlmcError("--device names this host; compare needs another device to compare it with")
    if max_new_tokens < 1:
        raise VlmcError("--max-new-tokens must be at least 1")
    b = Bundle(bundle)
    _, ids, pixels = _prompt_inputs(b, image, prompt)
    here = LocalDevice(DeviceConfig("local", "local")).generate(b, runtime, asdict(ids), pixels, max_new_tokens, with_logits=True)
    there = target_device.generate(b, runtime, asdict(ids), pixels, max_new_tokens, with_logits=True)
    tol = VerifyOptions.model_validate(b.manifest["recipe"].get("verify", {}))
    quantized = bool(b.manifest.get("quantization"))
    row = check_row(target_device.name, "first token", "logits", np.asarray(there["first_logits"]), np.asarray(here["first_logits"]),
                    tol.atol, tol.rtol, tol.quantized_rel_err if quantized else None)
    if quantized:
        row["bound"] = tol.quantized_rel_err
    tokens_agree = there["tokens"] == here["tokens"]
    return {"bundle": str(b.path), "runtime": runtime, "device": target_device.name, "quantized": quantized,
            "logits": row, "tokens": {"device": there["tokens"], "host": here["tokens"], "agree": tokens_agree},
            "agrees": bool(row["passed"] and tokens_agree)}


def profile(bundle: Union[str, Path], runtime: str, warmup: int = 3, iterations: int = 20, ops: bool = False,
            new_tokens: int = 8, progress: ProgressFn = None, device: Optional[str] = None,
            devices_file: Optional[str] = None, curve: Optional[list[int]] = None) -> dict:
    """Latency, stages, memory, sizes (and per-op rows) of a bundle on a runtime: here in a spawned process,
    or on a device (vlmc devices) in a fresh process of its own."""
    from vlmc.devices import resolve
    from vlmc.runtimes.profile import check_profile_args

    check_profile_args(runtime, warmup, iterations, new_tokens)
    return resolve(device, devices_file).profile(Bundle(bundle), runtime, warmup, iterations, ops, new_tokens,
                                                 progress or (lambda m: None), curve)


def evaluate(target: Union[str, Path], runtime: str = "eager", dataset: str = "shapes-vqa", split: str = "test",
             n: Optional[int] = 2000, progress: ProgressFn = None, reference: bool = True,
             tick: Optional[Callable[[int, str], None]] = None) -> dict:
    """Accuracy of a bundle on a runtime (or of a model, eager) against the uncompressed eager model
    (`reference=False`: accuracy only, without running the uncompressed model: no agreement or KL)."""
    from vlmc.eval.evaluate import Answerer, evaluate as score, jsonl_questions, shapes_vqa_questions
    from vlmc.models_zoo import load
    from vlmc.models_zoo.tokenizer import TextTokenizer
    from vlmc.runtimes import check_runtime
    from vlmc.runtimes.base import DecoderShape
    from vlmc.runtimes.eager_runner import EagerSession

    if n is not None and n < 1:
        raise VlmcError(f"--n must be at least 1 (got {n})")
    check_runtime(runtime)
    path = Path(target)
    if (path / "manifest.json").is_file():
        b = Bundle(path)
        if b.manifest["model"].get("weights", "checkpoint") != "checkpoint":
            raise VlmcError(f"{target}: built from {b.manifest['model']['source']} with random weights; its accuracy means "
                            "nothing (profile it; evaluate a bundle of a real checkpoint)")
        b.file("tokenizer.json")
        prompt, tok, shape = b.manifest["prompt"], TextTokenizer(b.path), DecoderShape.from_manifest(b.manifest)
        answer = Answerer(session(b, runtime, shares_cpu=reference), tok, prompt)
        quantized = bool(b.manifest.get("quantization"))
        if not reference:
            reference = None
        elif runtime == "eager" and not b.manifest["passes"]:
            reference = answer
        else:
            full = prompt["num_image_tokens_unpruned"]
            grow = (full - prompt["num_image_tokens"]) * prompt.get("image_tiles", 1)
            ref_shape = DecoderShape(shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.hidden_size,
                                     shape.max_context + grow, shape.max_prompt + grow, state_layers=shape.state_layers)
            ref = load(b.manifest["model"]["source"], b.manifest["recipe"].get("image_size"), b.manifest["recipe"].get("tile_grid"))
            ref.template(Recipe.model_validate(b.manifest["recipe"]))
            reference = Answerer(EagerSession(ref.model, ref_shape), tok,
                                 {**prompt, "num_image_tokens": full, "image_size": ref.model.image_size,
                                  "image_resize": ref.image_resize})
        name, source = b.name, b.manifest["model"]["source"]
    else:
        if runtime != "eager":
            raise VlmcError(f"{target} is not a bundle: a model is evaluated with --runtime eager (export it to use {runtime})")
        if str(target).startswith("preset:"):
            raise VlmcError(f"{target} has random weights; its accuracy means nothing (evaluate a checkpoint directory)")
        loaded = load(str(target))
        c = loaded.config
        tokens = loaded.model.num_image_tokens
        recipe = loaded.template(build({})).resolve(tokens)
        prompt = {"template": recipe.prompt_template, "num_image_tokens": tokens, "image_token_id": c.image_token_id,
                  "bos_token_id": loaded.bos_token_id, "eos_token_ids": list(c.text.eos_token_ids), "image_size": loaded.model.image_size,
                  "image_resize": loaded.image_resize}
        shape = DecoderShape.of_model(loaded.model, recipe.max_context, recipe.max_prompt)
        answer = Answerer(EagerSession(loaded.model, shape), loaded.tokenizer, prompt)
        reference, name, source, quantized = answer if reference else None, loaded.name, loaded.source, False
    # questions come at the uncompressed model's size; a bundle with a lower resolution reads them at its own
    size = prompt.get("native_image_size", prompt["image_size"])
    if dataset == "shapes-vqa":
        questions = shapes_vqa_questions(split, n if n is not None else 2000, size, prompt.get("image_resize"))
    else:
        questions = jsonl_questions(Path(dataset), n, size, prompt.get("image_resize"))
    result = score(answer, reference, questions, progress, tick)
    out = {"target": name, "model": source, "runtime": runtime, "dataset": dataset,
           "split": split if dataset == "shapes-vqa" else None,
           "reference": "eager, uncompressed" if reference is not None else None, **result}
    if quantized and runtime == "eager":
        out["note"] = "eager runs the float model with the bundle's token passes; quantization is in the target artifacts"
    return out
