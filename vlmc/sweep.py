"""`vlmc sweep`: which compressed model to ship, measured against the uncompressed one in the same run.

A grid (YAML, or the same fields as CLI flags) names the axes: input resolutions, fewer tiles (tiled
families), token methods x kept tokens, quantization schemes, runtimes and devices. Every point of
resolution x tiles x tokens x quantization is one recipe: exported (verified), evaluated and profiled on each runtime x device. The uncompressed fp32
point is always the first, and every ratio (retention, TTFT, size, memory) is taken against it.

Each point's result is cached under `out/points/` by a hash of everything that determines it (recipe,
runtimes, devices, questions, iterations, vlmc version), so a killed sweep continues where it stopped and
a rerun with a larger grid measures only the new points. `search` replaces the grid product with an
optuna (TPE) search over the same axes; `executor: ray` runs points as Ray tasks.
"""
from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vlmc import __version__
from vlmc.errors import VlmcError, first_line

RUNTIME_TARGET = {"onnxruntime": "onnx", "executorch": "executorch", "tvm": "tvm"}
# (done, total, what is being measured now)
Progress = Callable[[int, int, str], None]


class SearchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    trials: int = Field(20, ge=1, description="points optuna measures (the uncompressed one is extra)")
    retention_floor: float = Field(97.0, gt=0, le=100, description="accuracy retention (%) a point must keep")
    runtime: Optional[str] = Field(None, description="whose TTFT is minimised (default: the first runtime)")
    seed: int = 0


class Grid(BaseModel):
    """The sweep's axes and measurement settings (a grid file holds these fields)."""

    model_config = ConfigDict(extra="forbid")
    model: str = "shapes-llava"
    dataset: str = Field("shapes-vqa", description="shapes-vqa or a questions.jsonl")
    split: str = "test"
    calibration: Optional[str] = Field(None, description="quantization's calibration questions: shapes-vqa or a questions.jsonl "
                                       "(default: the recipe's, ShapesVQA val); keep them apart from the evaluated ones")
    n: int = Field(500, ge=1, description="questions per point")
    iterations: int = Field(10, ge=1, description="timed runs per program in each profile")
    runtimes: list[str] = ["onnxruntime", "executorch"]
    devices: list[str] = ["local"]
    # each axis is crossed with the others, and its null value (native side, no token pass, fp32) is always in it
    resolution: list[Optional[int]] = Field([], description="input sides below the model's own")
    tile_grid: Optional[str] = Field(None, description="the uncompressed point's tile grid ROWSxCOLS (families that split "
                                     "images: smolvlm)")
    tiles: list[Optional[str]] = Field([], description="other tile grids than tile_grid: ROWSxCOLS, or global (the global "
                                       "image alone)")
    tokens: list[Optional[str]] = Field([], description="token configurations METHOD@KEEP[:key=value,...] (the method's "
                                        "own parameters: embedlens@49:inject=2)")
    quant: list[Optional[str]] = Field([], description="quantization configurations, passes joined by +")
    latency_curve: Optional[str] = Field(None, description="image token counts (8..196/8 or 22,49,98) whose prefill "
                                         "latency is measured on the uncompressed point, per runtime x device")
    snap: bool = Field(False, description="move each METHOD@K to the largest K in its latency step (needs latency_curve)")
    interleave: int = Field(0, ge=0, le=1000, description="rounds of interleaved timing once every point is measured: each "
                            "round runs every point's vision encode, prefill and one decode step, point after point, per "
                            "runtime on the local device, so a shared machine's drift hits all points alike; the medians "
                            "replace the per-point profile's (bundles kept in out/bundles)")
    executor: str = Field("local", description="local (in this process) or ray")
    search: Optional[SearchConfig] = None

    @field_validator("runtimes")
    @classmethod
    def _runtimes(cls, v):
        for r in v:
            if r not in RUNTIME_TARGET:
                raise ValueError(f"{r!r} cannot be swept here (runtimes: {', '.join(RUNTIME_TARGET)})")
        if not v:
            raise ValueError("at least one runtime")
        return v

    @field_validator("executor")
    @classmethod
    def _executor(cls, v):
        if v not in ("local", "ray"):
            raise ValueError(f"{v!r} is not an executor (local, ray)")
        return v


def load_grid(path: Path, overrides: Optional[dict] = None) -> Grid:
    """A grid file (YAML) with CLI overrides on top; errors name the file, the line where YAML says, and
    the field."""
    from vlmc.recipe import read_yaml_mapping

    data = read_yaml_mapping(path, "grid") if path is not None else {}
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        grid = Grid.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise VlmcError(f"grid {path or '(flags)'}: field '{where}': {msg}") from None
    if not any(v is not None for v in grid.resolution + grid.tiles + grid.tokens + grid.quant) and grid.search is None:
        raise VlmcError(f"grid {path or '(flags)'}: no axis to sweep (resolution, tiles, tokens or quant; flags --resolution, "
                        "--tiles, --tokens or --methods with --keep, --quant)")
    for spec in [grid.tile_grid, *grid.tiles]:
        if spec is not None:
            tile_grid_of(spec)
    for spec in grid.tokens:
        if spec is not None:
            token_pass(spec)
    if grid.latency_curve is not None:
        parse_counts(grid.latency_curve)
    elif grid.snap:
        raise VlmcError(f"grid {path or '(flags)'}: field 'snap' needs latency_curve (the counts to find the steps on)")
    for spec in grid.quant:
        if spec is not None:
            parse_quant_config(spec)
    return grid


# ----------------------------------------------------------------- the axes' values as passes

def method_spec(method: str, keep: int, tokens: int = 196, blocks: int = 3) -> dict:
    """The pass entry that keeps about `keep` of `tokens` visual tokens with `method` (`blocks`: vision
    blocks that run, over which ToMe spreads its merges)."""
    if method.endswith("-static"):  # the calibrated static mode of a selecting method
        return {**method_spec(method.removesuffix("-static"), keep, tokens, blocks), "static": True}
    if method == "tome":
        return {"name": "tome", "at": "vision.block[0]", "r": math.ceil((tokens - keep) / blocks)}
    if method == "pooling":
        return {"name": "pooling", "keep": max(1, math.isqrt(keep)) ** 2}
    if method == "duet":  # its vision stage keeps twice the tokens, the LLM stage the rest of the way
        vision = min(2 * keep, tokens - 1)
        return {"name": "duet", "keep": keep, "dominant": vision - max(1, vision // 6), "contextual": max(1, vision // 6)}
    if method == "visionzip":
        contextual = max(1, keep // 6)
        return {"name": "visionzip", "dominant": keep - contextual, "contextual": contextual}
    return {"name": method, "keep": keep}


def split_token_configs(text: str) -> list[Optional[str]]:
    """`embedlens@49:inject=2,sink_factor=5,divprune@22,none` -> its configurations: a configuration's own
    parameters hold commas, so the text splits only before the next METHOD@KEEP (or none)."""
    parts = (p.strip() for p in re.split(r",(?=\s*(?:[\w-]+@\d|none\b|null\b))", text))
    return [None if p.lower() in ("none", "null") else p for p in parts if p]


def token_pass(text: str) -> tuple[str, int, dict]:
    """`divprune@49` -> ("divprune", 49, {}); `embedlens@49:inject=2` -> (..., {"inject": 2}), the method's own
    parameters over the sweep's; checked against the registry (token passes, and KV passes placed like them:
    flashcache@49)."""
    from vlmc.passes.registry import REGISTRY, TokenPass, parse_cli

    m = re.fullmatch(r"\s*([\w-]+)@(\d+)(?::(.+))?\s*", text)
    if not m:
        raise VlmcError(f"token configuration {text!r}: expected METHOD@KEEP[:key=value,...] (divprune@49)")
    method, keep = m.group(1), int(m.group(2))
    if not issubclass(REGISTRY.get(method.removesuffix("-static"), object), TokenPass):
        raise VlmcError(f"token configuration {text!r}: {method!r} is not a token pass (vlmc passes lists them)")
    if keep < 1:
        raise VlmcError(f"token configuration {text!r}: keep at least 1 token")
    try:
        params = {k: v for k, v in parse_cli(f"{method}:{m.group(3)}").items() if k != "name"} if m.group(3) else {}
    except VlmcError:
        raise VlmcError(f"token configuration {text!r}: parameters go as key=value after ':' "
                        "(embedlens@49:inject=2)") from None
    return method, keep, params


def parse_quant_config(text: str) -> list[dict]:
    """`w8a8:at=vision+w4:at=decoder,group_size=64` -> the pass entries of one configuration (quantization
    passes, and the KV cache's and token table's storage: `w8a8+kv8`, `w4:at=decoder+embed8`)."""
    from vlmc.passes.registry import REGISTRY, TokenPass, parse_cli

    specs = [parse_cli(part) for part in text.split("+") if part.strip()]
    for spec in specs:
        cls = REGISTRY.get(spec["name"])
        if getattr(cls, "kind", None) not in ("quant", "kv", "embedding") or issubclass(cls, TokenPass):
            raise VlmcError(f"quantization configuration {text!r}: {spec['name']!r} is not a quantization pass "
                            "(w8a8, w8, w4), the KV cache's storage (kv8) or the token table's (embed8)")
    return specs


@dataclass
class Point:
    """One configuration: its axis values and the recipe they make."""

    resolution: Optional[int]
    tokens: Optional[str]
    quant: Optional[str]
    recipe: dict = field(default_factory=dict)
    tiles: Optional[str] = None

    @property
    def label(self) -> str:
        parts = ([f"{self.resolution}px"] if self.resolution else []) + ([f"tiles {self.tiles}"] if self.tiles else [])
        parts += [p for p in (self.tokens, self.quant) if p]
        return " + ".join(parts) or "uncompressed"


def tile_grid_of(spec: Optional[str]) -> Optional[list[int]]:
    """`2x2` -> [2, 2]; `global` (the global image alone) or None -> None."""
    from vlmc.recipe import parse_tile_grid

    if spec is None or spec.strip().lower() == "global":
        return None
    try:
        return list(parse_tile_grid(spec))
    except VlmcError:
        raise VlmcError(f"tile grid {spec!r}: expected ROWSxCOLS (e.g. 2x2) or global") from None


def make_point(grid: Grid, geometry: tuple[int, int, int], resolution, tokens, quant, tiles: Optional[str] = None) -> Point:
    """The recipe of one point. `geometry`: the model's (native side, image tokens, vision blocks)."""
    native, n_tokens, blocks = geometry
    passes: list[dict] = []
    if resolution:
        passes.append({"name": "resolution", "size": int(resolution)})
        n_tokens = round(n_tokens * (resolution / native) ** 2)
    if tokens:
        method, keep, params = token_pass(tokens)
        passes.append({**method_spec(method, keep, n_tokens, blocks), **params})
    if quant:
        passes += parse_quant_config(quant)
    recipe = {"model": grid.model, "targets": sorted({RUNTIME_TARGET[r] for r in grid.runtimes}), "passes": passes}
    tile_grid = tile_grid_of(tiles or grid.tile_grid)
    if tile_grid:
        recipe["tile_grid"] = tile_grid
    if grid.calibration and quant:
        recipe["calibration"] = {"dataset": grid.calibration}
    return Point(resolution, tokens, quant, recipe, tiles)


def axis(values: list) -> list:
    """An axis' values with its null value first: every method is also measured alone, each against the
    same uncompressed point."""
    return [None] + [v for v in values if v is not None]


def grid_points(grid: Grid, geometry: tuple[int, int, int]) -> list[Point]:
    """The uncompressed point first, then resolution x tiles x tokens x quantization (duplicates dropped)."""
    points, seen = [], set()
    for r, g, t, q in itertools.product(axis(grid.resolution), axis(grid.tiles), axis(grid.tokens), axis(grid.quant)):
        key = (r, g, t, q)
        if key not in seen:
            seen.add(key)
            points.append(make_point(grid, geometry, r, t, q, g))
    return points


def is_uncompressed(grid: Grid, recipe: dict) -> bool:
    return not recipe["passes"] and recipe.get("tile_grid") == tile_grid_of(grid.tile_grid)


def point_key(grid: Grid, point: Point) -> str:
    """What determines a point's measurements, hashed: its cache file's name."""
    what = {"recipe": point.recipe, "runtimes": grid.runtimes, "devices": grid.devices, "dataset": grid.dataset,
            "split": grid.split, "n": grid.n, "iterations": grid.iterations, "vlmc": __version__}
    if is_uncompressed(grid, point.recipe) and grid.latency_curve:  # the uncompressed point carries the prefill curve
        what["latency_curve"] = parse_counts(grid.latency_curve)
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------- measuring one point

def prefill_flops(manifest: dict, tokens: int) -> float:
    """Analytic decoder prefill FLOPs (linear layers + attention) for `tokens` prompt tokens; a layer after
    an in-LLM token stage sees that many fewer rows (rows a layer's cache evicts still ran it)."""
    cfg = manifest["model"]["config"]["text"]
    d, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_layers"]
    q = cfg["num_heads"] * cfg["head_dim"]
    kv = cfg["num_kv_heads"] * cfg["head_dim"]
    total = 0.0
    evicted = manifest["decoder"].get("cache_evictions") or [0] * layers
    for shift, gone in zip(manifest["decoder"].get("cache_shifts") or [0] * layers, evicted):
        rows = tokens - shift + gone
        total += 2 * rows * (d * (q + 2 * kv) + q * d + 3 * d * inter) + 2 * 2 * rows * rows * q
    return total


def _bundle_bytes(manifest: dict, target: str) -> int:
    files = {f for p in manifest["targets"][target]["programs"].values() for f in p.get("files", [p["file"]])}
    return sum(manifest["files"][f]["bytes"] for f in files)


def measure_point(grid_data: dict, recipe: dict, keep: Optional[str] = None) -> dict:
    """Export one recipe into a temporary folder, evaluate and profile it; a refused recipe is a row with
    its error. A plain function of plain data, so a Ray worker runs it as it is. `keep`: where to leave the
    bundle for the interleaved timing."""
    from vlmc import api

    from vlmc.passes.registry import REGISTRY

    grid = Grid.model_validate(grid_data)
    quantized = any(getattr(REGISTRY.get(p["name"]), "kind", None) == "quant" for p in recipe["passes"])
    curve = parse_counts(grid.latency_curve) if grid.latency_curve and is_uncompressed(grid, recipe) else None
    with tempfile.TemporaryDirectory(prefix="vlmc-sweep-") as tmp:
        try:
            bundle = api.compile(recipe, Path(tmp) / "b")
        except VlmcError as e:
            return {"error": str(e)}
        except Exception as e:  # a bug in one point's export is that point's row, named, not the end of a long sweep
            return {"error": f"internal: {e.__class__.__name__}: {first_line(e)}"}
        m = bundle.manifest
        tiles = m["prompt"].get("image_tiles", 1)
        out = {"image_tokens": m["prompt"]["num_image_tokens"] * tiles, "image_tiles": tiles, "image_size": m["prompt"]["image_size"],
               "export_seconds": m["metrics"]["export_seconds"], "measurements": []}
        accuracy: dict[str, dict] = {}
        # token passes and resolution change every target's graph alike: their accuracy is read on one
        # runtime; quantization differs per target (each its own quantizer), so it is read on each
        for rt in grid.runtimes if quantized else grid.runtimes[:1]:
            ev = api.evaluate(bundle.path, rt, grid.dataset, grid.split, grid.n)
            accuracy[rt] = {"accuracy": ev["accuracy"], "ci95": list(ev["ci95"]), "agreement": ev["agreement"], "mean_kl": ev["mean_kl"]}
            accuracy[rt]["per_type"] = {t: v["accuracy"] for t, v in ev["per_type"].items()}
        for rt in grid.runtimes:
            target = RUNTIME_TARGET[rt]
            for device in grid.devices:
                prof = api.profile(bundle.path, rt, warmup=2, iterations=grid.iterations, new_tokens=4, device=device, curve=curve)
                st = prof["stages"]
                tokens = prof["programs"]["text_decoder.prefill"]["tokens"]
                acc = accuracy.get(rt) or accuracy[grid.runtimes[0]]
                out["measurements"].append({
                    "runtime": rt, "device": device, "accuracy_runtime": rt if rt in accuracy else grid.runtimes[0],
                    **acc,
                    "vision_encode_ms": st["vision_encode_ms"], "prefill_ms": st["prefill_ms"],
                    "ttft_ms": round(st["vision_encode_ms"] + st["prefill_ms"], 4),
                    "decode_ms_per_token": st["decode_ms_per_token"],
                    "decode_tokens_per_s": round(1000.0 / st["decode_ms_per_token"], 2) if st["decode_ms_per_token"] else None,
                    "size_bytes": _bundle_bytes(m, target),
                    "peak_rss_mb": (prof.get("memory") or {}).get("peak_rss_mb"),
                    "prefill_tokens": tokens, "flops_prefill": prefill_flops(m, tokens),
                    **({"prefill_steps": latency_steps(prof["prefill_curve"])} if curve else {})})
        if keep:
            staged = Path(f"{keep}.tmp")
            shutil.rmtree(staged, ignore_errors=True)
            shutil.copytree(bundle.path, staged)
            shutil.rmtree(keep, ignore_errors=True)
            staged.rename(keep)
    return out


def interleaved_timings(bundles: dict[str, str], runtime: str, rounds: int) -> dict[str, dict]:
    """Each bundle's vision encode, prefill and one decode step (ms, medians): one warm-up round, then
    `rounds` rounds that each run every bundle once in turn. Runs in a spawned process per runtime."""
    import numpy as np

    from vlmc.bundle import Bundle
    from vlmc.runtimes import open_session
    from vlmc.runtimes.generate import encode_image, prompt_embeds
    from vlmc.runtimes.profile import sample_inputs

    if runtime == "onnxruntime":  # every point's sessions are open: one thread pool among them
        from vlmc.runtimes.onnxruntime_runner import share_one_thread_pool

        share_one_thread_pool()
    opened = {}
    for key, path in bundles.items():
        b = Bundle(path)
        opened[key] = (open_session(b, runtime, pooled=True), *sample_inputs(b))
    times = {key: {"vision": [], "prefill": [], "decode": []} for key in bundles}
    for r in range(rounds + 1):
        for key, (session, image, prompt) in opened.items():
            t0 = time.perf_counter()
            image_embeds = encode_image(session, image)
            t1 = time.perf_counter()
            embeds = prompt_embeds(session, prompt, image_embeds)
            t2 = time.perf_counter()
            logits = session.prefill(embeds, len(prompt.before))
            t3 = time.perf_counter()
            token = session.embed([int(np.argmax(logits))])
            t4 = time.perf_counter()
            session.step(token, len(prompt))
            t5 = time.perf_counter()
            if r:
                for name, ms in (("vision", t1 - t0), ("prefill", t3 - t2), ("decode", t5 - t4)):
                    times[key][name].append(ms * 1000.0)
    return {key: {name: float(np.median(v)) for name, v in t.items()} for key, t in times.items()}


def retime(grid: Grid, rows: list[dict], out: Path, progress: Progress) -> None:
    """Replace the local measurements' latencies by interleaved ones (points whose bundle is kept)."""
    import multiprocessing

    kept = {r["id"]: str(out / "bundles" / r["id"]) for r in rows
            if r.get("measurements") and (out / "bundles" / r["id"] / "manifest.json").is_file()}
    if not kept:
        return
    context = multiprocessing.get_context("spawn")  # the ExecuTorch runtime hangs in a fork()ed child
    for runtime in grid.runtimes:
        progress(len(rows), len(rows), f"interleaved timing on {runtime}, {grid.interleave} rounds")
        with context.Pool(1) as pool:
            timed = pool.apply(interleaved_timings, (kept, runtime, grid.interleave))
        for r in rows:
            t = timed.get(r["id"])
            for m in r.get("measurements", []) if t else ():
                if m["runtime"] == runtime and m["device"] == "local":
                    m.update(vision_encode_ms=round(t["vision"], 4), prefill_ms=round(t["prefill"], 4),
                             ttft_ms=round(t["vision"] + t["prefill"], 4), decode_ms_per_token=round(t["decode"], 4),
                             decode_tokens_per_s=round(1000.0 / t["decode"], 2), timing=f"interleaved, {grid.interleave} rounds")


def add_ratios(points: list[dict]) -> None:
    """Retention and speed / size / memory ratios of every measured point against the uncompressed one."""
    base = {(r["runtime"], r["device"]): r for r in points[0].get("measurements", [])}
    for p in points:
        for r in p.get("measurements", []):
            b = base.get((r["runtime"], r["device"]))
            if b is None:
                continue
            r["retention"] = round(100 * r["accuracy"] / b["accuracy"], 2) if b["accuracy"] else None
            r["ttft_speedup"] = round(b["ttft_ms"] / r["ttft_ms"], 3)
            r["vision_speedup"] = round(b["vision_encode_ms"] / r["vision_encode_ms"], 3)
            r["prefill_speedup"] = round(b["prefill_ms"] / r["prefill_ms"], 3)
            r["ttft_pct"] = round(100 * r["ttft_ms"] / b["ttft_ms"], 2)
            r["size_pct"] = round(100 * r["size_bytes"] / b["size_bytes"], 2)
            r["memory_pct"] = round(100 * r["peak_rss_mb"] / b["peak_rss_mb"], 2) if r["peak_rss_mb"] and b["peak_rss_mb"] else None
            r["flop_ideal_prefill_speedup"] = round(b["flops_prefill"] / r["flops_prefill"], 3)


# ----------------------------------------------------------------- the sweep

class PointCache:
    """`out/points/<key>.json`, each written whole: what makes a sweep resumable."""

    def __init__(self, out: Path):
        self.dir = out / "points"

    def get(self, key: str) -> Optional[dict]:
        path = self.dir / f"{key}.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None  # a file from a crash mid-write elsewhere: measure again

    def put(self, key: str, result: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.dir / f"{key}.json", json.dumps(result, indent=2) + "\n")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def model_geometry(model: str) -> tuple[int, int, int]:
    from vlmc.models_zoo import load

    c = load(model).model
    return c.image_size, c.num_image_tokens, c.num_vision_blocks


def _run_points(grid: Grid, points: list[Point], cache: PointCache, progress: Progress, done: int, total: int) -> list[dict]:
    """Measure the points not in the cache (in this process or as Ray tasks); return every point's row."""
    rows: dict[int, dict] = {}
    todo = []
    for i, p in enumerate(points):
        key = point_key(grid, p)
        cached = cache.get(key)
        if cached is not None:
            rows[i] = cached
        else:
            todo.append((i, key))
    done += len(rows)
    progress(done, total, f"{len(rows)} cached point(s)" if rows else "start")
    grid_data = grid.model_dump(mode="json")

    def keep(key: str) -> dict:  # where measure_point leaves the bundle for the interleaved timing
        return {"keep": str((cache.dir.parent / "bundles" / key).resolve())} if grid.interleave else {}

    def record(i: int, key: str, measured: dict) -> None:
        p = points[i]
        rows[i] = {"id": key, "label": p.label, "resolution": p.resolution, "tiles": p.tiles, "tokens": p.tokens, "quant": p.quant,
                   "recipe": p.recipe, **measured}
        cache.put(key, rows[i])

    if grid.executor == "ray" and todo:
        import ray

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False, include_dashboard=False)
        task = ray.remote(num_cpus=1)(measure_point)
        pending = {task.remote(grid_data, points[i].recipe, **keep(key)): (i, key) for i, key in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i, key = pending.pop(ready[0])
            record(i, key, ray.get(ready[0]))
            done += 1
            progress(done, total, points[i].label)
    else:
        for i, key in todo:
            progress(done, total, points[i].label)
            record(i, key, measure_point(grid_data, points[i].recipe, **keep(key)))
            done += 1
            progress(done, total, points[i].label)
    return [rows[i] for i in range(len(points))]


def run(grid: Grid, out: Path, progress: Optional[Progress] = None) -> dict:
    """Measure every point (grid product, or an optuna search) and write sweep.json, sweep.csv and sweep.md."""
    from vlmc.devices import resolve

    progress = progress or (lambda done, total, what: None)
    started = time.time()
    for name in grid.devices:  # refused before any measuring: a device that only estimates has no TTFT to compare
        if resolve(name).config.kind == "ethos-u85":
            raise VlmcError(f"grid field 'devices': {name} gives a compiler's estimate, not a measured profile "
                            "(vlmc profile BUNDLE --runtime executorch --device ethos-u85 for one bundle)")
    geometry = model_geometry(grid.model)
    cache = PointCache(out)
    asked = grid
    snapped = {}
    if grid.snap:  # the uncompressed point (with its prefill curve) first, then the grid on the steps
        base = _run_points(grid, [make_point(grid, geometry, None, None, None)], cache, progress, 0, 1)[0]
        m = _measurement(base, grid.runtimes[0], grid.devices[0])
        if m is None:
            raise VlmcError(f"the uncompressed model failed: {base.get('error')}")
        snapped = {t: snap_token(t, m["prefill_steps"]) for t in grid.tokens if t is not None}
        grid = grid.model_copy(update={"tokens": list(dict.fromkeys(snapped.values()))})
    if grid.search is None:
        points = grid_points(grid, geometry)
        rows = _run_points(grid, points, cache, progress, 0, len(points))
    else:
        rows = _search(grid, geometry, cache, progress)
    if grid.interleave:
        retime(grid, rows, out, progress)
    add_ratios(rows)
    result = {"kind": "sweep", "vlmc_version": __version__, "grid": asked.model_dump(mode="json"),
              "seconds": round(time.time() - started, 1), "points": rows,
              **({"snapped": snapped} if snapped else {})}
    write_results(out, result)
    return result


def _search(grid: Grid, geometry, cache: PointCache, progress: Progress) -> list[dict]:
    """Optuna's TPE over the grid's axes: minimise the TTFT of `search.runtime` on the first device, with
    retention >= the floor as a constraint; every trial is a cached point like a grid's."""
    import optuna

    s = grid.search
    runtime = s.runtime or grid.runtimes[0]
    if runtime not in grid.runtimes:
        raise VlmcError(f"grid field 'search.runtime': {runtime!r} is not one of the grid's runtimes")
    total = s.trials + 1
    base = _run_points(grid, [make_point(grid, geometry, None, None, None, None)], cache, progress, 0, total)
    rows = list(base)
    base_m = _measurement(base[0], runtime, grid.devices[0])
    if base_m is None:
        raise VlmcError(f"the uncompressed model failed: {base[0].get('error')}")

    def objective(trial):
        r = trial.suggest_categorical("resolution", axis(grid.resolution))
        g = trial.suggest_categorical("tiles", axis(grid.tiles))
        t = trial.suggest_categorical("tokens", axis(grid.tokens))
        q = trial.suggest_categorical("quant", axis(grid.quant))
        row = _run_points(grid, [make_point(grid, geometry, r, t, q, g)], cache, progress, len(rows), total)[0]
        rows.append(row)
        m = _measurement(row, runtime, grid.devices[0])
        if m is None:
            trial.set_user_attr("violation", 100.0)
            return float("inf")
        retention = 100 * m["accuracy"] / base_m["accuracy"] if base_m["accuracy"] else 0.0
        trial.set_user_attr("violation", s.retention_floor - retention)
        return m["ttft_ms"]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=s.seed, constraints_func=lambda t: [t.user_attrs.get("violation", 0.0)])
    study = optuna.create_study(direction="minimize", sampler=sampler)
    study.optimize(objective, n_trials=s.trials)
    seen, unique = set(), []
    for row in rows:  # a configuration optuna proposed twice is one point
        if row["id"] not in seen:
            seen.add(row["id"])
            unique.append(row)
    return unique


def _measurement(row: dict, runtime: str, device: str) -> Optional[dict]:
    return next((m for m in row.get("measurements", []) if m["runtime"] == runtime and m["device"] == device), None)


# ----------------------------------------------------------------- latency-aware K

def parse_counts(text: str) -> list[int]:
    """`8..196/8` (a range with a step) or `22,49,98` -> image token counts."""
    m = re.fullmatch(r"\s*(\d+)\s*\.\.\s*(\d+)\s*(?:/\s*(\d+))?\s*", text)
    if m:
        lo, hi, step = int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)
        if lo < 1 or hi < lo or step < 1:
            raise VlmcError(f"image token counts {text!r}: need 1 <= FROM <= TO and a step >= 1")
        return sorted({*range(lo, hi + 1, step), hi})
    try:
        counts = sorted({int(p) for p in text.split(",") if p.strip()})
    except ValueError:
        raise VlmcError(f"image token counts {text!r}: expected FROM..TO/STEP or comma-separated integers") from None
    if not counts or counts[0] < 1:
        raise VlmcError(f"image token counts {text!r}: need positive counts")
    return counts


def latency_steps(curve: list[dict], tolerance: float = 0.03) -> dict:
    """Group a prefill curve into steps: from the most tokens down, a count whose latency is within
    `tolerance` (either way) of the step's largest count costs the same. The step's largest count is then
    the one to keep: fewer tokens in the same step are no faster. Timed by each count's fastest run (the
    least noisy statistic on a shared machine); a count measured slower than its neighbours (noise, a
    re-planned kernel) is a step of its own, so noise never widens a step."""
    rows = sorted(curve, key=lambda r: r["image_tokens"])
    steps: list[dict] = []
    for r in reversed(rows):
        if steps and abs(r["min_ms"] - steps[-1]["ms"]) <= tolerance * steps[-1]["ms"]:
            steps[-1]["from"] = r["image_tokens"]
        else:
            steps.append({"from": r["image_tokens"], "to": r["image_tokens"], "ms": r["min_ms"]})
    steps.reverse()
    for i, s in enumerate(steps):
        for r in rows:
            if s["from"] <= r["image_tokens"] <= s["to"]:
                r["step"] = i
    return {"tolerance": tolerance, "steps": steps, "rows": rows}


def snap(keep: int, steps: dict) -> int:
    """The largest measured count in `keep`'s step (its cost, more tokens); `keep` outside the curve stays."""
    for s in steps["steps"]:
        if s["from"] <= keep <= s["to"]:
            return s["to"]
    return keep


def snap_token(text: str, steps: dict) -> str:
    method, keep, params = token_pass(text)
    rest = text.split(":", 1)[1] if params else ""
    return f"{method}@{snap(keep, steps)}" + (f":{rest}" if rest else "")


# ----------------------------------------------------------------- outputs and budgets

CSV_FIELDS = ["id", "label", "runtime", "device", "image_tokens", "accuracy", "ci95_low", "ci95_high", "retention",
              "agreement", "mean_kl", "vision_encode_ms", "prefill_ms", "ttft_ms", "ttft_speedup", "decode_ms_per_token",
              "decode_tokens_per_s", "size_bytes", "size_pct", "peak_rss_mb", "memory_pct", "error"]


def flat_rows(result: dict) -> list[dict]:
    """One row per point x runtime x device (a refused point: one row with its error)."""
    out = []
    for p in result["points"]:
        if "error" in p:
            out.append({"id": p["id"], "label": p["label"], "error": p["error"]})
            continue
        for m in p["measurements"]:
            out.append({"id": p["id"], "label": p["label"], "image_tokens": p["image_tokens"], **m,
                        "ci95_low": m["ci95"][0], "ci95_high": m["ci95"][1]})
    return out


def to_csv(result: dict) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(flat_rows(result))
    return buf.getvalue()


def to_markdown(result: dict) -> str:
    head = ["point", "runtime", "device", "image tokens", "accuracy % (95% CI)", "retention %", "agreement %",
            "TTFT ms (x)", "vision ms", "prefill ms", "decode tok/s", "MB (% fp32)", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in flat_rows(result):
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error'].splitlines()[0]} |")
            continue
        lines.append("| " + " | ".join(str(c) for c in [
            r["label"], r["runtime"], r["device"], r["image_tokens"], f"{r['accuracy']} ({r['ci95_low']}..{r['ci95_high']})",
            r.get("retention"), r["agreement"], f"{r['ttft_ms']:.2f} ({r.get('ttft_speedup')}x)", f"{r['vision_encode_ms']:.2f}",
            f"{r['prefill_ms']:.2f}", r["decode_tokens_per_s"], f"{r['size_bytes'] / 1e6:.2f} ({r.get('size_pct')})",
            r["peak_rss_mb"]]) + " |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, result: dict) -> None:
    """sweep.json, sweep.csv and sweep.md, each written whole."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "sweep.json", json.dumps(result, indent=2) + "\n")
    write_atomic(out / "sweep.csv", to_csv(result))
    write_atomic(out / "sweep.md", to_markdown(result))


def check_output(out: Path, force: bool) -> None:
    """A folder holding another grid's results is replaced only with --force (its cached points stay
    reusable: the same point of a new grid is not measured again)."""
    if out.exists() and not out.is_dir():
        raise VlmcError(f"output {out} is a file, not a folder")
    if not force and (out / "sweep.json").exists():
        try:
            old = json.loads((out / "sweep.json").read_text()).get("grid")
        except (json.JSONDecodeError, AttributeError):
            old = None
        if old is None:
            raise VlmcError(f"output {out} holds a sweep's results (use --force to replace them)")


BUDGET_METRICS = {"ttft": ("ttft_pct", "ttft_ms"), "size": ("size_pct", "size_bytes"), "memory": ("memory_pct", "peak_rss_mb"),
                  "retention": ("retention", None), "accuracy": ("accuracy", "accuracy"), "agreement": ("agreement", "agreement")}


def parse_budget(text: str) -> list[tuple[str, str, float]]:
    """`ttft<=40%,retention>=97%` -> [(field, op, value)]: ttft / size / memory in % of the uncompressed
    point, or absolute (ttft in ms, size in MB, memory in MB); retention, accuracy, agreement in %."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\w+)\s*(<=|>=|<|>)\s*([\d.]+)\s*(%|ms|MB)?", part)
        if not m or m.group(1) not in BUDGET_METRICS:
            raise VlmcError(f"--budget {text!r}: cannot read {part!r} (e.g. ttft<=40%, retention>=97%, size<=5MB; "
                            f"metrics: {', '.join(BUDGET_METRICS)})")
        metric, op, value, unit = m.group(1), m.group(2), float(m.group(3)), m.group(4)
        relative, absolute = BUDGET_METRICS[metric]
        if metric in ("ttft", "size", "memory"):
            expected = {"ttft": "ms", "size": "MB", "memory": "MB"}[metric]
            if unit not in ("%", expected):
                raise VlmcError(f"--budget {part!r}: {metric} takes % (of the uncompressed model) or {expected}")
            if unit == "%":
                out.append((relative, op, value))
            else:
                out.append((absolute, op, value * 1e6 if metric == "size" else value))
        else:
            if unit not in (None, "%"):
                raise VlmcError(f"--budget {part!r}: {metric} is a percentage")
            out.append((relative, op, value))
    if not out:
        raise VlmcError("--budget: no conditions")
    return out


def _holds(value, op: str, bound: float) -> bool:
    if value is None:
        return False
    return {"<=": value <= bound, ">=": value >= bound, "<": value < bound, ">": value > bound}[op]


def choose(result: dict, budget: str) -> list[dict]:
    """Per runtime x device: the fastest point (TTFT; more accurate on a tie) meeting every condition."""
    conditions = parse_budget(budget)
    best: dict[tuple, dict] = {}
    for r in flat_rows(result):
        if "error" in r or not all(_holds(r.get(f), op, v) for f, op, v in conditions):
            continue
        key = (r["runtime"], r["device"])
        if key not in best or (r["ttft_ms"], -r["accuracy"]) < (best[key]["ttft_ms"], -best[key]["accuracy"]):
            best[key] = r
    recipes = {p["id"]: p["recipe"] for p in result["points"]}
    return [{**r, "recipe": recipes[r["id"]]} for r in best.values()]
