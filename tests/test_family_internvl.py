"""InternVL on the core: parity with transformers, its processor, export and passes."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import parity_errors
from tests.helpers_internvl import make_hf_internvl
from vlmc import api
from vlmc.errors import VlmcError
from vlmc.models_zoo import load
from vlmc.recipe import build
from vlmc.runtimes.image import load_image

QUESTION = "what color is the circle ?"
# GQA 2:1 / tied / last layer (Identity final norm) / LayerNorm; GQA 1:1 / untied / hidden_states[-2] of 3
# blocks / no q,k,v bias / final LayerNorm present but unused; qk-norm + RMSNorm / final LayerNorm applied /
# a 6x6 grid (24/4) -> 9 tokens
CONFIGS = {
    "gqa2-tied-last": {},
    "mha-untied-layer-2": {"kv_heads": 4, "tie": False, "feature_layer": -2, "vision_layers": 3, "attention_bias": False,
                           "mean_pooling": False},
    "qknorm-rms-grid6": {"qk_norm": True, "norm_type": "rms_norm", "mean_pooling": False, "image_size": 24},
}


@pytest.fixture(scope="module")
def internvl(tmp_path_factory):
    d = tmp_path_factory.mktemp("internvl")
    hf, processor = make_hf_internvl(d)
    return d, hf, processor


def _prompt_ids(d, question=QUESTION):
    loaded = load(str(d))
    recipe = loaded.template(build({}))
    c = loaded.config
    return loaded, loaded.tokenizer.prompt(recipe.prompt_template, question, loaded.model.num_image_tokens,
                                           c.image_token_id, loaded.bos_token_id)


def _parity(hf, loaded, prompt):
    ours = loaded.model
    pixels = torch.randn(1, 3, ours.image_size, ours.image_size)
    return parity_errors(hf, ours, torch.tensor([prompt.ids]), pixels, pixel_values=pixels)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_with_and_without_the_cache(tmp_path, name):
    kw = CONFIGS[name]
    hf, _ = make_hf_internvl(tmp_path, **kw)
    loaded, prompt = _prompt_ids(tmp_path)
    ours = loaded.model
    size = kw.get("image_size", 32)
    assert ours.family == "internvl" and ours.num_image_tokens == (size // 4 // 2) ** 2
    assert ours.config.text.tie_word_embeddings == kw.get("tie", True)
    diffs = _parity(hf, loaded, prompt)
    assert max(diffs) <= 1e-4, diffs


def test_runtime_layout_and_save_checkpoint_round_trip(internvl, tmp_path):
    """transformers' runtime names (`model.language_model.*`) load too, and vlmc's saved checkpoint loads in
    transformers with the same logits."""
    import safetensors.torch
    from transformers import InternVLForConditionalGeneration

    from vlmc.models_zoo import save_checkpoint

    d, hf, _ = internvl
    assert any(k.startswith("language_model.model.") for k in safetensors.torch.load_file(str(d / "model.safetensors")))
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    for name in ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        (runtime / name).write_bytes((d / name).read_bytes())
    safetensors.torch.save_file({k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"},
                                str(runtime / "model.safetensors"))
    loaded, prompt = _prompt_ids(runtime)
    assert max(_parity(hf, loaded, prompt)) <= 1e-4

    saved = tmp_path / "saved"
    save_checkpoint(loaded.model, saved, runtime)
    back = InternVLForConditionalGeneration.from_pretrained(saved).eval()
    ids, pixels = torch.tensor([prompt.ids]), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (back(input_ids=ids, pixel_values=pixels).logits - hf(input_ids=ids, pixel_values=pixels).logits).abs().max() <= 1e-6


@pytest.mark.parametrize("width,height", [(50, 37), (20, 90), (33, 33), (128, 64)])
def test_preprocessing_equals_the_processor(internvl, tmp_path, width, height):
    d, _, processor = internvl
    rng = np.random.default_rng(width * height)
    path = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    loaded, prompt = _prompt_ids(d)
    m = loaded.model
    assert m.image_resize == {"rule": "square", "filter": "bicubic"}
    pixels = m.normalize(torch.from_numpy(load_image(path, m.image_size, m.image_resize)))
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                                         add_generation_prompt=True)
    with Image.open(path) as im:
        ref = processor(text=text, images=[im.convert("RGB")], return_tensors="pt", crop_to_patches=False)
    assert ref["pixel_values"].shape == (1, 3, 32, 32)
    assert (pixels - ref["pixel_values"]).abs().max().item() <= 1e-5
    assert prompt.ids == ref["input_ids"][0].tolist()


def test_bos_comes_from_the_transformers5_tokenizer(internvl, tmp_path):
    d, _, _ = internvl
    assert "add_bos_token" not in (d / "tokenizer_config.json").read_text()
    loaded, prompt = _prompt_ids(d)
    assert loaded.tokenizer.add_bos and prompt.before[:2] == [1, 8]  # <s> <|im_start|>
    assert prompt.before[-1] == 5 and prompt.after[0] == 6  # <img> ... </img>
    make_hf_internvl(tmp_path, bos=False)
    _, prompt = _prompt_ids(tmp_path)
    assert prompt.before[0] == 8


@pytest.mark.parametrize("edit,match", [
    (lambda c: c["vision_config"].update(image_size=[32, 24]), "vision_config.image_size .* not square"),
    (lambda c: c.update(image_seq_length=20), "image_seq_length 20"),
    (lambda c: c["text_config"].update(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}), "RoPE scaling"),
    (lambda c: c.update(downsample_ratio=0.3), "downsample_ratio"),
    (lambda c: c.update(vision_feature_select_strategy="full"), "vision_feature_select_strategy"),
    (lambda c: c["text_config"].update(model_type="qwen3"), "text_config.model_type"),
])
def test_unsupported_configs_are_refused(internvl, tmp_path, edit, match):
    d, _, _ = internvl
    for f in d.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(VlmcError, match=match):
        load(str(tmp_path))


def test_an_interpolated_position_table_is_refused(internvl, tmp_path):
    d, _, _ = internvl
    for f in d.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    pre = json.loads((d / "preprocessor_config.json").read_text())
    pre["size"] = {"height": 48, "width": 48}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(VlmcError, match="preprocessor_config.json: size .* interpolated"):
        load(str(tmp_path))


@pytest.fixture(scope="module")
def internvl_bundle(internvl, tmp_path_factory):
    d, _, _ = internvl
    return api.compile({"model": str(d), "targets": ["onnx", "executorch", "coreml"], "max_context": 48},
                       tmp_path_factory.mktemp("b") / "ivl")


@pytest.mark.slow
def test_export_verifies_on_every_target_and_names_the_family(internvl_bundle):
    m = internvl_bundle.manifest
    assert m["model"]["family"] == "internvl"
    assert m["prompt"]["image_resize"] == {"rule": "square", "filter": "bicubic"}
    assert "<|im_start|>user\n<img><image></img>\n{prompt}<|im_end|>" in m["prompt"]["template"]
    results = m["verification"]["results"]
    assert {r["target"] for r in results} == {"onnx", "executorch", "coreml"} and all(r["passed"] for r in results)


@pytest.mark.slow
def test_runtimes_generate_the_same_tokens(internvl_bundle, sample_image):
    tokens = {rt: api.run(internvl_bundle.path, rt, sample_image, QUESTION, max_new_tokens=6)["tokens"]
              for rt in ("eager", "onnxruntime", "executorch")}
    assert tokens["eager"] == tokens["onnxruntime"] == tokens["executorch"], tokens


@pytest.mark.parametrize("passes", [pytest.param([{"name": "divprune", "keep": 6}], id="divprune"),
                                    pytest.param([{"name": "w8a8"}], id="w8a8", marks=pytest.mark.slow)])
def test_token_and_quantization_passes_verify(internvl, calibration_jsonl, tmp_path, passes):
    d, _, _ = internvl
    calibration = {"calibration": {"dataset": str(calibration_jsonl), "n": 8}} if passes[0]["name"] == "w8a8" else {}
    b = api.compile({"model": str(d), "targets": ["onnx"], "max_context": 48, "passes": passes, **calibration}, tmp_path / "p")
    assert all(r["passed"] for r in b.manifest["verification"]["results"])
    if passes[0]["name"] == "divprune":
        assert b.manifest["prompt"]["num_image_tokens"] == 6 and b.manifest["prompt"]["num_image_tokens_unpruned"] == 16


@pytest.mark.parametrize("spec", [{"name": "divprune", "keep": 6, "at": "vision.out"}, {"name": "tome", "r": 2},
                                  {"name": "visionzip", "dominant": 4, "contextual": 2}], ids=["divprune-vision", "tome", "visionzip"])
def test_vision_side_passes_are_refused_with_the_reason(internvl, tmp_path, spec):
    d, _, _ = internvl
    with pytest.raises(VlmcError, match="merges the full"):
        api.compile({"model": str(d), "targets": ["onnx"], "passes": [spec]}, tmp_path / "x")
    assert not (tmp_path / "x").exists()
