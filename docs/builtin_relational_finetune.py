"""Diagnostic (docs/builtin_model.md): is bind-and-compare learnable here? Fine-tune the shipped model on 2-3
object train scenes asking only position/size questions (5 per image), optionally with a training-only probe
that makes each projected image token say its own grid cell (--pos W; --pos-kind class | reg), and print
val accuracy per question type every 100 steps. --retrieval W adds the recipe's retrieval probe (decoder
layer 1 regresses the two named objects' centres and sizes at each answer); --types picks the questions.

    python docs/builtin_relational_finetune.py --steps 300 --pos 0.5 --pos-kind reg
    python docs/builtin_relational_finetune.py --steps 600 --pos 0.5 --pos-kind reg --retrieval 1 --types position
"""
import argparse, math, sys, time
import numpy as np, torch
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]; sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "tools"))
import train_builtin as tb
from vlmc.eval import shapes_vqa as S
from vlmc.models_zoo import load
ap = argparse.ArgumentParser(); ap.add_argument("--steps", type=int, default=400); ap.add_argument("--lr", type=float, default=5e-4)
ap.add_argument("--items", type=int, default=6000); ap.add_argument("--max-objects", type=int, default=3); ap.add_argument("--mix", type=float, default=0.0); ap.add_argument("--pos", type=float, default=0.0); ap.add_argument("--pos-kind", default="class")
ap.add_argument("--retrieval", type=float, default=0.0); ap.add_argument("--types", default="position,size")
a = ap.parse_args(); torch.set_num_threads(2); torch.manual_seed(0)
lm = load("shapes-llava"); model = lm.model; cfg = model.config; tok = lm.tokenizer
def rel_items(n, seed):
    out, i, types = [], 0, a.types.split(",")
    while len(out) < n:
        rng = np.random.default_rng([seed, i]); i += 1
        objs = S._scene(rng)
        if not 2 <= len(objs) <= a.max_objects or not int(S._scene_id(objs), 16) % 10 < 8: continue
        qs = []
        for _ in range(30):
            qa = S._question(objs, types[int(rng.integers(len(types)))], rng)
            if qa and qa not in qs: qs.append(qa)
            if len(qs) == 5: break
        if not qs: continue
        img = S._draw(S._background(rng), objs, rng)
        c, s, _ = S.patch_labels(objs)
        geometry = [tb.named_geometry(q, objs) for q, _ in qs] + [[float("nan")] * 6] * (5 - len(qs))
        out.append((img.transpose(2, 0, 1).copy(), qs[0][0], qs[0][1], "rel", c, s, qs[1:], geometry))
    return out
t0 = time.time(); train = rel_items(a.items, 1234)
if a.mix: train += tb.generate_items("train", int(a.items * a.mix), 1, 5)
print(f"data {len(train)} in {time.time()-t0:.0f}s", flush=True)
val = tb.generate_items("val", 1000, 1)
tr_ids, _, _, tr_t, tr_img = tb.encode(tok, train, cfg.num_image_tokens, cfg.image_token_id)
tr_c = torch.from_numpy(np.stack([x[4] for x in train])); tr_s = torch.from_numpy(np.stack([x[5] for x in train]))
va = tb.encode(tok, val, cfg.num_image_tokens, cfg.image_token_id); vd = (*va, [x[3] for x in val])
tr_g = torch.tensor([x[7] for x in train])
heads = tb.PatchHeads(128, 196); retrieval = tb.RetrievalHead(128, 1); cap = {}
model.language_model.layers[1].register_forward_hook(lambda m, i, o: cap.update(h=o[0]))
pos_head = torch.nn.Linear(128, 28 if a.pos_kind == 'class' else 2)
grid = torch.arange(196)
params = list(model.parameters()) + list(heads.parameters()) + list(pos_head.parameters()) + list(retrieval.parameters())
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.05, betas=(0.9, 0.98))
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / a.steps))))
gen = torch.Generator().manual_seed(0); t0 = time.time(); model.train()
for step in range(1, a.steps + 1):
    idx = torch.randint(0, len(tr_ids), (32,), generator=gen); w = int(tr_t[idx].max()) + 1
    ids, tp = tr_ids[idx, :w], tr_t[idx]
    e = model.encode_image(model.normalize(tb.augment(tr_img[idx], gen)))
    lo, _ = model.decode(model.merge_embeddings(ids, e), torch.arange(w)[None].expand(32, -1), None)
    rr, cc = torch.nonzero(tp >= 0, as_tuple=True); pp = tp[rr, cc]
    al = torch.nn.functional.cross_entropy(lo[rr, pp - 1], ids[rr, pp])
    pl = pos_head(e)
    if a.pos_kind == "class":
        ploss = torch.nn.functional.cross_entropy(pl[..., :14].flatten(0, 1), (grid % 14).repeat(32)) + torch.nn.functional.cross_entropy(pl[..., 14:].flatten(0, 1), (grid // 14).repeat(32))
    else:
        target = torch.stack([grid % 14, grid // 14], -1).float() / 13.0
        ploss = 10 * torch.nn.functional.mse_loss(pl, target[None].expand(32, -1, -1))
    rl = retrieval(cap["h"], tp, tr_g[idx])
    loss = al + 0.5 * heads(e, tr_c[idx], tr_s[idx], None, 0.0, 0.0) + a.pos * ploss + a.retrieval * rl
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sched.step()
    if step % 50 == 0: print(f"step {step} loss {loss.item():.4f} answer {al.item():.4f} pos {ploss.item():.3f} retrieval {rl.item():.3f} {time.time()-t0:.0f}s", flush=True)
    if step % 100 == 0: print("  val", tb.evaluate(model, vd, 256, "cpu"), flush=True)
