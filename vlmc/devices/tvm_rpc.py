"""tvm-rpc://tracker:port/key: TVM's own RPC tracker hands out a server registered under `key`; the
bundle's TVM libraries for the server's architecture are uploaded to it and run and timed there.

The server's architecture is the device's `arch` setting (default: this machine's), since a TVM RPC
server does not report it; a bundle without libraries for it is refused by name. Program latency is
TVM's time_evaluator on the server (no RPC round trips in it); the stage summary drives generation
from here, so its numbers include the transfers, and the profile says so.
"""
from __future__ import annotations

import os
import platform
import socket
import threading
import time
from urllib.parse import urlsplit

from vlmc.devices import Device, DeviceConfig
from vlmc.errors import VlmcError, first_line
from vlmc.runtimes.base import DecoderShape


class TvmRpcDevice(Device):
    def __init__(self, config: DeviceConfig):
        super().__init__(config)
        url = urlsplit(config.url)
        try:
            self.host, self.port = url.hostname, url.port
        except ValueError:
            raise VlmcError(f"device {config.name}: {config.url!r} has an invalid port") from None
        self.key = url.path.strip("/")
        if not self.host or not self.port or not self.key:
            raise VlmcError(f"device {config.name}: {config.url!r} is not tvm-rpc://tracker-host:port/key")
        from vlmc.runtimes.tvm_runner import host_architecture

        self.arch = config.get("arch", host_architecture())
        self.timeout_s = float(config.get("timeout_s", 600))
        self.connect_timeout_s = float(config.get("connect_timeout_s", 10))

    def _session(self):
        """A server from the tracker, within the connect timeout."""
        try:
            from tvm import rpc
        except ImportError:
            raise VlmcError("tvm-rpc devices need Apache TVM here: pip install 'vlmc[tvm]'") from None
        where = f"tvm-rpc://{self.host}:{self.port}/{self.key}"
        try:  # TVM's own connect retries a refused port for a minute: probe it once first
            socket.create_connection((self.host, self.port), timeout=self.connect_timeout_s).close()
            tracker = rpc.connect_tracker(self.host, self.port)
        except Exception as e:  # RPCError, ConnectionRefusedError, socket timeouts
            raise VlmcError(f"{where}: no tracker answers ({first_line(e)})") from None
        queues = tracker.summary().get("queue_info", {})
        if self.key not in queues:  # a request for an unknown key would wait forever
            raise VlmcError(f"{where}: no server is registered under key {self.key!r} (keys: {', '.join(sorted(queues)) or 'none'})")
        answer: list = []

        def request():  # the tracker queues a request until a server is free: bounded by a thread's join
            try:
                answer.append(tracker.request(self.key, priority=1, session_timeout=int(self.timeout_s), max_retry=1))
            except Exception as e:  # RPCError and socket errors, reported below
                answer.append(e)

        worker = threading.Thread(target=request, daemon=True)
        worker.start()
        worker.join(self.connect_timeout_s + 20)
        if not answer:
            raise VlmcError(f"{where}: every server under key {self.key!r} stayed busy for {self.connect_timeout_s + 20:g} s")
        if isinstance(answer[0], Exception):
            raise VlmcError(f"{where}: the tracker gave no server ({first_line(answer[0])})")
        return answer[0]

    def check(self) -> dict:
        session = self._session()
        exists = bool(session.cpu().exist)
        del session  # an RPC session ends when its last reference goes; the server then takes the next one
        return {"machine": self.arch, "system": "TVM RPC server", "runtimes": ["tvm"], "device_exists": exists}

    def _open(self, bundle, runtime: str):
        """The bundle's libraries for the server's architecture, uploaded and loaded there."""
        from vlmc.runtimes.tvm_runner import open_tvm

        if runtime != "tvm":
            raise VlmcError(f"a tvm-rpc device runs TVM libraries only (--runtime tvm), not {runtime}")
        return open_tvm(bundle, DecoderShape.from_manifest(bundle.manifest), remote=self._session(), arch=self.arch)

    def generate(self, bundle, runtime, prompt, pixels, max_new_tokens, with_logits=False):
        from vlmc.models_zoo.tokenizer import PromptIds
        from vlmc.runtimes.generate import generate, record

        session = self._open(bundle, runtime)
        try:
            gen = generate(session, PromptIds(**prompt), pixels, max_new_tokens, set(bundle.manifest["prompt"]["eos_token_ids"]))
        finally:
            session.close()
        return record(gen, with_logits)

    def profile(self, bundle, runtime, warmup, iterations, ops, new_tokens, progress, curve=None):
        from vlmc.runtimes.profile import profile_session

        if ops:
            raise VlmcError("per-op profiles of TVM run locally only (--ops without --device)")
        progress(f"{self.name}: uploading the {self.arch} libraries")
        t0 = time.perf_counter()
        session = self._open(bundle, runtime)
        load_ms = (time.perf_counter() - t0) * 1000.0
        try:
            result = profile_session(bundle, session, "tvm", warmup, iterations, new_tokens, progress, curve)
            progress(f"{self.name}: timing each program on the server")
            remote_programs = session.time_programs(repeat=max(3, iterations // 4))
        finally:
            session.close()
        result.update(device=self.name, load_ms=round(load_ms, 2),
                      host={"system": "TVM RPC server", "machine": self.arch, "cpus": None},
                      client={"system": platform.system(), "machine": platform.machine(), "cpus": os.cpu_count()},
                      memory=None, remote_programs=remote_programs,
                      note="stages are driven from the client over RPC (transfers included); "
                           "remote_programs are timed on the server by TVM's time_evaluator")
        return result
