"""LFM2-VL on the core: parity with transformers (SigLIP2 NaFlex positions, pixel unshuffle, the hybrid
attention / short-convolution decoder and its convolution state), prompt layout, export and passes.
The three-target bundle and pass exports are slow."""
import json
import shutil

import numpy as np
import pytest
import torch

from tests.helpers import assert_cache_decode_matches, stock_runner_pieces
from tests.helpers_lfm2_vl import make_hf_lfm2vl, patchify
from vlmc import api
from vlmc.errors import VlmcError
from vlmc.models_zoo import load
from vlmc.recipe import build

QUESTION = "what color is the circle ?"
# (model kwargs, export sizes): conv / attention / conv with GQA 4:2, a 4x4 position table used as is
# (64 px) and upsampled (96, 128 px); MQA, untied, attention first, a 4-row kernel with biases and an
# unadjusted MLP width; an 8x8 table downsampled (antialiased) to 4x4 and 3x3 tables; attention only
CONFIGS = [({}, (64, 96, 128)),
           ({"kv_heads": 1, "tie": False, "layer_types": ("full_attention", "conv", "conv"), "conv_kernel": 4,
             "conv_bias": True, "auto_ff": False}, (96,)),
           ({"positions": 64, "projector_layernorm": False}, (64, 96)),
           ({"positions": 9, "heads": 2, "kv_heads": 2, "layer_types": ("full_attention", "full_attention")}, (64,))]
IDS = ["gqa-conv-attn-conv", "mqa-untied-kernel4", "table-downsampled", "attention-only"]


def _loaded(d, size=None, template=None):
    loaded = load(str(d), size)
    recipe = loaded.template(build({"prompt_template": template} if template else {}))
    c = loaded.config
    return loaded, loaded.tokenizer.prompt(recipe.prompt_template, QUESTION, loaded.model.num_image_tokens,
                                           c.image_token_id, loaded.bos_token_id)


def _hf_inputs(pixels: torch.Tensor, ids: torch.Tensor) -> dict:
    g = pixels.shape[-1] // 16
    return {"input_ids": ids, "pixel_values": patchify(pixels), "spatial_shapes": torch.tensor([[g, g]]),
            "pixel_attention_mask": torch.ones(1, g * g, dtype=torch.bool)}


@pytest.mark.parametrize("kwargs,sizes", CONFIGS, ids=IDS)
def test_logits_match_transformers_with_and_without_the_cache(tmp_path, kwargs, sizes):
    hf = make_hf_lfm2vl(tmp_path, **kwargs)
    for size in sizes:
        loaded, prompt = _loaded(tmp_path, size)
        ours = loaded.model
        kinds = kwargs.get("layer_types", ("conv", "full_attention", "conv"))
        assert ours.family == "lfm2_vl" and ours.num_image_tokens == (size // 32) ** 2
        assert set(ours.state_layers()) == {i for i, k in enumerate(kinds) if k == "conv"}
        ids = torch.tensor([prompt.ids])
        image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(size))
        pixels = ours.normalize(image)
        with torch.no_grad():
            out = hf(**_hf_inputs(pixels, ids), use_cache=True)
            full = ours(ids, pixels)
            assert (full - out.logits).abs().max().item() <= 1e-4, (size, (full - out.logits).abs().max().item())
        assert_cache_decode_matches(hf, ours, ids, pixels, out)


def test_the_prompt_is_the_processors_and_the_image_reads_its_config(tmp_path):
    make_hf_lfm2vl(tmp_path)
    loaded, prompt = _loaded(tmp_path, 96)
    tok = loaded.tokenizer
    # LFM2-VL's processor for one image that is not split: <|image_start|>, the image's tokens, <|image_end|>;
    # its chat template's user turn; BOS from tokenizer.json's post-processor (transformers 5)
    expected = ["<|startoftext|>", "<|im_start|>", "user", "\n", "<|image_start|>", *["<image>"] * 9, "<|image_end|>",
                "what", "color", "is", "the", "circle", "?", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]
    assert prompt.ids == [tok.token_id(p) for p in expected]
    m = loaded.model
    assert m.image_resize == {"rule": "square", "filter": "bilinear"}
    assert tuple(m.config.image_mean) == (0.5, 0.5, 0.5)
    assert load(str(tmp_path)).model.image_size == 256  # max_image_tokens 64 -> 8 x 8 groups of 2 x 2 patches
    # the vision encoder patchifies in the processor's order: the linear embedding of patchify's rows
    image = torch.randint(0, 256, (1, 3, 96, 96), dtype=torch.uint8)
    emb = m.vision_tower.embeddings
    with torch.no_grad():
        got = m.embed_image(m.normalize(image[0]))
        want = emb.patch_embedding(patchify(m.normalize(image[0]))) + emb.position_weights @ emb.position_embedding.weight
    assert torch.allclose(got, want, atol=1e-6)


def test_refusals_name_the_field(tmp_path):
    make_hf_lfm2vl(tmp_path / "d")
    d = tmp_path / "d"
    with pytest.raises(VlmcError, match="image_size.*multiple of 32"):
        load(str(d), 80)
    for edit, match in [(lambda c: c["text_config"].update(layer_types=["conv", "mamba", "conv"]), "layer_types"),
                        (lambda c: c["vision_config"].update(num_patches=15), "not a square position grid"),
                        (lambda c: c["text_config"].update(conv_L_cache=1), "conv_L_cache"),
                        (lambda c: c.update(projector_hidden_act="swish9"), "projector_hidden_act")]:
        shutil.copytree(d, tmp_path / "c", dirs_exist_ok=True)
        cfg = json.loads((d / "config.json").read_text())
        edit(cfg)
        (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(VlmcError, match=match):
            load(str(tmp_path / "c"), 64)


@pytest.fixture(scope="module")
def lfm2(tmp_path_factory):
    d = tmp_path_factory.mktemp("lfm2")
    make_hf_lfm2vl(d)
    return d


def test_in_llm_passes_are_refused_with_the_reason(lfm2, tmp_path):
    with pytest.raises(VlmcError, match="convolution layers mix neighbouring rows"):
        api.compile({"model": str(lfm2), "targets": ["onnx"], "image_size": 96,
                     "passes": [{"name": "fastv", "keep": 4, "at": "decoder.layer[0]"}]}, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_onnx_and_tvm_exports_verify_and_run_like_eager(lfm2, tmp_path, sample_image):
    b = api.compile({"model": str(lfm2), "targets": ["onnx", "tvm"], "max_context": 64, "image_size": 64}, tmp_path / "o")
    m = b.manifest
    assert m["model"]["family"] == "lfm2_vl" and m["prompt"]["num_image_tokens"] == 4
    # the convolution layers' state rides in their (k, v) cache pair: 2 rows x 32 wide, split in halves
    assert m["decoder"]["state_layers"] == [[0, 2, 32], [2, 2, 32]]
    assert {r["target"] for r in m["verification"]["results"]} == {"onnx", "tvm"}
    assert all(r["passed"] for r in m["verification"]["results"])
    tokens = {rt: api.run(b.path, rt, sample_image, QUESTION, max_new_tokens=6)["tokens"] for rt in ("eager", "onnxruntime", "tvm")}
    assert tokens["eager"] == tokens["onnxruntime"] == tokens["tvm"], tokens


@pytest.fixture(scope="module")
def lfm2_bundle(lfm2, tmp_path_factory):
    return api.compile({"model": str(lfm2), "targets": ["onnx", "executorch", "coreml"], "max_context": 64, "image_size": 64},
                       tmp_path_factory.mktemp("b") / "l")


@pytest.mark.slow
def test_export_verifies_on_every_target_and_names_the_family(lfm2_bundle):
    m = lfm2_bundle.manifest
    assert m["model"]["family"] == "lfm2_vl" and m["recipe"]["image_size"] == 64
    results = m["verification"]["results"]
    assert {r["target"] for r in results} == {"onnx", "executorch", "coreml"} and all(r["passed"] for r in results)
    assert m["targets"]["executorch"]["runner"].startswith("executorch MultimodalRunner")


@pytest.mark.slow
def test_stock_multimodal_runner_generates_vlmc_tokens(lfm2_bundle, sample_image):
    """ExecuTorch's own MultimodalRunner runs the bundle: text, image, text, as an app would feed it."""
    ours = api.run(lfm2_bundle.path, "executorch", sample_image, QUESTION, max_new_tokens=6)
    assert stock_runner_pieces(lfm2_bundle, sample_image, QUESTION, "<|startoftext|>") == ours["pieces"]


@pytest.mark.slow
def test_runtimes_generate_the_same_tokens(lfm2_bundle, sample_image):
    tokens = {rt: api.run(lfm2_bundle.path, rt, sample_image, QUESTION, max_new_tokens=6)["tokens"]
              for rt in ("eager", "onnxruntime", "executorch")}
    assert tokens["eager"] == tokens["onnxruntime"] == tokens["executorch"], tokens


@pytest.mark.slow
def test_executorch_starts_each_sequence_with_an_empty_convolution_state(lfm2_bundle):
    """The .pte keeps the convolution state in mutable buffers: a new sequence (slot 0) must not see the
    last one's rows, as ExecuTorch's stock runner reuses the loaded method."""
    from vlmc.runtimes.base import DecoderShape
    from vlmc.runtimes.executorch_runner import ExecuTorchSession

    shape = DecoderShape.from_manifest(lfm2_bundle.manifest)
    session = ExecuTorchSession(lfm2_bundle.path / "model.pte", shape)
    embeds = session.embed([1, 3, 8, 10, 12, 13, 14])
    first = session.prefill(embeds)
    session.step(session.embed([15]), 7)
    session.prefill(session.embed([1, 3, 16, 16, 16]))
    again = session.prefill(embeds)
    assert np.abs(first - again).max() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("passes", [[{"name": "divprune", "keep": 4, "at": "projector.out"}], [{"name": "w8a8"}],
                                    [{"name": "w4", "method": "gptq", "group_size": 16}]],
                         ids=["divprune", "w8a8", "w4-gptq"])
def test_token_and_quantization_passes_verify(lfm2, calibration_jsonl, tmp_path, passes):
    b = api.compile({"model": str(lfm2), "targets": ["onnx"], "max_context": 64, "image_size": 96, "passes": passes,
                     "calibration": {"dataset": str(calibration_jsonl), "n": 8}, "verify": {"quantized_rel_err": 0.5}},
                    tmp_path / "p")
    assert all(r["passed"] for r in b.manifest["verification"]["results"])
    if passes[0]["name"] == "divprune":
        assert b.manifest["prompt"]["num_image_tokens"] == 4 and b.manifest["prompt"]["num_image_tokens_unpruned"] == 9
