"""Quantization of an exported .onnx program with onnxruntime's own tooling.

w8a8: static QDQ (per-channel int8 weights, activations with min-max ranges from a calibration reader), by
default uint8 with a zero point: U8S8, the form onnxruntime's CPU kernels run fastest (x86's int8 dot
products take one unsigned and one signed operand; S8S8, the recipe's `onnx.w8a8_activations: int8` for
execution providers that want signed activations, ran slower than fp32 here; docs/ort_int8). w8: dynamic
quantization (MatMulInteger, activations quantized per call); w4: MatMulNBits (group-wise 4-bit weights,
float activations). Only the products with weights are quantized: attention
products, the KV-cache writes and the residual stream stay float, as on XNNPACK.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from vlmc.errors import VlmcError, first_line

OPS = ["MatMul", "Gemm", "Conv"]


def _reader(feeds: Iterable[dict[str, np.ndarray]]):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    return Reader()


def _activation_products(graph) -> list[str]:
    """Products without a constant weight, left float: MatMuls with no constant operand (attention's q.k
    and p.v, as XNNPACK leaves them, so w8a8 means int8 weights and int8 inputs to the weight products on
    every target), and Conv / Gemm whose weight the graph computes (Qwen's Conv3d kernel summed over time
    for a still image), which onnxruntime's quantizers cannot quantize."""
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in graph.node if (n.op_type == "MatMul" and not any(i in constants for i in n.input))
            or (n.op_type in ("Conv", "Gemm") and n.input[1] not in constants)]


def _kept_float(graph) -> list[str]:
    """Products that stay float whatever the scheme: Quant Experts' experts and router (the exporter records
    each node's module classes in its metadata)."""
    from vlmc.passes.quant.experts import ErrorExperts

    return [n.name for n in graph.node if n.op_type in OPS and any(
        p.key == "pkg.torch.onnx.class_hierarchy" and ErrorExperts.__name__ in p.value for p in n.metadata_props)]


def _nodes_of(graph, linears: list[str]) -> list[str]:
    """The weight products of the named linear modules (the exporter records each node's module path in
    its metadata); every linear must be found."""
    import ast

    found: dict[str, list[str]] = {name: [] for name in linears}
    for n in graph.node:
        if n.op_type not in OPS:
            continue
        scopes = next((ast.literal_eval(p.value) for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), [])
        module = scopes[-2] if len(scopes) >= 2 else ""
        for name in linears:
            if module == name or module.endswith("." + name):
                found[name].append(n.name)
    missing = [name for name, nodes in found.items() if not nodes]
    if missing:
        raise VlmcError(f"ONNX w4 quantization: no product of {', '.join(missing[:3])} found in the exported graph "
                        "(its 8-bit linears cannot be placed)")
    return [node for nodes in found.values() for node in nodes]


def quantize(path: Path, scheme, feeds: Iterable[dict[str, np.ndarray]] | None, eight_bit: list[str] = (),
             w8a8_activations: str = "uint8") -> dict:
    """Quantize `path` in place; return what the manifest records. `feeds` are the program's calibration
    inputs (needed by w8a8, whose activations are `w8a8_activations`); `eight_bit` the linears a w4 scheme
    gives 8 bits (QIG): their products are quantized as w8 (dynamic int8), every other weight product as w4."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    graph = onnx.load(str(path), load_external_data=False).graph  # the nodes only, to choose what stays float
    kept_float = _kept_float(graph)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        if scheme.name == "w8a8":
            quantize_static(str(path), tmp, _reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, op_types_to_quantize=OPS,
                            activation_type=QuantType.QUInt8 if w8a8_activations == "uint8" else QuantType.QInt8,
                            nodes_to_exclude=_activation_products(graph) + kept_float)
            form = "U8S8" if w8a8_activations == "uint8" else "S8S8"
            how = (f"onnxruntime quantize_static: QDQ, per-channel int8 weights, {w8a8_activations} inputs to the weight "
                   f"products ({form}, min-max over the calibration set); attention products stay float")
        elif scheme.name == "w8":
            quantize_dynamic(str(path), tmp, per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=OPS,
                             nodes_to_exclude=_activation_products(graph) + kept_float)
            how = "onnxruntime quantize_dynamic: per-channel int8 weights, activations quantized per call (MatMulInteger)"
        else:
            promoted = _nodes_of(graph, list(eight_bit))
            q = MatMulNBitsQuantizer(onnx.load(str(path)), block_size=scheme.config.group_size, is_symmetric=True,
                                     nodes_to_exclude=kept_float + promoted)
            q.process()
            onnx.save(q.model.model, tmp)
            how = f"onnxruntime MatMulNBits: symmetric 4-bit weights in groups of {scheme.config.group_size}, float activations"
            if promoted:
                os.replace(tmp, path)
                quantize_dynamic(str(path), tmp, per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=OPS,
                                 nodes_to_quantize=promoted)
                how += (f"; the {len(eight_bit)} linears QIG gives 8 bits: quantize_dynamic, per-channel int8 weights, "
                        "activations quantized per call (MatMulInteger)")
        os.replace(tmp, path)
    except VlmcError:
        raise
    except Exception as e:  # onnxruntime.quantization raises many types
        raise VlmcError(f"ONNX {scheme.name} quantization of {path.stem} failed: {first_line(e)}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    ops: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "MatMulInteger", "DynamicQuantizeLinear", "MatMulNBits"):
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    activations = {"w8a8": f"static {w8a8_activations}", "w8": "dynamic int8"}.get(scheme.name, "float")
    if eight_bit:
        activations = "float (4-bit linears), dynamic int8 (8-bit linears)"
    record = {"how": how, "activations": activations, "quantized_ops": ops}
    if eight_bit:
        record["eight_bit_linears"] = list(eight_bit)
    if kept_float:
        record["kept_float"] = f"{len(kept_float)} Quant Experts products (float by design)"
    return record
