"""GPTQ on each target's 4-bit grid: the targets' own quantizers reproduce its rounding exactly; it lowers
the layer's output error on the calibration inputs; the modality-aware Hessian protects the text tokens."""
import numpy as np
import pytest
import torch

from tests.test_quant import TEMPLATE, compile_tiny
from vlmc import api
from vlmc.errors import VlmcError
from vlmc.passes.quant.calibration import LayerInputs
from vlmc.passes.quant.gptq import GRIDS, gptq

GROUP = 32


def onnxruntime_4bit(w: torch.Tensor) -> torch.Tensor:
    """`w` [out, in] as onnxruntime's MatMulNBitsQuantizer stores it (dequantized from its initializers)."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    graph = helper.make_graph([helper.make_node("MatMul", ["X", "B"], ["Y"], name="mm")], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, w.shape[1]])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, w.shape[0]])],
                              [numpy_helper.from_array(w.T.numpy().astype(np.float32), "B")])
    q = MatMulNBitsQuantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), block_size=GROUP,
                             is_symmetric=True)
    q.process()
    inits = {i.name: numpy_helper.to_array(i) for i in q.model.model.graph.initializer}
    packed, scales = inits["B_Q4"], inits["B_scales"]
    n, blocks, half = packed.shape
    k = np.stack([packed & 0x0F, packed >> 4], -1).reshape(n, blocks, 2 * half).astype(np.float32) - 8
    return torch.from_numpy((k * scales.reshape(n, blocks, 1)).reshape(n, -1))


def torchao_4bit(w: torch.Tensor) -> torch.Tensor:
    """`w` as the ExecuTorch target's torchao config stores it."""
    from vlmc.passes.quant.executorch_quant import quantize_w4

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            self.lin.weight.data = w.clone()

        def part_modules(self, part):
            return [("lin", self.lin)]

    return quantize_w4(One(), "decoder", GROUP).lin.weight.dequantize()


def coreml_4bit(w: torch.Tensor) -> torch.Tensor:
    """`w` as coremltools' linear_symmetric int4 per-block quantization stores it."""
    from coremltools.optimize._utils import compute_qparams

    q, s, _ = compute_qparams(w.numpy(), nbits=4, signed=True, quantization_mode="LINEAR_SYMMETRIC", dtype=np.int8,
                              block_sizes=[1, GROUP])
    return torch.from_numpy(q.astype(np.float32) * np.repeat(s, GROUP, axis=1))


def tvm_4bit(w: torch.Tensor) -> torch.Tensor:
    """`w` as the TVM target stores it (tvm_quant's packed codes and scales, dequantized)."""
    from vlmc.passes.quant.tvm_quant import dequantize, pack_int4

    codes, scales = pack_int4(w, GROUP)
    return dequantize(codes, scales, 4, GROUP)


STORE = {"onnx": onnxruntime_4bit, "executorch": torchao_4bit, "coreml": coreml_4bit, "tvm": tvm_4bit}


def correlated_inputs(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / dim ** 0.5
    return torch.randn(n, dim, generator=g) @ mix + 0.3 * torch.randn(n, dim, generator=g)


@pytest.mark.parametrize("target", sorted(STORE))
def test_each_target_reproduces_gptq_rounding_exactly(target):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))
    x = correlated_inputs(256, 64, 2)
    grid = GRIDS[target]
    assert torch.allclose(STORE[target](w), grid.round_to_nearest(w, GROUP), rtol=0, atol=1e-6)  # the grid is the target's
    q = gptq(w, x.T @ x, grid, GROUP)
    assert not torch.allclose(q, grid.round_to_nearest(w, GROUP))  # GPTQ rounds differently from round-to-nearest ...
    assert torch.allclose(STORE[target](q), q, rtol=0, atol=1e-6)  # ... and the target stores exactly what it chose


@pytest.mark.parametrize("target", sorted(GRIDS))
def test_gptq_lowers_output_error_on_the_calibration_inputs(target):
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(3))
    x = correlated_inputs(512, 128, 4)
    grid = GRIDS[target]
    err = lambda q: ((x @ (w - q).T) ** 2).sum().item()  # noqa: E731
    assert err(gptq(w, x.T @ x, grid, GROUP)) < 0.7 * err(grid.round_to_nearest(w, GROUP))


def test_modality_aware_hessian_protects_the_outnumbered_text_tokens():
    """Visual tokens 10x as many as text tokens, with different statistics: mixing the two normalised
    Hessians half and half gives the text tokens a lower error than plain GPTQ, which follows the count."""
    dim = 64
    w = torch.randn(32, dim, generator=torch.Generator().manual_seed(5))
    visual = correlated_inputs(2000, dim, 6) * torch.linspace(3, 0.1, dim)
    text = correlated_inputs(200, dim, 7) * torch.linspace(0.1, 3, dim)
    moments = LayerInputs.empty(dim)
    moments.add(torch.cat([visual, text]), torch.arange(2200) < 2000)
    assert (moments.n_visual, moments.n_text) == (2000, 200)
    text_err = lambda q: ((text @ (w - q).T) ** 2).mean().item()  # noqa: E731
    grid = GRIDS["onnx"]
    plain = gptq(w, moments.hessian(None).float(), grid, GROUP)
    aware = gptq(w, moments.hessian(0.5).float(), grid, GROUP)
    assert text_err(aware) < 0.8 * text_err(plain)


@pytest.mark.slow  # exports on three targets with calibration (-m slow)
def test_gptq_bundle_verifies_and_records_the_rounding(tiny_ckpt, calibration_jsonl, sample_image, tmp_path):
    b = compile_tiny(tiny_ckpt, tmp_path / "gptq", [{"name": "w4", "group_size": 32, "method": "gptq-modality"}],
                     calibration_jsonl, targets=("onnx", "executorch", "coreml"), coreml={"minimum_deployment_target": "iOS18"})
    m = b.manifest
    assert m["quantization"]["parts"]["decoder"]["method"] == "gptq-modality"
    assert m["quantization"]["parts"]["decoder"]["text_share"] == 0.5
    for target, grid in (("onnx", "MatMulNBits"), ("executorch", "torchao"), ("coreml", "coremltools")):
        q = m["targets"][target]["programs"]["text_decoder"]["quantization"]
        assert grid in q["rounding"] and q["method"] == "gptq-modality"
    rows = m["verification"]["results"]
    assert rows and all(r["passed"] for r in rows)
    out = api.run(b.path, "onnxruntime", sample_image, "what color is the circle ?", max_new_tokens=2)
    assert out["tokens"]


@pytest.mark.parametrize("passes, fragment", [
    ([{"name": "w8a8", "method": "gptq"}], "parameter 'method': gptq is for 4-bit weights"),
    ([{"name": "w4", "method": "gptq", "text_share": 0.3}], "parameter 'text_share' applies to method gptq-modality only"),
    ([{"name": "w4", "method": "gptq-modality", "text_share": 1.5}], "text_share"),
])
def test_bad_gptq_parameters_are_refused(tiny_ckpt, tmp_path, passes, fragment):
    with pytest.raises(VlmcError, match=fragment):
        api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "prompt_template": TEMPLATE, "passes": passes}, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_gptq_of_a_tied_head_leaves_the_embedding_table_float(tmp_path, calibration_jsonl):
    """The head and the token embedding share one table when tied: GPTQ rounds the head's copy only."""
    from tests.helpers import make_hf_llava

    make_hf_llava(tmp_path / "ckpt", tie=True)
    b = api.compile({"model": str(tmp_path / "ckpt"), "targets": ["onnx"], "max_context": 48, "prompt_template": TEMPLATE,
                     "passes": [{"name": "w4", "method": "gptq", "group_size": GROUP}],
                     "calibration": {"dataset": str(calibration_jsonl), "n": 8}}, tmp_path / "b")
    rows = {(r["program"], r["check"]): r for r in b.manifest["verification"]["results"]}
    assert rows[("token_embedding", "prompt embeddings")]["max_abs_err"] == 0.0
    assert all(r["passed"] for r in rows.values())
    assert b.manifest["targets"]["onnx"]["programs"]["text_decoder"]["quantization"]["method"] == "gptq"
