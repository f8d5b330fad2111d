"""What every target's lowering reads: the prepared model, the resolved recipe, the output folder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from vlmc.models_zoo import LoadedModel
from vlmc.recipe import Recipe


@dataclass
class ExportContext:
    loaded: LoadedModel
    recipe: Recipe
    out_dir: Path
    progress: Callable[[str], None]
    image_tokens: int  # visual tokens the decoder sees, after token passes

    @property
    def model(self):
        return self.loaded.model

    @property
    def num_layers(self) -> int:
        return self.model.config.text.num_layers

    def explicit_cache_programs(self, image_layout: str) -> list["ProgramJob"]:
        """The three programs of targets that take the KV cache explicitly (ONNX, Core ML).

        The text length is bounded-dynamic (1..max_prompt): one decoder graph for prefill and decode.
        """
        from torch.export import Dim

        from vlmc.models_zoo.programs import (StaticCacheDecoder, TokenEmbeddingProgram, VisionEncoderProgram,
                                              cache_shape, static_decoder_io)

        m, r = self.model, self.recipe
        seq = Dim("seq_len", min=1, max=r.max_prompt)
        pos = torch.arange(r.max_prompt)
        caches = [torch.zeros(cache_shape(m, r.max_context)) for _ in range(2 * self.num_layers)]
        in_names, out_names = static_decoder_io(self.num_layers)
        vision = VisionEncoderProgram(m, image_layout)
        return [
            ProgramJob("vision_encoder", vision, (vision.example_input(),), None, ["image"], ["image_embeds"]),
            ProgramJob("token_embedding", TokenEmbeddingProgram(m), (torch.ones(1, 4, dtype=torch.long),), ({1: seq},),
                       ["input_ids"], ["inputs_embeds"]),
            ProgramJob("text_decoder", StaticCacheDecoder(m, r.max_context),
                       (torch.zeros(1, r.max_prompt, m.config.text.hidden_size), pos[None], pos,
                        torch.tensor([r.max_prompt - 1]), caches),
                       ({1: seq}, {1: seq}, {0: seq}, None, [None] * len(caches)), in_names, out_names),
        ]


@dataclass
class ProgramJob:
    """One program to export: the module, example args, dynamic shapes and its I/O names."""

    name: str
    module: torch.nn.Module
    args: tuple
    dynamic_shapes: Optional[tuple]
    input_names: list[str]
    output_names: list[str]


def io_entry(name: str, shape, dtype: str) -> dict:
    return {"name": name, "shape": list(shape), "dtype": dtype}
