"""The export flow: model -> programs -> per-target lowering -> verification -> atomic bundle."""
from __future__ import annotations

import gc
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from vlmc import __version__, passes
from vlmc.bundle import FORMAT, BundleWriter
from vlmc.errors import VlmcError
from vlmc.exporter import coreml_target, executorch_target, onnx_target, tvm_target
from vlmc.exporter.context import ExportContext
from vlmc.exporter.verify import SAMPLE_QUESTION, Verifier
from vlmc.models_zoo import LoadedModel, load
from vlmc.passes.quant import QuantPlan, coreml_quant, executorch_quant
from vlmc.passes.quant.calibration import CalibrationSource, check_source
from vlmc.recipe import Recipe

LOWERINGS = {"onnx": onnx_target.lower, "executorch": executorch_target.lower, "coreml": coreml_target.lower,
             "tvm": tvm_target.lower}


@dataclass
class Prepared:
    loaded: LoadedModel
    recipe: Recipe  # resolved
    passes: list[dict]  # what each token pass did, for the manifest
    image_tokens: int
    quant: QuantPlan
    native: tuple[int, int]  # the model's image side and image tokens before any pass (the eval reference's)


def prepare(recipe: Recipe) -> Prepared:
    """Load the recipe's model, apply its passes and resolve the model-dependent defaults.

    Everything here is checked before any export work: pass names and parameters, lengths.
    """
    passes.validate(recipe.passes)
    loaded = load(recipe.model, recipe.image_size, recipe.tile_grid)
    recipe = loaded.template(recipe)
    native = (loaded.model.image_size, loaded.model.num_image_tokens)
    records, plan = passes.apply(loaded.model, recipe.passes, CalibrationSource(recipe, loaded.tokenizer, loaded.model))
    image_tokens = passes.tokens_at(loaded.model, "projector.out")
    # the resolved passes (a calibrated static pass with its indices), so the bundle rebuilds without data
    resolved = [{"name": r["name"], "at": r["at"], **r["params"]} for r in records]
    quant_specs = [spec for spec in recipe.passes if spec["name"] in plan.names]  # the plan's passes, in order
    resolved += [{**spec, **p.filled} for spec, p in zip(quant_specs, plan.passes)]
    recipe = recipe.model_copy(update={"passes": resolved}).resolve(image_tokens * loaded.model.image_tiles)
    c = loaded.config
    sample = loaded.tokenizer.prompt(recipe.prompt_template, SAMPLE_QUESTION, image_tokens, c.image_token_id, c.text.bos_token_id)
    if len(sample) > recipe.max_prompt:
        raise VlmcError(f"recipe field 'max_prompt': {recipe.max_prompt} cannot hold the template with a short question "
                        f"({len(sample)} tokens: {sample.image_rows} image + {len(sample) - sample.image_rows} text)")
    return Prepared(loaded, recipe, records, image_tokens, plan, native)


def _check_targets(prepared: Prepared) -> None:
    """What the targets cannot express (quantization schemes, an int8 KV cache) and missing calibration data
    are refused before export work."""
    recipe = prepared.recipe
    if "coreml" in recipe.targets:
        for scheme in prepared.quant.schemes.values():
            coreml_quant.check(scheme, recipe.coreml.minimum_deployment_target)
        coreml_target.check_kv_cache(prepared.loaded.model.kv_cache, recipe.coreml.minimum_deployment_target)
    if "executorch" in recipe.targets:
        for scheme in prepared.quant.schemes.values():
            executorch_quant.check(scheme, recipe.executorch.backend)
        if not recipe.executorch.text_prefill and any(p["in_llm"] for p in prepared.passes):
            raise VlmcError("recipe executorch.text_prefill: false, but in-LLM token stages run in the text_prefill method")
    tiles = prepared.loaded.model.image_tiles
    if tiles > 1 and any(s.config.method == "masquant" for s in prepared.quant.schemes.values()):
        raise VlmcError(f"pass w8a8: method masquant tells the image's rows by one position range, but the tile grid "
                        f"splits the image into {tiles} runs with text between them (export without tile_grid)")
    if prepared.quant.needs_calibration:
        check_source(recipe.calibration)


def _resolve_devices(recipe: Recipe) -> list:
    """The recipe's verify.devices, resolved before any export work: a name that is no device fails fast."""
    from vlmc.devices import resolve

    devices = [resolve(name) for name in recipe.verify.devices]
    for d in devices:
        if d.is_local:
            raise VlmcError(f"verify.devices names this host ({d.name}): the bundle is verified here anyway")
        if d.config.kind == "ethos-u85":
            raise VlmcError(f"verify.devices: {d.name} is a compiler's estimate, it runs no programs")
    return devices


def _verify_on_devices(verifier: Verifier, bundle, devices: list, progress: Callable[[str], None]) -> list[dict]:
    """The unfinished bundle on each device, on every runtime of it the device has: the first token's logits
    against eager on the verifier's sample (the quantized criterion where the bundle is quantized)."""
    from dataclasses import asdict

    from vlmc.exporter.verify import check_row
    from vlmc.runtimes import RUNTIME_TARGETS

    reference = verifier.prefill_out[0].reshape(-1)
    quantized = bool(bundle.manifest.get("quantization"))
    rows = []
    for device in devices:
        offered = device.check().get("runtimes", [])
        runtimes = [r for r in offered if RUNTIME_TARGETS.get(r) in bundle.targets]
        if not runtimes:
            raise VlmcError(f"verify.devices: {device.name} runs none of this bundle's runtimes (it has: {', '.join(offered) or 'none'})")
        for runtime in runtimes:
            progress(f"verify: {runtime} on {device.name}")
            out = device.generate(bundle, runtime, asdict(verifier.sample.prompt), verifier.sample.image, 1, with_logits=True)
            row = check_row(f"{runtime} on {device.name}", "first token", "logits", np.asarray(out["first_logits"]).reshape(-1),
                            reference, verifier.atol, verifier.rtol, verifier.quantized_rel_err if quantized else None)
            rows.append(row)
    return rows


def _verify(ctx: ExportContext, targets: dict, verifier: Verifier) -> list[dict]:
    rows: list[dict] = []
    for target, entry in targets.items():
        ctx.progress(f"verify: {target}")
        files = {p: ctx.out_dir / e["file"] for p, e in entry["programs"].items()}
        if target == "onnx":
            from vlmc.runtimes.onnxruntime_runner import OnnxSession

            rows += verifier.static_cache("onnx", OnnxSession(files, ctx.decoder_shape), verifier.image)
        elif target == "executorch":
            from vlmc.runtimes.executorch_runner import ExecuTorchSession

            rows += verifier.executorch(lambda methods: ExecuTorchSession(ctx.out_dir / executorch_target.PTE, ctx.decoder_shape,
                                                                          methods=methods))
        elif target == "tvm":
            from vlmc.runtimes.tvm_runner import TvmSession, host_architecture

            libraries = {p: e["libraries"] for p, e in entry["programs"].items()}
            if all(host_architecture() in libs for libs in libraries.values()):
                files = {p: ctx.out_dir / libs[host_architecture()] for p, libs in libraries.items()}
                rows += verifier.static_cache("tvm", TvmSession(files, ctx.decoder_shape), verifier.image)
            rows += verifier.tvm_cross_builds(entry)
        elif target == "coreml":
            rows += verifier.coreml_structure(entry)
            if platform.system() == "Darwin":
                from vlmc.runtimes.coreml_runner import CoremlSession

                session = CoremlSession(files, entry["programs"], ctx.decoder_shape)
                rows += verifier.static_cache("coreml", session, verifier.image.astype("float32")[None])
    return rows


def format_failures(rows: list[dict]) -> str:
    lines = [f"{'target':<11} {'program':<16} {'check':<22} {'max |err|':>11} {'x tol':>8}"]
    for r in rows:
        err = "-" if r.get("max_abs_err") is None else f"{r['max_abs_err']:.3g}"
        lines.append(f"{r['target']:<11} {r['program']:<16} {r['check']:<22} {err:>11} {r.get('tolerance_used', '-')!s:>8}  {r.get('detail', '')}")
    return "\n".join(lines)


def release_memory() -> None:
    """Free what exporting a target leaves behind before the next target or the verification: the fake-tensor
    dispatch caches (their keys hold the ops' arguments, lowered graphs among them: the process-wide one,
    and each shape environment's, which ShapeEnv's per-method lru caches keep alive), ExecuTorch's
    module-level references to the last lowered graphs, the graphs' reference cycles, and glibc's freed
    heap (kept in its arenas, it would count against the next peak)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    FakeTensorMode.cache_clear()
    for method in vars(ShapeEnv).values():
        if hasattr(method, "cache_clear"):
            method.cache_clear()
    if "executorch.exir" in sys.modules:  # only once something was lowered: no import for other targets
        executorch_target.forget_lowered_graphs()
    gc.collect()
    if platform.system() == "Linux":
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def _runner(prepared: Prepared, tiles: int) -> str:
    """Which runners can run the bundle: ExecuTorch's stock MultimodalRunner takes text and image inputs in
    turn, so it runs a tiled image too when the app feeds the tiles between the template's text pieces."""
    if any(p["reads_text"] or p["in_llm"] for p in prepared.passes):
        return "vlmc (reads the question with the image)"
    if tiles > 1:
        return (f"any: vlmc, or ExecuTorch's stock MultimodalRunner given the {tiles} tiles (prompt.image_resize) as image "
                "inputs between the template's text pieces")
    return "any: vlmc, or ExecuTorch's stock MultimodalRunner"


def _in_llm_fields(ctx: ExportContext) -> dict:
    """What a runner must know about the decoder when token stages act inside the LLM."""
    compact = "compact: the visual tokens kept before the LLM take consecutive positions, as ExecuTorch's runner assigns them"
    shape = ctx.decoder_shape
    if not shape.full_prompt_prefill:
        return {"positions": compact}
    return {"positions": compact + "; rows dropped inside the LLM leave the kept ones at their original positions",
            "cache_shifts": list(shape.cache_shifts),
            "cache_lengths": [shape.cache_length(i) for i in range(shape.num_layers)],
            **({"cache_evictions": ctx.model.cache_evictions()} if any(ctx.model.cache_evictions()) else {}),
            "prefill": ("text_prefill: the whole prompt (inputs_embeds, image_start = its first image row[, logits_index]) "
                        "from slot 0; text_decoder then continues at position p, layer i writing slot p - cache_shifts[i]")}


def _kv_cache_fields(ctx: ExportContext) -> dict:
    """How the decoder's cache is stored and what it occupies at max_context (every slot is allocated)."""
    shape = ctx.decoder_shape
    fields = {"dtype": shape.kv_cache, "bytes": shape.cache_bytes()}
    if shape.kv_cache == "int8":
        fields["layout"] = ("per layer k_cache, v_cache int8 [1, heads, slots, head_dim] (ExecuTorch: [1, slots, heads, "
                            "head_dim]) and k_scale, v_scale float32 with a last dim of 1; value = code x scale")
    if shape.packed:
        fields["packed"] = [list(p) for p in shape.packed]
        fields["layout"] = ("packed: [layer, heavy rows, rank, light rows, light rank]; such a layer's k_cache, v_cache "
                            "hold its text rows, and k_rows, v_rows [1, heavy, rank], k_lite, v_lite [1, light, light rank] "
                            "its image rows as coefficients on the layer's key / value bases (constants of the program)")
    return fields


def _tied_embedding_note(entry: dict) -> str:
    """What a target stored of a tied embedding table (ExecuTorch says it itself)."""
    if entry.get("weights", {}).get("file") and entry["programs"]["token_embedding"].get("shared_bytes"):
        return (f"stored once: token_embedding's table in {entry['weights']['file']}; the LM head reads it through a "
                "Transpose onnxruntime folds when it loads the graph (on disk once, in memory twice)")
    return "stored twice: token_embedding and text_decoder are separate models here, each holding the table"


def export_bundle(recipe: Recipe, out: Path, force: bool = False, progress: Optional[Callable[[str], None]] = None) -> Path:
    """Build, verify and atomically write a bundle; raise VlmcError (leaving nothing) on any failure."""
    progress = progress or (lambda msg: None)
    started = time.time()
    devices = _resolve_devices(recipe) if recipe.verify.enabled else []  # before the model loads: a bad name fails fast
    prepared = prepare(recipe)
    steps = {"load_and_passes": round(time.time() - started, 2)}
    _check_targets(prepared)
    if "tvm" in prepared.recipe.targets:
        tvm_target.check(prepared.recipe)
    loaded, recipe, cfg = prepared.loaded, prepared.recipe, prepared.loaded.config
    with BundleWriter(out, force) as writer:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (loaded.directory / name).is_file():
                shutil.copy(loaded.directory / name, writer.path(name))
        ctx = ExportContext(loaded, recipe, writer.dir, progress, prepared.image_tokens, prepared.quant)
        targets = {}
        for target in recipe.targets:
            t0 = time.time()
            targets[target] = LOWERINGS[target](ctx)
            targets[target]["export_seconds"] = round(time.time() - t0, 2)
            if ctx.model.config.text.tie_word_embeddings and not ctx.model.tied_head:
                targets[target]["tied_embedding"] = ("untied by pass embed8: token_embedding holds the int8 table, the "
                                                     "LM head its own weight (float, or as the decoder is quantized)")
            elif target != "executorch" and ctx.model.tied_head:
                targets[target]["tied_embedding"] = _tied_embedding_note(targets[target])
            release_memory()  # exported / lowered graphs hold reference cycles: free them before the next target
        for target, entry in targets.items():
            steps[f"lower_{target}"] = entry["export_seconds"]
        t0 = time.time()
        verifier = Verifier(ctx) if recipe.verify.enabled else None
        verification = _verify(ctx, targets, verifier) if verifier else []
        steps["verify"] = round(time.time() - t0, 2)
        failed = [r for r in verification if not r["passed"]]
        if failed:
            raise VlmcError(f"verification failed for {len(failed)} check(s); no bundle written\n{format_failures(failed)}")
        manifest = {
            "format": FORMAT,
            "vlmc_version": __version__,
            "name": recipe.name or out.name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": {"name": loaded.name, "family": loaded.family, "source": loaded.source,
                      "weights": "random (architecture preset: for latency and memory only)" if loaded.random_weights else "checkpoint",
                      "config": cfg.to_dict()},
            "prompt": {"template": recipe.prompt_template, "add_bos": loaded.tokenizer.add_bos,
                       "bos_token_id": loaded.bos_token_id, "eos_token_ids": list(cfg.text.eos_token_ids),
                       "image_token_id": cfg.image_token_id, "num_image_tokens": prepared.image_tokens,
                       "num_image_tokens_unpruned": prepared.native[1], "image_size": loaded.model.image_size,
                       "native_image_size": prepared.native[0], "image_resize": loaded.image_resize,
                       "image_tiles": loaded.model.image_tiles},
            "decoder": {"num_layers": cfg.text.num_layers, "num_kv_heads": cfg.text.num_kv_heads,
                        "head_dim": cfg.text.head_dim, "hidden_size": cfg.text.hidden_size,
                        "embed_width": loaded.model.embed_width,
                        **({"state_layers": [list(s) for s in ctx.decoder_shape.state_layers]}
                           if ctx.decoder_shape.state_layers else {}),
                        "vocab_size": cfg.text.vocab_size, "max_context": recipe.max_context,
                        "max_prompt": recipe.max_prompt, "kv_cache": _kv_cache_fields(ctx), **_in_llm_fields(ctx)},
            "recipe": recipe.model_dump(mode="json"),
            "passes": prepared.passes,
            "quantization": ({"parts": prepared.quant.describe(), "token_embedding": "float (not quantized)",
                              **({"calibration": ctx.calibration_source} if ctx.calibration_source else {})}
                             if prepared.quant else None),
            "runner": _runner(prepared, loaded.model.image_tiles),
            "targets": targets,
            "verification": {"enabled": recipe.verify.enabled, "atol": recipe.verify.atol, "rtol": recipe.verify.rtol,
                             "results": verification},
            "metrics": {"export_seconds": round(time.time() - started, 2), "steps_seconds": steps},
        }
        writer.path("recipe.yaml").write_text(recipe.to_yaml())
        if devices and verifier:
            t0 = time.time()
            rows = _verify_on_devices(verifier, writer.write_manifest(manifest), devices, progress)
            steps["verify_on_devices"] = round(time.time() - t0, 2)
            failed = [r for r in rows if not r["passed"]]
            if failed:
                raise VlmcError(f"verification on devices failed for {len(failed)} check(s); no bundle written\n{format_failures(failed)}")
            manifest["verification"]["results"] += rows
        return writer.commit(manifest)
