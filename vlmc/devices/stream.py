"""The client side of vlmc.remote's protocol, over any command that starts it on a device (ssh, adb, qemu).

The command is an argument list, never a shell string. The bundle travels as a tar on the command's
stdin and is hash-checked on arrival; the client keeps stdin open while it waits, so killing the command
on a timeout (or losing the connection) ends the remote side too, which removes its copy.
"""
from __future__ import annotations

import io
import json
import queue
import subprocess
import tarfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from vlmc.bundle import Bundle
from vlmc.devices import Device
from vlmc.errors import VlmcError
from vlmc.remote import read_answer


def bundle_tar(bundle: Bundle, pixels: Optional[np.ndarray] = None) -> bytes:
    """The bundle's manifest and the files it lists (hash-checked here first), plus a run's input image."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(bundle.path / "manifest.json", arcname="bundle/manifest.json")
        for name in bundle.manifest["files"]:
            tar.add(bundle.file(name), arcname=f"bundle/{name}", recursive=True)
        if pixels is not None:
            data = io.BytesIO()
            np.save(data, pixels, allow_pickle=False)
            info = tarfile.TarInfo("inputs/pixels.npy")
            info.size = data.tell()
            data.seek(0)
            tar.addfile(info, data)
    return buf.getvalue()


def _reader(stream, q: queue.Queue) -> None:
    for line in iter(stream.readline, b""):
        q.put(line)
    q.put(None)


def call(argv: list[str], op: str, args: dict, payload: bytes, timeout_s: float, progress: Callable[[str], None],
         describe_failure: Callable[[int, str], str], work_dir: Optional[str] = None) -> dict:
    """Run `op` through the command `argv`; the result, or a VlmcError within `timeout_s`.

    `describe_failure(returncode, stderr)` turns a failed command (no answer) into the one-line error;
    `work_dir`: the remote folder the bundle is unpacked under (default: its temporary folder)."""
    header = {"op": op, "args": args, "bytes": len(payload), "timeout_s": timeout_s, **({"work_dir": work_dir} if work_dir else {})}
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise VlmcError(f"{argv[0]} is not installed here") from None
    lines: queue.Queue = queue.Queue()
    errors: list[bytes] = []
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    stderr_reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)
    stderr_reader.start()
    deadline = time.monotonic() + timeout_s

    def send():
        try:
            proc.stdin.write(json.dumps(header).encode() + b"\n")
            proc.stdin.write(payload)
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the command ended: its exit status and stderr say why

    threading.Thread(target=send, daemon=True).start()
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.05, deadline - time.monotonic()))
            except queue.Empty:
                raise VlmcError(f"the device did not answer within {timeout_s:g} s (stopped it; raise timeout_s for longer runs)") from None
            if line is None:
                try:
                    proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise VlmcError(f"the device did not answer within {timeout_s:g} s (stopped it)") from None
                stderr_reader.join(timeout=5)
                stderr = b"".join(errors).decode(errors="replace")
                raise VlmcError(describe_failure(proc.returncode, stderr))
            result = read_answer(line, progress)
            if result is not None:
                return result
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Close stdin (the remote side's signal to end) and make sure the command is gone."""
    try:
        proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class RemoteProcessDevice(Device):
    """A device reached by starting `python -m vlmc.remote` through a command (ssh, adb): subclasses say how
    (`remote_argv`), how its failures read (`describe_failure`) and what to check first (`ensure_ready`)."""

    timeout_s: float = 900.0
    probe_timeout_s: float = 60.0

    @property
    def remote_argv(self) -> list[str]:
        raise NotImplementedError

    def describe_failure(self, returncode: int, stderr: str) -> str:
        raise NotImplementedError

    def ensure_ready(self) -> None:
        """Checks that need no remote process (adb: the device is attached)."""

    @property
    def work_dir(self) -> Optional[str]:
        """Setting `work_dir`: where the device unpacks a bundle, a folder there (a board whose /tmp is a small
        RAM disk points it at its storage); its temporary folder by default."""
        return self.config.get("work_dir")

    def check(self) -> dict:
        self.ensure_ready()
        return call(self.remote_argv, "probe", {}, b"", self.probe_timeout_s, lambda m: None, self.describe_failure)

    def profile(self, bundle, runtime, warmup, iterations, ops, new_tokens, progress, curve=None):
        self.ensure_ready()
        args = {"runtime": runtime, "warmup": warmup, "iterations": iterations, "ops": ops, "new_tokens": new_tokens,
                **({"curve": curve} if curve else {})}
        progress(f"{self.name}: copying the bundle ({sum(e['bytes'] for e in bundle.manifest['files'].values()) / 2**20:.1f} MB)")
        result = call(self.remote_argv, "profile", args, bundle_tar(bundle), self.timeout_s, progress, self.describe_failure,
                      self.work_dir)
        result["device"] = self.name
        return result

    def generate(self, bundle, runtime, prompt, pixels, max_new_tokens, with_logits=False):
        self.ensure_ready()
        args = {"runtime": runtime, "prompt_ids": prompt, "max_new_tokens": max_new_tokens, "with_logits": with_logits}
        return call(self.remote_argv, "run", args, bundle_tar(bundle, pixels), self.timeout_s, lambda m: None, self.describe_failure,
                    self.work_dir)


def expand(path: Optional[str]) -> Optional[str]:
    return str(Path(path).expanduser()) if path else None
