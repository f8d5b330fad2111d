"""Fixtures of tests/ (the tiny checkpoint, its shared bundles and the calibration questions are in the root conftest.py)."""
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
