"""Runtimes: load a bundle's artifacts on one runtime and run or profile them.

Runtimes read bundles and never import the exporter.
"""
from __future__ import annotations

from vlmc.bundle import Bundle
from vlmc.errors import VlmcError
from vlmc.runtimes.base import DecoderShape, Session

# runtime -> the bundle target whose artifacts it runs (eager runs the PyTorch model itself)
RUNTIME_TARGETS = {"onnxruntime": "onnx", "executorch": "executorch", "coreml": "coreml", "tvm": "tvm", "eager": None}


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIME_TARGETS:
        raise VlmcError(f"unknown runtime {runtime!r} (choose from {', '.join(RUNTIME_TARGETS)})")


def open_session(bundle: Bundle, runtime: str, profile_ops: bool = False, shares_cpu: bool = False,
                 pooled: bool = False) -> Session:
    """A session of `bundle` on `runtime`, every artifact hash-checked before it is loaded. `shares_cpu`: it
    takes turns with PyTorch in one process (eval), so its thread pool must not spin between calls.
    `pooled` (onnxruntime): it takes turns with other sessions in one process and shares their thread pool
    (the process called `share_one_thread_pool` first)."""
    check_runtime(runtime)
    shape = DecoderShape.from_manifest(bundle.manifest)
    target = RUNTIME_TARGETS[runtime]
    if runtime == "eager":
        raise VlmcError("the eager runtime rebuilds the model with its passes: use vlmc.api (vlmc run / eval)")
    if runtime == "coreml":
        from vlmc.runtimes.coreml_runner import require_macos

        require_macos()
    programs = bundle.programs(target)
    if runtime == "onnxruntime":
        from vlmc.runtimes.onnxruntime_runner import OnnxSession

        files = {}
        for p, e in programs.items():
            for f in e.get("files", [e["file"]]):
                bundle.file(f)
            files[p] = bundle.file(e["file"])
        return OnnxSession(files, shape, profile_ops=profile_ops,
                           expected_inputs={p: e.get("inputs", []) for p, e in programs.items()}, spin=not shares_cpu,
                           pooled=pooled, in_place=frozenset(programs["text_decoder"].get("in_place_caches", [])))
    if runtime == "tvm":
        from vlmc.runtimes.tvm_runner import open_tvm

        return open_tvm(bundle, shape, profile_ops=profile_ops, shares_cpu=shares_cpu)
    if runtime == "executorch":
        from vlmc.runtimes.executorch_runner import ExecuTorchSession

        return ExecuTorchSession(bundle.file(programs["text_decoder"]["file"]), shape, profile_ops=profile_ops)
    from vlmc.runtimes.coreml_runner import CoremlSession

    return CoremlSession({p: bundle.file(e["file"]) for p, e in programs.items()}, programs, shape)
