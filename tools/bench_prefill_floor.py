"""Where a pruned prompt's prefill time goes: the rows' compute, and one read of every decoder weight.

    python tools/bench_prefill_floor.py BUNDLE:RUNTIME [BUNDLE:RUNTIME ...] --keep 22,49,98 -o docs/prefill_floor

For each bundle (no token pass; the uncompressed export) on its runtime, in one spawned process per bundle:
the prefill at the model's image tokens and at each `--keep` count (evenly spaced real image rows, the
same question: what a pre-LLM token pass keeping that many costs in the LLM, `vlmc profile --prefill-curve`)
and one decode step. Prints, per count, the measured prefill speedup over the full prompt, the FLOP-ideal
speedup (analytic decoder FLOPs, as `vlmc sweep` reports it) and the speedup a floor model predicts:
t(rows) = t_step + (t_full - t_step) x rows / full_rows, where t_step (one decode step) is the cost every
call pays whatever its rows, on a host whose matmuls at few rows are bound by reading the weights.
Writes results.json and results.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlmc import api  # noqa: E402
from vlmc.bundle import Bundle  # noqa: E402
from vlmc.sweep import parse_counts, prefill_flops  # noqa: E402


def measure(path: str, runtime: str, keep: list[int], iterations: int) -> dict:
    manifest = Bundle(path).manifest
    full = manifest["prompt"]["num_image_tokens"]
    p = api.profile(path, runtime, warmup=5, iterations=iterations, new_tokens=8, curve=sorted({*keep, full}))
    curve = {r["image_tokens"]: r for r in p["prefill_curve"]}
    step, top = p["programs"]["text_decoder.decode"]["p50_ms"], curve[full]
    rows = []
    for k in sorted(keep):
        r = curve[k]
        predicted = step + (top["p50_ms"] - step) * r["tokens"] / top["tokens"]
        rows.append({"image_tokens": k, "prompt_tokens": r["tokens"], "prefill_ms": r["p50_ms"],
                     "speedup": round(top["p50_ms"] / r["p50_ms"], 3),
                     "flop_ideal": round(prefill_flops(manifest, top["tokens"]) / prefill_flops(manifest, r["tokens"]), 3),
                     "floor_model": round(top["p50_ms"] / predicted, 3)})
        rows[-1]["of_flop_ideal"] = round(rows[-1]["speedup"] / rows[-1]["flop_ideal"], 3)
        rows[-1]["of_floor_model"] = round(rows[-1]["speedup"] / rows[-1]["floor_model"], 3)
    return {"bundle": path, "runtime": runtime, "image_tokens": full, "full_prefill_ms": top["p50_ms"],
            "decode_step_ms": step, "step_share_of_full_prefill": round(step / top["p50_ms"], 3), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="+", help="BUNDLE:RUNTIME (onnxruntime, executorch, tvm)")
    parser.add_argument("--keep", default="22,49,98", help="image tokens a token pass would keep")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    keep = parse_counts(args.keep)
    results = []
    lines = ["| bundle | runtime | decode step ms (share of full prefill) | image tokens | prefill ms | speedup | FLOP-ideal | of FLOP-ideal | floor model | of floor model |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for target in args.targets:
        path, _, runtime = target.rpartition(":")
        r = measure(path, runtime, keep, args.iterations)
        results.append(r)
        lines.append(f"| {Path(path).name} | {runtime} | {r['decode_step_ms']:.3g} ({r['step_share_of_full_prefill']:.0%}) | "
                     f"{r['image_tokens']} (full) | {r['full_prefill_ms']:.4g} | 1 | 1 | | 1 | |")
        for row in r["rows"]:
            lines.append(f"| | | | {row['image_tokens']} | {row['prefill_ms']:.4g} | {row['speedup']} | {row['flop_ideal']} | "
                         f"{row['of_flop_ideal']:.0%} | {row['floor_model']} | {row['of_floor_model']:.0%} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
