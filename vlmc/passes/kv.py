"""KV-cache passes: what the decoder's cache holds between calls (the rows every decode step reads).

`flashcache` evicts image rows from each layer's cache after the prefill (the prompt is computed in full).
`attentionpack` keeps them as low-rank coefficients instead, read by attention in the rank space.
`kv8` stores keys and values as int8 codes with one float scale per head and cache slot, on every target:
the static-cache programs (ONNX, Core ML, TVM, eager) take and return the codes and scales as explicit
inputs and outputs, the ExecuTorch decoder keeps them as its mutable buffers (`llama::update_cache` on
int8). Attention reads the dequantized cache, the rows a call adds included, so prefill and decode see
the same values the cache will hold.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field
from torch import nn

from vlmc.errors import VlmcError
from vlmc.passes.registry import Pass, PassConfig, TokenPass, register
from vlmc.passes.token import functional as T


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
        if model.packed_layers():
            raise VlmcError("recipe field 'passes': the KV cache has one storage; attentionpack packs it already "
                            "(give kv8 or attentionpack)")
        if model.state_layers():
            raise VlmcError(f"pass kv8: the {model.family} decoder keeps a convolution state in some layers' cache "
                            "slots; an int8 KV cache covers attention caches only (not supported for this family)")
        model.kv_cache = "int8"


class FlashCacheConfig(PassConfig):
    at: str = Field("decoder.layer[0]", description="decoder.layer[L]: the first layer whose cache evicts image rows "
                                                    "(every layer from L to the last does)")
    keep: int = Field(..., ge=1, description="image rows each evicting layer's cache keeps (the mean over layers when "
                                             "budgets are allocated; static)")
    cutoff: float = Field(0.25, gt=0.0, lt=1.0, description="share of the image rows' DCT frequencies (lowest first) in "
                                                            "the low-pass reconstruction the outliers deviate from")
    allocate: bool = Field(False, description="per-layer budgets from the calibration questions: each evicting layer keeps "
                                              "in proportion to its keys' outlier energy (needs recipe 'calibration')")
    budgets: Optional[list[int]] = Field(None, description="image rows each evicting layer keeps, in layer order "
                                                           "(`allocate` fills them in; they must sum to keep x layers)")


def layers_from(at: str, model) -> list[int]:
    """decoder.layer[L] -> the layers L..last, each of whose caches a KV pass compresses."""
    first = int(at.split("[")[1].rstrip("]"))
    return list(range(first, model.config.text.num_layers))


class OutlierKVStage(nn.Module):
    """A layer's cache keeps the image rows whose keys (heads concatenated) deviate most from the low-pass
    reconstruction of the image's keys along the token sequence."""

    evicts = True
    reads_row_order = True  # built for the image rows that enter the decoder: none may be dropped before it

    def __init__(self, keep: int, tokens_in: int, cutoff: float):
        super().__init__()
        self.keep, self.dropped = keep, tokens_in - keep
        self.register_buffer("basis", T.dct_low_pass(tokens_in, max(1, round(cutoff * tokens_in))))

    def deviation(self, k: torch.Tensor, image_rows: torch.Tensor) -> torch.Tensor:
        keys = k[0].index_select(1, image_rows).transpose(0, 1)  # [N, Hkv, d]
        return T.low_pass_deviation(keys.reshape(keys.shape[0], -1), self.basis)

    def select(self, view):
        return T.top_indices(self.deviation(view.k, view.image_rows), self.keep)


def outlier_energy(model, prompts, layers: list[int], stages: dict[int, OutlierKVStage]) -> list[float]:
    """Per layer, the share of its image keys' energy outside the low-pass reconstruction (sum of squared
    deviations over sum of squared key norms), averaged over calibration prompts: FlashCache's signal of
    how much a layer's cache holds that a few low frequencies do not."""
    from vlmc.models_zoo.core import PromptRows
    from vlmc.passes.token.methods import causal_attend

    t, n = model.config.text, next(iter(stages.values())).keep + next(iter(stages.values())).dropped
    energy = [0.0] * len(layers)
    base = causal_attend(t)

    with torch.no_grad():
        for embeds, start, last in prompts:
            rows = start + torch.arange(n)

            def attend(i, q, k, v, shift):
                if i in stages:
                    keys = k[0].index_select(1, rows).transpose(0, 1).reshape(n, -1)
                    energy[layers.index(i)] += float(stages[i].deviation(k, rows).square().sum() / keys.square().sum())
                return base(i, q, k, v, shift)

            model.run_decoder(embeds[:, : last + 1], torch.arange(last + 1)[None], attend,
                              PromptRows(torch.tensor([start]), n, torch.tensor([last])), {})
    return [e / max(1, len(prompts)) for e in energy]


def allocate(total: int, weights: list[float], most: int) -> list[int]:
    """`total` rows split over layers in proportion to `weights`, each between 1 and `most`, summing to total."""
    w = torch.tensor(weights, dtype=torch.float64).clamp_min(1e-12)
    share = (w / w.sum() * total).floor().clamp(1, most).long()
    while int(share.sum()) != total:  # largest remainders first, never past the bounds
        gap = total - int(share.sum())
        room = (share < most) if gap > 0 else (share > 1)
        order = torch.argsort(w / w.sum() * total - share.double(), descending=gap > 0)
        j = next(int(j) for j in order if room[j])
        share[j] += 1 if gap > 0 else -1
    return share.tolist()


@register
class FlashCache(TokenPass):
    """FlashCache: every layer's cache keeps only its outlier image KVs (those far from the DCT low-pass of
    the image's keys); the prompt itself is computed in full, decode steps read the compressed cache."""

    name = "flashcache"
    kind = "kv"
    points = ("decoder.layer",)
    source = "FlashCache: Frequency-Domain-Guided Outlier-KV-Aware Multimodal KV Cache Compression (CVPR 2026 seed notes)"
    departures = ("static counts: each evicting layer keeps `keep` image rows (or its calibrated `budgets`: the paper's "
                  "dynamic layer-wise allocation, fixed once over the calibration questions in proportion to each layer's "
                  "outlier energy, and written into the recipe); outliers are scored on the layer's keys only (heads "
                  "concatenated, after RoPE; the values are not read), by the distance from a 1-D DCT low-pass "
                  "(`cutoff` of the frequencies) along the image's token sequence; text rows are never evicted; the "
                  "eviction happens after the prefill, which attends to every row")
    Config = FlashCacheConfig
    reads_text = False

    def layers(self, model) -> list[int]:
        return layers_from(self.config.at, model)

    def check(self, tokens_in, grid, model):
        c, layers = self.config, self.layers(model)
        if c.keep >= tokens_in:
            raise VlmcError(f"pass flashcache: parameter 'keep': {c.keep} must be below the {tokens_in} image rows "
                            f"at {c.at}")
        if c.budgets is not None:
            if len(c.budgets) != len(layers) or not all(1 <= b < tokens_in for b in c.budgets) \
                    or sum(c.budgets) != c.keep * len(layers):
                raise VlmcError(f"pass flashcache: parameter 'budgets': needs {len(layers)} counts in 1..{tokens_in - 1} "
                                f"(one per evicting layer) summing to keep x layers = {c.keep * len(layers)}")

    def place(self, model, tokens_in, calibration=None):
        c, layers = self.config, self.layers(model)
        if c.budgets is None and c.allocate:
            if calibration is None:
                raise VlmcError("pass flashcache: 'allocate' needs calibration questions (recipe 'calibration') or 'budgets'")
            probes = {i: OutlierKVStage(c.keep, tokens_in, c.cutoff) for i in layers}
            weights = outlier_energy(model, calibration.prompts(model), layers, probes)
            self.config = c.model_copy(update={"budgets": allocate(c.keep * len(layers), weights, tokens_in - 1)})
        budgets = self.config.budgets or [c.keep] * len(layers)
        return [(f"decoder.layer[{i}]", OutlierKVStage(b, tokens_in, c.cutoff)) for i, b in zip(layers, budgets)]


class AttentionPackConfig(PassConfig):
    at: str = Field("decoder.layer[0]", description="decoder.layer[L]: the first layer whose cache packs the image rows "
                                                    "(every layer from L to the last does)")
    keep: int = Field(..., ge=1, description="image rows kept at the full `rank`: those the question's attention asks "
                                             "most of (static)")
    rank: int = Field(16, ge=1, description="ranks of each layer's key and value bases (heads concatenated)")
    light_rank: int = Field(4, ge=1, description="ranks the other image rows keep (the leading ones: partial "
                                                 "decompression)")


class PackedKVStage(nn.Module):
    """A layer's cache holds the image rows as coefficients on the layer's low-rank key and value bases: the
    `heavy` rows the instruction attends to most at `rank`, the others at `light_rank`. Its float cache
    keeps the text rows only."""

    evicts = True
    packs = True
    keep = 0  # no image row stays in the float cache

    def __init__(self, tokens_in: int, heavy: int, light_rank: int, basis_k: torch.Tensor, basis_v: torch.Tensor):
        super().__init__()
        self.dropped, self.heavy, self.light_rank = tokens_in, heavy, light_rank
        self.register_buffer("basis_k", basis_k)  # [1, Hkv, rank, d], orthonormal over (head, dim)
        self.register_buffer("basis_v", basis_v)

    @property
    def packed_shape(self) -> tuple[int, int, int, int]:
        """(heavy rows, rank, light rows, light rank)."""
        return self.heavy, self.basis_k.shape[2], self.dropped - self.heavy, self.light_rank

    def select(self, view):
        return torch.zeros(0, dtype=torch.long)

    def pack(self, q, k, v, rows, last) -> list[torch.Tensor]:
        """(k_rows, v_rows [1,heavy,rank], k_lite, v_lite [1,light,light_rank]) of a full-prompt prefill."""
        attention = T.instruction_attention(q, k, rows, last)
        order = torch.topk(T.tie_break(attention[None]), attention.shape[0], dim=-1).indices[0]
        rank = self.basis_k.shape[2]
        return [T.project_heads(x[0].index_select(1, rows.index_select(0, part)), basis[0, :, :r])[None]
                for part, r in ((order[: self.heavy], rank), (order[self.heavy:], self.light_rank))
                for x, basis in ((k, self.basis_k), (v, self.basis_v))]


def image_kv(model, prompts, layers: list[int], entering: int, rows_at: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the image rows' keys and values (heads concatenated, [prompts x rows_at, Hkv*d]) of
    whole-prompt prefills through the model's stages so far (`entering` image rows reach the decoder,
    `rows_at` run these layers): what the packed caches will hold."""
    from vlmc.models_zoo.core import PromptRows
    from vlmc.passes.token.methods import causal_attend

    seen = {i: ([], []) for i in layers}
    base = causal_attend(model.config.text)
    with torch.no_grad():
        for embeds, start, last in prompts:
            rows = start + torch.arange(rows_at)

            def attend(i, q, k, v, shift):
                for store, x in zip(seen.get(i, ()), (k, v)):
                    store.append(x[0].index_select(1, rows).transpose(0, 1).flatten(1))
                return base(i, q, k, v, shift)

            model.run_decoder(embeds[:, : last + 1], torch.arange(last + 1)[None], attend,
                              PromptRows(torch.tensor([start]), entering, torch.tensor([last])))
    return {i: (torch.cat(k), torch.cat(v)) for i, (k, v) in seen.items()}


@register
class AttentionPack(TokenPass):
    """AttentionPack: every layer's cache holds the image rows' keys and values as coefficients on low-rank
    bases (heads concatenated, image rows apart from the text), the rows the question attends to most at
    the full rank and the others at fewer; decode steps attend in the rank space."""

    name = "attentionpack"
    kind = "kv"
    points = ("decoder.layer",)
    source = ("AttentionPack, from Attention-aware Inference Optimizations for Large Vision-Language Models with "
              "Memory-efficient Decoding (CVPR 2026 seed notes)")
    departures = ("the bases are fixed at export: per layer, the top-`rank` right singular vectors of the calibration "
                  "questions' image keys and values (after RoPE; the paper decomposes each prompt's cache, an SVD no "
                  "target's runtime has); partial decompression is two static groups, the `keep` rows the question "
                  "(text after the image) attends to most in the prefill at `rank`, the others at the leading "
                  "`light_rank` (the paper picks ranks per step from attention accumulated while decoding); attention "
                  "reads the coefficients in the rank space instead of decompressing rows; text rows stay float; the "
                  "prefill attends to the full rows, the decode steps to the packed ones")
    Config = AttentionPackConfig
    reads_text = True

    def layers(self, model) -> list[int]:
        return layers_from(self.config.at, model)

    def check(self, tokens_in, grid, model):
        c, t = self.config, model.config.text
        if c.keep >= tokens_in:
            raise VlmcError(f"pass attentionpack: parameter 'keep': {c.keep} must be below the {tokens_in} image rows "
                            f"at {c.at}")
        width = t.num_kv_heads * t.head_dim
        if c.rank >= width:
            raise VlmcError(f"pass attentionpack: parameter 'rank': {c.rank} must be below the {width} key dimensions "
                            f"({t.num_kv_heads} kv heads x {t.head_dim}) it compresses")
        if c.light_rank > c.rank:
            raise VlmcError(f"pass attentionpack: parameter 'light_rank': {c.light_rank} must be at most rank {c.rank}")

    def place(self, model, tokens_in, calibration=None):
        from vlmc.passes import tokens_at

        c, t, layers = self.config, model.config.text, self.layers(model)
        model.check_in_llm(c.at)  # before the calibration prefills
        if calibration is None:
            raise VlmcError("pass attentionpack: its bases come from calibration questions (recipe 'calibration')")
        kv = image_kv(model, calibration.prompts(model), layers, tokens_at(model, "projector.out"), tokens_in)
        placed = []
        for i in layers:
            bases = [T.principal_basis(x, c.rank).reshape(c.rank, t.num_kv_heads, t.head_dim).transpose(0, 1)[None].contiguous()
                     for x in kv[i]]
            placed.append((f"decoder.layer[{i}]", PackedKVStage(tokens_in, c.keep, c.light_rank, *bases)))
        return placed
