"""Where a shapes-llava checkpoint loses its answers: what its image tokens carry, and how it counts.

    python tools/probe_builtin.py vlmc/models_zoo/builtin/shapes-llava /tmp/runF/ckpt --json probe.json

For each checkpoint (a Hugging Face directory vlmc loads):
- per-patch linear probes: a logistic regression on the frozen image tokens (the decoder's inputs) of
  1,000 val images predicts the shape / colour class of the object under each object patch, fit on 70%
  of those patches and scored on the rest. Colour, count and shape answers all look objects up by shape, so
  a checkpoint whose tokens carry shape less well loses all three;
- count answers on the test split by true count (0-5): whether count errors are counting or finding.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlmc.eval import shapes_vqa  # noqa: E402
from vlmc.eval.evaluate import Answerer, shapes_vqa_questions  # noqa: E402
from vlmc.models_zoo import load  # noqa: E402
from vlmc.recipe import build  # noqa: E402
from vlmc.runtimes.base import DecoderShape  # noqa: E402
from vlmc.runtimes.eager_runner import EagerSession  # noqa: E402


def linear_probe_accuracy(features: torch.Tensor, labels: torch.Tensor, steps: int = 300) -> float:
    """Held-out accuracy (%) of a logistic regression from features [N, D] to classes [N] (70/30 split)."""
    train = torch.arange(len(features)) < int(0.7 * len(features))
    mean, std = features[train].mean(0), features[train].std(0) + 1e-6
    x = (features - mean) / std
    probe = torch.nn.Linear(x.shape[1], int(labels.max()) + 1)
    opt = torch.optim.Adam(probe.parameters(), 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(probe(x[train]), labels[train]).backward()
        opt.step()
    with torch.no_grad():
        return round(100 * (probe(x[~train]).argmax(1) == labels[~train]).float().mean().item(), 1)


def token_probes(model, n_images: int) -> dict:
    """Per-patch shape and colour probe accuracy on the image tokens of the first n_images val images."""
    items = list(shapes_vqa.items("val", n_images))
    images = torch.from_numpy(np.stack([it.image.transpose(2, 0, 1) for it in items]))
    colors, shapes, _ = (torch.from_numpy(np.stack(x)).long() for x in zip(*(shapes_vqa.patch_labels(it.objects) for it in items)))
    with torch.no_grad():
        tokens = torch.cat([model.encode_image(model.normalize(images[i: i + 100])) for i in range(0, len(images), 100)])
    tokens, on_object = tokens.reshape(-1, tokens.shape[-1]), shapes.reshape(-1) > 0
    return {name: linear_probe_accuracy(tokens[on_object], y.reshape(-1)[on_object])
            for name, y in (("shape", shapes), ("colour", colors))}


def count_confusion(loaded, n_questions: int) -> dict:
    """{true count: {predicted answer: questions}} over the count questions among the first n test questions."""
    c, t = loaded.config, loaded.config.text
    recipe = loaded.template(build({})).resolve(c.num_image_tokens)
    prompt = {"template": recipe.prompt_template, "num_image_tokens": c.num_image_tokens, "image_token_id": c.image_token_id,
              "bos_token_id": t.bos_token_id, "eos_token_ids": list(t.eos_token_ids)}
    shape = DecoderShape(t.num_layers, t.num_kv_heads, t.head_dim, t.hidden_size, recipe.max_context, recipe.max_prompt)
    answer = Answerer(EagerSession(loaded.model, shape), loaded.tokenizer, prompt)
    confusion = collections.defaultdict(collections.Counter)
    for q in shapes_vqa_questions("test", n_questions, c.vision.image_size):
        if q.qtype == "count":
            confusion[q.answer][answer(q)[0]] += 1
    return {truth: dict(sorted(row.items())) for truth, row in sorted(confusion.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--images", type=int, default=1000, help="val images for the token probes")
    ap.add_argument("--n", type=int, default=2000, help="test questions to take the count questions from")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    torch.manual_seed(0)
    results = {}
    print("| checkpoint | shape probe % | colour probe % | count accuracy % by true count 0 / 1 / 2 / 3 / 4 / 5 (n) |")
    print("|---|---|---|---|")
    for path in args.checkpoints:
        loaded = load(str(path))
        loaded.model.eval()
        probes, confusion = token_probes(loaded.model, args.images), count_confusion(loaded, args.n)
        by_count = {k: round(100 * row.get(k, 0) / sum(row.values()), 1) for k, row in confusion.items()}
        results[str(path)] = {"token_probes": probes, "count_confusion": confusion, "count_accuracy": by_count}
        cells = " / ".join(f"{by_count[k]} ({sum(confusion[k].values())})" for k in confusion)
        print(f"| {path} | {probes['shape']} | {probes['colour']} | {cells} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
