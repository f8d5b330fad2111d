"""Accuracy of one bundle on every runtime, side by side (ShapesVQA test split by default).

    python tools/runtime_accuracy.py build/base --n 2000 --out docs/runtime_accuracy

Prints a table and writes runtime_accuracy.json / .md: accuracy with 95% CI per runtime, per question type,
agreement and KL against the uncompressed eager model, and wall time.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlmc import api  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--runtimes", default="eager,onnxruntime,executorch")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path("docs/runtime_accuracy"))
    args = ap.parse_args()
    results = {}
    for rt in args.runtimes.split(","):
        print(f"evaluating on {rt} ...", flush=True)
        results[rt] = api.evaluate(args.bundle, rt, "shapes-vqa", "test", args.n)
    types = sorted(next(iter(results.values()))["per_type"])
    head = ["runtime", "accuracy % (95% CI)", *types, "agreement %", "mean KL", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rt, r in results.items():
        lines.append("| " + " | ".join([rt, f"{r['accuracy']} ({r['ci95'][0]}..{r['ci95'][1]})",
                                         *(str(r["per_type"][t]["accuracy"]) for t in types),
                                         str(r["agreement"]), f"{r['mean_kl']:.2e}", str(r["seconds"])]) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtime_accuracy.json").write_text(json.dumps({"bundle": args.bundle, "n": args.n, "results": results}, indent=2) + "\n")
    (args.out / "runtime_accuracy.md").write_text(f"`python tools/runtime_accuracy.py {args.bundle} --n {args.n}`\n\n" + table)


if __name__ == "__main__":
    main()
