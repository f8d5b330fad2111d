"""Profiling: latency per program, the per-stage VLM summary, memory, sizes and per-op rows.

Each profile runs in a fresh interpreter (never a forked child: the ExecuTorch runtime hangs in one),
so its peak RSS is the runtime's own and not the caller's. It is a plain subprocess speaking JSON lines,
not a multiprocessing spawn: a spawn re-imports the caller's main module, which would re-run a user's
unguarded script.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import replace
from typing import Optional

import numpy as np

from vlmc.bundle import Bundle
from vlmc.errors import VlmcError
from vlmc.models_zoo.tokenizer import TextTokenizer
from vlmc.remote import read_answer
from vlmc.runtimes import RUNTIME_TARGETS, check_runtime, open_session
from vlmc.runtimes.generate import encode_image, generate, prompt_embeds

SAMPLE_QUESTION = "what color is the circle?"


def peak_rss_mb() -> float:
    """This process's peak resident set. Linux: VmHWM, which a new program image starts afresh; getrusage's
    ru_maxrss is not, and would report the parent's size at fork when it is larger (a sweep's process)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _stats(times_ms: list[float]) -> dict:
    a = np.asarray(times_ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 4), "p90_ms": round(float(np.percentile(a, 90)), 4),
            "p99_ms": round(float(np.percentile(a, 99)), 4), "mean_ms": round(float(a.mean()), 4),
            "min_ms": round(float(a.min()), 4), "iterations": len(a)}


def _bench(fn, warmup: int, iterations: int) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return _stats(times)


def sample_inputs(bundle: Bundle):
    """A seeded image and the sample question through the bundle's own template and tokenizer."""
    p = bundle.manifest["prompt"]
    size, tiles = p["image_size"], p.get("image_tiles", 1)
    image = np.random.default_rng(0).integers(0, 256, (tiles, 3, size, size) if tiles > 1 else (3, size, size), dtype=np.uint8)
    tok = TextTokenizer(bundle.path)
    prompt = tok.prompt(p["template"], SAMPLE_QUESTION, p["num_image_tokens"], p["image_token_id"], p["bos_token_id"])
    return image, prompt


def prompt_with_image_rows(session, prompt, image_embeds: list, count: int) -> np.ndarray:
    """The prompt's embeddings with `count` evenly spaced rows of each image run's embeddings instead of all:
    what a pre-LLM token pass keeping that many hands the LLM."""
    n = image_embeds[0].shape[1]
    picked = [e[:, np.linspace(0, n - 1, count).round().astype(int)] for e in image_embeds]
    return prompt_embeds(session, replace(prompt, num_image_tokens=count), picked)


def prefill_curve(bundle: Bundle, session, image_embeds: list, prompt, counts: list[int], warmup: int, iterations: int,
                  progress) -> list[dict]:
    """Prefill latency with `count` image rows per image run instead of the bundle's (evenly spaced rows of
    the real image's embeddings, the same question): what a token pass keeping that many would cost in the
    LLM. Edge kernels are step-shaped in the row count, so fewer rows can be no faster."""
    n = image_embeds[0].shape[1]
    if bundle.manifest["decoder"].get("cache_shifts"):
        raise VlmcError("a prefill curve needs a bundle without in-LLM token stages (their prefill has fixed rows)")
    bad = [k for k in counts if not 1 <= k <= n]
    if bad:
        raise VlmcError(f"prefill curve: image token counts must be 1..{n} (the bundle's), got {bad[0]}")
    rows = []
    for k in sorted(set(counts)):
        embeds = prompt_with_image_rows(session, prompt, image_embeds, k)
        progress(f"prefill with {k} image rows x{iterations}")
        stats = _bench(lambda: session.prefill(embeds, len(prompt.before)), warmup, iterations)
        rows.append({"image_tokens": k, "tokens": embeds.shape[1], "p50_ms": stats["p50_ms"], "min_ms": stats["min_ms"]})
    return rows


def profile_session(bundle: Bundle, session, runtime: str, warmup: int, iterations: int, new_tokens: int, progress,
                    curve: Optional[list[int]] = None) -> dict:
    """Programs, stages and artifact sizes of an open session: the part of a profile every device shares
    (with `curve`, the prefill latency at those image token counts)."""
    image, prompt = sample_inputs(bundle)
    image_embeds = encode_image(session, image)
    embeds = prompt_embeds(session, prompt, image_embeds)
    programs = {}
    progress(f"{runtime}: vision_encoder x{iterations}")
    # one image's encode: every tile of a tiled bundle (`calls` runs of the program)
    programs["vision_encoder"] = {**_bench(lambda: encode_image(session, image), warmup, iterations), "calls": prompt.runs}
    progress(f"{runtime}: token_embedding x{iterations}")
    programs["token_embedding"] = _bench(lambda: session.embed(prompt.text_ids), warmup, iterations)
    method = session.prefill_program(len(prompt)) if hasattr(session, "prefill_program") else "text_decoder"
    progress(f"{runtime}: prefill through {method} ({len(prompt)} tokens) x{iterations}")
    programs["text_decoder.prefill"] = {**_bench(lambda: session.prefill(embeds, len(prompt.before)), warmup, iterations), "tokens": len(prompt)}
    programs["text_decoder.prefill"]["method"] = method  # ExecuTorch: text_prefill where the .pte has it
    token = int(np.argmax(session.prefill(embeds, len(prompt.before))))
    token_embeds = session.embed([token])
    progress(f"{runtime}: text_decoder decode step x{iterations}")
    programs["text_decoder.decode"] = {**_bench(lambda: session.step(token_embeds, len(prompt)), warmup, iterations), "tokens": 1}
    progress(f"{runtime}: generating {new_tokens} tokens")
    gen = generate(session, prompt, image, new_tokens, eos_ids=())
    decode = programs["text_decoder.decode"]["p50_ms"]
    stages = {
        "vision_encode_ms": programs["vision_encoder"]["p50_ms"],
        "prefill_ms": programs["text_decoder.prefill"]["p50_ms"],
        "decode_ms_per_token": decode,
        "time_to_first_token_ms": round(programs["vision_encoder"]["p50_ms"] + programs["token_embedding"]["p50_ms"]
                                        + programs["text_decoder.prefill"]["p50_ms"], 4),
        "decode_tokens_per_s": round(1000.0 / decode, 2) if decode else None,
        "generation": {"new_tokens": len(gen.tokens), "time_to_first_token_ms": round(gen.time_to_first_token_ms, 4),
                       "decode_ms_per_token_mean": round(float(np.mean(gen.decode_ms)), 4) if gen.decode_ms else None},
    }
    curve_rows = prefill_curve(bundle, session, image_embeds, prompt, curve, warmup, iterations, progress) if curve else None
    target = RUNTIME_TARGETS[runtime]
    names = sorted({f for e in bundle.programs(target).values() for f in e.get("files", [e["file"]])}) if target else []
    artifacts = {n: bundle.manifest["files"][n]["bytes"] for n in names}
    return {"bundle": bundle.name, "runtime": runtime, "device": "local",
            "host": {"system": platform.system(), "machine": platform.machine(), "cpus": os.cpu_count()},
            "warmup": warmup, "iterations": iterations, "programs": programs, "stages": stages,
            "artifacts": artifacts, "artifact_bytes_total": sum(artifacts.values()),
            **({"prefill_curve": curve_rows} if curve_rows else {})}


def profile_here(bundle_path: str, runtime: str, warmup: int, iterations: int, ops: bool, new_tokens: int, progress,
                 curve: Optional[list[int]] = None) -> dict:
    """Profile in this process (call `profile` to get a clean spawned one)."""
    rss_start = _rss_mb()
    bundle = Bundle(bundle_path)
    bundle.file("tokenizer.json")
    t0 = time.perf_counter()
    session = open_session(bundle, runtime)
    load_ms = (time.perf_counter() - t0) * 1000.0
    rss_loaded = _rss_mb()
    result = profile_session(bundle, session, runtime, warmup, iterations, new_tokens, progress, curve)
    result["load_ms"] = round(load_ms, 2)
    result["memory"] = {"rss_before_load_mb": round(rss_start, 1), "rss_after_load_mb": round(rss_loaded, 1),
                        "peak_rss_mb": round(peak_rss_mb(), 1)}
    if ops:
        progress(f"{runtime}: per-op profile of one generation")
        image, prompt = sample_inputs(bundle)
        op_session = open_session(bundle, runtime, profile_ops=True)
        generate(op_session, prompt, image, new_tokens, eos_ids=())
        result["ops"] = op_session.op_rows()
    return result


def serve_child() -> None:
    """The profiling process: arguments as one JSON line on stdin, JSON lines back on the stdout it was given
    (the runtimes' own chatter on fd 1 is sent to stderr so it cannot corrupt them)."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def send(kind, payload):
        out.write(json.dumps({kind: payload}) + "\n")

    try:
        args = json.loads(sys.stdin.readline())
        send("result", profile_here(*args[:6], lambda m: send("progress", m), *args[6:]))
    except VlmcError as e:
        send("error", str(e))
    except Exception as e:  # reported by the parent in one line
        send("error", f"profiling failed: {e.__class__.__name__}: {e}\n{traceback.format_exc() if os.environ.get('VLMC_DEBUG') else ''}".strip())


def check_profile_args(runtime: str, warmup: int, iterations: int, new_tokens: int) -> None:
    check_runtime(runtime)
    if runtime == "eager":
        raise VlmcError("profile runs exported artifacts: choose --runtime onnxruntime, executorch, tvm or coreml")
    if warmup < 0 or iterations < 1:
        raise VlmcError("--warmup must be >= 0 and --iterations >= 1")
    if new_tokens < 1:
        raise VlmcError("--new-tokens must be at least 1")


def profile(bundle_path: str, runtime: str, warmup: int = 3, iterations: int = 20, ops: bool = False,
            new_tokens: int = 8, progress=None, curve: Optional[list[int]] = None) -> dict:
    """Profile a bundle on a runtime in a spawned process; returns the profile schema as a dict."""
    check_profile_args(runtime, warmup, iterations, new_tokens)
    if runtime == "coreml":
        from vlmc.runtimes.coreml_runner import require_macos

        require_macos()
    Bundle(bundle_path).programs(RUNTIME_TARGETS[runtime])  # fail fast, in this process
    progress = progress or (lambda m: None)
    proc = subprocess.Popen([sys.executable, "-c", "from vlmc.runtimes.profile import serve_child; serve_child()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr_tail: list[str] = []

    def drain():  # keep the pipe flowing; the last lines explain a crash
        for line in proc.stderr:
            stderr_tail[:] = (stderr_tail + [line.rstrip()])[-5:]

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc.stdin.write(json.dumps([str(bundle_path), runtime, warmup, iterations, ops, new_tokens, curve]) + "\n")
        proc.stdin.close()
        for line in proc.stdout:
            result = read_answer(line, progress)
            if result is not None:
                return result
        proc.wait(timeout=30)
        reader.join(timeout=5)
        last = next((line for line in reversed(stderr_tail) if line.strip()), "")
        raise VlmcError(f"the {runtime} profiling process died (exit code {proc.returncode}){': ' + last if last else ''}")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
