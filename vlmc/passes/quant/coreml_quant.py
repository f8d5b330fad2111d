"""Quantization of a converted Core ML program with coremltools.optimize.

Weights: int8 per-channel (w8a8, w8) or int4 per block of `group_size` input channels (w4, iOS18 /
macOS15). Activations (w8a8): calibrating them runs the model, which Core ML does only on macOS; on
other systems the activations stay at the program's float precision and the manifest says so.
"""
from __future__ import annotations

import platform

from vlmc.errors import VlmcError

# the deployment targets whose Core ML has block-wise int4 (constexpr_blockwise_shift_scale)
INT4_TARGETS = ("iOS18", "macOS15", "iOS26", "macOS26")


def check(scheme, minimum_deployment_target: str) -> None:
    if scheme.name == "w4" and minimum_deployment_target not in INT4_TARGETS:
        raise VlmcError(f"pass w4: Core ML block-wise 4-bit weights need coreml.minimum_deployment_target "
                        f"iOS18 / macOS15 or later (the recipe has {minimum_deployment_target})")


def quantize(ml, scheme, sample_data: list[dict] | None, eight_bit: list[str] = ()):
    """(quantized MLModel, what the manifest records). `eight_bit`: the linears a w4 scheme gives 8 bits
    (QIG): per-channel int8 weights, every other weight int4 per block."""
    import coremltools.optimize.coreml as cto

    record = {"activations": "float (Core ML quantizes activations only from calibration, w8a8)"}
    if scheme.name == "w8a8":
        if platform.system() == "Darwin":
            act = cto.OptimizationConfig(global_config=cto.experimental.OpActivationLinearQuantizerConfig(mode="linear_symmetric"))
            ml = cto.linear_quantize_activations(ml, act, sample_data)
            record["activations"] = "int8, calibrated with coremltools.optimize.coreml.linear_quantize_activations"
        else:
            record["activations"] = (f"float: calibrating Core ML activations runs the model, which needs macOS "
                                     f"(this is {platform.system()}); re-export on a Mac for int8 activations")
    if scheme.name == "w4":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                         block_size=scheme.config.group_size)
        record["how"] = f"coremltools linear_quantize_weights: int4 in blocks of {scheme.config.group_size} input channels"
    else:
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
        record["how"] = "coremltools linear_quantize_weights: per-channel int8"
    kept_float = float_constants(ml)
    if kept_float:
        record["kept_float"] = f"{len(kept_float)} Quant Experts weights (float by design)"
    per_op = {n: None for n in kept_float}
    if eight_bit:
        int8 = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
        per_op.update({n: int8 for n in weight_constants(ml, list(eight_bit))})
        record["how"] += f"; the {len(eight_bit)} linears QIG gives 8 bits: per-channel int8"
        record["eight_bit_linears"] = list(eight_bit)
    ml = cto.linear_quantize_weights(ml, cto.OptimizationConfig(global_config=op, op_name_configs=per_op))
    return ml, record


def _constants(ml) -> list[str]:
    spec = ml.get_spec()
    return [op.outputs[0].name for function in spec.mlProgram.functions.values()
            for block in function.block_specializations.values() for op in block.operations if op.type == "const"]


def weight_constants(ml, linears: list[str]) -> list[str]:
    """The constants holding the named linears' weights: the converter names a parameter after its module
    path, dots as underscores (`p_model_layers_0_mlp_up_proj_weight`, `_to_fp16` when cast); each linear
    must be found."""
    names = _constants(ml)
    found = {}
    for linear in linears:
        key = "_" + linear.replace(".", "_") + "_weight"
        hits = [n for n in names if n.removesuffix("_to_fp16").endswith(key)]
        if not hits:
            raise VlmcError(f"Core ML w4 quantization: no weight constant of {linear} found in the converted program "
                            "(its 8 bits cannot be placed)")
        found[linear] = hits
    return [n for hits in found.values() for n in hits]


def float_constants(ml) -> list[str]:
    """The program's constants that stay float whatever the scheme: Quant Experts' weights (their names
    carry the parameters' names)."""
    from vlmc.passes.quant.experts import MARKER

    return [n for n in _constants(ml) if MARKER in n]
