"""What torch.compile (train_builtin.py --compile on) buys a training step of the built-in model.

    python tools/bench_train_compile.py                     # 60 steps, prints a table, writes JSON
    python tools/bench_train_compile.py --steps 100 --out docs/train_compile

Two copies of the default recipe's model, probes and optimizer from the same seed, one eager and one
compiled by train_builtin.compile_regions, take the same batches in alternating order (eager first on odd
steps, compiled first on even ones), so drift in a shared machine's speed hits both alike. Reports the
median and mean seconds per step after the warm-up steps (the compile happens in those), their ratio, and
the largest difference between the two losses: compiled kernels round differently, nothing more.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_builtin as tb  # noqa: E402
from vlmc.eval import shapes_vqa  # noqa: E402
from vlmc.models_zoo.builtin import builtin_config, write_tokenizer  # noqa: E402
from vlmc.models_zoo.llava import LlavaModel  # noqa: E402
from vlmc.models_zoo.tokenizer import TextTokenizer  # noqa: E402

WEIGHTS = {"aux": 0.5, "shape": 3.0, "size": 0.5, "grid": 0.0, "retrieval": 1.0, "fetch": 0.5}  # the default recipe


def build(config, compiled: bool, seed: int):
    torch.manual_seed(seed)
    model = LlavaModel(config)
    heads = tb.PatchHeads(config.text.hidden_size, config.num_image_tokens)
    retrieval = tb.RetrievalHead(config.text.hidden_size, 1)
    fetch = tb.compile_regions(model, heads, retrieval) if compiled else tb.fetch_loss
    params = [*model.parameters(), *heads.parameters(), *retrieval.parameters()]
    return model, heads, retrieval, fetch, params, torch.optim.AdamW(params, lr=1e-3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the timing (the compile happens here)")
    ap.add_argument("--items", type=int, default=800, help="train images to draw the batches from")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("docs/train_compile"))
    args = ap.parse_args()
    if args.steps <= args.warmup:
        sys.exit(f"error: --steps ({args.steps}) must exceed --warmup ({args.warmup})")

    with tempfile.TemporaryDirectory() as tmp:
        vocab = write_tokenizer(Path(tmp), shapes_vqa.VOCABULARY)
        tok = TextTokenizer(Path(tmp))
    config = builtin_config(vocab_size=64 * math.ceil(len(vocab) / 64))
    items = tb.generate_items("train", args.items, 1, turns=5, single=True)
    data = tb.training_tensors(tok, items, config)

    runs = {"eager": build(config, False, args.seed), "compiled": build(config, True, args.seed)}
    seconds = {k: [] for k in runs}
    losses = {k: [] for k in runs}
    gen = torch.Generator().manual_seed(args.seed)
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(items), (args.batch_size,), generator=gen)
        batch = tb.take_batch(data, idx, gen, "cpu")
        for name in (list(runs) if step % 2 else list(runs)[::-1]):
            model, heads, retrieval, fetch, params, opt = runs[name]
            t0 = time.perf_counter()
            loss, _ = tb.loss_fn(model, heads, retrieval, WEIGHTS, *batch, 1, False, fetch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if step > args.warmup:
                seconds[name].append(time.perf_counter() - t0)
            losses[name].append(loss.item())

    rows = {name: {"median_s": round(float(np.median(s)), 4), "mean_s": round(float(np.mean(s)), 4)} for name, s in seconds.items()}
    report = {
        "steps_timed": args.steps - args.warmup, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "per_step": rows,
        "speedup_median": round(rows["eager"]["median_s"] / rows["compiled"]["median_s"], 3),
        "speedup_mean": round(rows["eager"]["mean_s"] / rows["compiled"]["mean_s"], 3),
        "max_loss_difference": max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"])),
    }
    print("| step | median s | mean s |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['median_s']} | {r['mean_s']} |")
    print(f"speedup {report['speedup_median']}x (median), {report['speedup_mean']}x (mean) over {report['steps_timed']} "
          f"interleaved steps; largest loss difference {report['max_loss_difference']:.2e}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_compile.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'train_compile.json'}")


if __name__ == "__main__":
    main()
