"""Real servers on 127.0.0.1 for the device tests: OpenSSH's sshd and TVM's RPC tracker + server.

Each runs in its own process group from a throwaway folder (keys, config, logs) on a free port and is
stopped by its PID (process group), so nothing outlives the test session.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"server did not listen on {port} within {timeout_s} s: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Stop a server started with start_new_session by its process group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vlmc-test", "-f", str(path)], check=True)
    return path


class Sshd:
    """sshd on loopback: key authentication only, this user, a host key the client checks."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.host_key = keygen(root / "host_key")
        self.client_key = keygen(root / "client_key")
        (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
        self.port = free_port()
        self.known_hosts = root / "known_hosts"
        host_pub = (root / "host_key.pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        self.config = root / "sshd_config"
        self.config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key}", f"PidFile {root / 'sshd.pid'}",
            f"AuthorizedKeysFile {root / 'authorized_keys'}", "PubkeyAuthentication yes", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password", "StrictModes no", "UsePAM no",
            "LogLevel ERROR", ""]))
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
        self.log = root / "sshd.log"
        self.proc = subprocess.Popen([SSHD, "-D", "-E", str(self.log), "-f", str(self.config)], start_new_session=True)
        wait_for_port(self.port, self.proc, self.log)

    def url(self) -> str:
        import getpass

        return f"ssh://{getpass.getuser()}@127.0.0.1:{self.port}"

    def settings(self, **extra) -> dict:
        return {"identity_file": str(self.client_key), "known_hosts": str(self.known_hosts), "python": sys.executable, **extra}

    def stop(self) -> None:
        stop(self.proc)


class TvmRpc:
    """TVM's RPC tracker and one server registered under `key`, both on loopback."""

    def __init__(self, root: Path, key: str = "vlmc-test"):
        root.mkdir(parents=True, exist_ok=True)
        self.key = key
        self.port = free_port()
        self.tracker_log, self.server_log = root / "tracker.log", root / "server.log"
        self.tracker = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(self.port),
                                         "--port-end", str(self.port + 1), "--silent"],
                                        stdout=open(self.tracker_log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port(self.port, self.tracker, self.tracker_log)
        server_port = free_port()
        self.server = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(server_port),
                                        "--port-end", str(server_port + 10), "--tracker", f"127.0.0.1:{self.port}", "--key", key, "--silent"],
                                       stdout=open(self.server_log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_registered()

    def _wait_registered(self, timeout_s: float = 60.0) -> None:
        from tvm import rpc

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError(f"rpc server exited: {self.server_log.read_text()[-2000:]}")
            if self.key in rpc.connect_tracker("127.0.0.1", self.port).summary().get("queue_info", {}):
                return
            time.sleep(0.5)
        raise RuntimeError(f"rpc server did not register with the tracker: {self.server_log.read_text()[-2000:]}")

    def url(self) -> str:
        return f"tvm-rpc://127.0.0.1:{self.port}/{self.key}"

    def stop(self) -> None:
        stop(self.server)
        stop(self.tracker)
