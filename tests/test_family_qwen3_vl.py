"""Qwen3-VL on the core: parity with transformers (DeepStack, interleaved M-RoPE, the resampled position
table, q/k norms), its processor, export and passes. The three-target bundle and pass exports are slow."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import assert_cache_decode_matches, stock_runner_pieces
from tests.helpers_qwen3_vl import IMAGE_TOKEN, make_hf_qwen3
from vlmc import api
from vlmc.errors import VlmcError
from vlmc.models_zoo import load
from vlmc.recipe import build
from vlmc.runtimes.image import load_image

QUESTION = "what color is the circle ?"
# (model kwargs, export sizes): GQA 4:2 untied, DeepStack on blocks 0 and 1, a 4x4 position table used as is
# (64 px) and resampled (96, 160 px); MQA tied with the DeepStack blocks out of order; MHA with head_dim 16,
# no DeepStack and a 3x3 table; DeepStack into all three decoder layers
CONFIGS = [({}, (64, 96, 160)), ({"tie": True, "kv_heads": 1, "deepstack": (2, 0)}, (96,)),
           ({"heads": 2, "kv_heads": 2, "head_dim": 16, "mrope_section": (4, 2, 2), "deepstack": (), "positions": 9}, (64,)),
           ({"deepstack": (0, 1, 2), "layers": 3}, (128,))]
IDS = ["gqa-untied", "mqa-tied-unordered", "mha-no-deepstack", "deepstack-every-layer"]


def _loaded(d, size=None, template=None):
    loaded = load(str(d), size)
    recipe = loaded.template(build({"prompt_template": template} if template else {}))
    c = loaded.config
    return loaded, loaded.tokenizer.prompt(recipe.prompt_template, QUESTION, loaded.model.num_image_tokens,
                                           c.image_token_id, loaded.bos_token_id)


def _hf_inputs(processor, image: torch.Tensor, ids: torch.Tensor) -> dict:
    px = processor.image_processor(images=Image.fromarray(image.permute(1, 2, 0).numpy()), return_tensors="pt")
    return {"input_ids": ids, "pixel_values": px["pixel_values"], "image_grid_thw": px["image_grid_thw"],
            "mm_token_type_ids": (ids == IMAGE_TOKEN).long()}


@pytest.mark.parametrize("kwargs,sizes", CONFIGS, ids=IDS)
def test_logits_match_transformers_with_and_without_the_cache(tmp_path, kwargs, sizes):
    hf, processor = make_hf_qwen3(tmp_path, **kwargs)
    for size in sizes:
        loaded, prompt = _loaded(tmp_path, size)
        ours = loaded.model
        deep = len(kwargs.get("deepstack", (0, 1)))
        assert ours.family == "qwen3_vl" and ours.num_image_tokens == (size // 32) ** 2
        assert ours.deepstack_layers == deep and ours.embed_width == 32 * (1 + deep)
        ids = torch.tensor([prompt.ids])
        image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            out = hf(**_hf_inputs(processor, image, ids), use_cache=True)
            full = ours(ids, ours.normalize(image))
            assert (full - out.logits).abs().max().item() <= 1e-4, (size, (full - out.logits).abs().max().item())
        assert_cache_decode_matches(hf, ours, ids, ours.normalize(image), out)


def test_deepstack_features_are_transformers_and_text_rows_add_nothing(tmp_path):
    hf, processor = make_hf_qwen3(tmp_path, deepstack=(2, 0))
    loaded, prompt = _loaded(tmp_path, 96)
    m = loaded.model
    image = torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8)
    px = processor.image_processor(images=Image.fromarray(image.permute(1, 2, 0).numpy()), return_tensors="pt")
    with torch.no_grad():
        ref = hf.model.visual(px["pixel_values"], grid_thw=px["image_grid_thw"])
        rows = m.encode_image(m.normalize(image))[0]
        text = m.embed_text(torch.tensor([[7, 8]]))
    # [main | layer 0's | layer 1's], in the order transformers adds them (block 0's merger first)
    for j, expect in enumerate([ref.pooler_output, *ref.deepstack_features]):
        assert (rows[:, 32 * j:32 * (j + 1)] - expect).abs().max().item() <= 1e-5
    assert text.shape[-1] == 96 and torch.equal(text[..., 32:], torch.zeros(1, 2, 64))


def test_mrope_positions_are_transformers_rope_index(tmp_path):
    hf, _ = make_hf_qwen3(tmp_path)
    loaded, prompt = _loaded(tmp_path, 128)
    ids = torch.tensor([prompt.ids])
    ref, delta = hf.model.get_rope_index(ids, (ids == IMAGE_TOKEN).long(), torch.tensor([[1, 8, 8]]))
    t, h, w = loaded.model.mrope_positions(torch.arange(ids.shape[1])[None])
    assert torch.equal(torch.stack([t, h, w])[:, 0], ref[:, 0])
    n = ids.shape[1]
    assert all(torch.equal(p, torch.tensor([[n + 2 + int(delta)]])) for p in loaded.model.mrope_positions(torch.tensor([[n + 2]])))


def test_flat_checkpoint_layout_loads(tmp_path):
    """Checkpoints written with the flat names (`visual.*`, `model.*`) load like transformers 5's nested ones."""
    import safetensors.torch

    make_hf_qwen3(tmp_path)
    loaded, prompt = _loaded(tmp_path, 64)
    f = tmp_path / "model.safetensors"
    tensors = safetensors.torch.load_file(str(f))
    assert any(k.startswith("model.language_model.") for k in tensors)
    flat = {k.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1): v for k, v in tensors.items()}
    safetensors.torch.save_file(flat, str(f))
    again, _ = _loaded(tmp_path, 64)
    ids, image = torch.tensor([prompt.ids]), torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(again.model(ids, again.model.normalize(image)), loaded.model(ids, loaded.model.normalize(image)))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3")
    hf, processor = make_hf_qwen3(d)
    return d, hf, processor


def _patchify(x: torch.Tensor, patch=16, merge=2, temporal=2) -> torch.Tensor:
    """A normalised [1,3,H,W] image in the processor's pixel_values layout [N, 3*T*p*p]."""
    c, gh, gw = 3, x.shape[2] // patch, x.shape[3] // patch
    p = x[0].reshape(c, gh // merge, merge, patch, gw // merge, merge, patch).permute(1, 4, 2, 5, 0, 3, 6)
    return p[:, :, :, :, :, None].expand(-1, -1, -1, -1, -1, temporal, -1, -1).reshape(gh * gw, -1)


@pytest.mark.parametrize("width,height", [(50, 37), (20, 90), (33, 33), (128, 64)])
def test_preprocessing_equals_the_processor(qwen3, tmp_path, width, height):
    d, _, processor = qwen3
    rng = np.random.default_rng(width * height)
    path = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    loaded, prompt = _loaded(d, 96)
    m = loaded.model
    assert m.image_resize == {"rule": "square", "filter": "bicubic"}
    pixels = m.normalize(torch.from_numpy(load_image(path, m.image_size, m.image_resize)))
    text = f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    with Image.open(path) as im:  # pre-resized to the export size: smart_resize keeps it
        ref = processor(text=text, images=[im.convert("RGB").resize((96, 96), Image.BICUBIC)], return_tensors="pt")
    assert ref["image_grid_thw"].tolist() == [[1, 6, 6]]
    assert (_patchify(pixels) - ref["pixel_values"]).abs().max().item() <= 1e-5
    assert prompt.ids == ref["input_ids"][0].tolist()


def test_default_image_size_and_refusals(qwen3, tmp_path):
    d, _, _ = qwen3
    assert load(str(d)).model.image_size == 256  # the processor's max_pixels (32*32*64) caps the 448 default
    with pytest.raises(VlmcError, match="image_size.*multiple of 32"):
        load(str(d), 100)
    for edit, match in [(lambda c: c["vision_config"].update(deepstack_visual_indexes=[0, 5]), "deepstack_visual_indexes"),
                        (lambda c: c["vision_config"].update(deepstack_visual_indexes=[0, 1, 2, 0]), "distinct"),
                        (lambda c: c["vision_config"].update(num_position_embeddings=15), "not a square grid"),
                        (lambda c: c["vision_config"].update(out_hidden_size=48), "out_hidden_size 48"),
                        (lambda c: c["text_config"]["rope_parameters"].update(mrope_section=[1, 1, 1]), "mrope_section")]:
        shutil.copytree(d, tmp_path / "c", dirs_exist_ok=True)
        cfg = json.loads((d / "config.json").read_text())
        edit(cfg)
        (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(VlmcError, match=match):
            load(str(tmp_path / "c"), 64)
    with pytest.raises(VlmcError, match="prompt_template.*needs the image before the question"):
        _loaded(d, 64, template="{prompt} <image>")


def test_onnx_and_tvm_exports_verify_and_run_like_eager(qwen3, tmp_path, sample_image):
    d, _, _ = qwen3
    b = api.compile({"model": str(d), "targets": ["onnx", "tvm"], "max_context": 64, "image_size": 64}, tmp_path / "o")
    m = b.manifest
    assert m["model"]["family"] == "qwen3_vl" and m["prompt"]["num_image_tokens"] == 4
    assert m["decoder"]["embed_width"] == 3 * m["decoder"]["hidden_size"]  # main | layer 0's | layer 1's
    assert {r["target"] for r in m["verification"]["results"]} == {"onnx", "tvm"}
    assert all(r["passed"] for r in m["verification"]["results"])
    tokens = {rt: api.run(b.path, rt, sample_image, QUESTION, max_new_tokens=6)["tokens"] for rt in ("eager", "onnxruntime", "tvm")}
    assert tokens["eager"] == tokens["onnxruntime"] == tokens["tvm"], tokens


@pytest.fixture(scope="module")
def qwen3_bundle(qwen3, tmp_path_factory):
    d, _, _ = qwen3
    return api.compile({"model": str(d), "targets": ["onnx", "executorch", "coreml"], "max_context": 64, "image_size": 64},
                       tmp_path_factory.mktemp("b") / "q")


@pytest.mark.slow
def test_export_verifies_on_every_target_and_names_the_family(qwen3_bundle):
    m = qwen3_bundle.manifest
    assert m["model"]["family"] == "qwen3_vl" and m["recipe"]["image_size"] == 64
    results = m["verification"]["results"]
    assert {r["target"] for r in results} == {"onnx", "executorch", "coreml"} and all(r["passed"] for r in results)
    assert m["targets"]["executorch"]["runner"].startswith("executorch MultimodalRunner")


@pytest.mark.slow
def test_stock_multimodal_runner_generates_vlmc_tokens(qwen3_bundle, sample_image):
    """ExecuTorch's own MultimodalRunner runs the bundle: text, image, text, as an app would feed it."""
    ours = api.run(qwen3_bundle.path, "executorch", sample_image, QUESTION, max_new_tokens=6)
    assert stock_runner_pieces(qwen3_bundle, sample_image, QUESTION, "") == ours["pieces"]


@pytest.mark.slow
def test_runtimes_generate_the_same_tokens(qwen3_bundle, sample_image):
    tokens = {rt: api.run(qwen3_bundle.path, rt, sample_image, QUESTION, max_new_tokens=6)["tokens"]
              for rt in ("eager", "onnxruntime", "executorch")}
    assert tokens["eager"] == tokens["onnxruntime"] == tokens["executorch"], tokens


@pytest.mark.slow
@pytest.mark.parametrize("passes", [[{"name": "divprune", "keep": 4, "at": "projector.out"}], [{"name": "w8a8"}],
                                    [{"name": "fastv", "keep": 4, "at": "decoder.layer[0]"}]],
                         ids=["divprune", "w8a8", "fastv-inside-deepstack"])
def test_token_and_quantization_passes_verify(qwen3, calibration_jsonl, tmp_path, passes):
    d, _, _ = qwen3
    b = api.compile({"model": str(d), "targets": ["onnx"], "max_context": 64, "image_size": 96, "passes": passes,
                     "calibration": {"dataset": str(calibration_jsonl), "n": 8}}, tmp_path / "p")
    assert all(r["passed"] for r in b.manifest["verification"]["results"])
    if passes[0]["name"] == "divprune":
        assert b.manifest["prompt"]["num_image_tokens"] == 4 and b.manifest["prompt"]["num_image_tokens_unpruned"] == 9


def test_an_in_llm_stage_inside_the_deepstack_layers_carries_their_slices(qwen3):
    """After decoder layer 0 (layer 1 still adds a DeepStack slice): keeping every image row changes
    nothing; dropping rows leaves the later slices on the kept rows (the prompt shrinks, logits stay finite)."""
    from vlmc.passes.token.methods import ConstantRowsStage

    d, _, _ = qwen3
    loaded, prompt = _loaded(d, 96)
    m = loaded.model
    ids, image = torch.tensor([prompt.ids]), torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8)
    with torch.no_grad():
        base = m(ids, m.normalize(image))
        m.insert("decoder.layer[0]", ConstantRowsStage(torch.arange(9), 0))
        same = m(ids, m.normalize(image))
        m.pop("decoder.layer[0]")
        m.insert("decoder.layer[0]", ConstantRowsStage(torch.tensor([0, 4, 8]), 6))
        dropped = m(ids, m.normalize(image))
        m.pop("decoder.layer[0]")
    assert (same - base).abs().max().item() <= 1e-5
    assert dropped.shape[1] == base.shape[1] - 6 and torch.isfinite(dropped).all()
