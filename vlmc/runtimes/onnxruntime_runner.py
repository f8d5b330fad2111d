"""onnxruntime: one InferenceSession per program of a bundle's ONNX target."""
from __future__ import annotations

import json
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from vlmc.errors import VlmcError, first_line
from vlmc.runtimes.base import DecoderShape, StaticCacheSession


ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(uint8)": "uint8", "tensor(int8)": "int8",
             "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(bool)": "bool"}


def check_inputs(program: str, session, expected: list[dict]) -> None:
    """The loaded graph takes the inputs the manifest says (a swapped or edited file is named here, not by
    onnxruntime's raw text at the first call): each listed name, its element type, its fixed dimensions."""
    found = {i.name: i for i in session.get_inputs()}
    for entry in expected:
        got = found.get(entry["name"])
        if got is None:
            raise VlmcError(f"{program}: the ONNX graph has no input {entry['name']!r} (it takes {', '.join(found) or 'nothing'}); "
                            "the file does not match the manifest")
        dtype = ORT_TYPES.get(got.type, got.type)
        if dtype != entry["dtype"]:
            raise VlmcError(f"{program}: input {entry['name']!r} is {dtype} in the ONNX graph, {entry['dtype']} in the manifest")
        fixed = [(a, b) for a, b in zip(got.shape, entry["shape"]) if isinstance(a, int) and isinstance(b, int)]
        if len(got.shape) != len(entry["shape"]) or any(a != b for a, b in fixed):
            raise VlmcError(f"{program}: input {entry['name']!r} has shape {list(got.shape)} in the ONNX graph, "
                            f"{entry['shape']} in the manifest")


def share_one_thread_pool() -> None:
    """Make the sessions this process opens from now on (`pooled=True`) share onnxruntime's global thread
    pool; call before the first session. Many sessions open at once (interleaved timing) would otherwise
    each keep a pool whose workers spin after every call and take the cores from the session that runs
    next; with one pool the workers spin, as in an app with one model, and nothing competes with them."""
    from onnxruntime.capi import _pybind_state

    _pybind_state.set_global_thread_pool_sizes(0, 0)  # onnxruntime's default sizes


class OnnxSession(StaticCacheSession):
    runtime = "onnxruntime"

    def __init__(self, files: dict[str, Path], shape: DecoderShape, profile_ops: bool = False, threads: int = 0,
                 expected_inputs: dict[str, list[dict]] | None = None, spin: bool = True, pooled: bool = False,
                 in_place: frozenset = frozenset()):
        super().__init__(shape)
        import onnxruntime as ort

        self.sessions = {}
        # profiler traces go to a folder of their own, never into the bundle (which may be read-only)
        self.trace_dir = tempfile.mkdtemp(prefix="vlmc-ortprofile-") if profile_ops else None
        for program, path in files.items():
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            if pooled:  # the process's global pool (`share_one_thread_pool`)
                opts.use_per_session_threads = False
            elif threads:
                opts.intra_op_num_threads = threads
            if not spin:  # its idle workers would busy-wait while torch (the eval's reference) runs on the same cores
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if profile_ops:
                opts.enable_profiling = True
                opts.profile_file_prefix = str(Path(self.trace_dir) / program)
            try:
                self.sessions[program] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
                raise VlmcError(f"onnxruntime cannot load {path}: {first_line(e)}") from None
            check_inputs(program, self.sessions[program], (expected_inputs or {}).get(program, []))
        self.input_names = {p: [i.name for i in s.get_inputs()] for p, s in self.sessions.items()}
        # caches the decoder scatters into, read by nothing else (the manifest's `in_place_caches`, checked in
        # the graph at export): bound as their own outputs, a call writes only its rows
        self.in_place = set(in_place) & set(self.input_names.get("text_decoder", []))

    def _decode(self, embeds, positions, logits_index) -> np.ndarray:
        """The decoder call with each in-place cache bound as its own output: the session's cache arrays are
        updated where they are (the others come back as new arrays, as from `call`)."""
        if not self.in_place:
            return super()._decode(embeds, positions, logits_index)
        import onnxruntime as ort

        session = self.sessions["text_decoder"]
        names = self.input_names["text_decoder"]
        pos = np.asarray(positions, np.int64)
        binding = session.io_binding()
        for name, value in zip(names, (np.ascontiguousarray(embeds, np.float32), pos[None], pos, np.asarray([logits_index], np.int64))):
            binding.bind_cpu_input(name, value)
        binding.bind_output("logits")
        self.caches = [np.require(c, requirements=["C", "W"]) if n in self.in_place else c for n, c in zip(names[4:], self.caches)]
        for name, cache in zip(names[4:], self.caches):
            if name in self.in_place:
                shared = ort.OrtValue.ortvalue_from_numpy(cache)  # wraps the array's memory
                binding.bind_ortvalue_input(name, shared)
                binding.bind_ortvalue_output(name + "_out", shared)
            else:
                binding.bind_cpu_input(name, cache)
                binding.bind_output(name + "_out")
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()  # in the order bound: logits, then every cache
        self.caches = [cache if name in self.in_place else value.numpy()
                       for name, cache, value in zip(names[4:], self.caches, outputs[1:])]
        return outputs[0].numpy()[0]

    def call(self, program, inputs):
        names = self.input_names[program]
        return self.sessions[program].run(None, dict(zip(names, inputs)))

    def op_rows(self) -> list[dict]:
        """Per-op time from onnxruntime's profiler, summed per (program, op type)."""
        totals: dict[tuple, list] = defaultdict(lambda: [0, 0.0])
        for program, sess in self.sessions.items():
            trace = sess.end_profiling()
            events = json.loads(Path(trace).read_text())
            Path(trace).unlink(missing_ok=True)
            for ev in events:
                if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
                    key = (program, ev.get("args", {}).get("op_name", "?"))
                    totals[key][0] += 1
                    totals[key][1] += ev.get("dur", 0) / 1000.0
        shutil.rmtree(self.trace_dir, ignore_errors=True)
        return [{"program": p, "op": op, "calls": n, "total_ms": round(ms, 4), "mean_ms": round(ms / n, 5)}
                for (p, op), (n, ms) in sorted(totals.items(), key=lambda kv: -kv[1][1])]
