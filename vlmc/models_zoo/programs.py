"""The programs a VLM is cut into for export: vision encoder, token embedding, text decoder.

Two decoder forms share the model's layer code and differ only in where the KV cache lives:
- `StaticCacheDecoder` (ONNX, Core ML): caches are explicit inputs and outputs; writes are a one-hot
  matmul blend, because in-place index_copy does not convert to Core ML or TVM;
- `ExecuTorchDecoder`: caches are mutable buffers updated in place by ExecuTorch's LLM custom ops
  (`llama::update_cache`, `llama::custom_sdpa`), the convention of its multimodal runner.
Cache slots and RoPE positions are separate inputs in the static form, so a token pass can drop image
tokens while the kept ones keep their original positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmc.models_zoo.llava import LlavaModel, repeat_kv


class VisionEncoderProgram(nn.Module):
    """Image (0..255, preprocessing in the graph) -> image embeddings [1, N, D].

    `layout` "chw_uint8" takes uint8 [3,H,W] (ExecuTorch's runner contract, also used for ONNX);
    "nchw_float" takes float [1,3,H,W] in 0..255 (Core ML has no uint8 tensor inputs).
    """

    def __init__(self, model: LlavaModel, layout: str = "chw_uint8"):
        super().__init__()
        self.model, self.layout = model, layout

    def example_input(self) -> torch.Tensor:
        s = self.model.config.vision.image_size
        g = torch.Generator().manual_seed(0)
        img = torch.randint(0, 256, (3, s, s), generator=g, dtype=torch.uint8)
        return img if self.layout == "chw_uint8" else img.float()[None]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(self.model.normalize(image))


class TokenEmbeddingProgram(nn.Module):
    """Token ids int64 [1, T] -> embeddings [1, T, D]."""

    def __init__(self, model: LlavaModel):
        super().__init__()
        self.embed_tokens = model.language_model.embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


def cache_shape(model: LlavaModel, max_context: int) -> tuple[int, int, int, int]:
    t = model.config.text
    return (1, t.num_kv_heads, max_context, t.head_dim)


class StaticCacheDecoder(nn.Module):
    """(embeds [1,T,D], position_ids [1,T], cache_position [T], logits_index [1], [k_0, v_0, ...])
    -> (logits [1,V], k_0', v_0', ...), caches [1, Hkv, C, d].

    A query in slot s attends to slots <= s, so right-padding a prompt to T is harmless: padded
    slots lie beyond the last real one and each decode step overwrites its slot before reading it.
    """

    def __init__(self, model: LlavaModel, max_context: int):
        super().__init__()
        self.model, self.max_context = model, max_context
        t = model.config.text
        self.n_rep = t.num_heads // t.num_kv_heads

    def forward(self, inputs_embeds, position_ids, cache_position, logits_index, caches: list[torch.Tensor]):
        slots = torch.arange(self.max_context, dtype=cache_position.dtype)
        write = (slots[None, :] == cache_position[:, None]).to(inputs_embeds.dtype)  # [T, C]
        keep = (1.0 - write.sum(0))[:, None]  # [C, 1]
        mask = slots[None, :] <= cache_position[:, None]  # [T, C]
        write_t = write.transpose(0, 1)
        new_caches: list[torch.Tensor] = []

        def attend(i, q, k, v):
            k_all = caches[2 * i] * keep + write_t @ k
            v_all = caches[2 * i + 1] * keep + write_t @ v
            new_caches.extend((k_all, v_all))
            out = F.scaled_dot_product_attention(
                q, repeat_kv(k_all, self.n_rep), repeat_kv(v_all, self.n_rep), attn_mask=mask)
            return out.transpose(1, 2).flatten(2)

        h = self.model.language_model(inputs_embeds, position_ids, attend)
        last = h.index_select(1, logits_index)  # [1, 1, D]
        return (self.model.lm_head(last)[:, 0], *new_caches)


class ExecuTorchDecoder(nn.Module):
    """(embeds [1,T,D], input_pos int64 [1] = first slot) -> logits [1,V] of the last token.

    The KV cache is the program's mutable buffers [1, C, Hkv, d], written by `llama::update_cache` and
    read by `llama::custom_sdpa` (causal from `start_pos`), as ExecuTorch's MultimodalRunner expects.
    """

    def __init__(self, model: LlavaModel, max_context: int):
        super().__init__()
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers llama::*)

        self.model, self.max_context = model, max_context
        t = model.config.text
        for i in range(t.num_layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(1, max_context, t.num_kv_heads, t.head_dim), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(1, max_context, t.num_kv_heads, t.head_dim), persistent=False)

    def forward(self, inputs_embeds: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        seq_len = inputs_embeds.shape[1]
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + seq_len <= self.max_context)
        position_ids = (torch.arange(seq_len) + start)[None]

        def attend(i, q, k, v):
            k_cache, v_cache = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
            torch.ops.llama.update_cache(k.transpose(1, 2), k_cache, start)
            torch.ops.llama.update_cache(v.transpose(1, 2), v_cache, start)
            out = torch.ops.llama.custom_sdpa(q.transpose(1, 2), k_cache, v_cache, start, None, 0, True)
            return out.flatten(2)

        h = self.model.language_model(inputs_embeds, position_ids, attend)
        return self.model.lm_head(h[:, -1])

    def reset(self) -> None:
        for b in self.buffers():
            b.zero_()


def cache_names(num_layers: int) -> list[str]:
    return [f"{kv}_cache_{i}" for i in range(num_layers) for kv in "kv"]


def static_decoder_io(num_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of `StaticCacheDecoder` on every target that takes the cache explicitly."""
    caches = cache_names(num_layers)
    inputs = ["inputs_embeds", "position_ids", "cache_position", "logits_index", *caches]
    return inputs, ["logits", *(c + "_out" for c in caches)]
