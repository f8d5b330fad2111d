"""SmoothQuant and MASQuant: the smoothed float model computes what the original did (exactly, or up to
MASQuant's low-rank correction on the image rows); the activations it hands the quantizer are flatter;
bundles verify on onnxruntime and ExecuTorch; bad parameters are refused."""
import numpy as np
import pytest
import torch

from tests.test_quant import TEMPLATE, compile_tiny, onnx_ops, tiny_calibration
from vlmc import api
from vlmc.errors import VlmcError
from vlmc.passes.quant import smoothing


@pytest.fixture(scope="module")
def calibrated(tiny_ckpt, calibration_jsonl):
    """(model, calibration, its image rows) for the tiny checkpoint."""
    p, cal = tiny_calibration(tiny_ckpt, calibration_jsonl)
    return p.loaded.model, cal, smoothing.image_rows(cal.visual_rows)


def smoothed(model, cal, rows, method, rank=None):
    from vlmc.passes.quant import W8A8
    from vlmc.passes.quant.calibration import layer_inputs

    scheme = W8A8(W8A8.Config(at="all", method=method, rank=rank))
    schemes = {"vision": scheme, "decoder": scheme}
    layers = [(name, lin) for part in schemes for _, _, consumers in model.norm_consumers(part) for name, lin in consumers[:1]]
    return smoothing.apply(model, schemes, layer_inputs(model, layers, cal), rows)


def logits(model, cal, question: int = 0):
    calls = cal.decoder_calls[question]
    embeds = torch.from_numpy(np.concatenate([e for e, _ in calls], axis=1))
    with torch.no_grad():
        vision = model.encode_image(model.normalize(torch.from_numpy(cal.images[question])[None].float()))
        out, _ = model.decode(embeds, torch.arange(embeds.shape[1])[None], None)
    return vision, out


def test_smoothquant_leaves_the_float_model_unchanged(calibrated):
    model, cal, rows = calibrated
    ref_vision, ref = logits(model, cal)
    vision, out = logits(smoothed(model, cal, rows, "smoothquant"), cal)
    assert torch.allclose(vision, ref_vision, atol=1e-4) and torch.allclose(out, ref, atol=1e-4)


def test_masquant_is_exact_on_text_rows_and_at_full_rank(calibrated):
    model, cal, rows = calibrated
    _, ref = logits(model, cal)
    a, b = rows
    _, low = logits(smoothed(model, cal, rows, "masquant", rank=2), cal)
    # rows before the image never see an image row: the text weights are exact for them
    assert torch.allclose(low[:, :a], ref[:, :a], atol=1e-4)
    assert not torch.allclose(low[:, a:b], ref[:, a:b], atol=1e-4)  # rank 2 approximates the image rows' correction
    width = model.config.text.hidden_size
    _, full = logits(smoothed(model, cal, rows, "masquant", rank=width), cal)
    assert torch.allclose(full, ref, atol=1e-3)


def test_masquant_divides_each_modality_by_its_own_factors(calibrated):
    model, cal, rows = calibrated
    m = smoothed(model, cal, rows, "masquant")
    norm = m.language_model.layers[0].input_layernorm
    assert isinstance(norm, smoothing.ModalityRMSNorm)
    assert not torch.allclose(norm.visual_weight, norm.text_weight)
    assert isinstance(m.language_model.layers[0].self_attn.q_proj, smoothing.CompensatedLinear)
    m.row_positions = torch.arange(rows[1] + 3)[None]
    visual = norm.rows.visual()[0, :, 0] > 0
    m.row_positions = None
    assert visual.tolist() == [rows[0] <= i < rows[1] for i in range(rows[1] + 3)]


def test_smoothing_flattens_the_channel_ranges_the_quantizer_sees():
    x = torch.randn(500, 32, dtype=torch.float64) * torch.logspace(0, 2, 32, dtype=torch.float64)  # outlier channels
    w = torch.randn(16, 32)
    s = smoothing.factors(x.abs().amax(0), [w], 0.5)
    spread = lambda t: (t.abs().amax(0).max() / t.abs().amax(0).min()).item()  # noqa: E731
    assert spread(x / s) < spread(x) / 5
    assert torch.allclose((x / s) @ (w.double() * s).T, x @ w.double().T)  # the product is unchanged


def test_low_rank_correction_fits_best_where_the_inputs_are():
    """Whitened SVD: for inputs living mostly in a few directions, rank r matches the true product far better
    than the plain SVD of the weight difference does."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))[0]
    x = torch.randn(1000, 32, generator=g, dtype=torch.float64) * torch.logspace(1, -2, 32, dtype=torch.float64) @ basis.T
    delta = torch.randn(24, 32, generator=g, dtype=torch.float64)
    up, down = smoothing.low_rank(delta, x.T @ x / len(x), 4)
    u, sv, vh = torch.linalg.svd(delta)
    plain = (u[:, :4] * sv[:4]) @ vh[:4]
    err = lambda approx: ((x @ (delta - approx).T) ** 2).mean().item()  # noqa: E731
    assert err(up @ down) < 0.5 * err(plain)


@pytest.mark.slow  # exports on three targets with calibration (-m slow)
def test_masquant_bundle_verifies_on_both_runtimes(tiny_ckpt, calibration_jsonl, sample_image, tmp_path):
    b = compile_tiny(tiny_ckpt, tmp_path / "mas", [{"name": "w8a8", "method": "masquant", "rank": 4}], calibration_jsonl,
                     targets=("onnx", "executorch", "coreml"))
    m = b.manifest
    decoder = m["quantization"]["parts"]["decoder"]
    assert decoder["method"] == "masquant" and decoder["rank"] == 4 and decoder["alpha"] == 0.5
    rows = m["verification"]["results"]
    assert rows and all(r["passed"] for r in rows)
    # the correction's small linears are part of the graph and quantized with the rest
    assert onnx_ops(b, "text_decoder")["QuantizeLinear"] > 0
    for runtime in ("onnxruntime", "executorch"):
        assert api.run(b.path, runtime, sample_image, "what color is the circle ?", max_new_tokens=2)["tokens"]


@pytest.mark.parametrize("passes, template, fragment", [
    ([{"name": "w4", "method": "masquant"}], TEMPLATE, "parameter 'method': masquant is for w8a8"),
    ([{"name": "w8a8", "method": "smoothquant", "rank": 4}], TEMPLATE, "parameter 'rank' applies to method masquant only"),
    ([{"name": "w8a8", "alpha": 0.3}], TEMPLATE, "parameter 'alpha' applies to method smoothquant / masquant only"),
    ([{"name": "w8a8", "method": "masquant"}], "USER : {prompt} <image> ASSISTANT :", "needs the image at a fixed position"),
])
def test_bad_smoothing_is_refused(tiny_ckpt, calibration_jsonl, tmp_path, passes, template, fragment):
    with pytest.raises(VlmcError, match=fragment):
        api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "prompt_template": template, "passes": passes,
                     "calibration": {"dataset": str(calibration_jsonl), "n": 8}}, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_masquant_protects_the_text_rows_where_smoothquant_over_smooths_them():
    """MASQuant's claim, on a layer whose image rows have outlier channels the text rows lack: with one
    per-tensor int8 activation scale, shared factors leave the text rows far more error than per-modality
    factors with the low-rank correction for the image rows (simulated int8: per-tensor activations,
    per-channel weights, as the targets quantize)."""
    def int8_tensor(x):
        s = x.abs().max() / 127
        return torch.round(x / s).clamp(-127, 127) * s

    def int8_rows(w):
        s = w.abs().amax(1, keepdim=True) / 127
        return torch.round(w / s).clamp(-127, 127) * s

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g, dtype=torch.float64)
    image = torch.randn(2000, 64, generator=g, dtype=torch.float64)
    image[:, :4] *= 60  # the image rows' outlier channels
    text = torch.randn(200, 64, generator=g, dtype=torch.float64) * 0.5
    rel = lambda out, x: (((out - x @ w.T) ** 2).mean() / ((x @ w.T) ** 2).mean()).item()  # noqa: E731

    both = torch.cat([image, text])
    s = smoothing.factors(both.abs().amax(0), [w], 0.5)
    shared = int8_tensor(both / s) @ int8_rows(w * s).T

    s_v, s_t = smoothing.factors(image.abs().amax(0), [w], 0.5), smoothing.factors(text.abs().amax(0), [w], 0.5)
    smoothed = int8_tensor(torch.cat([image / s_v, text / s_t]))
    up, down = smoothing.low_rank(w * (s_v - s_t)[None], (image / s_v).T @ (image / s_v) / len(image), 8)
    aware = smoothed @ int8_rows(w * s_t).T
    aware[:2000] += smoothed[:2000] @ down.T @ up.T

    assert rel(aware[2000:], text) < rel(shared[2000:], text) / 5  # text rows: 0.8% vs 6.7%
    assert rel(aware[:2000], image) < 1e-3  # the image rows stay accurate through the correction
