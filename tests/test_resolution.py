"""The resolution pass: each family encodes a smaller image the way its own transformers code does."""
import numpy as np
import pytest
import torch

from tests.helpers import make_hf_idefics3, make_hf_llava
from tests.helpers_gemma3 import make_hf_gemma3
from tests.helpers_internvl import make_hf_internvl
from tests.helpers_qwen2_5_vl import make_hf_qwen
from vlmc import api, passes
from vlmc.errors import VlmcError
from vlmc.models_zoo import load


def _resized(d, size):
    loaded = load(str(d))
    records, _ = passes.apply(loaded.model, [{"name": "resolution", "size": size}])
    return loaded.model, records[0]


def _features(model, pixels):
    """Our tokens at vision.out (after the family's feature selection and final norm)."""
    probe = passes._Record()
    model.insert("vision.out", probe)
    try:
        with torch.no_grad():
            model.encode_image(pixels)
    finally:
        model.pop("vision.out")
    return probe.seen[0]


def test_llava_equals_clip_interpolate_pos_encoding(tmp_path):
    hf = make_hf_llava(tmp_path)
    ours, record = _resized(tmp_path, 24)
    assert (record["tokens_in"], record["tokens_out"], ours.image_size, ours.num_image_tokens) == (16, 9, 24, 9)
    px = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        hidden = hf.model.vision_tower(px, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states[-2][:, 1:]
        ref = hf.model.multi_modal_projector(hidden)
        diff = (ours.encode_image(px) - ref).abs().max().item()
    assert diff <= 1e-5, diff


def test_internvl_equals_its_interpolated_embeddings(tmp_path):
    hf, _ = make_hf_internvl(tmp_path)
    ours, record = _resized(tmp_path, 24)
    assert (record["tokens_in"], record["tokens_out"]) == (16, 9)
    px = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        out = hf.model.get_image_features(pixel_values=px, vision_feature_layer=-1, vision_feature_select_strategy="default")
        ref = out if torch.is_tensor(out) else out.pooler_output
        diff = (ours.encode_image(px) - ref.reshape(1, 9, -1)).abs().max().item()
    assert diff <= 1e-4, diff


def test_gemma3_equals_siglip_interpolate_pos_encoding_and_pools_fewer_tokens(tmp_path):
    hf, _ = make_hf_gemma3(tmp_path, image_size=42, mm_tokens=9)  # 6x6 patches, 2x2 pooling
    ours, record = _resized(tmp_path, 28)
    assert (record["tokens_in"], record["tokens_out"]) == (9, 4)
    px = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        ref = hf.model.vision_tower(px, interpolate_pos_encoding=True).last_hidden_state
        diff = (_features(ours, px) - ref).abs().max().item()
    assert diff <= 1e-4, diff
    assert ours.image_rows() == 4


def test_idefics3_reads_bucketed_positions_like_a_smaller_image(tmp_path):
    hf, _ = make_hf_idefics3(tmp_path)  # 32px, 8x8 patches, pixel shuffle 2
    ours, record = _resized(tmp_path, 24)
    assert (record["tokens_in"], record["tokens_out"]) == (16, 9)
    px = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        ref = hf.model.vision_model(pixel_values=px).last_hidden_state
        diff = (_features(ours, px) - ref).abs().max().item()
    assert diff <= 1e-4, diff


def test_qwen_equals_the_model_loaded_at_that_size(tmp_path):
    make_hf_qwen(tmp_path)
    ours, record = _resized(tmp_path, 56)
    direct = load(str(tmp_path), 56).model
    assert ours.num_image_tokens == direct.num_image_tokens == record["tokens_out"] == 4
    px = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(ours.encode_image(px), direct.encode_image(px))


@pytest.mark.parametrize("specs,match", [
    ([{"name": "resolution", "size": 20}], r"20 is not a multiple of 8 \(the 8px patch\); e\.g\. 16"),
    ([{"name": "resolution", "size": 32}], "32 is not below the model's 32x32 input"),
    ([{"name": "resolution", "size": 16}, {"name": "resolution", "size": 24}], "given more than once"),
    ([{"name": "resolution", "size": 24, "at": "vision.out"}], "parameter 'at'"),
])
def test_bad_sizes_are_refused(tiny_ckpt, specs, match):
    with pytest.raises(VlmcError, match=match):
        passes.apply(load(str(tiny_ckpt)).model, specs)


def test_connector_merge_sets_the_unit(tmp_path):
    make_hf_internvl(tmp_path)
    with pytest.raises(VlmcError, match=r"not a multiple of 8 \(the 4px patch x the connector's 2x merge\)"):
        _resized(tmp_path, 28)


def test_export_with_token_pass_after_it_verifies_and_evaluates(tiny_ckpt, calibration_jsonl, tmp_path):
    """Listed after a token pass, resolution still runs first; the bundle reads images at its own side and
    eval compares it with the uncompressed model at the native side."""
    b = api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "max_context": 48,
                     "passes": [{"name": "divprune", "keep": 4}, {"name": "resolution", "size": 24}]}, tmp_path / "r")
    m = b.manifest
    assert all(r["passed"] for r in m["verification"]["results"])
    assert [p["name"] for p in m["passes"]] == ["resolution", "divprune"]
    assert m["passes"][1]["tokens_in"] == 9 and m["prompt"]["num_image_tokens"] == 4
    assert (m["prompt"]["image_size"], m["prompt"]["native_image_size"], m["prompt"]["num_image_tokens_unpruned"]) == (24, 32, 16)
    assert [s["name"] for s in m["recipe"]["passes"]] == ["resolution", "divprune"]
    assert set(m["metrics"]["steps_seconds"]) == {"load_and_passes", "lower_onnx", "verify"}
    vision = b.manifest["targets"]["onnx"]["programs"]["vision_encoder"]
    assert vision["inputs"][0]["shape"][-1] == 24
    result = api.evaluate(b.path, "onnxruntime", str(calibration_jsonl), "test", 4)
    assert result["n"] == 4 and 0 <= result["agreement"] <= 100 and np.isfinite(result["mean_kl"])
