"""Diagnostic (docs/builtin_model.md): what the built-in model answers to val position questions, as a
table of (right answer, predicted answer) counts.

    python docs/builtin_position_answers.py --n 200
"""
import argparse
import collections
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import train_builtin as tb  # noqa: E402
from vlmc.eval import shapes_vqa  # noqa: E402
from vlmc.models_zoo import load  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=200)
args = ap.parse_args()
loaded = load("shapes-llava")
model, tok, cfg = loaded.model.eval(), loaded.tokenizer, loaded.model.config
asked = [it for it in shapes_vqa.items("val", 8 * args.n) if it.qtype == "position"][: args.n]
rows = [(it.image.transpose(2, 0, 1).copy(), it.question, it.answer, it.qtype, None, None, []) for it in asked]
ids, last, _, _, images = tb.encode(tok, rows, cfg.num_image_tokens, cfg.image_token_id)
with torch.no_grad():
    logits = model(ids[:, : int(last.max()) + 1], model.normalize(images))
predicted = [tok.decode([int(i)]).strip() for i in logits[torch.arange(len(ids)), last].argmax(-1)]
counts = collections.Counter(zip((it.answer for it in asked), predicted))
print("| answer | predicted | questions |\n|---|---|---|")
for (answer, guess), k in sorted(counts.items()):
    print(f"| {answer} | {guess} | {k} |")
