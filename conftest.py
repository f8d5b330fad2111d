"""Fixtures shared by tests/ and device_tests/: a tiny checkpoint built with transformers, and the bundles
exported from it once per session (exports dominate the run's time, so each is built once and reused)."""
from __future__ import annotations

import pytest

from tests.helpers import SPACED_TEMPLATE, make_hf_llava


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llava")
    make_hf_llava(path)
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_ckpt):
    """The tiny model on onnx, executorch and coreml (16 image tokens, 64-slot cache, 40-token prefill)."""
    from vlmc import api

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    return api.compile({"model": str(tiny_ckpt), "targets": ["onnx", "executorch", "coreml"], "max_context": 64,
                        "max_prompt": 40, "prompt_template": SPACED_TEMPLATE}, out)


@pytest.fixture(scope="session")
def pruned_every_target(tmp_path_factory, tiny_ckpt):
    """The tiny model with DivPrune (16 -> 8 image tokens, in the graph) on every target, TVM for the host
    and cross-built for aarch64: the token-pass conformance bundle, the TVM target's and the devices'."""
    from vlmc import api

    return api.compile({"model": str(tiny_ckpt), "targets": ["onnx", "executorch", "coreml", "tvm"], "max_context": 64,
                        "max_prompt": 40, "prompt_template": SPACED_TEMPLATE, "tvm": {"architectures": ["host", "aarch64"]},
                        "passes": [{"name": "divprune", "keep": 8}]}, tmp_path_factory.mktemp("bundles") / "divprune")


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
