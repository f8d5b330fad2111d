"""DASQ for the vision tower: a dense symmetric kernel plus sparse outliers, both symmetric.

DASQ ("Rethinking Asymmetric Quantization: Hidden Symmetry in Vision Model Weights", CVPR 2026) finds
that vision weights are nearly symmetric once a few outliers are taken out: the outliers, not the bulk,
stretch a row's range (and skew it, which is why asymmetric quantization with its zero points helped).
It splits each weight into a dense kernel without the outliers, quantized symmetrically over its now
narrower range, and the outliers kept apart, also symmetric, with no zero point anywhere.

Here each target's own quantizer takes the dense kernel (every target's weight quantization is
symmetric already), and the outliers become a static-shape sparse product: the `count` largest
magnitudes of each output row, their input-channel indices and their values, int8 per row.
Departures: a fixed count per row (the paper thresholds), so shapes stay static; the outliers' int8
values are stored dequantized (float), since no target has a sparse integer format; their product is a
gather, a multiply and a sum outside the matrix-multiply kernels.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from vlmc.passes.quant.smoothing import replace_module

SPARSE_BITS = 8


class OutlierSplitLinear(nn.Module):
    """y = dense(x) + sum_j values[o, j] * x[..., index[o, j]]: the dense kernel is an ordinary linear (the
    target quantizes it); the outliers are a gather over the input channels, weighted and summed."""

    def __init__(self, dense: nn.Linear, index: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.linear = dense
        self.register_buffer("index", index.reshape(-1).to(torch.int64))
        self.register_buffer("values", values.to(dense.weight.dtype))

    def forward(self, x):
        picked = x.index_select(-1, self.index).unflatten(-1, tuple(self.values.shape))
        return self.linear(x) + (picked * self.values).sum(-1)


def outlier_count(in_features: int, share: float) -> int:
    """Outliers per output row: `share` of its weights, at least one."""
    return max(1, round(share * in_features))


def symmetric(values: torch.Tensor, bits: int = SPARSE_BITS) -> torch.Tensor:
    """`values` [rows, k] on a symmetric per-row grid of `bits` (dequantized): no zero point."""
    top = 2 ** (bits - 1) - 1
    scale = values.abs().amax(1, keepdim=True) / top
    return torch.round(values / torch.where(scale == 0, 1, scale)).clamp(-top, top) * scale


def split(weight: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dense kernel, outlier indices [out, count], outlier values on their int8 grid): dense + scattered
    values equals `weight` up to the values' rounding."""
    index = weight.abs().topk(count, dim=1).indices
    values = weight.gather(1, index)
    return weight.scatter(1, index, 0.0), index, symmetric(values)


def apply(model: nn.Module, schemes: dict) -> nn.Module:
    """A copy of `model` whose DASQ parts' linears are dense kernels plus sparse outliers."""
    from vlmc.passes.quant import linear_layers

    model = copy.deepcopy(model)
    for part, scheme in schemes.items():
        share = scheme.param("outliers")
        for name, layer in linear_layers(model, part):
            dense, index, values = split(layer.weight.detach(), outlier_count(layer.in_features, share))
            with torch.no_grad():
                layer.weight.copy_(dense)
            replace_module(model, name, OutlierSplitLinear(layer, index, values))
    return model
