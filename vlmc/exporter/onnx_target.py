"""ONNX target: one .onnx per program through torch.onnx's dynamo exporter.

The text decoder takes its KV cache as explicit inputs/outputs and a bounded-dynamic length
(1..max_prompt), so one graph serves both the prefill (at the prompt's length) and the decode step
without a second copy of the weights. The programs' weights live in one external data file, each distinct
tensor once: a bundle whose prefill is its own program (in-LLM token stages) and a tied embedding table
(token_embedding's gather, the LM head) would otherwise ship the same tensors in two models.
"""
from __future__ import annotations

import contextlib
import io
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from vlmc.errors import VlmcError, first_line
from vlmc.exporter.context import ExportContext, io_entry

WEIGHTS_FILE = "onnx_weights.data"
INLINE_BYTES = 1024  # smaller tensors (shapes, scalars, scales) stay in the graph


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
    """Weights go to `path`.data as the exporter writes them (share_weights regroups them): an inline
    file is serialised in memory first, and every later read of the graph would load them too (a 220M
    model's export peaked 0.6 GB higher)."""
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        try:
            torch.onnx.export(module.eval(), args, str(path), dynamo=True, dynamic_shapes=dynamic_shapes, input_names=input_names,
                              output_names=output_names, opset_version=opset, optimize=True,
                              external_data=True, verbose=False)
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
        else:  # one call's inputs at a time: onnxruntime's calibration reads each feed once
            feeds = (dict(zip(job.input_names, inputs)) for inputs in cal.static_inputs(job.name))
    return {**scheme.describe("onnx"), **onnx_quant.quantize(path, scheme, feeds, ctx.promoted(job.name),
                                                                    ctx.recipe.onnx.w8a8_activations)}


def _aligned(f, size: int) -> int:
    """Pad the file so the next tensor starts where onnxruntime can map it (64 KiB for large tensors)."""
    align = 65536 if size >= 1 << 20 else 64
    f.write(b"\0" * (-f.tell() % align))
    return f.tell()


def share_weights(out_dir: Path, programs: dict) -> dict:
    """Move every program's initializers of INLINE_BYTES or more into WEIGHTS_FILE, each distinct tensor (by
    dtype and bytes) written once. A matrix stored transposed elsewhere (the exporter folds a tied LM head's
    transpose into its weight) is read through a Transpose node, which onnxruntime folds when it loads the
    graph. Each program entry gets its `files`, the bytes it references (`weight_bytes`) and how many of
    those another program references too (`shared_bytes`). One tensor at a time is in memory."""
    import hashlib

    import onnx
    from onnx import helper, numpy_helper

    offsets: dict[tuple, tuple[int, int]] = {}
    users: dict[tuple, set] = {}

    def key_of(array):  # (key, the contiguous array whose bytes are written): no bytes copy of a large table
        raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)  # any dtype (bfloat16 too) as its bytes
        return (str(array.dtype), raw.nbytes, hashlib.sha256(raw).digest()), raw

    tmp = out_dir / (WEIGHTS_FILE + ".tmp")
    with open(tmp, "wb") as f:
        for name, entry in programs.items():
            model = onnx.load(str(out_dir / entry["file"]), load_external_data=False)
            transposes = []
            for tensor in model.graph.initializer:
                array = numpy_helper.to_array(tensor, base_dir=str(out_dir))  # one tensor's bytes at a time
                if array.nbytes < INLINE_BYTES:
                    if tensor.data_location == onnx.TensorProto.EXTERNAL:  # back into the graph: its .data file goes
                        tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
                    continue
                key, raw = key_of(array)
                if key not in offsets and array.ndim == 2:
                    flipped, flipped_raw = key_of(array.T)
                    if flipped in offsets:
                        transposes.append(helper.make_node("Transpose", [tensor.name + ".T"], [tensor.name], perm=[1, 0]))
                        key, raw, array = flipped, flipped_raw, array.T
                        tensor.name = tensor.name + ".T"
                if key not in offsets:
                    offsets[key] = (_aligned(f, raw.nbytes), raw.nbytes)
                    f.write(raw)
                users.setdefault(key, set()).add(name)
                tensor_name, data_type = tensor.name, tensor.data_type
                tensor.Clear()
                tensor.name, tensor.data_type, tensor.data_location = tensor_name, data_type, onnx.TensorProto.EXTERNAL
                tensor.dims.extend(array.shape)
                for field, value in zip(("location", "offset", "length"), (WEIGHTS_FILE, *offsets[key])):
                    tensor.external_data.add(key=field, value=str(value))
            for node in reversed(transposes):
                model.graph.node.insert(0, node)
            for old in entry["files"][1:]:
                (out_dir / old).unlink()
            onnx.save(model, str(out_dir / entry["file"]))
            del model
    tmp.replace(out_dir / WEIGHTS_FILE)
    for name, entry in programs.items():
        mine = [k for k, u in users.items() if name in u]
        entry.update(files=[entry["file"], WEIGHTS_FILE], weight_bytes=sum(offsets[k][1] for k in mine),
                     shared_bytes=sum(offsets[k][1] for k in mine if len(users[k]) > 1))
    referenced = sum(offsets[k][1] * len(u) for k, u in users.items())
    stored = sum(length for _, length in offsets.values())
    return {"file": WEIGHTS_FILE, "tensor_bytes": stored, "saved_bytes": referenced - stored}


def caches_written_in_place(path: Path) -> list[str]:
    """The cache inputs of a decoder graph that may share one buffer with their output: the output is a
    ScatterND straight from the input, and nothing else reads the input (so no node can see it after the
    scatter wrote into it). Bound so by the session (the manifest's `in_place_caches`), onnxruntime's
    ScatterND writes only the call's rows instead of copying the whole cache into a new output first."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    readers: dict[str, int] = defaultdict(int)
    for node in graph.node:
        for name in node.input:
            readers[name] += 1
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    return sorted(node.input[0] for node in graph.node
                  if node.op_type == "ScatterND" and node.input[0] in inputs and readers[node.input[0]] == 1
                  and node.output[0] == node.input[0] + "_out" and node.output[0] in outputs)


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
    weights = share_weights(ctx.out_dir, programs)
    programs["text_decoder"]["in_place_caches"] = caches_written_in_place(ctx.out_dir / programs["text_decoder"]["file"])
    return {"programs": programs, "runtime": "onnxruntime", "opset": r.onnx.opset, "weights": weights,
            "kv_cache": "explicit inputs/outputs [1, kv_heads, max_context, head_dim]",
            "prefill": f"at the prompt's length (1..max_prompt={r.max_prompt}); logits_index picks the last token"}
