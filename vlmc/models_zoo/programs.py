"""The programs a VLM is cut into for export: vision encoder, token embedding, text decoder.

Two decoder forms share the model's layer code and differ only in where the KV cache lives:
- `StaticCacheDecoder` (ONNX, Core ML, TVM): caches are explicit inputs and outputs; Core ML's writes are
  a one-hot matmul blend over every slot (index_put does not convert to it), TVM scatters the rows and
  reads every slot, ONNX scatters the rows, updated in place by the session, and reads only the filled ones;
- `ExecuTorchDecoder`: caches are mutable buffers updated in place by ExecuTorch's LLM custom ops
  (`llama::update_cache`, `llama::custom_sdpa`), the convention of its multimodal runner.
Cache slots and RoPE positions are separate inputs in the static form, so a token pass can drop image
tokens while the kept ones keep their original positions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from typing import Optional

from vlmc.models_zoo.core import PromptRows, VisionLanguageModel, add_int, join_state, split_state
from vlmc.models_zoo.layers import OwnRowsAttention, StatefulAttend, causal_bias, packed_sdpa, repeat_kv
from vlmc.runtimes.base import DecoderShape


class VisionEncoderProgram(nn.Module):
    """Image (0..255, preprocessing in the graph) -> image embeddings [1, N, D].

    `layout` "chw_uint8" takes uint8 [3,H,W] (ExecuTorch's runner contract, also used for ONNX);
    "nchw_float" takes float [1,3,H,W] in 0..255 (Core ML has no uint8 tensor inputs).
    """

    def __init__(self, model: VisionLanguageModel, layout: str = "chw_uint8"):
        super().__init__()
        self.model, self.layout = model, layout

    def example_input(self) -> torch.Tensor:
        s = self.model.image_size
        g = torch.Generator().manual_seed(0)
        img = torch.randint(0, 256, (3, s, s), generator=g, dtype=torch.uint8)
        return img if self.layout == "chw_uint8" else img.float()[None]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(self.model.normalize(image))


class TokenEmbeddingProgram(nn.Module):
    """Token ids int64 [1, T] -> embeddings [1, T, D]."""

    def __init__(self, model: VisionLanguageModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_text(input_ids)


def cache_shape(model: VisionLanguageModel, max_context: int, layer: int = 0) -> tuple[int, int, int, int]:
    """The static-cache form's cache [1, Hkv, C, d] of one layer: C is shorter by the image rows in-LLM
    stages dropped before that layer; a recurrent layer's state half [1, 1, S, W/2] (`cache_dims`)."""
    return (1, *model.cache_dims(layer, max_context))


def empty_caches(model: VisionLanguageModel, max_context: int) -> list[torch.Tensor]:
    """The static-cache form's zero caches in `cache_names` order (`DecoderShape.empty_caches`, as tensors)."""
    return [torch.from_numpy(a) for a in DecoderShape.of_model(model, max_context, max_context).empty_caches()]


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of the last dim (one scale per head and cache slot): (the codes, still float,
    in -127..127; the scales [..., 1])."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127.0
    return torch.round(x / scale).clamp(-127.0, 127.0), scale


def dequantized(x: torch.Tensor) -> torch.Tensor:
    """x as an int8 cache holds it (rounded to its row's grid)."""
    codes, scale = quantize_rows(x)
    return codes * scale


class StaticCacheDecoder(nn.Module):
    """(embeds [1,T,D], position_ids [1,T], cache_position [T], logits_index [1], [k_0, v_0, ...])
    -> (logits [1,V], k_0', v_0', ...), caches [1, Hkv, C_i, d].

    A query in slot s attends to slots <= s, so right-padding a prompt to T is harmless: padded
    slots lie beyond the last real one and each decode step overwrites its slot before reading it.
    After in-LLM token stages, layer i's rows sit `shift` slots earlier (its cache is that much shorter)
    and the positions (RoPE) stay the original ones.

    `cache_writes` says how the new rows reach the cache:
    - "filled" (onnxruntime): scattered into the cache (which the session updates in place), and attention
      reads only the slots up to the last one written (a data-dependent length): a prompt costs its own rows
      against the filled ones, not against all max_context slots;
    - "scatter" (TVM, one static shape): scattered, attention reads every slot under the mask;
    - "blend" (Core ML, which has no index_put): a one-hot product over every slot, every slot read.
    """

    CACHE_WRITES = ("blend", "scatter", "filled")

    def __init__(self, model: VisionLanguageModel, max_context: int, cache_writes: str = "blend"):
        super().__init__()
        if cache_writes not in self.CACHE_WRITES:
            raise ValueError(f"cache_writes {cache_writes!r}: one of {self.CACHE_WRITES}")
        self.model, self.max_context, self.cache_writes = model, max_context, cache_writes

    def forward(self, inputs_embeds, position_ids, cache_position, logits_index, caches: list[torch.Tensor]):
        return self.run(inputs_embeds, position_ids, cache_position, logits_index, caches, None)

    def run(self, inputs_embeds, position_ids, cache_position, logits_index, caches, prompt: Optional[PromptRows]):
        """`forward`, or with `prompt` a full-prompt prefill that runs the in-LLM token stages."""
        new_caches: list[torch.Tensor] = []
        int8 = self.model.kv_cache == "int8"
        packed_layers = self.model.packed_layers()
        first = DecoderShape.of_model(self.model, self.max_context, self.max_context).cache_offsets()

        def store(i, k, v, position):
            """Write rows k, v [1,Hkv,T,d] at cache slots `position` [T]; return the caches attention reads."""
            length = caches[first[i]].shape[2]
            if self.cache_writes != "blend":
                return scatter_store(i, k, v, position, length, filled_only=self.cache_writes == "filled")
            slots = torch.arange(length, dtype=position.dtype)
            write = (slots[None, :] == position[:, None]).to(k.dtype)  # [T, C]
            keep = (1.0 - write.sum(0))[:, None]  # [C, 1]
            write_t = write.transpose(0, 1)
            if int8:  # the new rows quantized, blended in among the stored codes; attention reads them dequantized
                k_cache, v_cache, k_scale, v_scale = caches[first[i]: first[i] + 4]
                (k_codes, k_new_scale), (v_codes, v_new_scale) = quantize_rows(k), quantize_rows(v)
                k_codes = k_cache.to(k.dtype) * keep + write_t @ k_codes
                v_codes = v_cache.to(v.dtype) * keep + write_t @ v_codes
                k_scale = k_scale * keep + write_t @ k_new_scale
                v_scale = v_scale * keep + write_t @ v_new_scale
                new_caches.extend((k_codes.to(torch.int8), v_codes.to(torch.int8), k_scale, v_scale))
                return k_codes * k_scale, v_codes * v_scale
            k_all = caches[first[i]] * keep + write_t @ k
            v_all = caches[first[i] + 1] * keep + write_t @ v
            new_caches.extend((k_all, v_all))
            return k_all, v_all

        def scatter_store(i, k, v, position, length, filled_only: bool):
            """`store` by scattering the call's rows at (0, head, slot) into the cache (onnxruntime binds the
            cache as its own output, so that only those rows are written). `filled_only`: attention reads the
            slots up to the call's last one (a prompt, its kept rows or a step: every caller writes consecutive
            slots after those it filled before)."""
            if filled_only:
                filled, rows = position[-1].item() + 1, k.shape[2]
                torch._check(filled >= 1)
                torch._check(filled <= length)
                heads = torch.arange(k.shape[1])[:, None].expand(-1, rows)
                at = (torch.zeros_like(heads), heads, position[None, :].expand(k.shape[1], -1))

                def put(cache, new):
                    return torch.index_put(cache, at, new[0])  # ONNX ScatterND, straight from the cache input

                def read(cache):
                    return cache[:, :, :filled]
            else:
                def put(cache, new):  # TVM: its importer's index_put wants an index per dimension and fails on a symbolic row count
                    return torch.scatter(cache, 2, position[None, None, :, None].expand(new.shape), new)

                def read(cache):
                    return cache

            if int8:
                k_cache, v_cache, k_scale, v_scale = caches[first[i]: first[i] + 4]
                (k_codes, k_new_scale), (v_codes, v_new_scale) = quantize_rows(k), quantize_rows(v)
                k_codes, v_codes = put(k_cache, k_codes.to(torch.int8)), put(v_cache, v_codes.to(torch.int8))
                k_scale, v_scale = put(k_scale, k_new_scale), put(v_scale, v_new_scale)
                new_caches.extend((k_codes, v_codes, k_scale, v_scale))
                return read(k_codes).to(k.dtype) * read(k_scale), read(v_codes).to(v.dtype) * read(v_scale)
            k_all, v_all = put(caches[first[i]], k), put(caches[first[i] + 1], v)
            new_caches.extend((k_all, v_all))
            return read(k_all), read(v_all)

        def attend(i, q, k, v, shift):
            # a full-prompt prefill starts at slot 0 and its kept rows take the first slots
            position = cache_position - shift if prompt is None else torch.arange(q.shape[2])
            k_all, v_all = store(i, k, v, position)
            mask = self.model.attention_mask(i, position, torch.arange(k_all.shape[2]))
            if i in packed_layers:  # the packed image rows pass through, read in the rank space
                packed = caches[first[i] + 2: first[i] + 6]
                new_caches.extend(packed)
                stage = packed_layers[i]
                return packed_sdpa(q, k_all, v_all, mask, packed, stage.basis_k, stage.basis_v)
            return (additive_mask_sdpa if self.cache_writes == "filled" else plain_sdpa)(q, k_all, v_all, mask)

        def evicting(i, q, k, v, idx, packed=None):
            """A full-prompt prefill whose layer-i cache keeps only rows `idx` (and the others `packed`, for a
            packing stage): attention over the call's rows."""
            store(i, k.index_select(2, idx), v.index_select(2, idx), torch.arange(idx.shape[0]))
            if packed is not None:
                new_caches.extend(packed)
            if int8:  # the prompt reads what the cache holds, as every other layer's does
                k, v = dequantized(k), dequantized(v)
            rows = torch.arange(q.shape[2])
            return plain_sdpa(q, k, v, self.model.attention_mask(i, rows, rows))

        attend.evicting = evicting

        def carry(i, x):
            # the state after this call: the S rows that end at the last real one (a padded prefill's
            # `logits_index`; a decode step's only row)
            state = join_state(caches[first[i]], caches[first[i] + 1])
            full = torch.cat([state, x], 1)
            rows = state.shape[1]
            new_caches.extend(split_state(full.index_select(1, add_int(torch.arange(rows) + logits_index, 1))))
            return full

        stateful = StatefulAttend(attend, carry) if self.model.state_layers() else attend
        h = self.model.run_decoder(inputs_embeds, position_ids, stateful, prompt)
        dropped = 0 if prompt is None else self.model.dropped_in_llm()
        last = h.index_select(1, logits_index - dropped)  # [1, 1, D]
        return (self.model.lm_head(last)[:, 0], *new_caches)


class StaticCachePrefill(nn.Module):
    """A full-prompt prefill that runs the in-LLM token stages: (embeds [1,T,D], image_start [1],
    logits_index [1]) -> (logits [1,V], k_0, v_0, ...), the caches as `StaticCacheDecoder` continues them.

    The decode step must not prune, so bundles with in-LLM stages carry this program beside the decoder.
    """

    def __init__(self, model: VisionLanguageModel, max_context: int, cache_writes: str = "blend"):
        super().__init__()
        self.decoder = StaticCacheDecoder(model, max_context, cache_writes)
        self.model = model

    def forward(self, inputs_embeds, image_start, logits_index):
        m, t = self.model, inputs_embeds.shape[1]
        caches = empty_caches(m, self.decoder.max_context)
        pos = torch.arange(t)
        prompt = PromptRows(image_start, m.image_rows_in_llm(), logits_index)
        return self.decoder.run(inputs_embeds, pos[None], pos, logits_index, caches, prompt)


def plain_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of q [1,H,T,d] over k, v [1,Hkv,S,d] (grouped heads) under a [T,S] mask -> [1,T,H*d]."""
    n_rep = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


def additive_mask_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`plain_sdpa` written out for onnxruntime: the mask becomes a [T,S] bias added to the scores, and no
    guard for rows that see nothing (every query sees its own slot). F.scaled_dot_product_attention's
    decomposition adds an IsNaN / Where pass over all [H,T,S] probabilities, which onnxruntime's per-op
    profile of the 220M geometry ranked next to the matmuls."""
    n_rep = q.shape[1] // k.shape[1]
    bias = torch.where(mask, 0.0, float("-inf"))
    scores = (q @ repeat_kv(k, n_rep).transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1])) + bias
    out = torch.softmax(scores, -1) @ repeat_kv(v, n_rep)
    return out.transpose(1, 2).flatten(2)


class ExecuTorchDecoder(nn.Module):
    """(embeds [1,T,D], input_pos int64 [1] = first slot) -> logits [1,V] of the last token.

    The KV cache is the program's mutable buffers [1, C_i, Hkv, d], written by `llama::update_cache` and
    read by `llama::custom_sdpa` (causal from `start_pos`), as ExecuTorch's MultimodalRunner expects.
    `prefill` (exported as the `text_prefill` method, sharing the buffers) takes a prompt's first rows from
    slot 0 and attends over them alone, in products XNNPACK runs (custom_sdpa runs outside it); with in-LLM
    stages it also takes the image's start row, and `forward` continues with shifted slots in later layers.
    """

    def __init__(self, model: VisionLanguageModel, max_context: int):
        super().__init__()
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers llama::*)

        self.model, self.max_context = model, max_context
        self.own_rows = OwnRowsAttention()
        int8 = model.kv_cache == "int8"
        for i in range(model.config.text.num_layers):
            heads, slots, dim = model.cache_dims(i, max_context)
            dtype = torch.int8 if int8 else torch.float32
            self.register_buffer(f"k_cache_{i}", torch.zeros(1, slots, heads, dim, dtype=dtype), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(1, slots, heads, dim, dtype=dtype), persistent=False)
            if int8:
                self.register_buffer(f"k_scale_{i}", torch.zeros(1, slots, heads, 1), persistent=False)
                self.register_buffer(f"v_scale_{i}", torch.zeros(1, slots, heads, 1), persistent=False)
        self.packed_layers = model.packed_layers()
        shape = DecoderShape.of_model(model, max_context, max_context)
        self.pack_names = {i: [name for name, _, _ in shape.packed_layout(i)] for i in self.packed_layers}
        for i in self.packed_layers:
            for name, dims, _ in shape.packed_layout(i):
                self.register_buffer(name, torch.zeros(dims), persistent=False)

    def _store(self, i: int, k: torch.Tensor, v: torch.Tensor, slot) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new rows k, v [1,T,Hkv,d] into layer i's caches at `slot`; return the caches attention
        reads [1,C',Hkv,d]: the whole cache, or for an int8 cache (the new rows quantized) its filled slots
        0..slot+T-1 dequantized, so a decode step's dequantization grows with the sequence, not max_context."""
        k_cache, v_cache = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
        if self.model.kv_cache != "int8":
            torch.ops.llama.update_cache(k, k_cache, slot)
            torch.ops.llama.update_cache(v, v_cache, slot)
            return k_cache, v_cache
        k_scale, v_scale = getattr(self, f"k_scale_{i}"), getattr(self, f"v_scale_{i}")
        for rows, codes_cache, scale_cache in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
            codes, scale = quantize_rows(rows)
            torch.ops.llama.update_cache(codes.to(torch.int8), codes_cache, slot)
            torch.ops.llama.update_cache(scale, scale_cache, slot)
        end = slot + k.shape[1]
        return k_cache[:, :end].to(k.dtype) * k_scale[:, :end], v_cache[:, :end].to(v.dtype) * v_scale[:, :end]

    def _run(self, inputs_embeds, start, position_ids, prompt: Optional[PromptRows], own_rows: bool = False):
        """`own_rows`: the text_prefill method, whose rows start at slot 0 and attend to one another only."""
        biases = {}

        def own_bias(i, t):
            """Layer i's mask over the call's own rows as a bias; the causal one computed once per call and row
            count (layers after an in-LLM stage see fewer rows), keyed by its expression (T symbolic at export)."""
            if self.model.causal_attention:
                if str(t) not in biases:
                    biases[str(t)] = causal_bias(t)
                return biases[str(t)]
            rows = torch.arange(t)
            return torch.where(self.model.attention_mask(i, rows, rows), 0.0, -1e9)  # finite: a quantizer may observe it

        def attend(i, q, k, v, shift):
            slot = start - shift
            torch._check(slot >= 0)
            torch._check(slot + q.shape[2] <= getattr(self, f"k_cache_{i}").shape[1])
            k_cache, v_cache = self._store(i, k.transpose(1, 2), v.transpose(1, 2), slot)
            if own_rows and i not in self.packed_layers:  # the keys are this call's rows
                if self.model.kv_cache == "int8":  # what the cache holds, as the decode steps will read it
                    k, v = dequantized(k), dequantized(v)
                return self.own_rows(q, k, v, own_bias(i, q.shape[2]))
            if i in self.packed_layers:  # the filled slots, and the packed image rows in the rank space
                end = slot + q.shape[2]
                stage = self.packed_layers[i]
                mask = self.model.attention_mask(i, slot + torch.arange(q.shape[2]), torch.arange(end))
                return packed_sdpa(q, k_cache[:, :end].transpose(1, 2), v_cache[:, :end].transpose(1, 2), mask,
                                   [getattr(self, name) for name in self.pack_names[i]], stage.basis_k, stage.basis_v)
            if self.model.causal_attention:
                out = torch.ops.llama.custom_sdpa(q.transpose(1, 2), k_cache, v_cache, slot, None, 0, True)
                return out.flatten(2)
            # a family mask (sliding window, bidirectional image rows): plain SDPA over the cache it reads
            mask = self.model.attention_mask(i, slot + torch.arange(q.shape[2]), torch.arange(k_cache.shape[1]))
            return plain_sdpa(q, k_cache.transpose(1, 2), v_cache.transpose(1, 2), mask)

        def evicting(i, q, k, v, idx, packed=None):
            """The full-prompt prefill of a layer whose cache keeps only rows `idx` (and the others `packed`,
            for a packing stage): attention over the call's own rows, the kept ones written from slot 0."""
            self._store(i, k.index_select(2, idx).transpose(1, 2), v.index_select(2, idx).transpose(1, 2), 0)
            if packed is not None:
                for name, coefficients in zip(self.pack_names[i], packed):
                    getattr(self, name).copy_(coefficients)
            if self.model.kv_cache == "int8":
                k, v = dequantized(k), dequantized(v)
            rows = torch.arange(q.shape[2])
            return plain_sdpa(q, k, v, self.model.attention_mask(i, rows, rows))

        attend.evicting = evicting

        def carry(i, x):
            k_state, v_state = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
            rows, half = k_state.shape[1], k_state.shape[3]
            fresh = (position_ids[:, :1] > 0).to(x.dtype)[..., None]  # a sequence starting at slot 0 has no past
            full = torch.cat([torch.cat([k_state, v_state], -1)[:, :, 0] * fresh, x], 1)
            new = full[:, full.shape[1] - rows:]
            k_state.copy_(new[:, :, None, :half])
            v_state.copy_(new[:, :, None, half:])
            return full

        stateful = StatefulAttend(attend, carry) if self.model.state_layers() else attend
        h = self.model.run_decoder(inputs_embeds, position_ids, stateful, prompt)
        return self.model.lm_head(h[:, -1])

    def forward(self, inputs_embeds: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + inputs_embeds.shape[1] <= self.max_context)
        return self._run(inputs_embeds, start, (torch.arange(inputs_embeds.shape[1]) + start)[None], None)

    def prefill(self, inputs_embeds: torch.Tensor, image_start: torch.Tensor) -> torch.Tensor:
        last = torch.tensor([inputs_embeds.shape[1] - 1])
        prompt = PromptRows(image_start, self.model.image_rows_in_llm(), last) if self.model.decoder_stages() else None
        return self._run(inputs_embeds, 0, torch.arange(inputs_embeds.shape[1])[None], prompt, own_rows=True)

    def reset(self) -> None:
        for b in self.buffers():
            b.zero_()


class ExecuTorchPrefill(ExecuTorchDecoder):
    """`ExecuTorchDecoder.prefill` as a program's forward, with the same buffer names, so the two methods
    of one .pte share their KV cache (exported with share_mutable_buffers)."""

    def forward(self, inputs_embeds: torch.Tensor, image_start: torch.Tensor) -> torch.Tensor:
        return self.prefill(inputs_embeds, image_start)


def static_decoder_io(shape: DecoderShape) -> tuple[list[str], list[str]]:
    """Input and output names of `StaticCacheDecoder` on every target that takes the cache explicitly."""
    caches = shape.cache_names()
    inputs = ["inputs_embeds", "position_ids", "cache_position", "logits_index", *caches]
    return inputs, ["logits", *(c + "_out" for c in caches)]
