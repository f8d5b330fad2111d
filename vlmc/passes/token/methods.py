"""Visual-token methods as registered passes: a scorer and a reducer from `functional`, placed at a point.

Each class names its source and where this static-shape version departs from the paper.
"""
from __future__ import annotations

import copy
import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from vlmc.errors import VlmcError
from vlmc.models_zoo.core import is_bypass
from vlmc.passes.registry import PassConfig, TokenPass, register
from vlmc.passes.token import functional as T

PRE_LLM = ("vision.out", "projector.out")


class KeepConfig(PassConfig):
    at: str = "projector.out"
    keep: int = Field(..., ge=1, description="visual tokens kept (static)")


class SelectConfig(KeepConfig):
    static: bool = Field(False, description="calibrated static mode: keep the tokens this method picks most often "
                                            "over the calibration images, as a constant gather (no selection cost)")
    indices: Optional[list[int]] = Field(None, description="the constant token indices (the static mode fills them in)")


def _check_keep(name: str, keep: int, tokens_in: int) -> None:
    if keep >= tokens_in:
        raise VlmcError(f"pass {name}: parameter 'keep': {keep} must be below the {tokens_in} tokens at this point")


def _check_indices(name: str, idx: list[int], keep: int, tokens_in: int, where: str = "") -> None:
    """Refuse a hand-given (or recorded) index list that is not `keep` distinct indices below `tokens_in`."""
    if len(idx) != keep or len(set(idx)) != len(idx) or not all(0 <= i < tokens_in for i in idx):
        raise VlmcError(f"pass {name}: parameter 'indices': needs {keep} distinct indices in 0..{tokens_in - 1}{where}")


def _check_cls(name: str, model) -> None:
    """VisionZip-style scoring reads the CLS token's attention and keeps only patch tokens."""
    if not model.vision_has_cls or model.features_have_cls:
        why = "has no CLS token" if not model.vision_has_cls else "keeps the CLS token in its features"
        raise VlmcError(f"pass {name}: needs a vision tower whose CLS token scores the patches and is dropped from "
                        f"the features; the {model.family} tower {why}")


def _check_grid(name: str, tokens_in: int, grid: int) -> None:
    if tokens_in != grid * grid:
        raise VlmcError(f"pass {name}: needs the full {grid}x{grid} token grid, but {tokens_in} tokens arrive here "
                        "(place it before other token passes, at vision.out or projector.out)")


class KeepPass(TokenPass):
    """A pre-LLM method that keeps `keep` tokens: the shared placement and parameter checks."""

    points = PRE_LLM
    Config = KeepConfig
    needs_grid = False  # works on the full square token grid only

    def check(self, tokens_in, grid, model):
        if self.needs_grid:
            _check_grid(self.name, tokens_in, grid)
        _check_keep(self.name, self.config.keep, tokens_in)


class SelectPass(KeepPass):
    """A method whose stage selects tokens (`select(x) -> (kept, indices)`), so it also has a calibrated
    static mode: the indices it picks most often over calibration images, folded in as a constant gather."""

    Config = SelectConfig

    def check(self, tokens_in, grid, model):
        super().check(tokens_in, grid, model)
        if self.config.indices is not None:
            _check_indices(self.name, self.config.indices, self.config.keep, tokens_in)

    def place(self, model, tokens_in, calibration=None):
        at = self.config.at
        if self.config.indices is not None:
            return [(at, ConstantGather(torch.tensor(sorted(self.config.indices))))]
        stage = self.stage(model, model.resolve(at), tokens_in)
        if not self.config.static:
            return [(at, stage)]
        from vlmc.passes import tokens_entering

        with torch.no_grad():
            picks = torch.cat([stage.select(x)[1] for x in tokens_entering(model, at, calibration())])
        idx = T.most_selected(picks, tokens_in, self.config.keep)
        self.config = self.config.model_copy(update={"indices": idx.tolist()})
        return [(at, ConstantGather(idx))]


class ConstantGather(nn.Module):
    def __init__(self, idx: torch.Tensor):
        super().__init__()
        self.register_buffer("idx", idx[None])

    def forward(self, x):
        return T.select_indices(x, self.idx)[0]


# ---------------------------------------------------------------- baselines

class RandomConfig(KeepConfig):
    seed: int = 0


@register
class RandomPrune(KeepPass):
    """Random (seeded) visual tokens: the baseline that beats many methods at 67-78% pruning."""

    name = "random"
    source = "UniPruneBench's random baseline"
    departures = "the seed fixes one index set at export time: the same tokens for every image, a constant gather"
    Config = RandomConfig

    def stage(self, model, point_module, tokens_in):
        n = tokens_in
        scores = T.random_scores(1, n, self.config.seed)[0]
        return ConstantGather(torch.sort(torch.topk(scores, self.config.keep).indices).values)


class PoolStage(nn.Module):
    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        self.register_buffer("matrix", matrix)

    def forward(self, x):
        return T.spatial_pool(x, self.matrix)[0]


@register
class SpatialPooling(KeepPass):
    """Average pooling of the token grid to sqrt(keep) x sqrt(keep) (VTC-Bench's strong baseline)."""

    name = "pooling"
    source = "VTC-Bench / LLaVA-style adaptive average pooling"
    departures = "adaptive average pooling written as a constant matmul; keep must be a square number"
    needs_grid = True

    def check(self, tokens_in, grid, model):
        super().check(tokens_in, grid, model)
        side = math.isqrt(self.config.keep)
        if side * side != self.config.keep:
            raise VlmcError(f"pass pooling: parameter 'keep': {self.config.keep} is not a square number (e.g. {side * side} or {(side + 1) ** 2})")

    def stage(self, model, point_module, tokens_in):
        grid = math.isqrt(tokens_in)
        return PoolStage(T.pooling_matrix(grid, math.isqrt(self.config.keep)))


# ---------------------------------------------------------------- diversity

class SelectingStage(nn.Module):
    """A stage that keeps the tokens its `select(x) -> (kept, indices)` picks (the static mode reuses select)."""

    def forward(self, x):
        return self.select(x)[0]


class FarthestStage(SelectingStage):
    def __init__(self, keep: int, coords: torch.Tensor | None = None, spatial_weight: float = 0.0):
        super().__init__()
        self.keep, self.spatial_weight = keep, spatial_weight
        self.register_buffer("coords", coords if coords is not None else torch.zeros(0))

    def select(self, x):
        if self.spatial_weight:
            feats = torch.cat([T.unit(x), self.spatial_weight * self.coords.expand(x.shape[0], -1, -1)], dim=-1)
            return T.select_farthest(x, feats, self.keep, cosine=False)
        return T.select_farthest(x, x, self.keep, cosine=True)


@register
class DivPrune(SelectPass):
    """DivPrune: greedy max-min diversity on the cosine distance of the projected tokens."""

    name = "divprune"
    source = "DivPrune (Alvar et al., CVPR 2025)"
    departures = "k fixed at export (the first pick is the paper's code's: the most isolated token)"

    def stage(self, model, point_module, tokens_in):
        return FarthestStage(self.config.keep)


class TFPSConfig(SelectConfig):
    spatial_weight: float = Field(0.5, ge=0.0, description="weight of the normalised (x, y) patch position")


@register
class TokenFPS(SelectPass):
    """Prune2Drive's T-FPS: farthest point sampling over token features plus their spatial position."""

    name = "tfps"
    source = "Prune2Drive (T-FPS), CVPR 2026 seed notes"
    departures = "one view (no per-view budgets); Euclidean FPS on [normalised feature, weighted (x, y)], from the most isolated token"
    Config = TFPSConfig
    needs_grid = True

    def stage(self, model, point_module, tokens_in):
        grid = math.isqrt(tokens_in)
        ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        coords = torch.stack([xs, ys], -1).reshape(1, -1, 2).float() / max(1, grid - 1)
        return FarthestStage(self.config.keep, coords, self.config.spatial_weight or 1e-6)


class SCoReConfig(SelectConfig):
    salience_power: float = Field(1.0, ge=0.0, description="exponent of the salience weight (0: plain DivPrune)")


class WeightedCenterStage(SelectingStage):
    def __init__(self, keep: int, power: float):
        super().__init__()
        self.keep, self.power = keep, power

    def select(self, x):
        weights = T.salience(x).clamp_min(1e-3) ** self.power
        idx = T.ascending(T.farthest_point(x, self.keep, weights=weights))
        return T.gather_tokens(x, idx), idx


@register
class SCoRe(SelectPass):
    """SCoRe: weighted k-center, each greedy step takes the token with the largest salience x distance to
    the tokens already kept, so salient tokens win among those that also widen the coverage."""

    name = "score"
    source = "SCoRe (salience x coverage, weighted k-center), CVPR 2026 seed notes"
    departures = ("salience is the token's cosine distance from the image's mean token (no attention or text); "
                  "cosine distance on the projected tokens; k fixed at export")
    Config = SCoReConfig

    def stage(self, model, point_module, tokens_in):
        return WeightedCenterStage(self.config.keep, self.config.salience_power)


class ResidualStage(SelectingStage):
    def __init__(self, keep: int):
        super().__init__()
        self.keep = keep

    def select(self, x):
        idx = T.ascending(T.greedy_residual(x, self.keep))
        return T.gather_tokens(x, idx), idx


@register
class ApET(SelectPass):
    """ApET: keep the tokens the kept set approximates worst; each greedy step adds the token with the
    largest linear-approximation (reconstruction) error from the tokens already kept."""

    name = "apet"
    source = "ApET, approximation-error token selection (CVPR 2026 seed notes)"
    departures = ("the error is the least-squares residual onto the span of the kept tokens (column-pivoted QR), "
                  "first pick the largest token; no learned or text part; k fixed at export")

    def stage(self, model, point_module, tokens_in):
        return ResidualStage(self.config.keep)


class ZooConfig(SelectConfig):
    at: str = "vision.out"
    directions: int = Field(2, ge=1, description="random directions of the zeroth-order estimate (fixed at export)")
    eps: float = Field(0.05, gt=0.0, description="finite-difference step, relative to the tokens' mean norm")
    seed: int = 0


class SensitivityStage(SelectingStage):
    def __init__(self, keep: int, projector: nn.Module, directions: torch.Tensor, eps: float):
        super().__init__()
        self.keep, self.projector, self.eps = keep, projector, eps
        self.register_buffer("directions", directions)

    def select(self, x):
        projected = self.projector(x)
        sens = T.projector_sensitivity(x, projected, self.projector, self.directions, self.eps * x.norm(dim=-1).mean())
        weights = sens / sens.amax(dim=-1, keepdim=True).clamp_min(1e-12)
        idx = T.ascending(T.farthest_point(projected, self.keep, weights=weights))
        return T.gather_tokens(x, idx), idx


@register
class ZooPrune(SelectPass):
    """ZOO-Prune: sensitivity through the projector, estimated zeroth-order (finite differences along random
    directions), times diversity: a weighted k-center on the projected tokens weighted by sensitivity."""

    name = "zooprune"
    source = "ZOO-Prune, zeroth-order sensitivity x diversity (CVPR 2026 seed notes)"
    departures = ("a fixed set of seeded random directions (the same in every runtime) and a step relative to the "
                  "tokens' mean norm; diversity is SCoRe's weighted k-center on cosine distance; k fixed at export")
    Config = ZooConfig
    points = ("vision.out",)

    def stage(self, model, point_module, tokens_in):
        c = self.config
        g = torch.Generator().manual_seed(c.seed)
        directions = F.normalize(torch.randn(c.directions, model.vision_width, generator=g), dim=-1)
        return SensitivityStage(c.keep, model.connector, directions, c.eps)


class VLMPrunerConfig(SelectConfig):
    buffer: float = Field(2.0, gt=0.0, description="minimum grid distance between kept tokens (halved, then dropped, "
                                                   "when no token is left that far)")


class SpreadStage(SelectingStage):
    def __init__(self, keep: int, coords: torch.Tensor, buffer: float):
        super().__init__()
        self.keep = keep
        self.register_buffer("tiers", T.spread_tiers(torch.cdist(coords, coords), buffer))

    def select(self, x):
        idx = T.ascending(T.buffered_spread(T.salience(x), self.tiers, self.keep))
        return T.gather_tokens(x, idx), idx


@register
class VLMPruner(SelectPass):
    """VLM-Pruner: centrifugal selection, from the most salient token outwards, with a spatial buffer that
    keeps the kept tokens sparse over the image (relaxed when the buffer leaves no candidate)."""

    name = "vlmpruner"
    source = "VLM-Pruner, centrifugal token selection with buffered spatial sparsity (CVPR 2026 seed notes)"
    departures = ("importance is SCoRe's salience (cosine distance from the mean token); the buffer is relaxed in "
                  "two tiers (half, then none) instead of adaptively; k fixed at export")
    Config = VLMPrunerConfig
    needs_grid = True

    def stage(self, model, point_module, tokens_in):
        grid = math.isqrt(tokens_in)
        ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        return SpreadStage(self.config.keep, torch.stack([xs, ys], -1).reshape(-1, 2).float(), self.config.buffer)


class CoInConfig(SelectConfig):
    informativeness: float = Field(2.0, ge=0.0, description="theta in quality = exp(theta x salience) (0: coverage only)")


class VolumeStage(SelectingStage):
    def __init__(self, keep: int, theta: float):
        super().__init__()
        self.keep, self.theta = keep, theta

    def select(self, x):
        quality = torch.exp(self.theta * T.salience(x))
        idx = T.ascending(T.greedy_log_det(x, quality, self.keep))
        return T.gather_tokens(x, idx), idx


@register
class CoIn(SelectPass):
    """CoIn: informativeness x coverage as the volume (log-det) of the kept tokens' quality-weighted
    similarity kernel, maximised greedily (a submodular objective)."""

    name = "coin"
    source = "CoIn (informativeness x coverage by log-det volume, greedy), CVPR 2026 seed notes"
    departures = ("informativeness is visual salience only (cosine distance from the mean token): the paper's "
                  "cross-modal alignment term needs the question, which pre-LLM passes do not read; greedy MAP by "
                  "incremental Cholesky, unrolled for the static k")
    Config = CoInConfig

    def stage(self, model, point_module, tokens_in):
        return VolumeStage(self.config.keep, self.config.informativeness)


class ForegroundStage(SelectingStage):
    def __init__(self, keep: int, border: torch.Tensor):
        super().__init__()
        self.keep = keep
        self.register_buffer("border", border)

    def select(self, x):
        return T.select_topk(x, T.foreground_scores(x, self.border), self.keep)


@register
class DocPruneBackground(SelectPass):
    """DocPrune's first stage: remove background tokens, those most like the background prototype (the
    mean of the grid's border tokens), keeping the `keep` most unlike it."""

    name = "docprune"
    source = "DocPrune stage 1 (background removal), CVPR 2026 seed notes"
    departures = ("stage 1 only (stages 2-3 read the question and adapt the count); a fixed keep instead of a "
                  "threshold; the background prototype is the border tokens' mean")
    needs_grid = True

    def stage(self, model, point_module, tokens_in):
        return ForegroundStage(self.config.keep, T.border_mask(math.isqrt(tokens_in)))


# ---------------------------------------------------------------- attention-based

class EmbedLensConfig(SelectConfig):
    inject: int = Field(0, ge=0, description="decoder layer at which the image rows enter the LLM: layers 0..inject-1 "
                                             "run the text alone (0: every layer sees them)")
    sink_factor: float = Field(10.0, gt=1.0, description="a token whose norm exceeds this many times the image's median "
                                                         "token norm is a sink, never kept")
    reading: Literal["distinct", "vocabulary"] = Field("distinct", description="how alive a token is: distinct (how far "
                                                     "it points from the image's mean token) or vocabulary (its largest "
                                                     "cosine similarity to the LLM's token embeddings)")


class LensStage(SelectingStage):
    def __init__(self, keep: int, vocabulary: Optional[torch.Tensor], sink_factor: float, width: int):
        super().__init__()
        self.keep, self.sink_factor, self.width = keep, sink_factor, width
        self.register_buffer("vocabulary", vocabulary)  # None: the distinct reading

    def select(self, x):
        main = x if x.shape[-1] == self.width else x[..., : self.width]  # DeepStack's extra columns aside (a no-op
        return T.select_topk(x, T.lens_scores(main, self.vocabulary, self.sink_factor), self.keep)  # slice: Core ML alias)


@register
class EmbedLens(SelectPass):
    """EmbedLens: keep the alive visual tokens (those that already read as language to the LLM), never its
    sinks, and let the image rows enter the LLM at a middle layer."""

    name = "embedlens"
    points = ("projector.out",)
    source = ("EmbedLens: sink, dead and alive visual tokens; alive tokens are pre-linguistic, so the image can be "
              "injected at a middle layer (CVPR 2026 seed notes)")
    departures = ("the paper's probe classification is replaced by training-free readings at projector.out: a sink is "
                  "a token whose norm exceeds `sink_factor` times the image's median; a token is alive as far as it "
                  "points away from the image's mean token (`reading: distinct`, default) or as far as its largest cosine "
                  "similarity to the LLM's token embeddings goes (`reading: vocabulary`, the paper's 'pre-linguistic' "
                  "reading; the vision_encoder then carries the normalised embedding table, vocabulary x hidden floats); "
                  "the most alive `keep` are kept, a static count, the rest count as dead. The default is distinct "
                  "because the vocabulary reading kept the wrong tokens on the built-in model, whose visual tokens were "
                  "never aligned with words (docs/sweep_embedlens). The injection layer is a parameter, not found per "
                  "model; injected rows skip layers 0..inject-1 (no cache rows there) and keep their positions")
    Config = EmbedLensConfig

    def check(self, tokens_in, grid, model):
        super().check(tokens_in, grid, model)
        layers = model.config.text.num_layers
        if self.config.inject >= layers:
            raise VlmcError(f"pass embedlens: parameter 'inject': decoder.layer[{self.config.inject}] is past the "
                            f"decoder's last layer ({layers - 1})")

    def stage(self, model, point_module, tokens_in):
        table = T.unit(model.embed_tokens.weight.detach().float()) if self.config.reading == "vocabulary" else None
        return LensStage(self.config.keep, table, self.config.sink_factor, model.config.text.hidden_size)

    def place(self, model, tokens_in, calibration=None):
        placed = super().place(model, tokens_in, calibration)
        if self.config.inject:
            self.reads_text = False
            placed += [(f"decoder.layer[{layer}]", ConstantRowsStage(torch.zeros(0, dtype=torch.long), self.config.keep,
                                                                     bypass=True)) for layer in range(self.config.inject)]
        return placed


class VisionZipConfig(PassConfig):
    at: str = "vision.block[-1]"
    dominant: int = Field(..., ge=1, description="tokens kept by CLS attention")
    contextual: int = Field(..., ge=1, description="merged tokens made of the rest")


class VisionZipStage(nn.Module):
    wants_block_input = True

    def __init__(self, block, dominant: int, contextual: int):
        super().__init__()
        self.block = block
        self.dominant, self.contextual = dominant, contextual

    def dominance(self, x_in):
        """(each patch's dominance score [B, N], its key averaged over heads [B, N, d]) from the block's
        input x_in [B, 1+N, D]: here the CLS token's attention, summed over heads."""
        k = self.block.keys(x_in)
        cls_attn = T.attention_row(self.block.queries(x_in[:, :1]), k).sum(dim=1)[:, 1:]  # CLS column dropped
        return cls_attn, T.head_mean(k)[:, 1:]

    def forward(self, x, x_in):
        scores, keys = self.dominance(x_in)
        reduced, _ = T.dominant_and_contextual(x[:, 1:], scores, keys, self.dominant, self.contextual)
        return torch.cat([x[:, :1], reduced], dim=1)


@register
class VisionZip(TokenPass):
    """VisionZip: dominant tokens by CLS attention, the rest merged into contextual tokens by key similarity."""

    name = "visionzip"
    source = "VisionZip (Yang et al., CVPR 2025)"
    departures = "acts on the output of the feature-layer block using that block's CLS attention and keys; merges are one-hot matmuls"
    points = ("vision.block",)
    Config = VisionZipConfig

    def check(self, tokens_in, grid, model):
        n = tokens_in - 1  # CLS excluded
        c = self.config
        if c.dominant + c.contextual >= n:
            raise VlmcError(f"pass visionzip: parameters 'dominant' + 'contextual' = {c.dominant + c.contextual} must be below the {n} patch tokens")
        _check_cls("visionzip", model)

    def stage(self, model, point_module, tokens_in):
        return VisionZipStage(point_module, self.config.dominant, self.config.contextual)


# ---------------------------------------------------------------- merging inside the vision tower

class CoreConfig(KeepConfig):
    compactness: float = Field(0.5, ge=0.0, le=100.0, description="weight of the grid distance against feature "
                               "dissimilarity in the grouping (larger: rounder, more local groups)")
    iterations: int = Field(4, ge=1, le=20, description="k-means refinements of the groups (unrolled in the graph)")


class ObjectMergeStage(nn.Module):
    def __init__(self, grid: int, seeds: torch.Tensor, compactness: float, iterations: int):
        super().__init__()
        self.grid, self.compactness, self.iterations = grid, compactness, iterations
        self.register_buffer("seeds", seeds)

    def forward(self, x):
        return T.object_merge(x, x, self.grid, self.seeds, self.compactness, self.iterations)[0]


@register
class Core(KeepPass):
    """CORE: the visual tokens merged by object, one token per object (the mean of its tokens), in the
    raster order of the objects' centroids."""

    name = "core"
    source = "CORE: Compact Object-centric REpresentations as a New Paradigm for Token Merging in LVLMs (CVPR 2026)"
    departures = ("training-free grouping instead of the paper's segmentation head: SLIC-style k-means over the "
                  "token features (cosine) with a spatial term, seeded on `keep` evenly spread grid cells, a fixed "
                  "number of refinements unrolled in the graph; groups are local but not forced connected; each seed "
                  "cell stays in its group, so exactly `keep` non-empty groups (static count); plain means, not the "
                  "paper's mask-weighted ones")
    Config = CoreConfig
    needs_grid = True

    def stage(self, model, point_module, tokens_in):
        grid = math.isqrt(tokens_in)
        c = self.config
        return ObjectMergeStage(grid, T.spread_seeds(grid, c.keep), c.compactness, c.iterations)


class ToMeConfig(PassConfig):
    at: str = "vision.block[0]"
    r: int = Field(..., ge=1, description="tokens merged away in each block, from `at` to the feature layer")


class ToMeStage(nn.Module):
    """Bipartite soft matching on the block's keys (averaged over heads); CLS is never merged."""

    wants_block_input = True
    tracks_size = True

    def __init__(self, block, r: int, protect_first: bool):
        super().__init__()
        self.block, self.r, self.protect_first = block, r, protect_first

    def forward(self, x, x_in, size):
        if size is None:
            size = torch.ones_like(x[..., :1])
        keys = T.head_mean(self.block.keys(x_in))
        return T.bipartite_soft_matching(x, keys, size, self.r, protect_first=self.protect_first)


@register
class ToMe(TokenPass):
    """ToMe: merge r tokens per vision block into their most similar partner, with size tracking and
    proportional attention in the blocks after a merge."""

    name = "tome"
    source = "Token Merging (Bolya et al., ICLR 2023)"
    departures = ("merges after each block rather than between its attention and MLP (the block's own keys are "
                  "the metric, as in ToMe); merges are one-hot assignment matmuls; merged tokens leave the grid "
                  "order (unmerged first), as in ToMe")
    points = ("vision.block",)
    Config = ToMeConfig

    def _blocks(self, model) -> range:
        first = int(self.config.at.split("[")[1].rstrip("]"))
        return range(first, model.num_vision_blocks)

    def check(self, tokens_in, grid, model):
        n = tokens_in  # CLS included
        for i in self._blocks(model):
            mergeable = (n + 1) // 2 - int(model.vision_has_cls)  # set A is the even positions; a CLS (position 0) is protected
            if self.config.r > mergeable:
                raise VlmcError(f"pass tome: parameter 'r': {self.config.r} is too large for vision.block[{i}] "
                                f"({n} tokens there: at most {mergeable} can merge)")
            n -= self.config.r

    def place(self, model, tokens_in, calibration=None):
        return [(f"vision.block[{i}]", ToMeStage(model.resolve(f"vision.block[{i}]"), self.config.r, model.vision_has_cls)) for i in self._blocks(model)]


# ---------------------------------------------------------------- inside the LLM

class LayerKeepConfig(PassConfig):
    at: str = Field("decoder.layer[1]", description="decoder.layer[L]: the image rows are dropped after layer L "
                                                    "(FastV's K = L + 1)")
    keep: int = Field(..., ge=1, description="image tokens the later layers keep (static)")
    static: bool = Field(False, description="calibrated static mode: every prompt keeps the image rows this method "
                                            "keeps most often over the calibration questions, a constant gather "
                                            "(no scoring in the graph, the question no longer matters)")
    indices: Optional[list[list[int]]] = Field(None, description="per dropping layer, the constant kept image rows "
                                                                 "(indices into the rows entering it; the static "
                                                                 "mode fills them in)")

    @field_validator("indices", mode="before")
    @classmethod
    def _one_layer(cls, v):
        """A flat list is the one dropping layer's rows."""
        return [v] if isinstance(v, list) and v and all(isinstance(i, int) for i in v) else v


def _layer(at: str) -> int:
    return int(at.split("[")[1].rstrip("]"))


class LayerStage(nn.Module):
    """An in-LLM stage: after its layer keeps `keep` of the image rows (`select(view)` -> ascending
    indices into them); `dropped` is static, so every later layer's cache is that much shorter."""

    def __init__(self, keep: int, tokens_in: int):
        super().__init__()
        self.keep, self.dropped = keep, tokens_in - keep


class LayerPass(TokenPass):
    """A method acting inside the LLM on a full-prompt prefill (the vlmc runner's `text_prefill`)."""

    points = ("decoder.layer",)
    reads_text = True
    Config = LayerKeepConfig

    def check(self, tokens_in, grid, model):
        last = model.config.text.num_layers - 1
        for layer in self.layers():
            if layer >= last:
                raise VlmcError(f"pass {self.name}: parameter 'at': decoder.layer[{layer}] is the last layer, dropping "
                                f"tokens after it saves nothing (use decoder.layer[0..{last - 1}])")
        _check_keep(self.name, self.config.keep, tokens_in)

    def layers(self) -> list[int]:
        return [_layer(self.config.at)]

    def stages(self, model, tokens_in, calibration=None) -> list[tuple[str, nn.Module]]:
        """The scoring stages, (point, stage) pairs in the order they act."""
        return [(self.config.at, self.stage(model, model.resolve(self.config.at), tokens_in))]

    def place(self, model, tokens_in, calibration=None):
        placed = self.stages(model, tokens_in, calibration)
        if self.config.indices is None and not self.config.static:
            return placed
        if self.config.indices is None:
            if calibration is None:
                raise VlmcError(f"pass {self.name}: 'static' needs calibration questions (recipe 'calibration')")
            from vlmc.passes import kept_rows_most_often

            rows = kept_rows_most_often(model, placed, calibration)
            self.config = self.config.model_copy(update={"indices": [r.tolist() for r in rows]})
        self.reads_text = False  # the kept rows no longer depend on the question
        return self._constant(placed)

    def _constant(self, placed):
        """The in-LLM stages of `placed` replaced by constant gathers of `indices`."""
        in_llm = [stage for point, stage in placed if point.startswith("decoder.")]
        rows = self.config.indices
        if len(rows) != len(in_llm):
            raise VlmcError(f"pass {self.name}: parameter 'indices': needs one list per dropping layer ({len(in_llm)}), "
                            f"not {len(rows)}")
        for r, stage in zip(rows, in_llm):
            _check_indices(self.name, r, stage.keep, stage.keep + stage.dropped, " for each dropping layer")
        constant = iter(ConstantRowsStage(torch.tensor(sorted(r)), stage.dropped, is_bypass(stage))
                        for r, stage in zip(rows, in_llm))
        return [(point, next(constant) if point.startswith("decoder.") else stage) for point, stage in placed]


class ConstantRowsStage(LayerStage):
    """The calibrated static mode inside the LLM: the same image rows kept (or, for a bypass stage, the
    same rows computing its layer) for every prompt."""

    def __init__(self, rows: torch.Tensor, dropped: int, bypass: bool = False):
        super().__init__(rows.shape[0], rows.shape[0] + dropped)
        self.register_buffer("rows", rows)
        self.bypass = bypass

    def select(self, view):
        return self.rows


class LastTokenAttentionStage(LayerStage):
    def select(self, view):
        return T.top_indices(T.last_token_attention(view.q, view.k, view.image_rows, view.last), self.keep)


@register
class FastV(LayerPass):
    """FastV: after layer L keep the image tokens the last prompt token attends to most (mean over heads)."""

    name = "fastv"
    source = "FastV (Chen et al., ECCV 2024)"
    departures = ("R is a token count fixed at export (the paper's ratio at K=2 is keep = 50% of 576); the score "
                  "is layer L's own attention row, so `at: decoder.layer[L]` is the paper's K = L + 1")

    def stage(self, model, point_module, tokens_in):
        return LastTokenAttentionStage(self.config.keep, tokens_in)


class V2DropConfig(LayerKeepConfig):
    steps: int = Field(1, ge=1, description="consecutive layers from `at` that drop tokens, the count shrinking "
                                            "geometrically to `keep` (progressive dropping)")


class VariationStage(LayerStage):
    def select(self, view):
        return T.top_indices(T.variation(view.h_in, view.h, view.image_rows), self.keep)


@register
class V2Drop(LayerPass):
    """V2Drop: drop the image tokens whose representation a layer changed least, progressively."""

    name = "v2drop"
    source = "V2Drop, variation-aware vision token dropping (CVPR 2026 seed notes)"
    departures = ("the variation is the relative L2 change ‖h_L - h_{L-1}‖ / ‖h_{L-1}‖ of the token across layer L; "
                  "the per-layer counts are fixed at export (geometric from the image's tokens to `keep`)")
    Config = V2DropConfig

    def layers(self):
        first = _layer(self.config.at)
        return list(range(first, first + self.config.steps))

    def layer_stage(self, keep: int, tokens_in: int) -> LayerStage:
        return VariationStage(keep, tokens_in)

    def stages(self, model, tokens_in, calibration=None):
        n, keep, steps = tokens_in, self.config.keep, self.config.steps
        counts = [round(n * (keep / n) ** (j / steps)) for j in range(1, steps)] + [keep]
        placed = []
        for layer, count in zip(self.layers(), counts):
            if count >= n:
                raise VlmcError(f"pass {self.name}: parameter 'steps': {steps} steps from {tokens_in} to {keep} tokens "
                                "leave a step that drops nothing (use fewer steps)")
            placed.append((f"decoder.layer[{layer}]", self.layer_stage(count, n)))
            n = count
        return placed


class AlvtsConfig(LayerKeepConfig):
    at: str = Field("decoder.layer[1]", description="decoder.layer[L]: the first layer that computes only `keep` of the "
                                                    "image rows")
    keep: int = Field(..., ge=1, description="image rows each re-selecting layer computes (static); the rest skip it "
                                             "and rejoin unchanged after it")
    layers: Optional[int] = Field(None, ge=1, description="consecutive layers from `at` that re-select (default: through "
                                                          "the last layer)")
    rank: int = Field(16, ge=1, description="rank of the scorer's estimate of each layer's attention logits")


class LowRankBypassStage(LayerStage):
    """Before its layer: the image rows the question's last row would attend to most, estimated by a
    low-rank form of the layer's own query and key projections on its normalised input, run the layer;
    the rest skip it (`bypass`)."""

    bypass = True

    def __init__(self, keep: int, tokens_in: int, norm: nn.Module, factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        super().__init__(keep, tokens_in)
        self.norm = copy.deepcopy(norm)
        for name, t in zip(("a", "b", "c"), factors):
            self.register_buffer(name, t)

    def select(self, view):
        x = self.norm(view.h_in)[0]
        scores = T.low_rank_scores(x.index_select(0, view.last)[0], x.index_select(0, view.image_rows), self.a, self.b, self.c)
        return T.top_indices(scores, self.keep)


@register
class Alvts(LayerPass):
    """ALVTS: every layer from `at` re-selects the image rows it computes; the others skip that layer and
    rejoin after it, so a row unimportant to one layer is still there for the next."""

    name = "alvts"
    source = ("ALVTS, 'One Layer's Trash is Another Layer's Treasure': adaptive layer-wise visual token selection "
              "(CVPR 2026 seed notes)")
    departures = ("the selector is training-free: each layer's attention logits from the question's last row, in a "
                  "rank-`rank` bilinear form of that layer's query and key projections (truncated SVD of sum_h Wq_h^T "
                  "Wk_h, plus the query bias's term) on its own normalised input, where the paper trains a lightweight "
                  "low-rank selector; RoPE and per-head q/k norms are left out of the estimate; a static count per layer; "
                  "skipped rows enter neither that layer's attention nor its cache (the cache is that much shorter)")
    Config = AlvtsConfig

    def check(self, tokens_in, grid, model):
        total, first = model.config.text.num_layers, _layer(self.config.at)
        if self.config.layers is not None and first + self.config.layers > total:
            raise VlmcError(f"pass alvts: parameter 'layers': {self.config.layers} layers from decoder.layer[{first}] "
                            f"run past the decoder's {total}")
        if self.config.rank > model.config.text.hidden_size:
            raise VlmcError(f"pass alvts: parameter 'rank': {self.config.rank} is above the decoder's width "
                            f"{model.config.text.hidden_size}")
        _check_keep(self.name, self.config.keep, tokens_in)

    def stages(self, model, tokens_in, calibration=None):
        t, first = model.config.text, _layer(self.config.at)
        end = t.num_layers if self.config.layers is None else first + self.config.layers
        placed = []
        for layer in range(first, end):
            norm, q, k = model.attention_projections(layer)
            factors = T.attention_factors(q.weight.detach(), k.weight.detach(),
                                          None if q.bias is None else q.bias.detach(), t.num_heads, t.num_kv_heads,
                                          self.config.rank)
            placed.append((f"decoder.layer[{layer}]", LowRankBypassStage(self.config.keep, tokens_in, norm, factors)))
        return placed


class TransPruneConfig(LayerKeepConfig):
    instruction_weight: float = Field(1.0, ge=0.0, description="weight of the instruction-guided attention against "
                                                               "the token transition variation")


class TransitionStage(LayerStage):
    def __init__(self, keep, tokens_in, instruction_weight):
        super().__init__(keep, tokens_in)
        self.instruction_weight = instruction_weight

    def select(self, view):
        magnitude, direction = T.transition(view.h_in, view.h, view.image_rows)
        unit = lambda s: s / s.amax(dim=-1, keepdim=True).clamp_min(1e-12)  # noqa: E731
        attention = T.instruction_attention(view.q, view.k, view.image_rows, view.last)
        return T.top_indices(unit(magnitude) + unit(direction) + self.instruction_weight * unit(attention), self.keep)


@register
class TransPrune(LayerPass):
    """TransPrune: token transition variation (magnitude and direction change across a layer) plus the
    instruction's attention to each image token."""

    name = "transprune"
    source = "TransPrune (token transition pruning, CVPR 2026 seed notes)"
    departures = ("one dropping layer with a static count (the paper prunes progressively); the two parts of the "
                  "transition variation and the instruction attention are each scaled to max 1 and summed")
    Config = TransPruneConfig

    def stage(self, model, point_module, tokens_in):
        return TransitionStage(self.config.keep, tokens_in, self.config.instruction_weight)


class InstructionAttentionStage(LayerStage):
    def select(self, view):
        return T.top_indices(T.instruction_attention(view.q, view.k, view.image_rows, view.last), self.keep)


class V2VDominantStage(VisionZipStage):
    """DUET's vision stage at the feature-layer block: dominant tokens by the attention the patches pay
    each other (V2V: received attention, mean over patch queries and heads), the rest merged."""

    def dominance(self, x_in):
        h = x_in[:, 1:]  # patches only
        q, k = self.block.queries(h), self.block.keys(h)
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # [B, H, N, N]
        return T.mean_of_rows(attention.flatten(1, 2)), T.head_mean(k)


class DuetConfig(V2DropConfig):
    dominant: int = Field(..., ge=1, description="vision stage: tokens kept by V2V attention")
    contextual: int = Field(..., ge=1, description="vision stage: merged tokens made of the rest")


@register
class DuetVLM(V2Drop):
    """DUET-VLM: a vision stage (V2V-attention dominant tokens + merged contextual tokens, at the feature
    layer) and an LLM stage (the instruction's attention to the image rows, hierarchically over `steps` layers)."""

    name = "duet"
    source = "DUET-VLM, dual-stage unified efficient token reduction (CVPR 2026 seed notes)"
    departures = ("the contextual tokens join their most key-similar target (VisionZip's merge) rather than "
                  "attention-guided local clusters; T2V attention is the instruction rows' mean softmax attention; "
                  "every count is fixed at export")
    Config = DuetConfig

    @classmethod
    def acts_at(cls):
        return ["vision.block (the feature layer's)", "decoder.layer"]

    def check(self, tokens_in, grid, model):
        super().check(tokens_in, grid, model)
        c, n = self.config, model.num_image_tokens
        _check_cls("duet", model)
        if tokens_in != n:
            raise VlmcError(f"pass duet: its vision stage needs all {n} image tokens, but {tokens_in} arrive (use it alone)")
        if c.dominant + c.contextual >= n:
            raise VlmcError(f"pass duet: parameters 'dominant' + 'contextual' = {c.dominant + c.contextual} must be below the {n} patch tokens")
        if c.keep >= c.dominant + c.contextual:
            raise VlmcError(f"pass duet: parameter 'keep': {c.keep} must be below the vision stage's "
                            f"{c.dominant + c.contextual} tokens (dominant + contextual)")

    def layer_stage(self, keep, tokens_in):
        return InstructionAttentionStage(keep, tokens_in)

    def stages(self, model, tokens_in, calibration=None):
        c = self.config
        block = f"vision.block[{model.num_vision_blocks - 1}]"
        vision = (block, V2VDominantStage(model.resolve(block), c.dominant, c.contextual))
        return [vision] + super().stages(model, c.dominant + c.contextual, calibration)


def causal_attend(t, head_mask: Optional[tuple[int, torch.Tensor]] = None):
    """Eager causal attention over a whole prompt (grouped heads) for calibration runs; `head_mask`
    (layer, [H] weights) scales that layer's head outputs."""
    n_rep = t.num_heads // t.num_kv_heads

    def attend(i, q, k, v, shift):
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1), is_causal=True)
        if head_mask is not None and i == head_mask[0]:
            out = out * head_mask[1].to(out.dtype)[None, :, None, None]
        return out.transpose(1, 2).flatten(2)

    attend.evicting = lambda i, q, k, v, idx, packed=None: attend(i, q, k, v, 0)  # no cache to evict from
    return attend


def head_importance(model, layer: int, prompts) -> torch.Tensor:
    """How much each attention head of decoder `layer` matters to the answer: the mean KL divergence of the
    last prompt token's next-token distribution when that head's output is zeroed, over calibration
    prompts; normalised to sum to 1 [H] (uniform if no head matters)."""
    t = model.config.text

    def answer(embeds, head=None):
        mask = None if head is None else (layer, (torch.arange(t.num_heads) != head).float())
        h = model.run_decoder(embeds, torch.arange(embeds.shape[1])[None], causal_attend(t, mask), stages={})
        return torch.log_softmax(model.lm_head(h[:, -1]), dim=-1)[0]

    kl = torch.zeros(t.num_heads, dtype=torch.float64)
    with torch.no_grad():
        for embeds, _, last in prompts:
            ref = answer(embeds[:, : last + 1])
            for head in range(t.num_heads):
                kl[head] += (ref.exp() * (ref - answer(embeds[:, : last + 1], head))).sum().double()
    total = kl.sum()
    return (kl / total if total > 0 else torch.full_like(kl, 1.0 / t.num_heads)).float()


class HawkConfig(LayerKeepConfig):
    head_weights: Optional[list[float]] = Field(None, description="per-head importance of the layer (calibrated over the "
                                                                  "calibration questions when not given)")


class HeadWeightedStage(LayerStage):
    def __init__(self, keep, tokens_in, head_weights: torch.Tensor):
        super().__init__(keep, tokens_in)
        self.register_buffer("head_weights", head_weights)

    def select(self, view):
        attention = T.instruction_attention(view.q, view.k, view.image_rows, view.last, self.head_weights)
        return T.top_indices(attention, self.keep)


@register
class Hawk(LayerPass):
    """HAWK: the instruction's attention to each image row at layer L, its heads weighted by an importance
    calibrated offline (how much the answer changes without the head)."""

    name = "hawk"
    source = "HAWK, head-importance-weighted text-to-image attention (CVPR 2026 seed notes)"
    departures = ("head importance is the mean KL of the answer distribution when the head is zeroed, over the "
                  "calibration questions (a closed form for the paper's offline calibration); the weights are written "
                  "into the bundle's recipe, so it rebuilds without the data")
    Config = HawkConfig

    def check(self, tokens_in, grid, model):
        super().check(tokens_in, grid, model)
        w, heads = self.config.head_weights, model.config.text.num_heads
        if w is not None and (len(w) != heads or min(w) < 0 or sum(w) <= 0):
            raise VlmcError(f"pass hawk: parameter 'head_weights': needs {heads} non-negative weights, not all zero")

    def stage(self, model, point_module, tokens_in):
        w = torch.tensor(self.config.head_weights, dtype=torch.float32)
        return HeadWeightedStage(self.config.keep, tokens_in, w / w.sum())

    def place(self, model, tokens_in, calibration=None):
        if self.config.head_weights is None:
            if calibration is None:
                raise VlmcError("pass hawk: needs calibration questions (recipe 'calibration') or 'head_weights'")
            w = head_importance(model, _layer(self.config.at), calibration.prompts(model))
            self.config = self.config.model_copy(update={"head_weights": [round(float(x), 6) for x in w]})
        return super().place(model, tokens_in, calibration)


def visual_information(model, prompts, layers: list[int]) -> list[float]:
    """The visual information left after each decoder layer in `layers`: the mean KL divergence of the
    answer distribution when all image rows but one are dropped after that layer (with the model's own
    in-LLM stages before it), over calibration prompts. Where it reaches ~0, the image rows carry nothing
    the later layers use: the Information Horizon."""
    from vlmc.models_zoo.core import PromptRows
    from vlmc.passes import tokens_at

    t, own = model.config.text, model.decoder_stages()
    n = tokens_at(model, "projector.out")

    def answer(embeds, start, last, stages):
        rows = PromptRows(torch.tensor([start]), n, torch.tensor([last]))
        h = model.run_decoder(embeds[:, : last + 1], torch.arange(last + 1)[None], causal_attend(t), rows, stages)
        return torch.log_softmax(model.lm_head(h[:, -1]), dim=-1)[0].double()

    kl = [0.0] * len(layers)
    with torch.no_grad():
        for embeds, start, last in prompts:
            ref = answer(embeds, start, last, own)
            for j, layer in enumerate(layers):
                left = tokens_at(model, f"decoder.layer[{layer}]")  # image rows after this layer's own stages
                probe = ConstantRowsStage(torch.tensor([0]), left - 1)
                probed = {**own, layer: own.get(layer, []) + [probe]}
                kl[j] += float((ref.exp() * (ref - answer(embeds, start, last, probed))).sum())
    return [round(v / max(1, len(prompts)), 6) for v in kl]


class HorizonConfig(PassConfig):
    at: str = Field("auto", description="decoder.layer[L] where random pruning starts, or auto: the information horizon "
                                        "measured on the calibration questions")
    keep: int = Field(..., ge=1, description="image rows the layers after the horizon keep (static)")
    seed: int = Field(0, description="which rows survive: a seeded random set, the same for every prompt")
    threshold: float = Field(0.1, gt=0, lt=1, description="auto: the horizon is the first layer whose visual information "
                                                          "(mean KL of the answer when all image rows but one are dropped "
                                                          "after it) is at most this fraction of the first layer's")
    measured_kl: Optional[list[float]] = Field(None, description="auto: the visual information per layer it measured "
                                                                 "(filled in, for the record)")


@register
class InformationHorizon(LayerPass):
    """Information Horizon: random pruning after the layer where visual information vanishes."""

    name = "horizon"
    source = "Information Horizon: random pruning beyond the layer where visual information dissipates (CVPR 2026 seed notes)"
    departures = ("the horizon is one layer found once per model on the calibration questions (the paper's depends on "
                  "each task's complexity), where dropping all image rows but one changes the answer distribution (mean "
                  "KL) by at most `threshold` of what it does after layer 0 (the paper's 'dissipates to zero', made "
                  "relative for shallow models); the random rows are seeded, one constant set for every prompt")
    Config = HorizonConfig
    reads_text = False

    @classmethod
    def check_at(cls, at: str) -> None:
        if at != "auto":
            super().check_at(at)

    def locate(self, model, calibration) -> None:
        if self.config.at != "auto":
            return
        if calibration is None:
            raise VlmcError("pass horizon: 'at: auto' needs calibration questions (recipe 'calibration') or an explicit "
                            "decoder.layer[L]")
        layers = list(range(model.config.text.num_layers - 1))
        if not layers:
            raise VlmcError("pass horizon: a one-layer decoder has no layer after which pruning saves anything")
        kl = visual_information(model, calibration.prompts(model), layers)
        below = [layer for layer, v in zip(layers, kl) if v <= self.config.threshold * kl[0]]
        if not below:
            raise VlmcError(f"pass horizon: no layer's visual information falls to {self.config.threshold} of layer 0's "
                            f"(measured per layer: {', '.join(f'{v:.3g}' for v in kl)}): this model reads its image rows "
                            "to the end; raise the threshold or give at: decoder.layer[L]")
        self.config = self.config.model_copy(update={"at": f"decoder.layer[{below[0]}]", "measured_kl": kl})

    def stage(self, model, point_module, tokens_in):
        scores = T.random_scores(1, tokens_in, self.config.seed)[0]
        rows = torch.sort(torch.topk(scores, self.config.keep).indices).values
        return ConstantRowsStage(rows, tokens_in - self.config.keep)

    def place(self, model, tokens_in, calibration=None):
        return self.stages(model, tokens_in, calibration)


class HiLoConfig(KeepConfig):
    at: str = "projector.out"
    keep: int = Field(..., ge=1, description="visual tokens kept through the whole decoder (static)")
    candidates: Optional[int] = Field(None, ge=1, description="the most valuable discarded tokens: they enter the "
                                                              "shallow layers and merge into the kept ones (default: keep)")
    layer: int = Field(1, ge=0, description="decoder layer after which the candidates merge into the kept rows and "
                                            "leave (their rows are in the caches of layers 0..layer only)")
    weight: float = Field(1.0, ge=0.0, le=100.0, description="a merged candidate counts as the attention the kept row "
                                                             "pays it times this, against the kept row's 1 (0: removed "
                                                             "without merging)")


class LostAndKeptStage(SelectingStage):
    """After the connector: the candidates, then the kept tokens (the order the removal layer reads)."""

    orders_rows = True

    def __init__(self, keep: int, candidates: int):
        super().__init__()
        self.keep, self.candidates = keep, candidates

    def select(self, x):
        return T.lost_and_kept(x, self.keep, self.candidates)


class CandidateMergeStage(LayerStage):
    """At the removal layer: each candidate merges into the kept row attending to it most, then leaves."""

    reads_row_order = True

    def __init__(self, keep: int, candidates: int, weight: float):
        super().__init__(keep, keep + candidates)
        self.weight = weight
        self.register_buffer("rows", torch.arange(candidates, candidates + keep))

    def select(self, view):
        return self.rows

    def merge(self, view, kept):
        return T.candidate_merge(view.q, view.k, view.h, view.image_rows, self.dropped, self.weight)


@register
class HiLoPrune(KeepPass):
    """Hi-Lo Prune: look at what you will lose before pruning. Keep the salient tokens, let the most valuable
    of the discarded ones (the candidates) into the shallow layers, where the kept rows read them, merge each
    into the kept row attending to it most, and remove them at one layer."""

    name = "hilo"
    points = ("projector.out",)
    source = "Hi-Lo Prune: Look at What You'll Lose before Pruning with Hierarchical Token Selection (CVPR 2026)"
    departures = ("the coarse-to-fine selection is two training-free levels at projector.out: coarse, the `keep` "
                  "tokens most distinct from the image's mean token (salience); fine, of the rest, the `candidates` "
                  "whose salience the kept set covers worst (salience x cosine distance to the nearest kept token); "
                  "the rest never reach the LLM. The candidates sit before the kept rows, so in layers 0..`layer` the "
                  "kept rows attend to them with the decoder's own causal attention (no attention logits are "
                  "changed, every target keeps its stock attention kernel); the explicit transfer is one "
                  "attention-guided merge after `layer`: each candidate joins the kept row whose query at that layer "
                  "attends to it most, weighted by that attention (softmax over the candidates, mean over heads) times `weight` "
                  "against the kept row's 1 (chosen on ShapesVQA val over an unweighted mean, which lost 5 points at "
                  "layer 1: docs/sweep_hilo); static counts throughout")
    Config = HiLoConfig
    reads_text = False

    def check(self, tokens_in, grid, model):
        c = self.config
        candidates = c.keep if c.candidates is None else c.candidates
        if c.keep + candidates > tokens_in:
            raise VlmcError(f"pass hilo: parameters 'keep' + 'candidates' = {c.keep + candidates} exceed the "
                            f"{tokens_in} tokens at {c.at}")
        last = model.config.text.num_layers - 1
        if c.layer >= last:
            raise VlmcError(f"pass hilo: parameter 'layer': removing the candidates after decoder.layer[{c.layer}] saves "
                            f"nothing (use 0..{last - 1})")
        self.config = c.model_copy(update={"candidates": candidates})

    def place(self, model, tokens_in, calibration=None):
        c = self.config
        return [(c.at, LostAndKeptStage(c.keep, c.candidates)),
                (f"decoder.layer[{c.layer}]", CandidateMergeStage(c.keep, c.candidates, c.weight))]
