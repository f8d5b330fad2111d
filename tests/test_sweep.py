"""vlmc sweep and vlmc report: the grid, the per-point cache (resume), budgets, optuna search, Ray tasks,
and the HTML report with its Pareto figures."""
import json
import shutil
import subprocess
import sys

import pytest

from vlmc import api, report, sweep
from vlmc.errors import VlmcError


@pytest.fixture(scope="module")
def grid(tiny_ckpt, calibration_jsonl):
    """The tiny model with DivPrune keeping 4 (of 16), on onnxruntime: two points measured (the resolution
    pass's export is tested in test_resolution; the product of axes below, without measuring)."""
    return sweep.load_grid(None, {"model": str(tiny_ckpt), "dataset": str(calibration_jsonl), "n": 4, "iterations": 2,
                                  "runtimes": ["onnxruntime"], "tokens": ["divprune@4"]})


@pytest.fixture(scope="module")
def swept(grid, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    seen = []
    result = sweep.run(grid, out, lambda done, total, what: seen.append((done, total)))
    return out, result, seen


def test_points_are_the_product_with_every_axis_alone(grid):
    points = sweep.grid_points(grid.model_copy(update={"resolution": [24, None], "quant": ["w8a8"]}), (32, 16, 2))
    assert [p.label for p in points] == ["uncompressed", "w8a8", "divprune@4", "divprune@4 + w8a8", "24px", "24px + w8a8",
                                         "24px + divprune@4", "24px + divprune@4 + w8a8"]
    assert [s["name"] for s in points[-1].recipe["passes"]] == ["resolution", "divprune", "w8a8"]
    assert len({sweep.point_key(grid, p) for p in points}) == len(points)
    tome = sweep.make_point(grid, (32, 16, 2), 24, "tome@5", None).recipe["passes"][1]
    assert tome == {"name": "tome", "at": "vision.block[0]", "r": 2}  # 9 tokens at 24px: (9 - 5) / 2 blocks
    own = sweep.make_point(grid, (32, 16, 2), None, "embedlens@4:inject=1,sink_factor=5", None).recipe["passes"]
    assert own == [{"name": "embedlens", "keep": 4, "inject": 1, "sink_factor": 5}]  # a method's own parameters
    kv = sweep.make_point(grid, (32, 16, 2), None, "flashcache@4", "w8a8+kv8").recipe["passes"]  # KV-cache passes
    assert kv == [{"name": "flashcache", "keep": 4}, {"name": "w8a8"}, {"name": "kv8"}]


def test_token_configurations_with_parameters_split_only_between_configurations():
    text = "embedlens@4:inject=1,sink_factor=5, divprune@4,none"
    assert sweep.split_token_configs(text) == ["embedlens@4:inject=1,sink_factor=5", "divprune@4", None]
    with pytest.raises(VlmcError, match="token configuration 'embedlens@4:bogus': parameters go as key=value"):
        sweep.load_grid(None, {"tokens": ["embedlens@4:bogus"]})


def test_fewer_tiles_is_an_axis_against_the_grid_the_model_runs_at(grid):
    tiled = grid.model_copy(update={"tile_grid": "2x2", "tiles": ["1x2", "global"], "tokens": ["divprune@4"]})
    points = sweep.grid_points(tiled, (32, 16, 2))
    assert [p.label for p in points] == ["uncompressed", "divprune@4", "tiles 1x2", "tiles 1x2 + divprune@4",
                                         "tiles global", "tiles global + divprune@4"]
    assert [p.recipe.get("tile_grid") for p in points] == [[2, 2], [2, 2], [1, 2], [1, 2], None, None]
    assert sweep.is_uncompressed(tiled, points[0].recipe) and not sweep.is_uncompressed(tiled, points[2].recipe)
    with pytest.raises(VlmcError, match="tile grid '2by2'"):
        sweep.load_grid(None, {"tiles": ["2by2"]})


def test_every_point_is_measured_against_the_uncompressed_one(swept):
    out, result, seen = swept
    assert [p["label"] for p in result["points"]] == ["uncompressed", "divprune@4"]
    assert [p["image_tokens"] for p in result["points"]] == [16, 4]
    assert seen[-1] == (2, 2)
    base, res = result["points"][0]["measurements"][0], result["points"][1]["measurements"][0]
    assert base["retention"] == (100.0 if base["accuracy"] else None) and base["ttft_speedup"] == 1.0
    assert res["ttft_ms"] == pytest.approx(res["vision_encode_ms"] + res["prefill_ms"], abs=1e-3)
    assert res["ttft_speedup"] == round(base["ttft_ms"] / res["ttft_ms"], 3)
    assert res["size_bytes"] > 0 and res["peak_rss_mb"] > 0 and res["prefill_tokens"] < base["prefill_tokens"]
    csv_lines = (out / "sweep.csv").read_text().splitlines()
    assert csv_lines[0].startswith("id,label,runtime") and len(csv_lines) == 3
    assert json.loads((out / "sweep.json").read_text())["points"] == result["points"]
    assert len(list((out / "points").glob("*.json"))) == 2


def test_a_rerun_measures_only_what_is_not_cached(swept, grid, monkeypatch, tmp_path):
    out, result, _ = swept
    calls = []
    monkeypatch.setattr(sweep, "measure_point", lambda grid_data, recipe: calls.append(recipe) or {"error": "not measured"})
    again = sweep.run(grid, out)
    assert calls == [] and again["points"] == result["points"]
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    killed = copy / "points" / f"{result['points'][1]['id']}.json"  # as if the sweep died before this point
    killed.unlink()
    resumed = sweep.run(grid, copy)
    assert [c["passes"][0]["name"] for c in calls] == ["divprune"] and killed.is_file()
    assert resumed["points"][0] == result["points"][0] and resumed["points"][1]["error"] == "not measured"


def test_budget_picks_the_fastest_point_meeting_it(swept):
    _, result, _ = swept
    rows = sweep.flat_rows(result)
    everything = sweep.choose(result, "agreement>=0%")
    assert everything[0]["ttft_ms"] == min(r["ttft_ms"] for r in rows)
    assert everything[0]["recipe"] == next(p["recipe"] for p in result["points"] if p["id"] == everything[0]["id"])
    only_base = sweep.choose(result, "ttft>=100%,size>=100%")
    assert {r["label"] for r in only_base} <= {"uncompressed"}
    assert sweep.choose(result, "ttft<=0.0001ms") == []


@pytest.mark.parametrize("budget,match", [("speed<=2", "cannot read 'speed<=2'"), ("ttft<=40", "ttft takes %"),
                                          ("retention>=97ms", "retention is a percentage"), ("", "no conditions")])
def test_bad_budgets_are_refused(budget, match):
    with pytest.raises(VlmcError, match=match):
        sweep.parse_budget(budget)


def test_report_draws_the_fronts_and_lists_every_recipe(swept, tmp_path):
    out, result, _ = swept
    page = report.render(report.load_results([out, out / "sweep.json"]), tmp_path / "r.html", budget="agreement>=0%")
    text = page.read_text()
    for axis in ("ttft", "size", "memory"):
        png = tmp_path / "r_files" / f"pareto_{axis}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert text.count("data:image/png;base64,") == 3 and text.count("<details>") == 2
    assert "name: divprune" in text and "Headline" in text and "class='chosen'" in text
    front = report.pareto(sweep.flat_rows(result), "ttft_ms")
    assert all(a["ttft_ms"] <= b["ttft_ms"] and a["accuracy"] < b["accuracy"] for a, b in zip(front, front[1:]))


def test_optuna_search_reuses_the_cache(swept, grid, monkeypatch):
    out, result, _ = swept
    monkeypatch.setattr(api, "compile", lambda *a, **k: pytest.fail("a cached point was measured again"))
    searched = sweep.run(grid.model_copy(update={"search": sweep.SearchConfig(trials=4)}), out)
    ids = {p["id"] for p in result["points"]}
    assert searched["points"][0]["label"] == "uncompressed" and {p["id"] for p in searched["points"]} <= ids


def test_ray_tasks_give_the_in_process_results(swept, grid, tmp_path):
    ray = pytest.importorskip("ray")
    out, result, _ = swept
    base = result["points"][0]["id"]  # cached: only the DivPrune point runs as a Ray task
    (tmp_path / "points").mkdir()
    (tmp_path / "points" / f"{base}.json").write_text((out / "points" / f"{base}.json").read_text())
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        remote = sweep.run(grid.model_copy(update={"executor": "ray"}), tmp_path)
    finally:
        ray.shutdown()
    local = {p["id"]: p for p in result["points"]}
    assert [p["label"] for p in remote["points"]] == ["uncompressed", "divprune@4"]
    for p in remote["points"]:
        mine, theirs = p["measurements"][0], local[p["id"]]["measurements"][0]
        assert (p["image_tokens"], mine["accuracy"], mine["agreement"], mine["size_bytes"]) == \
            (local[p["id"]]["image_tokens"], theirs["accuracy"], theirs["agreement"], theirs["size_bytes"])


def _vlmc(*args):
    return subprocess.run([sys.executable, "-m", "vlmc.cli", *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("text,match", [
    ("resolution: [96\ntokens: x", "invalid YAML at line 2, column 7"),
    ("resolutoin: [96]", "field 'resolutoin': unknown field"),
    ("tokens: [divprune]", "expected METHOD@KEEP"),
    ("tokens: [w8a8@4]", "'w8a8' is not a token pass"),
    ("quant: [divprune]", "'divprune' is not a quantization pass"),
    ("quant: [flashcache]", "'flashcache' is not a quantization pass (w8a8, w8, w4), the KV cache's storage (kv8) or "
                            "the token table's (embed8)"),
    ("tokens: [kv8@4]", "'kv8' is not a token pass"),
    ("runtimes: [coreml]\nquant: [w8a8]", "field 'runtimes': 'coreml' cannot be swept here"),
    ("model: shapes-llava", "no axis to sweep"),
    ("devices: [ethos-u85]\ntokens: [divprune@4]", "ethos-u85 gives a compiler's estimate"),
    ("snap: true\ntokens: [divprune@4]", "field 'snap' needs latency_curve"),
])
def test_bad_grid_files_are_one_line_errors(tmp_path, text, match):
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    r = _vlmc("sweep", path, "-o", tmp_path / "out")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and match in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_report_refuses_what_is_not_a_sweep(tmp_path):
    (tmp_path / "sweep.json").write_text('{"rows": []}')
    r = _vlmc("report", tmp_path, "-o", tmp_path / "r.html")
    assert r.returncode == 2 and "not the output of vlmc sweep" in r.stderr and not (tmp_path / "r.html").exists()


def test_latency_steps_group_equal_costs_and_snap_up():
    curve = [{"image_tokens": k, "min_ms": ms} for k, ms in [(4, 1.0), (8, 1.01), (12, 2.0), (16, 2.02), (20, 2.05), (24, 3.0)]]
    steps = sweep.latency_steps(curve)
    assert [(s["from"], s["to"]) for s in steps["steps"]] == [(4, 8), (12, 20), (24, 24)]
    assert [sweep.snap(k, steps) for k in (4, 8, 13, 24, 30)] == [8, 8, 20, 24, 30]
    assert sweep.snap_token("divprune@12", steps) == "divprune@20"
    spike = sweep.latency_steps([{"image_tokens": k, "min_ms": ms} for k, ms in [(4, 1.0), (8, 5.0), (12, 1.02)]])
    assert [(s["from"], s["to"]) for s in spike["steps"]] == [(4, 4), (8, 8), (12, 12)]  # a slow outlier joins nothing
    assert sweep.parse_counts("4..16/4") == [4, 8, 12, 16] and sweep.parse_counts("9,3,3") == [3, 9]
    with pytest.raises(VlmcError, match="FROM..TO/STEP"):
        sweep.parse_counts("4-16")


def test_profile_measures_the_prefill_curve(tiny_bundle):
    result = api.profile(tiny_bundle.path, "onnxruntime", warmup=0, iterations=2, new_tokens=1, curve=[4, 8, 16])
    rows = result["prefill_curve"]
    assert [r["image_tokens"] for r in rows] == [4, 8, 16]
    assert [r["tokens"] - r["image_tokens"] for r in rows] == [rows[0]["tokens"] - 4] * 3 and all(r["min_ms"] > 0 for r in rows)
    with pytest.raises(VlmcError, match="must be 1..16"):
        api.profile(tiny_bundle.path, "onnxruntime", warmup=0, iterations=1, new_tokens=1, curve=[17])


def test_interleaved_timing_replaces_each_points_latency(grid, tmp_path):
    """`interleave`: every point's bundle is kept and timed again, point after point in each round, so drift
    hits all alike; the local measurements' latencies come from those rounds, the cached rows keep the
    per-point profile (a rerun times again), accuracy and sizes stay each point's own."""
    out = tmp_path / "s"
    result = sweep.run(grid.model_copy(update={"interleave": 3}), out)
    for p in result["points"]:
        assert (out / "bundles" / p["id"] / "manifest.json").is_file()
        (m,) = p["measurements"]
        assert m["timing"] == "interleaved, 3 rounds"
        assert m["ttft_ms"] == pytest.approx(m["vision_encode_ms"] + m["prefill_ms"], abs=1e-3)
        assert m["decode_tokens_per_s"] == pytest.approx(1000.0 / m["decode_ms_per_token"], rel=1e-3)
        cached = json.loads((out / "points" / f"{p['id']}.json").read_text())["measurements"][0]
        assert "timing" not in cached and cached["accuracy"] == m["accuracy"] and cached["size_bytes"] == m["size_bytes"]
    assert not list((out / "bundles").glob("*.tmp"))
