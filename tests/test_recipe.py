"""Recipe validation: fields by name, model-dependent checks, YAML round trip."""
import pytest

from vlmc.errors import VlmcError
from vlmc.recipe import build, load


def test_defaults_resolve_against_the_model():
    r = build({}).resolve(num_image_tokens=196)
    assert r.max_prompt == 244 and r.max_context == 256 and r.targets == ["onnx", "executorch"]


def test_default_context_grows_with_a_model_whose_image_fills_256_slots():
    """InternVL3's 256 image tokens: the prompt gets its 48 text tokens and 64 are left to generate."""
    r = build({}).resolve(num_image_tokens=256)
    assert (r.max_prompt, r.max_context) == (304, 384)
    assert build({"max_context": 1024}).resolve(256).max_context == 1024  # a given length is kept


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: shapes-llava\ntargets: [coreml]\ncoreml: {precision: fp32}\nmax_context: 512\n")
    r = load(str(path), {"max_context": 300, "verify.atol": 0.01})
    assert r.targets == ["coreml"] and r.coreml.precision == "fp32" and r.max_context == 300 and r.verify.atol == 0.01
    assert build(__import__("yaml").safe_load(r.to_yaml())) == r


@pytest.mark.parametrize("data,fragment", [
    ({"targets": ["onnx", "onnx"]}, "'targets': a target is listed twice"),
    ({"targets": []}, "'targets'"),
    ({"verify": {"atol": -1}}, "'verify.atol'"),
    ({"onnx": {"opset": 9}}, "'onnx.opset'"),
    ({"prompt_template": "no image here {prompt}"}, "'prompt_template'"),
    ({"executorch": {"backend": "qnn"}}, "'executorch.backend'"),
    ({"passes": [{"keep": 3}]}, "'passes': pass 0 has no name"),
])
def test_bad_fields_are_named(data, fragment):
    with pytest.raises(VlmcError, match=fragment.replace("(", r"\(")):
        build(data)


def test_max_prompt_checks():
    with pytest.raises(VlmcError, match="'max_prompt': 300 exceeds max_context"):
        build({"max_prompt": 300}).resolve(196)
    with pytest.raises(VlmcError, match="leaves no room for text"):
        build({"max_prompt": 196}).resolve(196)
