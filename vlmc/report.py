"""`vlmc report`: a sweep's results as one HTML page to choose what to ship.

Pareto fronts (accuracy against TTFT, artifact size and peak memory) per runtime x device as matplotlib
figures (PNG files beside the page, and embedded in it), the headline (the fastest point keeping >= 97%
of the uncompressed accuracy), the table of every point and each point's exact recipe to copy into
`vlmc export`.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Optional

import yaml

from vlmc.errors import VlmcError
from vlmc.sweep import choose, flat_rows, latency_steps, write_atomic

# (field on a measurement row, axis label, scale applied for the axis)
AXES = {"ttft": ("ttft_ms", "time to first token, ms (vision encode + prefill)", 1.0),
        "size": ("size_bytes", "artifact size, MB", 1e-6),
        "memory": ("peak_rss_mb", "peak RSS while profiling, MB", 1.0)}
HEADLINE_RETENTION = 97.0


SAME = ("model", "tile_grid", "dataset", "split", "n", "iterations", "runtimes", "devices")


def load_results(paths: list[Path]) -> dict:
    """Sweeps (sweep.json files or the folders holding them) as one: points merged by id, the first
    sweep's uncompressed point first. They must share the model and measurement settings; each point keeps
    the ratios its own sweep took against its own uncompressed point."""
    results = [_load_one(Path(p)) for p in paths]
    merged = results[0]
    for path, other in zip(paths[1:], results[1:]):
        differ = [k for k in SAME if other["grid"].get(k) != merged["grid"].get(k)]
        if differ:
            raise VlmcError(f"results {path}: another {', '.join(differ)} than {paths[0]} (sweeps merge only when "
                            "measured alike)")
        known = {p["id"] for p in merged["points"]}
        extra = [p for p in other["points"][1:] if p["id"] not in known]  # its own uncompressed point is the same recipe
        merged = {**merged, "points": merged["points"] + extra,
                  "snapped": {**merged.get("snapped", {}), **other.get("snapped", {})},
                  "seconds": round(merged["seconds"] + other["seconds"], 1),
                  "grid": {**merged["grid"], **{k: sorted({*map(str, merged["grid"].get(k, []))} | {*map(str, other["grid"].get(k, []))})
                                                for k in ("resolution", "tiles", "tokens", "quant")}}}
    return merged


def _load_one(path: Path) -> dict:
    file = path / "sweep.json" if path.is_dir() else path
    if not file.is_file():
        raise VlmcError(f"results {path}: no sweep.json there (run vlmc sweep -o {path})")
    try:
        result = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise VlmcError(f"results {file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(result, dict) or result.get("kind") != "sweep" or not isinstance(result.get("points"), list):
        raise VlmcError(f"results {file}: not the output of vlmc sweep (no 'kind: sweep' with points)")
    if not result["points"] or "error" in result["points"][0]:
        raise VlmcError(f"results {file}: the uncompressed point has no measurements, so nothing has a ratio")
    return result


def pareto(rows: list[dict], x: str) -> list[dict]:
    """The rows no other row beats on both lower `x` and higher accuracy, by increasing `x`."""
    front, best = [], float("-inf")
    for r in sorted((r for r in rows if r.get(x) is not None), key=lambda r: (r[x], -r["accuracy"])):
        if r["accuracy"] > best:
            front.append(r)
            best = r["accuracy"]
    return front


def series(result: dict) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for r in flat_rows(result):
        if "error" not in r:
            out.setdefault((r["runtime"], r["device"]), []).append(r)
    return out


def headline(result: dict) -> list[dict]:
    """Per runtime x device: the fastest point keeping >= 97% accuracy retention, and its TTFT speedup."""
    out = []
    for (rt, dev), rows in series(result).items():
        ok = [r for r in rows if (r.get("retention") or 0) >= HEADLINE_RETENTION]
        if not ok:
            continue
        best = min(ok, key=lambda r: (r["ttft_ms"], -r["accuracy"]))
        out.append({"runtime": rt, "device": dev, "label": best["label"], "ttft_speedup": best["ttft_speedup"],
                    "retention": best["retention"], "ttft_ms": best["ttft_ms"],
                    "baseline_ttft_ms": round(best["ttft_ms"] * best["ttft_speedup"], 3)})
    return out


def _marker(label: str) -> str:
    if label == "uncompressed":
        return "*"
    smaller_input = "px" in label or "tiles" in label
    kinds = smaller_input + ("@" in label) + any(q in label for q in ("w8", "w4"))
    if kinds > 1:
        return "D"
    return "s" if smaller_input else "o" if "@" in label else "^"


def figure(result: dict, axis: str, path: Path, chosen: Optional[list[dict]] = None) -> bytes:
    """Accuracy against one cost, every point and its Pareto front per runtime x device; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    field, xlabel, scale = AXES[axis]
    fig, ax = plt.subplots(figsize=(8.5, 5.5), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ((rt, dev), rows) in enumerate(series(result).items()):
        c = colours[i % len(colours)]
        name = rt if dev == "local" else f"{rt} @ {dev}"
        rows = [r for r in rows if r.get(field) is not None]
        for r in rows:
            lo, hi = r["ci95_low"], r["ci95_high"]
            ax.errorbar(r[field] * scale, r["accuracy"], yerr=[[r["accuracy"] - lo], [hi - r["accuracy"]]], fmt=_marker(r["label"]),
                        color=c, alpha=0.55, markersize=9 if r["label"] == "uncompressed" else 6, capsize=2, linewidth=0.8)
        front = pareto(rows, field)
        ax.step([r[field] * scale for r in front], [r["accuracy"] for r in front], where="post", color=c, linewidth=1.6,
                label=f"{name}: Pareto front")
        for r in front:
            ax.annotate(r["label"], (r[field] * scale, r["accuracy"]), textcoords="offset points", xytext=(4, -10), fontsize=7, color=c)
        for r in chosen or []:
            if (r["runtime"], r["device"]) == (rt, dev) and r.get(field) is not None:
                ax.scatter([r[field] * scale], [r["accuracy"]], s=220, facecolors="none", edgecolors=c, linewidths=2)
    base = [r for rows in series(result).values() for r in rows if r["label"] == "uncompressed"]
    if base:
        floor = HEADLINE_RETENTION / 100 * base[0]["accuracy"]
        ax.axhline(floor, color="grey", linestyle=":", linewidth=1)
        ax.text(ax.get_xlim()[1], floor, f" {HEADLINE_RETENTION:g}% retention", va="bottom", ha="right", fontsize=7, color="grey")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy, % (95% CI)")
    ax.set_title(f"{result['grid']['model']}: accuracy against {axis}  (* uncompressed, s resolution or tiles, o tokens, ^ quantization, D combined)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path.read_bytes()


def steps_figure(result: dict, path: Path) -> Optional[bytes]:
    """Prefill latency against image tokens on the uncompressed point (a sweep's latency_curve), its steps
    shaded; None when the sweep measured no curve."""
    curves = [m for p in result["points"] if not p["recipe"]["passes"] for m in p.get("measurements", []) if m.get("prefill_steps")]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=110)
    for m in curves:
        steps = latency_steps(m["prefill_steps"]["rows"])  # from the raw curve, by this version's rule
        rows = steps["rows"]
        name = m["runtime"] if m["device"] == "local" else f"{m['runtime']} @ {m['device']}"
        line, = ax.plot([r["image_tokens"] for r in rows], [r["min_ms"] for r in rows], marker=".", label=name)
        for s in steps["steps"]:
            ax.hlines(s["ms"], s["from"], s["to"], colors=line.get_color(), linewidth=4, alpha=0.35)
    ax.set_xlabel("image tokens entering the LLM")
    ax.set_ylabel("prefill, ms (fastest run)")
    ax.set_title("prefill latency against kept tokens; bars: steps (equal cost within "
                 f"{100 * curves[0]['prefill_steps']['tolerance']:g}%)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path.read_bytes()


def render(result: dict, out: Path, budget: Optional[str] = None) -> Path:
    """Write the report page (and its PNGs in `<name>_files/`) atomically; return the page's path."""
    chosen = choose(result, budget) if budget else None
    files = out.with_name(out.stem + "_files")
    files.mkdir(parents=True, exist_ok=True)
    images = {axis: figure(result, axis, files / f"pareto_{axis}.png", chosen) for axis in AXES}
    g = result["grid"]
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>vlmc sweep: {e(g['model'])}</title><style>"
             "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}tr.front td{background:#eef6ee}tr.chosen td{background:#fff2cc}"
             "pre{background:#f6f6f6;padding:6px;font-size:12px}img{max-width:100%}</style></head><body>",
             f"<h1>vlmc sweep: {e(g['model'])}</h1>",
             f"<p>{len(result['points'])} points, {e(g['dataset'])} ({g['n']} questions each), runtimes {e(', '.join(g['runtimes']))}, "
             f"devices {e(', '.join(g['devices']))}; {result['seconds']} s; vlmc {e(result.get('vlmc_version', '?'))}. "
             "Every ratio is against the uncompressed fp32 point measured in the same run. TTFT = vision encode + prefill.</p>",
             "<h2>Headline: fastest point at &ge; 97% accuracy retention</h2><table><tr><th>runtime</th><th>device</th><th>point</th>"
             "<th>TTFT ms</th><th>uncompressed TTFT ms</th><th>TTFT speedup</th><th>retention %</th></tr>"]
    heads = headline(result)
    if not heads:
        parts.append("<tr><td colspan='7'>no point keeps 97% of the uncompressed accuracy</td></tr>")
    for h in heads:
        parts.append(f"<tr><td>{e(h['runtime'])}</td><td>{e(h['device'])}</td><td>{e(h['label'])}</td><td>{h['ttft_ms']:.2f}</td>"
                     f"<td>{h['baseline_ttft_ms']:.2f}</td><td>{h['ttft_speedup']}x</td><td>{h['retention']}</td></tr>")
    parts.append("</table>")
    if budget is not None:
        parts.append(f"<h2>Budget <code>{e(budget)}</code></h2>")
        if not chosen:
            parts.append("<p>No point meets it.</p>")
        for r in chosen or []:
            parts.append(f"<p><b>{e(r['runtime'])} / {e(r['device'])}</b>: {e(r['label'])} (TTFT {r['ttft_speedup']}x, "
                         f"retention {r['retention']}%)</p><pre>{e(yaml.safe_dump(r['recipe'], sort_keys=False))}</pre>")
    for axis, png in images.items():
        parts.append(f"<h2>Accuracy against {axis}</h2><img alt='accuracy against {axis}' "
                     f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    steps = steps_figure(result, files / "prefill_steps.png")
    if steps:
        parts.append("<h2>Latency-aware K: prefill against image tokens</h2><p>Fewer tokens inside one step are no faster; "
                     "a token method's K is best at the top of its step.</p>")
        if result.get("snapped"):
            parts.append("<p>Snapped: " + ", ".join(f"{e(a)} &rarr; {e(b)}" for a, b in result["snapped"].items()) + "</p>")
        parts.append(f"<img alt='prefill steps' src='data:image/png;base64,{base64.b64encode(steps).decode()}'>")
    fronts = {(r["runtime"], r["device"], r["id"]) for rows in series(result).values() for r in pareto(rows, "ttft_ms")}
    picked = {(r["runtime"], r["device"], r["id"]) for r in chosen or []}
    cols = ["point", "runtime", "device", "image tokens", "accuracy % (95% CI)", "retention %", "agreement %", "TTFT ms",
            "TTFT x", "vision ms", "prefill ms", "decode tok/s", "MB", "size %", "peak RSS MB"]
    parts.append("<h2>Every point</h2><p>Green: on the accuracy-TTFT Pareto front; yellow: the budget's choice.</p><table><tr>"
                 + "".join(f"<th>{c}</th>" for c in cols) + "</tr>")
    for r in flat_rows(result):
        if "error" in r:
            parts.append(f"<tr><td>{e(r['label'])}</td><td colspan='{len(cols) - 1}' style='text-align:left'>refused: "
                         f"{e(r['error'].splitlines()[0])}</td></tr>")
            continue
        key = (r["runtime"], r["device"], r["id"])
        cls = "chosen" if key in picked else "front" if key in fronts else ""
        cells = [r["label"], r["runtime"], r["device"], r["image_tokens"], f"{r['accuracy']} ({r['ci95_low']}..{r['ci95_high']})",
                 r.get("retention"), r["agreement"], f"{r['ttft_ms']:.2f}", r.get("ttft_speedup"), f"{r['vision_encode_ms']:.2f}",
                 f"{r['prefill_ms']:.2f}", r["decode_tokens_per_s"], f"{r['size_bytes'] / 1e6:.2f}", r.get("size_pct"), r["peak_rss_mb"]]
        parts.append(f"<tr class='{cls}'>" + "".join(f"<td>{e(str(c))}</td>" for c in cells) + "</tr>")
    parts.append("</table><h2>Recipes</h2><p>Each point's recipe, as <code>vlmc export --recipe</code> reads it.</p>")
    for p in result["points"]:
        parts.append(f"<details><summary>{e(p['label'])} <code>{e(p['id'])}</code></summary>"
                     f"<pre>{e(yaml.safe_dump(p['recipe'], sort_keys=False))}</pre></details>")
    parts.append("</body></html>\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, "".join(parts))
    return out
