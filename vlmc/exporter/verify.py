"""Verification: every program on its runtime against the same program in eager PyTorch.

The inputs are real ones: a seeded image, a prompt built from the template, the prefill caches the
eager decoder produced. Each check passes when |runtime - eager| <= atol * scale + rtol * |eager|
everywhere, `scale` being the eager tensor's peak magnitude where that exceeds 1 (a runtime's own float
kernels sum in another order, so the absolute error of a large activation grows with its size: a fixed
atol would fail a real-size ViT whose features reach tens while passing a toy's);
a quantized program is compared with the float eager program by relative error,
||runtime - eager|| / ||eager|| <= verify.quantized_rel_err (how much quantization may move it; its
accuracy is measured by `vlmc eval`), and logits checks record whether the top token agrees. A quantized
vision encoder whose token pass selects or merges rows may keep other tokens than eager where scores nearly
tie (a selection is discontinuous, and one changed pick shifts every later row of an index-ordered
selection), so its rows are compared with their nearest eager rows, both ways.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from vlmc.exporter.context import ExportContext
from vlmc.models_zoo.programs import ExecuTorchDecoder
from vlmc.models_zoo.tokenizer import PromptIds
from vlmc.runtimes.base import Session
from vlmc.runtimes.eager_runner import EagerSession
from vlmc.runtimes.generate import encode_image, prompt_embeds
from vlmc.runtimes.image import tiles

SAMPLE_QUESTION = "what color is the circle?"
ELF_SHARED_OBJECT = 3  # e_type ET_DYN
ELF_MACHINES = {"aarch64": 183, "x86_64": 62}  # e_machine


@dataclass
class Sample:
    image: np.ndarray  # uint8 [3,H,W], or [k,3,H,W] tiles
    prompt: PromptIds


def make_sample(ctx: ExportContext) -> Sample:
    c, size = ctx.model.config, ctx.model.image_size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    image = np.stack([(xx * 255 // size), (yy * 255 // size), ((xx + yy) * 127 // size)]).astype(np.int64)
    image = np.clip(image + rng.integers(-40, 40, image.shape), 0, 255).astype(np.uint8)
    if ctx.model.image_tiles > 1:  # each tile another shift of the gradient
        image = np.stack([np.roll(image, 7 * k, axis=2) for k in range(ctx.model.image_tiles)])
    prompt = ctx.loaded.tokenizer.prompt(ctx.recipe.prompt_template, SAMPLE_QUESTION, ctx.image_tokens,
                                         c.image_token_id, c.text.bos_token_id)
    return Sample(image, prompt)


def check_row(target, program, check, got, ref, atol, rtol, rel_err=None, step=None) -> dict:
    """One check; `rel_err` (a quantized program) switches to the relative-error criterion; `step` (an int8
    cache's value per code, per entry) allows each entry one rounding step on top of the tolerance."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return {"target": target, "program": program, "check": check, "max_abs_err": None, "passed": False,
                "detail": f"shape {list(got.shape)} != eager {list(ref.shape)}"}
    err = np.abs(got - ref) if step is None else np.maximum(np.abs(got - ref) - 1.001 * np.abs(step), 0.0)
    row = {"target": target, "program": program, "check": check, "max_abs_err": float(err.max(initial=0.0)),
           "max_ref": float(np.abs(ref).max(initial=0.0))}
    if rel_err is None:
        scale = max(1.0, row["max_ref"])
        ratio = float((err / (atol * scale + rtol * np.abs(ref))).max()) if err.size else 0.0
        return {**row, "atol_scale": round(scale, 4), "tolerance_used": round(ratio, 4), "passed": ratio <= 1.0}
    rel = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))
    row.update(quantized=True, rel_err=float(f"{rel:.4g}"), tolerance_used=float(f"{rel / rel_err:.4g}"), passed=rel <= rel_err)
    if "logits" in check:
        row["top1_agrees"] = bool(np.argmax(got.reshape(-1, got.shape[-1]), -1).tolist() == np.argmax(ref.reshape(-1, ref.shape[-1]), -1).tolist())
        row["detail"] = f"quantized: rel err {rel:.3g}, top-1 {'agrees' if row['top1_agrees'] else 'differs'}"
    else:
        row["detail"] = f"quantized: rel err {rel:.3g}"
    return row


def paired_rows(got: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(got, ref) as row sets: every runtime row beside its nearest eager row, then every eager row beside its
    nearest runtime row (both ways, so a runtime that repeats one right row cannot pass), and how many eager
    rows the runtime rows found. The relative error of the pairs is then the set's error, whatever the order."""
    g = np.asarray(got, np.float64).reshape(-1, got.shape[-1])
    r = np.asarray(ref, np.float64).reshape(-1, ref.shape[-1])
    d = (g * g).sum(1)[:, None] + (r * r).sum(1)[None, :] - 2.0 * g @ r.T
    to_ref, to_got = d.argmin(1), d.argmin(0)
    return np.concatenate([g, g[to_got]]), np.concatenate([r[to_ref], r]), len(set(to_ref.tolist()))


class Verifier:
    """Eager references computed once, compared with each target's runtime."""

    def __init__(self, ctx: ExportContext):
        self.ctx, self.sample = ctx, make_sample(ctx)
        self.atol, self.rtol = ctx.recipe.verify.atol, ctx.recipe.verify.rtol
        self.quantized_rel_err = ctx.recipe.verify.quantized_rel_err
        self.eager = EagerSession(ctx.model, ctx.decoder_shape)
        p = self.sample.prompt
        self.text_ids = p.text_ids
        self.image = tiles(self.sample.image)[0]  # the vision_encoder takes one image (tile) per call
        image_embeds = encode_image(self.eager, self.sample.image)
        self.image_embeds = image_embeds[0]
        self.embeds = prompt_embeds(self.eager, p, image_embeds)
        n, mp = self.embeds.shape[1], ctx.recipe.max_prompt
        padded = np.zeros((1, mp, self.embeds.shape[2]), np.float32)
        padded[:, :n] = self.embeds
        pos = np.arange(mp, dtype=np.int64)
        self.image_start = np.asarray([len(p.before)], np.int64)
        if ctx.decoder_shape.full_prompt_prefill:  # in-LLM token stages: the whole prompt through text_prefill
            self.prefill_program = "text_prefill"
            self.prefill_in = [padded, self.image_start, np.asarray([n - 1], np.int64)]
        else:
            self.prefill_program = "text_decoder"
            self.prefill_in = [padded, pos[None], pos, np.asarray([n - 1], np.int64), *ctx.decoder_shape.empty_caches()]
        self.prefill_out = self.eager.call(self.prefill_program, self.prefill_in)
        self.next_embeds = self.eager.embed([int(np.argmax(self.prefill_out[0][0]))])
        self.step_in = [self.next_embeds, np.asarray([[n]], np.int64), np.asarray([n], np.int64),
                        np.asarray([0], np.int64), *self.prefill_out[1:]]
        self.step_out = self.eager.call("text_decoder", self.step_in)

    def _check(self, target, program, check, got, ref) -> dict:
        rel = self.quantized_rel_err if self.ctx.scheme(program) else None
        return check_row(target, program, check, got, ref, self.atol, self.rtol, rel)

    def _vision(self, target: str, got: np.ndarray) -> dict:
        rows_reduced = self.ctx.image_tokens < self.ctx.model.num_image_tokens
        if not (self.ctx.scheme("vision_encoder") and rows_reduced and got.shape == self.image_embeds.shape):
            return self._check(target, "vision_encoder", "image embeddings", got, self.image_embeds)
        got_rows, ref_rows, found = paired_rows(got, self.image_embeds)
        row = check_row(target, "vision_encoder", "image embeddings (as a set of rows)", got_rows, ref_rows, self.atol,
                        self.rtol, self.quantized_rel_err)
        row["detail"] += (f"; rows paired with their nearest eager rows both ways ({found} of {got.size // got.shape[-1]} "
                          "eager rows found)")
        return row

    def _common(self, target: str, session: Session, image) -> list[dict]:
        return [
            self._vision(target, session.call("vision_encoder", [image])[0]),
            self._check(target, "token_embedding", "prompt embeddings", session.embed(self.text_ids), self.eager.embed(self.text_ids)),
        ]

    def static_cache(self, target: str, session: Session, image) -> list[dict]:
        rows = self._common(target, session, image)
        for program, check, inputs, ref in ((self.prefill_program, "prefill", self.prefill_in, self.prefill_out),
                                            ("text_decoder", "decode step", self.step_in, self.step_out)):
            got = session.call(program, inputs)
            rows.append(self._check(target, program, f"{check} logits", got[0], ref[0]))
            got_values, _ = self.cache_values(got[1:])
            ref_values, step = self.cache_values(ref[1:])
            row = check_row(target, program, f"{check} KV cache", got_values, ref_values, self.atol, self.rtol,
                            self.quantized_rel_err if self.ctx.scheme(program) else None, step)
            if step is not None:
                row["detail"] = (row.get("detail", "") + "; " if row.get("detail") else "") + "int8 codes: one rounding step allowed"
            rows.append(row)
        return rows

    def cache_values(self, caches: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """Every cache entry's value, flattened (an int8 cache's codes times their scales), and for an int8
        cache each entry's step (its scale): the runtime's own division may round a code the other way."""
        if self.ctx.decoder_shape.kv_cache != "int8":
            return np.concatenate([c.ravel() for c in caches]), None
        layers = [caches[i: i + 4] for i in range(0, len(caches), 4)]
        pairs = [(codes, scale) for k, v, k_scale, v_scale in layers for codes, scale in ((k, k_scale), (v, v_scale))]
        values = np.concatenate([(codes.astype(np.float32) * scale).ravel() for codes, scale in pairs])
        steps = np.concatenate([np.broadcast_to(scale, codes.shape).ravel() for codes, scale in pairs])
        return values, steps

    def executorch(self, open_session: Callable[[tuple[str, ...]], Session]) -> list[dict]:
        """The vision side and the decoder in two sessions, one after the other: the runtime holds XNNPACK's
        packed weights of the methods it loaded until the program is freed, and both stages' at once
        would be the export's peak (+0.4x of the weights for SmolVLM2-256M)."""
        session = open_session(("vision_encoder", "token_embedding"))
        rows = self._common("executorch", session, self.image)
        session = None  # freed before the decoder's weights are packed
        eager = ExecuTorchDecoder(self.ctx.model, self.ctx.recipe.max_context)
        n = self.embeds.shape[1]
        from_decoder = ("text_decoder", "prefill logits", eager, [self.embeds, np.asarray([0], np.int64)])
        own_rows = ("text_prefill", "prefill logits", eager.prefill, [self.embeds, self.image_start])
        # the stock runner prefills through text_decoder, vlmc's through text_prefill: both are checked, and
        # the decode step reads the cache the last of them wrote (the two methods share it)
        prefills = ([own_rows] if self.prefill_program == "text_prefill" else
                    [from_decoder, own_rows] if self.ctx.recipe.executorch.text_prefill else [from_decoder])
        session = open_session(tuple(dict.fromkeys([p[0] for p in prefills] + ["text_decoder"])))
        for program, check, run, inputs in (*prefills, ("text_decoder", "decode step logits", eager, [self.next_embeds, np.asarray([n], np.int64)])):
            with torch.no_grad():
                ref = run(*(torch.from_numpy(a) for a in inputs)).numpy()
            rows.append(self._check("executorch", program, check, session.call(program, inputs)[0], ref))
        return rows

    def tvm_cross_builds(self, target_entry: dict) -> list[dict]:
        """Libraries for another architecture cannot run here: check each is a shared object of that machine."""
        from vlmc.runtimes.tvm_runner import host_architecture

        rows = []
        for program, entry in target_entry["programs"].items():
            for arch, name in entry["libraries"].items():
                if arch == host_architecture():
                    continue
                header = (self.ctx.out_dir / name).read_bytes()[:20]
                machine = int.from_bytes(header[18:20], "little")
                ok = header[:4] == b"\x7fELF" and header[16] == ELF_SHARED_OBJECT and machine == ELF_MACHINES.get(arch)
                rows.append({"target": "tvm", "program": program, "check": f"{arch} build (ELF shared object)",
                             "max_abs_err": None, "passed": ok,
                             "detail": f"numerics need an {arch} machine (--verify-on qemu-aarch64 emulates one; or a board); "
                                       f"this is {host_architecture()}"})
        return rows

    def coreml_structure(self, target_entry: dict) -> list[dict]:
        import coremltools as ct

        rows = []
        for program, entry in target_entry["programs"].items():
            spec = ct.models.MLModel(str(self.ctx.out_dir / entry["file"]), skip_model_load=True).get_spec()
            names = ([f.name for f in spec.description.input], [f.name for f in spec.description.output])
            expected = ([i["name"] for i in entry["inputs"]], [o["name"] for o in entry["outputs"]])
            rows.append({"target": "coreml", "program": program, "check": "structure (spec loads, I/O match)",
                         "max_abs_err": None, "passed": names == expected,
                         "detail": f"numerics need macOS (this is {platform.system()}); {sum(entry['ops'].values())} MIL ops"})
        return rows
