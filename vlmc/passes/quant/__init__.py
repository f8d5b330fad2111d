"""Post-training quantization passes: what each part of the model (vision, decoder) is quantized to.

A quantization pass is data about a part; each target applies it with its own ecosystem's stack
(ExecuTorch: PT2E + XNNPACKQuantizer, torchao; ONNX: onnxruntime.quantization; Core ML:
coremltools.optimize), calibrated on real questions (`calibration` in the recipe). Methods that change
weights before export (SmoothQuant / MASQuant in `smoothing`, DASQ in `dasq`, GPTQ in `gptq`) run when a
target asks for its model (`ExportContext.target_model`): smoothing and DASQ once, GPTQ once per target,
on its own grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

from pydantic import Field
from torch import nn

from vlmc.errors import VlmcError
from vlmc.passes.registry import Pass, PassConfig, register

PARTS = ("vision", "decoder")
DASQ_SOURCE = "DASQ (hidden symmetry in vision weights: dense symmetric kernel plus sparse outliers, CVPR 2026)"
DASQ_DEPARTURES = ("dasq: a fixed number of outliers per row (the paper thresholds) so shapes stay static; the "
                   "outliers' int8 values are stored dequantized, as a gather-multiply-sum beside the dense product, "
                   "since no target has a sparse integer format")
# the methods' own parameters: the methods that read each, and its default
METHOD_PARAMS = {"text_share": (("gptq-modality",), 0.5), "alpha": (("smoothquant", "masquant"), 0.5),
                 "rank": (("masquant", "quant-experts"), 8), "outliers": (("dasq",), 0.01), "experts": (("quant-experts",), 4),
                 "base_rounding": (("quant-experts",), "nearest"), "bits": (("qig",), 5.0), "steps": (("qig",), 8)}
# the methods that read calibration data (min-max weights and DASQ's split need none)
CALIBRATED_METHODS = ("gptq", "gptq-modality", "smoothquant", "masquant", "quant-experts", "qig")
# the 4-bit methods fitted to each target's own grid (one model per target)
PER_TARGET_METHODS = ("gptq", "gptq-modality", "quant-experts")
FOUR_BIT_METHODS = (*PER_TARGET_METHODS, "qig")


class QuantConfig(PassConfig):
    at: Literal["vision", "decoder", "all"] = Field("all", description="the part quantized: vision (ViT + projector), decoder, or all")
    method: Literal["minmax", "gptq", "gptq-modality", "smoothquant", "masquant", "dasq", "quant-experts", "qig"] = Field(
        "minmax", description="minmax (round to nearest, ranges by min-max), gptq (error-compensating rounding, w4), "
                              "gptq-modality (gptq with VLM-PTQ's modality-aware Hessian, w4), smoothquant (activation "
                              "outliers moved into the weights, w8a8), masquant (smoothing per modality, w8a8), dasq "
                              "(vision tower: dense symmetric kernel plus sparse int8 outliers, at: vision), "
                              "quant-experts (float low-rank experts rebuilding the rounding error: one shared, "
                              "`experts` routed per token, w4), qig (mixed 4 / 8-bit weights: the linears whose "
                              "rounding error the answer is most sensitive to, by integrated gradients, get 8 bits "
                              "within an average of `bits`, w4)")
    outliers: Optional[float] = Field(None, gt=0.0, le=0.1, description="dasq: share of each weight row kept apart as "
                                      "sparse outliers (default 0.01, at least one per row)")


class W8A8Config(QuantConfig):
    alpha: Optional[float] = Field(None, ge=0.0, le=1.0, description="smoothquant / masquant: migration strength "
                                   "(default 0.5)")
    rank: Optional[int] = Field(None, ge=1, description="masquant: rank of the visual rows' correction (default 8)")


class W4Config(QuantConfig):
    text_share: Optional[float] = Field(None, ge=0.0, le=1.0, description="gptq-modality: the text tokens' share of the "
                                        "decoder Hessian (default 0.5; plain gptq weights tokens by count)")
    group_size: int = Field(32, description="weights per quantization group along the input channels (16..256, a power of two)")
    rank: Optional[int] = Field(None, ge=1, le=64, description="quant-experts: rank of each expert (default 8)")
    experts: Optional[int] = Field(None, ge=0, le=16, description="quant-experts: routed experts per linear, the "
                                   "router picking one per token (default 4; 0: the shared expert only)")
    base_rounding: Optional[Literal["nearest", "gptq"]] = Field(None, description="quant-experts: the rounding whose error "
                                                                "the experts rebuild (default nearest; gptq: GPTQ first)")
    bits: Optional[float] = Field(None, gt=4.0, le=8.0, description="qig: the part's average weight bits (4 plus 4 for "
                                  "each promoted weight; scales not counted), the budget the 8-bit linears fit in (default 5)")
    steps: Optional[int] = Field(None, ge=1, le=64, description="qig: integration points along the float -> 4-bit path "
                                 "(default 8)")
    promote: Optional[list[str]] = Field(None, description="qig: the linears given 8 bits (measured on the calibration "
                                         "questions when not given, and written here so the bundle rebuilds without data)")
    sensitivity: Optional[dict[str, list[float]]] = Field(None, description="qig: what it measured per linear, "
                                                           "[token-level sensitivity, share of the 4-bit model's KL, image "
                                                           "rows' share of the sensitivity] (filled in, for the record)")


class QuantPass(Pass):
    """A scheme for one part; `needs_calibration` when activation ranges are fixed from data."""

    kind = "quant"
    weight_bits: ClassVar[int]
    needs_calibration: ClassVar[bool] = False
    Config = QuantConfig

    @classmethod
    def acts_at(cls) -> list[str]:
        return [*PARTS, "all"]

    @property
    def parts(self) -> list[str]:
        return list(PARTS) if self.config.at == "all" else [self.config.at]

    def check(self, model) -> None:
        """Refuse parameters this model cannot take (VlmcError naming the parameter)."""
        method = self.config.method
        if method == "qig" and not self.takes(method):
            raise VlmcError(f"pass {self.name}: parameter 'method': qig chooses 4 or 8 bits per linear; it is a method "
                            "of w4 (--pass w4:method=qig,bits=5)")
        if method in PER_TARGET_METHODS and not self.takes(method):
            raise VlmcError(f"pass {self.name}: parameter 'method': {method} is for 4-bit weights (w4); 8-bit rounding "
                            "error is too small for error compensation to matter")
        if method == "dasq" and self.config.at != "vision":
            raise VlmcError(f"pass {self.name}: parameter 'method': dasq is for the vision tower (at: vision, not "
                            f"{self.config.at}); its finding, weights symmetric once a few outliers are out, is about "
                            "vision weights")
        if not self.takes(method):
            raise VlmcError(f"pass {self.name}: parameter 'method': {method} is for w8a8; smoothing helps where "
                            "activations are quantized with ranges fixed from calibration")
        for param, (methods, _) in METHOD_PARAMS.items():
            if getattr(self.config, param, None) is not None and method not in methods:
                mine = [m for m in methods if self.takes(m)]  # only the methods this scheme takes
                raise VlmcError(f"pass {self.name}: parameter '{param}' applies to method {' / '.join(mine)} only "
                                f"(method is {method})")

    def takes(self, method: str) -> bool:
        """Whether this scheme can use `method` (error compensation is for 4 bits, smoothing for w8a8)."""
        if method in FOUR_BIT_METHODS:
            return self.weight_bits == 4
        return method not in ("smoothquant", "masquant") or self.name == "w8a8"

    def calibrate(self, model, calibration) -> None:
        """Fix from calibration data what the scheme chooses per model (written into its config, so the bundle
        rebuilds without the data); most schemes choose nothing."""

    @property
    def filled(self) -> dict:
        """The config fields `calibrate` filled in, for the resolved recipe."""
        return {}

    def param(self, name: str):
        """A method parameter's value (its default when not given), or None where the method does not read it."""
        methods, default = METHOD_PARAMS[name]
        if self.config.method not in methods:
            return None
        value = getattr(self.config, name, None)
        return default if value is None else value

    def describe(self, target: Optional[str] = None) -> dict:
        out = {"scheme": self.name, "weight_bits": self.weight_bits, "method": self.config.method}
        if hasattr(self.config, "group_size"):
            out["group_size"] = self.config.group_size
        for param in METHOD_PARAMS:
            if self.param(param) is not None:
                out[param] = self.param(param)
        if target and self.config.method.startswith("gptq"):
            from vlmc.passes.quant.gptq import GRIDS

            out["rounding"] = f"GPTQ over the calibration inputs, on the {GRIDS[target].name} grid (static groups)"
        if target and self.config.method == "quant-experts":
            from vlmc.passes.quant.gptq import GRIDS

            how = "GPTQ" if self.param("base_rounding") == "gptq" else "round to nearest"
            out["rounding"] = (f"{how} on the {GRIDS[target].name} grid; float experts fitted to its error "
                               "(kept out of the target's quantization)")
        if self.config.method == "qig":
            out["promoted_to_8_bits"] = list(self.config.promote or [])
        return out


@register
class W8A8(QuantPass):
    """Static int8: per-channel symmetric int8 weights, per-tensor int8 activations from calibration ranges."""

    name = "w8a8"
    weight_bits = 8
    needs_calibration = True
    source = ("W8A8 as deployed by XNNPACK / onnxruntime QDQ, ranges by min-max calibration; method smoothquant: "
              "SmoothQuant (Xiao et al., 2023); method masquant: MASQuant (modality-aware smoothing, CVPR 2026); "
              f"method dasq: {DASQ_SOURCE}")
    departures = ("Core ML on Linux quantizes the weights only: calibrating its activations runs the model, which "
                  "needs macOS. TVM quantizes the weights only: its Relax has no integer-activation CPU kernels. "
                  "masquant: a row's modality comes from its position in the prompt template; the text rows' weights are the exact ones and the image rows get the low-rank correction; the correction's "
                  f"small linears are quantized like the others. {DASQ_DEPARTURES}")
    Config = W8A8Config


@register
class W8(QuantPass):
    """Per-channel int8 weights; activations quantized per call from their own range (no calibration)."""

    name = "w8"
    weight_bits = 8
    source = f"dynamic quantization (XNNPACK qd8, onnxruntime MatMulInteger); method dasq: {DASQ_SOURCE}"
    departures = ("Core ML has no dynamic activation quantization: its weights are int8, its activations fp16/fp32; "
                  f"TVM's likewise (float32). {DASQ_DEPARTURES}")


@register
class W4(QuantPass):
    """Group-wise symmetric 4-bit weights along the input channels."""

    name = "w4"
    weight_bits = 4
    source = ("group-wise int4 weights; method gptq: GPTQ (Frantar et al., 2023); method gptq-modality: VLM-PTQ's "
              f"modality-aware Hessian (CVPR 2026); method dasq: {DASQ_SOURCE}; method quant-experts: Quant Experts "
              "(token-aware error reconstruction with a mixture of low-rank experts, CVPR 2026); method qig: QIG "
              "(quantization-aware integrated gradients, token-level sensitivity, CVPR 2026)")
    departures = ("ExecuTorch's XNNPACK runs 4-bit group-wise weights only with dynamically quantized int8 "
                  "activations (torchao 8da4w), so there the activations are int8 too; Core ML needs "
                  "minimum_deployment_target iOS18 / macOS15 for block-wise int4; TVM's activations stay float32. "
                  "gptq: the Hessians come from the float model in one pass (not layer by layer on the quantized model's inputs) and the scales from the "
                  "original weights (static groups); gptq-modality mixes the two modalities' Hessians by a fixed share "
                  "instead of VLM-PTQ's per-channel importance vector, without its closed-form target correction. "
                  f"{DASQ_DEPARTURES}. quant-experts: the experts are fitted in closed form (whitened SVD of the error, "
                  "shared over all calibration inputs, routed per k-means cluster of them) instead of the paper's "
                  "frequency split of channels and optimisation; the router is the nearest cluster centre; every routed "
                  "expert runs for every token and is masked to the chosen one (static shapes); the experts stay float. "
                  "qig: the paper weights a uniform W4A8 / W3A16 calibration by its token attributions; here they "
                  "choose 4 or 8 bits per linear under an average-bits budget (a greedy knapsack on the tokens' summed "
                  "absolute attributions per weight); the path's rounding is round to nearest on a symmetric absmax "
                  "grid, one plan for every target; the 8-bit linears are stored as each target's w8")
    Config = W4Config

    def check(self, model) -> None:
        super().check(model)
        g = self.config.group_size
        if g < 16 or g > 256 or g & (g - 1):
            raise VlmcError(f"pass w4: parameter 'group_size': {g} is not a power of two between 16 and 256")
        for part in self.parts:
            for name, layer in linear_layers(model, part):
                if layer.in_features % g:
                    raise VlmcError(f"pass w4: parameter 'group_size': {g} does not divide the {layer.in_features} "
                                    f"input channels of {name}")
        for field in ("promote", "sensitivity"):
            if getattr(self.config, field) is not None and self.config.method != "qig":
                raise VlmcError(f"pass w4: parameter '{field}' applies to method qig only (method is {self.config.method})")
        if self.config.promote is not None:
            names = {name for part in self.parts for name, _ in linear_layers(model, part)}
            unknown = [n for n in self.config.promote if n not in names]
            if unknown:
                raise VlmcError(f"pass w4: parameter 'promote': {', '.join(unknown[:3])} is not a linear of the "
                                f"{' and '.join(self.parts)} part (e.g. {min(names)})")

    def calibrate(self, model, calibration) -> None:
        if self.config.method != "qig" or self.config.promote is not None:
            return
        from vlmc.passes.quant import qig

        if calibration is None:
            raise VlmcError("pass w4: method qig needs calibration questions (recipe 'calibration') or 'promote'")
        layers = [layer for part in self.parts for layer in linear_layers(model, part)]
        found = qig.attribute(model, layers, calibration.questions(model), self.config.group_size, self.param("steps"))
        self.config = self.config.model_copy(update={
            "promote": qig.promote(found, self.param("bits")),
            "sensitivity": {n: [float(f"{a.sensitivity:.4g}"), float(f"{a.kl_share:.4g}"), round(a.image_share, 4)]
                            for n, a in found.items()}})

    @property
    def filled(self) -> dict:
        if self.config.method != "qig":
            return {}
        return {"promote": self.config.promote, "sensitivity": self.config.sensitivity}


def linear_layers(model, part: str) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear layers a part's quantization covers (from the model's anatomy)."""
    return [(f"{prefix}.{name}" if name else prefix, m) for prefix, root in model.part_modules(part)
            for name, m in root.named_modules() if isinstance(m, nn.Linear)]


def promoted_layers(model, scheme, part: str) -> list[str]:
    """The linears of `part` a w4 scheme gives 8 bits (QIG's plan; none for the other methods)."""
    chosen = set(scheme.config.promote or []) if scheme.name == "w4" else set()
    return [name for name, _ in linear_layers(model, part) if name in chosen]


@dataclass
class QuantPlan:
    """Which scheme each part gets; parts absent stay float."""

    schemes: dict[str, QuantPass]
    passes: list[QuantPass]  # in the recipe's order

    def __bool__(self) -> bool:
        return bool(self.schemes)

    @property
    def names(self) -> set[str]:
        return {p.name for p in self.schemes.values()}

    def get(self, part: str):
        return self.schemes.get(part)

    @property
    def needs_calibration(self) -> bool:
        return any(p.needs_calibration or p.config.method in CALIBRATED_METHODS for p in self.schemes.values())

    def describe(self) -> dict:
        return {part: p.describe() for part, p in self.schemes.items()}

    def calibrate(self, model, calibration) -> None:
        """Let each scheme fix what it chooses from data, on the model as exported (token stages in)."""
        for p in self.passes:
            p.calibrate(model, calibration)


def plan(model, passes: list[Pass]) -> QuantPlan:
    """The parts' schemes from the recipe's quantization passes; a part named twice is refused."""
    schemes: dict[str, QuantPass] = {}
    for p in passes:
        p.check(model)
        for part in p.parts:
            if part in schemes:
                raise VlmcError(f"pass {p.name}: parameter 'at': the {part} part is already quantized by {schemes[part].name}")
            schemes[part] = p
    return QuantPlan(schemes, list(passes))
