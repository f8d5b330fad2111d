"""ALVTS: every layer from `at` re-selects the image rows it computes by a low-rank estimate of its own
attention from the question's last row; the other rows skip that layer unchanged and rejoin after it, the
layer's cache is shorter by them, and prefill and decode continue consistently on every target."""
import pytest
import torch

from tests.helpers import (
    SPACED_TEMPLATE, assert_export_refused, assert_programs_continue_the_prefill,
    assert_verified_with_the_same_tokens, three_target_bundle)
from vlmc import api, passes
from vlmc.errors import VlmcError
from vlmc.models_zoo import load
from vlmc.passes.token import functional as T
from vlmc.passes.token.methods import causal_attend

ALVTS = {"name": "alvts", "at": "decoder.layer[1]", "keep": 5, "rank": 8}


def test_the_scorer_is_the_layers_summed_attention_logits_at_full_rank():
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, d, width = 4, 2, 8, 24
    wq, wk = torch.randn(heads * d, width, generator=g), torch.randn(kv_heads * d, width, generator=g)
    bq, x, rows = torch.randn(heads * d, generator=g), torch.randn(width, generator=g), torch.randn(10, width, generator=g)
    q = (wq @ x + bq).reshape(heads, d)
    k = (rows @ wk.T).reshape(10, kv_heads, d).repeat_interleave(heads // kv_heads, 1)  # [10, H, d]
    exact = (k * q[None]).sum((1, 2))
    a, b, c = T.attention_factors(wq, wk, bq, heads, kv_heads, rank=width)
    torch.testing.assert_close(T.low_rank_scores(x, rows, a, b, c), exact, atol=1e-3, rtol=1e-4)
    m = torch.einsum("hdi,hdj->ij", wq.reshape(heads, d, width), wk.reshape(kv_heads, d, width).repeat_interleave(2, 0))
    errors = []
    for rank in (2, 6, 12):  # the best rank-r form: the truncated SVD's error
        a, b, _ = T.attention_factors(wq, wk, None, heads, kv_heads, rank)
        sigma = torch.linalg.svdvals(m)
        errors.append(torch.linalg.matrix_norm(a @ b.T - m).item())
        assert errors[-1] == pytest.approx(sigma[rank:].pow(2).sum().sqrt().item(), rel=1e-4)
    assert errors == sorted(errors, reverse=True)


@pytest.fixture(scope="module")
def alvts_model(tiny_ckpt):
    m = load(str(tiny_ckpt)).model.eval()
    passes.apply(m, [ALVTS])
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([[12, 14, 4] + [4] * 15 + [5, 6, 7, 8, 13, 14]])  # USER : <image>x16 what color is the ASSISTANT :
    return m, ids, torch.randn(1, 3, 32, 32, generator=g)


def test_unchosen_rows_skip_the_layer_and_rejoin_unchanged(alvts_model):
    """The forward equals: layer 0 on the whole prompt; layer 1 on the text and the 5 image rows its scorer
    ranks highest (plain causal attention among them, original positions); the other 11 rows carried
    past layer 1 as they were."""
    m, ids, pixels = alvts_model
    lm = m.language_model
    stage = m.decoder_stages()[1][0]
    with torch.no_grad():
        got = m(ids, pixels)
        embeds = m.merge_embeddings(ids, m.encode_image(pixels))
        t = embeds.shape[1]
        pos = torch.arange(t)[None]
        causal = causal_attend(m.config.text)  # grouped heads, plain causal attention
        h, _, _ = lm.layers[0](embeds, m.rope(pos), 0, causal)
        x = lm.layers[1].input_layernorm(h)[0]
        scores = T.low_rank_scores(x[t - 1], x[2:18], stage.a, stage.b, stage.c)
        image_kept = 2 + torch.sort(torch.topk(scores, 5).indices).values
        rows = torch.cat([torch.arange(2), image_kept, torch.arange(18, t)])
        computed, _, _ = lm.layers[1](h[:, rows], m.rope(pos[:, rows]), 1, causal)
        expected = h.clone()
        expected[:, rows] = computed
        expected = m.lm_head(lm.norm(expected))
    assert got.shape[1] == t  # no row is dropped for good
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    skipped = [r for r in range(2, 18) if r not in image_kept.tolist()]
    assert len(skipped) == 11


def test_prefill_and_decode_programs_continue_the_shorter_cache(alvts_model):
    m, ids, pixels = alvts_model
    assert m.cache_shifts() == [0, 11] and m.dropped_in_llm() == 0
    with torch.no_grad():
        embeds = m.merge_embeddings(ids, m.encode_image(pixels))
    eager, static = assert_programs_continue_the_prefill(m, embeds, 2, 16)
    assert eager == [embeds.shape[1], embeds.shape[1] - 11] and static == [40, 29]


def test_alvts_exports_to_onnx_verifies_and_gives_eagers_tokens(tiny_ckpt, tmp_path, sample_image):
    b = api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "max_context": 48, "prompt_template": SPACED_TEMPLATE,
                     "passes": [{"name": "divprune", "keep": 12}, ALVTS]}, tmp_path / "a")
    m = b.manifest
    assert [(p["name"], p["tokens_in"], p["tokens_out"], p["in_llm"]) for p in m["passes"]] == [
        ("divprune", 16, 12, False), ("alvts", 12, 12, True)]
    assert m["decoder"]["cache_shifts"] == [0, 7] and m["decoder"]["cache_lengths"] == [48, 41]
    assert m["runner"].startswith("vlmc") and "text_prefill" in m["targets"]["onnx"]["programs"]
    assert_verified_with_the_same_tokens(b, sample_image, ("eager", "onnxruntime"), 5)


@pytest.mark.slow  # three targets (-m slow)
def test_alvts_verifies_on_every_target_with_the_same_tokens(tiny_ckpt, tmp_path, sample_image):
    b = three_target_bundle(tiny_ckpt, [{**ALVTS, "at": "decoder.layer[0]"}], tmp_path / "a3")
    m = b.manifest
    assert m["decoder"]["cache_shifts"] == [11, 11]
    checked = {(r["target"], r["program"]) for r in m["verification"]["results"]}
    assert {("onnx", "text_prefill"), ("executorch", "text_prefill"), ("coreml", "text_prefill")} <= checked
    assert_verified_with_the_same_tokens(b, sample_image, ("eager", "onnxruntime", "executorch"))


@pytest.mark.parametrize("spec, fragment", [
    ({**ALVTS, "layers": 3}, "parameter 'layers': 3 layers from decoder.layer\\[1\\] run past the decoder's 2"),
    ({**ALVTS, "rank": 4096}, "parameter 'rank': 4096 is above the decoder's width"),
    ({**ALVTS, "keep": 16}, "keep"),
])
def test_bad_alvts_parameters_are_refused(tiny_ckpt, tmp_path, spec, fragment):
    assert_export_refused(tiny_ckpt, tmp_path / "b", [spec], fragment, SPACED_TEMPLATE)


def test_a_skipping_layer_cannot_also_drop_rows_or_skip_by_two_passes(tiny_ckpt, tmp_path):
    with pytest.raises(VlmcError, match="cannot share a layer"):
        api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "prompt_template": SPACED_TEMPLATE,
                     "passes": [{**ALVTS, "at": "decoder.layer[0]"}, {"name": "fastv", "at": "decoder.layer[0]", "keep": 3}]},
                    tmp_path / "b")
    with pytest.raises(VlmcError, match="another pass already chooses which image rows skip this layer"):
        api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "prompt_template": SPACED_TEMPLATE,
                     "passes": [ALVTS, {**ALVTS, "keep": 3}]}, tmp_path / "b")
