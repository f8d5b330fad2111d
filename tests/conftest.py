"""Fixtures of tests/ (the tiny checkpoint and its shared bundles are in the root conftest.py)."""
from __future__ import annotations

import pytest

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
