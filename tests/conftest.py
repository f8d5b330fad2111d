"""Shared fixtures: a tiny checkpoint built with transformers, and bundles exported from it once."""
from __future__ import annotations

import pytest

from tests.helpers import make_hf_llava


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llava")
    make_hf_llava(path)
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_ckpt):
    """The tiny model on every target (16 image tokens, 64-slot cache, 40-token prefill)."""
    from vlmc import api

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    return api.compile({"model": str(tiny_ckpt), "targets": ["onnx", "executorch", "coreml"], "max_context": 64,
                        "max_prompt": 40, "prompt_template": "USER : <image> {prompt} ASSISTANT :"}, out)


@pytest.fixture(scope="session")
def sample_image(tmp_path_factory):
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "img.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(path)
    return path


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
