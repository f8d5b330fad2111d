"""The defining property of each scorer / reducer, on hand-made inputs."""
import torch

from vlmc.passes.token import functional as T


def test_topk_keeps_the_highest_scores_in_original_order():
    tokens = torch.arange(10.0)[None, :, None].repeat(1, 1, 3)
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.0, 0.7, 0.2, 0.6, 0.5, 0.4]])
    kept, idx = T.select_topk(tokens, scores, 4)
    assert idx.tolist() == [[1, 3, 5, 7]]
    assert torch.equal(kept[0, :, 0], torch.tensor([1.0, 3.0, 5.0, 7.0]))


def test_ties_go_to_the_lower_index():
    tokens = torch.randn(1, 6, 2)
    _, idx = T.select_topk(tokens, torch.ones(1, 6), 3)
    assert idx.tolist() == [[0, 1, 2]]


def test_farthest_point_takes_the_farthest_token_each_step():
    torch.manual_seed(0)
    feats = torch.randn(1, 40, 5)
    order = T.farthest_point(feats, 6, cosine=False)[0].tolist()
    dist = torch.cdist(feats[0], feats[0])
    for step in range(1, 6):
        chosen = order[:step]
        min_d = dist[:, chosen].min(dim=1).values
        assert order[step] == int(torch.argmax(min_d)), step
    assert len(set(order)) == 6


def test_divprune_picks_are_max_min_far_apart():
    # four tight clusters: max-min selection of 4 takes one token from each
    centres = torch.tensor([[10.0, 0], [0, 10.0], [-10.0, 0], [0, -10.0]])
    feats = (centres[:, None] + 0.01 * torch.randn(4, 5, 2)).reshape(1, 20, 2)
    _, idx = T.select_farthest(feats, feats, 4, cosine=False)
    assert sorted(i // 5 for i in idx[0].tolist()) == [0, 1, 2, 3]


def divprune_reference(features: torch.Tensor, k: int) -> list[int]:
    """DivPrune as its paper's public code runs it: cosine distances; the first pick is the token whose
    nearest neighbour is farthest, then each step the token whose nearest kept token is farthest."""
    unit = features / features.norm(dim=-1, keepdim=True)
    dist = 1.0 - unit @ unit.T
    picks = [int(torch.argmax(dist.topk(2, dim=0, largest=False).values[1]))]
    while len(picks) < k:
        picks.append(int(torch.argmax(dist[picks].min(dim=0).values)))
    return picks


def test_divprune_selects_what_the_papers_code_selects():
    for seed in range(20):
        torch.manual_seed(seed)
        feats = torch.randn(1, 49, 16) + 0.5 * torch.randn(1, 1, 16)  # a shared direction, as in real tokens
        assert T.farthest_point(feats, 12)[0].tolist() == divprune_reference(feats[0], 12), seed


def test_divprune_starts_from_the_most_isolated_token():
    angles = torch.tensor([0.0, 5.0, 10.0, 15.0, 180.0, 178.0, 90.0]) * torch.pi / 180
    feats = torch.stack([angles.cos(), angles.sin()], -1)[None]
    # the pair at 180 degrees lies farthest from the mean, but token 6 (90 degrees) has the farthest nearest
    # neighbour (75 degrees away): it is picked first
    assert T.farthest_point(feats, 1)[0].tolist() == [6]


def test_pooling_matrix_averages_square_blocks():
    m = T.pooling_matrix(4, 2)
    grid = torch.arange(16.0).reshape(1, 16, 1)
    pooled, _ = T.spatial_pool(grid, m)
    assert pooled[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    assert torch.allclose(m.sum(-1), torch.ones(4))


def test_tome_never_merges_cls_and_keeps_size_weighted_means():
    torch.manual_seed(1)
    x = torch.randn(1, 9, 4)
    x[0, 2] = x[0, 1] * 1.0001  # token 2 (set A) is a near-copy of token 1 (set B)
    size = torch.ones(1, 9, 1)
    merged, new_size = T.bipartite_soft_matching(x, x, size, r=1)
    assert merged.shape == (1, 8, 4) and new_size.sum() == 9  # mass is conserved
    assert torch.equal(merged[0, 0], x[0, 0])  # CLS (A[0]) survives untouched, first
    b_pos = 4 + 0  # unmerged A come first (4 of them), then B: token 1 is B[0]
    assert new_size[0, b_pos, 0] == 2
    assert torch.allclose(merged[0, b_pos], (x[0, 1] + x[0, 2]) / 2)


def test_tome_protects_cls_even_when_it_is_the_best_match():
    x = torch.zeros(1, 5, 3)
    x[0, :, 0] = 1.0  # every token identical: CLS would be the first candidate
    merged, size = T.bipartite_soft_matching(x, x + torch.randn(1, 5, 3) * 1e-3, torch.ones(1, 5, 1), r=2)
    assert size[0, 0, 0] == 1 and merged.shape[1] == 3


def tome_reference(x: torch.Tensor, size: torch.Tensor, r: int):
    """ToMe's bipartite soft matching as the paper states it (the CLS row's similarities set to -inf, edges
    sorted by similarity, the r best A tokens averaged into their B partners by size), for one image:
    returns the unmerged A tokens by index and the B tokens with their sizes."""
    unit = x / x.norm(dim=-1, keepdim=True)
    scores = unit[::2] @ unit[1::2].T
    scores[0] = -float("inf")
    best, partner = scores.max(dim=-1)
    edges = best.argsort(descending=True)
    merged, kept = edges[:r], edges[r:].sort().values
    xb, sb = (x[1::2] * size[1::2]).clone(), size[1::2].clone()
    for a in merged.tolist():
        xb[partner[a]] += x[2 * a] * size[2 * a]
        sb[partner[a]] += size[2 * a]
    return x[::2][kept], xb / sb, sb


def test_tome_merges_the_tokens_the_paper_merges():
    for seed in range(30):
        torch.manual_seed(seed)
        x = torch.randn(1, 25, 8) + torch.randn(1, 1, 8)
        size = torch.randint(1, 4, (1, 25, 1)).float()
        merged, new_size = T.bipartite_soft_matching(x, x, size, r=8)
        kept, xb, sb = tome_reference(x[0], size[0], 8)
        assert torch.allclose(merged[0, :len(kept)], kept), seed
        assert torch.allclose(merged[0, len(kept):], xb, atol=1e-6) and torch.equal(new_size[0, len(kept):], sb), seed


def test_visionzip_keeps_dominant_and_merges_the_rest():
    torch.manual_seed(2)
    tokens = torch.randn(1, 12, 4)
    attention = torch.zeros(1, 12)
    attention[0, [3, 7, 9]] = torch.tensor([0.5, 0.3, 0.2])
    out, idx = T.dominant_and_contextual(tokens, attention, tokens, dominant=3, contextual=2)
    assert out.shape == (1, 5, 4)
    assert idx[0, :3].tolist() == [3, 7, 9]
    assert torch.allclose(out[0, :3], tokens[0, [3, 7, 9]])
    # the 9 other tokens are split between the 2 contextual tokens, each the mean of its group:
    # n1 * c1 + (9 - n1) * c2 = sum(rest) for a whole number n1
    rest = tokens[0, [i for i in range(12) if i not in (3, 7, 9)]]
    c1, c2 = out[0, 3], out[0, 4]
    n1 = torch.linalg.lstsq((c1 - c2)[:, None], (rest.sum(0) - 9 * c2)[:, None]).solution.item()
    assert abs(n1 - round(n1)) < 1e-3 and 1 <= round(n1) <= 8
    assert torch.allclose(round(n1) * c1 + (9 - round(n1)) * c2, rest.sum(0), atol=1e-4)


def test_random_scores_are_seeded():
    assert torch.equal(T.random_scores(1, 10, 3), T.random_scores(1, 10, 3))
    assert not torch.equal(T.random_scores(1, 10, 3), T.random_scores(1, 10, 4))


def test_calibrated_static_mode_keeps_the_most_picked_indices():
    picks = torch.tensor([[0, 3, 5], [3, 5, 7], [3, 7, 9], [1, 5, 7]])  # 3, 5 and 7 picked three times each
    assert T.most_selected(picks, 10, 3).tolist() == [3, 5, 7]
    assert T.most_selected(picks, 10, 4).tolist() == [0, 3, 5, 7]  # a tie among 0, 1 and 9 goes to 0


def test_score_takes_the_largest_salience_times_distance_each_step():
    torch.manual_seed(1)
    feats = torch.randn(1, 30, 6)
    weights = torch.rand(1, 30) + 0.1
    order = T.farthest_point(feats, 5, weights=weights)[0].tolist()
    dist = 1 - T.cosine_similarity_matrix(feats)[0]
    assert order[0] == int(torch.argmax(weights[0]))
    for step in range(1, 5):
        gain = dist[:, order[:step]].min(dim=1).values * weights[0]
        assert order[step] == int(torch.argmax(gain)), step
    # uniform weights: DivPrune's max-min order from the same first token
    assert T.farthest_point(feats, 5, first=torch.tensor([order[0]]))[0].tolist()[:1] == [order[0]]


def test_salience_is_highest_for_the_token_unlike_the_rest():
    tokens = torch.ones(1, 8, 4) + 0.01 * torch.randn(1, 8, 4)
    tokens[0, 5] = torch.tensor([1.0, -1.0, 0.5, -2.0])
    s = T.salience(tokens)
    assert int(torch.argmax(s)) == 5 and float(s.max()) == 1.0


def test_coin_greedy_maximises_the_log_det_volume_each_step():
    """Each pick is the token whose addition gives the largest log det of the quality-weighted kernel."""
    torch.manual_seed(2)
    feats = torch.randn(1, 12, 5)
    quality = torch.rand(1, 12) + 0.5
    order = T.greedy_log_det(feats, quality, 4)[0].tolist()
    f = torch.nn.functional.normalize(feats[0], dim=-1) * quality[0, :, None]
    kernel = (f @ f.T).double()
    for step in range(4):
        best = max((i for i in range(12) if i not in order[:step]),
                   key=lambda i: torch.logdet(kernel[order[:step] + [i]][:, order[:step] + [i]]).item())
        assert order[step] == best, step
    assert len(set(order)) == 4


def test_coin_prefers_diverse_tokens_over_duplicates():
    # two copies of one direction and one orthogonal: the second pick is the orthogonal token
    feats = torch.tensor([[[1.0, 0.0], [1.0, 0.001], [0.0, 1.0]]])
    order = T.greedy_log_det(feats, torch.ones(1, 3), 2)[0].tolist()
    assert order[1] == 2


def test_docprune_keeps_the_tokens_unlike_the_border_background():
    grid = 5
    tokens = torch.tensor([1.0, 0.2, 0.1]).repeat(1, grid * grid, 1) + 0.01 * torch.randn(1, grid * grid, 3)
    objects = [7, 12, 18]  # interior tokens with other content
    tokens[0, objects] = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.5, 0.0]])
    border = T.border_mask(grid)
    assert border.sum() == 16 and border[12] == 0
    _, idx = T.select_topk(tokens, T.foreground_scores(tokens, border), 3)
    assert idx[0].tolist() == objects


def test_apet_keeps_the_token_worst_reconstructed_from_those_kept():
    torch.manual_seed(0)
    feats = torch.randn(1, 30, 8)
    order = T.greedy_residual(feats, 6)[0].tolist()
    assert len(set(order)) == 6
    for step in range(1, 6):
        basis = feats[0, order[:step]].T  # [D, step]
        error = [(feats[0, i] - basis @ torch.linalg.lstsq(basis, feats[0, i]).solution).norm().item()
                 if i not in order[:step] else -1.0 for i in range(30)]
        assert order[step] == max(range(30), key=error.__getitem__), step


def test_zoo_sensitivity_is_the_projectors_finite_difference_response():
    torch.manual_seed(0)
    a = torch.randn(5, 8)
    directions = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    x = torch.randn(1, 4, 8)
    linear = lambda t: t @ a.T  # noqa: E731  (a linear projector moves every token alike: mean ‖A u‖)
    sens = T.projector_sensitivity(x, linear(x), linear, directions, 0.1)
    torch.testing.assert_close(sens, (directions @ a.T).norm(dim=-1).mean().expand(1, 4))
    relu = lambda t: torch.relu(t @ a.T)  # noqa: E731
    dead = (torch.linalg.pinv(a) @ torch.full((5,), -50.0))[None, None]  # every projected unit at -50
    x = torch.cat([x, dead], dim=1)
    sens = T.projector_sensitivity(x, relu(x), relu, directions, 0.1)
    assert sens[0, -1] == 0 and (sens[0, :-1] > 0).all()


def test_vlm_pruner_takes_the_best_token_outside_the_buffer_each_step():
    torch.manual_seed(0)
    scores = torch.rand(1, 36)
    ys, xs = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    coords = torch.stack([xs, ys], -1).reshape(-1, 2).float()
    dist = torch.cdist(coords, coords)
    order = T.buffered_spread(scores, T.spread_tiers(dist, 2.0), 12)[0].tolist()
    assert order[0] == int(scores.argmax()) and len(set(order)) == 12
    for step in range(1, 12):
        nearest = dist[:, order[:step]].min(dim=1).values
        for tier in (2.0, 1.0, 0.0):
            free = [i for i in range(36) if i not in order[:step] and nearest[i] >= tier]
            if free:
                assert order[step] == max(free, key=lambda i: float(scores[0, i])), step
                break


def _graph_nodes(fn, *args, at_least: int = 0) -> int:
    """Exported nodes of fn(*args) (those with an output of at least `at_least` elements)."""
    class Wrap(torch.nn.Module):
        def forward(self, *xs):
            return fn(*xs)

    return sum(n.op == "call_function" and getattr(n.meta.get("val"), "numel", lambda: 0)() >= at_least
               for n in torch.export.export(Wrap(), args).graph.nodes)


def test_greedy_selections_cost_few_graph_nodes_a_step():
    """Selection cost on a small encoder is per-node dispatch: each extra kept token adds 3 exported nodes to
    the max-min loop (argmax, row gather, minimum) and 16 to the residual loop (its rank-1 update and the
    norms' downdate), of which 3 touch the [N, D] residual (its product with the new direction, the scaled
    direction, the subtraction): nothing else in a step is larger than a row or the [N] scores."""
    torch.manual_seed(0)
    x, w = torch.randn(1, 50, 16), torch.rand(1, 50)
    tiers = T.spread_tiers(torch.cdist(torch.rand(50, 2), torch.rand(50, 2)), 0.3)
    per_step = {
        "divprune": lambda k: _graph_nodes(lambda f: T.farthest_point(f, k), x),
        "score": lambda k: _graph_nodes(lambda f, s: T.farthest_point(f, k, weights=s), x, w),
        "vlmpruner": lambda k: _graph_nodes(lambda s, t: T.buffered_spread(s, t, k), w, tiers),
        "apet": lambda k: _graph_nodes(lambda f: T.greedy_residual(f, k), x),
    }
    for name, nodes in per_step.items():
        step = (nodes(12) - nodes(2)) / 10
        assert step <= (16 if name == "apet" else 3), (name, step)
    full = lambda k: _graph_nodes(lambda f: T.greedy_residual(f, k), x, at_least=x[0].numel())  # noqa: E731
    assert (full(12) - full(2)) / 10 == 3


# ----- CORE: object-centric merging with a training-free grouping

def _objects(grid: int, labels: torch.Tensor, dim: int = 16, noise: float = 0.01, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    colours = torch.randn(int(labels.max()) + 1, dim, generator=g)
    x = colours[labels.flatten()][None] + noise * torch.randn(1, grid * grid, dim, generator=g)
    return x


def test_core_merges_each_object_into_the_mean_of_its_tokens_in_centroid_order():
    g = 8
    labels = torch.zeros(g, g, dtype=torch.long)
    labels[:4, 4:], labels[4:, :4], labels[4:, 4:] = 1, 2, 3  # quadrants: TL, TR, BL, BR
    x = _objects(g, labels)
    merged, cells = T.object_merge(x, x, g, T.spread_seeds(g, 4), 0.5, 4)
    flat = labels.flatten()
    for i in range(4):  # raster order of the centroids is the quadrants' order
        assert torch.allclose(merged[0, i], x[0, flat == i].mean(0), atol=1e-5)
    assert cells.tolist() == [[2 * g + 2, 2 * g + 6, 6 * g + 2, 6 * g + 6]]  # centroids (1.5, 5.5) rounded half to even


def test_core_groups_an_irregular_object_apart_from_its_background():
    """A disc on a background: with no spatial term the two groups are exactly the disc and the rest."""
    g = 10
    ys, xs = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    disc = (((ys - 4.5) ** 2 + (xs - 4.5) ** 2) <= 9).long()
    x = _objects(g, disc, noise=0.05)
    assign = T.group_assignment(x, g, T.spread_seeds(g, 2), 0.0, 3)[0]
    groups = assign.argmax(-1)
    assert len(set(groups[disc.flatten() == 1].tolist())) == 1 and len(set(groups[disc.flatten() == 0].tolist())) == 1
    assert groups[disc.flatten() == 1][0] != groups[disc.flatten() == 0][0]


def test_core_assigns_every_token_to_exactly_one_non_empty_group():
    g, k = 12, 9
    x = torch.randn(2, g * g, 24, generator=torch.Generator().manual_seed(3))
    assign = T.group_assignment(x, g, T.spread_seeds(g, k), 0.5, 4)
    assert assign.shape == (2, g * g, k)
    assert torch.equal(assign.sum(-1), torch.ones(2, g * g)) and (assign.sum(1) >= 1).all()
    seeds = T.spread_seeds(g, k)
    assert len(set(seeds.tolist())) == k
