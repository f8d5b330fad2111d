"""Every program of a bundle on each (device, runtime): the same logits and tokens as eager, and a profile."""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest

from vlmc import api
from vlmc.devices import resolve
from tests.helpers import SPACED_TEMPLATE

QUESTION = "what color is the circle ?"  # in the vocabularies of the tiny model and the built-in one


@pytest.fixture(scope="session")
def eager_reference(bundle, sample_image):
    """The eager model's (with the bundle's passes) first-token logits and greedy tokens on the sample question."""
    from vlmc.models_zoo.tokenizer import TextTokenizer
    from vlmc.runtimes.generate import generate, record
    from vlmc.runtimes.image import load_image

    p = bundle.manifest["prompt"]
    ids = TextTokenizer(bundle.path).prompt(p["template"], QUESTION, p["num_image_tokens"], p["image_token_id"], p["bos_token_id"])
    pixels = load_image(sample_image, p["image_size"], p.get("image_resize"))
    return ids, pixels, record(generate(api.session(bundle, "eager"), ids, pixels, 6, set(p["eos_token_ids"])), with_logits=True)


def test_programs_match_eager(device_runtime, bundle, devices_file, eager_reference):
    device_name, runtime = device_runtime
    ids, pixels, ref = eager_reference
    device = resolve(device_name, devices_file)
    out = device.generate(bundle, runtime, asdict(ids), pixels, 6, with_logits=True)
    got, want = np.asarray(out["first_logits"]), np.asarray(ref["first_logits"])
    assert np.abs(got - want).max() <= 1e-3 * max(1.0, np.abs(want).max()), f"{device_name}/{runtime} first-token logits differ from eager"
    assert out["tokens"] == ref["tokens"]
    assert out["timings"]["vision_ms"] > 0 and out["timings"]["prefill_ms"] > 0


def test_profile_schema(device_runtime, bundle, devices_file):
    device_name, runtime = device_runtime
    result = api.profile(bundle.path, runtime, warmup=1, iterations=3, new_tokens=3, device=device_name, devices_file=devices_file)
    assert result["device"] == device_name and result["runtime"] == runtime
    assert set(result["programs"]) == {"vision_encoder", "token_embedding", "text_decoder.prefill", "text_decoder.decode"}
    stages = result["stages"]
    assert stages["vision_encode_ms"] > 0 and stages["prefill_ms"] > 0 and stages["decode_tokens_per_s"] > 0
    assert stages["generation"]["new_tokens"] == 3
    assert result["artifact_bytes_total"] > 0
    if resolve(device_name, devices_file).config.kind == "qemu-aarch64":
        assert result["emulated"] and "not a cost signal" in result["note"]
    if device_name == "tvm-rpc-loopback":
        assert set(result["remote_programs"]) == {"vision_encoder", "token_embedding", "text_decoder"}
        assert "over RPC" in result["note"]
    else:
        assert result["memory"]["peak_rss_mb"] > 0


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_kernels_match_host(remote_kernels, precision, request, bundle, devices_file, sample_image):
    """The device's kernels give the host's numbers: onnxruntime's (ARM NEON and int8 dot products on
    qemu-aarch64) and TVM's code compiled for the device (its aarch64 library there; int8 and int4 codes
    unpacked in the quantized bundle). fp32 within the verify tolerance, int8 within the quantized bound,
    the same greedy tokens."""
    device, runtime = remote_kernels
    quantized = {"onnxruntime": "int8_bundle", "tvm": "tvm_quantized_bundle"}[runtime]
    chosen = bundle if precision == "fp32" else request.getfixturevalue(quantized)
    result = api.compare(chosen.path, runtime, sample_image, QUESTION, device, devices_file)
    assert result["quantized"] == (precision == "int8")
    assert result["logits"]["passed"], result["logits"]
    assert result["tokens"]["agree"] and result["agrees"]


def test_export_verifies_the_bundle_on_a_device_before_writing_it(qemu_sysroot, tiny_ckpt, tmp_path):
    """verify.devices: the unfinished bundle runs on qemu-aarch64 on each runtime it has there (onnxruntime's ARM
    kernels, TVM's aarch64 libraries) and its first-token logits join the manifest's checks against eager."""
    from device_tests.conftest import device_names

    if "qemu-aarch64" not in device_names():
        pytest.skip("qemu-aarch64 is not among $VLMC_DEVICE_TESTS")
    b = api.compile({"model": str(tiny_ckpt), "targets": ["onnx", "tvm"], "max_context": 48, "prompt_template": SPACED_TEMPLATE,
                     "tvm": {"architectures": ["host", "aarch64"]}, "verify": {"devices": ["qemu-aarch64"]}}, tmp_path / "b")
    rows = [r for r in b.manifest["verification"]["results"] if r["target"].endswith(" on qemu-aarch64")]
    assert sorted(r["target"] for r in rows) == ["onnxruntime on qemu-aarch64", "tvm on qemu-aarch64"]
    assert all(r["passed"] and r["max_abs_err"] < 1e-4 and r["check"] == "logits" for r in rows), rows
    assert "verify_on_devices" in b.manifest["metrics"]["steps_seconds"]
    assert b.manifest["recipe"]["verify"]["devices"] == ["qemu-aarch64"]


def test_devices_listing(devices_file):
    from vlmc.devices import check_all

    rows = {r["name"]: r for r in check_all(devices_file)}
    assert rows["local"]["ok"] and "onnxruntime" in rows["local"]["runtimes"]
    for name in rows:
        assert rows[name]["ok"], rows[name].get("error")
