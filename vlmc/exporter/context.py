"""What every target's lowering reads: the prepared model, the resolved recipe, the output folder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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

    def example_decoder_inputs(self, seq_len: int) -> tuple:
        """Inputs that trace StaticCacheDecoder at `seq_len` tokens with zero caches."""
        from vlmc.models_zoo.programs import cache_shape

        t = self.model.config.text
        pos = torch.arange(seq_len)
        caches = [torch.zeros(cache_shape(self.model, self.recipe.max_context)) for _ in range(2 * t.num_layers)]
        return (torch.zeros(1, seq_len, t.hidden_size), pos[None], pos, torch.tensor([seq_len - 1]), caches)

    def decoder_dynamic_shapes(self, seq) -> tuple:
        return ({1: seq}, {1: seq}, {0: seq}, None, [None] * (2 * self.num_layers))


def io_entry(name: str, shape, dtype: str) -> dict:
    return {"name": name, "shape": list(shape), "dtype": dtype}
