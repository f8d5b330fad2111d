"""TVM against the other runtimes, side by side in one run: vision encode, prefill and a decode step.

Exports one bundle (onnx, executorch, tvm untuned) and one tuned TVM bundle (MetaSchedule, --trials),
then times each runtime's vision encoder, prefill (the image's tokens + 10) and decode step in
alternating rounds (the machine's drift hits all alike; before each stage's calls a pause lets the
previous runtime's spinning worker threads go idle, and one untimed call wakes its own) and reports p50
latencies and each one's ratio to the fastest non-TVM runtime. Writes a table and JSON.

    python tools/bench_tvm.py --trials 1000 --rounds 10 --out docs/tvm_bench --work build/bench_tvm
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


STAGES = ("vision_encode", "prefill", "decode_step")


def stage_timings(sessions: dict, manifest: dict, rounds: int, iterations: int, settle_ms: float) -> dict:
    """p50 ms per (session name, stage) of vision encode, prefill (the image's tokens + 10) and a decode step,
    timed in alternating rounds: the machine's drift hits every session alike; before each stage's calls a
    pause lets the previous runtime's spinning worker threads go idle, and one untimed call wakes its own."""
    size = manifest["prompt"]["image_size"]
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, size, size), dtype=np.uint8)
    prompt = manifest["prompt"]["num_image_tokens"] + 10  # the image's tokens and a short question
    embeds = rng.standard_normal((1, prompt, manifest["decoder"]["embed_width"])).astype(np.float32)
    stages = dict(zip(STAGES, (lambda s: s.vision(image), lambda s: s.prefill(embeds, 1),
                               lambda s: s.step(embeds[:, :1], prompt))))
    times = {(name, stage): [] for name in sessions for stage in stages}
    for s in sessions.values():
        for run in stages.values():
            run(s)  # warm-up
    for _ in range(rounds):
        for name, s in sessions.items():
            for stage, run in stages.items():
                time.sleep(settle_ms / 1000.0)
                run(s)
                for _ in range(iterations):
                    t = time.perf_counter()
                    run(s)
                    times[name, stage].append((time.perf_counter() - t) * 1000.0)
    return {key: float(np.percentile(v, 50)) for key, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-llava")
    parser.add_argument("--trials", type=int, default=1000, help="MetaSchedule trials on the vision encoder")
    parser.add_argument("--records", default=None, help="apply these MetaSchedule records (a tvm_tuning/ folder) instead of tuning")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=10, help="calls per runtime per round")
    parser.add_argument("--settle-ms", type=float, default=50.0,
                        help="pause before each stage's calls: onnxruntime's and TVM's workers spin after a call and "
                             "slowed the next runtime (ExecuTorch's encoder 4.8 ms in the rounds, 1.9 ms alone)")
    parser.add_argument("--work", default="build/bench_tvm")
    parser.add_argument("--out", default="docs/tvm_bench")
    parser.add_argument("--compare", default=None,
                        help="an earlier run's --work folder (another vlmc version's bundles): its TVM encoders are timed too")
    args = parser.parse_args()

    import torch

    from vlmc import api
    from vlmc.bundle import Bundle
    from vlmc.runtimes import open_session

    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(args.work)
    t0 = time.time()
    base = api.compile({"model": args.model, "targets": ["onnx", "executorch", "tvm"]}, work / "base", force=True)
    export_s = time.time() - t0
    t0 = time.time()
    tvm_options = {"tuning_records": args.records, "tune_trials": 0} if args.records else {"tune_trials": args.trials}
    tuned = api.compile({"model": args.model, "targets": ["tvm"], "tvm": tvm_options}, work / "tuned", force=True)
    tune_s = time.time() - t0
    trials = sum(1 for _ in open(tuned.path / "tvm_tuning" / "database_tuning_record.json"))
    sessions = {"onnxruntime": open_session(Bundle(base.path), "onnxruntime"),
                "executorch": open_session(Bundle(base.path), "executorch"),
                "tvm (untuned)": open_session(Bundle(base.path), "tvm"),
                f"tvm (tuned, {trials} records)": open_session(Bundle(tuned.path), "tvm")}
    if args.compare:
        earlier = Path(args.compare)
        sessions["tvm (untuned, --compare)"] = open_session(Bundle(earlier / "base"), "tvm")
        sessions["tvm (tuned, --compare)"] = open_session(Bundle(earlier / "tuned"), "tvm")
    p50 = stage_timings(sessions, base.manifest, args.rounds, args.iterations, args.settle_ms)
    fastest_other = {stage: min(p50[name, stage] for name in sessions if not name.startswith("tvm")) for stage in STAGES}
    rows = []
    for name in sessions:
        row = {"runtime": name}
        for stage in STAGES:
            row[f"{stage}_p50_ms"] = round(p50[name, stage], 3)
            row[f"{stage}_x_fastest_other"] = round(p50[name, stage] / fastest_other[stage], 3)
        rows.append(row)
    result = {"model": args.model, "tuning_records": trials, "records_from": args.records, "compared_with": args.compare,
              "rounds": args.rounds, "iterations": args.iterations, "settle_ms": args.settle_ms,
              "tvm_threads": os.environ.get("TVM_NUM_THREADS"),
              "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "processor": platform.processor()},
              "export_seconds": round(export_s, 1), "tune_and_export_seconds": round(tune_s, 1), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"{'runtime':<32}" + "".join(f"{stage + ' ms':>18}{'x other':>9}" for stage in STAGES)]
    lines += [f"{r['runtime']:<32}" + "".join(f"{r[stage + '_p50_ms']:>18.3f}{r[stage + '_x_fastest_other']:>9.3f}" for stage in STAGES)
              for r in rows]
    table = "\n".join(lines)
    compared = f"; --compare {args.compare}" if args.compare else ""
    (out / "results.txt").write_text(table + f"\n\nmodel {args.model}; MetaSchedule: {trials} records "
                                     f"({'reused from ' + args.records if args.records else f'{tune_s:.0f} s tune + export'}); "
                                     f"{args.rounds} alternating rounds x {args.iterations} calls, {args.settle_ms:g} ms pause before each; "
                                     f"TVM threads {os.environ.get('TVM_NUM_THREADS')}{compared}\n")
    print(table)


if __name__ == "__main__":
    main()
