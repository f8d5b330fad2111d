"""vlmc's cache folder ($VLMC_CACHE or ~/.cache/vlmc): architecture presets, and what `vlmc devices setup` fetched."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

MARKER = "vlmc-setup.json"


def cache_root() -> Path:
    return Path(os.environ.get("VLMC_CACHE") or "~/.cache/vlmc").expanduser()


def is_set_up(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def set_up(folder: Path, build: Callable[[Path], dict], force: bool = False) -> dict:
    """`build(staging)` fills a hidden sibling folder and returns what it installed; the folder replaces
    `folder` only when complete, so an interrupted set-up never leaves a half-built one in use."""
    if is_set_up(folder) and not force:
        return json.loads((folder / MARKER).read_text())
    folder.parent.mkdir(parents=True, exist_ok=True)
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
