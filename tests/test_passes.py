"""Token passes: validated before any work, exported and verified on every target, same tokens everywhere."""
import pytest

from vlmc import api
from vlmc.errors import VlmcError
from vlmc.passes import registry

METHODS = {
    "random": {"name": "random", "keep": 8, "seed": 1},
    "pooling": {"name": "pooling", "keep": 4},
    "divprune": {"name": "divprune", "keep": 6},
    "tfps": {"name": "tfps", "keep": 6},
    "visionzip": {"name": "visionzip", "dominant": 4, "contextual": 3},
}
TEMPLATE = "USER : <image> {prompt} ASSISTANT :"


@pytest.fixture(scope="module", params=sorted(METHODS))
def pruned_bundle(request, tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / request.param
    return api.compile({"model": str(tiny_ckpt), "targets": ["onnx", "executorch", "coreml"], "max_context": 48,
                        "prompt_template": TEMPLATE, "passes": [METHODS[request.param]]}, out)


def test_method_exports_and_verifies_on_every_target(pruned_bundle):
    m = pruned_bundle.manifest
    (p,) = m["passes"]
    assert p["tokens_in"] in (16, 17) and p["image_tokens"] == m["prompt"]["num_image_tokens"] < 16
    assert m["prompt"]["num_image_tokens_unpruned"] == 16
    for target in ("onnx", "executorch"):
        image_out = m["targets"][target]["programs"]["vision_encoder"]["outputs"][0]["shape"]
        assert image_out[1] == p["image_tokens"]
    assert all(r["passed"] for r in m["verification"]["results"])
    assert {r["target"] for r in m["verification"]["results"]} == {"onnx", "executorch", "coreml"}


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
])
def test_bad_parameters_are_refused_before_export(tiny_ckpt, tmp_path, spec, fragment):
    with pytest.raises(VlmcError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "passes": [spec]}, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_pass_syntax():
    assert registry.parse_cli("divprune:keep=64,at=vision.out") == {"name": "divprune", "keep": 64, "at": "vision.out"}
    with pytest.raises(VlmcError, match="expected key=value"):
        registry.parse_cli("divprune:64")


def test_every_pass_names_its_source_and_departures():
    rows = registry.describe()
    assert {r["name"] for r in rows} >= set(METHODS)
    assert all(r["source"] and r["departures"] and r["acts_at"] for r in rows)
