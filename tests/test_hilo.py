"""Hi-Lo Prune: keep the salient tokens, let the most valuable discarded ones (candidates) into the shallow
layers before the kept rows, merge each into the kept row attending to it most at the removal layer, then
drop them. Checked against references written from the method's description."""
import math

import pytest
import torch

from tests.helpers import (
    SPACED_TEMPLATE, assert_export_refused, assert_programs_continue_the_prefill,
    assert_verified_with_the_same_tokens, three_target_bundle, tiny_pass_model)
from vlmc import api
from vlmc.passes.token import functional as T
from vlmc.passes.token.methods import causal_attend

HILO = {"name": "hilo", "keep": 5, "candidates": 4, "layer": 0}


def test_candidates_are_the_salient_tokens_the_kept_set_covers_worst():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 20, 12, generator=g)
    tokens, idx = T.lost_and_kept(x, 5, 4)
    salience = [1 - float(torch.cosine_similarity(x[0, j], x[0].mean(0), dim=0)) for j in range(20)]
    salience = [s / max(salience) for s in salience]
    kept = sorted(sorted(range(20), key=lambda j: -salience[j])[:5])
    lost = {j: salience[j] * (1 - max(float(torch.cosine_similarity(x[0, j], x[0, i], dim=0)) for i in kept))
            for j in range(20) if j not in kept}
    candidates = sorted(sorted(lost, key=lambda j: -lost[j])[:4])
    assert idx[0].tolist() == candidates + kept  # candidates first (the kept rows read them), each run ascending
    assert torch.equal(tokens[0], x[0, idx[0]])


def test_a_salient_token_the_kept_set_covers_loses_to_a_less_salient_one_it_does_not():
    x = torch.zeros(1, 6, 4)
    x[0, :, 0] = 1.0  # the background
    x[0, 1] = torch.tensor([-0.5, 1.0, 0.0, 0.0])  # the most distinct: kept
    x[0, 2] = torch.tensor([-0.5, 1.0, 0.05, 0.0])  # nearly as distinct, but nearly the kept token
    x[0, 4] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # less distinct, and nothing kept covers it
    s = T.salience(x)[0]
    assert s[1] > s[2] > s[4]
    assert T.lost_and_kept(x, 1, 1)[1][0].tolist() == [4, 1]


def test_each_candidate_merges_into_the_kept_row_attending_to_it_most():
    g = torch.Generator().manual_seed(1)
    heads, kv, t, d, width = 4, 2, 12, 8, 16
    q, k, h = torch.randn(1, heads, t, d, generator=g), torch.randn(1, kv, t, d, generator=g), torch.randn(1, t, width, generator=g)
    rows, c = torch.arange(2, 9), 3  # image rows 2..8: three candidates, then four kept
    got = T.candidate_merge(q, k, h, rows, c, 0.5)
    groups = {r: [] for r in range(c, 7)}
    for j in range(c):
        attention = []
        for r in range(c, 7):  # kept row r's softmax over the candidates' keys, mean over heads
            per_head = []
            for head in range(heads):
                logits = torch.stack([q[0, head, 2 + r] @ k[0, head // 2, 2 + m] for m in range(c)]) / math.sqrt(d)
                per_head.append(torch.softmax(logits, 0)[j])
            attention.append(float(torch.stack(per_head).mean()))
        best = max(range(len(attention)), key=attention.__getitem__)
        groups[c + best].append((j, 0.5 * attention[best]))  # counts its attention x weight
    assert sum(map(len, groups.values())) == c and sum(1 for g in groups.values() if g) >= 1
    for r, members in groups.items():
        total = h[0, 2 + r] + sum((share * h[0, 2 + m] for m, share in members), torch.zeros(width))
        expected = total / (1 + sum(share for _, share in members))
        torch.testing.assert_close(got[0, r - c], expected)


@pytest.fixture(scope="module")
def hilo_model(tiny_ckpt):
    return tiny_pass_model(tiny_ckpt, [HILO], 9)


def test_the_candidates_run_the_shallow_layers_then_merge_and_leave(hilo_model):
    """The forward equals: the connector's tokens reordered [candidates | kept], layer 0 on the whole prompt,
    the kept rows merged with their candidates, the candidates removed, layer 1 on what is left."""
    m, records, ids, pixels = hilo_model
    assert (records[0]["tokens_in"], records[0]["tokens_out"], records[0]["image_tokens"]) == (16, 5, 9)
    assert records[0]["in_llm"] and records[0]["params"]["candidates"] == 4
    lm = m.language_model
    with torch.no_grad():
        got = m(ids, pixels)
        x = m.connector(m.select_features(_vision(m, pixels)))
        _, idx = T.lost_and_kept(x, 5, 4)
        embeds = m.merge_embeddings(ids, x[:, idx[0]])
        t = embeds.shape[1]
        pos = torch.arange(t)[None]
        causal = causal_attend(m.config.text)
        h, q, k = lm.layers[0](embeds, m.rope(pos), 0, causal)
        merged = T.candidate_merge(q, k, h, torch.arange(2, 11), 4, 1.0)
        keep = torch.cat([torch.arange(2), torch.arange(6, t)])
        h = h[:, keep].clone()
        h[:, 2:7] = merged
        h, _, _ = lm.layers[1](h, m.rope(pos[:, keep]), 1, causal)
        expected = m.lm_head(lm.norm(h))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _vision(m, pixels):
    x = m.embed_image(pixels)
    for block in list(m.vision_blocks)[: m.num_vision_blocks]:
        x = block(x, None)
    return x


def test_prefill_and_decode_programs_hold_the_candidates_only_up_to_the_removal_layer(hilo_model):
    m, _, ids, pixels = hilo_model
    assert m.cache_shifts() == [0, 4]
    with torch.no_grad():
        embeds = m.merge_embeddings(ids, m.encode_image(pixels))
    eager, static = assert_programs_continue_the_prefill(m, embeds, 2, 9)
    assert eager == [embeds.shape[1], embeds.shape[1] - 4] and static == [40, 36]


def test_hilo_exports_to_onnx_verifies_and_gives_eagers_tokens(tiny_ckpt, tmp_path, sample_image):
    b = api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "max_context": 48, "prompt_template": SPACED_TEMPLATE,
                     "passes": [HILO]}, tmp_path / "h")
    m = b.manifest
    assert m["prompt"]["num_image_tokens"] == 9 and m["decoder"]["cache_shifts"] == [0, 4]
    assert "text_prefill" in m["targets"]["onnx"]["programs"]
    assert_verified_with_the_same_tokens(b, sample_image, ("eager", "onnxruntime"), 5)


@pytest.mark.slow  # three targets (-m slow)
def test_hilo_verifies_on_every_target_with_the_same_tokens(tiny_ckpt, tmp_path, sample_image):
    b = three_target_bundle(tiny_ckpt, [HILO], tmp_path / "h3")
    assert_verified_with_the_same_tokens(b, sample_image, ("eager", "onnxruntime", "executorch"))


@pytest.mark.parametrize("spec, fragment", [
    ({**HILO, "candidates": 12}, "'keep' \\+ 'candidates' = 17 exceed the 16 tokens"),
    ({**HILO, "layer": 1}, "parameter 'layer': removing the candidates after decoder.layer\\[1\\] saves nothing"),
    ({**HILO, "weight": -1}, "parameter 'weight'"),
    ({**HILO, "at": "vision.out"}, "hilo"),
])
def test_bad_hilo_parameters_are_refused(tiny_ckpt, tmp_path, spec, fragment):
    assert_export_refused(tiny_ckpt, tmp_path / "b", [spec], fragment, SPACED_TEMPLATE)


@pytest.mark.parametrize("specs, fragment", [
    ([{"name": "fastv", "keep": 12, "at": "decoder.layer[0]"}, HILO], "needs the image rows as they enter the decoder"),
    ([HILO, {"name": "divprune", "keep": 6}], "orders the image rows for a later layer"),
])
def test_nothing_may_reorder_or_drop_the_rows_before_the_removal_layer(tiny_ckpt, tmp_path, specs, fragment):
    assert_export_refused(tiny_ckpt, tmp_path / "b", specs, fragment, SPACED_TEMPLATE)
