"""ExecuTorch: the bundle's .pte loaded in-process with ExecuTorch's Python runtime.

In-process on purpose: the ExecuTorch runtime hangs in a fork()ed child, so profiling uses a spawned
process, never a forked one.
"""
from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from vlmc.errors import VlmcError, first_line
from vlmc.runtimes.base import DecoderShape, Session

METHODS = ("vision_encoder", "token_embedding", "text_decoder")
MIN_PREFILL_ROWS = 2  # text_prefill's shortest prompt without in-LLM stages (torch.export takes no dynamic 1)


class ExecuTorchSession(Session):
    runtime = "executorch"

    def __init__(self, pte: Path, shape: DecoderShape, profile_ops: bool = False, methods: tuple[str, ...] | None = None):
        """`methods`: the methods to load (default: all the program's, text_prefill where it has one). XNNPACK
        packs a method's weights when it is loaded, and the program keeps every loaded method until it is
        freed itself."""
        super().__init__(shape)
        import torch
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers the llama:: kernels)
        from executorch.runtime import Runtime

        self._torch = torch
        try:
            self.program = Runtime.get().load_program(str(pte), enable_etdump=profile_ops, debug_buffer_size=0)
            if methods is None:
                methods = METHODS + (("text_prefill",) if "text_prefill" in self.program.method_names else ())
            self.methods = {m: self.program.load_method(m) for m in methods}
        except Exception as e:  # the pybindings raise RuntimeError with the runtime's error code
            raise VlmcError(f"ExecuTorch cannot load {pte}: {first_line(e)}") from None

    def call(self, program, inputs):
        args = [self._torch.from_numpy(np.ascontiguousarray(a)) for a in inputs]
        return [o.numpy().copy() for o in self.methods[program].execute(args)]

    def prefill_program(self, rows: int) -> str:
        """Where a prompt of `rows` is prefilled: text_prefill where the program has it (attention inside
        XNNPACK; in-LLM stages need it), else text_decoder from slot 0, as ExecuTorch's MultimodalRunner does."""
        if self.shape.full_prompt_prefill or ("text_prefill" in self.methods and rows >= MIN_PREFILL_ROWS):
            return "text_prefill"
        return "text_decoder"

    def prefill(self, embeds, image_start=None):
        self.check_prompt_length(embeds.shape[1])
        if self.prefill_program(embeds.shape[1]) == "text_decoder":
            return self.call("text_decoder", [embeds.astype(np.float32), np.asarray([0], np.int64)])[0][0]
        # image_start: read by in-LLM stages only
        start = self._image_start(image_start) if self.shape.full_prompt_prefill else np.asarray([image_start or 0], np.int64)
        return self.call("text_prefill", [embeds.astype(np.float32), start])[0][0]

    def step(self, embeds, pos):
        if pos >= self.shape.max_context:
            raise VlmcError(f"sequence reached the bundle's max_context of {self.shape.max_context}")
        return self.call("text_decoder", [embeds.astype(np.float32), np.asarray([pos], np.int64)])[0][0]

    def op_rows(self) -> list[dict]:
        """Per-op (and per-delegate) time from ETDump, read back with ExecuTorch's Inspector."""
        from executorch.devtools import Inspector

        with tempfile.TemporaryDirectory() as d:
            etdump = Path(d) / "run.etdp"
            self.program.write_etdump_result_to_file(str(etdump), str(Path(d) / "debug.bin"))
            inspector = Inspector(etdump_path=str(etdump))
            totals: dict[tuple, list] = defaultdict(lambda: [0, 0.0])
            for block in inspector.event_blocks:
                for ev in block.events:
                    if not ev.perf_data or ev.name in ("Method::execute", "Program::load_method", "Method::init"):
                        continue
                    times = ev.perf_data.raw  # milliseconds, one per run
                    key = (block.name, ev.name)
                    totals[key][0] += len(times)
                    totals[key][1] += float(sum(times))
        return [{"program": p, "op": op, "calls": n, "total_ms": round(ms, 4), "mean_ms": round(ms / n, 5)}
                for (p, op), (n, ms) in sorted(totals.items(), key=lambda kv: -kv[1][1])]


def method_bytes(pte: Path) -> dict[str, dict[str, int]]:
    """Each method's own bytes in a .pte: {method: {"bytes", "shared_bytes"}}. A method owns its delegate
    payloads, the named weights those payloads reference (XNNPACK keeps weights in the program's named
    data, keyed by a hash the payload names) and its constant tensors; `shared_bytes` is the part of it
    another method references too (text_prefill and text_decoder share the decoder's weights)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte_file = deserialize_pte_binary(Path(pte).read_bytes())
    program, named = pte_file.program, pte_file.named_data
    named_sizes = {key: len(named.buffers[entry.buffer_index]) for key, entry in (named.pte_data if named else {}).items()}
    uses: dict[str, set] = {}
    for plan in program.execution_plan:
        owned = set()
        for delegate in plan.delegates:
            blob = program.backend_delegate_data[delegate.processed.index].data
            owned.add(("delegate", delegate.processed.index, len(blob)))
            owned |= {("named", key, size) for key, size in named_sizes.items() if key.encode() in blob}
        for value in plan.values:
            index = getattr(value.val, "data_buffer_idx", 0)
            if index:  # 0 is the empty buffer: a tensor without constant data
                owned.add(("constant", index, len(program.constant_buffer[index].storage)))
        uses[plan.name] = owned
    out = {}
    for name, owned in uses.items():
        others = set().union(*(o for n, o in uses.items() if n != name))
        out[name] = {"bytes": sum(item[2] for item in owned), "shared_bytes": sum(item[2] for item in owned & others)}
    return out
