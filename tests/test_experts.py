"""Quant Experts: float low-rank experts rebuild the 4-bit rounding error, a shared one for every token and
routed ones per input cluster; the router picks the nearest centre; the targets keep the experts float."""
import pytest
import torch

from tests.test_quant import TEMPLATE, compile_tiny, onnx_ops
from vlmc import api
from vlmc.errors import VlmcError
from vlmc.passes.quant.calibration import LayerInputs
from vlmc.passes.quant.experts import ErrorExperts, fit
from vlmc.passes.quant.gptq import GRIDS

GROUP = 32


def observed(x: torch.Tensor) -> LayerInputs:
    stats = LayerInputs.empty(x.shape[1], keep_rows=4096)
    stats.add(x, torch.ones(len(x), dtype=torch.bool))
    return stats


def clustered_inputs(n_per: int, dim: int, seed: int) -> torch.Tensor:
    """Four kinds of token, each spanning its own 12-dimensional subspace around its own mean."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for _ in range(4):
        basis = torch.linalg.qr(torch.randn(dim, 12, generator=g))[0]
        parts.append(2 * torch.randn(n_per, 12, generator=g) @ basis.T + 3 * torch.randn(dim, generator=g))
    x = torch.cat(parts)
    return x[torch.randperm(len(x), generator=g)]


def test_shared_expert_rebuilds_the_whole_error_at_full_rank():
    g = torch.Generator().manual_seed(0)
    w, x = 0.05 * torch.randn(24, 32, generator=g), torch.randn(256, 32, generator=g)
    q = GRIDS["onnx"].round_to_nearest(w, GROUP)
    experts = fit(w, q, observed(x), rank=24, experts=0)
    with torch.no_grad():
        assert torch.allclose(x @ q.T + experts(x), x @ w.T, atol=1e-5)


@pytest.mark.parametrize("target", sorted(GRIDS))
def test_routed_experts_beat_a_shared_expert_of_the_same_width_on_clustered_inputs(target):
    x = clustered_inputs(600, 128, 1)
    train, held_out = x[:1800], x[1800:]
    w = 0.05 * torch.randn(96, 128, generator=torch.Generator().manual_seed(2))
    q = GRIDS[target].round_to_nearest(w, GROUP)
    err = lambda experts: ((held_out @ q.T + experts(held_out) - held_out @ w.T) ** 2).sum().item()  # noqa: E731
    minmax = ((held_out @ (q - w).T) ** 2).sum().item()
    with torch.no_grad():
        shared_8 = err(fit(w, q, observed(train), rank=8, experts=0))
        shared_4_routed_4 = err(fit(w, q, observed(train), rank=4, experts=4))  # the same width per token
    assert shared_8 < 0.1 * minmax
    assert shared_4_routed_4 < 0.8 * shared_8


@pytest.mark.parametrize("target", sorted(GRIDS))
def test_experts_on_gptq_rounding_leave_less_error_than_on_round_to_nearest(target):
    """base_rounding gptq: GPTQ first, the experts rebuild what it left; the two compose."""
    from tests.test_gptq import correlated_inputs
    from vlmc.passes.quant.gptq import gptq

    x = correlated_inputs(2400, 128, 4)
    train, held_out = x[:1800], x[1800:]
    w = 0.05 * torch.randn(96, 128, generator=torch.Generator().manual_seed(2))
    stats, grid = observed(train), GRIDS[target]
    err = lambda q: ((held_out @ q.T + fit(w, q, stats, 8, 4)(held_out) - held_out @ w.T) ** 2).sum().item()  # noqa: E731
    with torch.no_grad():
        assert err(gptq(w, stats.hessian(None).float(), grid, GROUP)) < 0.9 * err(grid.round_to_nearest(w, GROUP))


def test_the_router_picks_each_tokens_nearest_centre():
    dim, out, rank = 6, 5, 2
    g = torch.Generator().manual_seed(3)
    centres = torch.eye(3, dim) * 10
    routed = [(torch.randn(out, rank, generator=g), torch.randn(rank, dim, generator=g)) for _ in range(3)]
    shared = (torch.zeros(out, rank), torch.zeros(rank, dim))
    module = ErrorExperts(shared, routed, centres)
    x = centres[[2, 0, 1, 2]] + 0.5 * torch.randn(4, dim, generator=g)
    with torch.no_grad():
        got = module(x)
    for row, c in zip(range(4), (2, 0, 1, 2)):
        up, down = routed[c]
        assert torch.allclose(got[row], up @ (down @ x[row]), atol=1e-5)


def test_calibration_keeps_a_uniform_sample_of_the_rows():
    stats = LayerInputs.empty(1, keep_rows=100)
    for batch in range(10):
        rows = torch.arange(batch * 100, (batch + 1) * 100, dtype=torch.float64)[:, None]
        stats.add(rows, torch.ones(100, dtype=torch.bool))
    kept = stats.sample()[:, 0]
    assert len(kept) == 100 and len(set(kept.tolist())) == 100
    assert 300 < kept.mean() < 700 and (kept >= 500).sum() > 25  # drawn from the whole stream, not its start


def test_experts_stay_float_on_onnx_and_the_bundle_verifies(tiny_ckpt, calibration_jsonl, tmp_path):
    b = compile_tiny(tiny_ckpt, tmp_path / "qe", [{"name": "w4", "at": "decoder", "method": "quant-experts", "group_size": 32}],
                     calibration_jsonl, targets=("onnx",))
    assert b.manifest["quantization"]["parts"]["decoder"] == {"scheme": "w4", "weight_bits": 4, "method": "quant-experts",
                                                             "group_size": 32, "rank": 8, "experts": 4,
                                                             "base_rounding": "nearest"}
    q = b.manifest["targets"]["onnx"]["programs"]["text_decoder"]["quantization"]
    assert "float experts fitted" in q["rounding"] and "MatMulNBits" in q["rounding"]
    ops = onnx_ops(b, "text_decoder")
    linears = ops["MatMulNBits"]
    assert linears == 2 * 7 + 1  # every decoder linear and the head are 4-bit ...
    kept = int(q["kept_float"].split()[0])  # ... and their experts and routers are not (linears fed the same
    assert 4 * linears <= kept <= 5 * linears  # input, q/k/v, get the same router: the ONNX optimizer keeps one)
    assert all(r["passed"] for r in b.manifest["verification"]["results"])


@pytest.mark.slow  # three targets with calibration (-m slow)
def test_quant_experts_bundle_verifies_on_every_target(tiny_ckpt, calibration_jsonl, sample_image, tmp_path):
    b = compile_tiny(tiny_ckpt, tmp_path / "qe3", [{"name": "w4", "method": "quant-experts", "group_size": 32, "rank": 4,
                                                    "experts": 2, "base_rounding": "gptq"}],
                     calibration_jsonl, targets=("onnx", "executorch", "coreml"), coreml={"minimum_deployment_target": "iOS18"})
    assert all(r["passed"] for r in b.manifest["verification"]["results"])
    for target in ("onnx", "executorch", "coreml"):
        rounding = b.manifest["targets"][target]["programs"]["text_decoder"]["quantization"]["rounding"]
        assert rounding.startswith("GPTQ on the") and "float experts" in rounding
    for target in ("onnx", "coreml"):  # torchao (ExecuTorch) quantizes nn.Linear modules only: the experts are not
        assert "Quant Experts" in b.manifest["targets"][target]["programs"]["text_decoder"]["quantization"]["kept_float"]
    tokens = {rt: api.run(b.path, rt, sample_image, "what color is the circle ?", max_new_tokens=3)["tokens"]
              for rt in ("onnxruntime", "executorch")}
    assert tokens["onnxruntime"] == tokens["executorch"]


@pytest.mark.parametrize("passes, fragment", [
    ([{"name": "w8", "method": "quant-experts"}], "quant-experts is for 4-bit weights"),
    ([{"name": "w4", "method": "gptq", "experts": 2}], "parameter 'experts' applies to method quant-experts only"),
    ([{"name": "w4", "method": "quant-experts", "rank": 0}], "rank"),
    ([{"name": "w4", "method": "quant-experts", "experts": 40}], "experts"),
    ([{"name": "w4", "method": "gptq", "base_rounding": "gptq"}], "parameter 'base_rounding' applies to method quant-experts"),
])
def test_bad_quant_experts_parameters_are_refused(tiny_ckpt, tmp_path, passes, fragment):
    with pytest.raises(VlmcError, match=fragment):
        api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "prompt_template": TEMPLATE, "passes": passes}, tmp_path / "b")
    assert not (tmp_path / "b").exists()
