"""The full pass x target matrix of every family (slow): each token pass and quantization scheme either
exports and verifies on onnx, executorch and coreml, or is refused before any export work with the reason;
every quantization scheme on tvm.

    python -m pytest -q -m slow tests/test_family_matrix.py              (-k onnx: one target)
"""
import pytest

from tests.helpers import make_hf_idefics3
from tests.helpers_gemma3 import make_hf_gemma3
from tests.helpers_internvl import make_hf_internvl
from tests.helpers_lfm2_vl import make_hf_lfm2vl
from tests.helpers_qwen2_5_vl import make_hf_qwen
from tests.helpers_qwen3_vl import make_hf_qwen3
from vlmc import api
from vlmc.errors import VlmcError

pytestmark = pytest.mark.slow

# family -> (builder, extra recipe fields, image tokens)
FAMILIES = {
    "smolvlm": (lambda d: make_hf_idefics3(d), {}, 16),
    "smolvlm-tiles": (lambda d: make_hf_idefics3(d, splitting=True), {"tile_grid": [1, 2], "max_context": 96}, 16),
    "internvl": (lambda d: make_hf_internvl(d), {}, 16),
    "gemma3": (lambda d: make_hf_gemma3(d, layer_types=["sliding_attention", "full_attention"], num_layers=2, image_size=32,
                                        patch_size=4, mm_tokens=16), {}, 16),
    "qwen2_5_vl": (lambda d: make_hf_qwen(d), {"image_size": 112}, 16),
    "qwen3_vl": (lambda d: make_hf_qwen3(d), {"image_size": 128}, 16),
    "lfm2_vl": (lambda d: make_hf_lfm2vl(d), {"image_size": 128}, 16),
}
VISION_SIDE = {"tome", "visionzip", "zooprune", "duet"}  # need the patch grid before a merging connector
IN_LLM = {"fastv", "v2drop", "transprune", "hawk", "duet", "alvts", "hilo", "flashcache", "attentionpack"}


def specs(tokens: int) -> list[dict]:
    keep = tokens // 3
    return [{"name": "random", "keep": keep}, {"name": "pooling", "keep": 4}, {"name": "divprune", "keep": keep},
            {"name": "core", "keep": keep},
            {"name": "tfps", "keep": keep}, {"name": "score", "keep": keep}, {"name": "coin", "keep": keep},
            {"name": "docprune", "keep": keep}, {"name": "apet", "keep": keep}, {"name": "vlmpruner", "keep": keep},
            {"name": "zooprune", "keep": keep, "at": "vision.out"}, {"name": "tome", "r": 2},
            {"name": "visionzip", "dominant": keep, "contextual": 2},
            *({"name": m, "keep": keep, "at": "decoder.layer[0]"} for m in ("fastv", "v2drop", "transprune", "hawk")),
            {"name": "duet", "keep": keep, "dominant": 2 * keep, "contextual": 2, "at": "decoder.layer[0]"},
            {"name": "divprune", "keep": keep, "static": True},
            {"name": "alvts", "keep": keep, "at": "decoder.layer[0]", "rank": 4},
            {"name": "embedlens", "keep": keep}, {"name": "embedlens", "keep": keep, "inject": 1},
            {"name": "hilo", "keep": keep, "candidates": 2, "layer": 0},
            {"name": "w8a8"}, {"name": "w8"}, {"name": "w4", "group_size": 16}, {"name": "w4", "group_size": 32},
            {"name": "w4", "method": "gptq", "group_size": 16}, {"name": "w8a8", "method": "smoothquant"},
            {"name": "w4", "method": "qig", "group_size": 32, "bits": 6, "steps": 2}, {"name": "kv8"}, {"name": "flashcache", "keep": keep},
            {"name": "attentionpack", "keep": keep, "rank": 4, "light_rank": 2}]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    build, extra, tokens = FAMILIES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    build(d)
    return request.param, d, extra, tokens


@pytest.mark.parametrize("target", ["onnx", "executorch", "coreml"])
@pytest.mark.parametrize("index", range(len(specs(16))), ids=lambda i: "-".join(str(v) for v in specs(16)[i].values()))
def test_every_pass_exports_and_verifies_on_every_target_or_is_refused(family, index, target, calibration_jsonl, tmp_path):
    name, d, extra, tokens = family
    spec = specs(tokens)[index]
    # gemma3: its sliding windows and image block are positions; tiles: the image is several runs of rows
    # lfm2_vl: its convolution layers mix neighbouring rows and carry a state over them
    in_llm = spec["name"] in IN_LLM or spec.get("inject", 0) > 0
    refused = spec["name"] in VISION_SIDE or (name in ("gemma3", "smolvlm-tiles", "lfm2_vl") and in_llm)
    # XNNPACK's 4-bit kernels take groups of a multiple of 32
    refused |= target == "executorch" and spec.get("group_size", 32) % 32 != 0
    refused |= spec["name"] == "kv8" and name == "lfm2_vl"  # its cache slots hold the convolution state too
    # export conformance, not accuracy: a tiny random model moves further under quantization than a trained one
    recipe = {"model": str(d), "targets": [target], "max_context": 64, "passes": [spec], "verify": {"quantized_rel_err": 0.5},
              "calibration": {"dataset": str(calibration_jsonl), "n": 8}, **extra}
    if refused:
        with pytest.raises(VlmcError):
            api.compile(recipe, tmp_path / "b")
        assert not (tmp_path / "b").exists()
        return
    if spec["name"] == "w4" and target == "coreml":  # Core ML's int4 needs iOS18
        recipe["coreml"] = {"minimum_deployment_target": "iOS18"}
    if spec["name"] == "kv8" and target == "coreml":  # int8 model inputs and outputs need iOS26
        recipe["coreml"] = {"minimum_deployment_target": "iOS26"}
    b = api.compile(recipe, tmp_path / "b")
    failed = [r for r in b.manifest["verification"]["results"] if not r["passed"]]
    assert not failed, failed
    assert b.manifest["model"]["family"] == name.removesuffix("-tiles")


QUANT = ("w8a8", "w8", "w4", "kv8")


@pytest.mark.parametrize("index", [i for i, s in enumerate(specs(16)) if s["name"] in QUANT],
                         ids=lambda i: "-".join(str(v) for v in specs(16)[i].values()))
def test_every_quantization_scheme_exports_and_verifies_on_tvm(family, index, calibration_jsonl, tmp_path):
    """TVM's integer weights (and int8 KV cache) on every family: the host library verifies against eager."""
    name, d, extra, tokens = family
    spec = specs(tokens)[index]
    recipe = {"model": str(d), "targets": ["tvm"], "max_context": 64, "passes": [spec], "verify": {"quantized_rel_err": 0.5},
              "calibration": {"dataset": str(calibration_jsonl), "n": 8}, **extra}
    if spec["name"] == "kv8" and name == "lfm2_vl":  # its cache slots hold the convolution state too
        with pytest.raises(VlmcError):
            api.compile(recipe, tmp_path / "b")
        return
    b = api.compile(recipe, tmp_path / "b")
    failed = [r for r in b.manifest["verification"]["results"] if not r["passed"]]
    assert not failed, failed
    if spec["name"] != "kv8":
        assert b.manifest["targets"]["tvm"]["programs"]["text_decoder"]["quantization"]["scheme"] == spec["name"]
