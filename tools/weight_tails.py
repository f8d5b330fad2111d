"""How heavy-tailed a part's weights are, and what DASQ's outlier split does to their 4-bit rounding error.

Per linear of the part: the kurtosis of its rows (3 for a Gaussian; heavier tails, higher), and the
ratio of the weight's 4-bit rounding error with DASQ (dense kernel on the target's grid plus int8
outliers) to plain round-to-nearest. Prints a table and writes JSON.

    python tools/weight_tails.py --model shapes-llava --part vision --outliers 0.01 --out docs/quant_dasq/weight_tails.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    from vlmc.models_zoo import load
    from vlmc.passes.quant import linear_layers
    from vlmc.passes.quant.dasq import outlier_count, split
    from vlmc.passes.quant.gptq import GRIDS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shapes-llava")
    ap.add_argument("--part", default="vision", choices=("vision", "decoder"))
    ap.add_argument("--outliers", type=float, default=0.01)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--target", default="onnx", choices=sorted(GRIDS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    grid, rows = GRIDS[args.target], []
    for name, layer in linear_layers(load(args.model).model, args.part):
        w = layer.weight.detach().double()
        z = (w - w.mean(1, keepdim=True)) / w.std(1, keepdim=True)
        dense, index, values = split(w, outlier_count(w.shape[1], args.outliers))
        plain = (w - grid.round_to_nearest(w, args.group_size)).pow(2).sum()
        dasq = (w - grid.round_to_nearest(dense, args.group_size).scatter_add(1, index, values)).pow(2).sum()
        rows.append({"layer": name, "shape": list(w.shape), "kurtosis": round(float(z.pow(4).mean()), 2),
                     "w4_error_dasq_over_minmax": round(float(dasq / plain), 3)})
        print(f"{name:64s} {str(tuple(w.shape)):>12s}  kurtosis {rows[-1]['kurtosis']:5.2f}  "
              f"w4 error, dasq / minmax {rows[-1]['w4_error_dasq_over_minmax']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({**vars(args), "grid": grid.name, "layers": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
