"""vlmc's cache folder ($VLMC_CACHE or ~/.cache/vlmc): architecture presets, and what `vlmc devices setup` fetched."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

MARKER = "vlmc-setup.json"


def cache_root() -> Path:
    return Path(os.environ.get("VLMC_CACHE") or "~/.cache/vlmc").expanduser()


def is_set_up(folder: Path) -> bool:
    return (folder / MARKER).is_file()


@contextmanager
def exclusive(folder: Path):
    """Holds a lock beside `folder` (an flock, released if the holder dies): two set-ups of one folder at
    once, from two shells or two test workers, would each replace the other's finished folder."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def set_up(folder: Path, build: Callable[[Path], dict], force: bool = False,
           stale: Optional[Callable[[dict], bool]] = None) -> dict:
    """`build(staging)` fills a hidden sibling folder and returns what it installed; the folder replaces
    `folder` only when complete, so an interrupted set-up never leaves a half-built one in use. A second
    set-up of the same folder waits for the first and then finds it done. `stale(record)`: whether a finished
    set-up must be rebuilt all the same (asked under the lock, so two callers rebuild it once)."""
    with exclusive(folder):
        if is_set_up(folder) and not force:
            info = json.loads((folder / MARKER).read_text())
            if stale is None or not stale(info):
                return info
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            info = build(staging)
            (staging / MARKER).write_text(json.dumps(info, indent=1))
            if folder.exists():
                shutil.rmtree(folder)
            staging.rename(folder)
            return info
        finally:
            shutil.rmtree(staging, ignore_errors=True)
