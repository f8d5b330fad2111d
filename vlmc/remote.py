"""The device side of a remote run: `python -m vlmc.remote` on the board, phone or emulated machine.

The client (vlmc.devices) starts it through ssh, adb or qemu and talks over its stdin/stdout:

  stdin:  one JSON header line {"op": "probe" | "profile" | "run", "args": {...}, "bytes": N, "work_dir": optional},
          then N bytes of an uncompressed tar of the bundle (and the run's inputs), then nothing:
          the client keeps stdin open while it waits, and its end (a dropped connection, a killed
          client) stops this process.
  stdout: JSON lines, {"progress": text} while working, then {"result": ...} or {"error": text}.

The bundle lands in a fresh temporary folder (under `work_dir` where the client names one), every file is
checked against the manifest's sha256 before anything loads, and the folder is removed on every way out:
success, error, timeout, EOF.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import threading
from pathlib import Path

RUNTIME_MODULES = {"onnxruntime": "onnxruntime", "executorch": "executorch", "tvm": "tvm"}


def _emit(kind: str, payload) -> None:
    sys.stdout.write(json.dumps({kind: payload}) + "\n")
    sys.stdout.flush()


def read_answer(line, progress):
    """One stdout line of such a process, on the client side: progress goes to `progress`, an error is raised
    as a VlmcError, a result is returned; anything else (a runtime's own chatter) gives None."""
    from vlmc.errors import VlmcError

    try:
        message = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(message, dict):
        return None
    if "progress" in message:
        progress(message["progress"])
    elif "error" in message:
        raise VlmcError(message["error"])
    return message.get("result")


def probe() -> dict:
    """What this machine is and which runtimes it has (importable, not imported: that is slow)."""
    from vlmc import __version__

    return {"machine": platform.machine(), "system": platform.system(), "python": platform.python_version(),
            "vlmc": __version__, "cpus": os.cpu_count(),
            "runtimes": [r for r, m in RUNTIME_MODULES.items() if importlib.util.find_spec(m) is not None]}


def extract(data: bytes, into: Path) -> None:
    """Unpack the bundle tar: regular files and folders only, every path inside `into`."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar.getmembers():
            target = (into / member.name).resolve()
            if not (member.isfile() or member.isdir()) or into.resolve() not in target.parents:
                raise ValueError(f"the upload holds {member.name!r}, which is not a file inside the bundle")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, filter="data")
        else:  # Python before 3.11.4 (Debian bookworm's 3.11.2): the members were checked above
            tar.extractall(into)


def _check_hashes(bundle_dir: Path) -> None:
    from vlmc.bundle import Bundle

    bundle = Bundle(bundle_dir)
    for name in bundle.manifest["files"]:
        bundle.file(name)


def _run_op(op: str, args: dict, work: Path) -> dict:
    from vlmc.errors import VlmcError

    bundle = work / "bundle"
    _check_hashes(bundle)
    runtime = args["runtime"]
    if runtime not in probe()["runtimes"]:
        raise VlmcError(f"this device has no {runtime} runtime (python -m pip install it next to vlmc)")
    if op == "profile":
        from vlmc.runtimes.profile import profile_here

        return profile_here(str(bundle), runtime, args["warmup"], args["iterations"], args.get("ops", False),
                            args["new_tokens"], lambda m: _emit("progress", m), args.get("curve"))
    if op == "run":
        import numpy as np

        from vlmc.runtimes.generate import generate_on

        pixels = np.load(work / "inputs" / "pixels.npy", allow_pickle=False)
        return generate_on(str(bundle), runtime, args["prompt_ids"], pixels, args["max_new_tokens"], args.get("with_logits", False))
    raise VlmcError(f"unknown remote operation {op!r}")


def serve(stdin=None) -> int:
    stdin = stdin or sys.stdin.buffer
    header = json.loads(stdin.readline() or "{}")
    op = header.get("op")
    if op == "probe":
        _emit("result", probe())
        return 0
    parent = os.path.expanduser(header["work_dir"]) if header.get("work_dir") else None
    if parent is not None and not os.path.isdir(parent):
        _emit("error", f"work_dir {header['work_dir']} is not a folder on the device")
        return 2
    work = Path(tempfile.mkdtemp(prefix="vlmc-remote-", dir=parent))
    lock = threading.Lock()

    def finish(code: int, message: str | None = None) -> None:
        with lock:  # one way out only: the watchdog, the timer or the main thread
            shutil.rmtree(work, ignore_errors=True)
            if message:
                _emit("error", message)
            os._exit(code)

    try:
        data = stdin.read(int(header.get("bytes", 0)))
        if len(data) != int(header.get("bytes", 0)):
            finish(3, "the upload ended early (connection dropped mid-copy)")
        extract(data, work)

        def watch_stdin():  # the client closed its end: nobody waits for us any more
            stdin.read()
            finish(3)

        threading.Thread(target=watch_stdin, daemon=True).start()
        timer = threading.Timer(float(header.get("timeout_s", 3600)), finish, (4, f"the remote {op} ran past its time limit"))
        timer.daemon = True
        timer.start()
        result = _run_op(op, header.get("args", {}), work)
        with lock:
            _emit("result", result)
            shutil.rmtree(work, ignore_errors=True)
        return 0
    except Exception as e:  # reported to the client as one line; the folder goes with it
        from vlmc.errors import VlmcError, first_line

        finish(2, str(e) if isinstance(e, VlmcError) else f"{e.__class__.__name__}: {first_line(e)}")
    return 2


if __name__ == "__main__":
    sys.exit(serve())
