"""ONNX target: one .onnx per program through torch.onnx's dynamo exporter.

The text decoder takes its KV cache as explicit inputs/outputs and a bounded-dynamic length
(1..max_prompt), so one graph serves both the prefill (at the prompt's length) and the decode step
without a second copy of the weights.
"""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import torch

from vlmc.errors import VlmcError, first_line
from vlmc.exporter.context import ExportContext, io_entry

EXTERNAL_DATA_BYTES = 1_500_000_000  # protobuf caps one file at 2 GB


def read_io(path: Path) -> dict:
    """Input/output names, shapes (symbolic dims by name) and dtypes as the .onnx file states them."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(path), load_external_data=False).graph

    def entries(values):
        out = []
        for v in values:
            tt = v.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in tt.shape.dim]
            out.append(io_entry(v.name, shape, str(helper.tensor_dtype_to_np_dtype(tt.elem_type))))
        return out

    return {"inputs": entries(graph.input), "outputs": entries(graph.output)}


def _dims(spec) -> list:
    """The Dim objects of a dynamic_shapes structure."""
    if isinstance(spec, dict):
        return list(spec.values())
    if isinstance(spec, (list, tuple)):
        return [d for item in spec for d in _dims(item)]
    return []


def name_dynamic_dims(path: Path, dynamic_shapes) -> None:
    """torch.onnx names a length that several inputs share after its internal symbol (`s29`); a program
    with one dynamic length gets its Dim's name (`seq_len`, `prompt_len`) instead, in the file itself."""
    import onnx

    names = {d.__name__ for d in _dims(dynamic_shapes)}
    if len(names) != 1:
        return
    name = names.pop()
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    changed = False
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param and re.fullmatch(r"s\d+", d.dim_param):
                d.dim_param, changed = name, True
    if changed:
        onnx.save(model, str(path))  # weights in an external .data file stay where they are


def _export(module, args, path: Path, dynamic_shapes, input_names, output_names, opset: int) -> None:
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_BYTES
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        try:
            torch.onnx.export(module.eval(), args, str(path), dynamo=True, dynamic_shapes=dynamic_shapes, input_names=input_names,
                              output_names=output_names, opset_version=opset, optimize=True,
                              external_data=big, verbose=False)
        except Exception as e:  # the exporter raises many types; the first line names the failing op
            raise VlmcError(f"ONNX export of {path.stem} failed: {first_line(e)}") from None


def _quantize(ctx: ExportContext, job, path: Path, scheme) -> dict:
    from vlmc.passes.quant import onnx_quant

    ctx.progress(f"onnx: {scheme.name} quantization of {job.name} (onnxruntime.quantization)")
    feeds = None
    if scheme.needs_calibration:
        cal = ctx.calibration()
        if job.name == "vision_encoder":
            feeds = [{job.input_names[0]: img} for img in cal.images]
        else:
            recorded = cal.static_prefill_inputs if job.name == "text_prefill" else cal.static_decoder_inputs
            feeds = [dict(zip(job.input_names, inputs)) for inputs in recorded]
    return {**scheme.describe("onnx"), **onnx_quant.quantize(path, scheme, feeds, ctx.promoted(job.name))}


def lower(ctx: ExportContext) -> dict:
    r = ctx.recipe
    programs = {}
    for job in ctx.explicit_cache_programs("onnx", "chw_uint8"):
        name = job.name
        ctx.progress(f"onnx: exporting {name}")
        path = ctx.out_dir / f"{name}.onnx"
        _export(job.module, job.args, path, job.dynamic_shapes, job.input_names, job.output_names, r.onnx.opset)
        scheme = ctx.scheme(name)
        quantized = _quantize(ctx, job, path, scheme) if scheme else None
        name_dynamic_dims(path, job.dynamic_shapes)
        files = [path.name] + ([path.name + ".data"] if (ctx.out_dir / (path.name + ".data")).exists() else [])
        programs[name] = {"file": path.name, "files": files, **read_io(path)}
        if quantized:
            programs[name]["quantization"] = quantized
    return {"programs": programs, "runtime": "onnxruntime", "opset": r.onnx.opset,
            "kv_cache": "explicit inputs/outputs [1, kv_heads, max_context, head_dim]",
            "prefill": f"at the prompt's length (1..max_prompt={r.max_prompt}); logits_index picks the last token"}
