"""`vlmc`: a thin click layer over vlmc.api. Bad input ends in one line on stderr and exit code 2."""
from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import click

from vlmc.errors import VlmcError, first_line


# Where vlmc's own messages go. Native runtimes log to the process's stderr (fd 2 and Python's
# sys.stderr); `_quiet_native_logs` points both at /dev/null and keeps the terminal here.
_ERR = sys.stderr


def _console(stderr: bool = False):
    from rich.console import Console

    file = _ERR if stderr else sys.stdout
    return Console(file=file, highlight=False, width=None if file.isatty() else 200)


def _progress(enabled: bool):
    if not enabled:
        return None
    console = _console(stderr=True)
    return lambda msg: console.print(f"[dim]• {msg}[/dim]")


def _json_out(data) -> None:
    click.echo(json.dumps(data, indent=2))


def _table(title: str, columns: list[str], rows: list[list]):
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_edge=False)
    for i, c in enumerate(columns):
        numeric = bool(rows) and isinstance(rows[0][i], (int, float))
        t.add_column(c, justify="right" if numeric else "left")
    for r in rows:
        t.add_row(*("-" if v is None else str(v) for v in r))
    return t


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vlmc")
def cli():
    """Compile vision-language models for phones and edge devices."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def models(as_json):
    """Built-in models, and the model families vlmc loads from a checkpoint directory."""
    from vlmc.models_zoo import describe

    rows = describe()
    if as_json:
        return _json_out(rows)
    _console().print(_table("models", ["name", "kind", "description"], [[r["name"], r["kind"], r["description"]] for r in rows]))


@cli.command()
@click.option("--model", "-m", default=None, help="built-in model, Hugging Face checkpoint dir or preset:NAME (default: shapes-llava)")
@click.option("--image-size", type=int, default=None, help="input resolution, for families that choose it at export (qwen2_5_vl)")
@click.option("--tile-grid", default=None, help="ROWSxCOLS tiles plus the global image, for families that split images (smolvlm), e.g. 2x2")
@click.option("--target", "-t", "targets", multiple=True, help="comma-separated or repeated: onnx,executorch,coreml,tvm")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="bundle directory to write")
@click.option("--recipe", "-r", "recipe_path", default=None, help="recipe YAML; flags override its fields")
@click.option("--max-context", type=int, default=None, help="KV-cache length (prompt + generated tokens)")
@click.option("--max-prompt", type=int, default=None, help="fixed prefill length for ONNX / Core ML")
@click.option("--coreml-precision", type=click.Choice(["fp16", "fp32"]), default=None, help="Core ML compute precision (default fp16)")
@click.option("--pass", "pass_specs", multiple=True, help="token or quantization pass, repeatable: NAME:key=value,... e.g. divprune:keep=64, w8a8:at=vision")
@click.option("--calibration", "calibration", default=None, help="calibration data for quantization: shapes-vqa or a questions.jsonl")
@click.option("--calibration-n", type=int, default=None, help="calibration questions (default 32)")
@click.option("--no-verify", is_flag=True, help="skip running each artifact against eager PyTorch")
@click.option("--verify-on", "verify_on", multiple=True,
              help="repeatable: a device (name or URL) where the bundle also runs against eager before it is written, e.g. qemu-aarch64")
@click.option("--force", is_flag=True, help="replace an existing bundle at --out")
@click.option("--json", "as_json", is_flag=True, help="print the manifest as JSON")
@click.option("--quiet", "-q", is_flag=True, help="no progress lines")
def export(model, image_size, tile_grid, targets, out, recipe_path, max_context, max_prompt, coreml_precision, pass_specs, calibration, calibration_n,
           no_verify, verify_on, force, as_json, quiet):
    """Compile a model into a verified bundle for one or more targets."""
    from vlmc import api
    from vlmc.passes.registry import parse_cli
    from vlmc.recipe import load, parse_targets, parse_tile_grid

    overrides = {"model": model, "image_size": image_size, "tile_grid": parse_tile_grid(tile_grid) if tile_grid else None,
                 "targets": parse_targets(",".join(targets)) if targets else None,
                 "max_context": max_context,
                 "max_prompt": max_prompt, "coreml.precision": coreml_precision, "verify.enabled": False if no_verify else None,
                 "verify.devices": list(verify_on) or None,
                 "passes": [parse_cli(p) for p in pass_specs] or None, "calibration.dataset": calibration,
                 "calibration.n": calibration_n}
    recipe = load(recipe_path, overrides)
    bundle = api.compile(recipe, out, force=force, progress=_progress(not quiet and not as_json))
    if as_json:
        return _json_out(bundle.manifest)
    _print_summary(bundle.manifest, bundle.path)


def _print_summary(m: dict, path, method_sizes: Optional[dict] = None) -> None:
    """The bundle's programs table (`method_sizes`: each ExecuTorch method's own bytes, else the file's)."""
    console = _console()
    files = m["files"]
    rows = []
    for target, entry in m["targets"].items():
        for program, p in entry["programs"].items():
            shapes = lambda io: ", ".join(f"{i['name']}{i['shape']}:{i['dtype']}" for i in io)  # noqa: E731
            own = (method_sizes or {}).get(p.get("method")) if target == "executorch" else None
            if own is None and "weight_bytes" in p:  # an ONNX graph and the weights it reads from the shared file
                own = {"bytes": files[p["file"]]["bytes"] + p["weight_bytes"], "shared_bytes": p["shared_bytes"]}
            size = _mb(files[p["file"]]["bytes"])
            if own is not None:
                size = _mb(own["bytes"]) + (f" ({_mb(own['shared_bytes'])} shared)" if own["shared_bytes"] > 2**20 else "")
            rows.append([target, program, p.get("method", p["file"]), shapes(p["inputs"][:4]) + (" ..." if len(p["inputs"]) > 4 else ""),
                         shapes(p["outputs"][:1]) + (" ..." if len(p["outputs"]) > 1 else ""), size])
    console.print(f"[bold]{m['name']}[/bold]  {path}  (vlmc {m['vlmc_version']}, model {m['model']['name']}, "
                  f"max_context {m['decoder']['max_context']}, max_prompt {m['decoder']['max_prompt']})")
    console.print(_table("programs", ["target", "program", "file / method", "inputs", "outputs", "size"], rows))
    if m["passes"]:
        console.print(_table("passes", ["pass", "at", "parameters", "tokens in", "tokens out"],
                             [[p["name"], p["at"], ", ".join(f"{k}={v}" for k, v in p["params"].items()), p["tokens_in"], p["tokens_out"]]
                              for p in m["passes"]]))
        shifts = m["decoder"].get("cache_shifts", [])
        llm = "".join(f"; after decoder.layer[{i - 1}]: {m['prompt']['num_image_tokens'] - shifts[i]}"
                      for i in range(1, len(shifts)) if shifts[i] != shifts[i - 1])
        tiles = m["prompt"].get("image_tiles", 1)
        per = f" per tile x {tiles} tiles" if tiles > 1 else ""
        console.print(f"image tokens: {m['prompt']['num_image_tokens']} of {m['prompt']['num_image_tokens_unpruned']}{per}{llm}; "
                      f"runner: {m['runner']}")
    else:
        console.print("passes: none")
    kv = m["decoder"].get("kv_cache")
    if kv:
        groups: dict[tuple, list[int]] = {}
        for i, *shape in kv.get("packed", ()):
            groups.setdefault(tuple(shape), []).append(i)
        packed = "".join(f"; image rows packed in layers {', '.join(map(str, layers))}: {h} at rank {r}, {n} at rank {lr}"
                         for (h, r, n, lr), layers in groups.items())
        console.print(f"KV cache: {kv['dtype']}, {_mb(kv['bytes'])} at max_context{packed}")
    q = m.get("quantization")
    if q:
        rows = [[target, program, e["quantization"]["scheme"], e["quantization"].get("how", ""),
                 e["quantization"].get("activations", "")]
                for target, entry in m["targets"].items() for program, e in entry["programs"].items() if "quantization" in e]
        console.print(_table("quantization", ["target", "program", "scheme", "how", "activations"], rows))
        if "calibration" in q:
            console.print("calibration: " + ", ".join(f"{k} {v}" for k, v in q["calibration"].items()))
    v = m["verification"]
    if not v["enabled"]:
        console.print("verification: [yellow]skipped (--no-verify)[/yellow]")
    else:
        vrows = [[r["target"], r["program"], r["check"], "-" if r.get("max_abs_err") is None else f"{r['max_abs_err']:.2e}",
                  "pass" if r["passed"] else "FAIL", r.get("detail", "")] for r in v["results"]]
        console.print(_table(f"verification vs eager (atol {v['atol']}, rtol {v['rtol']})",
                             ["target", "program", "check", "max |err|", "result", "note"], vrows))
    steps = m.get("metrics", {}).get("steps_seconds")
    if steps:
        console.print(f"export took {m['metrics']['export_seconds']} s: " + ", ".join(f"{k.replace('_', ' ')} {v} s" for k, v in steps.items()))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def passes(as_json):
    """Token and quantization passes with their parameters, where they act, and their sources."""
    from vlmc.passes import registry

    rows = registry.describe()
    if as_json:
        return _json_out(rows)
    _console().print(_table("passes", ["name", "kind", "acts at", "parameters (type, default)", "source", "departs from the paper"], [
        [r["name"], r["kind"], ", ".join(r["acts_at"]), "; ".join(f"{k}: {t} ({d})" if d == "required" else f"{k}: {t} = {d}" for k, (t, d) in r["parameters"].items()),
         r["source"], r["departures"]] for r in rows]))


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print the whole manifest as JSON")
def inspect(bundle, as_json):
    """Programs, shapes, dtypes, sizes, passes and verification results of a bundle."""
    from vlmc import api

    manifest = api.inspect(bundle)
    if as_json:
        return _json_out(manifest)
    sizes = None
    if "executorch" in manifest["targets"]:  # one .pte holds every method: read what each one owns
        from vlmc.runtimes.executorch_runner import method_bytes

        pte = next(iter(manifest["targets"]["executorch"]["programs"].values()))["file"]
        sizes = method_bytes(Path(bundle) / pte)
    _print_summary(manifest, bundle, sizes)
    for target, entry in manifest["targets"].items():
        notes = {k: v for k, v in entry.items() if k not in ("programs",) and not isinstance(v, dict)}
        _console().print(f"[bold]{target}[/bold]: " + "; ".join(f"{k}: {v}" for k, v in notes.items()))


def _device_options(f):
    f = click.option("--devices", "devices_file", default=None,
                     help="devices file (default $VLMC_DEVICES or ~/.config/vlmc/devices.yaml)")(f)
    return click.option("--device", "-d", default=None,
                        help="local (default), a name from the devices file, or a URL: ssh://user@host[:port], adb://SERIAL, "
                             "qemu-aarch64, tvm-rpc://tracker:port/key")(f)


@cli.group(invoke_without_command=True)
@click.option("--devices", "devices_file", default=None, help="devices file (default $VLMC_DEVICES or ~/.config/vlmc/devices.yaml)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def devices(ctx, devices_file, as_json):
    """The configured devices, each reached and checked: machine, runtimes, or why it cannot be used."""
    if ctx.invoked_subcommand:
        return
    from vlmc.devices import check_all

    rows = check_all(devices_file)
    if as_json:
        return _json_out(rows)
    _console().print(_table("devices", ["name", "url", "status", "machine", "runtimes"], [
        [r["name"], r["url"], "ok" if r["ok"] else f"[red]{r['error']}[/red]", r.get("machine", ""), ", ".join(r.get("runtimes", []))]
        for r in rows]))


def _print_estimate(console, result: dict) -> None:
    npu, vision = result["npu"], result["programs"]["vision_encoder"]
    console.print(f"[bold]{result['bundle']}[/bold] vision encoder on {npu['config']} ({npu['system_config']}, {npu['memory_mode']}, "
                  f"{(npu['clock_hz'] or 0) / 1e6:g} MHz)")
    console.print(_table("NPU partitions (Vela)", ["partition", "ms", "NPU cycles", "total cycles", "MACs", "SRAM KiB", "DRAM KiB",
                                                   "flash KiB", "weights B"],
                         [[i, p["time_ms"], p["npu_cycles"], p["total_cycles"], p["macs"], p["sram_kib"], p["dram_kib"],
                           p["on_chip_flash_kib"] + p["off_chip_flash_kib"], p["weights_bytes_encoded"]]
                          for i, p in enumerate(vision["partitions"])]))
    console.print(f"NPU time {vision['npu_time_ms']} ms; on the CPU: {', '.join(vision['cpu_ops']) or 'nothing'}")
    n = result["numerics"]
    console.print("int8 numerics (TOSA reference model): " + (
        f"rel err {n['rel_err_vs_pytorch_int8']} vs the int8 model in PyTorch, {n['rel_err_vs_float']} vs float" if n["checked"]
        else f"not checked ({n['reason']})"))
    console.print(f"note: {result['note']}")


@devices.command(name="setup")
@click.argument("kind", type=click.Choice(["qemu-aarch64", "ethos-u85"]))
@click.option("--sysroot", type=click.Path(path_type=Path), default=None,
              help="where the emulated user space goes (default $VLMC_CACHE/qemu-aarch64, $VLMC_CACHE defaulting to ~/.cache/vlmc)")
@click.option("--force", is_flag=True, help="rebuild it even if it is there")
def devices_setup(kind, sysroot, force):
    """Fetch what a device kind needs on this host: qemu-aarch64's Debian arm64 user space and aarch64 wheels,
    or ethos-u85's Vela and TOSA tools."""
    if kind == "ethos-u85":
        from vlmc.devices import ethos_u

        info = ethos_u.setup(_progress(True), force=force)
        click.echo(f"{kind}: {', '.join(info['packages'])} in {ethos_u.site_dir()}")
        return
    from vlmc.devices.qemu import setup

    info = setup(sysroot, _progress(True), force=force)
    tvm = f", TVM runtime {info['tvm']}" if info.get("tvm") else " (no TVM runtime: this host has no TVM)"
    click.echo(f"{kind}: Debian {info['debian']} arm64 ({len(info['packages'])} packages), onnxruntime {info['onnxruntime']}{tvm}")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--runtime", required=True, type=click.Choice(["onnxruntime", "executorch", "tvm", "coreml"]),
              help="the runtime to profile on (coreml: macOS only)")
@click.option("--warmup", default=3, show_default=True, help="untimed runs before the timed ones")
@click.option("--iterations", "-n", default=20, show_default=True, help="timed runs per program")
@click.option("--new-tokens", default=8, show_default=True, help="tokens generated for the decode-stage measurement")
@click.option("--ops", is_flag=True, help="add per-op rows (onnxruntime profiler / ExecuTorch ETDump / TVM VM instrument)")
@click.option("--prefill-curve", default=None, help="prefill latency at these image token counts, and its steps: 8..196/8 or 22,49,98")
@_device_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def profile(bundle, runtime, warmup, iterations, new_tokens, ops, prefill_curve, device, devices_file, as_json):
    """Latency per program and per stage, memory, sizes (and per-op time) on a runtime, here or on a device."""
    from vlmc import api
    from vlmc.sweep import latency_steps, parse_counts

    curve = parse_counts(prefill_curve) if prefill_curve else None
    result = api.profile(bundle, runtime, warmup, iterations, ops, new_tokens, progress=None if as_json else _progress(True),
                         device=device, devices_file=devices_file, curve=curve)
    if curve:
        result["prefill_steps"] = latency_steps(result["prefill_curve"])
    if as_json:
        return _json_out(result)
    console = _console()
    if result.get("estimate"):
        return _print_estimate(console, result)
    s = result["stages"]
    console.print(f"[bold]{result['bundle']}[/bold] on {result['runtime']} ({result['device']}, {result['host']['machine']}, "
                  f"{result['host']['cpus']} cpus): warm-up {result['warmup']}, {result['iterations']} iterations")
    console.print(_table("stages", ["stage", "ms"], [
        ["vision encode", s["vision_encode_ms"]], ["prefill", s["prefill_ms"]],
        ["decode / token", s["decode_ms_per_token"]], ["time to first token", s["time_to_first_token_ms"]],
        ["decode tokens/s", s["decode_tokens_per_s"]]]))
    console.print(_table("programs", ["program", "p50 ms", "p90 ms", "p99 ms", "mean ms"],
                         [[k, v["p50_ms"], v["p90_ms"], v["p99_ms"], v["mean_ms"]] for k, v in result["programs"].items()]))
    if result.get("remote_programs"):
        console.print(_table("programs timed on the server (time_evaluator)", ["program", "p50 ms", "min ms", "repeats"],
                             [[k, v["p50_ms"], v["min_ms"], v["repeats"]] for k, v in result["remote_programs"].items()]))
    mem = result["memory"]
    if mem:
        console.print(f"memory: peak RSS {mem['peak_rss_mb']} MB (before load {mem['rss_before_load_mb']} MB, after load "
                      f"{mem['rss_after_load_mb']} MB)")
    console.print(f"artifacts {_mb(result['artifact_bytes_total'])} ({', '.join(f'{k} {_mb(v)}' for k, v in result['artifacts'].items())})")
    if result.get("note"):
        console.print(f"note: {result['note']}")
    if curve:
        console.print(_table("prefill against image tokens (steps: equal cost within 3%)", ["image tokens", "prompt tokens", "p50 ms", "min ms", "step"],
                             [[r["image_tokens"], r["tokens"], r["p50_ms"], r["min_ms"], r["step"]] for r in result["prefill_steps"]["rows"]]))
    if ops:
        console.print(_table("ops (top 20 by total time, one generation)", ["program", "op", "calls", "total ms", "mean ms"],
                             [[r["program"], r["op"], r["calls"], r["total_ms"], r["mean_ms"]] for r in result["ops"][:20]]))


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--runtime", default="onnxruntime", show_default=True, type=click.Choice(["eager", "onnxruntime", "executorch", "tvm", "coreml"]),
              help="eager rebuilds the PyTorch model with the bundle's passes; coreml: macOS only")
@click.option("--image", required=True, type=click.Path(path_type=Path), help="image file (PNG, JPEG, ...)")
@click.option("--prompt", "-p", required=True, help="the question, put into the bundle's prompt template")
@click.option("--max-new-tokens", default=16, show_default=True, help="greedy tokens generated at most (EOS stops earlier)")
@_device_options
@click.option("--json", "as_json", is_flag=True, help="tokens and stage timings as JSON")
def run(bundle, runtime, image, prompt, max_new_tokens, device, devices_file, as_json):
    """Answer a prompt about an image with greedy decoding, here or on a device."""
    from vlmc import api

    result = api.run(bundle, runtime, image, prompt, max_new_tokens, device=device, devices_file=devices_file)
    if as_json:
        return _json_out(result)
    click.echo(result["text"])


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--runtime", default="onnxruntime", show_default=True, type=click.Choice(["onnxruntime", "executorch", "tvm"]),
              help="the runtime run here and on the device")
@click.option("--image", required=True, type=click.Path(path_type=Path), help="image file (PNG, JPEG, ...)")
@click.option("--prompt", "-p", required=True, help="the question, put into the bundle's prompt template")
@click.option("--max-new-tokens", default=4, show_default=True, help="greedy tokens generated at most (EOS stops earlier)")
@click.option("--device", "-d", required=True, help="a name from the devices file or a URL (ssh://, adb://, qemu-aarch64)")
@click.option("--devices", "devices_file", default=None, help="devices file (default $VLMC_DEVICES or ~/.config/vlmc/devices.yaml)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def compare(bundle, runtime, image, prompt, max_new_tokens, device, devices_file, as_json):
    """The device's kernels against this host's: the same question, same runtime, logits and tokens compared."""
    from vlmc import api

    result = api.compare(bundle, runtime, image, prompt, device, devices_file, max_new_tokens)
    if as_json:
        _json_out(result)
    else:
        row = result["logits"]
        measure = (f"rel err {row['rel_err']:.3g} (bound {row['bound']:.3g})" if result["quantized"]
                   else f"max |diff| {row['max_abs_err']:.3g} ({row['tolerance_used']:.3g} x tolerance)")
        click.echo(f"{result['device']} vs this host on {runtime}: first-token logits {measure}; "
                   f"tokens {'agree' if result['tokens']['agree'] else 'differ'} ({result['tokens']['device']} vs {result['tokens']['host']})")
        click.echo("agrees" if result["agrees"] else "DIFFERS")
    if not result["agrees"]:
        sys.exit(1)


@cli.command(name="eval")
@click.argument("target")
@click.option("--runtime", default="eager", show_default=True, type=click.Choice(["eager", "onnxruntime", "executorch", "tvm", "coreml"]),
              help="coreml: macOS only")
@click.option("--dataset", default="shapes-vqa", show_default=True, help="shapes-vqa, or a questions.jsonl path")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]), help="ShapesVQA split")
@click.option("--n", "count", default=2000, show_default=True, help="number of questions")
@click.option("--no-reference", is_flag=True, help="accuracy only: skip the uncompressed model (no agreement or KL; about twice as fast)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def evaluate(target, runtime, dataset, split, count, no_reference, as_json):
    """Accuracy of a bundle (or a model, eager) on ShapesVQA or your questions.jsonl."""
    from vlmc import api

    with _Bar("eval", not as_json, every=100) as update:
        r = api.evaluate(target, runtime, dataset, split, count, progress=None if as_json else _progress(True),
                         reference=not no_reference, tick=update and (lambda done, what: update(done, count, what)))
    if as_json:
        return _json_out(r)
    console = _console()
    where = f"{r['dataset']} {r['split']}" if r["split"] else r["dataset"]
    console.print(f"[bold]{r['target']}[/bold] on {r['runtime']}, {where}, {r['n']} questions, {r['seconds']} s")
    rows = [["all", r["n"], r["accuracy"], f"{r['ci95'][0]}..{r['ci95'][1]}"]]
    rows += [[t, v["n"], v["accuracy"], f"{v['ci95'][0]}..{v['ci95'][1]}"] for t, v in r["per_type"].items()]
    console.print(_table("accuracy (%)", ["type", "n", "accuracy", "95% CI"], rows))
    if "agreement" in r:
        console.print(f"agreement with the uncompressed model: {r['agreement']}%   mean KL of the answer distribution: {r['mean_kl']:.3g}")
    if "note" in r:
        console.print(f"note: {r['note']}")


def _list(text: Optional[str], kind=str) -> Optional[list]:
    """`a,b` -> [a, b] (None when the flag is not given); `none` stands for the axis' null value."""
    if text is None:
        return None
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if part.lower() in ("none", "null", "native", "fp32"):
            out.append(None)
            continue
        try:
            out.append(kind(part))
        except ValueError:
            raise VlmcError(f"expected comma-separated {kind.__name__}s, got {part!r} in {text!r}") from None
    return out


class _Bar:
    """A progress bar on stderr with the time left, used as `with _Bar("sweep", enabled) as update:` and
    `update(done, total, what)`. In a log (not a terminal) it prints a line every `every` steps instead."""

    def __init__(self, title: str, enabled: bool, every: int = 1):
        self.title, self.enabled, self.every = title, enabled, every
        self.console = _console(stderr=True) if enabled else None
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return None
        import time

        if not self.console.is_terminal:
            started = time.time()

            def line(done, total, what):
                if done % self.every and done != total:
                    return
                eta = (time.time() - started) / done * (total - done) if done and total else None
                left = f", about {eta / 60:.1f} min left" if eta is not None else ""
                self.console.print(f"{self.title} {done}/{total or '?'}{left}: {what}")
            return line
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn(f"[bold]{self.title}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.description}"), console=self.console)
        task = self.bar.add_task("", total=None)
        self.bar.start()
        return lambda done, total, what: self.bar.update(task, completed=done, total=total, description=what)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


@cli.command()
@click.argument("grid_file", required=False, type=click.Path(path_type=Path))
@click.option("--model", "-m", default=None, help="model (default shapes-llava)")
@click.option("--resolution", default=None, help="input sides, comma-separated (none = native): 96,80")
@click.option("--tile-grid", "tile_grid", default=None, help="tiled families: the uncompressed point's grid, e.g. 2x2")
@click.option("--tiles", default=None, help="tiled families: other grids, comma-separated (global = no tiles): 1x2,global")
@click.option("--tokens", default=None, help="token configurations METHOD@KEEP[:key=value,...], comma-separated: "
                                            "divprune@49,tome@98,embedlens@49:inject=2")
@click.option("--methods", default=None, help="token passes crossed with --keep (NAME-static: a selecting method's calibrated static mode)")
@click.option("--keep", default=None, help="visual tokens kept, crossed with --methods: 98,49,22")
@click.option("--quant", "quant", multiple=True, help="one quantization configuration per option, passes joined by + "
              "(none, w8a8, w4:at=decoder, w8a8:at=vision+w4:at=decoder, kv8, w8a8+kv8, w4:at=decoder+embed8)")
@click.option("--runtimes", default=None, help="onnxruntime, executorch, tvm (default onnxruntime,executorch)")
@click.option("--devices", default=None, help="devices to profile on (vlmc devices), default local")
@click.option("--dataset", default=None, help="shapes-vqa (default) or a questions.jsonl")
@click.option("--n", "count", default=None, type=int, help="questions per point (default 500)")
@click.option("--iterations", default=None, type=int, help="timed runs per program (default 10)")
@click.option("--interleave", default=None, type=int, help="then time every point again, point after point, this many "
              "rounds per runtime (the medians replace the per-point profile's): drift hits every point alike")
@click.option("--executor", default=None, type=click.Choice(["local", "ray"]), help="ray: points as Ray tasks (RAY_ADDRESS for a cluster)")
@click.option("--search", default=None, type=click.Choice(["optuna"]), help="TPE search over the axes instead of the full grid")
@click.option("--trials", default=None, type=int, help="--search: points to measure (default 20)")
@click.option("--retention-floor", default=None, type=float, help="--search: accuracy retention to keep, % (default 97)")
@click.option("--budget", default=None, help="pick the fastest point meeting it: \"ttft<=40%,retention>=97%\"")
@click.option("--out", "-o", default=Path("sweep"), show_default=True, type=click.Path(path_type=Path),
              help="results and the per-point cache (a rerun resumes)")
@click.option("--force", is_flag=True, help="replace results in --out that no grid wrote")
@click.option("--json", "as_json", is_flag=True, help="print the results (and the budget's choice) as JSON")
def sweep(grid_file, model, resolution, tile_grid, tiles, tokens, methods, keep, quant, runtimes, devices, dataset, count, iterations,
          interleave, executor, search, trials, retention_floor, budget, out, force, as_json):
    """Resolutions x tiles x token methods x quantization, on each runtime and device: accuracy, retention, TTFT
    (vision encode + prefill), decode speed, size and peak memory against the uncompressed model.
    Resumable: every point is cached in --out by its recipe."""
    from vlmc import sweep as sweeping

    if (methods is None) != (keep is None):
        raise VlmcError("--methods and --keep go together (or give --tokens METHOD@KEEP)")
    token_list = None if tokens is None else sweeping.split_token_configs(tokens)
    if methods is not None:
        token_list = (token_list or []) + [f"{m}@{k}" for m in _list(methods) if m for k in _list(keep, int) if k]
    overrides = {"model": model, "resolution": _list(resolution, int), "tile_grid": tile_grid, "tiles": _list(tiles),
                 "tokens": token_list,
                 "quant": [None if q.lower() in ("none", "fp32") else q for q in quant] or None,
                 "runtimes": _list(runtimes), "devices": _list(devices), "dataset": dataset, "n": count,
                 "iterations": iterations, "interleave": interleave, "executor": executor}
    if search:
        overrides["search"] = {k: v for k, v in {"trials": trials, "retention_floor": retention_floor}.items() if v is not None}
    elif trials is not None or retention_floor is not None:
        raise VlmcError("--trials and --retention-floor belong to --search optuna")
    grid = sweeping.load_grid(grid_file, overrides)
    if budget:
        sweeping.parse_budget(budget)  # a typo is refused before hours of measuring
    sweeping.check_output(out, force)
    with _Bar("sweep", not as_json) as progress:
        result = sweeping.run(grid, out, progress)
    chosen = sweeping.choose(result, budget) if budget else None
    if as_json:
        return _json_out({**result, **({"budget": budget, "chosen": chosen} if budget else {})})
    click.echo(sweeping.to_markdown(result))
    click.echo(f"wrote {out / 'sweep.json'}, sweep.csv and sweep.md (report: vlmc report {out} -o report.html)")
    if budget:
        _print_choice(budget, chosen)


def _print_choice(budget: str, chosen: list) -> None:
    import yaml

    if not chosen:
        raise VlmcError(f"no point meets the budget {budget!r}")
    for r in chosen:
        click.echo(f"\nbudget {budget}: {r['runtime']} / {r['device']}: {r['label']} "
                   f"(TTFT {r['ttft_speedup']}x, retention {r['retention']}%); its recipe:")
        click.echo(yaml.safe_dump(r["recipe"], sort_keys=False).rstrip())


@cli.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "-o", default=Path("report.html"), show_default=True, type=click.Path(path_type=Path), help="the HTML page (its figures go in <out>_files/)")
@click.option("--budget", default=None, help="mark the fastest point meeting it: \"ttft<=40%,retention>=97%\"")
def report(results, out, budget):
    """A sweep's Pareto fronts (accuracy vs TTFT, size, peak memory), headline, table and every point's recipe
    as one HTML page (figures also as PNGs in <out>_files/). Several sweeps of the same model and settings
    are merged into one page."""
    from vlmc import report as reporting

    result = reporting.load_results(results)
    if budget:
        chosen = reporting.choose(result, budget)
    path = reporting.render(result, out, budget)
    click.echo(f"wrote {path} (figures in {path.with_name(path.stem + '_files')})")
    for h in reporting.headline(result):
        click.echo(f"{h['runtime']} / {h['device']}: fastest at >= 97% retention: {h['label']}, TTFT {h['ttft_speedup']}x "
                   f"({h['ttft_ms']:.2f} vs {h['baseline_ttft_ms']:.2f} ms), retention {h['retention']}%")
    if budget:
        _print_choice(budget, chosen)


@cli.command()
@click.argument("name", type=click.Choice(["shapes-vqa"]))
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]), help="ShapesVQA split")
@click.option("--n", "count", default=8, show_default=True, help="questions (and their images) to write")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="folder for the images and questions.jsonl")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def dataset(name, split, count, out, as_json):
    """Write sample images and a questions.jsonl of a built-in dataset."""
    from vlmc.eval import shapes_vqa

    path = shapes_vqa.write(split, count, out)
    if as_json:
        return _json_out({"dataset": name, "split": split, "n": count, "questions": str(path),
                          "images": [str(path.parent / f"{split}_{i:05d}.png") for i in range(count)]})
    click.echo(f"wrote {count} {split} items to {path}")


def _quiet_native_logs() -> None:
    """Keep the runtimes' C++ log lines off the terminal; Python's own stderr stays on it."""
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    for name in ("coremltools", "torch", "onnxscript", "executorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if os.environ.get("VLMC_DEBUG"):
        return
    global _ERR
    try:
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        _ERR = os.fdopen(saved, "w", buffering=1)
        sys.stderr = open(os.devnull, "w")
    except OSError:
        pass


def main() -> None:
    _quiet_native_logs()
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", file=_ERR)
        sys.exit(130)
    except click.UsageError as e:  # a bad flag or value: one line naming it, like every other bad input
        click.echo(f"error: {e.format_message()}", file=_ERR)
        sys.exit(2)
    except click.ClickException as e:
        e.show(file=_ERR)
        sys.exit(e.exit_code)
    except VlmcError as e:
        click.echo(f"error: {e}", file=_ERR)
        sys.exit(2)
    except Exception as e:  # a bug, not bad input: still one line unless VLMC_DEBUG asks for the traceback
        if os.environ.get("VLMC_DEBUG"):
            raise
        click.echo(f"error: internal: {e.__class__.__name__}: {first_line(e)} (set VLMC_DEBUG=1 for the traceback)", file=_ERR)
        sys.exit(1)


if __name__ == "__main__":
    main()
