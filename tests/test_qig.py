"""QIG: integrated gradients attribute the 4-bit rounding error's effect on the answer to each linear and
row; the attributions sum to the quantized model's KL (completeness); the plan gives 8 bits to the most
sensitive linears per weight within the budget; the targets store those at 8 bits and the rest at 4."""
import copy
import dataclasses

import pytest
import torch

from tests.helpers import assert_export_refused
from tests.test_quant import TEMPLATE, compile_tiny, onnx_ops
from vlmc import api
from vlmc.models_zoo import load
from vlmc.passes.quant import linear_layers
from vlmc.passes.quant.calibration import CalibrationSource
from vlmc.passes.quant.qig import PATH_GRID, Attribution, attribute, average_bits, promote
from vlmc.recipe import Recipe

GROUP = 32


@pytest.fixture(scope="module")
def builtin():
    """The shipped model and eight ShapesVQA validation questions, as QIG calibrates on them."""
    loaded = load()
    recipe = loaded.template(Recipe(calibration={"n": 8}))
    model = loaded.model
    return model, CalibrationSource(recipe, loaded.tokenizer, model).questions(model)


def answer_kl(model, quantized, questions) -> float:
    """Mean KL of the answer distribution (last prompt row) of `quantized` from `model`'s."""
    total = 0.0
    with torch.no_grad():
        for pixels, ids in questions:
            ref = torch.log_softmax(model(ids, pixels)[0, -1].double(), -1)
            got = torch.log_softmax(quantized(ids, pixels)[0, -1].double(), -1)
            total += float((ref.exp() * (ref - got)).sum())
    return total / len(questions)


def rounded(model, eight_bit=()):
    """A copy with every linear rounded to nearest: 4 bits in groups (QIG's path grid), or per-channel 8 bits."""
    q = copy.deepcopy(model)
    with torch.no_grad():
        for part in ("vision", "decoder"):
            for name, layer in linear_layers(q, part):
                w = layer.weight
                if name in eight_bit:
                    s = w.abs().amax(1, keepdim=True) / 127
                    w.copy_(torch.round(w / torch.where(s == 0, 1, s)) * s)
                else:
                    w.copy_(PATH_GRID.round_to_nearest(w, GROUP))
    return q


def all_layers(model):
    return [layer for part in ("vision", "decoder") for layer in linear_layers(model, part)]


def test_attributions_sum_to_the_quantized_models_kl(builtin):
    """Completeness: integrated gradients along float -> 4-bit split the quantized model's KL exactly
    (up to the quadrature) over linears and rows."""
    model, questions = builtin
    found = attribute(model, all_layers(model), questions, GROUP, steps=16)
    kl = answer_kl(model, rounded(model), questions)
    total = sum(a.kl_share for a in found.values())
    assert kl > 1e-4
    assert abs(total - kl) < 0.05 * kl, (total, kl)
    assert all(a.sensitivity >= abs(a.kl_share) for a in found.values())
    vision = [a for name, a in found.items() if name.startswith(model.parts["vision"]) and a.sensitivity != 0]
    assert vision and all(a.image_share == pytest.approx(1.0) for a in vision)  # every vision row is an image's
    unused = [name for name, a in found.items() if a.sensitivity == 0]  # the block after the feature layer never runs
    assert unused and all(".layers.3." in name for name in unused) and not set(unused) & set(promote(found, 8.0))
    decoder = [a.image_share for name, a in found.items() if name.startswith(model.parts["decoder"])]
    assert decoder and all(0.0 <= s <= 1.0 for s in decoder) and any(0.05 < s < 0.95 for s in decoder)


def test_the_plan_leaves_less_error_than_uniform_4_bits_or_the_same_budget_spent_backwards(builtin):
    """Measured on questions the plan was not made from (ShapesVQA train, the plan from val)."""
    model, questions = builtin
    loaded = load()
    held_out = CalibrationSource(loaded.template(Recipe(calibration={"n": 24, "split": "train"})), loaded.tokenizer,
                                 model).questions(model)
    found = attribute(model, all_layers(model), questions, GROUP, steps=8)
    plan = promote(found, 5.0)
    # the same budget filled least sensitive per weight first
    backwards = promote({n: dataclasses.replace(a, sensitivity=a.weights ** 2 / max(a.sensitivity, 1e-12))
                         for n, a in found.items()}, 5.0)
    assert plan and 4.9 < average_bits(found, plan) <= 5.0 and 4.5 < average_bits(found, backwards) <= 5.0
    planned, spent_backwards, uniform = (answer_kl(model, rounded(model, p), held_out) for p in (plan, backwards, ()))
    assert planned < 0.7 * uniform and planned < 0.5 * spent_backwards, (planned, spent_backwards, uniform)


def test_promotion_is_a_greedy_knapsack_by_sensitivity_per_weight():
    def a(sensitivity, weights):
        return Attribution(0.0, sensitivity, 0.0, weights)

    found = {"a": a(4.0, 100), "b": a(3.0, 10), "c": a(0.5, 50), "d": a(0.0, 1), "e": a(0.2, 40)}  # 201 weights
    assert promote(found, 4.01) == []  # room for 8 extra bits: nothing fits
    assert promote(found, 4.2) == ["b"]  # 40 bits: b (0.3 per weight) fits, a (0.04) does not
    assert promote(found, 6.5) == ["a", "b"]  # 502 bits: b then a (440); c (200 more) no longer fits, nor e
    assert promote(found, 8.0) == ["a", "b", "c", "e"]  # all the prompts reach; d (never reached) not
    assert average_bits(found, ["a", "b"]) == pytest.approx(4 + 4 * 110 / 201)


def test_qig_onnx_bundle_stores_the_plan_at_8_bits_and_the_rest_at_4(tiny_ckpt, calibration_jsonl, tmp_path):
    b = compile_tiny(tiny_ckpt, tmp_path / "qig", [{"name": "w4", "at": "decoder", "method": "qig", "bits": 6}],
                     calibration_jsonl, targets=("onnx",))
    spec = b.manifest["recipe"]["passes"][0]
    promoted = spec["promote"]
    assert promoted and set(spec["sensitivity"]) == {n for n, _ in linear_layers(load(str(tiny_ckpt)).model, "decoder")}
    assert b.manifest["quantization"]["parts"]["decoder"]["promoted_to_8_bits"] == promoted
    q = b.manifest["targets"]["onnx"]["programs"]["text_decoder"]["quantization"]
    assert sorted(q["eight_bit_linears"]) == promoted and "MatMulInteger" in q["how"]
    ops = onnx_ops(b, "text_decoder")
    assert ops["MatMulInteger"] == len(promoted) and ops["MatMulNBits"] == 2 * 7 + 1 - len(promoted)
    assert all(r["passed"] for r in b.manifest["verification"]["results"])
    # the written recipe rebuilds the same plan without measuring again
    again = api.compile({**b.manifest["recipe"], "calibration": {"dataset": "shapes-vqa", "n": 8}}, tmp_path / "again")
    assert again.manifest["recipe"]["passes"][0]["promote"] == promoted
    assert onnx_ops(again, "text_decoder") == ops


@pytest.mark.slow  # two more targets (-m slow)
def test_qig_bundle_verifies_on_executorch_and_coreml(tiny_ckpt, calibration_jsonl, sample_image, tmp_path):
    b = compile_tiny(tiny_ckpt, tmp_path / "qig3", [{"name": "w4", "method": "qig", "bits": 5.5}], calibration_jsonl,
                     targets=("onnx", "executorch", "coreml"), coreml={"minimum_deployment_target": "iOS18"})
    assert all(r["passed"] for r in b.manifest["verification"]["results"])
    promoted = b.manifest["recipe"]["passes"][0]["promote"]
    for target in ("onnx", "executorch", "coreml"):
        programs = b.manifest["targets"][target]["programs"]
        placed = [n for p in ("vision_encoder", "text_decoder") for n in programs[p]["quantization"].get("eight_bit_linears", [])]
        assert sorted(placed) == sorted(promoted)
    tokens = {rt: api.run(b.path, rt, sample_image, "what color is the circle ?", max_new_tokens=3)["tokens"]
              for rt in ("onnxruntime", "executorch")}
    assert tokens["onnxruntime"] == tokens["executorch"]


@pytest.mark.parametrize("passes, fragment", [
    ([{"name": "w8", "method": "qig"}], "qig chooses 4 or 8 bits per linear; it is a method of w4"),
    ([{"name": "w4", "method": "qig", "bits": 4}], "bits"),
    ([{"name": "w4", "method": "qig", "bits": 9}], "bits"),
    ([{"name": "w4", "method": "gptq", "bits": 5}], "parameter 'bits' applies to method qig only"),
    ([{"name": "w4", "method": "minmax", "promote": ["language_model.layers.0.mlp.up_proj"]}],
     "parameter 'promote' applies to method qig only"),
    ([{"name": "w4", "at": "decoder", "method": "qig", "promote": ["vision_tower.nope"]}],
     "parameter 'promote': vision_tower.nope is not a linear of the decoder part"),
])
def test_bad_qig_parameters_are_refused(tiny_ckpt, tmp_path, passes, fragment):
    assert_export_refused(tiny_ckpt, tmp_path / "b", passes, fragment, TEMPLATE)
