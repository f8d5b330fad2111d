"""`vlmc sweep`: token methods x kept tokens, measured for accuracy and latency against the uncompressed model.

Every configuration is exported (verified) and evaluated on the same questions; latency comes from
`vlmc profile` on each runtime in the same run, so ratios to the uncompressed row are comparable.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from vlmc import api
from vlmc.errors import VlmcError


def method_spec(method: str, keep: int) -> dict:
    """The pass entry that keeps about `keep` visual tokens with `method`."""
    if method == "pooling":
        return {"name": "pooling", "keep": max(1, math.isqrt(keep)) ** 2}
    if method == "visionzip":
        contextual = max(1, keep // 6)
        return {"name": "visionzip", "dominant": keep - contextual, "contextual": contextual}
    return {"name": method, "keep": keep}


def prefill_flops(manifest: dict, tokens: int) -> float:
    """Analytic decoder prefill FLOPs (linear layers + attention) for `tokens` prompt tokens."""
    cfg = manifest["model"]["config"]["text"]
    d, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_layers"]
    q = cfg["num_heads"] * cfg["head_dim"]
    kv = cfg["num_kv_heads"] * cfg["head_dim"]
    linear = 2 * tokens * (d * (q + 2 * kv) + q * d + 3 * d * inter)
    attention = 2 * 2 * tokens * tokens * q
    return layers * (linear + attention)


def _row(label: str, spec: Optional[dict], bundle, evaluation: dict, profiles: dict, base: Optional[dict]) -> dict:
    m = bundle.manifest
    prompt_tokens = profiles[next(iter(profiles))]["programs"]["text_decoder.prefill"]["tokens"]
    row = {"config": label, "pass": spec, "image_tokens": m["prompt"]["num_image_tokens"], "prompt_tokens": prompt_tokens,
           "accuracy": evaluation["accuracy"], "ci95": evaluation["ci95"], "agreement": evaluation["agreement"],
           "mean_kl": evaluation["mean_kl"], "per_type": {t: v["accuracy"] for t, v in evaluation["per_type"].items()},
           "flops_prefill": prefill_flops(m, prompt_tokens), "latency": {}}
    for rt, p in profiles.items():
        row["latency"][rt] = {"vision_encode_ms": p["stages"]["vision_encode_ms"], "prefill_ms": p["stages"]["prefill_ms"],
                              "decode_ms_per_token": p["stages"]["decode_ms_per_token"]}
    if base is not None:
        row["retention"] = round(100 * row["accuracy"] / base["accuracy"], 2) if base["accuracy"] else None
        row["flop_ideal_prefill_speedup"] = round(base["flops_prefill"] / row["flops_prefill"], 3)
        for rt, lat in row["latency"].items():
            b = base["latency"][rt]
            lat["prefill_speedup"] = round(b["prefill_ms"] / lat["prefill_ms"], 3)
            lat["vision_encode_overhead_pct"] = round(100 * (lat["vision_encode_ms"] - b["vision_encode_ms"]) / b["vision_encode_ms"], 2)
    return row


def sweep(model: str, methods: list[str], keeps: list[int], n: int, runtimes: list[str], out: Path,
          iterations: int = 10, progress: Optional[Callable[[str], None]] = None) -> dict:
    progress = progress or (lambda m: None)
    targets = sorted({{"onnxruntime": "onnx", "executorch": "executorch"}[r] for r in runtimes})
    started = time.time()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        configs = [("uncompressed", None)] + [(f"{m}@{k}", method_spec(m, k)) for m in methods for k in keeps]
        base = None
        for label, spec in configs:
            progress(f"{label}: export")
            try:
                bundle = api.compile({"model": model, "targets": targets, "passes": [spec] if spec else []}, Path(tmp) / label.replace("@", "_"))
            except VlmcError as e:
                rows.append({"config": label, "pass": spec, "error": str(e)})
                continue
            progress(f"{label}: eval on {runtimes[0]} ({n} questions)")
            evaluation = api.evaluate(bundle.path, runtimes[0], "shapes-vqa", "test", n)
            profiles = {}
            for rt in runtimes:
                progress(f"{label}: profile on {rt}")
                profiles[rt] = api.profile(bundle.path, rt, warmup=2, iterations=iterations, new_tokens=2)
            row = _row(label, spec, bundle, evaluation, profiles, base)
            if base is None:
                base = row
            rows.append(row)
    result = {"model": model, "dataset": "shapes-vqa test", "n": n, "runtimes": runtimes, "iterations": iterations,
              "seconds": round(time.time() - started, 1), "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "sweep.md").write_text(to_markdown(result))
    return result


def to_markdown(result: dict) -> str:
    rts = result["runtimes"]
    head = ["config", "image tokens", "accuracy % (95% CI)", "retention %", "agreement %", "FLOP-ideal prefill x"]
    for rt in rts:
        head += [f"{rt} prefill x", f"{rt} vision overhead %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['config']} | error: {r['error']} |")
            continue
        cells = [r["config"], str(r["image_tokens"]), f"{r['accuracy']} ({r['ci95'][0]}..{r['ci95'][1]})",
                 str(r.get("retention", 100.0)), str(r["agreement"]), str(r.get("flop_ideal_prefill_speedup", 1.0))]
        for rt in rts:
            lat = r["latency"][rt]
            cells += [str(lat.get("prefill_speedup", 1.0)), str(lat.get("vision_encode_overhead_pct", 0.0))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
