"""vlmc against the stock exports of the same LLaVA checkpoint, side by side in one run (issue 27).

ExecuTorch: vlmc's `.pte` against the one ExecuTorch's own LLaVA example writes
(`executorch.examples.models.llava.export_llava.export_all`), both as shipped (fp32) and with the example's
default quantization (8da4w decoder, int8 vision encoder, 8-bit embedding) against vlmc's nearest recipe. Both
files run on the same ExecuTorch runtime through the same session code, method by method (vision encode,
prefill, decode steps), and through ExecuTorch's stock MultimodalRunner (time to first token and decode rate
as an app sees them).

ONNX: vlmc's bundle against a plain `torch.onnx.export` (dynamo) of the transformers model run by
onnxruntime: the whole forward (ids + pixels -> logits, no KV cache: what a plain export of the model gives)
and its vision tower alone (for the vision-encode split).

Each export runs in its own process (wall time, peak RSS); each timing alternates the artifacts round by
round in one process. Ratios are vlmc / stock: below 1 is faster (latency, size, memory), above 1 faster
(tokens/s).

What the stock example needs to run here at all (each departure is the least that makes it run; none
changes its graphs or its lowering):
- torchvision has no wheel for this torch: a stand-in module provides the one function its graph uses,
  `transforms.v2.functional.normalize` ((x - mean) / std per channel).
- It hard-codes Llama-2-7B's ModelArgs (32 layers, 4096 wide): the checkpoint's geometry is passed instead.
- transformers 5 moved `vision_tower`, `multi_modal_projector` and `language_model` under `model.`: aliases.
- It downloads llava-1.5-7b and an example image: the checkpoint and a 64-token text prompt are given instead
  (its token_embedding's memory is planned for the example prompt's length, as in the example).
- It writes only `get_max_seq_len`; the current MultimodalRunner reads max context (default 128), KV-cache and
  dynamic-shape flags, BOS / EOS: those constant methods are added (metadata only).
- fp32 rows switch its quantizers off (PT2E quantize, the weight transform, the embedding quantizer).

    python benchmarks/stock_exports.py --model builtin --model llava-220m --rounds 10 -o docs/stock_exports
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
MAX_CONTEXT = 768  # the stock example's max_seq_len / max_context_len
QUESTION = "what color is the circle ?"


def group_size(checkpoint_dir: Path) -> int:
    """The stock example's 8da4w group (128), or the largest power of two dividing the decoder's widths when
    128 does not (torchao leaves a linear whose input width the group does not divide in float; vlmc refuses
    it): SmolLM-135M's 576 takes 64. Both exports use the same group."""
    text = json.loads((checkpoint_dir / "config.json").read_text())["text_config"]
    widths = (text["hidden_size"], text["intermediate_size"])
    return next(g for g in (128, 64, 32, 16) if all(w % g == 0 for w in widths))


def vlmc_configs(checkpoint_dir: Path) -> dict:
    """vlmc recipes: uncompressed, the stock example's quantization (int8 vision encoder, 8da4w decoder, 8-bit
    token table per row), and a compressed point (DivPrune keeps 100.5% of the built-in model's accuracy at 98
    of 196 tokens: docs/sweep_shipped_checkpoint)."""
    quant = [{"name": "w8a8", "at": "vision"}, {"name": "w4", "group_size": group_size(checkpoint_dir), "at": "decoder"},
             {"name": "embed8"}]
    return {"fp32": [], "quantized": quant, "divprune98+quantized": [{"name": "divprune", "keep": 98}, *quant]}


def peak_rss_mb() -> float:
    """This worker's own peak (VmHWM): getrusage's ru_maxrss survives exec, so a worker forked from the parent
    after it wrote the 220m checkpoint would report the parent's size."""
    from vlmc.runtimes.profile import peak_rss_mb as own_peak

    return own_peak()


# ---------------------------------------------------------------- checkpoints

def llava_220m(directory: Path) -> Path:
    """The issue's 220M-parameter LLaVA geometry with seeded random weights: CLIP ViT-B/16 at 224 px (196
    tokens) and SmolLM-135M's decoder, saved by transformers 5 with the built-in tokenizer (its ids fit)."""
    import shutil

    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from vlmc.models_zoo import BUILTIN_ROOT

    if (directory / "model.safetensors").is_file():
        return directory
    builtin = BUILTIN_ROOT / "shapes-llava"
    vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=16, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, head_dim=64, vocab_size=49152, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=4, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu", image_seq_length=196)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                       image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(builtin / name, directory / name)
    return directory


def checkpoint(name: str, work: Path) -> Path:
    from vlmc.models_zoo import BUILTIN_ROOT

    if name == "builtin":
        return BUILTIN_ROOT / "shapes-llava"
    if name == "llava-220m":
        return llava_220m(work / "checkpoints" / "llava-220m")
    if Path(name).is_dir():
        return Path(name)
    raise SystemExit(f"--model {name!r}: not builtin, llava-220m or a LLaVA checkpoint folder")


# ---------------------------------------------------------------- the stock exports (each in a worker process)

def install_torchvision_standin() -> None:
    """The only torchvision function the stock LLaVA graph calls (torchvision has no wheel for this torch)."""
    import types

    import torch

    def normalize(x, mean, std):
        return (x - torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)) / torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)

    functional = types.ModuleType("torchvision.transforms.v2.functional")
    functional.normalize = normalize
    v2 = types.ModuleType("torchvision.transforms.v2")
    v2.functional = functional
    transforms = types.ModuleType("torchvision.transforms")
    transforms.v2, transforms.functional = v2, functional
    root = types.ModuleType("torchvision")
    root.transforms = transforms
    sys.modules.update({"torchvision": root, "torchvision.transforms": transforms, "torchvision.transforms.v2": v2,
                        "torchvision.transforms.v2.functional": functional, "torchvision.transforms.functional": functional})


def stock_executorch(checkpoint_dir: str, out: str, quantized: bool) -> dict:
    import torch
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration  # before the stand-in: transformers probes torchvision

    install_torchvision_standin()
    import executorch.examples.models.llava.export_llava as stock_export
    import executorch.examples.models.llava.model as stock_model
    from executorch.extension.llm.export.builder import LLMEdgeManager

    hf = LlavaForConditionalGeneration.from_pretrained(checkpoint_dir).eval()
    for alias in ("vision_tower", "multi_modal_projector", "language_model"):
        object.__setattr__(hf, alias, getattr(hf.model, alias))  # transformers 5 layout; not registered twice
    processor = CLIPImageProcessor.from_pretrained(checkpoint_dir)
    text = hf.config.text_config
    model_args = stock_model.ModelArgs

    def checkpoint_geometry(**kw):
        kw.update(dim=text.hidden_size, n_layers=text.num_hidden_layers, n_heads=text.num_attention_heads,
                  n_kv_heads=text.num_key_value_heads, head_dim=text.head_dim, norm_eps=text.rms_norm_eps,
                  rope_freq_base=text.rope_parameters["rope_theta"])
        return model_args(**kw)

    stock_model.ModelArgs = checkpoint_geometry
    lower = stock_export.to_edge_transform_and_lower
    eos = text.eos_token_id if isinstance(text.eos_token_id, list) else [text.eos_token_id]

    def with_runner_metadata(*args, constant_methods=None, **kw):
        constant_methods = dict(constant_methods or {}, get_max_context_len=MAX_CONTEXT, use_kv_cache=True,
                                enable_dynamic_shape=True, use_sdpa_with_kv_cache=True, get_vocab_size=text.vocab_size,
                                get_eos_ids=eos, get_bos_id=text.bos_token_id)
        return lower(*args, constant_methods=constant_methods, **kw)

    stock_export.to_edge_transform_and_lower = with_runner_metadata
    if quantized:
        weight_transform = stock_export.get_quant_weight_transform
        group = group_size(Path(checkpoint_dir))
        stock_export.get_quant_weight_transform = lambda **kw: weight_transform(**{**kw, "group_size": group})
    else:
        LLMEdgeManager.pt2e_quantize = lambda self, quantizers: self
        stock_export.get_quant_weight_transform = lambda **kw: (lambda module: module)

        class KeepEmbedding:
            def __init__(self, model, **kw):
                self.model = model

            def quantized_model(self):
                return self.model

        stock_export.EmbeddingQuantHandler = KeepEmbedding
    llava = stock_model.LlavaModel.__new__(stock_model.LlavaModel)  # its __init__ downloads llava-1.5-7b
    llava.use_sdpa_with_kv_cache_op, llava.max_seq_len, llava.max_context_len = True, MAX_CONTEXT, MAX_CONTEXT
    llava.model, llava.image_processor = hf, processor
    image = torch.randint(0, 256, (3, processor.crop_size["height"], processor.crop_size["width"])).float()
    llava.resized_image = (image,)
    llava.input = (torch.ones(1, 64, dtype=torch.long), image, torch.ones(1, 16, dtype=torch.long))
    t0 = time.perf_counter()
    program = stock_export.export_all(llava)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_bytes(program.buffer)
    return {"export_s": time.perf_counter() - t0}


def plain_onnx(checkpoint_dir: str, out: str) -> dict:
    """torch.onnx.export (dynamo) of the transformers model: ids + pixels -> last logits, and the vision tower.
    One translation is added: transformers' placeholder check lowers to aten._is_all_true, which torch.onnx
    lacks (without it the export fails; the TorchScript exporter fails on aten::diff)."""
    import torch
    from onnxscript import opset20 as op
    from transformers import LlavaForConditionalGeneration

    def is_all_true(x):
        return op.Cast(op.ReduceMin(op.Cast(x, to=1), keepdims=0), to=9)

    class Forward(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, pixel_values):
            return self.model(input_ids=input_ids, pixel_values=pixel_values, use_cache=False, logits_to_keep=1).logits

    class Vision(Forward):
        def forward(self, pixel_values):
            return self.model.model.get_image_features(pixel_values=pixel_values).pooler_output

    t0 = time.perf_counter()
    hf = LlavaForConditionalGeneration.from_pretrained(checkpoint_dir).eval()
    c = hf.config
    n_image = (c.vision_config.image_size // c.vision_config.patch_size) ** 2
    ids = torch.cat([torch.ones(1, 3, dtype=torch.long), torch.full((1, n_image), c.image_token_id), torch.ones(1, 8, dtype=torch.long)], 1)
    pixels = torch.randn(1, 3, c.vision_config.image_size, c.vision_config.image_size)
    Path(out).mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(Vision(hf), (pixels,), f"{out}/vision.onnx", dynamo=True, input_names=["pixel_values"],
                          output_names=["features"])
        torch.onnx.export(Forward(hf), (ids, pixels), f"{out}/model.onnx", dynamo=True,
                          input_names=["input_ids", "pixel_values"], output_names=["logits"],
                          dynamic_shapes={"input_ids": {1: torch.export.Dim("seq", min=n_image + 1, max=MAX_CONTEXT)},
                                          "pixel_values": None},
                          custom_translation_table={torch.ops.aten._is_all_true.default: is_all_true})
    return {"export_s": time.perf_counter() - t0}


def vlmc_export(checkpoint_dir: str, out: str, target: str, passes: list) -> dict:
    import vlmc

    t0 = time.perf_counter()
    vlmc.compile({"model": checkpoint_dir, "targets": [target], "passes": passes, "max_context": MAX_CONTEXT,
                  "verify": {"enabled": False}}, out, force=True)
    return {"export_s": time.perf_counter() - t0}


# ---------------------------------------------------------------- sessions over the artifacts

def stock_pte_session(pte: Path, bundle: Path):
    """A stock .pte in vlmc's ExecuTorch session (the same calls as vlmc's own .pte): the stock vision
    encoder takes the image as float 0..255 where vlmc's takes uint8."""
    from vlmc.bundle import Bundle
    from vlmc.runtimes.base import DecoderShape
    from vlmc.runtimes.executorch_runner import ExecuTorchSession

    class StockSession(ExecuTorchSession):
        def vision(self, image_u8):
            return self.call("vision_encoder", [image_u8.astype(np.float32)])[0]

    return StockSession(pte, DecoderShape.from_manifest(Bundle(bundle).manifest))


class PlainOnnx:
    """The plain export: vision tower alone, and the whole forward per generated token (it has no cache)."""

    def __init__(self, folder: Path, mean, std, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.vision_session = ort.InferenceSession(str(folder / "vision.onnx"), options, providers=["CPUExecutionProvider"])
        self.forward_session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.mean, self.std = np.asarray(mean, np.float32).reshape(3, 1, 1), np.asarray(std, np.float32).reshape(3, 1, 1)

    def pixels(self, image_u8):
        return ((image_u8.astype(np.float32) / 255.0 - self.mean) / self.std)[None]

    def vision(self, image_u8):
        return self.vision_session.run(None, {"pixel_values": self.pixels(image_u8)})[0]

    def logits(self, ids: list[int], image_u8):
        return self.forward_session.run(None, {"input_ids": np.asarray([ids], np.int64), "pixel_values": self.pixels(image_u8)})[0].reshape(-1)


def prompt_and_image(bundle: Path):
    from vlmc.bundle import Bundle
    from vlmc.models_zoo.tokenizer import TextTokenizer

    b = Bundle(bundle)
    p = b.manifest["prompt"]
    ids = TextTokenizer(b.path).prompt(p["template"], QUESTION, p["num_image_tokens"], p["image_token_id"], p["bos_token_id"])
    image = np.random.RandomState(0).randint(0, 256, (3, p["image_size"], p["image_size"])).astype(np.uint8)
    return ids, image, p


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1000.0, out


def session_stages(session, prompt, image, decode_tokens: int) -> dict:
    """One generation by vlmc's own loop: vision encode, prefill (text embedding + decoder), decode steps
    (EOS ignored, so every artifact decodes as many)."""
    from vlmc.runtimes.generate import generate

    gen = generate(session, prompt, image, decode_tokens + 1, eos_ids=())
    return {"vision_ms": gen.vision_ms, "prefill_ms": gen.embed_ms + gen.prefill_ms, "ttft_ms": gen.time_to_first_token_ms,
            "decode_ms": statistics.median(gen.decode_ms), "tokens": gen.tokens}


def plain_stages(plain: PlainOnnx, prompt, image, decode_tokens: int) -> dict:
    ids = prompt.before + [prompt.image_token_id] * prompt.num_image_tokens + prompt.after  # placeholders, as transformers reads them
    vision_ms, _ = timed(lambda: plain.vision(image))
    ttft_ms, logits = timed(lambda: plain.logits(ids, image))
    tokens, steps = [int(np.argmax(logits))], []
    for _ in range(decode_tokens):
        ms, logits = timed(lambda: plain.logits(ids + tokens, image))
        steps.append(ms)
        tokens.append(int(np.argmax(logits)))
    return {"vision_ms": vision_ms, "prefill_ms": ttft_ms - vision_ms, "ttft_ms": ttft_ms,
            "decode_ms": statistics.median(steps), "tokens": tokens}


# ---------------------------------------------------------------- measurements (each in a worker process)

def register_quantized_kernels() -> None:
    """The stock quantized .pte's 8-bit embedding runs ExecuTorch's quantized kernels, which the Python
    runtime does not register by itself (vlmc's programs do not use them): loading the library registers them."""
    import ctypes

    import executorch.runtime  # noqa: F401  (the runtime the kernels register into)

    library = next(Path(executorch.runtime.__file__).parents[1].glob("lib/libexecutorch_kernels_quantized.*"))
    ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)


def executorch_sessions(artifacts: dict, reference_bundle: str) -> dict:
    from vlmc.runtimes.executorch_runner import ExecuTorchSession
    from vlmc.bundle import Bundle
    from vlmc.runtimes.base import DecoderShape

    register_quantized_kernels()
    sessions = {}
    for name, a in artifacts.items():
        if a["kind"] == "stock":
            sessions[name] = stock_pte_session(Path(a["path"]), Path(reference_bundle))
        else:
            sessions[name] = ExecuTorchSession(Path(a["path"]) / "model.pte", DecoderShape.from_manifest(Bundle(a["path"]).manifest))
    return sessions


def prompts_for(artifacts: dict, reference_bundle: str) -> dict:
    """Each artifact's prompt ids (a vlmc bundle's own: DivPrune changes the image rows) and the image."""
    return {name: prompt_and_image(Path(a["path"]) if a["kind"] == "vlmc" else Path(reference_bundle))[:2]
            for name, a in artifacts.items()}


def time_methods(artifacts: dict, reference_bundle: str, rounds: int, decode_tokens: int) -> dict:
    """Every .pte through the same ExecuTorch session code, alternating round by round (one warm-up)."""
    sessions = executorch_sessions(artifacts, reference_bundle)
    prompts = prompts_for(artifacts, reference_bundle)
    runs = {name: [] for name in sessions}
    for r in range(rounds + 1):
        for name, s in sessions.items():
            stages = session_stages(s, *prompts[name], decode_tokens)
            if r:
                runs[name].append(stages)
    return {name: summary(rs) for name, rs in runs.items()}


def time_stock_runner(artifacts: dict, reference_bundle: str, rounds: int, decode_tokens: int) -> dict:
    """ExecuTorch's stock MultimodalRunner on every .pte (text, image, text as an app feeds them): its own
    stats' time to first token and decode rate."""
    import torch
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (the llama:: kernels)
    from executorch.extension.llm.runner import GenerationConfig, MultimodalRunner, make_image_input, make_text_input

    register_quantized_kernels()
    _, image, p = prompt_and_image(Path(reference_bundle))
    before, after = p["template"].replace("{prompt}", QUESTION).split("<image>")
    before = ("<s>" if p["add_bos"] else "") + before
    runners = {name: MultimodalRunner(str(Path(a["path"]) / "model.pte" if a["kind"] == "vlmc" else a["path"]),
                                      str(Path(reference_bundle) / "tokenizer.json")) for name, a in artifacts.items()}
    images = {name: torch.from_numpy(image.astype(np.float32) if a["kind"] == "stock" else image) for name, a in artifacts.items()}
    runs = {name: [] for name in runners}
    for r in range(rounds + 1):
        for name, runner in runners.items():
            stats, pieces = [], []
            runner.reset()  # a new conversation each round (the runner keeps its position across calls)
            runner.generate([make_text_input(before), make_image_input(images[name]), make_text_input(after)],
                            GenerationConfig(max_new_tokens=decode_tokens + 1, temperature=0.0, echo=False),
                            token_callback=pieces.append, stats_callback=stats.append)
            s = json.loads(stats[-1].to_json_string())
            generated = s["generated_tokens"]
            decode_s = (s["inference_end_ms"] - s["first_token_ms"]) / 1000.0
            if r:
                runs[name].append({"ttft_ms": s["first_token_ms"] - s["inference_start_ms"], "prompt_tokens": s["prompt_tokens"],
                                   "generated": generated, "pieces": "".join(pieces),
                                   "decode_tokens_per_s": (generated - 1) / decode_s if generated > 1 and decode_s > 0 else None})
    out = {}
    for name, rs in runs.items():
        rates = [x["decode_tokens_per_s"] for x in rs if x["decode_tokens_per_s"]]
        out[name] = {"ttft_ms": statistics.median(x["ttft_ms"] for x in rs), "prompt_tokens": rs[0]["prompt_tokens"],
                     "generated": rs[0]["generated"], "text": rs[0]["pieces"],
                     "decode_tokens_per_s": statistics.median(rates) if rates else None}
    return out


def time_onnx(artifacts: dict, reference_bundle: str, rounds: int, decode_tokens: int, threads: int, checkpoint_dir: str) -> dict:
    """vlmc's ONNX bundle (its onnxruntime session) and the plain export, alternating round by round."""
    from vlmc import api
    from vlmc.bundle import Bundle

    pre = json.loads((Path(checkpoint_dir) / "preprocessor_config.json").read_text())
    sessions = {}
    for name, a in artifacts.items():
        if a["kind"] == "stock":
            sessions[name] = PlainOnnx(Path(a["path"]), pre["image_mean"], pre["image_std"], threads)
        else:
            sessions[name] = api.session(Bundle(a["path"]), "onnxruntime")
    prompts = prompts_for(artifacts, reference_bundle)
    runs = {name: [] for name in sessions}
    for r in range(rounds + 1):
        for name, s in sessions.items():
            prompt, img = prompts[name]
            stages = (plain_stages if isinstance(s, PlainOnnx) else session_stages)(s, prompt, img, decode_tokens)
            if r:
                runs[name].append(stages)
    return {name: summary(rs) for name, rs in runs.items()}


def summary(runs: list[dict]) -> dict:
    keys = ("vision_ms", "prefill_ms", "ttft_ms", "decode_ms")
    out = {k: statistics.median(x[k] for x in runs) for k in keys}
    out["decode_tokens_per_s"] = 1000.0 / out["decode_ms"]
    out["tokens"] = runs[0]["tokens"]
    return out


def peak_memory(artifact: dict, reference_bundle: str, runtime: str, decode_tokens: int, threads: int, checkpoint_dir: str) -> dict:
    """Peak RSS of a fresh process that loads one artifact and generates once, and above its imports."""
    import torch  # noqa: F401  (imported before the baseline, as every runner needs it)
    import onnxruntime  # noqa: F401
    from executorch.runtime import Runtime  # noqa: F401

    base = peak_rss_mb()
    one = {"x": artifact}
    if runtime == "executorch":
        session = executorch_sessions(one, reference_bundle)["x"]
        session_stages(session, *prompts_for(one, reference_bundle)["x"], decode_tokens)
    else:
        time_onnx(one, reference_bundle, 1, decode_tokens, threads, checkpoint_dir)
    return {"peak_rss_mb": peak_rss_mb(), "above_imports_mb": peak_rss_mb() - base}


def accuracy(artifacts: dict, reference_bundle: str, n: int) -> dict:
    """ShapesVQA test accuracy of every .pte through the same session code (greedy, up to 4 tokens)."""
    from vlmc.eval.evaluate import normalize_answer, shapes_vqa_questions
    from vlmc.models_zoo.tokenizer import TextTokenizer
    from vlmc.runtimes.generate import generate

    sessions = executorch_sessions(artifacts, reference_bundle)
    tokenizer = TextTokenizer(Path(reference_bundle))
    out = {}
    for name, a in artifacts.items():
        bundle = Path(a["path"]) if a["kind"] == "vlmc" else Path(reference_bundle)
        _, _, p = prompt_and_image(bundle)
        t = TextTokenizer(bundle)
        correct = 0
        for q in shapes_vqa_questions("test", n, p["image_size"]):
            prompt = t.prompt(p["template"], q.question, p["num_image_tokens"], p["image_token_id"], p["bos_token_id"])
            gen = generate(sessions[name], prompt, q.image, 4, set(p["eos_token_ids"]))
            correct += normalize_answer(tokenizer.decode(gen.tokens)) == normalize_answer(q.answer)
        out[name] = {"accuracy": correct / n, "n": n}
    return out


WORKERS = {"stock_executorch": stock_executorch, "plain_onnx": plain_onnx, "vlmc_export": vlmc_export,
           "time_methods": time_methods, "time_stock_runner": time_stock_runner, "time_onnx": time_onnx,
           "peak_memory": peak_memory, "accuracy": accuracy}


def in_worker(job: str, **kw) -> dict:
    """Run one job in a fresh interpreter (ExecuTorch hangs in a fork()ed child; each export's peak RSS is its own)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, str(HERE), "--worker", json.dumps({"job": job, **kw})], capture_output=True,
                          text=True, env=env)
    if done.returncode:
        sys.exit(f"{job} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the run

def artifact_bytes(a: dict) -> int:
    """What ships: a .pte, a vlmc bundle's programs, or the plain export's model.onnx (its vision-only graph
    is there for the vision-encode split, not to ship)."""
    path = Path(a["path"])
    if path.is_file():
        return path.stat().st_size
    shipped = ("model.onnx", "model.onnx.data") if a["kind"] == "stock" else None
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".pte", ".onnx", ".data")
               and (shipped is None or f.name in shipped))


def artifacts_for(model: str, ckpt: Path, work: Path, runtimes: set, progress) -> tuple[dict, dict, str]:
    """Export everything once per model (a finished artifact is reused): {name: artifact} per runtime. The
    fp32 vlmc .pte is always there: it is the reference bundle (tokenizer, prompt) of every run."""
    pte, onnx = {}, {}
    for config, passes in vlmc_configs(ckpt).items():
        if config != "fp32" and "executorch" not in runtimes:
            continue
        pte[f"vlmc {config}"] = {"kind": "vlmc", "runtime": "executorch", "path": str(work / model / f"vlmc-et-{config}"),
                                 "job": ("vlmc_export", {"target": "executorch", "passes": passes})}
    for config in ("fp32", "quantized") if "executorch" in runtimes else ():
        pte[f"stock {config}"] = {"kind": "stock", "runtime": "executorch", "path": str(work / model / f"stock-{config}.pte"),
                                  "job": ("stock_executorch", {"quantized": config == "quantized"})}
    if "onnxruntime" in runtimes:
        onnx["vlmc fp32"] = {"kind": "vlmc", "runtime": "onnxruntime", "path": str(work / model / "vlmc-onnx-fp32"),
                             "job": ("vlmc_export", {"target": "onnx", "passes": []})}
        onnx["plain torch.onnx fp32"] = {"kind": "stock", "runtime": "onnxruntime", "path": str(work / model / "plain-onnx"),
                                         "job": ("plain_onnx", {})}
    exports = {}
    for name, a in [*pte.items(), *onnx.items()]:
        job, kw = a.pop("job")
        marker = Path(a["path"] + ".export.json")
        if not marker.is_file():
            progress(f"{model}: export {a['runtime']} {name}")
            marker.write_text(json.dumps(in_worker(job, checkpoint_dir=str(ckpt), out=a["path"], **kw)))
        exports[f"{a['runtime']} {name}"] = {**json.loads(marker.read_text()), "bytes": artifact_bytes(a)}
    return pte, onnx, exports


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(k) is None else (f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]))
                                      for _, k in columns) + " |")
    return "\n".join(lines)


def measure(model: str, work: Path, runtimes: set, rounds: int, decode_tokens: int, questions: int, threads: int,
            progress) -> dict:
    """The runtimes' sections of one model's results (a section's keys: see `SECTIONS`)."""
    ckpt = checkpoint(model, work)
    pte, onnx, exports = artifacts_for(model, ckpt, work, runtimes, progress)
    reference = pte["vlmc fp32"]["path"]
    common = {"reference_bundle": reference, "decode_tokens": decode_tokens}
    out: dict = {"checkpoint": str(ckpt), "exports": exports, "peak_memory": {}}
    if "executorch" in runtimes:
        progress(f"{model}: ExecuTorch methods, {rounds} alternating rounds")
        out["executorch_methods"] = in_worker("time_methods", artifacts=pte, rounds=rounds, **common)
        progress(f"{model}: ExecuTorch stock MultimodalRunner, {rounds} alternating rounds")
        out["executorch_stock_runner"] = in_worker("time_stock_runner", artifacts=pte, rounds=rounds, **common)
    else:
        pte = {}  # the reference .pte is not measured
    if "onnxruntime" in runtimes:
        progress(f"{model}: onnxruntime, {rounds} alternating rounds")
        out["onnxruntime"] = in_worker("time_onnx", artifacts=onnx, rounds=rounds, threads=threads, checkpoint_dir=str(ckpt), **common)
    for name, a in [*pte.items(), *onnx.items()]:
        progress(f"{model}: peak memory {a['runtime']} {name}")
        out["peak_memory"][f"{a['runtime']} {name}"] = in_worker("peak_memory", artifact=a, runtime=a["runtime"], threads=threads,
                                                                 checkpoint_dir=str(ckpt), **common)
    if model == "builtin" and questions and "executorch" in runtimes:
        progress(f"{model}: ShapesVQA accuracy of every .pte on {questions} test questions")
        out["accuracy"] = in_worker("accuracy", artifacts=pte, reference_bundle=reference, n=questions)
    out["exports"] = {k: v for k, v in exports.items() if k.split()[0] in runtimes}
    out["measured"] = {runtime: time.strftime("%Y-%m-%d") for runtime in runtimes}
    return out


def merged(previous: dict, new: dict, runtimes: set) -> dict:
    """A model's results with the runtimes measured now replacing theirs in an earlier run's (the other
    runtime's rows stay as that run measured them: each table compares artifacts timed in one run)."""
    keep = {r for r in ("executorch", "onnxruntime") if r not in runtimes}
    out = {k: v for k, v in previous.items() if k in ("executorch_methods", "executorch_stock_runner", "accuracy")
           and "executorch" in keep or k == "onnxruntime" and "onnxruntime" in keep}
    for key in ("exports", "peak_memory"):
        out[key] = {**{k: v for k, v in previous.get(key, {}).items() if k.split()[0] in keep}, **new[key]}
    out["measured"] = {**{r: d for r, d in previous.get("measured", {}).items() if r in keep}, **new["measured"]}
    return {**out, **{k: v for k, v in new.items() if k not in ("exports", "peak_memory", "measured")}}


def rows_for(result: dict) -> tuple[list[dict], list[dict]]:
    """Per-artifact rows with vlmc / stock ratios against the same-precision stock artifact."""
    pte_rows, ort_rows = [], []
    for runtime, timings, rows in (("executorch", result.get("executorch_methods", {}), pte_rows),
                                   ("onnxruntime", result.get("onnxruntime", {}), ort_rows)):
        for name, t in timings.items():
            key = f"{runtime} {name}"
            base_name = ("stock quantized" if "quantized" in name else "stock fp32") if runtime == "executorch" else "plain torch.onnx fp32"
            base = timings[base_name]
            e, m, mb = result["exports"][key], result["peak_memory"][key], result["exports"][f"{runtime} {base_name}"]
            row = {"artifact": name, "vs": base_name if name != base_name else "",
                   "vision_ms": t["vision_ms"], "prefill_ms": t["prefill_ms"], "ttft_ms": t["ttft_ms"],
                   "decode_tok_s": t["decode_tokens_per_s"], "size_mb": e["bytes"] / 1e6,
                   "peak_rss_mb": m["above_imports_mb"], "export_s": e["export_s"], "export_peak_mb": e["peak_rss_mb"],
                   "vision_x": ratio(t["vision_ms"], base["vision_ms"]), "prefill_x": ratio(t["prefill_ms"], base["prefill_ms"]),
                   "ttft_x": ratio(t["ttft_ms"], base["ttft_ms"]), "decode_x": ratio(t["decode_tokens_per_s"], base["decode_tokens_per_s"]),
                   "size_x": ratio(e["bytes"], mb["bytes"]), "rss_x": ratio(m["above_imports_mb"], result["peak_memory"][f"{runtime} {base_name}"]["above_imports_mb"]),
                   "same_tokens": t["tokens"] == base["tokens"]}
            if runtime == "executorch":
                r, rb = result["executorch_stock_runner"][name], result["executorch_stock_runner"][base_name]
                row.update(runner_ttft_ms=r["ttft_ms"], runner_ttft_x=ratio(r["ttft_ms"], rb["ttft_ms"]),
                           runner_decode_tok_s=r["decode_tokens_per_s"],
                           runner_decode_x=ratio(r["decode_tokens_per_s"], rb["decode_tokens_per_s"]))
                if name in result.get("accuracy", {}):
                    row["accuracy"] = round(100 * result["accuracy"][name]["accuracy"], 1)
            rows.append(row)
    return pte_rows, ort_rows


PTE_COLUMNS = [("artifact", "artifact"), ("against", "vs"), ("vision ms", "vision_ms"), ("x", "vision_x"), ("prefill ms", "prefill_ms"),
               ("x", "prefill_x"), ("TTFT ms", "ttft_ms"), ("x", "ttft_x"), ("decode tok/s", "decode_tok_s"), ("x", "decode_x"),
               ("runner TTFT ms", "runner_ttft_ms"), ("x", "runner_ttft_x"), ("runner tok/s", "runner_decode_tok_s"), ("x", "runner_decode_x"),
               ("size MB", "size_mb"), ("x", "size_x"), ("peak RSS MB", "peak_rss_mb"), ("x", "rss_x"), ("export s", "export_s"),
               ("export peak MB", "export_peak_mb"), ("accuracy %", "accuracy"), ("same tokens", "same_tokens")]
ORT_COLUMNS = [c for c in PTE_COLUMNS if not c[1].startswith(("runner", "accuracy"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="builtin, llava-220m or a LLaVA checkpoint folder (repeatable)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--questions", type=int, default=200, help="ShapesVQA test questions for the built-in model's accuracy")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--runtime", action="append", choices=["executorch", "onnxruntime"],
                        help="measure only these (repeatable; default both); the other runtime's rows of an existing "
                             "results.json in --out are kept")
    parser.add_argument("--work", type=Path, default=Path("build/stock_exports"), help="exports (reused by later runs)")
    parser.add_argument("-o", "--out", type=Path, help="folder for results.json and results.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        result = WORKERS[job.pop("job")](**job)
        print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()} if job.get("out") else result))
        return
    if not args.out:
        parser.error("-o/--out is required")
    progress = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True)  # noqa: E731
    runtimes = set(args.runtime or ("executorch", "onnxruntime"))
    previous = json.loads((args.out / "results.json").read_text()) if (args.out / "results.json").is_file() else {}
    results, md = dict(previous.get("models", {})), []  # models not measured now keep their rows
    for model in args.model or ["builtin"]:
        new = measure(model, args.work, runtimes, args.rounds, args.decode_tokens, args.questions, args.threads, progress)
        results[model] = merged(results.get(model, {}), new, runtimes)
        pte_rows, ort_rows = rows_for(results[model])
        results[model]["rows"] = {"executorch": pte_rows, "onnxruntime": ort_rows}
    for model, result in results.items():
        pte_rows, ort_rows, measured = result["rows"]["executorch"], result["rows"]["onnxruntime"], result["measured"]
        md += [f"## {model}", "", f"### ExecuTorch (measured {measured.get('executorch', '?')}; x: vlmc / stock, below 1 "
               "faster or smaller; tok/s above 1 faster)", "", table(pte_rows, PTE_COLUMNS), "",
               f"### onnxruntime (measured {measured.get('onnxruntime', '?')})", "", table(ort_rows, ORT_COLUMNS), ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"rounds": args.rounds, "decode_tokens": args.decode_tokens,
                                                       "threads": args.threads, "models": results}, indent=1))
    (args.out / "results.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
