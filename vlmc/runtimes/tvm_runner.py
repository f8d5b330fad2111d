"""TVM: each program's compiled library on Relax's virtual machine, here or on a TVM RPC server.

A session runs the library built for the machine it runs on: this machine's architecture locally, the
remote's over RPC (the library is uploaded to the server and loaded there).
"""
from __future__ import annotations

import os
import platform
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from vlmc.errors import VlmcError, first_line
from vlmc.runtimes.base import DecoderShape, StaticCacheSession


def host_architecture() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def physical_cores() -> int:
    """The cores this process may run on, the hyperthreads of one core counted once (Linux's topology files;
    elsewhere the logical CPUs)."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # macOS
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(len(cores), 1)


def size_thread_pool(shares_cpu: bool = False) -> None:
    """TVM sizes its thread pool when it first runs a kernel: to TVM_NUM_THREADS or OMP_NUM_THREADS where set,
    else to the logical CPUs, halved on x86 for the hyperthreads it assumes. On a host with one thread per core
    (most cloud VMs, this one) that ran every kernel on half the cores (the built-in vision encoder 4.1 ms, on
    both cores 2.2 ms): size it to the physical cores unless the user chose. `shares_cpu`: its workers sleep
    between kernels instead of spinning (eval runs PyTorch between the calls)."""
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(physical_cores())
    if shares_cpu:
        os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")


def load_runtime_extras() -> None:
    """A library calls some kernels by name from TVM's runtime_extra library (`tvm.contrib.sort.topk`: the top-k
    of a token pass's selection). TVM loads that library only with its compiler; a runtime-only TVM (a
    board's, the qemu user space's: TVM_USE_RUNTIME_LIB=1) is given it here, where it is installed."""
    import tvm

    if not tvm.base._RUNTIME_ONLY or "tvm_runtime_extra" in tvm.base._LOADED_LIBS:
        return
    from tvm_ffi.libinfo import load_lib_ctypes

    try:
        tvm.base._LOADED_LIBS["tvm_runtime_extra"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_extra", mode="RTLD_LOCAL",
            extra_lib_paths=[Path(tvm.base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent])
    except (OSError, RuntimeError):  # not installed: a library that calls into it says so when it loads
        pass


def pick_library(entry: dict, arch: str) -> str:
    """The program's library for `arch`, or a clear error naming what the bundle has."""
    libraries = entry.get("libraries", {})
    if arch not in libraries:
        raise VlmcError(f"this bundle's TVM libraries are built for {', '.join(libraries) or 'nothing'}, not {arch} "
                        f"(recipe field 'tvm.architectures')")
    return libraries[arch]


class TvmSession(StaticCacheSession):
    runtime = "tvm"
    pad_full_prompt_prefill = True  # its rows after an in-LLM drop must be a number for TVM's scheduler

    def __init__(self, files: dict[str, Path], shape: DecoderShape, remote=None, profile_ops: bool = False,
                 shares_cpu: bool = False):
        """`files`: program -> library path; `remote`: a TVM RPC session to upload them to and run them on."""
        super().__init__(shape)
        if remote is None:
            size_thread_pool(shares_cpu)
        import tvm
        from tvm.runtime.vm import VirtualMachine  # not tvm.relax: a runtime-only TVM (a board's, qemu's) has no compiler

        if remote is None:
            load_runtime_extras()

        self._tvm, self.remote, self.profile_ops = tvm, remote, profile_ops
        self.device = remote.cpu() if remote is not None else tvm.cpu()
        self.vms = {}
        for program, path in files.items():
            try:
                if remote is not None:
                    remote.upload(str(path))
                    lib = remote.load_module(Path(path).name)
                else:
                    lib = tvm.runtime.load_module(str(path))
                self.vms[program] = VirtualMachine(lib, self.device)
            except Exception as e:  # TVM's FFI raises its own error types
                raise VlmcError(f"TVM cannot load {Path(path).name}: {first_line(e)}") from None
            if profile_ops:
                if remote is not None:
                    raise VlmcError("per-op profiles of TVM run locally only (the VM's instrument hook is a local function)")
                self.vms[program].set_instrument(self._instrument(program))
        self._op_times: dict[tuple, list] = defaultdict(lambda: [0, 0.0])
        self._last_args: dict[str, list] = {}  # what each program last ran on, for time_programs
        self._zero_caches: Optional[list] = None
        self._inputs: dict[tuple, tuple] = {}  # (program, input index) -> (device tensor, numpy view or None, shape and dtype)

    def _instrument(self, program: str):
        """Times every kernel call of the VM (fused Relax ops lowered to one TIR function each)."""
        started = {}

        def instrument(func, symbol, before_run, ret_value, *args):
            if before_run:
                started[symbol] = time.perf_counter()
            else:
                totals = self._op_times[(program, symbol)]
                totals[0] += 1
                totals[1] += (time.perf_counter() - started.pop(symbol)) * 1000.0
            return 0  # VMInstrumentReturnKind.NO_OP: run the call as usual

        return instrument

    def _run(self, program: str, inputs: list) -> list:
        """The program's outputs as TVM tensors, left where they were computed (here or on the RPC server);
        numpy inputs are copied there first, tensors from an earlier call are passed as they are."""
        vm = self.vms[program]
        args = [self._device_input(program, i, a) if isinstance(a, np.ndarray) else a for i, a in enumerate(inputs)]
        self._last_args[program] = args
        # set_input / invoke_stateful / get_outputs: the one calling form whose tuples also come back over RPC
        vm.set_input("main", *args)
        try:
            vm.invoke_stateful("main")
        except Exception as e:  # TVM's FFI raises its own error types
            missing = re.search(r"Cannot find function (\S+)", str(e))
            if missing is None:
                raise
            raise VlmcError(f"{program} calls {missing.group(1)}, which this TVM runtime lacks (TVM's libtvm_runtime_extra "
                            "has it: a runtime-only TVM needs that library beside libtvm_runtime)") from None

        def flat(value):
            return [value] if hasattr(value, "numpy") else [a for v in value for a in flat(v)]

        return flat(vm.get_outputs("main"))

    def _device_input(self, program: str, index: int, value: np.ndarray):
        """A numpy input as a TVM tensor: each (program, input) keeps one tensor while its shape holds. Here the
        value is copied into its memory through a numpy view (0.4 us; making a tensor per call took 19 us: the
        built-in model's decode step ran 1.2x as long); on an RPC server it is copied over into the kept tensor
        (one round trip instead of an allocation and a copy)."""
        key, shape, dtype = (program, index), value.shape, value.dtype
        kept = self._inputs.get(key)
        if kept is None or kept[2] != (shape, dtype):
            tensor = self._tvm.runtime.empty(shape, str(dtype), self.device)
            kept = self._inputs[key] = (tensor, None if self.remote is not None else np.from_dlpack(tensor), (shape, dtype))
        if kept[1] is None:
            kept[0].copyfrom(np.ascontiguousarray(value))
        else:
            kept[1][...] = value
        return kept[0]

    def call(self, program, inputs):
        return [t.numpy() for t in self._run(program, inputs)]

    def _empty_caches(self) -> list:
        """Zero caches made on the device once and passed to every prefill (a program never writes its inputs):
        making them per prompt cost 0.2 of the built-in model's 3.6 ms prefill."""
        if self._zero_caches is None:
            self._zero_caches = [self._tvm.runtime.tensor(c, device=self.device) for c in self.shape.empty_caches()]
        return self._zero_caches

    def _decode(self, embeds, positions, logits_index) -> np.ndarray:
        """The KV caches stay TVM tensors on the device from step to step: copying them to numpy and back cost
        the built-in model's decode step 0.4 of its 0.9 ms (and over RPC, a round trip of every cache)."""
        pos = np.asarray(positions, np.int64)
        out = self._run("text_decoder", [embeds.astype(np.float32), pos[None], pos, np.asarray([logits_index], np.int64),
                                         *self.caches])
        self.caches = out[1:]
        return out[0].numpy()[0]

    def close(self) -> None:
        """Drop every handle on the libraries and the device: over RPC, this ends the session on the server."""
        import gc

        self.vms, self._last_args, self._zero_caches, self._inputs, self.remote, self.device = {}, {}, None, {}, None, None
        gc.collect()

    def time_programs(self, repeat: int) -> dict:
        """Each program timed where it runs (on the RPC server: no transfers) by TVM's time_evaluator,
        on the inputs it last ran with."""
        out = {}
        for program, args in self._last_args.items():
            timer = self.vms[program].time_evaluator("main", self.device, number=1, repeat=repeat, min_repeat_ms=0)
            ms = np.asarray(timer(*args).results) * 1000.0
            out[program] = {"p50_ms": round(float(np.percentile(ms, 50)), 4), "mean_ms": round(float(ms.mean()), 4),
                            "min_ms": round(float(ms.min()), 4), "repeats": len(ms)}
        return out

    def op_rows(self) -> list[dict]:
        """Per-kernel time recorded by the instrument hook, summed per (program, kernel)."""
        return [{"program": p, "op": op, "calls": n, "total_ms": round(ms, 4), "mean_ms": round(ms / n, 5)}
                for (p, op), (n, ms) in sorted(self._op_times.items(), key=lambda kv: -kv[1][1])]


def open_tvm(bundle, shape: DecoderShape, remote=None, arch: Optional[str] = None, profile_ops: bool = False,
             shares_cpu: bool = False) -> TvmSession:
    """A session over the bundle's libraries for `arch` (default: this machine's), hash-checked first."""
    arch = arch or host_architecture()
    files = {p: bundle.file(pick_library(e, arch)) for p, e in bundle.programs("tvm").items()}
    return TvmSession(files, shape, remote=remote, profile_ops=profile_ops, shares_cpu=shares_cpu)
