"""`embed8`: the token embedding table stored as int8 codes with one float scale per row.

A small VLM's token table is a large share of what ships (SmolLM-135M: 113 MB of 49k x 576 floats), and the
token_embedding program reads only the prompt's rows of it. The stock ExecuTorch LLM exports store it in 8
bits (`quantized_decomposed.embedding_byte`, one scale per row); vlmc writes the same storage as plain
tensor ops, codes[ids] as float times scale[ids], so every target lowers it with its own kernels (ExecuTorch's
portable gather, onnxruntime's Gather, Core ML's gather, TVM) and no runtime needs a quantized-ops library.
The eager model carries the same table, so every artifact is verified against what it computes. A tied LM
head keeps the float table (or its own quantization): the two are no longer one tensor.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from vlmc.errors import VlmcError
from vlmc.models_zoo.programs import quantize_rows
from vlmc.passes.registry import Pass, PassConfig, register


class Int8Embedding(nn.Module):
    """ids [..] -> rows [.., D]: codes int8 [V, D] times scales float [V, 1] (symmetric, absmax / 127 per row)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        codes, scales = quantize_rows(weight.detach().float())  # the int8 KV cache's row grid
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("scales", scales)

    @property
    def weight(self) -> torch.Tensor:
        """The table as the codes represent it (methods that read the vocabulary read this)."""
        return self.codes.float() * self.scales

    @property
    def num_embeddings(self) -> int:
        return self.codes.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.codes.shape[1]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.codes[input_ids].to(self.scales.dtype) * self.scales[input_ids]


class EmbeddingConfig(PassConfig):
    at: Literal["decoder.embedding"] = Field("decoder.embedding", description="the decoder's token embedding table")


@register
class Int8EmbeddingTable(Pass):
    name = "embed8"
    kind = "embedding"
    source = "8-bit token embedding, as ExecuTorch's LLM exports store it (quantized_decomposed.embedding_byte, per row)"
    departures = ("symmetric (absmax / 127, no zero point), float32 scales; written as a gather of int8 codes and a "
                  "multiply, not ExecuTorch's fused embedding_byte kernel (the same bytes; no quantized-ops library to link)")
    Config = EmbeddingConfig

    @classmethod
    def acts_at(cls) -> list[str]:
        return ["decoder.embedding"]

    def apply(self, model) -> None:
        table = model.embed_tokens
        if isinstance(table, Int8Embedding):
            raise VlmcError("pass embed8: given more than once (the token table has one storage)")
        if not isinstance(table, nn.Embedding):
            raise VlmcError(f"pass embed8: the {model.family} token table is a {type(table).__name__}, not an "
                            "nn.Embedding (not supported for this family)")
        model.replace_embed_tokens(Int8Embedding(table.weight))
