"""The int8 KV cache (`kv8`): keys and values stored as int8 codes with a float scale per head and slot,
on every target; attention reads the dequantized cache."""
import pytest
import torch

from tests.helpers import SPACED_TEMPLATE, assert_export_refused, assert_verified_with_the_same_tokens
from vlmc import api, passes
from vlmc.errors import VlmcError
from vlmc.models_zoo import load
from vlmc.models_zoo.programs import ExecuTorchDecoder, StaticCacheDecoder, empty_caches, quantize_rows
from vlmc.runtimes.base import DecoderShape

KV8 = {"name": "kv8"}


def test_rows_quantize_symmetrically_with_their_absmax_on_the_grid_edge():
    x = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.01, 1.0, 50.0])[None, :, None, None]
    codes, scale = quantize_rows(x)
    assert torch.equal(codes, codes.round()) and codes.abs().max() <= 127
    assert torch.equal(codes.abs().amax(-1), torch.full((2, 3, 5), 127.0))  # each row's largest entry maps to +-127
    torch.testing.assert_close(scale[..., 0], x.abs().amax(-1) / 127)
    assert bool(((codes * scale - x).abs() <= scale / 2 + 1e-7).all())  # round to nearest


@pytest.fixture(scope="module")
def models(tiny_ckpt):
    ref = load(str(tiny_ckpt)).model.eval()
    m = load(str(tiny_ckpt)).model.eval()
    records, _ = passes.apply(m, [KV8])
    return ref, m, records


def test_the_cache_holds_the_quantized_rows_and_decoding_stays_close_to_float(models):
    ref, m, records = models
    assert m.kv_cache == "int8" and records[0]["name"] == "kv8" and records[0]["tokens_out"] == 16
    g = torch.Generator().manual_seed(1)
    embeds, pos = torch.randn(1, 10, 64, generator=g), torch.arange(10)
    with torch.no_grad():
        out = StaticCacheDecoder(m, 32)(embeds, pos[None], pos, torch.tensor([9]), empty_caches(m, 32))
        logits, past = ref.decode(embeds, pos[None], None)
    caches = out[1:]
    assert [c.dtype for c in caches[:4]] == [torch.int8, torch.int8, torch.float32, torch.float32]
    assert caches[0].shape == (1, 2, 32, 16) and caches[2].shape == (1, 2, 32, 1)
    for layer in range(2):  # slots 0..9: the float cache's rows, quantized; the rest untouched zeros
        k, v, k_scale, v_scale = caches[4 * layer: 4 * layer + 4]
        for codes, scale, full in ((k, k_scale, past[layer][0]), (v, v_scale, past[layer][1])):
            expected_codes, expected_scale = quantize_rows(full)
            assert (codes[:, :, :10].float() - expected_codes).abs().max() <= 1  # the rows came through a quantized layer 0
            assert not codes[:, :, 10:].any()
            torch.testing.assert_close(scale[:, :, :10], expected_scale, rtol=0.05, atol=1e-6)
    rel = float((out[0][0] - logits[0, -1]).norm() / logits[0, -1].norm())
    assert 0 < rel < 0.01


def test_executorchs_int8_buffers_give_the_static_forms_logits(models):
    _, m, _ = models
    g = torch.Generator().manual_seed(2)
    embeds, pos = torch.randn(1, 10, 64, generator=g), torch.arange(10)
    with torch.no_grad():
        static = StaticCacheDecoder(m, 32)
        out = static(embeds, pos[None], pos, torch.tensor([9]), empty_caches(m, 32))
        et = ExecuTorchDecoder(m, 32)
        torch.testing.assert_close(et(embeds, torch.tensor([0]))[0], out[0][0], atol=1e-5, rtol=1e-5)
        assert et.k_cache_0.dtype == torch.int8 and torch.equal(et.k_cache_0.transpose(1, 2), out[1])
        caches = list(out[1:])
        for p in (10, 11, 12):
            nxt = torch.randn(1, 1, 64, generator=g)
            got, *caches = static(nxt, torch.tensor([[p]]), torch.tensor([p]), torch.tensor([0]), caches)
            torch.testing.assert_close(et(nxt, torch.tensor([p]))[0], got[0], atol=1e-5, rtol=1e-5)


def test_kv8_exports_to_onnx_verifies_and_stores_a_quarter_of_the_cache(tiny_ckpt, tmp_path, sample_image):
    spec = {"model": str(tiny_ckpt), "targets": ["onnx"], "max_context": 48, "prompt_template": SPACED_TEMPLATE}
    b = api.compile({**spec, "passes": [KV8]}, tmp_path / "kv8")
    m = b.manifest
    kv = m["decoder"]["kv_cache"]
    float_bytes = DecoderShape.from_manifest({**m, "decoder": {**m["decoder"], "kv_cache": {}}}).cache_bytes()
    assert kv["dtype"] == "int8" and float_bytes == 2 * 2 * 2 * 48 * 16 * 4  # layers x (k, v) x heads x slots x dim x 4
    assert kv["bytes"] == float_bytes // 4 + 2 * 2 * 2 * 48 * 4  # int8 codes + one float scale per head and slot
    inputs = {i["name"]: i["dtype"] for i in m["targets"]["onnx"]["programs"]["text_decoder"]["inputs"]}
    assert inputs["k_cache_0"] == "int8" and inputs["k_scale_0"] == "float32"
    assert_verified_with_the_same_tokens(b, sample_image)


@pytest.mark.slow  # three targets (-m slow)
def test_kv8_with_an_in_llm_pass_verifies_on_every_target_with_the_same_tokens(tiny_ckpt, tmp_path, sample_image):
    b = api.compile({"model": str(tiny_ckpt), "targets": ["onnx", "executorch", "coreml"], "max_context": 48,
                     "prompt_template": SPACED_TEMPLATE, "coreml": {"minimum_deployment_target": "iOS26"},
                     "passes": [KV8, {"name": "fastv", "keep": 8, "at": "decoder.layer[0]"}]}, tmp_path / "kv3")
    inputs = {i["name"]: i["dtype"] for i in b.manifest["targets"]["coreml"]["programs"]["text_decoder"]["inputs"]}
    assert inputs["v_cache_1"] == "int8"
    assert_verified_with_the_same_tokens(b, sample_image, ("eager", "onnxruntime", "executorch"))


@pytest.mark.slow  # a TVM build (-m slow)
def test_kv8_builds_with_tvm_and_gives_eagers_tokens(tiny_ckpt, tmp_path, sample_image):
    b = api.compile({"model": str(tiny_ckpt), "targets": ["tvm"], "max_context": 48, "prompt_template": SPACED_TEMPLATE,
                     "passes": [KV8]}, tmp_path / "kvt")
    assert_verified_with_the_same_tokens(b, sample_image, ("eager", "tvm"))


def test_one_kv_cache_pass_only(tiny_ckpt, tmp_path):
    assert_export_refused(tiny_ckpt, tmp_path / "b", [KV8, KV8], "the KV cache has one storage", SPACED_TEMPLATE)


def test_core_ml_below_ios26_takes_no_int8_cache(tiny_ckpt, tmp_path):
    with pytest.raises(VlmcError, match="pass kv8: Core ML takes int8 model inputs and outputs .* iOS26 / macOS26 "
                                        "\\(the recipe has iOS17\\)"):
        api.compile({"model": str(tiny_ckpt), "targets": ["coreml"], "passes": [KV8]}, tmp_path / "c")
    assert not (tmp_path / "c").exists()
