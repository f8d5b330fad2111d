"""Information Horizon: the calibrated layer where visual information vanishes, then seeded random pruning."""
import pytest
import torch

from vlmc import api, passes
from vlmc.errors import VlmcError
from vlmc.models_zoo import load
from vlmc.passes.quant.calibration import CalibrationSource
from vlmc.passes.token import functional as T
from vlmc.passes.token.methods import visual_information
from vlmc.recipe import build


@pytest.fixture(scope="module")
def builtin_information():
    """The built-in model's visual information after decoder layers 0..2 (mean KL, 8 calibration questions)."""
    loaded = load("shapes-llava")
    source = CalibrationSource(loaded.template(build({"calibration": {"n": 8}})), loaded.tokenizer, loaded.model)
    return loaded, source, visual_information(loaded.model, source.prompts(loaded.model), [0, 1, 2])


def test_visual_information_fades_with_depth_and_auto_finds_the_horizon(builtin_information):
    loaded, source, kl = builtin_information
    assert kl[0] > kl[1] > kl[2] >= 0  # the built-in model reads its image rows early, little after layer 2
    horizon = next(layer for layer, v in enumerate(kl) if v <= 0.1 * kl[0])
    records, _ = passes.apply(loaded.model, [{"name": "horizon", "keep": 49}], source)
    r = records[0]
    assert r["at"] == f"decoder.layer[{horizon}]" and r["params"]["measured_kl"] == kl and r["in_llm"]
    assert r["tokens_in"] == 196 and r["tokens_out"] == 49 and not r["reads_text"]
    stage = loaded.model.decoder_stages()[horizon][0]
    expected = torch.sort(torch.topk(T.random_scores(1, 196, 0)[0], 49).indices).values
    assert torch.equal(stage.rows, expected) and stage.dropped == 147


def test_a_model_that_reads_its_image_to_the_end_is_refused_with_the_measurements(builtin_information):
    _, source, kl = builtin_information
    fresh = load("shapes-llava").model
    with pytest.raises(VlmcError, match=r"no layer's visual information falls to 0\.001 of layer 0's \(measured per layer: "):
        passes.apply(fresh, [{"name": "horizon", "keep": 49, "threshold": 0.001}], source)
    with pytest.raises(VlmcError, match="'at: auto' needs calibration questions"):
        passes.apply(load("shapes-llava").model, [{"name": "horizon", "keep": 49}])


@pytest.mark.slow  # the default run chains a pre-LLM pass with an in-LLM one on ONNX in test_in_llm (FastV)
def test_horizon_after_a_pre_llm_pass_exports_and_runs_alike(tiny_ckpt, tmp_path, sample_image):
    b = api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "max_context": 48,
                     "passes": [{"name": "divprune", "keep": 8}, {"name": "horizon", "at": "decoder.layer[0]", "keep": 3}]},
                    tmp_path / "h")
    m = b.manifest
    assert all(r["passed"] for r in m["verification"]["results"])
    assert m["decoder"]["cache_shifts"] == [0, 5] and m["passes"][1]["tokens_in"] == 8
    question = "what color is the circle ?"
    tokens = {rt: api.run(b.path, rt, sample_image, question, max_new_tokens=4)["tokens"] for rt in ("eager", "onnxruntime")}
    assert tokens["eager"] == tokens["onnxruntime"], tokens
