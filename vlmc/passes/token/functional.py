"""Visual-token scorers and reducers: pure tensor functions with a fixed output count.

Everything here uses only the portable op set (matmul, softmax, topk, sort, gather, comparisons,
cumsum, reductions, elementwise), so one pass lowers to ONNX, ExecuTorch and Core ML alike. Merging is
a one-hot assignment matrix times the tokens, never scatter_reduce. Shapes: tokens [B, N, D],
scores [B, N]; every reducer returns tokens [B, K, D] and the kept original indices [B, K] (ascending),
so kept tokens can keep their original positions. Nothing here imports vlmc.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- helpers

def tie_break(scores: torch.Tensor, dim=-1) -> torch.Tensor:
    """Scores with equal values ordered by index (lower first) on every runtime.

    topk's order among equal values is not specified the same way by every backend; a tiny
    index-proportional offset, scaled to the scores' range over `dim`, makes the order part of the data.
    """
    return scores - tie_offsets(scores, dim)


def tie_offsets(scores: torch.Tensor, dim=-1) -> torch.Tensor:
    """The index-proportional offsets `tie_break` subtracts (a constant per column, so it can be folded
    once into a score that a greedy loop then updates)."""
    n = scores.shape[-1]
    span = scores.abs().amax(dim=dim, keepdim=True) + 1.0
    return torch.arange(n, dtype=scores.dtype) * (span * 1e-6 / n)


def gather_tokens(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """tokens [B,N,D], idx [B,K] -> [B,K,D]: whole rows by an embedding lookup (a gather of elements would need
    the indices expanded to [B,K,D] first, a copy that cost ExecuTorch more than the gather)."""
    return row_lookup(tokens, tokens.shape[0])(idx)


def one_hot(idx: torch.Tensor, n: int, dtype=torch.float32) -> torch.Tensor:
    """idx [..., K] -> [..., K, n] by comparison (portable where one_hot ops are not)."""
    return (idx[..., None] == torch.arange(n, dtype=idx.dtype)).to(dtype)


def ascending(idx: torch.Tensor) -> torch.Tensor:
    """Distinct indices [B,K] in ascending order, via a top-k of their negated float values
    (ExecuTorch has no int64 sort kernel; float32 holds indices below 2^24 exactly): K elements, not a
    [K, N] one-hot."""
    return (-torch.topk(-idx.to(torch.float32), idx.shape[-1], dim=-1).values).to(torch.long)


def unit(x: torch.Tensor) -> torch.Tensor:
    """x scaled to unit L2 norm along the last dim (F.normalize without its Expand node, which costs as much
    as the division in an exported graph)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def mean_of_rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, M, C] -> its mean over M [B, C], as a product with a constant row: XNNPACK delegates the product,
    while ExecuTorch ran a reduction over a middle dimension on portable kernels (0.3 ms for 25 k elements,
    a tenth of the built-in vision encoder)."""
    return torch.bmm(torch.full((x.shape[0], 1, x.shape[1]), 1.0 / x.shape[1], dtype=x.dtype), x)[:, 0]


def head_mean(x: torch.Tensor) -> torch.Tensor:
    """Per-head rows [B, H, N, d] averaged over the heads [B, N, d] (VisionZip's and ToMe's keys)."""
    b, _, n, d = x.shape
    return mean_of_rows(x.flatten(2)).view(b, n, d)


def cosine_similarity_matrix(x: torch.Tensor) -> torch.Tensor:
    x = unit(x)
    if x.dim() == 3:  # bmm directly: matmul's broadcasting copies both operands in an exported graph
        return torch.bmm(x, x.transpose(1, 2))
    return x @ x.transpose(-1, -2)


# ---------------------------------------------------------------- scorers

def random_scores(batch: int, n: int, seed: int) -> torch.Tensor:
    """Seeded uniform scores: the random baseline is a constant, identical in every runtime."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, n, generator=g)


def l2_norm_scores(tokens: torch.Tensor) -> torch.Tensor:
    return tokens.norm(dim=-1)


# ---------------------------------------------------------------- reducers

def select_topk(tokens: torch.Tensor, scores: torch.Tensor, k: int):
    """Keep the k highest-scoring tokens, in their original order."""
    idx = ascending(torch.topk(tie_break(scores), k, dim=-1).indices)
    return gather_tokens(tokens, idx), idx


def select_indices(tokens: torch.Tensor, idx: torch.Tensor):
    """A fixed (e.g. calibrated) index list folded into the graph as a constant gather."""
    idx = idx.to(torch.long).expand(tokens.shape[0], -1)
    return gather_tokens(tokens, idx), idx


def most_selected(selections: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The calibrated static mode: the k token indices a scorer picked most often over a calibration
    set (selections [M, K] of indices into n tokens), ties to the lower index, ascending [k]."""
    counts = one_hot(selections, n).sum(dim=(0, 1))  # [n]: how often each token was picked
    return ascending(torch.topk(tie_break(counts[None]), k, dim=-1).indices)[0]


def salience(tokens: torch.Tensor) -> torch.Tensor:
    """How much each token stands out from the image as a whole: its cosine distance from the mean token,
    scaled to [0, 1] per image [B, N] (objects over a busy background score high)."""
    d = 1.0 - (unit(tokens) * unit(tokens.mean(dim=1, keepdim=True))).sum(-1)
    return d / d.amax(dim=-1, keepdim=True).clamp_min(1e-6)


def border_mask(grid: int) -> torch.Tensor:
    """1.0 on the tokens of a square grid's outer ring [grid*grid]: where the background usually is."""
    ring = torch.ones(grid, grid)
    ring[1:-1, 1:-1] = 0.0
    return ring.flatten()


def foreground_scores(tokens: torch.Tensor, border: torch.Tensor) -> torch.Tensor:
    """DocPrune's background removal: the background prototype is the mean of the border tokens; a token
    scores by its cosine distance from it [B, N] (background patches score near 0)."""
    proto = (border[None, :, None] * tokens).sum(1, keepdim=True) / border.sum()
    return 1.0 - (unit(tokens) * unit(proto)).sum(-1)


def row_lookup(matrix: torch.Tensor, batch: int):
    """A function idx [B, K] -> rows idx[b] of each matrix[b] [B, K, M] (matrix [B, N, M], or [N, M] shared by
    the batch): one embedding gather on rows flattened once, the cheapest step a greedy loop can have in an
    exported graph (per-node dispatch, not arithmetic, is what a 196-token selection costs)."""
    rows = matrix.reshape(-1, matrix.shape[-1])
    if matrix.dim() == 2 or batch == 1:
        return lambda idx: F.embedding(idx, rows)
    offsets = (torch.arange(batch) * matrix.shape[1])[:, None]
    return lambda idx: F.embedding(idx + offsets, rows)


def greedy_max_min(score: torch.Tensor | None, matrix: torch.Tensor, k: int, first: torch.Tensor | None = None) -> torch.Tensor:
    """The loop of the max-min selections: each step takes the argmax of score [B, N] and lowers every score
    to at most the chosen token's row of `matrix`, so a token's score is the minimum over the kept tokens
    (with `first` [B] given, the first pick is it and the score starts as its row). Three graph nodes a
    step: argmax, gather, minimum (argmax returns the first maximum on every runtime). Indices in
    selection order [B, k]."""
    row = row_lookup(matrix, (first if score is None else score).shape[0])
    chosen = []
    if first is not None:
        chosen.append(first[:, None])
        score = row(chosen[0])
    else:
        score = score[:, None, :]  # [B, 1, N]
    while len(chosen) < k:
        j = torch.argmax(score, dim=-1)  # [B, 1]
        chosen.append(j)
        if len(chosen) < k:
            score = torch.minimum(score, row(j))
    return torch.cat(chosen, dim=1)


def farthest_point(features: torch.Tensor, k: int, first: torch.Tensor | None = None, cosine: bool = True,
                   weights: torch.Tensor | None = None):
    """Greedy max-min selection (DivPrune, T-FPS): each step takes the token farthest from those chosen;
    with `weights` [B, N], the weighted k-center of SCoRe: the largest weight x distance.

    Distance is 1 - cosine similarity (or Euclidean); `first` [B] is the starting token (default: the
    heaviest token with weights, else DivPrune's: the most isolated token, whose nearest neighbour is
    farthest); weights lie in [0, 1]. The weights and the tie-break offsets are folded into the distance
    matrix's columns once (min over kept rows commutes with both), so each step is an argmax, a row gather
    and a minimum. Returns the chosen indices in selection order [B, k].
    """
    b, n, _ = features.shape
    if first is None and weights is not None:
        first = torch.argmax(tie_break(weights), dim=-1)
    if cosine:  # distance in [0, 2], weights in [0, 1]: the tie-break offsets are a constant [N]
        sim = cosine_similarity_matrix(features)
        offsets = torch.arange(n, dtype=features.dtype) * (3e-6 / n)
        dist = (1.0 - offsets) - sim if weights is None else (1.0 - sim) * weights[:, None, :] - offsets
    else:
        sq = (features * features).sum(-1)
        raw = (sq[:, :, None] + sq[:, None, :] - 2 * torch.bmm(features, features.transpose(1, 2))).clamp_min(0.0).sqrt()
        span = 2.0 * sq.amax(dim=-1, keepdim=True).sqrt() + 1.0  # bounds every distance: no pass over [N, N]
        offsets = torch.arange(n, dtype=features.dtype) * (span * 1e-6 / n)
        dist = (raw if weights is None else raw * weights[:, None, :]) - offsets[:, None, :]
    if first is None:  # no weights: the matrix is symmetric but for the column offsets, so a token's nearest
        # neighbour is a reduction along its own (contiguous) row; the diagonal is lifted out of the minimum
        self_distance = torch.eye(n, dtype=features.dtype) * (3.0 if cosine else span[:, :, None])
        if cosine:
            nearest = (1.0 - offsets) - (sim - self_distance).amax(dim=-1)
        else:  # min as -max(-x): TVM's importer has no amin
            nearest = -(-(raw + self_distance)).amax(dim=-1) - offsets
        first = torch.argmax(nearest, dim=-1)
    return greedy_max_min(None, dist, k, first)


def select_farthest(tokens: torch.Tensor, features: torch.Tensor, k: int, cosine: bool = True):
    idx = ascending(farthest_point(features, k, cosine=cosine))
    return gather_tokens(tokens, idx), idx


def greedy_residual(features: torch.Tensor, k: int) -> torch.Tensor:
    """ApET's selection: each step keeps the token worst reconstructed as a linear combination of the tokens
    already kept (the largest residual after projecting onto their span), by incremental Gram-Schmidt
    (column-pivoted QR), matmuls and gathers only. As in pivoted QR, the squared residual norms are
    downdated by what each projection removes (a [B, N] update, not a sum over every residual row: on
    ExecuTorch that sum ran on portable kernels twice a step). Indices in selection order [B, k]."""
    b, n, _ = features.shape
    index = torch.arange(n)
    residual = features
    norms = (features * features).sum(-1)  # [B, N] squared residual norms
    penalty = -tie_offsets(norms)  # -inf once kept
    chosen = []
    for step in range(k):
        j = torch.argmax(norms + penalty, dim=-1, keepdim=True)  # [B, 1]
        chosen.append(j)
        if step == k - 1:
            break
        penalty = torch.where(index == j, float("-inf"), penalty)
        u = row_lookup(residual, b)(j)  # [B, 1, D]: the new direction
        u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        along = torch.bmm(residual, u.transpose(1, 2))  # [B, N, 1]; bmm: matmul would copy both operands
        residual = residual - along * u
        norms = norms - (along * along).squeeze(-1)
    return torch.cat(chosen, dim=1)


def greedy_log_det(features: torch.Tensor, quality: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP of a DPP with kernel diag(q) S diag(q), S the tokens' cosine similarity (CoIn's
    informativeness x coverage by volume). log det grows by the new row's squared residual after projecting
    onto the rows already kept (the incremental Cholesky of Chen et al., 2018), so this is ApET's greedy
    residual on the quality-scaled unit rows. Indices in selection order [B, k]."""
    return greedy_residual(unit(features) * quality[..., None], k)


def spread_tiers(grid_dist: torch.Tensor, buffer: float) -> torch.Tensor:
    """VLM-Pruner's buffer as a constant [N, N] bonus a kept token j gives a candidate i: 4 when i is at least
    `buffer` grid cells from j, 2 when at least half of it, 0 inside, -16 for i = j (below any score in
    [0, 1] plus a tier, so never picked twice; finite, so it survives fp16 on Core ML)."""
    tiers = 2.0 * (grid_dist >= buffer).float() + 2.0 * (grid_dist >= buffer / 2).float()
    return tiers.fill_diagonal_(-16.0)


def buffered_spread(scores: torch.Tensor, tiers: torch.Tensor, k: int) -> torch.Tensor:
    """VLM-Pruner's selection: starting from the highest score, each step takes the best-scoring token at
    least `buffer` grid cells from every token kept so far; when none is left that far, half the buffer,
    then any token. scores [B, N] in [0, 1], tiers [N, N] from `spread_tiers` (a constant). The tier is
    monotone in the distance, so a candidate's bonus is the minimum over the kept tokens of their tier
    rows: the max-min loop on score + tier. Indices in selection order [B, k]."""
    s = tie_break(scores)
    return greedy_max_min(s + 4.0, s[:, None, :] + tiers, k)


def projector_sensitivity(tokens: torch.Tensor, projected: torch.Tensor, projector, directions: torch.Tensor, eps) -> torch.Tensor:
    """ZOO-Prune's zeroth-order sensitivity: how far the projector's output (`projected` = P(tokens)) moves
    per unit step of a token's input along fixed random unit directions [M, D]: ‖P(x + eps u) - P(x)‖ / eps
    averaged over them [B, N] (no gradients: forward passes only)."""
    moves = [(projector(tokens + eps * u) - projected).norm(dim=-1) / eps for u in directions]
    return torch.stack(moves, 0).mean(0)


def pooling_matrix(grid: int, out: int) -> torch.Tensor:
    """[out*out, grid*grid] averaging matrix of an adaptive average pool over a square token grid."""
    rows = []
    for oy in range(out):
        y0, y1 = math.floor(oy * grid / out), math.ceil((oy + 1) * grid / out)
        for ox in range(out):
            x0, x1 = math.floor(ox * grid / out), math.ceil((ox + 1) * grid / out)
            w = torch.zeros(grid, grid)
            w[y0:y1, x0:x1] = 1.0 / ((y1 - y0) * (x1 - x0))
            rows.append(w.flatten())
    return torch.stack(rows)


def spatial_pool(tokens: torch.Tensor, matrix: torch.Tensor):
    """Average-pool a square token grid to out x out tokens with a constant matmul."""
    pooled = matrix.to(tokens.dtype) @ tokens
    centres = torch.argmax(matrix, dim=-1)  # a representative original index per pooled token
    return pooled, centres[None].expand(tokens.shape[0], -1)


def grid_positions(grid: int, dtype=torch.float32) -> torch.Tensor:
    """(row, column) of each cell of a grid x grid token grid, raster order [N, 2]."""
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=dtype), torch.arange(grid, dtype=dtype), indexing="ij")
    return torch.stack([ys.flatten(), xs.flatten()], dim=-1)


def spread_seeds(grid: int, k: int) -> torch.Tensor:
    """k grid cells spread evenly over a grid x grid token grid (farthest-point sampling of the cell
    positions, from the cell nearest the centre; ties to the lower index): the object groups' first
    centres, a constant of the export [k]."""
    pos = grid_positions(grid, torch.float64)
    centre = (grid - 1) / 2.0
    first = int(torch.argmin(((pos - centre) ** 2).sum(-1)))
    chosen = [first]
    dist = ((pos - pos[first]) ** 2).sum(-1)
    while len(chosen) < k:
        j = int(torch.argmax(dist))  # argmax returns the first maximum
        chosen.append(j)
        dist = torch.minimum(dist, ((pos - pos[j]) ** 2).sum(-1))
    return torch.tensor(chosen)


def group_assignment(features: torch.Tensor, grid: int, seeds: torch.Tensor, compactness: float, iterations: int) -> torch.Tensor:
    """Training-free object groups of a grid x grid token grid: k-means over the tokens with a spatial term
    (SLIC's superpixels on token features), from the `seeds` cells. A token joins the centre minimising
    (1 - cosine similarity) + compactness * (grid distance / S)^2, S = grid / sqrt(k) the seeds' spacing;
    centres move to their members' mean direction and position. Each seed token stays in its own group, so
    no group is ever empty (static count). Returns the one-hot assignment [B, N, k]."""
    b, n, _ = features.shape
    k = seeds.shape[0]
    pos = grid_positions(grid, features.dtype)  # [N, 2]
    spacing2 = grid * grid / k
    u = unit(features)
    pinned = one_hot(seeds, n, features.dtype).transpose(0, 1)  # [N, k]: seed cell i stays in group i
    is_seed = pinned.sum(-1, keepdim=True)  # [N, 1]
    centre_f = u.index_select(1, seeds)  # [B, k, D]
    centre_p = pos.index_select(0, seeds)[None].expand(b, -1, -1)  # [B, k, 2]
    for step in range(iterations + 1):
        spatial = ((pos[None, :, None, :] - centre_p[:, None, :, :]) ** 2).sum(-1)  # [B, N, k]
        cost = (1.0 - u @ centre_f.transpose(1, 2)) + compactness * spatial / spacing2
        assign = one_hot(torch.argmin(cost + tie_offsets(cost), dim=-1), k, features.dtype)  # ties: the lower group
        assign = is_seed * pinned + (1.0 - is_seed) * assign
        if step == iterations:
            return assign
        members = assign.transpose(1, 2)  # [B, k, N]
        count = members.sum(-1, keepdim=True)  # >= 1: the seed
        centre_f = unit(members @ u)
        centre_p = (members @ pos) / count
    raise AssertionError("unreachable")


def object_merge(tokens: torch.Tensor, features: torch.Tensor, grid: int, seeds: torch.Tensor, compactness: float,
                 iterations: int):
    """CORE with a training-free grouping: each object group (`group_assignment` of `features`) becomes the
    mean of its tokens, the groups in raster order of their centroids (row, then column). Returns the
    merged tokens [B, k, D] and each group's centroid cell (rounded) [B, k]."""
    assign = group_assignment(features, grid, seeds, compactness, iterations)
    members = assign.transpose(1, 2)  # [B, k, N]
    count = members.sum(-1, keepdim=True)
    merged = (members @ tokens) / count
    centroid = (members @ grid_positions(grid, tokens.dtype)) / count  # [B, k, 2]
    key = centroid[..., 0] * grid + centroid[..., 1]  # raster position of the centroid
    order = torch.topk(tie_break(-key), key.shape[-1], dim=-1).indices  # ascending key, ties by group
    cells = torch.round(centroid[..., 0]) * grid + torch.round(centroid[..., 1])
    return gather_tokens(merged, order), torch.gather(cells, 1, order).long()


def bipartite_soft_matching(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, r: int, protect_first: bool = True):
    """ToMe: merge r tokens of set A (even positions) into their most similar token of set B (odd).

    x [B,N,D], metric [B,N,C] (keys averaged over heads), size [B,N,1] (tokens each one stands for).
    Merges are size-weighted averages, done as a one-hot assignment matmul. Token 0 (CLS) is never
    merged when `protect_first`. Returns (x, size) with N - r tokens: unmerged A first, then B.
    """
    metric = unit(metric)
    a, b_ = metric[:, ::2], metric[:, 1::2]
    scores = a @ b_.transpose(-1, -2)  # [B, Na, Nb]
    node_max, node_idx = scores.max(dim=-1)  # best B partner of each A token
    ranked = tie_break(node_max)  # offsets scaled to the cosines alone, so ties only reorder equal edges
    if protect_first:  # the CLS edge ranks last: below any cosine, finite for fp16
        ranked = torch.cat([torch.full_like(ranked[:, :1], -4.0), ranked[:, 1:]], dim=1)
    order = torch.topk(ranked, node_max.shape[-1], dim=-1).indices  # best edges first
    src_idx, unm_idx = order[:, :r], order[:, r:]  # A tokens merged away / kept
    unm_idx = ascending(unm_idx)
    dst_idx = torch.gather(node_idx, 1, src_idx)  # their B partners
    xa, xb = x[:, ::2], x[:, 1::2]
    sa, sb = size[:, ::2], size[:, 1::2]
    assign = one_hot(dst_idx, xb.shape[1], x.dtype).transpose(1, 2)  # [B, Nb, r]
    src_x, src_s = gather_tokens(xa * sa, src_idx), gather_tokens(sa, src_idx)
    new_sb = sb + assign @ src_s
    new_xb = (xb * sb + assign @ src_x) / new_sb
    keep_x, keep_s = gather_tokens(xa, unm_idx), gather_tokens(sa, unm_idx)
    return torch.cat([keep_x, new_xb], dim=1), torch.cat([keep_s, new_sb], dim=1)


def dominant_and_contextual(tokens: torch.Tensor, attention: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int):
    """VisionZip: keep the `dominant` tokens the CLS attends to most; merge the rest into `contextual`
    evenly spaced targets among them, each remaining token joining its most key-similar target."""
    b, n, d = tokens.shape
    dom_idx = ascending(torch.topk(tie_break(attention), dominant, dim=-1).indices)
    is_dom = one_hot(dom_idx, n).sum(1)  # [B, N]
    rest_rank = torch.cumsum(1.0 - is_dom, dim=-1) - 1.0  # rank of each non-dominant token
    n_rest = n - dominant
    step = n_rest / contextual
    target_ranks = torch.floor(torch.arange(contextual, dtype=tokens.dtype) * step)  # evenly spaced
    # target t is the non-dominant token whose rank equals target_ranks[t]
    is_target = (rest_rank[:, None, :] == target_ranks[None, :, None]).to(tokens.dtype) * (1.0 - is_dom[:, None, :])  # [B, C, N]
    keys = unit(keys)
    target_keys = is_target @ keys  # [B, C, K]
    sim = keys @ target_keys.transpose(1, 2)  # [B, N, C]
    choice = torch.argmax(sim, dim=-1)
    assign = one_hot(choice, contextual, tokens.dtype) * (1.0 - is_dom)[..., None]  # [B, N, C]; dominant excluded
    counts = assign.sum(1)[..., None].clamp_min(1.0)  # [B, C, 1]
    ctx = (assign.transpose(1, 2) @ tokens) / counts
    dom = gather_tokens(tokens, dom_idx)
    ctx_idx = torch.argmax(is_target, dim=-1)
    return torch.cat([dom, ctx], dim=1), torch.cat([dom_idx, ctx_idx], dim=1)


def lost_and_kept(tokens: torch.Tensor, keep: int, candidates: int):
    """Hi-Lo Prune's two-level selection on tokens [B,N,D]. Coarse, what to keep: the `keep` most salient
    tokens. Fine, what pruning would lose: of the rest, the `candidates` tokens whose salience the kept set
    covers worst (salience x cosine distance to the nearest kept token). Returns the tokens [B,C+K,D] and
    their indices [B,C+K]: the candidates first, then the kept, each run ascending, so that in a causal
    decoder the kept rows can read the candidates."""
    n = tokens.shape[1]
    s = salience(tokens)
    kept = ascending(torch.topk(tie_break(s), keep, dim=-1).indices)
    u = unit(tokens)
    covered = (u @ gather_tokens(u, kept).transpose(1, 2)).amax(dim=-1)  # [B,N]: cosine to the nearest kept token
    lost = torch.where(one_hot(kept, n).sum(dim=-2) > 0, torch.full_like(s, -1.0), s * (1.0 - covered))
    lost_idx = ascending(torch.topk(tie_break(lost), candidates, dim=-1).indices)
    idx = torch.cat([lost_idx, kept], dim=1)
    return gather_tokens(tokens, idx), idx


# ---------------------------------------------------------------- inside the LLM (one prompt, rows [T])

def attention_row(q_row: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Softmax attention of one query per head over all keys: q_row [B,H,1,d], k [B,H,N,d] -> [B,H,N]
    (the CLS row), computed alone so that fused SDPA kernels stay usable for the attention itself."""
    scores = (q_row @ k.transpose(-1, -2)) / math.sqrt(q_row.shape[-1])
    return torch.softmax(scores, dim=-1).squeeze(-2)


def attention_factors(wq: torch.Tensor, wk: torch.Tensor, bq: torch.Tensor | None, heads: int, kv_heads: int,
                      rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A low-rank form of a layer's attention logits before RoPE, summed over heads: for queries q_h =
    Wq_h x + bq_h and keys k_g = Wk_g y (+ a bias that shifts every key's score equally), sum_h q_h . k_g(h)
    = x^T M y + c . y + const, M = sum_h Wq_h^T Wk_g(h) [D, D], c = sum_h Wk_g(h)^T bq_h. Returns (A, B) [D, r]
    with A B^T the best rank-r M (truncated SVD, singular values split evenly) and c [D]."""
    d = wq.shape[0] // heads
    group = heads // kv_heads
    wq_h = wq.double().reshape(heads, d, -1)
    wk_h = wk.double().reshape(kv_heads, d, -1).repeat_interleave(group, 0)
    m = torch.einsum("hdi,hdj->ij", wq_h, wk_h)
    c = torch.zeros(m.shape[1], dtype=torch.float64) if bq is None else torch.einsum("hd,hdj->j", bq.double().reshape(heads, d), wk_h)
    u, sigma, vh = torch.linalg.svd(m)
    root = sigma[:rank].sqrt()
    return (u[:, :rank] * root).float(), (vh[:rank].T * root).float(), c.float()


def low_rank_scores(x_query: torch.Tensor, x_rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                    c: torch.Tensor) -> torch.Tensor:
    """Each row's estimated attention logit from the query [D]: (x_query A) . (x_row B) + c . x_row, [N]."""
    return ((x_rows @ b) * (x_query[None] @ a)).sum(-1) + (x_rows * c).sum(-1)  # no matrix-vector products (Core ML)


def lens_scores(x: torch.Tensor, vocabulary: torch.Tensor | None, sink_factor: float) -> torch.Tensor:
    """EmbedLens's reading of visual tokens x [B,N,D] in the LLM's input space, higher = more alive: with a
    `vocabulary` [V,D] (the LLM's token embeddings, unit rows) each token's largest cosine similarity to it
    (how much language it already carries); without, how far it points from the image's mean token (1 -
    cosine; a dead token repeats what the image's average already says). Sink tokens, whose norm exceeds
    `sink_factor` times the image's median token norm, score -2, below either reading. [B,N]"""
    norms = x.norm(dim=-1)
    median = torch.topk(norms, x.shape[1] - (x.shape[1] - 1) // 2, dim=-1).values[:, -1:]  # (no median / sort everywhere)
    if vocabulary is None:
        alive = 1.0 - (unit(x) * unit(x.mean(1, keepdim=True))).sum(-1)
    else:
        alive = (unit(x) @ vocabulary.T).amax(-1)
    return torch.where(norms > sink_factor * median, torch.full_like(alive, -2.0), alive)


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest of scores [N], ascending indices [k] (ties to the lower index)."""
    return ascending(torch.topk(tie_break(scores[None]), k, dim=-1).indices)[0]


def query_attention(q: torch.Tensor, k: torch.Tensor, queries: torch.Tensor, visible: torch.Tensor,
                    head_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of chosen query rows over all rows, averaged over heads (or weighted by
    `head_weights` [H], summing to 1): q [1,H,T,d], k [1,Hkv,T,d] (grouped heads share keys), queries [Q]
    row indices, visible [Q,T] bool (what each may see) -> [Q,T]."""
    h, hkv = q.shape[1], k.shape[1]
    keys = k[:, :, None].expand(-1, -1, h // hkv, -1, -1).reshape(1, h, k.shape[2], k.shape[3])
    scores = (q.index_select(2, queries) @ keys.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [1,H,Q,T]
    scores = torch.where(visible[None, None], scores, torch.full_like(scores, -1e4))
    attn = torch.softmax(scores, dim=-1)
    if head_weights is None:
        return attn.mean(dim=1)[0]
    return (attn * head_weights[None, :, None, None]).sum(dim=1)[0]


def last_token_attention(q: torch.Tensor, k: torch.Tensor, image_rows: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """FastV's score: the attention the last prompt row pays each image row [N] (causal: rows <= last)."""
    visible = (torch.arange(q.shape[2]) <= last)[None]
    return query_attention(q, k, last, visible)[0].index_select(0, image_rows)


def instruction_attention(q: torch.Tensor, k: torch.Tensor, image_rows: torch.Tensor, last: torch.Tensor,
                          head_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The attention the text rows after the image (the instruction, up to `last`) pay each image row,
    averaged over those rows [N]. Every row is scored as a query and the instruction rows are picked by a
    mask, so the instruction's length may vary."""
    t = q.shape[2]
    rows = torch.arange(t)
    visible = rows[None, :] <= rows[:, None]  # causal [T,T]
    attn = query_attention(q, k, rows, visible, head_weights)  # [T,T]
    end = image_rows[-1:]
    instruction = (rows > end).to(attn.dtype) * (rows <= last).to(attn.dtype)  # [T] (no bool `and`: Core ML)
    weights = instruction / instruction.sum().clamp_min(1.0)
    return (weights @ attn).index_select(0, image_rows)


def variation(h_in: torch.Tensor, h: torch.Tensor, image_rows: torch.Tensor) -> torch.Tensor:
    """V2Drop's score: how far a layer moved each image row, ‖h - h_in‖ / ‖h_in‖ [N]."""
    a, b = h_in[0].index_select(0, image_rows), h[0].index_select(0, image_rows)
    return (b - a).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-6)


def transition(h_in: torch.Tensor, h: torch.Tensor, image_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How much a layer changed each image row: (relative magnitude change |‖h‖ - ‖h_in‖| / ‖h_in‖,
    direction change 1 - cos(h, h_in)), each [N]."""
    a, b = h_in[0].index_select(0, image_rows), h[0].index_select(0, image_rows)
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    return (nb - na).abs() / na.clamp_min(1e-6), 1.0 - (a * b).sum(-1) / (na * nb).clamp_min(1e-6)


def candidate_merge(q: torch.Tensor, k: torch.Tensor, h: torch.Tensor, image_rows: torch.Tensor, candidates: int,
                    weight: float) -> torch.Tensor:
    """Hi-Lo Prune's attention-guided merge at the removal layer: the image rows are [candidates | kept];
    each candidate joins the kept row whose query attends to it most (softmax over the candidates, mean over
    heads), counting as much as that attention times `weight`, and each kept row becomes the weighted mean
    of itself (weight 1) and its candidates. q [1,H,T,d], k [1,Hkv,T,d], h [1,T,D] the layer's output ->
    the kept rows [1,K,D]."""
    c, n = candidates, image_rows.shape[0]
    j = torch.arange(q.shape[2])
    first = image_rows[:1]
    is_candidate = torch.logical_and(j >= first, j < first + torch.full_like(first, c))  # [T] (a tensor operand: PT2E)
    attn = query_attention(q, k, image_rows[c:], is_candidate[None].expand(n - c, -1))  # [K,T]
    attn = attn.index_select(1, image_rows[:c])  # [K,C]
    to = torch.topk(tie_break(attn.T), 1, dim=-1).indices[:, 0]  # [C]: the kept row attending to each most
    share = weight * one_hot(to, n - c).T * attn  # [K,C]
    rows = h[0].index_select(0, image_rows)
    return ((rows[c:] + share @ rows[:c]) / (1.0 + share.sum(dim=1, keepdim=True)))[None]


def dct_low_pass(n: int, m: int) -> torch.Tensor:
    """The m lowest frequencies of the orthonormal DCT-II over n samples, as rows [m, n]."""
    j = torch.arange(n, dtype=torch.float64)
    f = torch.arange(m, dtype=torch.float64)[:, None]
    basis = torch.cos(math.pi * (j + 0.5) * f / n) * math.sqrt(2.0 / n)
    basis[0] /= math.sqrt(2.0)
    return basis.float()


def low_pass_deviation(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """How far each row of x [N,D] lies from the low-pass reconstruction of the rows as a signal along N
    (keeping the DCT frequencies of `basis` [m,N]): ||x - B^T B x|| per row [N]. FlashCache's outliers are
    the rows far from it."""
    return (x - basis.T @ (basis @ x)).norm(dim=-1)


def principal_basis(x: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-`rank` right singular vectors of x [N, D] (no centring: the mean direction is kept) -> [rank, D],
    orthonormal rows: x @ B.T @ B is x's best rank-`rank` approximation in that row space."""
    return torch.linalg.svd(x.double(), full_matrices=False).Vh[:rank].to(x.dtype)


def project_heads(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Rows x [Hkv,N,d] (heads concatenated per row) -> coefficients [N,r] on a basis [Hkv,r,d]."""
    return (x @ basis.transpose(-1, -2)).sum(0)
