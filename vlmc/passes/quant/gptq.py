"""GPTQ for group-wise 4-bit weights, with the modality-aware Hessian of VLM-PTQ, on each target's grid.

GPTQ (Frantar et al., 2023) rounds a linear layer's weights one input channel at a time and spreads each
rounding error over the channels not yet rounded, weighted by the inverse Hessian H = E[x x^T] of the
layer's inputs. VLM-PTQ's observation: in a VLM decoder the visual tokens outnumber the text tokens ten to
one, so H is the visual tokens' and the text that produces the answer barely counts. The modality-aware
Hessian mixes the two modalities' normalised Hessians with a chosen share instead.

Each target re-derives a group's scale from the weights it is given with its own rule, so the result of
GPTQ must be written so that the target's round-to-nearest reproduces it exactly: the scales come from the
original weights by the target's rule (static groups), and the weight that fixes each group's scale is
held at the integer that gives back the same scale. The targets' rules:
- onnxruntime MatMulNBits (symmetric): the weight of largest magnitude maps to -8, scale = w / -8;
- torchao (ExecuTorch, MappingType.SYMMETRIC_NO_CLIPPING_ERR): scale = max(min / -8, max / 7);
- coremltools linear_symmetric int4: integers -7..7, scale = max|w| / 7;
- vlmc's TVM int4 (tvm_quant): torchao's rule.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from vlmc.passes.quant.calibration import LayerInputs

DAMPING = 0.01  # of the mean Hessian diagonal, added for a stable inverse (GPTQ's default)


@dataclass(frozen=True)
class Grid:
    """A target's symmetric group-wise 4-bit convention: its integer range and its rule for the scale."""

    name: str
    kmin: int
    kmax: int
    rule: str  # "signed_max" | "no_clipping" | "absmax"

    def scales(self, w: torch.Tensor):
        """Per group of `w` [rows, groups, size]: (scale, index of the weight that fixes it, that weight's
        integer). A scale may be negative (signed_max) or zero (an all-zero group)."""
        if self.rule == "no_clipping":
            lo, hi = w.min(-1), w.max(-1)
            s_neg, s_pos = lo.values.clamp(max=0) / self.kmin, hi.values.clamp(min=0) / self.kmax
            neg = s_neg >= s_pos
            return (torch.where(neg, s_neg, s_pos), torch.where(neg, lo.indices, hi.indices),
                    torch.where(neg, self.kmin, self.kmax))
        idx = w.abs().argmax(-1)
        peak = w.gather(-1, idx[..., None])[..., 0]
        if self.rule == "signed_max":
            return peak / self.kmin, idx, torch.full_like(idx, self.kmin)
        return peak.abs() / self.kmax, idx, torch.where(peak < 0, -self.kmax, self.kmax)

    def round_to_nearest(self, weight: torch.Tensor, group_size: int) -> torch.Tensor:
        """What the target itself makes of `weight` (dequantized): min-max round-to-nearest."""
        rows, cols = weight.shape
        w = weight.double().reshape(rows, cols // group_size, group_size)
        s = self.scales(w)[0][..., None]
        k = torch.round(w / torch.where(s == 0, 1, s)).clamp(self.kmin, self.kmax)
        return (k * s).reshape(rows, cols).to(weight.dtype)


GRIDS = {
    "onnx": Grid("onnxruntime MatMulNBits", -8, 7, "signed_max"),
    "executorch": Grid("torchao symmetric, no clipping error", -8, 7, "no_clipping"),
    "coreml": Grid("coremltools linear_symmetric int4", -7, 7, "absmax"),
    "tvm": Grid("vlmc TVM symmetric int4, no clipping error", -8, 7, "no_clipping"),
}


def gptq(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, group_size: int, damping: float = DAMPING) -> torch.Tensor:
    """GPTQ-rounded `weight` [out, in] (dequantized, on `grid`'s integers times the original groups'
    scales) minimising ||(W - Q) X||^2 for inputs with second moment `hessian` [in, in]."""
    rows, cols = weight.shape
    w = weight.double().clone()
    h = hessian.double().clone()
    dead = torch.diag(h) == 0  # inputs never non-zero: any value is as good, keep the rounding plain
    h[dead, dead] = 1
    h += damping * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    scale, anchor, anchor_k = grid.scales(w.reshape(rows, cols // group_size, group_size))
    safe = torch.where(scale == 0, 1, scale)
    q = torch.zeros_like(w)
    for i in range(cols):
        g, j = divmod(i, group_size)
        k = torch.round(w[:, i] / safe[:, g]).clamp(grid.kmin, grid.kmax)
        k = torch.where(anchor[:, g] == j, anchor_k[:, g].to(k.dtype), k)  # the weight that fixes the scale
        q[:, i] = k * scale[:, g]
        err = (w[:, i] - q[:, i]) / u[i, i]
        w[:, i + 1:] -= err[:, None] * u[i, i + 1:][None]
    return q.to(weight.dtype)


def apply(model, schemes: dict, stats: dict[str, LayerInputs], grid: Grid) -> nn.Module:
    """A copy of `model` whose GPTQ-quantized parts hold weights on `grid` (still float tensors: the
    target's own quantizer then stores them as 4-bit, reproducing them exactly)."""
    from vlmc.passes.quant import linear_layers

    model = copy.deepcopy(model)
    if model.tied_head:  # a tied head: the embedding table stays float
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    for part, scheme in schemes.items():
        share = scheme.param("text_share")
        for name, layer in linear_layers(model, part):
            h = stats[name].hessian(share)
            with torch.no_grad():
                layer.weight.copy_(gptq(layer.weight.data, h, grid, scheme.config.group_size))
    return model
