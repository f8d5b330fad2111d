"""Export wall time and peak memory per model and target, against the model's fp32 weight bytes.

Each export runs `vlmc export` in a fresh process (one target at a time, verification on), so its peak
resident memory is that export's alone; the ratio peak RSS / fp32 weight bytes is the number to watch
(the target: at most 3x). Prints a table and writes JSON + Markdown.

    python tools/bench_export.py --models preset:smolvlm2-256m,preset:smolvlm2-500m --targets onnx,executorch,coreml \
        --out docs/export_memory
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def weight_bytes(model: str) -> tuple[int, int]:
    """(parameters, fp32 bytes) of a model, counted in a child process so this one stays small."""
    code = ("import json,sys; from vlmc.models_zoo import load; m = load(sys.argv[1]).model; "
            "n = sum(p.numel() for p in m.parameters()); print(json.dumps([n, 4 * n]))")
    out = subprocess.run([sys.executable, "-c", code, model], check=True, capture_output=True, text=True).stdout
    return tuple(json.loads(out.strip().splitlines()[-1]))


def export_once(model: str, target: str, work: Path, extra: list[str]) -> dict:
    """One `vlmc export` in a child process: wall seconds, the child's peak RSS, exit status, artifact bytes."""
    out = work / f"{model.replace(':', '_')}-{target}"
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "vlmc.cli", "export", "--model", model, "--target", target, "-o", str(out),
                           "--force", *extra], capture_output=True, text=True)
    wall = time.time() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # this process runs one export only, so its children's peak is that export's
    row = {"model": model, "target": target, "ok": proc.returncode == 0, "wall_s": round(wall, 1),
           "peak_rss_gb": round(peak_kb / 2**20, 3)}
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
    else:
        manifest = json.loads((out / "manifest.json").read_text())
        row["artifact_gb"] = round(sum(f["bytes"] for f in manifest["files"].values()) / 2**30, 3)
        row["verified"] = all(r["passed"] for r in manifest["verification"]["results"])
        row["export_seconds_in_manifest"] = manifest["metrics"]["export_seconds"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="preset:smolvlm2-256m")
    ap.add_argument("--targets", default="onnx,executorch,coreml")
    ap.add_argument("--out", default="docs/export_memory")
    ap.add_argument("--no-verify", action="store_true")
    args = ap.parse_args()
    extra = ["--no-verify"] if args.no_verify else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            params, fp32 = weight_bytes(model)
            for target in args.targets.split(","):
                # a fresh measuring process per export: RUSAGE_CHILDREN's peak covers every child so far
                code = ("import json,sys; sys.argv=['x']; from pathlib import Path; import tools.bench_export as b; "
                        f"print(json.dumps(b.export_once({model!r}, {target!r}, Path({tmp!r}), {extra!r})))")
                res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent,
                                     env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
                row = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else {
                    "model": model, "target": target, "ok": False, "error": (res.stderr.strip().splitlines() or ["?"])[-1]}
                row.update(params_m=round(params / 1e6, 1), fp32_weights_gb=round(fp32 / 2**30, 3))
                if row.get("peak_rss_gb"):
                    row["peak_over_weights"] = round(row["peak_rss_gb"] / row["fp32_weights_gb"], 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(), "rows": rows,
            "command": "python tools/bench_export.py " + " ".join(sys.argv[1:])}
    (out / "export_memory.json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = ["| model | params (M) | fp32 weights (GB) | target | export wall (s) | peak RSS (GB) | peak / weights | artifacts (GB) | verified |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params_m']} | {r['fp32_weights_gb']} | {r['target']} | {r.get('wall_s', '-')} | "
                     f"{r.get('peak_rss_gb', '-')} | {r.get('peak_over_weights', '-')} | {r.get('artifact_gb', '-')} | "
                     f"{r.get('verified', r.get('error', '-'))} |")
    (out / "export_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
