"""Quantization passes: each target's own quantizer, per part, calibrated on real questions; bad input refused
before any work."""
import json
from collections import Counter

import numpy as np
import pytest

from tests.test_cli import assert_one_line_error, vlmc
from vlmc import api
from vlmc.errors import VlmcError

TEMPLATE = "USER : <image> {prompt} ASSISTANT :"


def compile_tiny(tiny_ckpt, out, passes, calibration=None, targets=("onnx", "executorch"), **extra):
    recipe = {"model": str(tiny_ckpt), "targets": list(targets), "max_context": 48, "prompt_template": TEMPLATE,
              "passes": passes, **extra}
    if calibration:
        recipe["calibration"] = {"dataset": str(calibration), "n": 8}
    return api.compile(recipe, out)


def onnx_ops(bundle, program):
    import onnx

    return Counter(n.op_type for n in onnx.load(str(bundle.path / f"{program}.onnx")).graph.node)


@pytest.fixture(scope="module")
def w8a8_bundle(tiny_ckpt, calibration_jsonl, tmp_path_factory):
    return compile_tiny(tiny_ckpt, tmp_path_factory.mktemp("q") / "w8a8", [{"name": "w8a8"}], calibration_jsonl)


@pytest.mark.parametrize("activations, zero_point", [("uint8", "UINT8"), ("int8", "INT8")])
def test_onnx_w8a8_activation_type_follows_the_recipe(tmp_path, activations, zero_point):
    """U8S8 by default (onnxruntime's fast CPU form), S8S8 on request; weights int8 either way, and the
    quantized product stays close to the float one."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from vlmc.passes.quant import onnx_quant
    from vlmc.passes.registry import build

    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="linear")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])], [numpy_helper.from_array(w, "w")])
    path = tmp_path / "linear.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)
    feeds = [{"x": rng.standard_normal((4, 32)).astype(np.float32)} for _ in range(4)]
    record = onnx_quant.quantize(path, build({"name": "w8a8"}), feeds, w8a8_activations=activations)
    assert record["activations"] == f"static {activations}" and ("U8S8" if activations == "uint8" else "S8S8") in record["how"]
    q = onnx.load(str(path)).graph
    dtypes = {i.name: TensorProto.DataType.Name(i.data_type) for i in q.initializer}
    assert {dtypes[n.input[2]] for n in q.node if n.op_type == "QuantizeLinear"} == {zero_point}
    assert {dtypes[n.input[0]] for n in q.node if n.op_type == "DequantizeLinear" and n.input[0] in dtypes} == {"INT8"}
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds[0])[0]
    assert np.abs(y - feeds[0]["x"] @ w).max() < 0.05 * np.abs(feeds[0]["x"] @ w).max()


def test_w8a8_quantizes_both_parts_on_each_target_and_verifies(w8a8_bundle):
    m = w8a8_bundle.manifest
    assert set(m["quantization"]["parts"]) == {"vision", "decoder"}
    assert m["quantization"]["calibration"]["n"] == 8
    for program in ("vision_encoder", "text_decoder"):
        ops = onnx_ops(w8a8_bundle, program)
        assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0, ops
        for target in ("onnx", "executorch"):
            q = m["targets"][target]["programs"][program]["quantization"]
            assert q["scheme"] == "w8a8" and q["activations"] == {"onnx": "static uint8", "executorch": "static int8"}[target]
    assert "QuantizeLinear" not in onnx_ops(w8a8_bundle, "token_embedding")
    # U8S8 (onnxruntime's fast CPU form): activations quantized to uint8, weights stored as int8
    import onnx

    graph = onnx.load(str(w8a8_bundle.path / "text_decoder.onnx")).graph
    dtypes = {i.name: i.data_type for i in graph.initializer}
    activation_zero_points = {dtypes[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"}
    weights = {dtypes[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in dtypes}
    assert activation_zero_points == {onnx.TensorProto.UINT8} and weights == {onnx.TensorProto.INT8}
    assert "quantization" not in m["targets"]["onnx"]["programs"]["token_embedding"]
    rows = m["verification"]["results"]
    assert rows and all(r["passed"] for r in rows)
    quantized = [r for r in rows if r.get("quantized")]
    assert {r["program"] for r in quantized} == {"vision_encoder", "text_decoder", "text_prefill"}  # ExecuTorch's own prefill method too
    assert m["targets"]["executorch"]["programs"]["text_prefill"]["quantization"]["scheme"] == "w8a8"
    # quantization moves the outputs, but by little: the float checks would fail, the relative ones pass
    assert all(0 < r["rel_err"] <= 0.25 and r["max_abs_err"] > 1e-3 for r in quantized if "KV" not in r["check"])
    assert all(r["max_abs_err"] == 0 for r in rows if r["program"] == "token_embedding")


def test_w8a8_bundle_generates_on_both_runtimes(w8a8_bundle, sample_image):
    for runtime in ("onnxruntime", "executorch"):
        out = api.run(w8a8_bundle.path, runtime, sample_image, "what color is the circle ?", max_new_tokens=4)
        assert len(out["tokens"]) >= 1


@pytest.mark.slow
def test_parts_take_different_schemes(tiny_ckpt, calibration_jsonl, tmp_path):
    b = compile_tiny(tiny_ckpt, tmp_path / "mixed", [{"name": "w8a8", "at": "vision"}, {"name": "w4", "at": "decoder", "group_size": 32}],
                     calibration_jsonl)
    assert onnx_ops(b, "vision_encoder")["QuantizeLinear"] > 0
    decoder = onnx_ops(b, "text_decoder")
    # every decoder linear (2 layers x 7 + the head) became a 4-bit MatMulNBits; nothing else was quantized
    assert decoder["MatMulNBits"] == 15 and "QuantizeLinear" not in decoder
    et = b.manifest["targets"]["executorch"]["programs"]
    assert et["vision_encoder"]["quantization"]["scheme"] == "w8a8" and et["text_decoder"]["quantization"]["group_size"] == 32
    assert all(r["passed"] for r in b.manifest["verification"]["results"])


def test_w8_is_dynamic_and_needs_no_calibration(tiny_ckpt, tmp_path):
    b = compile_tiny(tiny_ckpt, tmp_path / "w8", [{"name": "w8", "at": "decoder"}], targets=("onnx",),
                     calibration=tmp_path / "absent.jsonl")
    assert onnx_ops(b, "text_decoder")["MatMulInteger"] > 0
    assert "MatMulInteger" not in onnx_ops(b, "vision_encoder")
    assert "calibration" not in b.manifest["quantization"]


def test_coreml_w4_is_block_wise_int4(tiny_ckpt, tmp_path):
    b = compile_tiny(tiny_ckpt, tmp_path / "cm", [{"name": "w4", "at": "decoder", "group_size": 32}], targets=("coreml",),
                     coreml={"minimum_deployment_target": "iOS18"})
    ops = b.manifest["targets"]["coreml"]["programs"]["text_decoder"]["ops"]
    assert ops.get("constexpr_blockwise_shift_scale", 0) > 0, ops


@pytest.mark.parametrize("passes,extra,fragment", [
    ([{"name": "w4", "group_size": 48}], {}, "'group_size': 48 is not a power of two"),
    ([{"name": "w4", "group_size": 64}], {}, "does not divide the 32 input channels of vision_tower"),
    ([{"name": "w8a8"}, {"name": "w4", "at": "decoder"}], {}, "the decoder part is already quantized by w8a8"),
    ([{"name": "w8", "at": "projector"}], {}, "parameter 'at'"),
    ([{"name": "w4"}], {"targets": ["coreml"]}, "need coreml.minimum_deployment_target iOS18 / macOS15 or later"),
    ([{"name": "w4", "group_size": 16}], {"targets": ["executorch"]}, "XNNPACK (target executorch) takes 4-bit groups of a multiple of 32"),
    ([{"name": "w8a8"}], {"calibration": {"dataset": "nowhere.jsonl"}}, "nowhere.jsonl: no such file"),
    ([{"name": "w8a8"}], {"calibration": {"dataset": "shapes-vqa", "split": "test"}}, "calibration.split"),
    ([{"name": "w8a8"}], {"calibration": {"n": 2}}, "calibration.n"),
])
def test_bad_quantization_is_refused_before_any_work(tiny_ckpt, tmp_path, passes, extra, fragment):
    out = tmp_path / "never"
    with pytest.raises(VlmcError, match=None) as e:
        api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "prompt_template": TEMPLATE, "passes": passes, **extra}, out)
    assert fragment in str(e.value)
    assert not out.exists()


def test_too_few_calibration_questions(tiny_ckpt, calibration_jsonl, tmp_path):
    r = vlmc("export", "--model", tiny_ckpt, "-t", "onnx", "-o", tmp_path / "b", "--pass", "w8a8",
             "--calibration", calibration_jsonl, "--calibration-n", 9)
    assert_one_line_error(r, "has 8 questions, fewer than the 9 asked")
    assert not (tmp_path / "b").exists()


def tiny_calibration(tiny_ckpt, calibration_jsonl):
    """(prepared tiny model, its calibration record over the 8 questions)."""
    from vlmc.exporter.build import prepare
    from vlmc.passes.quant.calibration import collect
    from vlmc.recipe import build
    from vlmc.runtimes.base import DecoderShape

    recipe = build({"model": str(tiny_ckpt), "max_context": 48, "prompt_template": TEMPLATE,
                    "calibration": {"dataset": str(calibration_jsonl), "n": 8}})
    p = prepare(recipe)
    t = p.loaded.config.text
    shape = DecoderShape(t.num_layers, t.num_kv_heads, t.head_dim, t.hidden_size, 48, p.recipe.max_prompt)
    return p, collect(p.loaded.model, p.loaded.tokenizer, p.recipe, p.image_tokens, shape)


def test_calibration_records_what_each_program_sees(tiny_ckpt, calibration_jsonl):
    from vlmc.passes.quant.calibration import DECODE_STEPS

    p, cal = tiny_calibration(tiny_ckpt, calibration_jsonl)
    t = p.loaded.config.text
    assert len(cal.images) == 8 and all(img.shape == (3, 32, 32) and img.dtype == np.uint8 for img in cal.images)
    assert all(len(calls) == 1 + DECODE_STEPS for calls in cal.decoder_calls)
    prefill, *steps = cal.decoder_calls[0]
    assert prefill[1] == 0 and prefill[0].shape[1] == p.image_tokens + 10  # "USER :" + image + 6 question words + "ASSISTANT :"
    assert [s[1] for s in steps] == [prefill[0].shape[1] + i for i in range(DECODE_STEPS)]
    assert len(cal.static_decoder_inputs) == 8 * (1 + DECODE_STEPS)
    assert cal.static_decoder_inputs[0][0].shape == prefill[0].shape  # prefill at the prompt's length, as onnxruntime runs it
    # caches are kept up to their last written slot and rebuilt whole: a prefill's are empty, a step's hold the prompt
    from vlmc.passes.quant.calibration import ZeroTail

    feeds = list(cal.static_inputs("text_decoder"))
    first_step = cal.static_decoder_inputs[1]
    caches = [a for a in first_step if isinstance(a, ZeroTail)]
    assert caches and all(c.head.shape[-2] == prefill[0].shape[1] and c.shape[-2] == 48 for c in caches)
    assert all(a.shape == (1, t.num_kv_heads, 48, t.head_dim) and not a.any() for a in feeds[0][4:])
    assert all(np.array_equal(a[..., :c.head.shape[-2], :], c.head) and not a[..., c.head.shape[-2]:, :].any()
               for a, c in zip(feeds[1][4:], caches))


def test_passes_lists_quantization(tmp_path):
    rows = {r["name"]: r for r in json.loads(vlmc("passes", "--json").stdout)}
    assert rows["w4"]["kind"] == "quant" and "group_size" in rows["w4"]["parameters"]
    assert set(rows["w8a8"]["acts_at"]) == {"vision", "decoder", "all"}


def test_observers_on_integer_tensors_are_dropped_before_calibration():
    """XNNPACKQuantizer annotates shape ops whatever their dtype: the indices of an in-graph selection would
    get a histogram observer (which cannot observe int64) and w8a8 after DivPrune failed to export."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from vlmc.passes.quant.executorch_quant import drop_integer_observers

    from vlmc.passes.token.methods import FarthestStage

    class Select(torch.nn.Module):  # DivPrune's selection, then a linear to quantize
        def __init__(self):
            super().__init__()
            self.select, self.proj = FarthestStage(3), torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(self.select(x))

    x = torch.randn(1, 6, 8)
    prepared = prepare_pt2e(torch.export.export(Select(), (x,)).module(),
                            XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True)))
    observed = lambda: [n for n in prepared.graph.nodes if n.op == "call_module" and n.target.startswith("activation_post_process")]  # noqa: E731
    integer = [n for n in observed() if not n.args[0].meta["val"].dtype.is_floating_point]
    assert integer, "the quantizer no longer observes integer tensors: this workaround can go"
    drop_integer_observers(prepared)
    assert all(n.args[0].meta["val"].dtype.is_floating_point for n in observed())
    with torch.no_grad():
        prepared(x)
        out = convert_pt2e(prepared)(x)
    assert out.shape == (1, 3, 8)


def test_a_quantized_selection_is_verified_as_a_set_of_rows():
    """A quantized vision encoder with a token selection may pick another token where scores tie, shifting the
    index-ordered rows after it: paired with their nearest eager rows, the rows still pass; a runtime that
    repeats one right row, or returns wrong rows, does not."""
    from vlmc.exporter.verify import check_row, paired_rows

    rng = np.random.default_rng(0)
    full = np.cumsum(rng.standard_normal((40, 16)), axis=0)  # neighbouring patches alike, distant ones not
    eager = full[[0, 3, 5, 8, 13, 21, 30, 34]]
    runtime = full[[0, 3, 4, 5, 8, 13, 21, 30]] + 0.01 * rng.standard_normal((8, 16))  # token 4 picked, 34 dropped

    def passes(got):
        return check_row("onnx", "vision_encoder", "image embeddings", *paired_rows(got, eager)[:2], 1e-3, 1e-3, 0.25)["passed"]

    assert not check_row("onnx", "vision_encoder", "image embeddings", runtime, eager, 1e-3, 1e-3, 0.25)["passed"]  # by position
    assert paired_rows(runtime, eager)[2] == 7 and passes(runtime)
    assert not passes(np.repeat(eager[:1], 8, axis=0))  # one right row, repeated
    assert not passes(full[[1, 9, 15, 18, 25, 27, 37, 39]])  # other tokens
