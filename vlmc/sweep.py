"""`vlmc sweep`: token methods x kept tokens, or quantization schemes, measured for accuracy and latency
against the uncompressed model.

Every configuration is exported (verified) and evaluated on the same questions; latency comes from
`vlmc profile` on each runtime in the same run, so ratios to the uncompressed row are comparable.
Token passes change the graph the same way on every runtime, so their accuracy is measured on one;
quantization differs per target (each uses its own quantizer), so it is measured on every runtime.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from vlmc import api
from vlmc.errors import VlmcError


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


def prefill_flops(manifest: dict, tokens: int) -> float:
    """Analytic decoder prefill FLOPs (linear layers + attention) for `tokens` prompt tokens; a layer after
    an in-LLM token stage sees that many fewer rows."""
    cfg = manifest["model"]["config"]["text"]
    d, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_layers"]
    q = cfg["num_heads"] * cfg["head_dim"]
    kv = cfg["num_kv_heads"] * cfg["head_dim"]
    total = 0.0
    for shift in manifest["decoder"].get("cache_shifts") or [0] * layers:
        rows = tokens - shift
        total += 2 * rows * (d * (q + 2 * kv) + q * d + 3 * d * inter) + 2 * 2 * rows * rows * q
    return total


def _row(label: str, spec: Optional[dict], bundle, evaluation: dict, profiles: dict, base: Optional[dict]) -> dict:
    m = bundle.manifest
    prompt_tokens = profiles[next(iter(profiles))]["programs"]["text_decoder.prefill"]["tokens"]
    row = {"config": label, "pass": spec, "image_tokens": m["prompt"]["num_image_tokens"], "prompt_tokens": prompt_tokens,
           "accuracy": evaluation["accuracy"], "ci95": evaluation["ci95"], "agreement": evaluation["agreement"],
           "mean_kl": evaluation["mean_kl"], "per_type": {t: v["accuracy"] for t, v in evaluation["per_type"].items()},
           "flops_prefill": prefill_flops(m, prompt_tokens), "latency": {}}
    if any(m["decoder"].get("cache_shifts", [])):
        row["image_tokens_in_llm"] = m["prompt"]["num_image_tokens"] - max(m["decoder"]["cache_shifts"])
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


def check_output(out: Path, force: bool) -> None:
    """Like export: an earlier sweep's results are replaced only with --force (checked before the work)."""
    if not force and ((out / "sweep.json").exists() or (out / "sweep.md").exists()):
        raise VlmcError(f"output {out} holds a sweep's results (use --force to replace them)")
    if out.exists() and not out.is_dir():
        raise VlmcError(f"output {out} is a file, not a folder")


def write_results(out: Path, result: dict, markdown: str) -> None:
    """sweep.json and sweep.md, each written whole (a temporary file renamed into place)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("sweep.json", json.dumps(result, indent=2) + "\n"), ("sweep.md", markdown)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def sweep(model: str, methods: list[str], keeps: list[int], n: int, runtimes: list[str], out: Path,
          iterations: int = 10, progress: Optional[Callable[[str], None]] = None) -> dict:
    progress = progress or (lambda m: None)
    targets = sorted({{"onnxruntime": "onnx", "executorch": "executorch"}[r] for r in runtimes})
    started = time.time()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        from vlmc.models_zoo import load

        c = load(model).model
        configs = [("uncompressed", None)] + [(f"{m}@{k}", method_spec(m, k, c.num_image_tokens, c.num_vision_blocks))
                                              for m in methods for k in keeps]
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
    write_results(out, result, to_markdown(result))
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
        llm = f" ({r['image_tokens_in_llm']} in the LLM)" if "image_tokens_in_llm" in r else ""
        cells = [r["config"], f"{r['image_tokens']}{llm}", f"{r['accuracy']} ({r['ci95'][0]}..{r['ci95'][1]})",
                 str(r.get("retention", 100.0)), str(r["agreement"]), str(r.get("flop_ideal_prefill_speedup", 1.0))]
        for rt in rts:
            lat = r["latency"][rt]
            cells += [str(lat.get("prefill_speedup", 1.0)), str(lat.get("vision_encode_overhead_pct", 0.0))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


RUNTIME_TARGET = {"onnxruntime": "onnx", "executorch": "executorch"}


def parse_quant_config(text: str) -> list[dict]:
    """`w8a8:at=vision+w4:at=decoder,group_size=64` -> the pass entries of one configuration."""
    from vlmc.passes.registry import REGISTRY, parse_cli

    specs = [parse_cli(part) for part in text.split("+") if part.strip()]
    for spec in specs:
        if getattr(REGISTRY.get(spec["name"]), "kind", None) != "quant":
            raise VlmcError(f"--quant {text!r}: {spec['name']!r} is not a quantization pass (w8a8, w8, w4)")
    return specs


def _bundle_bytes(manifest: dict, target: str) -> int:
    files = {f for p in manifest["targets"][target]["programs"].values() for f in p.get("files", [p["file"]])}
    return sum(manifest["files"][f]["bytes"] for f in files)


def quant_sweep(model: str, configs: list[str], n: int, runtimes: list[str], out: Path, iterations: int = 10,
                coreml: bool = True, progress: Optional[Callable[[str], None]] = None) -> dict:
    """fp32 and each quantization configuration: accuracy on every runtime, sizes per target, latency."""
    progress = progress or (lambda m: None)
    targets = sorted({RUNTIME_TARGET[r] for r in runtimes} | ({"coreml"} if coreml else set()))
    started = time.time()
    rows: list[dict] = []
    base: Optional[dict] = None
    with tempfile.TemporaryDirectory() as tmp:
        for label, specs in [("fp32", [])] + [(c, parse_quant_config(c)) for c in configs]:
            progress(f"{label}: export")
            recipe = {"model": model, "targets": targets, "passes": specs,
                      "coreml": {"minimum_deployment_target": "iOS18"}}  # block-wise int4 needs iOS18
            try:
                bundle = api.compile(recipe, Path(tmp) / f"q{len(rows)}")
            except VlmcError as e:
                rows.append({"config": label, "passes": specs, "error": str(e)})
                continue
            m = bundle.manifest
            row = {"config": label, "passes": specs, "bytes": {t: _bundle_bytes(m, t) for t in targets}, "runtimes": {}}
            for rt in runtimes:
                progress(f"{label}: eval on {rt} ({n} questions)")
                ev = api.evaluate(bundle.path, rt, "shapes-vqa", "test", n)
                progress(f"{label}: profile on {rt}")
                st = api.profile(bundle.path, rt, warmup=2, iterations=iterations, new_tokens=4)["stages"]
                row["runtimes"][rt] = {"accuracy": ev["accuracy"], "ci95": ev["ci95"], "agreement": ev["agreement"],
                                       "mean_kl": ev["mean_kl"], "per_type": {t: v["accuracy"] for t, v in ev["per_type"].items()},
                                       "vision_encode_ms": st["vision_encode_ms"], "prefill_ms": st["prefill_ms"],
                                       "decode_ms_per_token": st["decode_ms_per_token"]}
            if base is None:
                base = row
            else:
                row["size_ratio"] = {t: round(row["bytes"][t] / base["bytes"][t], 4) for t in targets}
                for rt, r in row["runtimes"].items():
                    b = base["runtimes"][rt]
                    r["retention"] = round(100 * r["accuracy"] / b["accuracy"], 2) if b["accuracy"] else None
                    for stage in ("vision_encode_ms", "prefill_ms", "decode_ms_per_token"):
                        r[stage.replace("_ms", "").replace("_per_token", "") + "_speedup"] = round(b[stage] / r[stage], 3)
            rows.append(row)
    result = {"kind": "quantization", "model": model, "dataset": "shapes-vqa test", "n": n, "runtimes": runtimes,
              "targets": targets, "iterations": iterations, "seconds": round(time.time() - started, 1), "rows": rows}
    write_results(out, result, quant_markdown(result))
    return result


def quant_markdown(result: dict) -> str:
    targets, rts = result["targets"], result["runtimes"]
    head = ["config"] + [f"{t} MB (x fp32)" for t in targets]
    for rt in rts:
        head += [f"{rt} accuracy % (95% CI)", f"{rt} retention %", f"{rt} agreement %", f"{rt} mean KL",
                 f"{rt} vision x", f"{rt} prefill x", f"{rt} decode x"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['config']} | error: {r['error']} |")
            continue
        ratio = r.get("size_ratio", {})
        cells = [r["config"]] + [f"{r['bytes'][t] / 1e6:.2f} ({ratio.get(t, 1.0)})" for t in targets]
        for rt in rts:
            x = r["runtimes"][rt]
            cells += [f"{x['accuracy']} ({x['ci95'][0]}..{x['ci95'][1]})", str(x.get("retention", 100.0)), str(x["agreement"]),
                      f"{x['mean_kl']:.2g}", str(x.get("vision_encode_speedup", 1.0)), str(x.get("prefill_speedup", 1.0)), str(x.get("decode_speedup", 1.0))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
