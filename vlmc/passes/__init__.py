"""Passes: the input resolution, token methods (token/), quantization (quant/), the KV cache's storage
(kv), and the registry.

`apply(model, specs)` validates every pass against the model before inserting the token passes and
planning the quantization, so bad parameters are refused before any export work.
"""
from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from vlmc.errors import VlmcError
from vlmc.models_zoo.core import is_bypass
from vlmc.passes import embedding, kv, quant, registry, resolution  # noqa: F401  (registers resolution, kv8, embed8)
from vlmc.passes.token import methods  # noqa: F401  (registers the token methods)


class _Record(nn.Module):
    """Keeps the tokens passing a point (calibrated static mode)."""

    transparent = True

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach())
        return x


def tokens_entering(model, point: str, images) -> list[torch.Tensor]:
    """The tokens [1,N,D] arriving at `point` (after the stages already there) for each uint8 image."""
    probe = _Record()
    model.insert(point, probe)
    try:
        with torch.no_grad():
            for image in images:
                model.encode_image(model.normalize(torch.from_numpy(image)))
    finally:
        model.pop(point)
    return probe.seen


class _RecordRows(nn.Module):
    """Wraps an in-LLM stage, keeping the image rows it selects (calibrated static mode)."""

    def __init__(self, stage):
        super().__init__()
        self.stage, self.keep, self.dropped, self.bypass = stage, stage.keep, stage.dropped, is_bypass(stage)
        self.seen: list[torch.Tensor] = []

    def select(self, view):
        kept = self.stage.select(view)
        self.seen.append(kept)
        return kept


def prompt_prefill(model, prompt) -> torch.Tensor:
    """A calibration prompt (embeds [1,T,D], first image row, last row) prefilled whole, eagerly, through
    the model's in-LLM stages: the hidden state of its last row [1,D]."""
    from vlmc.models_zoo.core import PromptRows
    from vlmc.passes.token.methods import causal_attend

    embeds, start, last = prompt
    rows = PromptRows(torch.tensor([start]), model.image_rows_in_llm(), torch.tensor([last]))
    with torch.no_grad():
        h = model.run_decoder(embeds[:, : last + 1], torch.arange(last + 1)[None], causal_attend(model.config.text), rows)
    return h[:, -1]


def kept_rows_most_often(model, placed, calibration) -> list[torch.Tensor]:
    """The calibrated static mode inside the LLM: for each in-LLM stage of `placed` (point, stage pairs in
    order), the image rows it keeps most often over the calibration prompts, ascending. Each stage is
    calibrated after the earlier ones have become constant, so its rows index what they leave."""
    from vlmc.passes.token import functional as T
    from vlmc.passes.token.methods import ConstantRowsStage

    out, inserted, prompts = [], [], None
    try:
        for point, stage in placed:
            if not point.startswith("decoder."):
                model.insert(point, stage)  # a vision-side stage changes what the LLM receives
                inserted.append(point)
                continue
            if prompts is None:
                prompts = calibration.prompts(model)
            probe = _RecordRows(stage)
            model.insert(point, probe)
            try:
                for prompt in prompts:
                    prompt_prefill(model, prompt)
            finally:
                model.pop(point)
            kept = T.most_selected(torch.stack(probe.seen), stage.keep + stage.dropped, stage.keep)
            out.append(kept)
            model.insert(point, ConstantRowsStage(kept, stage.dropped, is_bypass(stage)))
            inserted.append(point)
    finally:
        for point in reversed(inserted):
            model.pop(point)
    return out


def tokens_at(model, point: str) -> int:
    """How many visual tokens leave `point` after the stages already there (used to validate and describe
    passes); inside the LLM, the image rows left after that layer's stages."""
    if point.startswith("decoder."):
        layer = int(point.split("[")[1].rstrip("]"))
        return tokens_at(model, "projector.out") - model.dropped_through(layer)
    s = model.image_size
    return tokens_entering(model, point, [np.zeros((3, s, s), np.uint8)])[0].shape[1]


def canonical_point(model, point: str) -> str:
    """`vision.block[-1]` -> the last block that runs before the feature layer."""
    m = re.fullmatch(r"vision\.block\[(-\d+)\]", point)
    if m:
        n = model.num_vision_blocks
        i = n + int(m.group(1))
        if i < 0:
            raise VlmcError(f"insertion point {point}: only {n} vision blocks run")
        return f"vision.block[{i}]"
    return point


def apply(model, specs: list[dict], calibration=None) -> tuple[list[dict], quant.QuantPlan]:
    """Insert the recipe's token passes in order and plan its quantization passes (which the targets
    apply after the token passes, whatever their place in the list); return what the manifest records
    about each token pass, and the plan. `calibration` (a CalibrationSource) gives the calibration data, for passes
    that fix their choice from data."""
    built = [registry.build(spec) for spec in specs]
    plan = quant.plan(model, [p for p in built if p.kind == "quant"])
    records = []
    inputs = [p for p in built if p.kind == "input"]
    if len(inputs) > 1:
        raise VlmcError("pass resolution: given more than once (the image has one size)")
    for p in inputs:  # the input size first: every token pass is placed on the grid it leaves
        n_in = tokens_at(model, "projector.out")
        p.apply(model)
        n_out = tokens_at(model, "projector.out")
        records.append(_record(p, p.config.at, n_in, n_out, n_out))
    for p in (p for p in built if isinstance(p, registry.TokenPass)):  # token passes, and KV passes placed like them
        p.locate(model, calibration)
        at = canonical_point(model, p.config.at)
        model.resolve(at)
        p.config = p.config.model_copy(update={"at": at})
        n_in = tokens_at(model, at)
        p.check(n_in, model.token_grid(at), model)
        placed = p.place(model, n_in, calibration)
        for point, stage in placed:
            model.insert(point, stage)
        n_out = tokens_at(model, placed[-1][0])
        records.append(_record(p, at, n_in, n_out, tokens_at(model, "projector.out"), p.reads_text,
                               any(point.startswith("decoder.") for point, _ in placed)))
    caches = [p for p in built if p.kind == "kv" and not isinstance(p, registry.TokenPass)]
    if len(caches) > 1:
        raise VlmcError("recipe field 'passes': the KV cache has one storage; give one KV-cache pass")
    for p in caches + [p for p in built if p.kind == "embedding"]:
        p.apply(model)
        n = tokens_at(model, "projector.out")
        records.append(_record(p, p.config.at, n, n, n))
    plan.calibrate(model, calibration)
    return records, plan


def _record(p, at: str, tokens_in: int, tokens_out: int, image_tokens: int, reads_text: bool = False,
            in_llm: bool = False) -> dict:
    """What the manifest records about a pass that changes the model (its `passes` list)."""
    return {"name": p.name, "at": at, "params": p.config.model_dump(exclude={"at"}), "tokens_in": tokens_in,
            "tokens_out": tokens_out, "image_tokens": image_tokens, "reads_text": reads_text, "in_llm": in_llm,
            "source": p.source, "departures": p.departures}


def validate(specs: list[dict]) -> None:
    """Names and parameter types, without a model (recipe load time)."""
    for spec in specs:
        registry.build(spec)
