"""adb://SERIAL: an Android device through adb, running `python -m vlmc.remote` in a Python there.

Android has no system Python: install one with vlmc and a runtime (Termux: pkg install python, then
pip install vlmc onnxruntime) and name it in the device's `python` setting. The bundle travels on the
shell's stdin (adb's shell protocol, no pty) exactly as over ssh.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
from urllib.parse import urlsplit

from vlmc.devices import DeviceConfig
from vlmc.devices.stream import RemoteProcessDevice
from vlmc.errors import VlmcError

TERMUX_PYTHON = "/data/data/com.termux/files/usr/bin/python"


class AdbDevice(RemoteProcessDevice):
    def __init__(self, config: DeviceConfig):
        super().__init__(config)
        self.serial = urlsplit(config.url).netloc
        if not self.serial:
            raise VlmcError(f"device {config.name}: {config.url!r} names no serial (adb://SERIAL, as `adb devices` lists it)")
        self.python = config.get("python", TERMUX_PYTHON)
        self.timeout_s = float(config.get("timeout_s", 900))

    def ensure_ready(self) -> None:
        """adb is installed and the device is attached and authorised, or a clear error."""
        if shutil.which("adb") is None:
            raise VlmcError(f"adb://{self.serial}: adb is not installed (Android platform tools: apt-get install adb)")
        try:
            state = subprocess.run(["adb", "-s", self.serial, "get-state"], capture_output=True, text=True, timeout=15)
        except subprocess.TimeoutExpired:
            raise VlmcError(f"adb://{self.serial}: adb did not answer within 15 s") from None
        if state.returncode != 0 or state.stdout.strip() != "device":
            listed = subprocess.run(["adb", "devices"], capture_output=True, text=True, timeout=15).stdout.splitlines()[1:]
            attached = ", ".join(line.split()[0] for line in listed if line.strip()) or "none"
            detail = (state.stderr or state.stdout).strip().splitlines()
            raise VlmcError(f"adb://{self.serial}: not attached or not authorised ({detail[-1] if detail else state.stdout.strip()}); "
                            f"attached: {attached}")

    @property
    def remote_argv(self) -> list[str]:
        return ["adb", "-s", self.serial, "shell", "-T", shlex.join([self.python, "-m", "vlmc.remote"])]

    def describe_failure(self, returncode: int, stderr: str) -> str:
        if "not found" in stderr or "No such file" in stderr:
            return f"adb://{self.serial}: no Python at {self.python} on the device (set the device's `python`)"
        if "No module named" in stderr:
            return f"adb://{self.serial}: the device's Python has no vlmc (pip install vlmc and a runtime there)"
        last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {returncode}"
        return f"adb://{self.serial}: the run on the device failed: {last}"
