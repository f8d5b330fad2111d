"""Token methods inside the LLM (FastV, V2Drop, TransPrune): the full-prompt prefill drops image rows after a
decoder layer, later layers keep shorter caches, kept rows keep their original positions, and the decode
step continues consistently on every target."""
import re

import numpy as np
import pytest
import torch

from vlmc import api, passes
from tests.helpers import SPACED_TEMPLATE, assert_programs_continue_the_prefill, three_target_bundle
from vlmc.errors import VlmcError
from vlmc.models_zoo import load
from vlmc.models_zoo.core import LayerView, keep_rows
from vlmc.passes.token import functional as T
from vlmc.passes.token.methods import LastTokenAttentionStage, TransitionStage, VariationStage, causal_attend

TEMPLATE = SPACED_TEMPLATE
IN_LLM = {
    "fastv": {"name": "fastv", "at": "decoder.layer[0]", "keep": 5},
    "v2drop": {"name": "v2drop", "at": "decoder.layer[0]", "keep": 5},
    "transprune": {"name": "transprune", "at": "decoder.layer[0]", "keep": 5},
    "duet": {"name": "duet", "at": "decoder.layer[0]", "dominant": 7, "contextual": 3, "keep": 5},
    "hawk": {"name": "hawk", "at": "decoder.layer[0]", "keep": 5, "head_weights": [0.4, 0.3, 0.2, 0.1]},
    "horizon": {"name": "horizon", "at": "decoder.layer[0]", "keep": 5},
}
PROMPT_IMAGE_TOKENS = {"duet": 10}  # its vision stage shrinks the image before the LLM; the others keep 16


# ---------------------------------------------------------------- the scorers' defining properties

def _view(t=12, n=6, start=3, last=9, heads=4, kv_heads=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, heads, t, d, generator=g), torch.randn(1, kv_heads, t, d, generator=g)
    h_in, h = torch.randn(1, t, 16, generator=g), torch.randn(1, t, 16, generator=g)
    return LayerView(h_in, h, q, k, start + torch.arange(n), torch.tensor([last]))


def test_fastv_keeps_the_image_rows_the_last_token_attends_to_most():
    v = _view()
    v.k[:, :, 10:] = 50.0 * v.q[:, ::2, 9:10]  # rows after `last` (padding) would dominate if seen
    probs = []
    for head in range(4):  # brute force: each head's softmax over the rows the last token sees
        scores = torch.stack([v.q[0, head, 9] @ v.k[0, head // 2, j] / 8 ** 0.5 for j in range(10)])
        probs.append(torch.softmax(scores, 0))
    mean = torch.stack(probs).mean(0)[3:9]
    expected = sorted(torch.topk(mean, 3).indices.tolist())
    assert LastTokenAttentionStage(3, 6).select(v).tolist() == expected


def test_v2drop_keeps_the_rows_a_layer_changed_most():
    v = _view()
    change = [((v.h[0, r] - v.h_in[0, r]).norm() / v.h_in[0, r].norm()).item() for r in range(3, 9)]
    assert VariationStage(2, 6).select(v).tolist() == sorted(np.argsort(change)[-2:].tolist())


def test_instruction_attention_reads_only_the_text_after_the_image():
    v = _view()
    base = T.instruction_attention(v.q, v.k, v.image_rows, v.last)
    v.q[:, :, :9] += 5.0 * torch.randn(1, 4, 9, 8)  # rows before the instruction: no effect
    v.q[:, :, 10:] += 5.0 * torch.randn(1, 4, 2, 8)  # rows after the last: no effect
    torch.testing.assert_close(T.instruction_attention(v.q, v.k, v.image_rows, v.last), base)
    v.q[:, :, 9] += 1.0  # the instruction row itself does change it
    assert not torch.allclose(T.instruction_attention(v.q, v.k, v.image_rows, v.last), base)
    assert TransitionStage(2, 6, 1.0).select(v).shape == (2,)


def test_hawk_head_importance_is_zero_for_a_head_the_output_ignores(fastv_model):
    from vlmc.passes.token.methods import head_importance

    m, ids, pixels = fastv_model
    with torch.no_grad():
        prompts = [(m.merge_embeddings(ids, m.encode_image(pixels)), 2, ids.shape[1] - 1)]
        o_proj = m.language_model.layers[0].self_attn.o_proj.weight
        saved = o_proj.clone()
        o_proj[:, 2 * 16: 3 * 16] = 0.0  # head 2 (head_dim 16) no longer reaches the residual stream
        try:
            w = head_importance(m, 0, prompts)
        finally:
            o_proj.copy_(saved)
    assert w[2] == 0 and (w[[0, 1, 3]] > 0).all() and abs(float(w.sum()) - 1) < 1e-6


@pytest.mark.slow
def test_hawk_calibrates_its_head_weights_into_the_recipe(tiny_ckpt, calibration_jsonl, tmp_path):
    spec = {k: v for k, v in IN_LLM["hawk"].items() if k != "head_weights"}
    b = api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "max_context": 48, "prompt_template": TEMPLATE,
                     "calibration": {"dataset": str(calibration_jsonl), "n": 8}, "passes": [spec]}, tmp_path / "h")
    w = b.manifest["recipe"]["passes"][0]["head_weights"]
    assert len(w) == 4 and abs(sum(w) - 1) < 1e-4 and min(w) >= 0
    assert all(r["passed"] for r in b.manifest["verification"]["results"])


def test_keep_rows_keeps_text_and_the_kept_image_rows_in_order():
    rows = keep_rows(10, torch.tensor([2]), torch.tensor([1, 3]), 5)
    assert rows.tolist() == [0, 1, 3, 5, 7, 8, 9]


# ---------------------------------------------------------------- the model and its programs

@pytest.fixture(scope="module")
def fastv_model(tiny_ckpt):
    m = load(str(tiny_ckpt)).model.eval()
    passes.apply(m, [IN_LLM["fastv"]])
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([[12, 14, 4] + [4] * 15 + [5, 6, 7, 8, 13, 14]])  # USER : <image>x16 what color is the ASSISTANT :
    return m, ids, torch.randn(1, 3, 32, 32, generator=g)


def test_kept_rows_keep_their_original_positions(fastv_model):
    """The pruned forward equals: layer 0 on the whole prompt, then the kept rows alone, at their original
    RoPE positions, through the rest of the model with plain causal attention."""
    m, ids, pixels = fastv_model
    lm = m.language_model
    with torch.no_grad():
        pruned = m(ids, pixels)[0, -1]
        embeds = m.merge_embeddings(ids, m.encode_image(pixels))
        t = embeds.shape[1]
        pos = torch.arange(t)[None]
        causal = causal_attend(m.config.text)  # grouped heads, plain causal attention
        h, q, k = lm.layers[0](embeds, m.rope(pos), 0, causal)
        scores = T.last_token_attention(q, k, 2 + torch.arange(16), torch.tensor([t - 1]))
        image_kept = 2 + torch.sort(torch.topk(scores, 5).indices).values
        rows = torch.cat([torch.arange(2), image_kept, torch.arange(18, t)])
        h, _, _ = lm.layers[1](h[:, rows], m.rope(pos[:, rows]), 1, causal)
        expected = m.lm_head(lm.norm(h))[0, -1]
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=1e-5)


def test_prefill_and_decode_programs_continue_the_pruned_caches(fastv_model):
    m, ids, pixels = fastv_model
    assert m.cache_shifts() == [0, 11]
    with torch.no_grad():
        embeds = m.merge_embeddings(ids, m.encode_image(pixels))
    eager, static = assert_programs_continue_the_prefill(m, embeds, 2, 16)
    assert eager == [embeds.shape[1], embeds.shape[1] - 11] and static == [40, 29]


# ---------------------------------------------------------------- bundles

# the three-target conformance of every in-LLM method runs with -m slow; the default run exports one
# (test_a_pre_llm_pass_chains_with_an_in_llm_one, on onnx) to keep it short
@pytest.fixture(scope="module", params=[pytest.param(m, marks=pytest.mark.slow) for m in IN_LLM])
def in_llm_bundle(request, tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("in_llm") / request.param
    return three_target_bundle(tiny_ckpt, [IN_LLM[request.param]], out)


def test_in_llm_method_exports_and_verifies_on_every_target(in_llm_bundle):
    m = in_llm_bundle.manifest
    (p,) = m["passes"]
    n = PROMPT_IMAGE_TOKENS.get(p["name"], 16)
    assert (p["tokens_in"], p["tokens_out"], p["in_llm"]) == (16, 5, True)
    assert m["prompt"]["num_image_tokens"] == n  # the prompt holds the image as the LLM gets it; the LLM drops rows
    assert m["decoder"]["cache_shifts"] == [0, n - 5] and m["decoder"]["cache_lengths"] == [48, 48 - n + 5]
    assert m["runner"].startswith("vlmc")
    for target in ("onnx", "executorch", "coreml"):
        assert "text_prefill" in m["targets"][target]["programs"]
    checked = {(r["target"], r["program"]) for r in m["verification"]["results"]}
    assert {("onnx", "text_prefill"), ("executorch", "text_prefill"), ("coreml", "text_prefill")} <= checked
    assert all(r["passed"] for r in m["verification"]["results"])


def test_in_llm_method_gives_the_same_tokens_on_every_runtime(in_llm_bundle, sample_image):
    tokens = {rt: api.run(in_llm_bundle.path, rt, sample_image, "what color is the circle ?", max_new_tokens=6)["tokens"]
              for rt in ("eager", "onnxruntime", "executorch")}
    assert len(tokens["eager"]) == 6 and tokens["eager"] == tokens["onnxruntime"] == tokens["executorch"], tokens


def test_a_pre_llm_pass_chains_with_an_in_llm_one(tiny_ckpt, tmp_path, sample_image):
    b = api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "max_context": 48, "prompt_template": TEMPLATE,
                     "passes": [{"name": "divprune", "keep": 10}, IN_LLM["fastv"]]}, tmp_path / "c")
    assert [(p["name"], p["tokens_in"], p["tokens_out"]) for p in b.manifest["passes"]] == [("divprune", 16, 10), ("fastv", 10, 5)]
    assert b.manifest["decoder"]["cache_shifts"] == [0, 5]
    assert all(r["passed"] for r in b.manifest["verification"]["results"])
    # text_prefill and text_decoder are separate ONNX models reading every decoder weight from one file
    programs = b.manifest["targets"]["onnx"]["programs"]
    decoder = programs["text_decoder"]
    assert decoder["files"] == ["text_decoder.onnx", "onnx_weights.data"]
    assert programs["text_prefill"]["files"] == ["text_prefill.onnx", "onnx_weights.data"]
    assert decoder["shared_bytes"] == decoder["weight_bytes"] > 0
    weights = b.manifest["targets"]["onnx"]["weights"]
    assert weights["saved_bytes"] >= decoder["weight_bytes"]
    assert (b.path / "onnx_weights.data").stat().st_size >= weights["tensor_bytes"]
    assert weights["tensor_bytes"] == sum(p["weight_bytes"] for p in programs.values()) - weights["saved_bytes"]
    tokens = {rt: api.run(b.path, rt, sample_image, "what color is the circle ?", max_new_tokens=4)["tokens"]
              for rt in ("eager", "onnxruntime")}
    assert tokens["eager"] == tokens["onnxruntime"]


@pytest.mark.slow
def test_in_llm_method_with_static_int8_verifies(tiny_ckpt, calibration_jsonl, tmp_path):
    b = api.compile({"model": str(tiny_ckpt), "targets": ["onnx", "executorch"], "max_context": 48, "prompt_template": TEMPLATE,
                     "calibration": {"dataset": str(calibration_jsonl), "n": 8},
                     "passes": [IN_LLM["fastv"], {"name": "w8a8"}]}, tmp_path / "q")
    assert {"text_prefill", "text_decoder"} <= set(b.manifest["targets"]["onnx"]["programs"])
    assert b.manifest["targets"]["executorch"]["programs"]["text_prefill"]["quantization"]["scheme"] == "w8a8"
    assert all(r["passed"] for r in b.manifest["verification"]["results"])


def _answer_logits(model, prompt):
    """The next-token logits of one calibration prompt through the model's in-LLM stages."""
    with torch.no_grad():
        return model.lm_head(passes.prompt_prefill(model, prompt))


@pytest.mark.parametrize("spec", [
    {"name": "fastv", "at": "decoder.layer[1]", "keep": 22},
    {"name": "v2drop", "at": "decoder.layer[0]", "keep": 22, "steps": 3},
    {"name": "duet", "at": "decoder.layer[1]", "keep": 22, "dominant": 40, "contextual": 10},
])
def test_in_llm_static_mode_keeps_the_rows_the_method_keeps_on_its_calibration_prompt(spec):
    """Calibrated on one prompt, the constant rows are exactly what the scorer keeps on that prompt, at
    every dropping layer (each calibrated after the earlier ones became constant), so the answer matches."""
    from vlmc.passes.quant.calibration import CalibrationSource
    from vlmc.recipe import Recipe

    class OnePrompt(CalibrationSource):
        def prompts(self, model):
            return super().prompts(model)[:1]

    loaded = load("shapes-llava")
    calibration = OnePrompt(loaded.template(Recipe.model_validate({"calibration": {"n": 8}})), loaded.tokenizer, loaded.model)
    dynamic, static = load("shapes-llava").model, load("shapes-llava").model
    passes.apply(dynamic, [spec])
    records, _ = passes.apply(static, [{**spec, "static": True}], calibration)
    rows = records[0]["params"]["indices"]
    assert len(rows) == spec.get("steps", 1) and len(rows[-1]) == 22 and all(r == sorted(set(r)) for r in rows)
    assert records[0]["reads_text"] is False and records[0]["in_llm"]
    prompt = calibration.prompts(dynamic)[0]
    torch.testing.assert_close(_answer_logits(static, prompt), _answer_logits(dynamic, prompt))
    other = CalibrationSource(loaded.template(Recipe.model_validate({"calibration": {"n": 8}})), loaded.tokenizer, loaded.model).prompts(dynamic)[5]
    assert not torch.allclose(_answer_logits(static, other), _answer_logits(dynamic, other))  # other prompts differ


@pytest.mark.slow
def test_in_llm_static_mode_exports_a_constant_gather(tiny_ckpt, calibration_jsonl, tmp_path, sample_image):
    import onnx

    recipe = {"model": str(tiny_ckpt), "targets": ["onnx", "executorch"], "max_context": 48, "prompt_template": TEMPLATE,
              "calibration": {"dataset": str(calibration_jsonl), "n": 8}}
    b = api.compile({**recipe, "passes": [{**IN_LLM["fastv"], "static": True}]}, tmp_path / "s")
    rows = b.manifest["passes"][0]["params"]["indices"]
    assert len(rows) == 1 and len(rows[0]) == 5 and rows[0] == sorted(set(rows[0]))
    assert b.manifest["recipe"]["passes"][0]["indices"] == rows  # the bundle rebuilds without the data
    assert b.manifest["passes"][0]["reads_text"] is False
    ops = {n.op_type for n in onnx.load(str(b.path / "text_prefill.onnx")).graph.node}
    assert "TopK" not in ops  # no scoring left in the prefill
    assert all(r["passed"] for r in b.manifest["verification"]["results"])
    tokens = {rt: api.run(b.path, rt, sample_image, "what color is the circle ?", max_new_tokens=4)["tokens"]
              for rt in ("eager", "onnxruntime", "executorch")}
    assert tokens["eager"] == tokens["onnxruntime"] == tokens["executorch"]


@pytest.mark.parametrize("spec,fragment", [
    ({"name": "fastv", "keep": 5, "at": "decoder.layer[0]", "indices": [1, 2]}, "'indices': needs 5 distinct indices in 0..15"),
    ({"name": "fastv", "keep": 5, "at": "decoder.layer[0]", "indices": [[1, 2, 3, 4, 5], [1, 2]]}, "'indices': needs one list per dropping layer (1), not 2"),
    ({"name": "fastv", "keep": 5, "at": "decoder.layer[1]"}, "decoder.layer[1] is the last layer"),
    ({"name": "fastv", "keep": 16, "at": "decoder.layer[0]"}, "'keep': 16 must be below the 16 tokens"),
    ({"name": "fastv", "keep": 5, "at": "projector.out"}, "not a place this method works"),
    ({"name": "fastv", "keep": 5, "at": "decoder.layer[5]"}, "unknown insertion point"),
    ({"name": "v2drop", "keep": 15, "steps": 2, "at": "decoder.layer[0]"}, "decoder.layer[1] is the last layer"),
    ({"name": "divprune", "keep": 5, "at": "decoder.layer[0]"}, "not a place this method works"),
    ({"name": "hawk", "keep": 5, "at": "decoder.layer[0]", "head_weights": [1, 0]}, "'head_weights': needs 4 non-negative"),
    ({"name": "duet", "keep": 9, "dominant": 6, "contextual": 3, "at": "decoder.layer[0]"}, "'keep': 9 must be below the vision stage's 9"),
])
def test_bad_in_llm_parameters_are_refused_before_export(tiny_ckpt, tmp_path, spec, fragment):
    with pytest.raises(VlmcError, match=re.escape(fragment)):
        api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "prompt_template": TEMPLATE, "passes": [spec]}, tmp_path / "x")
    assert not (tmp_path / "x").exists()

