"""Devices: where a bundle's programs run and are profiled.

A device is named by a URL or by a name in the devices file (`--devices FILE`, $VLMC_DEVICES, or
~/.config/vlmc/devices.yaml):

  local                         this machine (the default)
  ssh://user@host[:port]        a board or server reached with OpenSSH; vlmc and a runtime installed there
  adb://SERIAL                  an Android device through adb, with a Python that has vlmc (e.g. Termux)
  qemu-aarch64                  an emulated ARM64 Linux user space (numerics of the ARM kernels, not timings)
  tvm-rpc://host:port/key       TVM's RPC tracker: a server registered under `key` runs the TVM libraries
  ethos-u85                     an estimate: the vision encoder lowered for Arm's Ethos-U85 NPU, Vela's cycles

Every device answers the same `profile` schema as a local run, with `device` naming it.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlsplit

import yaml

from vlmc.bundle import Bundle
from vlmc.errors import VlmcError, yaml_problem

DEFAULT_CONFIG = Path("~/.config/vlmc/devices.yaml")
KINDS = ("local", "ssh", "adb", "qemu-aarch64", "tvm-rpc", "ethos-u85")
CONFIG_FIELDS = {"url", "identity_file", "known_hosts", "python", "timeout_s", "connect_timeout_s", "work_dir", "arch", "sysroot",
                 "cpu", "npu", "system_config", "memory_mode"}


@dataclass
class DeviceConfig:
    """One device: its URL and the settings its kind reads (unset ones take the kind's defaults)."""

    name: str
    url: str
    settings: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        if self.url in ("local", "qemu-aarch64", "ethos-u85"):
            return self.url
        scheme = urlsplit(self.url).scheme
        if scheme not in KINDS:
            raise VlmcError(f"device {self.name}: unknown kind in {self.url!r} (local, ssh://user@host[:port], adb://SERIAL, "
                            "qemu-aarch64, tvm-rpc://host:port/key, ethos-u85)")
        return scheme

    def get(self, key: str, default=None):
        return self.settings.get(key, default)


class Device(ABC):
    """Runs a bundle's programs somewhere and brings back results in the local schema."""

    is_local = False

    def __init__(self, config: DeviceConfig):
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    @abstractmethod
    def check(self) -> dict:
        """Reach the device and say what it is: machine, runtimes; a VlmcError when it cannot be used."""

    @abstractmethod
    def profile(self, bundle: Bundle, runtime: str, warmup: int, iterations: int, ops: bool, new_tokens: int,
                progress: Callable[[str], None], curve: Optional[list[int]] = None) -> dict:
        """The profile schema of `vlmc profile`, measured on the device (with `curve`, the prefill latency at
        those image token counts)."""

    def generate(self, bundle: Bundle, runtime: str, prompt: dict, pixels, max_new_tokens: int, with_logits: bool = False) -> dict:
        """Greedy generation on the device: tokens and stage timings (and the first token's logits)."""
        raise VlmcError(f"device {self.name} ({self.config.kind}) profiles only; vlmc run needs a device that runs vlmc")


class LocalDevice(Device):
    is_local = True

    def check(self) -> dict:
        from vlmc.remote import probe

        return probe()

    def profile(self, bundle, runtime, warmup, iterations, ops, new_tokens, progress, curve=None):
        from vlmc.runtimes.profile import profile

        return profile(str(bundle.path), runtime, warmup, iterations, ops, new_tokens, progress, curve)

    def generate(self, bundle, runtime, prompt, pixels, max_new_tokens, with_logits=False):
        from vlmc.runtimes.generate import generate_on

        return generate_on(str(bundle.path), runtime, prompt, pixels, max_new_tokens, with_logits)


def config_path(path: Optional[str] = None) -> Path:
    return Path(path or os.environ.get("VLMC_DEVICES") or DEFAULT_CONFIG).expanduser()


def load_config(path: Optional[str] = None) -> dict[str, DeviceConfig]:
    """The devices file: `devices: {name: {url: ..., settings...}}`; no file means no named devices."""
    p = config_path(path)
    if not p.is_file():
        if path or os.environ.get("VLMC_DEVICES"):
            raise VlmcError(f"devices file {p}: no such file")
        return {}
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise VlmcError(f"devices file {p}: {yaml_problem(e)}") from None
    devices = data.get("devices") if isinstance(data, dict) else None
    if not isinstance(devices, dict):
        raise VlmcError(f"devices file {p}: expected a mapping 'devices: {{name: {{url: ...}}}}'")
    out = {}
    for name, entry in devices.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
            raise VlmcError(f"devices file {p}: device {name!r} needs a url")
        unknown = set(entry) - CONFIG_FIELDS
        if unknown:
            raise VlmcError(f"devices file {p}: device {name!r}: unknown field {sorted(unknown)[0]!r} "
                            f"(known: {', '.join(sorted(CONFIG_FIELDS))})")
        config = DeviceConfig(str(name), entry["url"], {k: v for k, v in entry.items() if k != "url"})
        config.kind  # noqa: B018  (refuses an unknown kind now, naming the device)
        out[str(name)] = config
    return out


def resolve(spec: Optional[str] = None, config_file: Optional[str] = None) -> Device:
    """A device from a configured name or a URL; None or 'local' is this machine."""
    if spec in (None, "", "local"):
        return LocalDevice(DeviceConfig("local", "local"))
    configured = load_config(config_file)
    config = configured.get(spec) or DeviceConfig(spec, spec)
    kind = config.kind
    if kind == "ssh":
        from vlmc.devices.ssh import SshDevice

        return SshDevice(config)
    if kind == "adb":
        from vlmc.devices.adb import AdbDevice

        return AdbDevice(config)
    if kind == "qemu-aarch64":
        from vlmc.devices.qemu import QemuDevice

        return QemuDevice(config)
    if kind == "tvm-rpc":
        from vlmc.devices.tvm_rpc import TvmRpcDevice

        return TvmRpcDevice(config)
    if kind == "ethos-u85":
        from vlmc.devices.ethos_u import EthosUDevice

        return EthosUDevice(config)
    return LocalDevice(config)


def check_all(config_file: Optional[str] = None) -> list[dict]:
    """Every configured device (and local) checked: reachable, what it is, which runtimes it has."""
    rows = []
    for name in ["local", *load_config(config_file)]:
        device = resolve(name, config_file)
        try:
            rows.append({"name": name, "url": device.config.url, "ok": True, **device.check()})
        except VlmcError as e:
            rows.append({"name": name, "url": device.config.url, "ok": False, "error": str(e)})
    return rows
