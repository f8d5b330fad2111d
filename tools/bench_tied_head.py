"""What storing a tied embedding once costs the LM head on ExecuTorch: a static XNNPACK weight (packed once
at load, a second copy of the table in the .pte) against the weight as an input (one copy, repacked by
XNNPACK on every call), at a real vocabulary and width.

    python tools/bench_tied_head.py --vocab 49280 --hidden 576 --rounds 30 -o docs/tied_embedding

Exports two .pte files, each with a `token_embedding` method (the table, a portable gather) and a `head`
method (the LM head on the last row), the way vlmc exports them: one with the head's weight inside XNNPACK
(what vlmc did before), one with it left out of the partition (`leave_out_of_delegates`, what vlmc does for
a tied model now). Times the head at a decode step (1 row) and a prefill (`--prefill` rows, the head still
reads the last one), both files alternated in rounds; prints a table and writes JSON + Markdown. The head's
share of a whole decode step is the ratio of its multiply-adds to the decoder's (printed for SmolVLM2-256M).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlmc.exporter.executorch_target import leave_out_of_delegates  # noqa: E402


class Tied(nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.embed.weight


class Embed(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, ids):
        return self.m.embed(ids)


class Head(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, h):
        return self.m.head(h[:, -1])


def export_pte(model: Tied, shared: bool, prefill: int, path: Path) -> int:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    seq = torch.export.Dim("seq", min=1, max=prefill)
    hidden = model.embed.weight.shape[1]
    programs = {"token_embedding": torch.export.export(Embed(model), (torch.ones(1, 4, dtype=torch.long),),
                                                       dynamic_shapes=({1: seq},)),
                "head": torch.export.export(Head(model), (torch.zeros(1, 4, hidden),), dynamic_shapes=({1: seq},))}
    partitioner = XnnpackPartitioner()
    if shared:
        partitioner = leave_out_of_delegates(partitioner, ["embed.weight", "head.weight"])
    program = to_edge_transform_and_lower(programs, partitioner=[partitioner]).to_executorch()
    path.write_bytes(program.buffer)
    return path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=49280)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=10, help="calls per round and file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--out", type=Path, default=Path("tied_embedding"))
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    from executorch.runtime import Runtime

    model = Tied(args.vocab, args.hidden).eval()
    table = model.embed.weight.detach().numpy().astype(np.float32).tobytes()
    work = Path(tempfile.mkdtemp())
    files, methods = {}, {}
    for label, shared in (("static head (two copies)", False), ("head reads the table (one copy)", True)):
        path = work / f"{shared}.pte"
        size = export_pte(model, shared, args.prefill, path)
        files[label] = {"bytes": size, "table_copies": path.read_bytes().count(table)}
        methods[label] = Runtime.get().load_program(str(path)).load_method("head")
    inputs = {"decode": torch.randn(1, 1, args.hidden), "prefill": torch.randn(1, args.prefill, args.hidden)}
    times = {label: {k: [] for k in inputs} for label in methods}
    for _ in range(args.rounds):
        for kind, x in inputs.items():
            for label in sorted(methods, key=lambda _: np.random.rand()):
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    methods[label].execute([x])
                times[label][kind].append((time.perf_counter() - t0) * 1e3 / args.calls)
    base = next(iter(methods))
    rows = []
    for label in methods:
        ms = {k: float(np.median(v)) for k, v in times[label].items()}
        rows.append({"config": label, **files[label], "decode_head_ms": round(ms["decode"], 3),
                     "prefill_head_ms": round(ms["prefill"], 3),
                     "decode_x": round(ms["decode"] / np.median(times[base]["decode"]), 2),
                     "prefill_x": round(ms["prefill"] / np.median(times[base]["prefill"]), 2)})
    # SmolVLM2-256M's text decoder (30 layers, 576 wide, 9 heads / 3 kv of 64, MLP 1536): the head's share of a step
    layer = 576 * (576 + 2 * 192) + 576 * 576 + 3 * 576 * 1536
    share = args.vocab * args.hidden / (30 * layer + args.vocab * args.hidden)
    lines = ["| configuration | .pte MB | table copies | head at a decode step ms (x) | head after a prefill ms (x) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['bytes'] / 1e6:.1f} | {r['table_copies']} | {r['decode_head_ms']} ({r['decode_x']}) | "
              f"{r['prefill_head_ms']} ({r['prefill_x']}) |" for r in rows]
    lines.append(f"\nThe head is {share:.0%} of a SmolVLM2-256M decode step's multiply-adds (vocab {args.vocab} x {args.hidden}).")
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tied_head.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows,
                                                         "head_share_of_decode_macs": round(share, 4)}, indent=1))
    (args.out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
