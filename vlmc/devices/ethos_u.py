"""ethos-u85: an estimate of the vision encoder on Arm's Ethos-U85 NPU, from Vela; nothing runs on an NPU.

The bundle's vision encoder (its token passes included, rebuilt from the bundle's recipe) is quantized for
the NPU with ExecuTorch's Arm quantizer (int8 PT2E, calibrated on a few images), lowered through
ExecuTorch's Arm backend to TOSA and compiled by Vela for an Ethos-U85 configuration (`npu` setting,
default ethos-u85-256). Vela's performance model gives cycles, time and memory per partition; ops the
NPU cannot run stay on the CPU and are listed. The int8 numerics are checked by running the TOSA graph on
the TOSA reference model against the quantized model in PyTorch and against float eager.

`vlmc devices setup ethos-u85` installs Vela and tosa-tools (the reference model and TOSA serializer)
into a cache folder of their own, without their dependency pins: tosa-tools pins numpy<2.2, ml-dtypes
0.5.1 and flatbuffers 25.2.10, which would break onnx in this environment; both run with its numpy 2.
Image preprocessing (normalisation) stays on the CPU: the NPU program takes normalised float pixels.
"""
from __future__ import annotations

import contextlib
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from vlmc.devices import Device, DeviceConfig
from vlmc.cache import cache_root, is_set_up, set_up
from vlmc.errors import VlmcError, first_line

PACKAGES = ("ethos-u-vela==5.1.0", "tosa-tools==2026.5.0")  # the versions executorch 1.5.1's [ethos-u] extra names
NPUS = tuple(f"ethos-u85-{macs}" for macs in (128, 256, 512, 1024, 2048))
CALIBRATION_IMAGES = 8
ESTIMATE_NOTE = "an estimate from Vela's performance model for the NPU (no NPU ran); CPU-side ops are not timed"


def site_dir() -> Path:
    return cache_root() / "ethos-u85"


def setup(progress: Callable[[str], None] = lambda m: None, force: bool = False) -> dict:
    """Vela and tosa-tools into their own folder, without their numpy/ml-dtypes pins."""
    def install(staging: Path) -> dict:
        progress(f"PyPI: {', '.join(PACKAGES)}")
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                               "--target", str(staging), *PACKAGES], capture_output=True, text=True)
        if done.returncode != 0:
            raise VlmcError(f"pip could not install {', '.join(PACKAGES)}: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        return {"packages": list(PACKAGES)}

    return set_up(site_dir(), install, force)


def activate() -> None:
    """Make Vela and the TOSA tools importable here, or say how to get them."""
    site = site_dir()
    if not is_set_up(site):
        raise VlmcError("ethos-u85: Vela and the TOSA tools are not set up (run `vlmc devices setup ethos-u85`)")
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    try:
        import importlib

        for module in ("tosa_reference_model", "tosa_serializer", "ethosu.vela.vela", "executorch.backends.arm.ethosu"):
            importlib.import_module(module)
    except ImportError as e:
        raise VlmcError(f"ethos-u85: {first_line(e)} (rerun `vlmc devices setup ethos-u85 --force`; needs vlmc[executorch])") from None


class EthosUDevice(Device):
    def __init__(self, config: DeviceConfig):
        super().__init__(config)
        self.npu = config.get("npu", "ethos-u85-256")
        if self.npu not in NPUS:
            raise VlmcError(f"device {config.name}: unknown npu {self.npu!r} (one of {', '.join(NPUS)})")
        self.system_config = config.get("system_config")
        self.memory_mode = config.get("memory_mode")

    def check(self) -> dict:
        activate()
        return {"machine": f"{self.npu} (Vela estimate)", "system": "Arm Ethos-U85 NPU", "runtimes": ["executorch"]}

    def profile(self, bundle, runtime, warmup, iterations, ops, new_tokens, progress, curve=None):
        if curve:
            raise VlmcError("ethos-u85 estimates one compiled graph; a prefill curve needs a device that runs it")
        if runtime != "executorch":
            raise VlmcError(f"ethos-u85 estimates ExecuTorch's Arm backend (--runtime executorch), not {runtime}")
        activate()
        with _stdout_to_stderr():  # Vela and the reference model print their reports on stdout (--json goes there)
            return estimate(bundle, self.npu, self.system_config, self.memory_mode, progress) | {"device": self.name}

    def generate(self, bundle, runtime, prompt, pixels, max_new_tokens, with_logits=False):
        raise VlmcError("ethos-u85 is an estimate of the vision encoder on the NPU; nothing runs there (use vlmc profile)")


@contextlib.contextmanager
def _stdout_to_stderr():
    """Python's and native code's stdout (fd 1) sent to stderr for the duration."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


class _NpuVisionEncoder:
    """The vision encoder as the NPU takes it: normalised float pixels [1,3,H,W] -> embeddings."""

    @staticmethod
    def build(model):
        import torch

        class Program(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, pixels):
                return self.model.encode_image(pixels)

        return Program().eval()


def _calibration_pixels(model, prompt: dict) -> list:
    """A few ShapesVQA images, resized by the bundle's rule and normalised as the model does."""
    import torch
    from vlmc.eval import shapes_vqa
    from vlmc.runtimes.image import resize_array, tiles

    size = prompt["image_size"]
    out = []
    for item in shapes_vqa.items("val", CALIBRATION_IMAGES):
        resized = resize_array(np.ascontiguousarray(item.image.transpose(2, 0, 1)), size, prompt.get("image_resize"))
        out += [model.normalize(torch.from_numpy(tile)) for tile in tiles(resized)]
    return out


def _vela_summaries(intermediates: Path, flags: list[str], progress) -> list[dict]:
    """Vela run on each TOSA partition the lowering wrote, its summary CSV read back."""
    from ethosu.vela import vela

    rows = []
    for i, tosa in enumerate(sorted(intermediates.glob("output_tag*.tosa"))):
        progress(f"ethos-u85: Vela on partition {i}")
        out_dir = intermediates / f"vela_{i}"
        args = [f for f in flags if not f.startswith("--output-dir")] + [f"--output-dir={out_dir}", str(tosa)]
        vela.main(args)
        (summary,) = out_dir.glob("*_summary_*.csv")
        with open(summary) as f:
            rows.append(next(csv.DictReader(f)))
    return rows


def _cpu_ops(edge_program) -> list[str]:
    """The ops left outside the NPU's delegates (quantize/dequantize at the boundaries aside)."""
    names = []
    for node in edge_program.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(getattr(node.target, "__name__", node.target))
        if "executorch_call_delegate" in name or name == "getitem" or re.search(r"(quantize|dequantize)_per_", name):
            continue
        names.append(name.split("::")[-1].removeprefix("aten.").split(".")[0])
    return sorted(set(names))


def _tosa_numerics(intermediates: Path, edge_program, quantized_module, float_module, pixels) -> dict:
    """The TOSA graph on the reference model vs the quantized model in PyTorch and vs float eager; only for
    a vision encoder that is one NPU partition between a quantize and a dequantize."""
    import torch
    import tosa_reference_model as reference_model

    tosa_files = sorted(intermediates.glob("output_tag*.tosa"))
    nodes = [n for n in edge_program.graph.nodes if n.op == "call_function"]
    q_in = next((n for n in nodes if "quantize_per_tensor" in str(n.target) and "dequantize" not in str(n.target)), None)
    dq_out = [n for n in nodes if "dequantize_per_tensor" in str(n.target)]
    if len(tosa_files) != 1 or q_in is None or len(dq_out) != 1:
        return {"checked": False, "reason": f"{len(tosa_files)} NPU partitions: the reference model checks a single one"}
    in_scale, in_zp = float(q_in.args[1]), int(q_in.args[2])
    out_scale, out_zp = float(dq_out[0].args[1]), int(dq_out[0].args[2])
    x = torch.clamp(torch.round(pixels / in_scale) + in_zp, -128, 127).to(torch.int8).numpy()
    outputs, status = reference_model.run(tosa_files[0].read_bytes(), [x], verbosity="LOW", initialize_variable_tensor_from_numpy=True)
    if status != reference_model.GraphStatus.TOSA_VALID:
        return {"checked": False, "reason": f"the TOSA reference model rejected the graph ({status})"}
    npu = (outputs[0].astype(np.float32) - out_zp) * out_scale
    with torch.no_grad():
        fake_quant = quantized_module(pixels).numpy()
        fp32 = float_module(pixels).numpy()
    npu = npu.reshape(fake_quant.shape)

    def rel(a, b):
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))

    return {"checked": True, "max_abs_err_vs_pytorch_int8": float(np.abs(npu - fake_quant).max()),
            "output_step": out_scale, "rel_err_vs_pytorch_int8": round(rel(npu, fake_quant), 5),
            "rel_err_vs_float": round(rel(npu, fp32), 5)}


def estimate(bundle, npu: str, system_config: str | None, memory_mode: str | None, progress) -> dict:
    """Lower the bundle's vision encoder for the NPU and read Vela's estimate (see the module's doc)."""
    import torch
    from executorch.backends.arm.ethosu import EthosUCompileSpec, EthosUPartitioner
    from executorch.backends.arm.quantizer import EthosUQuantizer, get_symmetric_quantization_config
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from torch.export import export
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from vlmc.exporter.build import prepare
    from vlmc.recipe import build

    started = time.time()
    progress("ethos-u85: rebuilding the vision encoder from the bundle's recipe")
    prepared = prepare(build(bundle.manifest["recipe"], f"{bundle.path}/manifest.json"))
    program = _NpuVisionEncoder.build(prepared.loaded.model)
    images = _calibration_pixels(prepared.loaded.model, bundle.manifest["prompt"])
    spec = EthosUCompileSpec(npu, system_config=system_config, memory_mode=memory_mode)
    with tempfile.TemporaryDirectory(prefix="vlmc-ethos-u-") as tmp:
        intermediates = Path(tmp)
        spec.dump_intermediate_artifacts_to(str(intermediates))
        quantizer = EthosUQuantizer(spec)
        quantizer.set_global(get_symmetric_quantization_config())
        progress(f"ethos-u85: int8 quantization (PT2E, Arm quantizer, {len(images)} calibration images)")
        try:
            with torch.no_grad():
                ep = export(program, (images[0],), strict=False)
                module = prepare_pt2e(ep.module(check_guards=False), quantizer)
                for x in images:
                    module(x)
                module = convert_pt2e(module)
                quantized_ep = export(module, (images[0],), strict=False)
            progress(f"ethos-u85: lowering through the Arm backend and Vela ({npu})")
            edge = to_edge_transform_and_lower(quantized_ep, partitioner=[EthosUPartitioner(spec)],
                                               compile_config=EdgeCompileConfig(_check_ir_validity=False))
        except VlmcError:
            raise
        except Exception as e:  # exir and Vela raise many types; the first line names the op or pass
            raise VlmcError(f"ethos-u85: lowering failed: {first_line(e)}") from None
        summaries = _vela_summaries(intermediates, spec.compiler_flags, progress)
        progress("ethos-u85: int8 numerics on the TOSA reference model")
        numerics = _tosa_numerics(intermediates, edge.exported_program(), module, program, images[0])
    partitions = [{
        "npu_cycles": int(float(s["cycles_npu"])), "total_cycles": int(float(s["cycles_total"])),
        "time_ms": round(float(s["inference_time"]) * 1e3, 4), "macs": int(float(s["nn_macs"])),
        "sram_kib": float(s["sram_memory_used"]), "dram_kib": float(s["dram_memory_used"]),
        "on_chip_flash_kib": float(s["on_chip_flash_memory_used"]), "off_chip_flash_kib": float(s["off_chip_flash_memory_used"]),
        "weights_bytes_encoded": int(float(s["total_npu_encoded_weights"])),
    } for s in summaries]
    first = summaries[0] if summaries else {}
    return {
        "bundle": str(bundle.path), "runtime": "executorch", "estimate": True, "note": ESTIMATE_NOTE,
        "npu": {"config": first.get("accelerator_configuration", npu), "system_config": first.get("system_config"),
                "memory_mode": first.get("memory_mode"), "clock_hz": float(first["core_clock"]) if first else None},
        "programs": {"vision_encoder": {
            "npu_time_ms": round(sum(p["time_ms"] for p in partitions), 4),
            "npu_cycles": sum(p["npu_cycles"] for p in partitions), "total_cycles": sum(p["total_cycles"] for p in partitions),
            "macs": sum(p["macs"] for p in partitions), "partitions": partitions,
            "cpu_ops": _cpu_ops(edge.exported_program()),
        }},
        "numerics": numerics, "seconds": round(time.time() - started, 1),
        "host": {"machine": npu, "cpus": None},
    }
