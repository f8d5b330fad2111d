"""ExecuTorch prefill: text_prefill against text_decoder from slot 0, side by side on the same .pte.

    python tools/bench_et_prefill.py BUNDLE [BUNDLE ...] --keep 22,49,98 --rounds 20 -o docs/et_prefill

text_decoder (what ExecuTorch's stock MultimodalRunner prefills with) attends through llama::custom_sdpa over
the cache's first start + T slots, a size XNNPACK cannot take, so the attention runs on ExecuTorch's own
kernels; text_prefill attends over the prompt's own rows inside XNNPACK. For each bundle (ExecuTorch, no
in-LLM token stages), in one spawned process: the real prompt at the bundle's image tokens and at each
`--keep` count (evenly spaced image rows, as `vlmc profile --prefill-curve`), the two methods called in
turn every round (medians), their logits' largest difference, the vision encode, and the resulting time to
first token. Peak RSS with and without text_prefill loaded, each in a fresh spawned process (XNNPACK packs
a method's weights when it is loaded). Writes results.json and results.md.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlmc.sweep import parse_counts  # noqa: E402


def _session(path: str, with_prefill: bool):
    from vlmc.bundle import Bundle
    from vlmc.runtimes.base import DecoderShape
    from vlmc.runtimes.executorch_runner import METHODS, ExecuTorchSession

    bundle = Bundle(path)
    methods = METHODS + (("text_prefill",) if with_prefill else ())
    return bundle, ExecuTorchSession(bundle.path / "model.pte", DecoderShape.from_manifest(bundle.manifest), methods=methods)


def measure(path: str, keep: list[int], rounds: int) -> dict:
    import numpy as np

    from vlmc.runtimes.generate import encode_image
    from vlmc.runtimes.profile import prompt_with_image_rows, sample_inputs

    bundle, session = _session(path, True)
    if bundle.manifest["decoder"].get("cache_shifts"):
        raise SystemExit(f"{path}: in-LLM token stages prefill through text_prefill only; nothing to compare")
    image, prompt = sample_inputs(bundle)
    image_embeds = encode_image(session, image)
    full = image_embeds[0].shape[1]
    start = np.asarray([len(prompt.before)], np.int64)
    rows = []
    for k in sorted({*keep, full}):
        embeds = prompt_with_image_rows(session, prompt, image_embeds, k).astype(np.float32)
        calls = {"text_decoder": [embeds, np.asarray([0], np.int64)], "text_prefill": [embeds, start]}
        times = {name: [] for name in calls}
        logits = {name: session.call(name, args)[0] for name, args in calls.items()}
        for r in range(rounds + 2):
            for name, args in calls.items():
                t0 = time.perf_counter()
                session.call(name, args)
                if r >= 2:  # two warm-up rounds
                    times[name].append((time.perf_counter() - t0) * 1000.0)
        med = {name: float(np.median(t)) for name, t in times.items()}
        rows.append({"image_tokens": k, "prompt_tokens": int(embeds.shape[1]), "text_decoder_ms": round(med["text_decoder"], 4),
                     "text_prefill_ms": round(med["text_prefill"], 4),
                     "speedup": round(med["text_decoder"] / med["text_prefill"], 3),
                     "max_abs_logit_diff": float(np.abs(logits["text_decoder"] - logits["text_prefill"]).max())})
    vision = []
    for r in range(rounds + 2):
        t0 = time.perf_counter()
        encode_image(session, image)
        if r >= 2:
            vision.append((time.perf_counter() - t0) * 1000.0)
    top = rows[-1]
    v = float(np.median(vision))
    return {"bundle": path, "image_tokens": full, "rounds": rounds, "vision_encode_ms": round(v, 4),
            "ttft_ms": {"text_decoder": round(v + top["text_decoder_ms"], 4), "text_prefill": round(v + top["text_prefill_ms"], 4)},
            "ttft_speedup": round((v + top["text_decoder_ms"]) / (v + top["text_prefill_ms"]), 3), "rows": rows}


def peak_rss(path: str, with_prefill: bool) -> float:
    """Peak RSS (MB) of a process that loads the program's methods and runs one prefill."""
    from vlmc.runtimes.generate import encode_image, prompt_embeds
    from vlmc.runtimes.profile import sample_inputs

    bundle, session = _session(path, with_prefill)
    image, prompt = sample_inputs(bundle)
    session.prefill(prompt_embeds(session, prompt, encode_image(session, image)), len(prompt.before))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", help="bundles with an executorch target")
    parser.add_argument("--keep", default="22,49,98", help="image tokens a token pass would keep")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    keep = parse_counts(args.keep)
    context = multiprocessing.get_context("spawn")  # the ExecuTorch runtime hangs in a fork()ed child
    results = []
    lines = ["| bundle | image tokens (prompt) | text_decoder ms | text_prefill ms | speedup | max abs logit diff |",
             "|---|---|---|---|---|---|"]
    for path in args.bundles:
        with context.Pool(1) as pool:
            r = pool.apply(measure, (path, keep, args.rounds))
        for with_prefill in (False, True):
            with context.Pool(1) as pool:
                r.setdefault("peak_rss_mb", {})["with_text_prefill" if with_prefill else "text_decoder_only"] = round(
                    pool.apply(peak_rss, (path, with_prefill)), 1)
        results.append(r)
        name = Path(path).name
        for row in r["rows"]:
            lines.append(f"| {name} | {row['image_tokens']} ({row['prompt_tokens']}) | {row['text_decoder_ms']:.2f} | "
                         f"{row['text_prefill_ms']:.2f} | **{row['speedup']:.2f}x** | {row['max_abs_logit_diff']:.1e} |")
        print(f"{name}: vision {r['vision_encode_ms']:.2f} ms; TTFT {r['ttft_ms']['text_decoder']:.2f} -> "
              f"{r['ttft_ms']['text_prefill']:.2f} ms ({r['ttft_speedup']:.2f}x); peak RSS {r['peak_rss_mb']}")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS",)}
    (args.out / "results.json").write_text(json.dumps({"env": env, "results": results}, indent=1) + "\n")
    summary = [f"| {Path(r['bundle']).name} | {r['vision_encode_ms']:.2f} | {r['ttft_ms']['text_decoder']:.2f} | "
               f"{r['ttft_ms']['text_prefill']:.2f} | **{r['ttft_speedup']:.2f}x** | {r['peak_rss_mb']['text_decoder_only']} | "
               f"{r['peak_rss_mb']['with_text_prefill']} |" for r in results]
    (args.out / "results.md").write_text(
        table + "\n\n| bundle | vision ms | TTFT via text_decoder ms | TTFT via text_prefill ms | TTFT speedup | peak RSS MB "
        "(text_decoder only) | peak RSS MB (with text_prefill) |\n|---|---|---|---|---|---|---|\n" + "\n".join(summary) + "\n")


if __name__ == "__main__":
    main()
