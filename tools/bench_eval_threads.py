"""What onnxruntime's spinning thread pool costs an eval that runs the uncompressed PyTorch model beside it.

    python tools/bench_eval_threads.py --n 300 --repeats 3 -o docs/eval_threads

`vlmc eval` answers each question on the bundle's runtime and then on the eager reference, in one process
on the same cores. onnxruntime's intra-op workers spin after each call by default, so they compete with
torch's threads while the reference runs. This exports the built-in model to ONNX once, then evaluates it
with the pool allowed to spin (onnxruntime's default) and without (what vlmc eval does), alternating the
two `--repeats` times so drift on a shared machine hits both alike. Prints a table and writes
eval_threads.json / eval_threads.md (wall seconds per eval, the ratio of the medians).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlmc import api  # noqa: E402
from vlmc.runtimes import onnxruntime_runner  # noqa: E402


def timed_eval(bundle: Path, n: int, spin: bool) -> tuple[float, float]:
    """Wall seconds and accuracy of one eval with the pool spinning or not (set for every session it opens)."""
    real = onnxruntime_runner.OnnxSession.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **{**kwargs, "spin": spin})

    onnxruntime_runner.OnnxSession.__init__ = init
    try:
        t0 = time.perf_counter()
        result = api.evaluate(bundle, "onnxruntime", "shapes-vqa", "test", n)
        return time.perf_counter() - t0, result["accuracy"]
    finally:
        onnxruntime_runner.OnnxSession.__init__ = real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("-o", "--out", type=Path, default=Path("docs/eval_threads"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = api.compile({"model": "shapes-llava", "targets": ["onnx"]}, Path(tmp) / "b").path
        runs: dict[str, list[float]] = {"spinning (onnxruntime default)": [], "not spinning (vlmc eval)": []}
        accuracy = {}
        for _ in range(args.repeats):
            for label, spin in (("spinning (onnxruntime default)", True), ("not spinning (vlmc eval)", False)):
                seconds, accuracy[label] = timed_eval(bundle, args.n, spin)
                runs[label].append(round(seconds, 2))
    medians = {k: statistics.median(v) for k, v in runs.items()}
    base = medians["spinning (onnxruntime default)"]
    rows = [{"pool": k, "seconds": v, "median_s": medians[k], "speedup": round(base / medians[k], 3), "accuracy": accuracy[k]}
            for k, v in runs.items()]
    lines = [f"| pool | eval seconds ({args.n} questions, each run) | median s | speedup | accuracy % |", "|---|---|---|---|---|"]
    lines += [f"| {r['pool']} | {', '.join(map(str, r['seconds']))} | {r['median_s']} | {r['speedup']}x | {r['accuracy']} |" for r in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval_threads.json").write_text(json.dumps({"n": args.n, "repeats": args.repeats, "rows": rows}, indent=2) + "\n")
    (args.out / "eval_threads.md").write_text(table)


if __name__ == "__main__":
    main()
