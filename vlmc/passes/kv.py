"""KV-cache passes: how the decoder's cache is stored between calls (the rows every decode step reads).

`kv8` stores keys and values as int8 codes with one float scale per head and cache slot, on every target:
the static-cache programs (ONNX, Core ML, TVM, eager) take and return the codes and scales as explicit
inputs and outputs, the ExecuTorch decoder keeps them as its mutable buffers (`llama::update_cache` on
int8). Attention reads the dequantized cache, the rows a call adds included, so prefill and decode see
the same values the cache will hold.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from vlmc.errors import VlmcError
from vlmc.passes.registry import Pass, PassConfig, register


class KVConfig(PassConfig):
    at: Literal["decoder.cache"] = Field("decoder.cache", description="the decoder's KV cache")


@register
class Int8KVCache(Pass):
    name = "kv8"
    kind = "kv"
    source = "int8 KV cache, as ExecuTorch's QuantizedKVCache (examples/models/llama) stores it"
    departures = ("symmetric, one scale per head and cache slot (absmax / 127, no zero point; ExecuTorch's is "
                  "asymmetric per token), the same on every target; the cache is dequantized whole before attention "
                  "(no int8 attention kernel)")
    Config = KVConfig

    @classmethod
    def acts_at(cls) -> list[str]:
        return ["decoder.cache"]

    def apply(self, model) -> None:
        if model.state_layers():
            raise VlmcError(f"pass kv8: the {model.family} decoder keeps a convolution state in some layers' cache "
                            "slots; an int8 KV cache covers attention caches only (not supported for this family)")
        model.kv_cache = "int8"
