"""The bundle: artifacts + manifest.json + recipe.yaml, written atomically and read hash-checked.

A bundle is assembled in a hidden sibling folder and renamed into place only when complete, so a
crash or a failed verification never leaves half of one. Readers check each file's sha256 against the
manifest before a runtime loads it.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from vlmc.errors import VlmcError

FORMAT = "vlmc-bundle/1"


def sha256_of(path: Path) -> str:
    """sha256 of a file, or of a folder (an .mlpackage) as its sorted relative paths and contents."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f != path:
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


OWNER = ".vlmc-owner"  # inside a partial bundle: the exporting process, so a later export can tell it died


def _process_start(pid: int) -> str | None:
    """A process's start time (clock ticks since boot), which tells a live PID from a reused one; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def sweep_stale_partials(out: Path, older_than_s: float = 3600.0) -> list[Path]:
    """Remove the partial bundles of exports to `out` that died (killed, power loss): their owner process is
    gone or is another process now; an ownerless one (older vlmc) only once it is `older_than_s` old."""
    import time

    removed = []
    for partial in out.parent.glob(f".{out.name}.*.partial"):
        owner = partial / OWNER
        try:
            pid, start = owner.read_text().split()
            alive = _process_start(int(pid)) == start
        except (OSError, ValueError):
            try:
                alive = time.time() - partial.stat().st_mtime < older_than_s
            except OSError:
                continue
        if not alive:
            shutil.rmtree(partial, ignore_errors=True)
            removed.append(partial)
    return removed


def _listing(out: Path) -> list[str] | None:
    """What `out` holds ([] for a file), or None when nothing is there. Another export may be moving a bundle
    out of `out` and deleting it this instant: a folder that changed under the look counts as a bundle."""
    try:
        before = os.stat(out).st_ino
        entries = os.listdir(out)
        if os.stat(out).st_ino != before:
            return None
        return entries
    except FileNotFoundError:
        return None
    except NotADirectoryError:  # `out` is a file (refused), or a parent is (refused when creating it)
        return [] if out.exists() else None


class BundleWriter:
    """Collects a bundle in a temporary folder beside `out`; `commit` renames it into place."""

    def __init__(self, out: Path, force: bool = False):
        self.out = out
        if out.exists() and not force:
            raise VlmcError(f"output {out} exists (use --force to replace it)")
        entries = _listing(out)
        if entries is not None and "manifest.json" not in entries:
            raise VlmcError(f"output {out} exists and is not a vlmc bundle; refusing to replace it")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            sweep_stale_partials(out)
            self.dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
            (self.dir / OWNER).write_text(f"{os.getpid()} {_process_start(os.getpid())}")
        except OSError as e:  # a parent that is a file, a read-only place, a full disk
            raise VlmcError(f"output {out}: cannot create it ({e.strerror or e.__class__.__name__}: {e.filename or out.parent})") from None

    def __enter__(self) -> "BundleWriter":
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)

    def path(self, name: str) -> Path:
        return self.dir / name

    def write_manifest(self, manifest: dict[str, Any]) -> "Bundle":
        """The manifest with every file's hash, written into the unfinished bundle: a bundle that can be opened
        (and sent to a device) before it is committed."""
        manifest["files"] = {
            p.name: {"sha256": sha256_of(p), "bytes": size_of(p)}
            for p in sorted(self.dir.iterdir()) if p.name not in ("manifest.json", OWNER)
        }
        tmp = self.dir / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, self.dir / "manifest.json")
        return Bundle(self.dir)

    def commit(self, manifest: dict[str, Any]) -> Path:
        (self.dir / OWNER).unlink()
        self.write_manifest(manifest)
        self.dir.chmod(0o755)  # mkdtemp made it private
        # Two exports may --force the same output at once: each moves whatever is there aside and renames its
        # own into place, retrying if the other got in between; the last one wins, neither fails half-way.
        moved_aside = []
        for _ in range(10):
            if self.out.exists():
                old = self.out.parent / f".{self.out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                try:
                    os.replace(self.out, old)
                    moved_aside.append(old)
                except FileNotFoundError:
                    pass  # the other export moved it first
            try:
                os.replace(self.dir, self.out)
                break
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise VlmcError(f"output {self.out}: cannot move the finished bundle into place ({e.strerror})") from None
        else:
            raise VlmcError(f"output {self.out}: another export kept replacing it; nothing of this one was kept")
        for old in moved_aside:
            shutil.rmtree(old, ignore_errors=True)
        return self.out


def check_file_name(bundle: Path, name) -> str:
    """A bundle's files sit at its top level: a name is one plain path component, never absolute or `..`."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise VlmcError(f"bundle {bundle}: manifest.json names {name!r}, which is not a file inside the bundle (a bundle reads only itself)")
    return name


def check_confined(bundle: Path, name: str) -> None:
    """A listed file is a regular file or a folder of regular files (an .mlpackage), with no symlinks: nothing
    it names can lead outside the bundle, and nothing else (a device, a FIFO) is ever opened."""
    p = bundle / name
    entries = [p] + (sorted(p.rglob("*")) if p.is_dir() and not p.is_symlink() else [])
    for entry in entries:
        if entry.is_symlink():
            raise VlmcError(f"bundle {bundle}: {entry.relative_to(bundle)} is a symlink (a bundle reads only itself)")
        if not (entry.is_file() or entry.is_dir()):
            raise VlmcError(f"bundle {bundle}: {entry.relative_to(bundle)} is not a regular file")


MANIFEST_KINDS = {"name": str, "model": dict, "prompt": dict, "decoder": dict, "recipe": dict, "passes": list,
                  "targets": dict, "files": dict}


def check_manifest_shape(bundle: Path, manifest: dict) -> None:
    """The manifest's structure, checked once on load so no reader meets a field of the wrong kind; every
    file it names is checked to sit inside the bundle before anything is opened."""
    def refuse(where: str, what: str):
        raise VlmcError(f"bundle {bundle}: manifest.json '{where}' must be {what}")

    for key, kind in MANIFEST_KINDS.items():
        if not isinstance(manifest.get(key), kind):
            refuse(key, f"a {'mapping' if kind is dict else kind.__name__}")
    for name, entry in manifest["files"].items():
        check_file_name(bundle, name)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            refuse(f"files.{name}", "a mapping with its sha256")
    for target, entry in manifest["targets"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("programs"), dict):
            refuse(f"targets.{target}", "a mapping with 'programs'")
        for program, spec in entry["programs"].items():
            where = f"targets.{target}.programs.{program}"
            if not isinstance(spec, dict):
                refuse(where, "a mapping")
            names = ([spec["file"]] if "file" in spec else []) + list(spec.get("files") or [])
            if not isinstance(spec.get("files", []), list) or any(not isinstance(n, str) for n in names):
                refuse(where, "a mapping whose 'file' and 'files' name files")
            for name in names:
                check_file_name(bundle, name)
                if name not in manifest["files"]:
                    raise VlmcError(f"bundle {bundle}: {where} names {name}, which manifest.json's 'files' does not list")


class Bundle:
    """A bundle on disk: its manifest, and its files once their hashes check out."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not self.path.is_dir():
            raise VlmcError(f"bundle {path}: no such directory")
        if not mf.is_file():
            raise VlmcError(f"bundle {path}: no manifest.json (not a vlmc bundle)")
        try:
            self.manifest = json.loads(mf.read_text())
        except json.JSONDecodeError as e:
            raise VlmcError(f"bundle {path}: manifest.json is not valid JSON ({e.msg})") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            found = self.manifest.get("format") if isinstance(self.manifest, dict) else type(self.manifest).__name__
            raise VlmcError(f"bundle {path}: unsupported format {found!r} (expected {FORMAT})")
        check_manifest_shape(self.path, self.manifest)
        self._checked: set[str] = set()

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def targets(self) -> list[str]:
        return list(self.manifest["targets"])

    def programs(self, target: str) -> dict[str, dict]:
        if target not in self.manifest["targets"]:
            raise VlmcError(f"bundle {self.path} has no {target} artifacts (it has: {', '.join(self.targets)})")
        return self.manifest["targets"][target]["programs"]

    def file(self, name: str) -> Path:
        """Path of a bundle file after checking its sha256 against the manifest."""
        entry = self.manifest["files"].get(name)
        if entry is None:
            raise VlmcError(f"bundle {self.path}: {name} is not listed in manifest.json")
        p = self.path / check_file_name(self.path, name)
        if not p.exists():
            raise VlmcError(f"bundle {self.path}: {name} is missing")
        check_confined(self.path, name)
        if name not in self._checked:
            if sha256_of(p) != entry["sha256"]:
                raise VlmcError(f"bundle {self.path}: {name} does not match its sha256 in manifest.json (changed since export)")
            self._checked.add(name)
        return p
