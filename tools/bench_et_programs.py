"""Two ExecuTorch bundles of one model, program by program: which export is faster, measured side by side.

    python tools/bench_et_programs.py BASELINE_BUNDLE BUNDLE --rounds 200 --prompt-rows 32,218 -o docs/et_layer_norm

In one process, each round calls the same program of both .pte files in turn with the same inputs (so host
drift hits both alike): the vision encoder on one image, text_prefill at each --prompt-rows length, and one
decode step of text_decoder after a 40-row prefill. Prints medians, the ratio bundle / baseline and the
largest difference of their outputs where their shapes agree (the same model exported two ways gives the same
numbers within float rounding; a token pass changes the vision encoder's), and writes results.json and
results.md. One thread for the runtime, as the runners use.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def executorch_programs(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())["targets"]["executorch"]["programs"]


def load_methods(bundle: Path, programs: dict, keep: list) -> dict:
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(str(bundle / programs["vision_encoder"]["file"]))
    keep.append(program)  # the methods read the program's buffer
    return {name: program.load_method(name) for name in ("vision_encoder", "text_prefill", "text_decoder") if name in programs}


def timed(call) -> tuple:
    start = time.perf_counter()
    out = call()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("baseline", type=Path)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--prompt-rows", default="32,218", help="text_prefill lengths, comma-separated")
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args()

    import torch
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (the llama:: kernels)

    torch.set_num_threads(1)
    keep: list = []
    manifests = {"baseline": executorch_programs(args.baseline), "bundle": executorch_programs(args.bundle)}
    sides = {side: load_methods(path, manifests[side], keep) for side, path in (("baseline", args.baseline), ("bundle", args.bundle))}
    programs = manifests["bundle"]
    width = programs["vision_encoder"]["outputs"][0]["shape"][-1]
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, programs["vision_encoder"]["inputs"][0]["shape"], dtype=torch.uint8, generator=gen)
    # each case: methods -> (output, seconds timed)
    cases = {"vision_encoder": lambda m: timed(lambda: m["vision_encoder"].execute([image])[0])}
    if all("text_prefill" in m for m in sides.values()):
        for rows in (int(r) for r in args.prompt_rows.split(",")):
            embeds = torch.randn(1, rows, width, generator=gen)
            cases[f"text_prefill {rows} rows"] = lambda m, e=embeds: timed(lambda: m["text_prefill"].execute((e, torch.tensor([1])))[0])
        prompt, step = torch.randn(1, 40, width, generator=gen), torch.randn(1, 1, width, generator=gen)

        def decode(m):
            m["text_prefill"].execute((prompt, torch.tensor([1])))  # the cache as a 40-row prompt leaves it, untimed
            return timed(lambda: m["text_decoder"].execute((step, torch.tensor([40])))[0])
        cases["decode step at 40"] = decode
    rows = []
    for case, call in cases.items():
        times: dict = {side: [] for side in sides}
        outs: dict = {}
        for _ in range(args.rounds):
            for side, methods in sides.items():
                outs[side], took = call(methods)
                times[side].append(took)
        base, new = (statistics.median(times[s]) * 1e3 for s in ("baseline", "bundle"))
        same_shape = outs["bundle"].shape == outs["baseline"].shape  # a token pass changes the encoder's output
        rows.append({"program": case, "baseline_ms": round(base, 4), "bundle_ms": round(new, 4), "ratio": round(new / base, 3),
                     "max_abs_diff": float((outs["bundle"] - outs["baseline"]).abs().max()) if same_shape else None})
    delegates = {side: {n: p.get("delegate_calls") for n, p in plan.items()} for side, plan in manifests.items()}
    lines = [f"baseline: {args.baseline}  bundle: {args.bundle}  rounds: {args.rounds} (medians, ms)", "",
             "| program | baseline | bundle | bundle / baseline | max abs diff |", "|---|---|---|---|---|"]
    lines += [f"| {r['program']} | {r['baseline_ms']:.3f} | {r['bundle_ms']:.3f} | {r['ratio']:.3f} | "
              + (f"{r['max_abs_diff']:.1e} |" if r["max_abs_diff"] is not None else "(other shapes) |") for r in rows]
    lines += ["", "delegates per method: " + "; ".join(f"{side} {d}" for side, d in delegates.items())]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"baseline": str(args.baseline), "bundle": str(args.bundle),
                                                       "rounds": args.rounds, "rows": rows, "delegates": delegates}, indent=1))
    (args.out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
