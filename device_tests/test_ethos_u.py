"""ethos-u85: Vela's estimate of the vision encoder on the NPU, and the TOSA reference model's int8 numerics.

The estimates run under -m slow (Vela and the TOSA tools come from `vlmc devices setup ethos-u85`, and each
lowering takes about a minute); the refusals run by default."""
from __future__ import annotations

import pytest

from vlmc import api
from vlmc.devices import DeviceConfig, resolve
from vlmc.devices.ethos_u import EthosUDevice
from vlmc.errors import VlmcError

TEMPLATE = "USER : <image> {prompt} ASSISTANT :"


@pytest.fixture(scope="module")
def ethos_u():
    from vlmc.devices import ethos_u

    ethos_u.setup()
    return resolve("ethos-u85")


def onnx_bundle(ckpt, out, passes=()):
    return api.compile({"model": str(ckpt), "targets": ["onnx"], "max_context": 48, "prompt_template": TEMPLATE,
                        "passes": list(passes)}, out)


@pytest.mark.slow
def test_vision_encoder_estimate_and_int8_numerics(ethos_u, tiny_ckpt, tmp_path):
    bundle = onnx_bundle(tiny_ckpt, tmp_path / "tiny")
    result = ethos_u.profile(bundle, "executorch", 0, 1, False, 1, lambda m: None)
    assert result["estimate"] and "no NPU ran" in result["note"] and result["device"] == "ethos-u85"
    assert result["npu"]["config"] == "Ethos_U85_256"
    vision = result["programs"]["vision_encoder"]
    assert len(vision["partitions"]) == 1 and vision["cpu_ops"] == []
    p = vision["partitions"][0]
    assert p["npu_cycles"] > 0 and p["time_ms"] > 0 and p["macs"] > 0 and p["sram_kib"] > 0
    n = result["numerics"]
    assert n["checked"] and n["rel_err_vs_pytorch_int8"] < 0.2 and n["rel_err_vs_float"] < 0.2


@pytest.mark.slow
def test_a_pruned_encoder_lists_what_stays_on_the_cpu(ethos_u, tiny_ckpt, tmp_path):
    bundle = onnx_bundle(tiny_ckpt, tmp_path / "div", [{"name": "divprune", "keep": 8}])
    vision = ethos_u.profile(bundle, "executorch", 0, 1, False, 1, lambda m: None)["programs"]["vision_encoder"]
    assert vision["partitions"] and vision["npu_cycles"] > 0
    assert vision["cpu_ops"], "DivPrune's selection has ops the NPU does not run"


def test_refusals(tmp_path, monkeypatch):
    with pytest.raises(VlmcError, match="unknown npu 'ethos-u99'"):
        EthosUDevice(DeviceConfig("npu", "ethos-u85", {"npu": "ethos-u99"}))
    device = resolve("ethos-u85")
    with pytest.raises(VlmcError, match="not onnxruntime"):
        device.profile(None, "onnxruntime", 0, 1, False, 1, lambda m: None)
    with pytest.raises(VlmcError, match="nothing runs there"):
        device.generate(None, "executorch", {}, None, 1)
    monkeypatch.setenv("VLMC_CACHE", str(tmp_path))
    with pytest.raises(VlmcError, match="run `vlmc devices setup ethos-u85`"):
        device.check()
