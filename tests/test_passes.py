"""Token passes: validated before any work, exported and verified on every target, same tokens everywhere."""
import re

import pytest

from vlmc import api
from tests.helpers import SPACED_TEMPLATE, three_target_bundle
from vlmc.errors import VlmcError
from vlmc.passes import registry

METHODS = {
    "random": {"name": "random", "keep": 8, "seed": 1},
    "pooling": {"name": "pooling", "keep": 4},
    "divprune": {"name": "divprune", "keep": 6},
    "tfps": {"name": "tfps", "keep": 6},
    "score": {"name": "score", "keep": 6},
    "coin": {"name": "coin", "keep": 6},
    "docprune": {"name": "docprune", "keep": 6},
    "apet": {"name": "apet", "keep": 6},
    "zooprune": {"name": "zooprune", "keep": 6},
    "vlmpruner": {"name": "vlmpruner", "keep": 6},
    "visionzip": {"name": "visionzip", "dominant": 4, "contextual": 3},
    "tome": {"name": "tome", "at": "vision.block[0]", "r": 3},
    "core": {"name": "core", "keep": 6},
}
TEMPLATE = SPACED_TEMPLATE


# conformance of these runs only under -m slow, keeping the default run short; the default run keeps one
# pruner (divprune) on every target; mergers (pooling, tome) and the rest run their three-target export
# under -m slow (tome's merging is checked by default on ONNX in test_tome_merges_r_per_block_...)
SLOW = {"score", "coin", "docprune", "apet", "zooprune", "vlmpruner", "random", "tfps", "visionzip", "pooling", "tome", "core"}


@pytest.fixture(scope="module", params=[pytest.param(m, marks=pytest.mark.slow) if m in SLOW else m for m in sorted(METHODS)])
def pruned_bundle(request, tiny_ckpt, tmp_path_factory):
    if request.param == "divprune":  # the session's shared bundle: DivPrune on every target, TVM included
        return request.getfixturevalue("pruned_every_target")
    out = tmp_path_factory.mktemp("pruned") / request.param
    return three_target_bundle(tiny_ckpt, [METHODS[request.param]], out)


def test_method_exports_and_verifies_on_every_target(pruned_bundle):
    m = pruned_bundle.manifest
    (p,) = m["passes"]
    assert p["tokens_in"] in (16, 17) and p["image_tokens"] == m["prompt"]["num_image_tokens"] < 16
    assert m["prompt"]["num_image_tokens_unpruned"] == 16
    for target in ("onnx", "executorch"):
        image_out = m["targets"][target]["programs"]["vision_encoder"]["outputs"][0]["shape"]
        assert image_out[1] == p["image_tokens"]
    assert all(r["passed"] for r in m["verification"]["results"])
    assert {r["target"] for r in m["verification"]["results"]} == set(m["targets"]) >= {"onnx", "executorch", "coreml"}


def test_method_gives_the_same_tokens_on_every_runtime(pruned_bundle, sample_image):
    tokens = {rt: api.run(pruned_bundle.path, rt, sample_image, "what color is the circle ?", max_new_tokens=6)["tokens"]
              for rt in ("eager", "onnxruntime", "executorch")}
    assert tokens["eager"] == tokens["onnxruntime"] == tokens["executorch"], tokens


def test_chained_passes(tiny_ckpt, tmp_path):
    b = api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "max_context": 48, "prompt_template": TEMPLATE,
                     "passes": [{"name": "visionzip", "dominant": 6, "contextual": 4}, {"name": "divprune", "keep": 5}]}, tmp_path / "c")
    assert [(p["name"], p["tokens_out"]) for p in b.manifest["passes"]] == [("visionzip", 11), ("divprune", 5)]


@pytest.mark.parametrize("spec,fragment", [
    ({"name": "magic", "keep": 3}, "unknown pass 'magic'"),
    ({"name": "divprune"}, "parameter 'keep': Field required"),
    ({"name": "divprune", "keep": 0}, "parameter 'keep'"),
    ({"name": "divprune", "keep": 4, "ratio": 2}, "parameter 'ratio': unknown parameter"),
    ({"name": "divprune", "keep": 16}, "'keep': 16 must be below the 16 tokens"),
    ({"name": "divprune", "keep": 4, "at": "vision.block[0]"}, "not a place this method works"),
    ({"name": "divprune", "keep": 4, "at": "projector.in"}, "unknown insertion point"),
    ({"name": "pooling", "keep": 5}, "not a square number"),
    ({"name": "visionzip", "dominant": 10, "contextual": 6}, "must be below the 16 patch tokens"),
    ({"name": "visionzip", "dominant": 2, "contextual": 2, "at": "vision.block[-5]"}, "only 2 vision blocks run"),
    ({"name": "tome", "r": 6}, "'r': 6 is too large for vision.block[1] (11 tokens there: at most 5 can merge)"),
    ({"name": "tome", "r": 2, "at": "projector.out"}, "not a place this method works"),
    ({"name": "divprune", "keep": 3, "indices": [1, 1, 2]}, "'indices': needs 3 distinct indices in 0..15"),
    ({"name": "random", "keep": 3, "static": True}, "parameter 'static': unknown parameter"),
])
def test_bad_parameters_are_refused_before_export(tiny_ckpt, tmp_path, spec, fragment):
    with pytest.raises(VlmcError, match=re.escape(fragment)):
        api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "passes": [spec]}, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_calibrated_static_mode_folds_the_most_picked_tokens(tiny_ckpt, calibration_jsonl, tmp_path, sample_image):
    import onnx

    recipe = {"model": str(tiny_ckpt), "targets": ["onnx", "executorch"], "max_context": 48, "prompt_template": TEMPLATE,
              "calibration": {"dataset": str(calibration_jsonl), "n": 8}}
    static = api.compile({**recipe, "passes": [{"name": "divprune", "keep": 6, "static": True}]}, tmp_path / "s")
    dynamic = api.compile({**recipe, "targets": ["onnx"], "passes": [{"name": "divprune", "keep": 6}]}, tmp_path / "d")
    idx = static.manifest["passes"][0]["params"]["indices"]
    assert len(idx) == 6 and idx == sorted(set(idx))
    assert static.manifest["recipe"]["passes"][0]["indices"] == idx  # the bundle rebuilds without the data
    ops = lambda b: {n.op_type for n in onnx.load(str(b.path / "vision_encoder.onnx")).graph.node}  # noqa: E731
    assert "TopK" in ops(dynamic) and "TopK" not in ops(static)  # no selection left in the graph
    assert all(r["passed"] for r in static.manifest["verification"]["results"])
    tokens = {rt: api.run(static.path, rt, sample_image, "what color is the circle ?", max_new_tokens=4)["tokens"]
              for rt in ("eager", "onnxruntime", "executorch")}
    assert tokens["eager"] == tokens["onnxruntime"] == tokens["executorch"]


def test_tome_merges_r_per_block_and_orders_with_other_stages(tiny_ckpt, tmp_path):
    b = api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "max_context": 48, "prompt_template": TEMPLATE,
                     "passes": [{"name": "tome", "r": 3}, {"name": "divprune", "keep": 5}]}, tmp_path / "t")
    tome, div = b.manifest["passes"]
    # 17 tokens (CLS + 16) -> 14 after block 0 -> 11 after block 1; CLS dropped at the feature layer
    assert (tome["tokens_in"], tome["tokens_out"], div["tokens_in"], div["tokens_out"]) == (17, 11, 10, 5)
    with pytest.raises(VlmcError, match="does not track merged sizes"):
        api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "prompt_template": TEMPLATE,
                     "passes": [{"name": "tome", "r": 2}, {"name": "visionzip", "dominant": 3, "contextual": 2}]}, tmp_path / "x")


def test_tome_proportional_attention_weighs_a_merged_token_like_its_copies(tiny_ckpt):
    """A token of size 2 gets the attention two identical tokens would: outputs for the others are equal."""
    import torch

    from vlmc.models_zoo import load

    block = load(str(tiny_ckpt)).model.vision_tower.encoder.layers[0]
    x = torch.randn(1, 4, 32)
    dup = torch.cat([x, x[:, 3:]], dim=1)  # token 3 twice
    with torch.no_grad():
        merged = block(x, torch.tensor([[[1.0], [1.0], [1.0], [2.0]]]))
        copies = block(dup)
    torch.testing.assert_close(merged, copies[:, :4], atol=1e-5, rtol=1e-5)


def test_cli_pass_syntax():
    assert registry.parse_cli("divprune:keep=64,at=vision.out") == {"name": "divprune", "keep": 64, "at": "vision.out"}
    with pytest.raises(VlmcError, match="expected key=value"):
        registry.parse_cli("divprune:64")


def test_every_pass_names_its_source_and_departures():
    rows = registry.describe()
    assert {r["name"] for r in rows} >= set(METHODS)
    assert all(r["source"] and r["departures"] and r["acts_at"] for r in rows)


def test_core_exports_verifies_and_runs_alike_on_onnx(tiny_ckpt, tmp_path, sample_image):
    b = api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "max_context": 48, "prompt_template": TEMPLATE,
                     "passes": [{"name": "core", "keep": 6}]}, tmp_path / "c")
    assert b.manifest["prompt"]["num_image_tokens"] == 6 and all(r["passed"] for r in b.manifest["verification"]["results"])
    run = lambda rt: api.run(b.path, rt, sample_image, "what color is the circle ?", max_new_tokens=4)["tokens"]  # noqa: E731
    assert run("eager") == run("onnxruntime")
    with pytest.raises(VlmcError, match="full 4x4 token grid"):
        api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "prompt_template": TEMPLATE,
                     "passes": [{"name": "divprune", "keep": 9}, {"name": "core", "keep": 4}]}, tmp_path / "x")
