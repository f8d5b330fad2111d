"""Gemma 3 on the core: parity with transformers (bidirectional image rows, sliding windows, two RoPEs),
its processor, export on every target, and which passes run."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers_gemma3 import make_hf_gemma3
from vlmc import api
from vlmc.errors import VlmcError
from vlmc.models_zoo import load, save_checkpoint
from vlmc.models_zoo.gemma3 import Gemma3Config
from vlmc.recipe import build
from vlmc.runtimes.image import load_image

QUESTION = "what color is the circle ?"
S, F = "sliding_attention", "full_attention"
# Every config has more text rows after the image than its sliding window, so windows matter.
CONFIGS = {
    # GQA 2:1, sliding/full/sliding, linear RoPE scaling on the full layer, query_pre_attn_scalar != head_dim,
    # tied head, a 4x4 patch grid pooled to 2x2
    "gqa2-tied-linear": dict(heads=4, kv_heads=2, layer_types=[S, F, S], sliding_window=4, query_pre_attn_scalar=16),
    # GQA 4:1, untied head, no RoPE scaling, 4 layers, 8x8 grid pooled to 4x4 (16 tokens); config.json
    # rewritten in the pre-transformers-5 spelling (sliding_window_pattern, rope_theta, rope_local_base_freq,
    # rope_scaling)
    "gqa4-untied-legacy": dict(heads=4, kv_heads=1, num_layers=4, sliding_window=6, tie=False, rope_factor=4.0,
                               image_size=32, patch_size=4, mm_tokens=16, legacy=2),
    # MHA, full then sliding (window 3), no pooling (mm_tokens = the whole 4x4 grid), head_dim 16 with
    # query_pre_attn_scalar 8, and an image token id outside the vocabulary (embedded as 0 by transformers)
    "mha-nopool-oov": dict(heads=2, kv_heads=2, head_dim=16, layer_types=[F, S], num_layers=2, sliding_window=3,
                           image_size=24, patch_size=6, mm_tokens=16, image_token=64),
}


def _legacy_config(d, pattern: int):
    """Rewrite config.json as older Gemma 3 configs spell it."""
    cfg = json.loads((d / "config.json").read_text())
    t = cfg["text_config"]
    rope = t.pop("rope_parameters")
    t.pop("layer_types")
    t["sliding_window_pattern"] = pattern
    t["rope_local_base_freq"] = rope[S]["rope_theta"]
    t["rope_theta"] = rope[F]["rope_theta"]
    if rope[F]["rope_type"] == "linear":
        t["rope_scaling"] = {"rope_type": "linear", "factor": rope[F]["factor"]}
    (d / "config.json").write_text(json.dumps(cfg))


def _make(d, legacy=None, **kw):
    hf, processor = make_hf_gemma3(d, sliding_window_pattern=legacy, **kw)
    if legacy:
        assert hf.config.text_config.layer_types == [S if (i + 1) % legacy else F for i in range(kw["num_layers"])]
        _legacy_config(d, legacy)
    return hf, processor


def _prompt(loaded, question=QUESTION):
    recipe = loaded.template(build({}))
    c = loaded.config
    return loaded.tokenizer.prompt(recipe.prompt_template, question, loaded.model.num_image_tokens, c.image_token_id,
                                   loaded.bos_token_id)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """The export model: 16 image tokens, sliding window 4, tied head."""
    d = tmp_path_factory.mktemp("gemma3")
    hf, processor = make_hf_gemma3(d, layer_types=[S, F], num_layers=2, image_size=32, patch_size=4, mm_tokens=16)
    return d, hf, processor


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_with_and_without_the_cache(tmp_path, name):
    kw = CONFIGS[name]
    hf, _ = _make(tmp_path, **kw)
    loaded = load(str(tmp_path))
    ours, prompt = loaded.model, _prompt(loaded)
    assert ours.family == "gemma3" and ours.num_image_tokens == kw.get("mm_tokens", 4)
    assert ours.image_start == len(prompt.before)  # the template put it there
    ids = torch.tensor([prompt.ids])
    assert len(prompt.after) > kw["sliding_window"]
    size = kw.get("image_size", 28)
    pixels = torch.randn(1, 3, size, size)
    image = (ids == loaded.config.image_token_id).long()
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values=pixels, token_type_ids=image, use_cache=True)
        whole = (ours(ids, pixels) - out.logits).abs().max().item()
        embeds = ours.merge_embeddings(ids, ours.encode_image(pixels))
        n = embeds.shape[1]
        logits, past = ours.decode(embeds, torch.arange(n)[None], None)
        prefill = (logits - out.logits).abs().max().item()
        steps, cache, nxt = [], out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for s in range(5):  # past the sliding windows
            ref = hf(input_ids=nxt, cache=cache, use_cache=True)
            step, past = ours.decode(ours.embed_text(nxt), torch.tensor([[n + s]]), past)
            steps.append((step[:, -1] - ref.logits[:, -1]).abs().max().item())
            cache, nxt = ref.past_key_values, ref.logits[:, -1].argmax(-1, keepdim=True)
        # the bidirectional image block matters: without it the logits differ
        plain = hf(input_ids=ids, pixel_values=pixels).logits
    print(f"{name}: whole {whole:.2e} prefill {prefill:.2e} decode {max(steps):.2e}")
    assert whole <= 1e-4 and prefill <= 1e-4 and max(steps) <= 1e-4
    assert (plain - out.logits).abs().max().item() > 1e-3


def test_checkpoint_written_by_vlmc_loads_in_transformers(tmp_path):
    from transformers import Gemma3ForConditionalGeneration

    _make(tmp_path / "a", **CONFIGS["gqa4-untied-legacy"])
    loaded = load(str(tmp_path / "a"))
    save_checkpoint(loaded.model, tmp_path / "b", tmp_path / "a")
    again = load(str(tmp_path / "b")).model
    hf = Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "b").eval()
    ids = torch.tensor([_prompt(loaded).ids])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = loaded.model(ids, pixels)
        assert (again(ids, pixels) - ref).abs().max().item() == 0
        theirs = hf(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == loaded.config.image_token_id).long()).logits
    assert (theirs - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("width,height", [(50, 37), (20, 90), (32, 32), (128, 64)])
def test_preprocessing_and_prompt_equal_the_processor(gemma3, tmp_path, width, height):
    d, _, processor = gemma3
    rng = np.random.default_rng(width * height)
    path = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    loaded = load(str(d))
    m, prompt = loaded.model, _prompt(loaded)
    assert m.image_resize == {"rule": "square", "filter": "bilinear"}
    pixels = m.normalize(torch.from_numpy(load_image(path, m.image_size, m.image_resize)))
    with Image.open(path) as im:
        ref = processor(text=f"<start_of_turn>user\n<start_of_image>{QUESTION}<end_of_turn>\n<start_of_turn>model\n",
                        images=im.convert("RGB"), return_tensors="pt")
    assert (pixels - ref["pixel_values"]).abs().max().item() <= 1e-5
    assert prompt.ids == ref["input_ids"][0].tolist()
    assert prompt.ids[0] == 2 and "<bos>" not in loaded.template(build({})).prompt_template
    assert (ref["token_type_ids"][0] == 1).nonzero()[0, 0].item() == m.image_start


def test_resize_filter_comes_from_the_processor(tmp_path):
    make_hf_gemma3(tmp_path, num_layers=1, layer_types=[S], resample=3)
    assert load(str(tmp_path)).model.image_resize == {"rule": "square", "filter": "bicubic"}


@pytest.mark.parametrize("edit,match", [
    (lambda c, p: c["text_config"].update(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    (lambda c, p: c["text_config"].update(final_logit_softcapping=30.0), "final_logit_softcapping"),
    (lambda c, p: c["text_config"]["rope_parameters"][F].update(rope_type="yarn"), "rope_type 'yarn'"),
    (lambda c, p: c["vision_config"].update(vision_use_head=True), "vision_use_head"),
    (lambda c, p: c.update(mm_tokens_per_image=5), "mm_tokens_per_image"),
    (lambda c, p: c["text_config"].update(layer_types=["sliding_attention"]), "layer_types"),
    (lambda c, p: p.update(do_pan_and_scan=True), "do_pan_and_scan"),
    (lambda c, p: p.update(size={"height": 56, "width": 56}), "size"),
])
def test_unsupported_configs_are_refused_naming_the_field(gemma3, edit, match):
    d, _, _ = gemma3
    cfg, pre = json.loads((d / "config.json").read_text()), json.loads((d / "preprocessor_config.json").read_text())
    edit(cfg, pre)
    with pytest.raises(VlmcError, match=match):
        Gemma3Config.from_hf(cfg, pre)


@pytest.fixture(scope="module")
def gemma3_bundle(gemma3, tmp_path_factory):
    d, _, _ = gemma3
    return api.compile({"model": str(d), "targets": ["onnx", "executorch", "coreml"], "max_context": 48},
                       tmp_path_factory.mktemp("b") / "g")


@pytest.mark.slow  # three targets (about 4 minutes on two shared cores)
def test_export_verifies_on_every_target_and_names_the_family(gemma3_bundle, sample_image):
    m = gemma3_bundle.manifest
    assert m["model"]["family"] == "gemma3"
    assert m["prompt"]["image_resize"] == {"rule": "square", "filter": "bilinear"}
    assert "\n\n<start_of_image><image><end_of_image>\n\n" in m["prompt"]["template"]
    results = m["verification"]["results"]
    assert {r["target"] for r in results} == {"onnx", "executorch", "coreml"} and all(r["passed"] for r in results)
    tokens = {rt: api.run(gemma3_bundle.path, rt, sample_image, QUESTION, max_new_tokens=6)["tokens"]
              for rt in ("eager", "onnxruntime", "executorch")}
    assert tokens["eager"] == tokens["onnxruntime"] == tokens["executorch"], tokens


def test_divprune_at_the_projector_exports_verifies_and_runs_alike(gemma3, tmp_path, sample_image):
    """The default-run export check: ONNX with a visual-token pass, so the image's bidirectional block
    spans the 6 kept rows; eager and onnxruntime generate the same tokens."""
    d, _, _ = gemma3
    b = api.compile({"model": str(d), "targets": ["onnx"], "max_context": 48, "passes": [{"name": "divprune", "keep": 6}]},
                    tmp_path / "p")
    m = b.manifest
    assert m["model"]["family"] == "gemma3" and all(r["passed"] for r in m["verification"]["results"])
    assert m["prompt"]["num_image_tokens"] == 6 and m["prompt"]["num_image_tokens_unpruned"] == 16
    tokens = {rt: api.run(b.path, rt, sample_image, QUESTION, max_new_tokens=6)["tokens"] for rt in ("eager", "onnxruntime")}
    assert tokens["eager"] == tokens["onnxruntime"], tokens


@pytest.mark.slow
@pytest.mark.parametrize("method", ["minmax", "smoothquant"])
def test_w8a8_verifies(gemma3, calibration_jsonl, tmp_path, method):
    """smoothquant divides the Gemma norms' gains (kept as 1 + w in vlmc) by its factors."""
    d, _, _ = gemma3
    b = api.compile({"model": str(d), "targets": ["onnx"], "max_context": 48, "passes": [{"name": "w8a8", "method": method}],
                     "calibration": {"dataset": str(calibration_jsonl), "n": 8}}, tmp_path / "p")
    assert all(r["passed"] for r in b.manifest["verification"]["results"])


def test_pruned_image_keeps_its_bidirectional_block_to_its_own_rows(gemma3):
    """After a projector.out pass the image is shorter: the rows after it are text, causal again."""
    from vlmc import passes

    d, _, _ = gemma3
    m = load(str(d)).model
    m.set_image_start(5)
    passes.apply(m, [{"name": "divprune", "keep": 6}])
    mask = m.attention_mask(1, torch.arange(30), torch.arange(30))
    assert mask[5, 10] and not mask[5, 11] and not mask[11, 12] and mask[12, 11]


@pytest.mark.parametrize("spec,match", [({"name": "divprune", "keep": 6, "at": "vision.out"}, "merges the full"),
                                        ({"name": "tome", "r": 2}, "merges the full"),
                                        ({"name": "fastv", "keep": 6, "at": "decoder.layer[0]"}, "in-LLM token passes")])
def test_vision_side_and_in_llm_passes_are_refused_with_the_reason(gemma3, tmp_path, spec, match):
    d, _, _ = gemma3
    with pytest.raises(VlmcError, match=match):
        api.compile({"model": str(d), "targets": ["onnx"], "passes": [spec]}, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_template_with_the_question_before_the_image_is_refused(gemma3, tmp_path):
    """The image's bidirectional block sits where the template puts the image, so that place must be fixed."""
    with pytest.raises(VlmcError, match="prompt_template.*needs the image before the question"):
        api.compile({"model": str(gemma3[0]), "targets": ["onnx"], "prompt_template": "{prompt} <image>"}, tmp_path / "x")
    assert not (tmp_path / "x").exists()
