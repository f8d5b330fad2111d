"""Quant Experts for 4-bit weights: low-rank float experts that rebuild the quantization error, one shared
by every token and a few routed per token, with static shapes.

Quant Experts ("Token-aware Adaptive Error Reconstruction with Mixture of Experts for Large
Vision-Language Models Quantization", CVPR 2026) observes that part of a layer's quantization error
matters for every token (global) and part only for some tokens (local). It compensates the global part
with a shared low-rank expert and the local part with routed low-rank experts, each token using the
one its router picks.

Here, per linear of the part and on each target's own 4-bit grid (the target's quantizer stores the
weights; the experts stay float): the error E = W - Q(W); the shared expert is the rank-r fit of E
that minimises the output error over all calibration inputs (SVD of E whitened by their second
moments); the calibration inputs are clustered (k-means) and each routed expert is the rank-r fit of
what the shared expert left, whitened by its cluster's inputs. A token's router picks the expert of its
nearest cluster centre. Static shapes: every routed expert is computed for every token (two products
of width experts x rank) and masked to the chosen one, so no gather of a data-dependent size.
`base_rounding: gptq` runs GPTQ first and fits the experts to what its rounding left (the two compose).
Departures: the paper splits important channels by frequency into token-independent and token-dependent
groups and fits its experts by optimisation; here the split is shared versus per-cluster, each fitted in
closed form, and the router is the nearest calibration cluster (training-free).
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from vlmc.passes.quant.calibration import LayerInputs
from vlmc.passes.quant.gptq import Grid
from vlmc.passes.quant.smoothing import low_rank, replace_module

KMEANS_ITERATIONS = 25
SAMPLE_ROWS = 2048  # input rows kept per linear for the clustering (reservoir sample of the calibration set)
MARKER = "error_expert"  # in every expert parameter's name: the targets' quantizers leave these float


class ErrorExperts(nn.Module):
    """The expert parameters (float, never quantized) of one linear: y_experts = shared(x) + routed(x)."""

    def __init__(self, shared: tuple[torch.Tensor, torch.Tensor], routed: list[tuple[torch.Tensor, torch.Tensor]],
                 centroids: torch.Tensor):
        super().__init__()
        up, down = shared
        self.error_expert_shared_down = nn.Parameter(down.float(), requires_grad=False)
        self.error_expert_shared_up = nn.Parameter(up.float(), requires_grad=False)
        self.routed = bool(routed)
        if self.routed:
            rank = routed[0][0].shape[1]
            self.error_expert_routed_down = nn.Parameter(torch.cat([d for _, d in routed]).float(), requires_grad=False)
            self.error_expert_routed_up = nn.Parameter(torch.cat([u for u, _ in routed], 1).float(), requires_grad=False)
            # the router's nearest centre: argmax of x.c - |c|^2 / 2
            self.error_expert_router = nn.Parameter(centroids.float(), requires_grad=False)
            self.error_expert_router_bias = nn.Parameter(-0.5 * centroids.float().pow(2).sum(1), requires_grad=False)
            self.register_buffer("expert_of_column", torch.arange(len(routed)).repeat_interleave(rank))

    def forward(self, x):
        out = F.linear(F.linear(x, self.error_expert_shared_down), self.error_expert_shared_up)
        if self.routed:
            scores = F.linear(x, self.error_expert_router, self.error_expert_router_bias)
            chosen = (scores >= scores.amax(-1, keepdim=True)).to(x.dtype)  # one-hot (float: no boolean ops needed)
            hidden = F.linear(x, self.error_expert_routed_down) * chosen.index_select(-1, self.expert_of_column)
            out = out + F.linear(hidden, self.error_expert_routed_up)
        return out


class ExpertCompensatedLinear(nn.Module):
    """A linear the target quantizes (its weights are the original ones: the target's round-to-nearest
    gives exactly the Q(W) the experts were fitted to), plus its float error experts."""

    def __init__(self, linear: nn.Linear, experts: ErrorExperts):
        super().__init__()
        self.linear, self.experts = linear, experts

    def forward(self, x):
        return self.linear(x) + self.experts(x)


def kmeans(x: torch.Tensor, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(centres [k, d], each row's cluster) by k-means++ seeding and Lloyd iterations."""
    g = torch.Generator().manual_seed(seed)
    x = x.double()
    centres = x[torch.randint(len(x), (1,), generator=g)]
    for _ in range(1, k):
        d2 = torch.cdist(x, centres).amin(1).pow(2)
        pick = torch.multinomial(d2 / d2.sum(), 1, generator=g) if d2.sum() > 0 else torch.randint(len(x), (1,), generator=g)
        centres = torch.cat([centres, x[pick]])
    for _ in range(KMEANS_ITERATIONS):
        assign = torch.cdist(x, centres).argmin(1)
        for c in range(k):
            members = x[assign == c]
            if len(members):
                centres[c] = members.mean(0)
    return centres, torch.cdist(x, centres).argmin(1)


def fit(weight: torch.Tensor, quantized: torch.Tensor, inputs: LayerInputs, rank: int, experts: int) -> ErrorExperts:
    """The shared and routed experts of one linear from what it received over the calibration set."""
    error = weight.double() - quantized.double()
    shared = low_rank(error, inputs.hessian(None), rank)
    routed, centres = [], torch.zeros(0, weight.shape[1])
    rows = inputs.sample()
    if experts and len(rows) >= 2 * experts:
        centres, assign = kmeans(rows, experts)
        left = error - shared[0] @ shared[1]
        for c in range(experts):
            members = rows[assign == c].double()
            moments = members.T @ members / max(1, len(members))
            routed.append(low_rank(left, moments, rank))
    return ErrorExperts(shared, routed, centres)


def apply(model, schemes: dict, stats: dict[str, LayerInputs], grid: Grid, original: nn.Module) -> nn.Module:
    """A copy of `model` whose Quant Experts parts' linears carry float experts fitted to the error of what the
    target will store, `grid`'s rounding of their weights (on the grid already where GPTQ ran first), against
    `original`'s weights."""
    from vlmc.passes.quant import linear_layers

    model = copy.deepcopy(model)
    for part, scheme in schemes.items():
        rank, experts = scheme.param("rank"), scheme.param("experts")
        for name, layer in linear_layers(model, part):
            stored = grid.round_to_nearest(layer.weight.detach(), scheme.config.group_size)
            fitted = fit(original.get_submodule(name).weight.detach(), stored, stats[name], rank, experts)
            replace_module(model, name, ExpertCompensatedLinear(layer, fitted))
    return model
