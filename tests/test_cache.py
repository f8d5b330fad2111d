"""The cache's set-ups (`vlmc devices setup`, the test run's shared fixtures): atomic, and once at a time."""
from __future__ import annotations

import threading
import time

import pytest

from vlmc.cache import MARKER, set_up


def test_two_set_ups_at_once_build_the_folder_once(tmp_path):
    folder, builds, results = tmp_path / "sysroot", [], []

    def build(staging):
        builds.append(staging)
        time.sleep(0.3)  # the second set-up arrives while the first is building
        (staging / "lib.so").write_text("x")
        return {"built_by": len(builds)}

    threads = [threading.Thread(target=lambda: results.append(set_up(folder, build))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and results == [{"built_by": 1}, {"built_by": 1}]
    assert sorted(p.name for p in folder.iterdir()) == ["lib.so", MARKER]
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == ["sysroot"]  # no staging left


def test_an_interrupted_set_up_leaves_nothing_and_the_next_one_builds(tmp_path):
    folder = tmp_path / "sysroot"

    def failing(staging):
        (staging / "half").write_text("x")
        raise RuntimeError("download dropped")

    with pytest.raises(RuntimeError, match="download dropped"):
        set_up(folder, failing)
    assert not folder.exists() and [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    assert set_up(folder, lambda staging: {"ok": True}) == {"ok": True}
