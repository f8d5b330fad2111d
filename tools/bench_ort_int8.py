"""onnxruntime int8 against fp32, side by side in one run: which quantized graph form is faster than fp32.

    python tools/bench_ort_int8.py --model builtin --model llava-220m --rounds 10 -o docs/ort_int8

For each model, vlmc exports ONNX bundles (kept under --work and reused): fp32, w8a8 with uint8 activations
(U8S8, vlmc's default), w8a8 with int8 activations (S8S8, `onnx.w8a8_activations: int8`, the form vlmc
shipped before) and w8 (dynamic int8, MatMulInteger). One process then opens every bundle on onnxruntime
and runs them alternately, round after round, each a whole generation by vlmc's own loop: vision encode,
prefill (text embedding + decoder), decode steps. Speedups are fp32's median time over the config's (above 1:
faster). The built-in model's bundles are verified against eager and evaluated on ShapesVQA (accuracy,
retention, agreement); the 220M geometry has seeded random weights, so it reports how many greedy tokens
match fp32's instead. Writes results.json and results.md.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import stock_exports  # noqa: E402  (its checkpoints, prompt and per-stage timing)

CONFIGS = {"fp32": ([], "uint8"), "w8a8 (U8S8)": ([{"name": "w8a8"}], "uint8"),
           "w8a8 (S8S8)": ([{"name": "w8a8"}], "int8"), "w8 (dynamic)": ([{"name": "w8"}], "uint8")}


def export(checkpoint_dir: str, out: str, passes: list, activations: str, verify: bool) -> None:
    import vlmc

    vlmc.compile({"model": checkpoint_dir, "targets": ["onnx"], "passes": passes, "max_context": stock_exports.MAX_CONTEXT,
                  "onnx": {"w8a8_activations": activations}, "verify": {"enabled": verify}}, out, force=True)


def bundles_for(model: str, work: Path) -> dict[str, Path]:
    """Every config's bundle, exported once in a spawned process (a finished bundle is reused)."""
    ckpt = stock_exports.checkpoint(model, work)
    out = {}
    for name, (passes, activations) in CONFIGS.items():
        path = work / model / name.replace(" ", "").replace("(", "-").replace(")", "")
        if not (path / "manifest.json").is_file():
            print(f"{model}: exporting {name}", flush=True)
            p = multiprocessing.get_context("spawn").Process(target=export, args=(str(ckpt), str(path), passes, activations,
                                                                                  model == "builtin"))
            p.start()
            p.join()
            if p.exitcode:
                sys.exit(f"{model}: export of {name} failed")
        out[name] = path
    return out


def time_interleaved(bundles: dict[str, Path], rounds: int, decode_tokens: int) -> dict:
    from vlmc import api
    from vlmc.bundle import Bundle

    sessions = {name: api.session(Bundle(path), "onnxruntime") for name, path in bundles.items()}
    prompt, image, _ = stock_exports.prompt_and_image(next(iter(bundles.values())))
    runs = {name: [] for name in sessions}
    for r in range(rounds + 1):  # round 0 warms up
        for name, session in sessions.items():
            stages = stock_exports.session_stages(session, prompt, image, decode_tokens)
            if r:
                runs[name].append(stages)
    return {name: stock_exports.summary(rs) for name, rs in runs.items()}


def quality(model: str, bundles: dict[str, Path], timings: dict, questions: int) -> dict:
    """Built-in: ShapesVQA on onnxruntime against the uncompressed eager model; 220m: greedy tokens equal to fp32's."""
    if model != "builtin":
        ref = timings["fp32"]["tokens"]
        return {name: {"tokens_equal_to_fp32": sum(a == b for a, b in zip(t["tokens"], ref)), "of": len(ref)}
                for name, t in timings.items()}
    from vlmc import api

    out = {}
    for name, path in bundles.items():
        r = api.evaluate(path, "onnxruntime", n=questions)
        out[name] = {k: r[k] for k in ("accuracy", "ci95", "agreement", "mean_kl", "n")}
    base = out["fp32"]["accuracy"]
    for r in out.values():
        r["retention"] = round(100 * r["accuracy"] / base, 2)
    return out


def rows(model: str, timings: dict, scores: dict) -> list[str]:
    fp32 = timings["fp32"]
    lines = []
    for name, t in timings.items():
        s = scores[name]
        score = (f"{s['accuracy']}% ({s['retention']}% retention, {s['agreement']}% agreement)" if "accuracy" in s
                 else f"{s['tokens_equal_to_fp32']} / {s['of']} tokens = fp32's")
        lines.append(f"| {model} | {name} | {t['vision_ms']:.4g} ({fp32['vision_ms'] / t['vision_ms']:.2f}x) | "
                     f"{t['prefill_ms']:.4g} ({fp32['prefill_ms'] / t['prefill_ms']:.2f}x) | "
                     f"{t['ttft_ms']:.4g} ({fp32['ttft_ms'] / t['ttft_ms']:.2f}x) | "
                     f"{t['decode_tokens_per_s']:.4g} ({t['decode_tokens_per_s'] / fp32['decode_tokens_per_s']:.2f}x) | {score} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="builtin, llava-220m or a LLaVA checkpoint folder (repeatable)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--questions", type=int, default=500, help="ShapesVQA test questions for the built-in model")
    parser.add_argument("--work", type=Path, default=Path("build/ort_int8"), help="exports (reused by later runs)")
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    results, lines = {}, ["| model | config | vision ms (x fp32) | prefill ms (x) | TTFT ms (x) | decode tok/s (x) | quality |",
                          "|---|---|---|---|---|---|---|"]
    for model in args.model or ["builtin"]:
        bundles = bundles_for(model, args.work)
        print(f"{model}: timing {len(bundles)} bundles, {args.rounds} rounds", flush=True)
        timings = time_interleaved(bundles, args.rounds, args.decode_tokens)
        scores = quality(model, bundles, timings, args.questions)
        results[model] = {name: {**{k: v for k, v in timings[name].items() if k != "tokens"}, **scores[name],
                                 "how": json.loads((path / "manifest.json").read_text())["targets"]["onnx"]["programs"]
                                 ["text_decoder"].get("quantization", {}).get("how", "fp32")}
                          for name, path in bundles.items()}
        lines += rows(model, timings, scores)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"measured": date.today().isoformat(), "rounds": args.rounds, "decode_tokens": args.decode_tokens}
    (args.out / "results.json").write_text(json.dumps({"run": meta, "models": results}, indent=1))
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
