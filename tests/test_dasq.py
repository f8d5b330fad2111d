"""DASQ: the dense kernel plus the sparse outliers give back the weight; without its outliers the dense
kernel quantizes with less error on every target's grid; both parts are symmetric; bundles verify."""
import pytest
import torch

from tests.test_quant import TEMPLATE, compile_tiny
from vlmc import api
from vlmc.errors import VlmcError
from vlmc.passes.quant.dasq import OutlierSplitLinear, outlier_count, split, symmetric
from vlmc.passes.quant.gptq import GRIDS

GROUP = 32


def vision_like_weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Heavy-tailed (Student t, 3 degrees of freedom), as trained vision weights are: a few large
    magnitudes per row stretch its range."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(rows, cols, generator=g)
    chi2 = torch.randn(3, rows, cols, generator=g).pow(2).sum(0)
    return 0.02 * normal / (chi2 / 3).sqrt()


def int8_per_channel(w: torch.Tensor) -> torch.Tensor:
    return symmetric(w, 8)


def test_split_gives_back_the_weight_and_takes_the_largest_magnitudes():
    w = vision_like_weight(16, 96, 0)
    k = outlier_count(96, 0.03)
    dense, index, values = split(w, k)
    assert k == 3 and index.shape == values.shape == (16, k)
    rebuilt = dense.scatter_add(1, index, values)
    assert torch.allclose(rebuilt, w, atol=w.abs().max().item() / 127)  # exact up to the outliers' int8 rounding
    assert (dense.gather(1, index) == 0).all()
    kept = w.abs().scatter(1, index, 0.0).amax(1)
    assert (kept <= w.abs().gather(1, index).amin(1)).all()  # what stays dense is never larger than an outlier


def test_both_parts_are_symmetric_without_zero_points():
    _, _, values = split(vision_like_weight(8, 64, 1), 2)
    scale = values.abs().amax(1, keepdim=True) / 127
    steps = values / scale
    assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 127  # integers in [-127, 127]
    assert torch.equal(symmetric(-values), -symmetric(values))  # the grid is symmetric: no zero point


@pytest.mark.parametrize("target", sorted(GRIDS))
def test_dense_kernel_quantizes_with_less_error_on_each_target_grid(target):
    w = vision_like_weight(64, 256, 2)
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(3))
    dense, index, values = split(w, outlier_count(256, 0.01))
    err = lambda q: ((x @ (w - q).T) ** 2).sum().item()  # noqa: E731
    grid = GRIDS[target]
    w4_dasq = grid.round_to_nearest(dense, GROUP).scatter_add(1, index, values)
    assert err(w4_dasq) < 0.8 * err(grid.round_to_nearest(w, GROUP))
    w8_dasq = int8_per_channel(dense).scatter_add(1, index, values)
    assert err(w8_dasq) < 0.7 * err(int8_per_channel(w))


def test_outlier_split_linear_computes_the_split_weight():
    w = vision_like_weight(24, 48, 4)
    dense, index, values = split(w, 2)
    linear = torch.nn.Linear(48, 24)
    with torch.no_grad():
        linear.weight.copy_(dense)
    module = OutlierSplitLinear(linear, index, values)
    x = torch.randn(2, 5, 48)
    expected = torch.nn.functional.linear(x, dense.scatter_add(1, index, values), linear.bias)
    assert torch.allclose(module(x), expected, atol=1e-6)


def test_dasq_bundle_splits_the_vision_linears_and_verifies(tiny_ckpt, tmp_path, sample_image):
    b = compile_tiny(tiny_ckpt, tmp_path / "dasq", [{"name": "w8", "at": "vision", "method": "dasq", "outliers": 0.05}],
                     executorch={"text_prefill": False})  # the split is the vision encoder's
    parts = b.manifest["quantization"]["parts"]
    assert parts == {"vision": {"scheme": "w8", "weight_bits": 8, "method": "dasq", "outliers": 0.05}}
    rows = b.manifest["verification"]["results"]
    assert {r["target"] for r in rows} == {"onnx", "executorch"} and all(r["passed"] for r in rows)
    import onnx

    ops = {n.op_type for n in onnx.load(str(b.path / "vision_encoder.onnx")).graph.node}
    assert {"Gather", "MatMulInteger"} <= ops  # the outliers' gather beside the dynamically quantized dense products
    tokens = {rt: api.run(b.path, rt, sample_image, "what color is the circle ?", max_new_tokens=3)["tokens"]
              for rt in ("onnxruntime", "executorch")}
    assert tokens["onnxruntime"] == tokens["executorch"]


@pytest.mark.slow  # three targets, 4-bit (-m slow)
def test_dasq_w4_bundle_verifies_on_every_target(tiny_ckpt, tmp_path):
    b = compile_tiny(tiny_ckpt, tmp_path / "dasq4", [{"name": "w4", "at": "vision", "method": "dasq", "group_size": 32}],
                     targets=("onnx", "executorch", "coreml"), coreml={"minimum_deployment_target": "iOS18"})
    assert b.manifest["quantization"]["parts"]["vision"]["outliers"] == 0.01
    assert all(r["passed"] for r in b.manifest["verification"]["results"])


@pytest.mark.parametrize("passes, fragment", [
    ([{"name": "w8", "method": "dasq"}], "dasq is for the vision tower"),
    ([{"name": "w4", "at": "decoder", "method": "dasq"}], "dasq is for the vision tower"),
    ([{"name": "w8", "at": "vision", "outliers": 0.02}], "parameter 'outliers' applies to method dasq only"),
    ([{"name": "w8", "at": "vision", "method": "dasq", "outliers": 0.5}], "outliers"),
])
def test_bad_dasq_parameters_are_refused(tiny_ckpt, tmp_path, passes, fragment):
    with pytest.raises(VlmcError, match=fragment):
        api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "prompt_template": TEMPLATE, "passes": passes}, tmp_path / "b")
    assert not (tmp_path / "b").exists()
