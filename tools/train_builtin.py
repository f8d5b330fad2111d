"""Train vlmc's built-in VLM (shapes-llava) on ShapesVQA and write it as a Hugging Face checkpoint.

    python tools/train_builtin.py                      # defaults: fixed seed, under an hour on a 2-core CPU
    python tools/train_builtin.py --device cuda        # the same recipe, faster on a GPU
    python tools/train_builtin.py --out /tmp/ckpt      # write elsewhere than the shipped checkpoint

The prompt is the bundle template "USER: <image>\\n{question} ASSISTANT:" followed by the one-word answer
and </s>, then more turns about the same image ("USER: {question} ASSISTANT: {answer} </s>"): the 196 image
tokens cost most of the compute, so several answers per image give several times the supervision per
step. The loss covers every answer and its </s>; per-patch colour / shape probes on the image tokens add
dense supervision the generator knows for free. Validation asks one question per image, exactly as
`vlmc eval` does. The script reports val accuracy per question type and writes training.json beside the
checkpoint.

The default recipe (the shipped checkpoint; docs/builtin_model.md records how each part was found) adds
what the relational questions and the object look-ups need:
- --position-init grid: the vision tower's position table starts as 2-D sin/cos codes of column and row;
- --shape-weight 3: the per-patch shape probe weighs three times the colour probe, so the losses below do
  not pull the tower's shape features away;
- --size-weight 0.5: a per-patch probe for the size class (small / large) of the object under each patch;
- --retrieval-weight 1 --retrieval-questions named: a probe on decoder layer --retrieval-layer at every
  answer whose question names an object regresses the named objects' centres and sizes;
- --fetch-weight 0.5: attention supervision at decoder layer --fetch-layer: at each answer, query head 0
  (and head 2 for a second named object) should attend to the patches of the objects the question names.
Off by default, tried and recorded in docs/builtin_model.md:
- --grid-weight: a per-patch probe making each image token regress its own grid column and row;
- --fetch-count sink lets a count question's head also attend to the text, so its share on the shape can
  carry the count;
- --retrieval-questions relational: the retrieval probe at position / size answers only;
- --relational-items: more train images asking only position / size questions, --relational-share of each
  batch; with --relational-from F they and the two probes join only after that fraction of the steps.
The first shipped checkpoint (82.15% test) came from --steps 3600 --position-init random --shape-weight 1
--size-weight 0 --retrieval-weight 0 --fetch-weight 0.
--compile on (the default) compiles the ViT / decoder blocks and the probes (1.07-1.10x faster steps);
the shipped checkpoint was trained with --compile off (the shipped run's exact command).
--precision bf16 autocasts the matmuls (1.5x faster steps on this CPU; see docs/builtin_model.md for
what it did to accuracy).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlmc.eval import shapes_vqa  # noqa: E402
from vlmc.models_zoo import BUILTIN_ROOT, save_checkpoint  # noqa: E402
from vlmc.models_zoo.builtin import EOS, PAD, builtin_config, write_tokenizer  # noqa: E402
from vlmc.models_zoo.llava import LlavaModel  # noqa: E402
from vlmc.models_zoo.tokenizer import DEFAULT_TEMPLATE, TextTokenizer  # noqa: E402


RELATION = re.compile(r"is the (\w+ \w+) (?:left or right of|above or below|bigger or smaller than) the (\w+ \w+)\?")
RELATIONAL = ("position", "position", "size")  # relational turns: two position questions to one size question


NAMED = (re.compile(r"what color is the (?P<shape>\w+)\?"), re.compile(r"which shape is (?P<color>\w+)\?"),
         re.compile(r"is there a (?P<color>\w+) (?P<shape>\w+)\?"))
COUNTED = re.compile(r"how many (?P<shape>\w+)s are there\?")


def fetch_selectors(question: str) -> list[int]:
    """What the answer must attend to, as (colour, shape) class pairs for up to two objects (0: any, -1: no
    object), then 1 for a count question: the two named objects of a position / size question; the shape of a
    colour or count question, the colour of a shape question, the colour and shape of an existence question.
    Patches matching a pair (PatchHeads' classes) are that object's; none match when it is absent ("is there
    a red circle?" -> no)."""
    m = RELATION.fullmatch(question)
    names = [m.group(1), m.group(2)] if m else []
    if not m:
        m = next(filter(None, (p.fullmatch(question) for p in NAMED + (COUNTED,))), None)
        names = [f"{m.groupdict().get('color', '')} {m.groupdict().get('shape', '')}"] if m else []
    colors, shapes = list(shapes_vqa.COLORS), shapes_vqa.SHAPES
    pairs = []
    for name in names:
        color, shape = name.split(" ")
        pairs += [1 + colors.index(color) if color else 0, 1 + shapes.index(shape) if shape else 0]
    return pairs + [-1] * (4 - len(pairs)) + [int(bool(COUNTED.fullmatch(question)))]


def named_geometry(question: str, objects, single: bool = False) -> list[float]:
    """Centres and sizes / image size of the objects a question names: the two of a position / size
    question; with `single`, also the one object a colour, shape or (present) existence question names.
    NaN where a question names fewer."""
    m = RELATION.fullmatch(question)
    if m:
        by_name = {f"{o.color} {o.shape}": o for o in objects}
        named = [by_name[m.group(1)], by_name[m.group(2)]]
    else:
        m = next(filter(None, (p.fullmatch(question) for p in NAMED)), None) if single else None
        fits = [o for o in objects if m and all(getattr(o, k) == v for k, v in m.groupdict().items())]
        named = fits if len(fits) == 1 else []
    values = [v / shapes_vqa.IMAGE_SIZE for o in named for v in (o.x, o.y, o.size)]
    return values + [math.nan] * (6 - len(values))


def _make(args):
    """Training tuples (image CHW, question, answer, type, patch colours, patch shapes, extra turns,
    geometry per turn, patch size classes, fetch selectors per turn). `relational`: only scenes with two nameable objects, only position / size turns
    (position twice as often: size needs only the first object, position needs both fetched and compared)."""
    split, start, n, turns, relational, single = args
    out = []
    for i, item in enumerate(shapes_vqa.items(split, n, start)):
        rng = np.random.default_rng([97, start + i])
        if relational:
            qas = [(q, a) for q, a, _ in shapes_vqa.scene_questions(item.objects, rng, turns, RELATIONAL)]
            if not qas:
                continue
            (question, answer), extra, qtype = qas[0], qas[1:], "relational"
        else:
            question, answer, qtype = item.question, item.answer, item.qtype
            extra = [(q, a) for q, a, _ in shapes_vqa.scene_questions(item.objects, rng, turns) if q != question][: turns - 1]
        colors, shapes, sizes = shapes_vqa.patch_labels(item.objects)
        geometry = [named_geometry(q, item.objects, single) for q, _ in [(question, answer)] + extra]
        geometry += [[math.nan] * 6] * (turns - len(geometry))
        selectors = [fetch_selectors(q) for q, _ in [(question, answer)] + extra]
        selectors += [[-1] * 4 + [0]] * (turns - len(selectors))
        out.append((item.image.transpose(2, 0, 1).copy(), question, answer, qtype, colors, shapes, extra, geometry, sizes,
                    selectors))
    return out


def generate_items(split: str, n: int, workers: int, turns: int = 1, start: int = 0, relational: bool = False,
                   single: bool = False):
    """Items start..start+n of `split` (relational: those of them with two nameable objects; single: the
    retrieval targets include single-object questions, see named_geometry)."""
    chunk = max(1, math.ceil(n / (workers * 4)))
    jobs = [(split, start + s, min(chunk, n - s), turns, relational, single) for s in range(0, n, chunk)]
    if workers <= 1:
        return [x for j in jobs for x in _make(j)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return [x for part in pool.map(_make, jobs) for x in part]


def encode(tok: TextTokenizer, items, num_image_tokens: int, image_token_id: int):
    """Token ids [N, L] (right-padded); index of the first question's last prompt token and its answer
    id; positions of every supervised token (answers and their </s>, -1 = none) [N, M]; images uint8."""
    seqs, last, answers, targets = [], [], [], []
    for x in items:
        q, a, extra = x[1], x[2], x[6]
        p = tok.prompt(DEFAULT_TEMPLATE, q, num_image_tokens, image_token_id, None)
        seq, supervised = list(p.ids), []
        for i, (question, answer) in enumerate([(q, a)] + list(extra)):
            if i:
                seq += tok.encode(f"USER: {question} ASSISTANT:")
            ans = tok.encode(answer)
            assert len(ans) == 1, f"answer {answer!r} is not one token"
            supervised += [len(seq), len(seq) + 1]
            seq += ans + [EOS]
        seqs.append(seq)
        last.append(len(p.ids) - 1)
        answers.append(seq[len(p.ids)])
        targets.append(supervised)
    width, m = max(map(len, seqs)), max(map(len, targets))
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    target_pos = torch.full((len(seqs), m), -1, dtype=torch.long)
    for i, (s, t) in enumerate(zip(seqs, targets)):
        ids[i, : len(s)] = torch.tensor(s)
        target_pos[i, : len(t)] = torch.tensor(t)
    images = torch.from_numpy(np.stack([x[0] for x in items]))
    return ids, torch.tensor(last), torch.tensor(answers), target_pos, images


def training_tensors(tok: TextTokenizer, items, config):
    """Everything a training step draws from, one row per item: token ids, supervised positions, images,
    the per-patch colour / shape / size classes, the named geometry and the fetch selectors."""
    ids, _, _, targets, images = encode(tok, items, config.num_image_tokens, config.image_token_id)
    labels = [torch.from_numpy(np.stack([x[i] for x in items])) for i in (4, 5, 8)]
    geometry = torch.tensor([x[7] for x in items], dtype=torch.float32)
    selectors = torch.tensor([x[9] for x in items], dtype=torch.long)
    return ids, targets, images, labels, geometry, selectors


def take_batch(data, idx: torch.Tensor, generator: torch.Generator, device):
    """Rows `idx` of training_tensors, cut to the batch's widest sequence, images augmented: loss_fn's
    (ids, target_pos, images, labels, geometry, selectors)."""
    ids, targets, images, labels, geometry, selectors = data
    width = int(targets[idx].max()) + 1
    return (ids[idx, :width].to(device), targets[idx].to(device), augment(images[idx].to(device), generator),
            [t[idx].to(device) for t in labels], geometry[idx].to(device), selectors[idx].to(device))


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Brightness/contrast jitter that keeps hues: more robust colour reading, same answers."""
    x = images.float()
    b = x.shape[0]
    gain = 1 + (torch.rand(b, 1, 1, 1, generator=generator, device="cpu").to(x.device) - 0.5) * 0.3
    bias = (torch.rand(b, 1, 1, 1, generator=generator, device="cpu").to(x.device) - 0.5) * 30
    return (x * gain + bias).clamp(0, 255)


class PatchHeads(torch.nn.Module):
    """Training-only linear probes on the image tokens the LLM receives: the colour and shape under each
    patch, the size class of its object, and the patch's own grid column and row. Dense supervision the
    generator knows for free: colour / shape get the vision tower past the plateau where answers are guessed from the question alone; without
    the grid probe the tokens hardly encode where they are (R^2 0.06 for the column), so nothing the decoder
    retrieves can say left from right. Not part of the shipped model."""

    def __init__(self, dim: int, num_patches: int):
        super().__init__()
        self.color = torch.nn.Linear(dim, 1 + len(shapes_vqa.COLORS))
        self.shape = torch.nn.Linear(dim, 1 + len(shapes_vqa.SHAPES))
        self.grid = torch.nn.Linear(dim, 2)
        self.size = torch.nn.Linear(dim, 3)
        side = math.isqrt(num_patches)
        cells = torch.arange(num_patches)
        self.register_buffer("cells", torch.stack([cells % side, cells // side], -1).float() / (side - 1), persistent=False)

    def forward(self, tokens, colors, shapes, sizes, grid_weight: float, size_weight: float, shape_weight: float = 1.0):
        loss = (F.cross_entropy(self.color(tokens).flatten(0, 1).float(), colors.flatten())
                + shape_weight * F.cross_entropy(self.shape(tokens).flatten(0, 1).float(), shapes.flatten()))
        if size_weight:
            loss = loss + size_weight * F.cross_entropy(self.size(tokens).flatten(0, 1).float(), sizes.flatten())
        if grid_weight:
            loss = loss + grid_weight * 10 * F.mse_loss(self.grid(tokens).float(), self.cells.expand(tokens.shape[0], -1, -1))
        return loss


class RetrievalHead(torch.nn.Module):
    """Training-only probe on decoder layer `layer`'s output at the token that predicts an answer: regresses
    the centres and sizes of the objects the question names (named_geometry). The answer loss alone leaves
    position at chance; this supervises the fetch of both objects that the comparison needs. Not part of
    the shipped model."""

    def __init__(self, dim: int, layer: int):
        super().__init__()
        self.layer = layer
        self.head = torch.nn.Linear(dim, 6)

    def forward(self, hidden, target_pos, geometry):
        answer_pos = target_pos[:, 0::2][:, : geometry.shape[1]]  # each turn's answer token
        rows, turns = torch.nonzero((answer_pos >= 0) & ~geometry[:, : answer_pos.shape[1], 0].isnan(), as_tuple=True)
        if not len(rows):
            return hidden.sum() * 0
        predicted = self.head(hidden[rows, answer_pos[rows, turns] - 1]).float()
        target = geometry[rows, turns]
        named = ~target.isnan()  # single-object questions name one object: three of the six targets
        return 10 * F.mse_loss(predicted[named], target[named])


def fetch_loss(q, k, target_pos, selectors, patch_colors, patch_shapes, image_start: int, heads=(0, 2),
               count_sink: bool = False):
    """Attention supervision at one decoder layer: at the token that predicts each answer, query head
    heads[j] should put its attention on the patches of the j-th object the question names (fetch_selectors);
    the loss is minus the log of the attention mass there. The answer loss alone must discover this fetch
    through a long plateau where colours are guessed from the scene, not read from the named shape.
    `count_sink`: a count question's head may also attend to any text row, so that the share of attention on
    the shape's patches (against a text "sink") can carry how many there are, which attention normalised over
    those patches alone cannot; with no such shape in the image, all attention belongs on the text.
    q [B,H,T,d], k [B,Hkv,T,d] rotated as the layer uses them; patch classes [B,N] as PatchHeads gets them."""
    answer_pos = target_pos[:, 0::2][:, : selectors.shape[1]]
    selectors = selectors[:, : answer_pos.shape[1]]
    n_rep, n = q.shape[1] // k.shape[1], patch_colors.shape[1]
    rows_t = torch.arange(k.shape[2], device=k.device)
    losses = []
    for slot, head in enumerate(heads):
        pair = selectors[..., 2 * slot: 2 * slot + 2]
        rows, turns = torch.nonzero((answer_pos >= 0) & (pair[..., 0] >= 0), as_tuple=True)
        color, shape = pair[rows, turns, 0, None], pair[rows, turns, 1, None]
        colors, shapes = patch_colors[rows], patch_shapes[rows]
        on_patches = (shapes > 0) & ((color == 0) | (colors == color)) & ((shape == 0) | (shapes == shape))
        counting = (selectors[rows, turns, 4] == 1) & count_sink
        target = torch.zeros(len(rows), k.shape[2], dtype=torch.bool, device=k.device)
        target[:, image_start: image_start + n] = on_patches
        text = (rows_t < image_start) | (rows_t >= image_start + n)
        target |= counting[:, None] & text[None]
        present = on_patches.any(1) | counting  # an absent object ("is there a red circle?" -> no) has nothing to fetch
        rows, turns, target = rows[present], turns[present], target[present]
        at = answer_pos[rows, turns] - 1
        scores = torch.einsum("nd,ntd->nt", q[rows, head, at], k[rows, head // n_rep]).float() / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(rows_t[None] > at[:, None], -math.inf)
        losses.append(-scores.log_softmax(-1).masked_fill(~target, -math.inf).logsumexp(-1))
    losses = torch.cat(losses)
    return losses.mean() if len(losses) else q.sum() * 0


def grid_position_codes(side: int, dim: int) -> torch.Tensor:
    """2-D sin/cos codes for the vision tower's position table (row 0, the CLS token, zero): half the width
    codes the patch column, half its row, at wavelengths from 2 to 4 grid widths, so the lowest frequencies
    are monotonic ramps across the image. PyTorch's default N(0, 1) table gives each patch a random code
    from which neither "left of" nor "next to" can be read linearly."""
    quarter = dim // 4
    wavelengths = torch.logspace(math.log10(2.0), math.log10(4.0 * side), quarter)
    cells = torch.arange(side * side)
    codes = []
    for coordinate in (cells % side, cells // side):
        angle = 2 * math.pi * coordinate[:, None].float() / wavelengths[None]
        codes += [angle.sin(), angle.cos()]
    table = torch.cat(codes, dim=1) * math.sqrt(2.0)  # unit RMS per entry, like the N(0, 1) default
    return torch.cat([torch.zeros(1, dim), table], dim=0)


@contextlib.contextmanager
def fp32_attention():
    """bf16 autocast on CPU halves the matmuls' time, but CPU attention in bf16 is slower than in fp32 (its
    backward most of all): run attention in fp32 and everything else in bf16 — 1.5x faster steps here."""
    bf16_attention = F.scaled_dot_product_attention

    def attention(q, k, v, attn_mask=None, **kw):
        mask = attn_mask.float() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
        with torch.autocast(q.device.type, enabled=False):
            return bf16_attention(q.float(), k.float(), v.float(), attn_mask=mask, **kw).to(q.dtype)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = bf16_attention


def loss_fn(model: LlavaModel, heads: PatchHeads, retrieval: RetrievalHead, weights, ids, target_pos, images, labels, geometry,
            selectors, fetch_layer: int, fetch_count_sink: bool = False, fetch=fetch_loss):
    """Answer loss plus the weighted probes; `labels`: the per-patch colour, shape and size classes;
    `fetch`: fetch_loss or its compiled form."""
    captured, hooks = {}, []
    layers = model.language_model.layers
    if weights["retrieval"]:
        hooks.append(layers[retrieval.layer].register_forward_hook(lambda m, i, out: captured.update(h=out[0])))
    if weights["fetch"]:
        hooks.append(layers[fetch_layer].register_forward_hook(lambda m, i, out: captured.update(q=out[1], k=out[2])))
    try:
        image_embeds = model.encode_image(model.normalize(images))
        embeds = model.merge_embeddings(ids, image_embeds)
        logits, _ = model.decode(embeds, torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1), None)
    finally:
        for hook in hooks:
            hook.remove()
    rows, cols = torch.nonzero(target_pos >= 0, as_tuple=True)
    pos = target_pos[rows, cols]  # each supervised token, predicted from the position before it
    answer_loss = F.cross_entropy(logits[rows, pos - 1].float(), ids[rows, pos])
    zero = torch.zeros((), device=ids.device)
    retrieval_loss = retrieval(captured["h"], target_pos, geometry) if "h" in captured else zero
    image_start = int((ids[0] == model.config.image_token_id).nonzero()[0])
    fetched = fetch(captured["q"], captured["k"], target_pos, selectors, labels[0], labels[1], image_start,
                    count_sink=fetch_count_sink) if "q" in captured else zero
    loss = (answer_loss + weights["aux"] * heads(image_embeds, *labels, weights["grid"], weights["size"], weights["shape"])
            + weights["retrieval"] * retrieval_loss + weights["fetch"] * fetched)
    return loss, {"answer": answer_loss.item(), "retrieval": retrieval_loss.item(), "fetch": fetched.item()}


def compile_regions(model: LlavaModel, heads: PatchHeads, retrieval: RetrievalHead):
    """torch.compile each ViT and decoder block and the training probes, in place; returns the fetch loss to
    use. Blocks rather than the whole step: loss_fn hooks a decoder layer anew each step. About 1.1x faster
    steps on the 2-core CPU (docs/builtin_model.md). Without a working compiler (inductor needs a C++
    toolchain) training goes on eager and says so."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(4))
    except Exception as e:  # noqa: BLE001 - any backend failure means: train eager
        print(f"torch.compile unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); training eager", flush=True)
        return fetch_loss
    for block in [*model.vision_tower.encoder.layers, *model.language_model.layers]:
        block.forward = torch.compile(block.forward, dynamic=True)
    heads.forward = torch.compile(heads.forward, dynamic=True)
    retrieval.forward = torch.compile(retrieval.forward, dynamic=True)
    return torch.compile(fetch_loss, dynamic=True)


@torch.no_grad()
def evaluate(model: LlavaModel, data, batch: int, device) -> dict:
    ids, last, answers, _, images, qtypes = data
    model.eval()
    correct = []
    for s in range(0, len(ids), batch):
        sl = slice(s, s + batch)
        # only the prompt: the answer is what the model must produce
        width = int(last[sl].max()) + 1
        x = ids[sl, :width].to(device)
        logits = model(x, model.normalize(images[sl].to(device)))
        b = torch.arange(x.shape[0], device=device)
        pred = logits[b, last[sl].to(device)].argmax(-1).cpu()
        correct += (pred == answers[sl]).tolist()
    model.train()
    per = {}
    for t in shapes_vqa.QUESTION_TYPES:
        sel = [c for c, q in zip(correct, qtypes) if q == t]
        per[t] = round(100 * sum(sel) / max(1, len(sel)), 2)
    return {"accuracy": round(100 * sum(correct) / len(correct), 2), "per_type": per, "n": len(correct)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=BUILTIN_ROOT / "shapes-llava")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--train-items", type=int, default=60000)
    ap.add_argument("--val-items", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=max(1, multiprocessing.cpu_count()))
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--relational-items", type=int, default=0,
                    help="more train images asking only position / size questions (those of two-or-more-object scenes)")
    ap.add_argument("--relational-from", type=float, default=0.0,
                    help="fraction of the steps after which the relational images and the grid / retrieval probes join")
    ap.add_argument("--relational-share", type=float, default=0.35,
                    help="share of each batch drawn from the relational images once they have joined")
    ap.add_argument("--aux-weight", type=float, default=0.5, help="weight of the per-patch colour/shape probes")
    ap.add_argument("--shape-weight", type=float, default=3.0,
                    help="weight of the per-patch shape probe against the colour probe (in the aux term)")
    ap.add_argument("--size-weight", type=float, default=0.5, help="weight of the per-patch size-class probe (in the aux term)")
    ap.add_argument("--grid-weight", type=float, default=0.0, help="weight of the per-patch grid-position probe (in the aux term)")
    ap.add_argument("--retrieval-weight", type=float, default=1.0, help="weight of the named-objects retrieval probe (0: off)")
    ap.add_argument("--retrieval-questions", choices=("relational", "named"), default="named",
                    help="answers the retrieval probe reads: position / size only, or every question naming an object")
    ap.add_argument("--retrieval-layer", type=int, default=1, help="decoder layer whose output the retrieval probe reads")
    ap.add_argument("--fetch-weight", type=float, default=0.5,
                    help="weight of the attention supervision: decoder heads fetch the objects each question names (0: off)")
    ap.add_argument("--fetch-layer", type=int, default=1, help="decoder layer whose attention --fetch-weight supervises")
    ap.add_argument("--fetch-count", choices=("patches", "sink"), default="patches",
                    help="count questions' fetch target: the shape's patches only, or those and the text rows (a sink)")
    ap.add_argument("--turns", type=int, default=5, help="questions per training image (multi-turn sequence)")
    ap.add_argument("--position-init", choices=("grid", "random"), default="grid",
                    help="vision position table at step 0: 2-D sin/cos grid codes, or PyTorch's default N(0, 1)")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="fp32",
                    help="bf16: autocast matmuls to bfloat16 (attention stays fp32 on CPU, see fp32_attention); weights stay fp32")
    ap.add_argument("--compile", choices=("on", "off"), default="on",
                    help="on: torch.compile the ViT / decoder blocks and the probes (about 1.1x faster steps); off: eager")
    args = ap.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if device.type == "cpu":
        torch.set_num_threads(max(1, multiprocessing.cpu_count()))

    args.out.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(args.out, shapes_vqa.VOCABULARY)
    tok = TextTokenizer(args.out)
    config = builtin_config(vocab_size=64 * math.ceil(len(vocab) / 64))
    model = LlavaModel(config)
    if args.position_init == "grid":
        table = model.vision_tower.embeddings.position_embedding.weight
        with torch.no_grad():
            table.copy_(grid_position_codes(math.isqrt(config.num_image_tokens), table.shape[1]))
    model = model.to(device)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, device {device}", flush=True)

    t0 = time.time()
    single = args.retrieval_questions == "named"
    train = generate_items("train", args.train_items, args.workers, args.turns, single=single)
    relational = generate_items("train", args.relational_items, args.workers, args.turns, start=args.train_items,
                                relational=True, single=single)
    standard = len(train)
    train += relational
    val = generate_items("val", args.val_items, args.workers)
    print(f"data: {len(train)} train ({len(relational)} relational) / {len(val)} val items in {time.time() - t0:.0f} s", flush=True)
    train_data = training_tensors(tok, train, config)
    heads = PatchHeads(config.text.hidden_size, config.num_image_tokens).to(device)
    retrieval = RetrievalHead(config.text.hidden_size, args.retrieval_layer).to(device)
    late_weights = {"aux": args.aux_weight, "shape": args.shape_weight, "size": args.size_weight, "grid": args.grid_weight, "retrieval": args.retrieval_weight,
                    "fetch": args.fetch_weight}
    weights = {**late_weights, "grid": 0.0, "retrieval": 0.0} if args.relational_from > 0 else late_weights
    relational_from = round(args.relational_from * args.steps) + 1
    relational_batch = round(args.relational_share * args.batch_size) if relational else 0
    fetch = compile_regions(model, heads, retrieval) if args.compile == "on" else fetch_loss
    va = encode(tok, val, config.num_image_tokens, config.image_token_id)
    val_data = (*va, [x[3] for x in val])

    params = list(model.named_parameters()) + list(heads.named_parameters()) + list(retrieval.named_parameters())
    decay = [p for n, p in params if p.dim() >= 2]
    no_decay = [p for n, p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))
    warmup = max(1, min(300, args.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    gen = torch.Generator().manual_seed(args.seed)
    bf16 = args.precision == "bf16"
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    attention = fp32_attention if bf16 and device.type == "cpu" else contextlib.nullcontext
    model.train()
    history = []
    t0 = time.time()
    for step in range(1, args.steps + 1):
        if step == relational_from and args.relational_from > 0:
            weights = late_weights
            print(f"step {step}: relational images ({args.relational_share:.0%} of each batch) and probes {weights} join", flush=True)
        relational_rows = relational_batch if step >= relational_from else 0
        idx = torch.randint(0, standard, (args.batch_size - relational_rows,), generator=gen)
        if relational_rows:
            idx = torch.cat([idx, torch.randint(standard, len(train), (relational_rows,), generator=gen)])
        batch = take_batch(train_data, idx, gen, device)
        with amp, attention():
            loss, parts = loss_fn(model, heads, retrieval, weights, *batch, args.fetch_layer, args.fetch_count == "sink", fetch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"step {step}/{args.steps} loss {loss.item():.4f} answer {parts['answer']:.4f} retrieval {parts['retrieval']:.4f} fetch {parts['fetch']:.4f} lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f} s", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            ev = evaluate(model, val_data, 256, device)
            history.append({"step": step, "loss": round(loss.item(), 4), "answer_loss": round(parts["answer"], 4), **ev})
            print(f"  val accuracy {ev['accuracy']}%  {ev['per_type']}", flush=True)

    model = model.float().cpu().eval()
    save_checkpoint(model, args.out)
    report = {"seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "turns": args.turns, **late_weights,
              "retrieval_layer": args.retrieval_layer, "fetch_layer": args.fetch_layer, "fetch_count": args.fetch_count, "retrieval_questions": args.retrieval_questions, "precision": args.precision, "compile": args.compile,
              "position_init": args.position_init, "train_items": args.train_items,
              "relational_items": len(relational), "relational_from": args.relational_from, "relational_share": args.relational_share,
              "device": str(device), "seconds": round(time.time() - t0, 1),
              "val": history[-1] if history else None, "history": history}
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({(args.out / 'model.safetensors').stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
