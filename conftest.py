"""Fixtures shared by tests/ and device_tests/: a tiny checkpoint built with transformers, and the bundles
exported from it once per run (exports dominate the run's time, so each is built once and reused).

The run spreads test files over pytest-xdist workers (`-n`, pyproject's addopts). Each worker runs the session
fixtures it needs, so the costly ones are built once per run: the first worker to need one builds it into
the run's shared temporary folder under a lock, the others wait for it and reuse it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

from tests.helpers import SPACED_TEMPLATE, make_hf_llava

MAX_WORKERS = 4  # each worker holds torch, ExecuTorch, onnxruntime and TVM (1-3 GB); exports are single-threaded


def pytest_xdist_auto_num_workers(config):
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


def pytest_configure(config):
    """A worker's torch gets its share of the cores: two workers' thread pools on the same cores slow both."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """Where `build(path)` wrote `path` (a checkpoint, a bundle), built once per run however many workers ask."""
    from vlmc.cache import set_up

    def fill(staging: Path) -> dict:
        build(staging / name)
        return {}

    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name  # a worker's parent: the run's
    set_up(folder, fill)
    return folder / name


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return built_once(tmp_path_factory, "tiny_llava", make_hf_llava)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_ckpt):
    """The tiny model on onnx, executorch and coreml (16 image tokens, 64-slot cache, 40-token prefill)."""
    from vlmc import api
    from vlmc.bundle import Bundle

    return Bundle(built_once(tmp_path_factory, "tiny", lambda out: api.compile(
        {"model": str(tiny_ckpt), "targets": ["onnx", "executorch", "coreml"], "max_context": 64, "max_prompt": 40,
         "prompt_template": SPACED_TEMPLATE}, out)))


@pytest.fixture(scope="session")
def pruned_every_target(tmp_path_factory, tiny_ckpt):
    """The tiny model with DivPrune (16 -> 8 image tokens, in the graph) on every target, TVM for the host
    and cross-built for aarch64: the token-pass conformance bundle, the TVM target's and the devices'."""
    from vlmc import api
    from vlmc.bundle import Bundle

    return Bundle(built_once(tmp_path_factory, "divprune", lambda out: api.compile(
        {"model": str(tiny_ckpt), "targets": ["onnx", "executorch", "coreml", "tvm"], "max_context": 64, "max_prompt": 40,
         "prompt_template": SPACED_TEMPLATE, "tvm": {"architectures": ["host", "aarch64"]},
         "passes": [{"name": "divprune", "keep": 8}]}, out)))


@pytest.fixture(scope="session")
def calibration_jsonl(tmp_path_factory):
    """Eight questions about seeded images, in the tiny model's vocabulary (a user's questions.jsonl)."""
    import json

    import numpy as np
    from PIL import Image

    questions = ["what color is the circle ?", "what color is the square ?", "is the circle red ?", "is the square blue ?"]
    d = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(3)
    lines = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": questions[i % 4], "answer": "red"}))
    (d / "questions.jsonl").write_text("\n".join(lines) + "\n")
    return d / "questions.jsonl"
