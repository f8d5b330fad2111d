"""Idefics3 / SmolVLM / SmolVLM2 on the core: parity with transformers, its processor, export and passes."""
import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import make_hf_idefics3, parity_errors
from vlmc import api
from vlmc.errors import VlmcError
from vlmc.models_zoo import load
from vlmc.recipe import build
from vlmc.runtimes.image import load_image

QUESTION = "what color is the circle ?"
# (model_type, tied head, kv heads, image size, patch, scale factor): GQA 2:1 and 1:1, 8x8 -> 16 tokens,
# 6x6 -> 4 tokens with a factor 3 shuffle, 10x10 -> 25 tokens
CONFIGS = [("smolvlm", False, 2, 32, 4, 2), ("idefics3", True, 4, 24, 4, 3), ("smolvlm", True, 1, 40, 4, 2)]


@pytest.fixture(scope="module")
def smolvlm(tmp_path_factory):
    d = tmp_path_factory.mktemp("smolvlm")
    hf, processor = make_hf_idefics3(d)
    return d, hf, processor


def _prompt_ids(d, question=QUESTION):
    loaded = load(str(d))
    recipe = loaded.template(build({}))
    c = loaded.config
    return loaded, loaded.tokenizer.prompt(recipe.prompt_template, question, loaded.model.num_image_tokens,
                                           c.image_token_id, loaded.bos_token_id)


@pytest.mark.parametrize("model_type,tie,kv,size,patch,scale", CONFIGS)
def test_logits_match_transformers_with_and_without_the_cache(tmp_path, model_type, tie, kv, size, patch, scale):
    hf, _ = make_hf_idefics3(tmp_path, model_type=model_type, tie=tie, kv_heads=kv, image_size=size,
                             patch_size=patch, scale_factor=scale)
    loaded, prompt = _prompt_ids(tmp_path)
    ours = loaded.model
    assert ours.family == model_type and ours.num_image_tokens == (size // patch // scale) ** 2
    pixels = torch.randn(1, 3, size, size)
    assert max(parity_errors(hf, ours, torch.tensor([prompt.ids]), pixels, pixel_values=pixels[:, None])) <= 1e-4


@pytest.mark.parametrize("width,height", [(50, 37), (20, 90), (33, 33), (128, 64)])
def test_preprocessing_equals_the_processor(smolvlm, tmp_path, width, height):
    d, _, processor = smolvlm
    rng = np.random.default_rng(width * height)
    path = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    loaded, prompt = _prompt_ids(d)
    m = loaded.model
    pixels = m.normalize(torch.from_numpy(load_image(path, m.image_size, m.image_resize)))
    with Image.open(path) as im:
        ref = processor(text=f"<|im_start|>User:<image>{QUESTION}<end_of_utterance>\nAssistant:", images=[im.convert("RGB")],
                        return_tensors="pt", do_image_splitting=False)
    assert ref["pixel_values"].shape[1] == 1
    assert (pixels - ref["pixel_values"][:, 0]).abs().max().item() <= 1e-5
    assert prompt.ids == ref["input_ids"][0].tolist()


def test_bos_comes_from_the_transformers5_tokenizer(smolvlm):
    d, _, _ = smolvlm
    assert "add_bos_token" not in (d / "tokenizer_config.json").read_text()
    loaded, prompt = _prompt_ids(d)
    assert loaded.tokenizer.add_bos and prompt.before[0] == 1


@pytest.fixture(scope="module")
def smolvlm_bundle(smolvlm, tmp_path_factory):
    d, _, _ = smolvlm
    return api.compile({"model": str(d), "targets": ["onnx", "coreml"], "max_context": 64}, tmp_path_factory.mktemp("b") / "s")


def test_export_verifies_on_every_target_and_names_the_family(smolvlm_bundle, tiles_bundle):
    """The global image alone on onnx and coreml; ExecuTorch (and coreml again) take the tiled bundle below,
    whose programs are the same per-image ones, called once per tile."""
    assert {r["target"] for r in tiles_bundle.manifest["verification"]["results"]} == {"onnx", "executorch", "coreml"}
    m = smolvlm_bundle.manifest
    assert m["model"]["family"] == "smolvlm"
    assert m["prompt"]["image_resize"]["rule"] == "longest_edge_then_square"
    assert "<fake_token_around_image><global-img><image><fake_token_around_image>" in m["prompt"]["template"]
    results = m["verification"]["results"]
    assert {r["target"] for r in results} == {"onnx", "coreml"} and all(r["passed"] for r in results)
    assert m["runner"].startswith("any")


def test_runtimes_generate_the_same_tokens(smolvlm_bundle, sample_image):
    tokens = {rt: api.run(smolvlm_bundle.path, rt, sample_image, QUESTION, max_new_tokens=6)["tokens"]
              for rt in ("eager", "onnxruntime")}
    assert tokens["eager"] == tokens["onnxruntime"], tokens


@pytest.mark.slow
@pytest.mark.parametrize("passes", [[{"name": "divprune", "keep": 6}], [{"name": "w8a8"}]], ids=["divprune", "w8a8"])
def test_token_and_quantization_passes_verify(smolvlm, calibration_jsonl, tmp_path, passes):
    d, _, _ = smolvlm
    b = api.compile({"model": str(d), "targets": ["onnx"], "max_context": 64, "passes": passes,
                     "calibration": {"dataset": str(calibration_jsonl), "n": 8}}, tmp_path / "p")
    assert all(r["passed"] for r in b.manifest["verification"]["results"])
    if passes[0]["name"] == "divprune":
        assert b.manifest["prompt"]["num_image_tokens"] == 6 and b.manifest["prompt"]["num_image_tokens_unpruned"] == 16


@pytest.mark.parametrize("spec,match", [({"name": "divprune", "keep": 6, "at": "vision.out"}, "pixel-shuffle|merges the full"),
                                        ({"name": "tome", "r": 2}, "merges the full"),
                                        ({"name": "visionzip", "dominant": 4, "contextual": 2}, "no CLS token")])
def test_vision_side_passes_are_refused_with_the_reason(smolvlm, tmp_path, spec, match):
    d, _, _ = smolvlm
    with pytest.raises(VlmcError, match=match):
        api.compile({"model": str(d), "targets": ["onnx"], "passes": [spec]}, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ----- a tile grid fixed at export (the processor's do_image_splitting=True)
TILE_PROMPT = f"<|im_start|>User:<image>{QUESTION}<end_of_utterance>\nAssistant:"


@pytest.fixture(scope="module")
def smolvlm_tiles(tmp_path_factory):
    d = tmp_path_factory.mktemp("smolvlm_tiles")
    hf, processor = make_hf_idefics3(d, splitting=True)
    return d, hf, processor


@pytest.mark.parametrize("width,height,grid", [(50, 37, (2, 2)), (20, 90, (2, 1)), (128, 64, (1, 2))])
def test_tiles_prompt_and_logits_equal_transformers(smolvlm_tiles, tmp_path, width, height, grid):
    """An image whose natural grid is the export's: the same tiles, global image, prompt ids and logits as the
    transformers processor and model (with the cache too)."""
    d, hf, processor = smolvlm_tiles
    path = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    loaded = load(str(d), tile_grid=grid)
    recipe = loaded.template(build({"tile_grid": list(grid)}))
    m = loaded.model
    assert m.image_tiles == grid[0] * grid[1] + 1 and recipe.prompt_template.count("<image>") == m.image_tiles
    prompt = loaded.tokenizer.prompt(recipe.prompt_template, QUESTION, m.num_image_tokens, loaded.config.image_token_id,
                                     loaded.bos_token_id)
    tiles = load_image(path, m.image_size, m.image_resize)
    assert tiles.shape == (m.image_tiles, 3, m.image_size, m.image_size)
    with Image.open(path) as im:
        ref = processor(text=TILE_PROMPT, images=[im.convert("RGB")], return_tensors="pt")
    pixels = m.normalize(torch.from_numpy(tiles))
    assert (pixels - ref["pixel_values"][0]).abs().max().item() <= 1e-5
    assert prompt.ids == ref["input_ids"][0].tolist() and prompt.runs == m.image_tiles
    errors = parity_errors(hf, m, torch.tensor([prompt.ids]), pixels, pixel_values=ref["pixel_values"],
                           pixel_attention_mask=ref["pixel_attention_mask"])
    assert max(errors) <= 1e-4, errors


@pytest.fixture(scope="module")
def tiles_bundle(smolvlm_tiles, tmp_path_factory):
    d, _, _ = smolvlm_tiles
    return api.compile({"model": str(d), "targets": ["onnx", "executorch", "coreml"], "max_context": 128, "tile_grid": [2, 2]},
                       tmp_path_factory.mktemp("b") / "tiles")


def test_tiles_export_verifies_and_runtimes_agree(tiles_bundle, sample_image):
    p = tiles_bundle.manifest["prompt"]
    assert p["image_tiles"] == 5 and p["template"].count("<image>") == 5 and p["num_image_tokens"] == 16
    assert p["image_resize"] == {"rule": "longest_edge_tiles", "filter": "lanczos", "longest_edge": 64, "grid": [2, 2]}
    assert tiles_bundle.manifest["recipe"]["tile_grid"] == [2, 2] and "5 tiles" in tiles_bundle.manifest["runner"]
    assert all(r["passed"] for r in tiles_bundle.manifest["verification"]["results"])
    runs = {rt: api.run(tiles_bundle.path, rt, sample_image, QUESTION, max_new_tokens=6) for rt in ("eager", "onnxruntime", "executorch")}
    assert runs["eager"]["tokens"] == runs["onnxruntime"]["tokens"] == runs["executorch"]["tokens"], runs
    assert runs["eager"]["prompt_tokens"] > 5 * 16  # five runs of 16 image rows, the separators and the question
    prof = api.profile(tiles_bundle.path, "onnxruntime", warmup=0, iterations=1, new_tokens=2)
    assert prof["programs"]["vision_encoder"]["calls"] == 5
    assert prof["programs"]["text_decoder.prefill"]["tokens"] == runs["eager"]["prompt_tokens"]


def test_stock_multimodal_runner_takes_the_tiles_between_text_pieces(tiles_bundle, sample_image):
    """ExecuTorch's MultimodalRunner runs a tiled bundle when the app feeds text, tile, text, tile, ..."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (the llama:: kernels)
    from executorch.extension.llm.runner import GenerationConfig, MultimodalRunner, make_image_input, make_text_input

    p = tiles_bundle.manifest["prompt"]
    pieces = p["template"].replace("{prompt}", QUESTION).split("<image>")
    pieces[0] = ("<s>" if p["add_bos"] else "") + pieces[0]
    tiles = load_image(sample_image, p["image_size"], p["image_resize"])
    inputs = [make_text_input(pieces[0])]
    for tile, text in zip(tiles, pieces[1:]):
        inputs += [make_image_input(torch.from_numpy(tile)), make_text_input(text)]
    runner = MultimodalRunner(str(tiles_bundle.path / "model.pte"), str(tiles_bundle.path / "tokenizer.json"))
    out = []
    runner.generate(inputs, GenerationConfig(max_new_tokens=6, temperature=0.0, echo=False), token_callback=out.append)
    ours = api.run(tiles_bundle.path, "executorch", sample_image, QUESTION, max_new_tokens=6)
    assert [x for x in out if x and x != "</s>"] == ours["pieces"]


def test_token_pass_keeps_its_count_in_every_tile(smolvlm_tiles, tmp_path, sample_image):
    d, _, _ = smolvlm_tiles
    b = api.compile({"model": str(d), "targets": ["onnx"], "max_context": 96, "tile_grid": [2, 1],
                     "passes": [{"name": "divprune", "keep": 6}]}, tmp_path / "p")
    p = b.manifest["prompt"]
    assert p["num_image_tokens"] == 6 and p["num_image_tokens_unpruned"] == 16 and p["image_tiles"] == 3
    assert all(r["passed"] for r in b.manifest["verification"]["results"])
    eager = api.run(b.path, "eager", sample_image, QUESTION, max_new_tokens=4)
    assert eager["tokens"] == api.run(b.path, "onnxruntime", sample_image, QUESTION, max_new_tokens=4)["tokens"]


@pytest.mark.parametrize("fields,match", [
    ({"tile_grid": [2, 2], "passes": [{"name": "fastv", "keep": 6, "at": "decoder.layer[0]"}]}, "tile runs"),
    ({"tile_grid": [2, 2], "passes": [{"name": "w8a8", "method": "masquant"}],
      "calibration": {"dataset": "shapes-vqa", "n": 8}}, "masquant tells the image's rows by one position range"),
    ({"tile_grid": [1, 1]}, "1x1 grid"),
    ({"tile_grid": [3, 1]}, r"no <row_3_col_1> token"),
    ({"tile_grid": [2, 9]}, "recipe field 'tile_grid'"),
    ({"prompt_template": "<image><image>{prompt}"}, "2 <image> placeholders"),
])
def test_tile_grid_refusals(smolvlm_tiles, tmp_path, fields, match):
    d, _, _ = smolvlm_tiles
    with pytest.raises(VlmcError, match=match):
        api.compile({"model": str(d), "targets": ["onnx"], "max_context": 128, **fields}, tmp_path / "x")
    assert not (tmp_path / "x").exists()
