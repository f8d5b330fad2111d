"""Quantization of ExecuTorch programs with ExecuTorch's own stack, before XNNPACK lowering.

w8a8 / w8: PT2E with the XNNPACKQuantizer (per-channel symmetric int8 weights; activations static from
calibration, or dynamic per call), then convert_pt2e and re-export. w4: torchao's
Int8DynamicActivationIntxWeightConfig (4-bit group-wise weights, int8 dynamic activations), the form
XNNPACK has kernels for.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from vlmc.models_zoo.layers import OwnRowsAttention


XNNPACK_W4_GROUP = 32  # XNNPACK's 4-bit group-wise kernels take groups of a multiple of 32


def check(scheme, backend: str) -> None:
    """What ExecuTorch's XNNPACK delegation refuses, before any export work."""
    from vlmc.errors import VlmcError

    if backend == "xnnpack" and scheme.name == "w4" and scheme.config.group_size % XNNPACK_W4_GROUP:
        raise VlmcError(f"pass w4: parameter 'group_size': XNNPACK (target executorch) takes 4-bit groups of a multiple "
                        f"of {XNNPACK_W4_GROUP}, got {scheme.config.group_size}")


def quantize_w4(model, part: str, group_size: int, eight_bit: list[str] = ()) -> nn.Module:
    """A copy of `model` whose `part` linears hold torchao 4-bit group-wise weights, except `eight_bit` (QIG's
    promoted linears): per-channel int8 weights. Both with dynamic int8 activations (XNNPACK qd8-qb4w /
    qd8-qc8w)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    from vlmc.passes.quant import linear_layers

    model = copy.deepcopy(model)
    # no clipping: a group's scale is max(min / -8, max / 7), so its extreme weight is exact (and GPTQ's
    # rounding on that grid is reproduced exactly, see gptq.GRIDS)
    four = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size),
                                                 weight_mapping_type=MappingType.SYMMETRIC_NO_CLIPPING_ERR)
    eight = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0),
                                                  weight_mapping_type=MappingType.SYMMETRIC)
    if not eight_bit:
        for _, module in model.part_modules(part):
            quantize_(module, four)
        return model
    promoted = set(eight_bit)
    names = {name for name, _ in linear_layers(model, part)}
    quantize_(model, eight, filter_fn=lambda m, fqn: fqn in promoted)
    quantize_(model, four, filter_fn=lambda m, fqn: fqn in names and fqn not in promoted)
    return model


def quantize_pt2e(ep, scheme, example_args: tuple, calibrate: Callable[[Callable], None]) -> nn.Module:
    """The PT2E-quantized module of an exported program (to be exported again)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    dynamic = scheme.name == "w8"
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic))
    quantizer.set_module_type(OwnRowsAttention, None)  # text_prefill's attention stays float, as custom_sdpa is
    prepared = prepare_pt2e(ep.module(), quantizer)
    drop_integer_observers(prepared)
    with torch.no_grad():
        if dynamic:
            prepared(*example_args)
        else:
            calibrate(prepared)
        return convert_pt2e(prepared)


def drop_integer_observers(prepared) -> None:
    """Remove the observers the quantizer put on integer tensors. XNNPACKQuantizer annotates shape ops
    (unsqueeze, view, cat) whatever their dtype, so the index arithmetic of an in-graph token selection
    (DivPrune's farthest-point indices) would get a histogram observer, which cannot observe int64; an
    index is never quantized anyway."""
    graph = prepared.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or not node.target.startswith("activation_post_process"):
            continue
        source = node.args[0]
        val = source.meta.get("val") if hasattr(source, "meta") else None
        if isinstance(val, torch.Tensor) and not (val.dtype.is_floating_point or val.dtype.is_complex):
            node.replace_all_uses_with(source)
            graph.erase_node(node)
    prepared.recompile()


def describe(scheme) -> dict:
    if scheme.name == "w4":
        promoted = scheme.config.promote or []
        eight = ("; the linears QIG gives 8 bits: per-channel int8 weights (XNNPACK qd8-qc8w)" if promoted else "")
        return {"how": f"torchao Int8DynamicActivationIntxWeightConfig: symmetric 4-bit weights "
                       f"(no clipping error) in groups of {scheme.config.group_size} (XNNPACK qd8-qb4w){eight}",
                "activations": "dynamic int8 (XNNPACK has no weight-only 4-bit linear)"}
    if scheme.name == "w8":
        return {"how": "PT2E XNNPACKQuantizer, dynamic: per-channel int8 weights", "activations": "dynamic int8"}
    return {"how": "PT2E XNNPACKQuantizer, static: per-channel int8 weights, per-tensor activations (min-max calibration)",
            "activations": "static int8"}

