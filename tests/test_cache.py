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


def test_a_stale_set_up_is_rebuilt_once_and_a_current_one_kept(tmp_path):
    """A user space built for other runtime versions than the host's (the host upgraded, or gained TVM) is
    rebuilt; two callers that both find it stale rebuild it once."""
    folder, builds = tmp_path / "sysroot", []

    def build(version):
        def fill(staging):
            builds.append(version)
            time.sleep(0.2)
            return {"onnxruntime": version}
        return fill

    assert set_up(folder, build("1.0")) == {"onnxruntime": "1.0"}
    stale = lambda info: info["onnxruntime"] != "2.0"  # noqa: E731
    threads = [threading.Thread(target=lambda: set_up(folder, build("2.0"), stale=stale)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == ["1.0", "2.0"]
    assert set_up(folder, build("3.0"), stale=stale) == {"onnxruntime": "2.0"} and builds == ["1.0", "2.0"]
