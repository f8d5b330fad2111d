"""Quantization of TVM programs: int8 or int4 weights stored in the library, dequantized inside each product.

TVM's Relax has no integer-activation kernels for a CPU (no QNN dialect), so every scheme quantizes the
weights only and the activations stay float32, as on Core ML under Linux; the manifest says so. What it buys
is the size of the library (weights 4x / 8x smaller) and the memory traffic of each product, which reads
the integers and dequantizes them in registers (tvm_ops' quantized linear kernel, scheduled like the float
products by tvm_schedules):

- w8a8 and w8: per-channel symmetric int8 (scale = max |w| / 127 per output channel), stored [in, out] so a
  vector of output columns is one load.
- w4: symmetric 4-bit groups of `group_size` input channels on torchao's grid (integers -8..7, scale =
  max(min / -8, max / 7), so GPTQ's rounding on it is reproduced exactly: gptq.GRIDS["tvm"]), two input
  channels per byte [in / 2, out]; QIG's promoted linears get w8's int8.

Quant Experts' experts stay float (they are not linear layers); DASQ's outliers stay beside the int8 product.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

INT8_MAX = 127


@torch.library.custom_op("vlmc::quantized_linear", mutates_args=())
def quantized_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
                     bits: int, group_size: int) -> torch.Tensor:
    """x @ dequantize(weight)^T + bias: one op through torch.export, which tvm_ops converts to one kernel."""
    return nn.functional.linear(x, dequantize(weight, scales, bits, group_size), bias)


@quantized_linear.register_fake
def _quantized_linear_shape(x, weight, scales, bias, bits, group_size):
    return x.new_empty(*x.shape[:-1], scales.shape[-1])


def dequantize(weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The float weight [out, in] that the stored codes stand for."""
    if bits == 8:
        return (weight.float() * scales).t()
    low = (weight & 15).to(torch.int16) - 8
    high = (weight >> 4).to(torch.int16) - 8
    codes = torch.stack([low, high], 1).reshape(2 * weight.shape[0], weight.shape[1]).float()
    return (codes * scales.repeat_interleave(group_size, 0)).t()


def pack_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes [in, out], float scales [out]) of a float weight [out, in]."""
    scales = weight.abs().amax(1).float() / INT8_MAX
    codes = torch.round(weight / torch.where(scales == 0, 1, scales)[:, None]).clamp(-INT8_MAX, INT8_MAX)
    return codes.to(torch.int8).t().contiguous(), scales


def pack_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes [in / 2, out]: input channel 2p in the low nibble, 2p + 1 in the high one, each stored + 8;
    float scales [in / group_size, out]) of a float weight [out, in]."""
    from vlmc.passes.quant.gptq import GRIDS

    grid = GRIDS["tvm"]
    rows, cols = weight.shape
    groups = weight.double().reshape(rows, cols // group_size, group_size)
    scales = grid.scales(groups)[0]
    codes = torch.round(groups / torch.where(scales == 0, 1, scales)[..., None]).clamp(grid.kmin, grid.kmax)
    stored = (codes.reshape(rows, cols).to(torch.int16) - grid.kmin).t()  # [in, out], 0..15
    return (stored[0::2] | (stored[1::2] << 4)).to(torch.uint8).contiguous(), scales.t().float().contiguous()


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored as integer codes and scales (buffers: constants in the library)."""

    def __init__(self, layer: nn.Linear, bits: int, group_size: int = 0):
        super().__init__()
        weight = layer.weight.detach()
        codes, scales = pack_int8(weight) if bits == 8 else pack_int4(weight, group_size)
        self.register_buffer("weight", codes)
        self.register_buffer("scales", scales)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.bits, self.group_size = bits, group_size

    def forward(self, x):
        return quantized_linear(x, self.weight, self.scales, self.bias, self.bits, self.group_size)


def quantize(model: nn.Module, schemes: dict, promoted: dict[str, list[str]]) -> tuple[nn.Module, dict[str, dict]]:
    """A copy of `model` whose quantized parts' linears are QuantizedLinear, and what the manifest records per
    part. `schemes`: part -> its quantization pass; `promoted`: part -> the linears a w4 scheme gives 8 bits."""
    from vlmc.passes.quant import linear_layers
    from vlmc.passes.quant.smoothing import replace_module

    model = copy.deepcopy(model)
    records = {}
    for part, scheme in schemes.items():
        eight_bit = set(promoted.get(part, ()))
        group = scheme.config.group_size if scheme.name == "w4" else 0
        for name, layer in linear_layers(model, part):
            bits = 8 if scheme.name != "w4" or name in eight_bit else 4
            replace_module(model, name, QuantizedLinear(layer, bits, group if bits == 4 else 0))
        if scheme.name == "w4":
            how = (f"int4 weights in symmetric groups of {group} input channels (integers -8..7, two per byte), "
                   "dequantized inside each product")
            if eight_bit:
                how += f"; the {len(eight_bit)} linears QIG gives 8 bits: per-channel int8"
        else:
            how = "per-channel symmetric int8 weights, dequantized inside each product"
        records[part] = {"how": how, "activations": "float32: TVM has no integer-activation CPU kernels, so "
                                                    f"{scheme.name} quantizes the weights only"}
        if eight_bit:
            records[part]["eight_bit_linears"] = sorted(eight_bit)
    return model, records
