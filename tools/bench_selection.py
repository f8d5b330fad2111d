"""What token selection costs: each vision-side method's vision_encoder against the uncompressed one.

    python tools/bench_selection.py --keep 22 --rounds 300 -o docs/selection_overhead

Exports the uncompressed model and every method (ONNX + ExecuTorch, verified), then, per runtime in one
spawned process, runs all their vision_encoder programs on the same image round-robin in a shuffled
order each round, so drift on a shared machine hits every configuration alike. The overhead of a method
is the ratio of its median time to the uncompressed median, minus 1. A second, independent session of
the uncompressed bundle ("uncompressed-again") measures the noise floor of that ratio; a bootstrap over
rounds gives each overhead a 95% interval. Prints a table and writes selection.json / selection.md.
With --baseline-work, the same configurations exported by another checkout (its own run of this tool's
--work) are timed in the same rounds, labelled "(baseline)": a change's before and after side by side.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlmc import api  # noqa: E402
from vlmc.errors import VlmcError  # noqa: E402
from vlmc.sweep import method_spec  # noqa: E402

VISION_SIDE = ("random", "pooling", "divprune", "tfps", "score", "coin", "apet", "zooprune", "vlmpruner",
               "docprune", "visionzip", "duet", "tome")
IN_LLM_STAGE = ("duet",)  # its second stage runs in the text_prefill method


def _time_rounds(bundles: dict, runtime: str, rounds: int, warmup: int, seed: int) -> dict:
    """Per configuration, the vision_encoder time (ms) of each round; run in a spawned process."""
    from vlmc.bundle import Bundle
    from vlmc.runtimes import open_session
    from vlmc.runtimes.profile import sample_inputs

    sessions = {}
    for label, path in bundles.items():
        sessions[label] = open_session(Bundle(path), runtime)
    image, _ = sample_inputs(Bundle(next(iter(bundles.values()))))
    for s in sessions.values():
        for _ in range(warmup):
            s.vision(image)
    rng = np.random.default_rng(seed)
    labels = list(sessions)
    times = {label: [] for label in labels}
    for _ in range(rounds):
        for i in rng.permutation(len(labels)):
            label = labels[i]
            t0 = time.perf_counter()
            sessions[label].vision(image)
            times[label].append((time.perf_counter() - t0) * 1000.0)
    return times


def _child(args, q) -> None:
    try:
        q.put(_time_rounds(*args))
    except Exception as e:  # reported by the parent in one line
        q.put(f"{e.__class__.__name__}: {e}")


def time_in_spawned_process(bundles: dict, runtime: str, rounds: int, warmup: int, seed: int) -> dict:
    ctx = multiprocessing.get_context("spawn")  # the ExecuTorch runtime hangs in a forked child
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=((bundles, runtime, rounds, warmup, seed), q))
    proc.start()
    result = q.get()
    proc.join()
    if isinstance(result, str):
        raise SystemExit(f"timing on {runtime} failed: {result}")
    return result


def overhead(method: list[float], base: list[float], rng: np.random.Generator, samples: int = 2000) -> dict:
    """Median-ratio overhead in % with a 95% bootstrap interval (rounds resampled together)."""
    m, b = np.asarray(method), np.asarray(base)
    point = 100 * (np.median(m) / np.median(b) - 1)
    idx = rng.integers(0, len(m), (samples, len(m)))
    boot = 100 * (np.median(m[idx], axis=1) / np.median(b[idx], axis=1) - 1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"median_ms": round(float(np.median(m)), 4), "overhead_pct": round(float(point), 2),
            "ci95": [round(float(lo), 2), round(float(hi), 2)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(VISION_SIDE))
    ap.add_argument("--keep", type=int, default=22)
    ap.add_argument("--model", default="shapes-llava")
    ap.add_argument("--runtimes", default="onnxruntime,executorch")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--work", type=Path, default=Path("build/bench_selection"), help="where the bundles are exported")
    ap.add_argument("--reuse", action="store_true", help="time the bundles already under --work (exported with the same passes)")
    ap.add_argument("--baseline-work", type=Path, help="also time the bundles of the same configurations under this "
                    "folder (exported by another checkout: before / after in one run)")
    ap.add_argument("-o", "--out", type=Path, default=Path("docs/selection_overhead"))
    args = ap.parse_args()

    from vlmc.models_zoo import load

    c = load(args.model).model
    runtimes = args.runtimes.split(",")
    targets = sorted({{"onnxruntime": "onnx", "executorch": "executorch"}[r] for r in runtimes})
    configs = {"uncompressed": None}
    for m in args.methods.split(","):
        configs[m] = method_spec(m, args.keep, c.num_image_tokens, c.num_vision_blocks)
    bundles, refused = {}, {}
    for label, spec in configs.items():
        print(f"export {label} ...", flush=True)
        # only vision_encoder is timed: no text_prefill method, unless the method has a stage inside the LLM
        recipe = {"model": args.model, "targets": targets, "passes": [spec] if spec else [],
                  "executorch": {"text_prefill": label in IN_LLM_STAGE}}
        try:
            if args.reuse and (args.work / label / "manifest.json").exists():
                bundles[label] = str(args.work / label)
                continue
            bundles[label] = str(api.compile(recipe, args.work / label, force=True).path)
        except VlmcError as e:  # e.g. ToMe's constant r cannot reach the count: reported, not timed
            refused[label] = str(e)
            print(f"  refused: {e}", flush=True)
    bundles["uncompressed-again"] = bundles["uncompressed"]
    if args.baseline_work:
        for label in configs:
            if (args.baseline_work / label / "manifest.json").exists():
                bundles[f"{label} (baseline)"] = str(args.baseline_work / label)

    rng = np.random.default_rng(0)
    results = {}
    for rt in runtimes:
        print(f"timing {len(bundles)} vision encoders on {rt}, {args.rounds} rounds ...", flush=True)
        times = time_in_spawned_process(bundles, rt, args.rounds, args.warmup, seed=1)
        results[rt] = {label: overhead(t, times["uncompressed"], rng) for label, t in times.items()}

    head = ["config", "pass"] + [f"{rt} {col}" for rt in runtimes for col in ("ms", "overhead % (95% CI)")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in bundles:
        spec = configs.get(label.removesuffix(" (baseline)"))
        cells = [label, json.dumps(spec) if spec else ""]
        for rt in runtimes:
            r = results[rt][label]
            cells += [f"{r['median_ms']:.3f}", f"{r['overhead_pct']:+.1f} ({r['ci95'][0]:+.1f}..{r['ci95'][1]:+.1f})"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"| {label} | refused: {why} |" + " |" * (len(head) - 2) for label, why in refused.items()]
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"model": args.model, "keep": args.keep, "rounds": args.rounds, "warmup": args.warmup,
              "baseline_work": str(args.baseline_work) if args.baseline_work else None,
              "runtimes": runtimes, "passes": configs, "results": results, "refused": refused}
    (args.out / "selection.json").write_text(json.dumps(report, indent=2) + "\n")
    cmd = f"python tools/bench_selection.py --methods {args.methods} --keep {args.keep} --rounds {args.rounds}" + (
        f" --baseline-work {args.baseline_work}" if args.baseline_work else "")
    (args.out / "selection.md").write_text(f"`{cmd}`\n\n" + table)


if __name__ == "__main__":
    main()
