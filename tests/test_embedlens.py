"""EmbedLens: keep the alive visual tokens (pointing away from the image's mean token, or reading as language
to the LLM: largest cosine similarity to its token embeddings), never its sinks (norm outliers), and let the image rows enter the decoder at a
middle layer: the layers before it run the text alone and hold no image rows in their caches."""
import pytest
import torch

from tests.helpers import (
    SPACED_TEMPLATE, assert_export_refused, assert_programs_continue_the_prefill,
    assert_verified_with_the_same_tokens, three_target_bundle, tiny_pass_model)
from vlmc import api
from vlmc.passes.token import functional as T
from vlmc.passes.token.methods import LensStage, causal_attend

LENS = {"name": "embedlens", "keep": 6, "inject": 1}


def test_alive_tokens_are_kept_and_sinks_never():
    g = torch.Generator().manual_seed(0)
    vocabulary = T.unit(torch.randn(20, 16, generator=g))
    x = torch.randn(1, 10, 16, generator=g)
    x[0, 2] = 3.0 * vocabulary[4]  # reads exactly as a word
    x[0, 7] = 0.5 * vocabulary[9] + 0.05 * torch.randn(16, generator=g)  # nearly a word
    x[0, 5] = 400.0 * vocabulary[1]  # also a word, but a sink: its norm dwarfs the others
    scores = T.lens_scores(x, vocabulary, sink_factor=10.0)[0]
    expected = torch.stack([(T.unit(x[0, j]) @ vocabulary.T).max() for j in range(10)])
    expected[5] = -2.0
    torch.testing.assert_close(scores, expected)
    kept, idx = LensStage(3, vocabulary, 10.0, 16).select(x)
    assert 2 in idx[0].tolist() and 7 in idx[0].tolist() and 5 not in idx[0].tolist()
    assert idx[0].tolist() == sorted(idx[0].tolist()) and torch.equal(kept[0], x[0, idx[0]])


def test_the_distinct_reading_keeps_what_the_images_average_token_does_not_say():
    g = torch.Generator().manual_seed(1)
    background = torch.randn(16, generator=g)
    x = background + 0.05 * torch.randn(1, 12, 16, generator=g)  # a plain background ...
    x[0, 3] = torch.randn(16, generator=g)  # ... with two objects on it
    x[0, 9] = -background
    scores = T.lens_scores(x, None, sink_factor=10.0)[0]
    torch.testing.assert_close(scores, 1 - (T.unit(x[0]) @ T.unit(x[0].mean(0))))
    assert LensStage(2, None, 10.0, 16).select(x)[1][0].tolist() == [3, 9]


@pytest.fixture(scope="module")
def lens_model(tiny_ckpt):
    return tiny_pass_model(tiny_ckpt, [LENS], 6)


def test_image_rows_enter_the_decoder_at_the_injection_layer(lens_model):
    """The forward equals: layer 0 on the text rows alone (original positions), then layer 1 on the whole
    prompt, the image rows coming in as the projector left them."""
    m, records, ids, pixels = lens_model
    assert (records[0]["tokens_in"], records[0]["tokens_out"], records[0]["in_llm"]) == (16, 6, True)
    lm = m.language_model
    with torch.no_grad():
        got = m(ids, pixels)
        embeds = m.merge_embeddings(ids, m.encode_image(pixels))
        t = embeds.shape[1]
        pos = torch.arange(t)[None]
        causal = causal_attend(m.config.text)  # grouped heads, plain causal attention
        text = torch.cat([torch.arange(2), torch.arange(8, t)])
        h = embeds.clone()
        h[:, text] = lm.layers[0](embeds[:, text], m.rope(pos[:, text]), 0, causal)[0]
        h, _, _ = lm.layers[1](h, m.rope(pos), 1, causal)
        expected = m.lm_head(lm.norm(h))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_prefill_and_decode_programs_keep_no_image_rows_before_the_injection_layer(lens_model):
    m, _, ids, pixels = lens_model
    assert m.cache_shifts() == [6, 0]
    with torch.no_grad():
        embeds = m.merge_embeddings(ids, m.encode_image(pixels))
    eager, static = assert_programs_continue_the_prefill(m, embeds, 2, 6)
    assert eager == [embeds.shape[1] - 6, embeds.shape[1]] and static == [34, 40]


def test_embedlens_exports_to_onnx_verifies_and_gives_eagers_tokens(tiny_ckpt, tmp_path, sample_image):
    b = api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "max_context": 48, "prompt_template": SPACED_TEMPLATE,
                     "passes": [LENS]}, tmp_path / "l")
    m = b.manifest
    assert m["prompt"]["num_image_tokens"] == 6 and m["decoder"]["cache_shifts"] == [6, 0]
    assert m["runner"].startswith("vlmc") and "text_prefill" in m["targets"]["onnx"]["programs"]
    assert_verified_with_the_same_tokens(b, sample_image, ("eager", "onnxruntime"), 5)


def test_without_injection_it_is_a_pre_llm_pass_the_stock_runner_takes(tiny_ckpt, tmp_path):
    b = api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "max_context": 48, "prompt_template": SPACED_TEMPLATE,
                     "passes": [{**LENS, "inject": 0}]}, tmp_path / "l0")
    m = b.manifest
    assert m["passes"][0]["in_llm"] is False and "text_prefill" not in m["targets"]["onnx"]["programs"]
    assert m["runner"].startswith("any")


@pytest.mark.slow  # three targets (-m slow)
def test_embedlens_verifies_on_every_target_with_the_same_tokens(tiny_ckpt, tmp_path, sample_image):
    b = three_target_bundle(tiny_ckpt, [LENS], tmp_path / "l3")
    assert_verified_with_the_same_tokens(b, sample_image, ("eager", "onnxruntime", "executorch"))


@pytest.mark.parametrize("spec, fragment", [
    ({**LENS, "inject": 2}, "parameter 'inject': decoder.layer\\[2\\] is past the decoder's last layer \\(1\\)"),
    ({**LENS, "at": "vision.out"}, "embedlens"),
    ({**LENS, "sink_factor": 1.0}, "sink_factor"),
])
def test_bad_embedlens_parameters_are_refused(tiny_ckpt, tmp_path, spec, fragment):
    assert_export_refused(tiny_ckpt, tmp_path / "b", [spec], fragment, SPACED_TEMPLATE)
