"""Core ML target: one .mlpackage (mlprogram) per program through coremltools' torch.export frontend.

Conversion and a structural check run on Linux; running a Core ML model needs macOS. Core ML has no
uint8 tensor inputs, so its vision_encoder takes float [1,3,H,W] in 0..255; int64 ids and positions
become int32, as Core ML stores them.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import uuid
from collections import Counter
from pathlib import Path

import torch
from torch.export import export

from vlmc.errors import VlmcError, first_line
from vlmc.exporter.context import ExportContext, io_entry
from vlmc.models_zoo.programs import StaticCacheDecoder
from vlmc.passes.quant import coreml_quant

_DTYPES = {65568: "float32", 65552: "float16", 131104: "int32", 131080: "int8"}


def read_io(spec) -> dict:
    def entries(features):
        out = []
        for f in features:
            a = f.type.multiArrayType
            ranges = list(a.shapeRange.sizeRanges)
            shape = [f"{r.lowerBound}..{r.upperBound}" if r.lowerBound != r.upperBound else r.lowerBound for r in ranges] or list(a.shape)
            out.append(io_entry(f.name, shape, _DTYPES.get(a.dataType, str(a.dataType))))
        return out

    return {"inputs": entries(spec.description.input), "outputs": entries(spec.description.output)}


def op_counts(spec) -> dict[str, int]:
    main = spec.mlProgram.functions["main"]
    block = main.block_specializations[main.opset]
    return dict(Counter(op.type for op in block.operations))


class _PositionalCaches(torch.nn.Module):
    """The decoder with caches as trailing positional args: coremltools' torch.export frontend trips
    over a list input (a `_guards_fn` node), the ONNX exporter over nested *args shapes."""

    def __init__(self, decoder: StaticCacheDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, inputs_embeds, position_ids, cache_position, logits_index, *caches):
        return self.decoder(inputs_embeds, position_ids, cache_position, logits_index, list(caches))


@contextlib.contextmanager
def _no_guards_fn():
    """`run_decompositions` re-traces the exported graph through `ep.module()`, whose generated
    shape-guard submodule fails on this dynamic-length program; torch already skips it for
    ExecuTorch's callers, and coremltools needs the decomposed graph."""
    import torch.export._unlift as unlift

    original = unlift._ok_to_generate_guards_fn
    unlift._ok_to_generate_guards_fn = lambda: False
    try:
        yield
    finally:
        unlift._ok_to_generate_guards_fn = original


INT8_IO_TARGETS = ("iOS26", "macOS26")


def check_kv_cache(kv_cache: str, minimum_deployment_target: str) -> None:
    """An int8 KV cache is the decoder's inputs and outputs: Core ML takes int8 ones from iOS26 / macOS26."""
    if kv_cache == "int8" and minimum_deployment_target not in INT8_IO_TARGETS:
        raise VlmcError(f"pass kv8: Core ML takes int8 model inputs and outputs (the cache) from "
                        f"coreml.minimum_deployment_target iOS26 / macOS26 (the recipe has {minimum_deployment_target})")


@contextlib.contextmanager
def _int8_inputs():
    """coremltools' torch.export frontend has no entry for int8 program inputs in its dtype table, though
    MIL takes them from iOS26: add it for the conversion."""
    from coremltools.converters.mil.frontend.torch import exir_utils
    from coremltools.converters.mil.mil import types

    table = exir_utils.TORCH_DTYPE_TO_MIL_DTYPE
    had = torch.int8 in table
    table.setdefault(torch.int8, types.int8)
    try:
        yield
    finally:
        if not had:
            del table[torch.int8]


def _convert(module, args, dynamic_shapes, input_names, output_names, recipe):
    import coremltools as ct

    with torch.no_grad(), _no_guards_fn():
        ep = export(module.eval(), args, dynamic_shapes=dynamic_shapes, strict=False).run_decompositions({})
    precision = ct.precision.FLOAT16 if recipe.coreml.precision == "fp16" else ct.precision.FLOAT32
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with contextlib.redirect_stderr(io.StringIO()), _no_guards_fn(), _int8_inputs():
        ml = ct.convert(ep, convert_to="mlprogram", compute_precision=precision, skip_model_load=True,
                        minimum_deployment_target=getattr(ct.target, recipe.coreml.minimum_deployment_target))
    spec = ml.get_spec()
    for feature, name in zip(list(spec.description.input), input_names):
        ct.utils.rename_feature(spec, feature.name, name, rename_outputs=False)
    for feature, name in zip(list(spec.description.output), output_names):
        ct.utils.rename_feature(spec, feature.name, name, rename_inputs=False)
    return ct.models.MLModel(spec, weights_dir=ml.weights_dir, skip_model_load=True)


def _samples(ctx: ExportContext, job) -> list[dict] | None:
    """Calibration inputs in Core ML's dtypes (float images, int32 ids); only macOS can run them."""
    import platform

    import numpy as np

    if platform.system() != "Darwin":
        return None
    cal = ctx.calibration()
    if job.name == "vision_encoder":
        return [{job.input_names[0]: img.astype(np.float32)[None]} for img in cal.images]
    return [{k: v.astype(np.int32) if v.dtype == np.int64 else v for k, v in zip(job.input_names, inputs)}
            for inputs in cal.static_inputs(job.name)]


CONVERSION_DATE = "com.github.apple.coremltools.conversion_date"


def make_reproducible(package: Path) -> None:
    """Same recipe, same bytes: coremltools writes random item ids into the package's Manifest.json, the
    day of the conversion into the model's metadata and the metadata map in no fixed order. The ids become
    name-based UUIDs of each item's path, the date goes (the bundle's manifest says when it was made), and
    the spec is serialized deterministically."""
    from coremltools.proto import Model_pb2

    manifest = json.loads((package / "Manifest.json").read_text())
    ids = {old: str(uuid.uuid5(uuid.NAMESPACE_URL, entry["path"])) for old, entry in manifest["itemInfoEntries"].items()}
    root = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]
    spec_path = package / "Data" / root["path"]
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    spec.description.metadata.userDefined.pop(CONVERSION_DATE, None)
    spec_path.write_bytes(spec.SerializeToString(deterministic=True))
    manifest["itemInfoEntries"] = {ids[k]: v for k, v in manifest["itemInfoEntries"].items()}
    manifest["rootModelIdentifier"] = ids[manifest["rootModelIdentifier"]]
    (package / "Manifest.json").write_text(json.dumps(manifest, indent=4, sort_keys=True))


def lower(ctx: ExportContext) -> dict:
    r = ctx.recipe
    programs = {}
    for job in ctx.explicit_cache_programs("coreml", "nchw_float"):
        name, module, args, dyn = job.name, job.module, job.args, job.dynamic_shapes
        if name == "text_decoder":  # caches as trailing positional args (see _PositionalCaches)
            module, args, dyn = _PositionalCaches(module), (*args[:4], *args[4]), (*dyn[:4], (None,) * len(args[4]))
        ctx.progress(f"coreml: converting {name}")
        try:
            ml = _convert(module, args, dyn, job.input_names, job.output_names, r)
        except VlmcError:
            raise
        except Exception as e:  # coremltools raises ValueError/NotImplementedError/RuntimeError per op
            raise VlmcError(f"Core ML conversion of {name} failed: {first_line(e)}") from None
        scheme = ctx.scheme(name)
        quantized = None
        if scheme:
            ctx.progress(f"coreml: {scheme.name} quantization of {name} (coremltools.optimize)")
            ml, record = coreml_quant.quantize(ml, scheme, _samples(ctx, job) if scheme.needs_calibration else None,
                                               ctx.promoted(name))
            quantized = {**scheme.describe("coreml"), **record}
        path = ctx.out_dir / f"{name}.mlpackage"
        ml.save(str(path))
        make_reproducible(path)
        spec = ml.get_spec()
        programs[name] = {"file": path.name, **read_io(spec), "ops": op_counts(spec)}
        if quantized:
            programs[name]["quantization"] = quantized
    return {"programs": programs, "runtime": "coreml", "precision": r.coreml.precision,
            "minimum_deployment_target": r.coreml.minimum_deployment_target, "runs_here": False,
            "note": "converted and structurally checked on Linux; Core ML runs only on macOS",
            "kv_cache": "explicit inputs/outputs [1, kv_heads, max_context, head_dim]"}
