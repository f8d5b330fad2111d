"""Core ML: .mlpackage programs through coremltools' predict, which needs macOS.

On Linux the Core ML framework does not exist: a bundle's Core ML artifacts are converted and
structurally checked here, and must be run on a Mac.
"""
from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from vlmc.errors import VlmcError
from vlmc.runtimes.base import DecoderShape, StaticCacheSession

NEEDS_MACOS = "Core ML models run only on macOS; this machine is {}: copy the bundle to a Mac to run or profile it there"


def require_macos() -> None:
    if platform.system() != "Darwin":
        raise VlmcError(NEEDS_MACOS.format(platform.system()))


class CoremlSession(StaticCacheSession):
    runtime = "coreml"
    pad_prefill = True  # one static prefill shape, as the Neural Engine wants

    def __init__(self, files: dict[str, Path], io: dict[str, dict], shape: DecoderShape):
        require_macos()
        super().__init__(shape)
        import coremltools as ct

        self.models = {p: ct.models.MLModel(str(f)) for p, f in files.items()}
        self.io = io

    def call(self, program, inputs):
        names = [i["name"] for i in self.io[program]["inputs"]]
        dtypes = [i["dtype"] for i in self.io[program]["inputs"]]
        feed = {n: a.astype(d if d in ("int32", "int8") else np.float32) for n, a, d in zip(names, inputs, dtypes)}
        out = self.models[program].predict(feed)  # an int8 KV cache stays int8
        return [np.asarray(out[o["name"]], np.int8 if o["dtype"] == "int8" else np.float32) for o in self.io[program]["outputs"]]

    def vision(self, image_u8):
        return self.call("vision_encoder", [image_u8.astype(np.float32)[None]])[0]
