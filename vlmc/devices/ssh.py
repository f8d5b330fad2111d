"""ssh://user@host[:port]: a machine reached with OpenSSH, running `python -m vlmc.remote` there.

Strict by default: batch mode (no password prompts), the host key checked against known_hosts (the
device's `known_hosts` setting, or the user's own), never added silently. The remote needs Python with
vlmc and the runtime installed (`python` setting: its interpreter, default python3).
"""
from __future__ import annotations

import getpass
import shlex
from urllib.parse import urlsplit

from vlmc.devices import DeviceConfig
from vlmc.devices.stream import RemoteProcessDevice, expand
from vlmc.errors import VlmcError

SSH_FAILURES = (  # OpenSSH's own words -> what the user should hear
    ("Host key verification failed", "the host key is unknown or changed (not in {known_hosts}): add it with ssh-keyscan, check it first"),
    ("REMOTE HOST IDENTIFICATION HAS CHANGED", "the host key changed since it was recorded in {known_hosts}: check the machine"),
    ("No ED25519 host key is known", "the host key is unknown (not in {known_hosts})"),
    ("Permission denied", "the key was refused (authentication failed for {user})"),
    ("Connection refused", "connection refused (no ssh server on port {port})"),
    ("timed out", "unreachable (connection timed out)"),
    ("No route to host", "unreachable (no route to host)"),
    ("Could not resolve hostname", "unknown host name"),
    ("Connection closed", "the connection was closed by the remote"),
    ("Broken pipe", "the connection dropped"),
)


class SshDevice(RemoteProcessDevice):
    def __init__(self, config: DeviceConfig):
        super().__init__(config)
        url = urlsplit(config.url)
        if not url.hostname:
            raise VlmcError(f"device {config.name}: {config.url!r} names no host (ssh://user@host[:port])")
        try:
            self.port = url.port or 22
        except ValueError:
            raise VlmcError(f"device {config.name}: {config.url!r} has an invalid port") from None
        self.user = url.username or getpass.getuser()
        self.host = url.hostname
        self.python = config.get("python", "python3")
        self.known_hosts = expand(config.get("known_hosts"))
        self.timeout_s = float(config.get("timeout_s", 900))
        self.connect_timeout_s = int(config.get("connect_timeout_s", 10))
        self.probe_timeout_s = self.connect_timeout_s + 60

    def argv(self, remote: list[str]) -> list[str]:
        """ssh's own argument list; the remote command is quoted word by word (ssh hands it to a shell there)."""
        options = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", f"ConnectTimeout={self.connect_timeout_s}",
                   "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3", "-p", str(self.port)]
        if self.known_hosts:
            options += ["-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null"]
        identity = expand(self.config.get("identity_file"))
        if identity:
            options += ["-i", identity, "-o", "IdentitiesOnly=yes"]
        return ["ssh", *options, f"{self.user}@{self.host}", "--", shlex.join(remote)]

    @property
    def remote_argv(self) -> list[str]:
        return self.argv([self.python, "-m", "vlmc.remote"])

    def describe_failure(self, returncode: int, stderr: str) -> str:
        where = f"ssh {self.user}@{self.host}:{self.port}"
        if returncode == 255:  # ssh itself failed
            for needle, message in SSH_FAILURES:
                if needle in stderr:
                    return f"{where}: " + message.format(known_hosts=self.known_hosts or "~/.ssh/known_hosts",
                                                         user=self.user, port=self.port)
            return f"{where}: {stderr.strip().splitlines()[-1] if stderr.strip() else 'ssh failed'}"
        if returncode == 127 or "No such file" in stderr or "not found" in stderr:
            return f"{where}: no Python at {self.python!r} on the remote (set the device's `python`)"
        if "No module named vlmc" in stderr or "No module named 'vlmc" in stderr:
            return f"{where}: the remote Python {self.python} has no vlmc (pip install vlmc and a runtime there)"
        last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {returncode}"
        return f"{where}: the remote run failed: {last}"
