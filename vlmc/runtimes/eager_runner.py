"""Eager PyTorch: the same programs the exporter traces, run as modules (the reference)."""
from __future__ import annotations

import numpy as np
import torch

from vlmc.models_zoo.core import VisionLanguageModel
from vlmc.models_zoo.programs import StaticCacheDecoder, StaticCachePrefill, TokenEmbeddingProgram, VisionEncoderProgram
from vlmc.runtimes.base import DecoderShape, StaticCacheSession


class EagerSession(StaticCacheSession):
    runtime = "eager"

    def __init__(self, model: VisionLanguageModel, shape: DecoderShape):
        super().__init__(shape)
        self.programs = {
            "vision_encoder": VisionEncoderProgram(model),
            "token_embedding": TokenEmbeddingProgram(model),
            "text_decoder": StaticCacheDecoder(model, shape.max_context),
        }
        if shape.full_prompt_prefill:
            self.programs["text_prefill"] = StaticCachePrefill(model, shape.max_context)

    def call(self, program, inputs):
        args = [torch.from_numpy(np.ascontiguousarray(a)) for a in inputs]
        if program == "text_decoder":
            args = [*args[:4], args[4:]]
        with torch.no_grad():
            out = self.programs[program](*args)
        return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]
