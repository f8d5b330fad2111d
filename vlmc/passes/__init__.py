"""Passes: token methods (token/), quantization (quant/, to come), KV-cache (kv/, to come), and the registry.

`apply(model, specs)` validates every pass against the model before inserting it, so bad parameters
are refused before any export work.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from vlmc.errors import VlmcError
from vlmc.passes import registry
from vlmc.passes.token import methods  # noqa: F401  (registers the token methods)


class _Count(nn.Module):
    """Records how many tokens pass a point (used to validate and describe passes)."""

    def forward(self, x):
        self.n = x.shape[1]
        return x


def tokens_at(model, point: str) -> int:
    probe = _Count()
    model.insert(point, probe)
    try:
        with torch.no_grad():
            s = model.config.vision.image_size
            model.encode_image(torch.zeros(1, 3, s, s))
    finally:
        model.insertions[point.replace(".", "_").replace("[", "_").replace("]", "")].pop(-1)
    return probe.n


def canonical_point(model, point: str) -> str:
    """`vision.block[-1]` -> the last block that runs before the feature layer."""
    m = re.fullmatch(r"vision\.block\[(-\d+)\]", point)
    if m:
        n = model.config.num_vision_layers_run
        i = n + int(m.group(1))
        if i < 0:
            raise VlmcError(f"insertion point {point}: only {n} vision blocks run")
        return f"vision.block[{i}]"
    return point


def apply(model, specs: list[dict]) -> list[dict]:
    """Insert the recipe's passes in order; return what the manifest records about each."""
    records = []
    grid = model.config.vision.image_size // model.config.vision.patch_size
    for spec in specs:
        p = registry.build(spec)
        at = canonical_point(model, p.config.at)
        point_module = model.resolve(at)
        n_in = tokens_at(model, at)
        p.check(n_in, grid, model)
        model.insert(at, p.stage(model, point_module, n_in))
        n_out = tokens_at(model, at)
        params = p.config.model_dump(exclude={"at"})
        records.append({"name": p.name, "at": at, "params": params, "tokens_in": n_in, "tokens_out": n_out,
                        "image_tokens": tokens_at(model, "projector.out"), "reads_text": p.reads_text,
                        "source": p.source, "departures": p.departures})
    return records


def validate(specs: list[dict]) -> None:
    """Names and parameter types, without a model (recipe load time)."""
    for spec in specs:
        registry.build(spec)
