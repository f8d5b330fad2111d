"""SmoothQuant and MASQuant for w8a8: move activation outliers into the weights before int8 activations.

SmoothQuant (Xiao et al., 2023): for linears fed by a norm, divide the norm's gain by
s_j = max|x_j|^alpha / max|w_j|^(1-alpha) per input channel and multiply the weights' column j by s_j.
The product is unchanged; the activations get flatter channel ranges and lose less to per-tensor int8.

MASQuant (modality-aware smoothing quantization): in a VLM decoder the visual rows' ranges dwarf the text
rows', so factors taken over both over-smooth the text. MASQuant takes factors per modality, s_v from the
visual rows and s_t from the text rows, divides each row by its own modality's factor, keeps one weight
W diag(s_t) and adds, for visual rows only, a low-rank correction of W diag(s_v - s_t) fitted by SVD on
whitened visual activations (the paper's cross-modal low-rank compensation).
Departures: a row's modality comes from its position (the prompt template puts the image at fixed
positions), so the graph needs no extra input and ExecuTorch's stock runner still works; the text is the
modality whose weights are exact; the correction's small linears are quantized like the others.
The vision tower and projector see only visual rows: there both methods are SmoothQuant.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from vlmc.errors import VlmcError
from vlmc.passes.quant.calibration import LayerInputs

DAMPING = 0.01  # of the mean diagonal, for a stable whitening of the visual activations
METHODS = ("smoothquant", "masquant")


class RowModality:
    """Which rows of the decoder call are the image's: positions [start, stop) of the prompt template.
    Reads the model's `row_positions` (set for the duration of each decoder call)."""

    def __init__(self, model: nn.Module, start: int, stop: int):
        self.model, self.start, self.stop = model, start, stop

    def visual(self) -> torch.Tensor:
        """1.0 on the image's rows, 0.0 elsewhere [B, T, 1] (float arithmetic: Core ML has no boolean and)."""
        pos = self.model.row_positions
        return ((pos >= self.start).float() * (pos < self.stop).float())[..., None]


class ModalityRMSNorm(nn.Module):
    """RMSNorm whose gain is divided by the row's modality's smoothing factors."""

    def __init__(self, norm: nn.Module, s_visual: torch.Tensor, s_text: torch.Tensor, rows: RowModality):
        super().__init__()
        self.eps, self.rows = norm.eps, rows
        self.visual_weight = nn.Parameter((norm.weight.detach() / s_visual).float(), requires_grad=False)
        self.text_weight = nn.Parameter((norm.weight.detach() / s_text).float(), requires_grad=False)

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        gain = self.text_weight + self.rows.visual() * (self.visual_weight - self.text_weight)
        return gain.to(x.dtype) * x32.to(x.dtype)


class CompensatedLinear(nn.Module):
    """A linear whose weights are smoothed for the text rows, plus a low-rank correction added on the
    visual rows only: up(down(x)) ~ x (W diag(s_v - s_t))^T."""

    def __init__(self, linear: nn.Linear, up: torch.Tensor, down: torch.Tensor, rows: RowModality):
        super().__init__()
        self.linear, self.rows = linear, rows
        self.down = nn.Linear(down.shape[1], down.shape[0], bias=False)
        self.up = nn.Linear(up.shape[1], up.shape[0], bias=False)
        with torch.no_grad():
            self.down.weight.copy_(down)
            self.up.weight.copy_(up)

    def forward(self, x):
        return self.linear(x) + self.up(self.down(x)) * self.rows.visual().to(x.dtype)


def factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors; 1 where a channel never carries anything."""
    w_absmax = torch.stack([w.detach().abs().amax(0) for w in weights]).amax(0).double()
    s = act_absmax.clamp(min=1e-8) ** alpha / w_absmax.clamp(min=1e-8) ** (1 - alpha)
    return torch.where((act_absmax > 0) & (w_absmax > 0), s, torch.ones_like(s)).clamp(min=1e-5)


def low_rank(delta: torch.Tensor, moments: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in]) minimising E||x (delta - up down)^T||^2 for inputs with second moment
    `moments`: the SVD of delta L, where moments = L L^T (whitening)."""
    c = moments + DAMPING * torch.diag(moments).mean().clamp(min=1e-12) * torch.eye(len(moments), dtype=moments.dtype)
    chol = torch.linalg.cholesky(c)
    u, s, vh = torch.linalg.svd(delta @ chol, full_matrices=False)
    r = min(rank, len(s))
    up = u[:, :r] * s[:r]
    down = torch.linalg.solve_triangular(chol.T, vh[:r].T, upper=True).T  # vh_r L^-1
    return up, down


def _fold_layernorm(norm: nn.Module, s: torch.Tensor) -> None:
    with torch.no_grad():
        norm.weight.div_(s.to(norm.weight.dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.div_(s.to(norm.bias.dtype))


def _scale_columns(linears: list[nn.Linear], s: torch.Tensor) -> None:
    with torch.no_grad():
        for lin in linears:
            lin.weight.mul_(s.to(lin.weight.dtype))


def apply(model, schemes: dict, stats: dict[str, LayerInputs], image_rows: Optional[tuple[int, int]]) -> nn.Module:
    """A copy of `model` with its smoothed parts' norms and weights rewritten (float, same function up to
    MASQuant's low-rank correction); `stats` holds what each norm-fed linear received."""
    model = copy.deepcopy(model)
    for part, scheme in schemes.items():
        alpha, rank = scheme.param("alpha"), scheme.param("rank")
        for norm_name, norm, consumers in model.norm_consumers(part):
            inputs = stats[consumers[0][0]]  # every consumer of a norm receives the same rows
            if not inputs.n_visual and not inputs.n_text:
                continue  # a block that never runs (LLaVA's last vision layer)
            linears = [lin for _, lin in consumers]
            weights = [lin.weight for lin in linears]
            both = torch.maximum(inputs.visual_absmax, inputs.text_absmax)
            if scheme.config.method == "smoothquant" or part == "vision" or not inputs.n_text or not inputs.n_visual:
                s = factors(both, weights, alpha)
                _fold_layernorm(norm, s)
                _scale_columns(linears, s)
                continue
            s_v, s_t = factors(inputs.visual_absmax, weights, alpha), factors(inputs.text_absmax, weights, alpha)
            rows = RowModality(model, *image_rows)
            smoothed_visual = inputs.visual / inputs.n_visual / s_v[:, None] / s_v[None, :]  # E[x~ x~^T], x~ = x / s_v
            replace_module(model, norm_name, ModalityRMSNorm(norm, s_v, s_t, rows))
            for name, lin in consumers:
                w = lin.weight.detach().double()
                up, down = low_rank(w * (s_v - s_t)[None], smoothed_visual, rank)
                _scale_columns([lin], s_t)
                replace_module(model, name, CompensatedLinear(lin, up.float(), down.float(), rows))
    return model


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` (a dotted path) is."""
    path, _, attr = name.rpartition(".")
    setattr(model.get_submodule(path), attr, new)


def image_rows(visual_rows: list[tuple[tuple[int, int], ...]]) -> tuple[int, int]:
    """The image's rows, the same for every calibration prompt (MASQuant tells modalities by position)."""
    distinct = {runs[0] for runs in visual_rows}  # one run: a tiled image is refused before export (build.py)
    if len(distinct) != 1:
        raise VlmcError("pass w8a8: method masquant needs the image at a fixed position in the prompt, but the "
                        f"template puts text of varying length before it (image rows {sorted(distinct)[:3]} ...)")
    return distinct.pop()
