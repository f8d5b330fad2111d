"""What quantizing the TVM target buys: library size, latency and accuracy of int8 / int4 weights against float.

Exports the model to TVM float and once per scheme (the weights int8 per channel or int4 in groups,
dequantized inside each product; activations float), times each bundle's vision encode, prefill and decode
step in alternating rounds in one process (bench_tvm's timing), and evaluates each on ShapesVQA against the
uncompressed eager model. Ratios are against the float TVM bundle of the same run. Writes a table and JSON.

    python tools/bench_tvm_quant.py --schemes w8,w4 --rounds 20 --questions 400 --out docs/tvm_quant
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tvm import STAGES, stage_timings  # noqa: E402


def library_mb(bundle) -> float:
    """The host libraries' size: what an app ships for this machine."""
    from vlmc.runtimes.tvm_runner import host_architecture

    programs = bundle.manifest["targets"]["tvm"]["programs"].values()
    return sum((bundle.path / p["libraries"][host_architecture()]).stat().st_size for p in programs) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-llava")
    parser.add_argument("--schemes", default="w8,w4", help="comma-separated quantization passes (each on the whole model)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=10, help="calls per bundle per round")
    parser.add_argument("--settle-ms", type=float, default=50.0, help="pause before each stage's calls")
    parser.add_argument("--questions", type=int, default=400, help="ShapesVQA test questions per bundle")
    parser.add_argument("--work", default="build/bench_tvm_quant")
    parser.add_argument("--out", default="docs/tvm_quant")
    args = parser.parse_args()

    from vlmc import api
    from vlmc.bundle import Bundle
    from vlmc.runtimes import open_session

    work = Path(args.work)
    configs = ["float", *args.schemes.split(",")]
    bundles, export_s = {}, {}
    for config in configs:
        passes = [] if config == "float" else [{"name": config}]
        t0 = time.time()
        bundles[config] = api.compile({"model": args.model, "targets": ["tvm"], "passes": passes}, work / config, force=True)
        export_s[config] = time.time() - t0
    sessions = {config: open_session(Bundle(b.path), "tvm") for config, b in bundles.items()}
    p50 = stage_timings(sessions, bundles["float"].manifest, args.rounds, args.iterations, args.settle_ms)
    del sessions
    rows = []
    for config, b in bundles.items():
        score = api.evaluate(b.path, "tvm", n=args.questions)
        row = {"config": config, "library_mb": round(library_mb(b), 3), "export_seconds": round(export_s[config], 1),
               "accuracy": score["accuracy"], "agreement": score.get("agreement"), "mean_kl": score.get("mean_kl")}
        for stage in STAGES:
            row[f"{stage}_p50_ms"] = round(p50[config, stage], 3)
            row[f"{stage}_x_float"] = round(p50[config, stage] / p50["float", stage], 3)
        rows.append(row)
    float_mb = rows[0]["library_mb"]
    for row in rows:
        row["library_x_float"] = round(row["library_mb"] / float_mb, 3)
    result = {"model": args.model, "rounds": args.rounds, "iterations": args.iterations, "settle_ms": args.settle_ms,
              "questions": args.questions, "tvm_threads": os.environ.get("TVM_NUM_THREADS"),
              "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "processor": platform.processor()},
              "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    header = "| config | libraries MB (x float) | " + " | ".join(f"{s} ms (x float)" for s in STAGES) + " | accuracy % | agreement % |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['config']} | {r['library_mb']:.2f} ({r['library_x_float']:.2f}) | "
                     + " | ".join(f"{r[s + '_p50_ms']:.3f} ({r[s + '_x_float']:.2f})" for s in STAGES)
                     + f" | {r['accuracy']} | {r['agreement']} |")
    table = "\n".join(lines)
    (out / "results.md").write_text(f"`python tools/bench_tvm_quant.py --schemes {args.schemes} --rounds {args.rounds} "
                                    f"--questions {args.questions}`\n\n{table}\n\nmodel {args.model}; {args.rounds} alternating "
                                    f"rounds x {args.iterations} calls, {args.settle_ms:g} ms pause before each; accuracy on "
                                    f"{args.questions} ShapesVQA test questions, agreement with the uncompressed eager model\n")
    print(table)


if __name__ == "__main__":
    main()
