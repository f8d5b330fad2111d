"""Qwen2.5-VL / Qwen2-VL on the core: parity with transformers (M-RoPE, window attention), its processor,
export and passes. Default run ~1.5 min; the three-target bundle and the pass exports are marked slow."""
import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import assert_cache_decode_matches, stock_runner_pieces
from tests.helpers_qwen2_5_vl import IMAGE_TOKEN, make_hf_qwen
from vlmc import api
from vlmc.errors import VlmcError
from vlmc.models_zoo import load
from vlmc.recipe import build
from vlmc.runtimes.image import load_image

QUESTION = "what color is the circle ?"
# (model kwargs, export sizes): GQA 4:2 untied with 3 blocks (window, full, window) at a 3x3 merged grid
# (2x2 windows clipped at the edges) and 4x4; MQA 4:1 tied with the full block first at 5x5; Qwen2-VL
# (full attention, LayerNorms) at 2x2 and 3x3; MHA with head_dim 16 at 4x4
CONFIGS = [({}, (84, 112)), ({"tie": True, "kv_heads": 1, "depth": 2, "fullatt": (0,)}, (140,)),
           ({"heads": 2, "kv_heads": 2, "mrope_section": (2, 3, 3)}, (112,)), ({"model_type": "qwen2_vl"}, (56, 84))]
IDS = ["gqa-untied", "mqa-tied", "mha", "qwen2_vl"]


def _loaded(d, size=None, template=None):
    loaded = load(str(d), size)
    recipe = loaded.template(build({"prompt_template": template} if template else {}))
    c = loaded.config
    return loaded, loaded.tokenizer.prompt(recipe.prompt_template, QUESTION, loaded.model.num_image_tokens,
                                           c.image_token_id, loaded.bos_token_id)


def _hf_inputs(processor, image: torch.Tensor, ids: torch.Tensor) -> dict:
    """What the processor's image half gives for a uint8 [3,S,S] image, with the prompt's ids."""
    px = processor.image_processor(images=Image.fromarray(image.permute(1, 2, 0).numpy()), return_tensors="pt")
    return {"input_ids": ids, "pixel_values": px["pixel_values"], "image_grid_thw": px["image_grid_thw"],
            "mm_token_type_ids": (ids == IMAGE_TOKEN).long()}


@pytest.mark.parametrize("kwargs,sizes", CONFIGS, ids=IDS)
def test_logits_match_transformers_with_and_without_the_cache(tmp_path, kwargs, sizes):
    hf, processor = make_hf_qwen(tmp_path, **kwargs)
    for size in sizes:
        loaded, prompt = _loaded(tmp_path, size)
        ours = loaded.model
        assert ours.family == kwargs.get("model_type", "qwen2_5_vl") and ours.num_image_tokens == (size // 28) ** 2
        assert ours.image_start == len(prompt.before)
        if ours.family == "qwen2_5_vl":  # the window blocks really attend within windows
            assert not ours.visual.window_mask.all()
        ids = torch.tensor([prompt.ids])
        image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            out = hf(**_hf_inputs(processor, image, ids), use_cache=True)
            full = ours(ids, ours.normalize(image))
            assert (full - out.logits).abs().max().item() <= 1e-4, (size, (full - out.logits).abs().max().item())
        assert_cache_decode_matches(hf, ours, ids, ours.normalize(image), out)


def test_mrope_positions_are_transformers_rope_index(tmp_path):
    hf, _ = make_hf_qwen(tmp_path)
    loaded, prompt = _loaded(tmp_path, 112)
    ids = torch.tensor([prompt.ids])
    ref, delta = hf.model.get_rope_index(ids, (ids == IMAGE_TOKEN).long(), torch.tensor([[1, 8, 8]]))
    t, h, w = loaded.model.mrope_positions(torch.arange(ids.shape[1])[None])
    assert torch.equal(torch.stack([t, h, w])[:, 0], ref[:, 0])
    # decode steps continue at row + delta for all three
    n = ids.shape[1]
    assert all(torch.equal(p, torch.tensor([[n + 2 + int(delta)]])) for p in loaded.model.mrope_positions(torch.tensor([[n + 2]])))


def test_transformers5_module_layout_loads(tmp_path):
    """Checkpoints written with the in-memory names (`model.visual.*`, `model.language_model.*`) load too."""
    import safetensors.torch

    make_hf_qwen(tmp_path)
    loaded, prompt = _loaded(tmp_path, 56)
    f = tmp_path / "model.safetensors"
    tensors = safetensors.torch.load_file(str(f))
    renamed = {("model." + k if k.startswith("visual.") else k.replace("model.", "model.language_model.", 1)
                if k.startswith("model.") else k): v for k, v in tensors.items()}
    assert any(k.startswith("model.language_model.") for k in renamed)
    safetensors.torch.save_file(renamed, str(f))
    again, _ = _loaded(tmp_path, 56)
    ids, image = torch.tensor([prompt.ids]), torch.randint(0, 256, (3, 56, 56), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(again.model(ids, again.model.normalize(image)), loaded.model(ids, loaded.model.normalize(image)))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen")
    hf, processor = make_hf_qwen(d)
    return d, hf, processor


def _patchify(x: torch.Tensor, patch=14, merge=2, temporal=2) -> torch.Tensor:
    """A normalised [1,3,H,W] image in the processor's pixel_values layout [N, 3*T*p*p]."""
    c, gh, gw = 3, x.shape[2] // patch, x.shape[3] // patch
    p = x[0].reshape(c, gh // merge, merge, patch, gw // merge, merge, patch).permute(1, 4, 2, 5, 0, 3, 6)
    return p[:, :, :, :, :, None].expand(-1, -1, -1, -1, -1, temporal, -1, -1).reshape(gh * gw, -1)


@pytest.mark.parametrize("width,height", [(50, 37), (20, 90), (33, 33), (128, 64)])
def test_preprocessing_equals_the_processor(qwen, tmp_path, width, height):
    d, _, processor = qwen
    rng = np.random.default_rng(width * height)
    path = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    loaded, prompt = _loaded(d, 84)
    m = loaded.model
    assert m.image_resize == {"rule": "square", "filter": "bicubic"}
    pixels = m.normalize(torch.from_numpy(load_image(path, m.image_size, m.image_resize)))
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"<|vision_start|><|image_pad|><|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    with Image.open(path) as im:  # pre-resized to the export size: smart_resize keeps it
        ref = processor(text=text, images=[im.convert("RGB").resize((84, 84), Image.BICUBIC)], return_tensors="pt")
    assert ref["image_grid_thw"].tolist() == [[1, 6, 6]]
    assert (_patchify(pixels) - ref["pixel_values"]).abs().max().item() <= 1e-5
    assert prompt.ids == ref["input_ids"][0].tolist()
    assert not loaded.tokenizer.add_bos


def test_default_image_size_and_refusals(qwen, tmp_path):
    d, _, _ = qwen
    assert load(str(d)).model.image_size == 224  # the processor's max_pixels (28*28*64) caps the 448 default
    with pytest.raises(VlmcError, match="image_size.*multiple of 28"):
        load(str(d), 100)
    import json
    import shutil

    for edit, match in [(lambda c: c["text_config"]["rope_parameters"].update(rope_type="yarn"), "rope_type 'yarn'"),
                        (lambda c: c["text_config"].update(use_sliding_window=True), "use_sliding_window"),
                        (lambda c: c["text_config"]["rope_parameters"].update(mrope_section=[1, 1, 1]), "mrope_section"),
                        (lambda c: c["vision_config"].update(patch_size=[14, 14]), "patch_size")]:
        shutil.copytree(d, tmp_path / "c", dirs_exist_ok=True)
        cfg = json.loads((d / "config.json").read_text())
        edit(cfg)
        (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(VlmcError, match=match):
            load(str(tmp_path / "c"), 56)
    # M-RoPE needs the image's row fixed by the template
    with pytest.raises(VlmcError, match="prompt_template.*needs the image before the question"):
        _loaded(d, 56, template="{prompt} <image>")


def test_onnx_export_verifies_and_runs_like_eager(qwen, tmp_path, sample_image):
    d, _, _ = qwen
    b = api.compile({"model": str(d), "targets": ["onnx"], "max_context": 64, "image_size": 56}, tmp_path / "o")
    m = b.manifest
    assert m["model"]["family"] == "qwen2_5_vl" and m["prompt"]["num_image_tokens"] == 4
    assert "<|vision_start|><image><|vision_end|>" in m["prompt"]["template"]
    assert m["prompt"]["image_resize"]["rule"] == "square"
    assert all(r["passed"] for r in m["verification"]["results"])
    tokens = {rt: api.run(b.path, rt, sample_image, QUESTION, max_new_tokens=6)["tokens"] for rt in ("eager", "onnxruntime")}
    assert tokens["eager"] == tokens["onnxruntime"], tokens


@pytest.fixture(scope="module")
def qwen_bundle(qwen, tmp_path_factory):
    d, _, _ = qwen
    return api.compile({"model": str(d), "targets": ["onnx", "executorch", "coreml"], "max_context": 64, "image_size": 56},
                       tmp_path_factory.mktemp("b") / "q")


@pytest.mark.slow
def test_export_verifies_on_every_target_and_names_the_family(qwen_bundle):
    m = qwen_bundle.manifest
    assert m["model"]["family"] == "qwen2_5_vl" and m["recipe"]["image_size"] == 56
    results = m["verification"]["results"]
    assert {r["target"] for r in results} == {"onnx", "executorch", "coreml"} and all(r["passed"] for r in results)


@pytest.mark.slow
def test_stock_multimodal_runner_generates_vlmc_tokens(qwen_bundle, sample_image):
    """ExecuTorch's own MultimodalRunner runs the bundle (M-RoPE from the rows the template fixes)."""
    ours = api.run(qwen_bundle.path, "executorch", sample_image, QUESTION, max_new_tokens=6)
    assert stock_runner_pieces(qwen_bundle, sample_image, QUESTION) == ours["pieces"]


@pytest.mark.slow
def test_runtimes_generate_the_same_tokens(qwen_bundle, sample_image):
    tokens = {rt: api.run(qwen_bundle.path, rt, sample_image, QUESTION, max_new_tokens=6)["tokens"]
              for rt in ("eager", "onnxruntime", "executorch")}
    assert tokens["eager"] == tokens["onnxruntime"] == tokens["executorch"], tokens


@pytest.mark.slow
@pytest.mark.parametrize("passes", [[{"name": "divprune", "keep": 4, "at": "projector.out"}], [{"name": "w8a8"}]],
                         ids=["divprune", "w8a8"])
def test_token_and_quantization_passes_verify(qwen, calibration_jsonl, tmp_path, passes):
    d, _, _ = qwen
    b = api.compile({"model": str(d), "targets": ["onnx"], "max_context": 64, "image_size": 84, "passes": passes,
                     "calibration": {"dataset": str(calibration_jsonl), "n": 8}}, tmp_path / "p")
    assert all(r["passed"] for r in b.manifest["verification"]["results"])
    if passes[0]["name"] == "divprune":
        assert b.manifest["prompt"]["num_image_tokens"] == 4 and b.manifest["prompt"]["num_image_tokens_unpruned"] == 9


@pytest.mark.parametrize("spec,match", [({"name": "divprune", "keep": 6, "at": "vision.out"}, "merges the full"),
                                        ({"name": "tome", "r": 2}, "merges the full")])
def test_vision_side_passes_are_refused_with_the_reason(qwen, tmp_path, spec, match):
    d, _, _ = qwen
    with pytest.raises(VlmcError, match=match):
        api.compile({"model": str(d), "targets": ["onnx"], "image_size": 56, "passes": [spec]}, tmp_path / "x")
    assert not (tmp_path / "x").exists()
