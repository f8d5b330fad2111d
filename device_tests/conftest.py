"""The device suite: every program of a bundle runs on each (runtime, device), matches eager, and profiles.

Devices come from $VLMC_DEVICE_TESTS (comma-separated; default
`local,ssh-loopback,qemu-aarch64,tvm-rpc-loopback`): each entry is `local`, a name from the devices file
($VLMC_DEVICES), a device URL, or one of the devices this suite starts itself: `ssh-loopback` (a real
sshd on 127.0.0.1 with throwaway keys), `qemu-aarch64` (the emulated ARM64 user space, set up into the
cache on first use) and `tvm-rpc-loopback` (TVM's RPC tracker and a server). Point it at a board:

    VLMC_DEVICES=~/devices.yaml VLMC_DEVICE_TESTS=pi5,phone python -m pytest device_tests
"""
from __future__ import annotations

import os
import shutil

import pytest

from device_tests.loopback import SSHD, Sshd, TvmRpc
from tests.helpers import SPACED_TEMPLATE

LOOPBACK = ("ssh-loopback", "tvm-rpc-loopback")
RUNTIMES = {"local": ("onnxruntime", "executorch", "tvm"), "ssh": ("onnxruntime", "executorch", "tvm"),
            "adb": ("onnxruntime", "executorch"), "qemu-aarch64": ("onnxruntime", "tvm"), "tvm-rpc": ("tvm",)}


def device_names() -> list[str]:
    return [d.strip() for d in os.environ.get("VLMC_DEVICE_TESTS", "local,ssh-loopback,qemu-aarch64,tvm-rpc-loopback").split(",") if d.strip()]


def kind_of(name: str) -> str:
    if name in LOOPBACK:
        return name.removesuffix("-loopback")
    from vlmc.devices import load_config, resolve

    return (load_config().get(name) or resolve(name).config).kind


def pytest_generate_tests(metafunc):
    if "device_runtime" in metafunc.fixturenames:
        pairs = [(d, r) for d in device_names() for r in RUNTIMES[kind_of(d)]]
        metafunc.parametrize("device_runtime", pairs, ids=[f"{d}-{r}" for d, r in pairs])
    if "remote_kernels" in metafunc.fixturenames:  # devices other than this host, with each runtime they run
        pairs = [(d, r) for d in device_names() if kind_of(d) != "local" for r in ("onnxruntime", "tvm") if r in RUNTIMES[kind_of(d)]]
        metafunc.parametrize("remote_kernels", pairs, ids=[f"{d}-{r}" for d, r in pairs])


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    if not os.path.exists(SSHD) or shutil.which("ssh") is None:
        pytest.fail(f"the ssh device tests need OpenSSH's server and client ({SSHD}, ssh): apt-get install openssh-server")
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tvm_rpc(tmp_path_factory):
    server = TvmRpc(tmp_path_factory.mktemp("tvm_rpc"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def qemu_sysroot():
    """The emulated ARM64 user space, fetched into the cache once ($VLMC_CACHE or ~/.cache/vlmc)."""
    from vlmc.devices.qemu import default_sysroot, qemu_binary, setup

    if qemu_binary() is None:
        pytest.fail("the qemu-aarch64 device tests need qemu's user-mode emulator: apt-get install qemu-user")
    setup()
    return default_sysroot()


@pytest.fixture(scope="session")
def devices_file(tmp_path_factory, request):
    """A devices file naming the loopback devices this session uses (started on first use)."""
    import yaml

    entries = {}
    names = device_names()
    if "ssh-loopback" in names:
        server = request.getfixturevalue("sshd")
        entries["ssh-loopback"] = {"url": server.url(), **server.settings(timeout_s=600)}
    if "qemu-aarch64" in names:
        request.getfixturevalue("qemu_sysroot")
    if "tvm-rpc-loopback" in names:
        entries["tvm-rpc-loopback"] = {"url": request.getfixturevalue("tvm_rpc").url()}
    user_file = os.environ.get("VLMC_DEVICES")
    if user_file:
        entries.update(yaml.safe_load(open(os.path.expanduser(user_file)))["devices"])
    path = tmp_path_factory.mktemp("devices") / "devices.yaml"
    path.write_text(yaml.safe_dump({"devices": entries}))
    return str(path)


@pytest.fixture(scope="session")
def bundle(pruned_every_target):
    """The tiny model with DivPrune on onnx, executorch, coreml and tvm (the session's shared bundle)."""
    return pruned_every_target


@pytest.fixture(scope="session")
def int8_bundle(tmp_path_factory, tiny_ckpt, calibration_jsonl):
    """The tiny model quantized w8a8 on onnx: the int8 kernels of each device against the host's."""
    from vlmc import api

    return api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "max_context": 48, "prompt_template": SPACED_TEMPLATE,
                        "passes": [{"name": "w8a8"}], "calibration": {"dataset": str(calibration_jsonl), "n": 8}},
                       tmp_path_factory.mktemp("device_bundle") / "w8a8")


@pytest.fixture(scope="session")
def tvm_quantized_bundle(tmp_path_factory, tiny_ckpt, calibration_jsonl):
    """The tiny model on TVM, host and aarch64, w8a8 vision and w4 decoder: int8 and int4 codes unpacked by
    the device's compiled code against the host's."""
    from vlmc import api

    return api.compile({"model": str(tiny_ckpt), "targets": ["tvm"], "max_context": 48, "prompt_template": SPACED_TEMPLATE,
                        "tvm": {"architectures": ["host", "aarch64"]}, "calibration": {"dataset": str(calibration_jsonl), "n": 8},
                        "passes": [{"name": "w8a8", "at": "vision"}, {"name": "w4", "at": "decoder", "group_size": 16}]},
                       tmp_path_factory.mktemp("device_bundle") / "tvm_w8a8_w4")


@pytest.fixture(scope="session")
def sample_image(tmp_path_factory):
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "img.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(path)
    return path
