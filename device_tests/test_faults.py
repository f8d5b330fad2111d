"""Faults on the way to a device: each a clear one-line error within a bounded time, nothing left running
on either side, no copy of the bundle left on the remote."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vlmc.devices import DeviceConfig, resolve
from vlmc.devices.qemu import QemuDevice
from vlmc.devices.ssh import SshDevice
from vlmc.errors import VlmcError

from device_tests.loopback import free_port, keygen


def remote_leftovers(work_dir: Path) -> tuple[list[str], str]:
    """Copies of bundles left in the remote's work folder, and vlmc.remote processes this test started still
    running (descendants of this process: the loopback sshd's sessions, the emulator). Other workers' runs on
    the same host, with folders and processes of their own, are none of this test's business."""
    folders = sorted(str(p) for p in Path(work_dir).glob("vlmc-remote-*"))
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])

    def ours(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    running = []
    for pid in filter(ours, parents):
        try:
            command = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "vlmc.remote" in command:
            running.append(f"{pid} {command.strip()}")
    return folders, "\n".join(running)


def ssh_device(sshd, **settings) -> SshDevice:
    """The loopback sshd as a device; pass `work_dir` to check for leftovers there."""
    return SshDevice(DeviceConfig("board", settings.pop("url", sshd.url()), {**sshd.settings(), **settings}))


def expect_error(fn, pattern: str, within_s: float) -> str:
    t0 = time.monotonic()
    with pytest.raises(VlmcError, match=pattern) as e:
        fn()
    assert time.monotonic() - t0 < within_s
    assert "\n" not in str(e.value)
    return str(e.value)


def test_unreachable_host(sshd):
    port = free_port()  # nothing listens there
    device = ssh_device(sshd, url=f"ssh://root@127.0.0.1:{port}")
    expect_error(device.check, "connection refused", 20)


def test_refused_key(sshd, tmp_path):
    device = ssh_device(sshd, identity_file=str(keygen(tmp_path / "stranger")))
    expect_error(device.check, "key was refused", 20)


def test_unknown_host_key(sshd, tmp_path):
    (tmp_path / "empty_known_hosts").write_text("")
    device = ssh_device(sshd, known_hosts=str(tmp_path / "empty_known_hosts"))
    expect_error(device.check, "host key is unknown", 20)


def test_changed_host_key(sshd, tmp_path):
    other = keygen(tmp_path / "other_host")
    kind, key = Path(str(other) + ".pub").read_text().split()[:2]
    (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{sshd.port} {kind} {key}\n")
    device = ssh_device(sshd, known_hosts=str(tmp_path / "known_hosts"))
    expect_error(device.check, "host key", 20)


def test_no_python_there(sshd):
    expect_error(ssh_device(sshd, python="/nonexistent/python3").check, "no Python at", 20)


def test_no_vlmc_there(sshd, tmp_path):
    bare = tmp_path / "bare"  # a Python without vlmc: a fresh venv
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    expect_error(ssh_device(sshd, python=str(bare / "bin" / "python")).check, "has no vlmc", 20)


def test_wrong_architecture(sshd, bundle, tmp_path):
    """A TVM bundle with aarch64 libraries only (the shared bundle's manifest edited), sent to an x86-64 machine."""
    import json
    import shutil

    from vlmc.bundle import Bundle
    from vlmc.runtimes.tvm_runner import host_architecture

    shutil.copytree(bundle.path, tmp_path / "arm")
    manifest = json.loads((tmp_path / "arm" / "manifest.json").read_text())
    for program in manifest["targets"]["tvm"]["programs"].values():
        program["libraries"] = {"aarch64": program["libraries"]["aarch64"]}
    (tmp_path / "arm" / "manifest.json").write_text(json.dumps(manifest))
    work = tmp_path / "remote"
    work.mkdir()
    message = expect_error(lambda: ssh_device(sshd, work_dir=str(work)).profile(Bundle(tmp_path / "arm"), "tvm", 0, 1, False, 1,
                                                                               lambda m: None), "built for aarch64", 120)
    assert host_architecture() in message
    assert remote_leftovers(work) == ([], "")


def test_hanging_run_is_stopped(sshd, bundle, tmp_path):
    """A remote run past the device's timeout: stopped, its copy of the bundle removed."""
    device = ssh_device(sshd, timeout_s=4, work_dir=str(tmp_path))
    expect_error(lambda: device.profile(bundle, "onnxruntime", 0, 100000, False, 1, lambda m: None), "did not answer within 4 s", 30)
    time.sleep(2)  # the remote side notices the closed connection
    assert remote_leftovers(tmp_path) == ([], "")


def test_missing_work_dir(sshd, bundle, tmp_path):
    """`work_dir` from a devices file, naming no folder on the device."""
    import yaml

    devices = tmp_path / "devices.yaml"
    devices.write_text(yaml.safe_dump({"devices": {"board": {"url": sshd.url(), **sshd.settings(), "work_dir": str(tmp_path / "no-such")}}}))
    expect_error(lambda: resolve("board", str(devices)).profile(bundle, "onnxruntime", 0, 1, False, 1, lambda m: None),
                 r"work_dir .*no-such is not a folder on the device", 60)


def test_dropped_connection(sshd, bundle, tmp_path):
    """The connection dies mid-run (the server side's sshd killed): a clear error, nothing left behind."""
    device = ssh_device(sshd, timeout_s=120, work_dir=str(tmp_path))
    errors = []
    worker = threading.Thread(target=lambda: errors.append(
        pytest.raises(VlmcError, device.profile, bundle, "onnxruntime", 0, 100000, False, 1, lambda m: None)))
    worker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not remote_leftovers(tmp_path)[1]:
        time.sleep(0.2)
    sessions = subprocess.run(["pgrep", "-P", str(sshd.proc.pid)], capture_output=True, text=True).stdout.split()
    assert sessions, "no ssh session to drop"
    subprocess.run(["kill", "-9", *sessions], check=True)
    worker.join(timeout=30)
    assert not worker.is_alive() and errors
    assert "\n" not in str(errors[0].value)
    time.sleep(2)
    assert remote_leftovers(tmp_path) == ([], "")


def test_upload_cut_short_leaves_nothing(monkeypatch, tmp_path):
    """The device side, fed an upload that ends early (a connection dropped mid-copy)."""
    from vlmc import remote

    header = json.dumps({"op": "profile", "args": {"runtime": "onnxruntime"}, "bytes": 10_000, "work_dir": str(tmp_path)}).encode() + b"\n"
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    exits = []
    monkeypatch.setattr(remote.os, "_exit", lambda code: (exits.append(code), (_ for _ in ()).throw(SystemExit(code))))
    with pytest.raises(SystemExit):
        remote.serve(io.BytesIO(header + b"x" * 100))
    assert exits == [3]
    assert json.loads(out.getvalue().splitlines()[-1]) == {"error": "the upload ended early (connection dropped mid-copy)"}
    assert remote_leftovers(tmp_path)[0] == []


def test_upload_escaping_the_bundle_is_refused(tmp_path):
    import tarfile

    from vlmc.remote import extract

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../evil")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match="not a file inside the bundle"):
        extract(buf.getvalue(), tmp_path / "in")
    assert not (tmp_path / "evil").exists()


def test_adb_without_adb_or_device():
    device = resolve("adb://emulator-5554")
    expect_error(device.check, "adb://emulator-5554: (adb is not installed|not attached)", 30)


def test_tvm_rpc_unknown_key(tvm_rpc):
    device = resolve(f"tvm-rpc://127.0.0.1:{tvm_rpc.port}/no-such-board")
    expect_error(device.check, "no server is registered under key 'no-such-board'", 20)


def test_tvm_rpc_no_tracker():
    expect_error(resolve(f"tvm-rpc://127.0.0.1:{free_port()}/k").check, "no tracker answers", 20)


def test_qemu_without_user_space_or_with_unknown_cpu(tmp_path, bundle):
    device = QemuDevice(DeviceConfig("arm", "qemu-aarch64", {"sysroot": str(tmp_path / "none")}))
    expect_error(device.check, r"no emulated user space at .* \(run `vlmc devices setup qemu-aarch64`\)", 5)
    with pytest.raises(VlmcError, match="unknown cpu 'cortex-z9'"):
        QemuDevice(DeviceConfig("arm", "qemu-aarch64", {"cpu": "cortex-z9"}))
    expect_error(lambda: resolve("qemu-aarch64").profile(bundle, "executorch", 1, 1, False, 1, lambda m: None),
                 "runs onnxruntime and tvm, not executorch", 5)


def test_qemu_tvm_needs_a_user_space_with_its_runtime(tmp_path, bundle):
    """A user space set up before TVM was offered (its record names no TVM): the error says to set it up again."""
    (tmp_path / "vlmc-setup.json").write_text(json.dumps({"debian": "bookworm", "onnxruntime": "1.31.1"}))
    device = QemuDevice(DeviceConfig("arm", "qemu-aarch64", {"sysroot": str(tmp_path)}))
    expect_error(lambda: device.profile(bundle, "tvm", 1, 1, False, 1, lambda m: None),
                 r"has no TVM runtime .*: rerun `vlmc devices setup qemu-aarch64`", 5)


def test_tvm_runtime_without_its_extra_library(qemu_sysroot, bundle, tmp_path, sample_image):
    """A runtime-only TVM without libtvm_runtime_extra (a board's minimal build) and a DivPrune bundle, whose
    libraries call its top-k: the error names the function and the library. The user space is the real one
    through links, less that library."""
    def mirror(src, dst, leave_out):
        dst.mkdir()
        for entry in src.iterdir():
            inner = leave_out.get(entry.name)
            if inner is None:
                (dst / entry.name).symlink_to(entry)
            elif inner:
                mirror(entry, dst / entry.name, inner)

    root = tmp_path / "arm64"
    mirror(qemu_sysroot, root, {"site": {"tvm": {"lib": {"libtvm_runtime_extra.so": {}}}}})
    runtime = root / "site" / "tvm" / "lib" / "libtvm_runtime.so"  # a copy: TVM looks for its libraries beside its real path
    runtime.unlink()
    shutil.copy(qemu_sysroot / "site" / "tvm" / "lib" / "libtvm_runtime.so", runtime)
    device = QemuDevice(DeviceConfig("arm", "qemu-aarch64", {"sysroot": str(root)}))
    expect_error(lambda: device.generate(bundle, "tvm", *prompt_and_pixels(bundle, sample_image), 1),
                 r"vision_encoder calls tvm.contrib.sort.topk, which this TVM runtime lacks \(TVM's libtvm_runtime_extra", 120)


def prompt_and_pixels(bundle, image):
    from dataclasses import asdict

    from vlmc.api import _prompt_inputs

    _, ids, pixels = _prompt_inputs(bundle, image, "what color is the circle ?")
    return asdict(ids), pixels


def test_qemu_hanging_run_is_stopped(qemu_sysroot, bundle, tmp_path):
    """An emulated run past its time limit: stopped, the emulator gone, the copy removed."""
    device = QemuDevice(DeviceConfig("arm", "qemu-aarch64", {"timeout_s": 4, "work_dir": str(tmp_path)}))
    expect_error(lambda: device.profile(bundle, "onnxruntime", 1, 200, False, 1, lambda m: None), "did not answer within 4 s", 30)
    time.sleep(1)
    folders, procs = remote_leftovers(tmp_path)
    assert not folders and not procs, (folders, procs)


def test_unsigned_or_tampered_index_is_refused(monkeypatch):
    from vlmc.devices import qemu

    monkeypatch.setattr(qemu, "_download", lambda url, timeout_s=120: b"-----BEGIN PGP SIGNED MESSAGE-----\nforged\n")
    with pytest.raises(VlmcError, match="failed its signature check"):
        qemu._signed_index()


@pytest.mark.parametrize("device, message", [
    ("nope", "device nope: unknown kind"), ("local", "names this host"), ("ethos-u85", "runs no programs")])
def test_verify_devices_refused_before_any_export_work(device, message, tmp_path):
    from vlmc import api

    started = time.monotonic()
    with pytest.raises(VlmcError, match=message):
        api.compile({"targets": ["onnx"], "verify": {"devices": [device]}}, tmp_path / "b")
    assert time.monotonic() - started < 30 and not (tmp_path / "b").exists()


@pytest.mark.parametrize("url, message", [
    ("ftp://x", "unknown kind"), ("ssh://", "names no host"), ("ssh://u@h:99999", "invalid port"),
    ("tvm-rpc://h/k", "is not tvm-rpc://"), ("adb://", "names no serial")])
def test_bad_device_urls(url, message):
    with pytest.raises(VlmcError, match=message):
        resolve(url)


def test_devices_file_errors(tmp_path):
    from vlmc.devices import load_config

    bad = tmp_path / "devices.yaml"
    for text, message in (("devices: [1]", "expected a mapping"), ("devices:\n  pi: {}", "needs a url"),
                          ("devices:\n  pi: {url: 'ssh://a@b', pasword: x}", "unknown field 'pasword'"),
                          ("devices: {pi: {url: 'bogus://x'}}", "unknown kind"), ("{[", "invalid YAML")):
        bad.write_text(text)
        with pytest.raises(VlmcError, match=message):
            load_config(str(bad))
    with pytest.raises(VlmcError, match="no such file"):
        load_config(str(tmp_path / "missing.yaml"))


def test_cli_device_errors_are_one_line(bundle, tmp_path):
    """Through the CLI: a bad device is exit code 2 and one `error:` line, never a traceback."""
    for argv in (["profile", str(bundle.path), "--runtime", "onnxruntime", "--device", "ssh://"],
                 ["run", str(bundle.path), "--runtime", "onnxruntime", "--device", "gopher://x", "--image", "x.png", "-p", "hi"],
                 ["devices", "--devices", str(tmp_path / "none.yaml")]):
        r = subprocess.run([sys.executable, "-m", "vlmc.cli", *argv], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (argv, r.stderr)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
