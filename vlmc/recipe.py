"""The recipe: one validated document that drives export for every target.

A recipe is data (YAML or CLI flags). Unknown fields and bad values are refused with the field's name;
values that depend on the model (prompt length vs image tokens) are checked in `resolve`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vlmc.errors import VlmcError, yaml_problem

TARGETS = ("onnx", "executorch", "coreml", "tvm")
FILE_EXTENSIONS = {"onnx": ".onnx", "executorch": ".pte", "coreml": ".mlpackage", "tvm": ".so"}
# the default decoder lengths: 256 slots, or room for the image, 48 text tokens and 64 generated ones
DEFAULT_CONTEXT, DEFAULT_TEXT_TOKENS, DEFAULT_NEW_TOKENS = 256, 48, 64


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OnnxOptions(Strict):
    opset: int = Field(18, ge=17, le=23, description="ONNX opset of the exported graphs")
    w8a8_activations: Literal["uint8", "int8"] = Field(
        "uint8", description="the activation type of a w8a8 pass: uint8 (U8S8: onnxruntime's fast form on CPUs, "
                             "1.8-2.3x fp32 on x86) or int8 (S8S8, for execution providers that take signed "
                             "activations only; slower than fp32 on x86 CPUs: docs/ort_int8)")


class ExecutorchOptions(Strict):
    backend: Literal["xnnpack", "portable"] = Field("xnnpack", description="xnnpack delegates to XNNPACK; portable runs ExecuTorch's portable kernels only")
    tied_embedding: Literal["twice", "once"] = Field(
        "twice", description="a tied model's token table in the .pte: twice (the LM head packs its own static copy: "
                             "fastest) or once (the LM head reads the token_embedding's table, repacked by XNNPACK "
                             "every call: a smaller .pte, a slower head; docs/tied_embedding)")
    text_prefill: bool = Field(
        True, description="a text_prefill method for a prompt's first prefill: attention over the call's own rows "
                          "inside XNNPACK, where text_decoder's llama::custom_sdpa runs outside it (a full prompt's prefill 2.1x faster "
                          "on the built-in model, docs/et_prefill). The runtime packs the decoder's weights once per "
                          "method unless XNNPACK's weight cache is on (a C++ runtime option), so false saves that "
                          "memory; in-LLM token stages need it")


class CoremlOptions(Strict):
    precision: Literal["fp16", "fp32"] = Field("fp16", description="compute precision of the mlprogram")
    minimum_deployment_target: Literal["iOS16", "iOS17", "iOS18", "iOS26", "macOS13", "macOS14", "macOS15", "macOS26"] = "iOS17"


class TvmOptions(Strict):
    architectures: list[Literal["host", "aarch64"]] = Field(
        default_factory=lambda: ["host"], min_length=1,
        description="host: compiled for this machine's CPU (verified here); aarch64: cross-compiled for 64-bit ARM Linux")
    mcpu: str = Field("native", pattern=r"^[A-Za-z0-9_.+-]+$",
                      description="LLVM CPU of the host build: native (this machine's), or a name such as x86-64-v3, znver3")
    aarch64_mcpu: str = Field("cortex-a76", pattern=r"^[A-Za-z0-9_.+-]+$", description="LLVM CPU of the aarch64 build")
    tune_trials: int = Field(0, ge=0, le=100000, description="MetaSchedule trials for the vision encoder (0: untuned)")
    tuning_records: Optional[str] = Field(None, description="a folder of MetaSchedule records (a tvm bundle's tvm_tuning/) to reuse")
    fast_math: bool = Field(True, description="exp, sigmoid, SiLU, GELU, tanh and softmax with TVM's polynomial exp / erf / tanh "
                                              "(vectorized); false: one libm call per element")


class VerifyOptions(Strict):
    enabled: bool = True
    atol: float = Field(1e-3, gt=0, description="allowed |runtime - eager| beyond rtol * |eager|")
    rtol: float = Field(1e-3, ge=0)
    quantized_rel_err: float = Field(0.25, gt=0, le=1, description="quantized programs: allowed ||runtime - float eager|| / ||float eager||")
    devices: list[str] = Field(default_factory=list, description="devices (names from the devices file, or URLs) where the "
                               "bundle also runs before it is written: first-token logits against eager on every runtime "
                               "of the bundle the device has, e.g. qemu-aarch64 for the aarch64 TVM libraries")


class CalibrationOptions(Strict):
    dataset: str = Field("shapes-vqa", description="shapes-vqa, or a questions.jsonl (image, question, answer per line)")
    split: Literal["train", "val"] = Field("val", description="ShapesVQA split (never test: calibration would leak into the reported accuracy)")
    n: int = Field(32, ge=8, le=4096, description="calibration questions (images + prompts)")


class Recipe(Strict):
    name: Optional[str] = Field(None, description="bundle name (default: the output folder's name)")
    model: str = Field("shapes-llava", description="built-in model name or checkpoint directory")
    targets: list[Literal["onnx", "executorch", "coreml", "tvm"]] = Field(default_factory=lambda: ["onnx", "executorch"], min_length=1)
    image_size: Optional[int] = Field(None, ge=14, le=4096, description="input resolution (square) for families whose resolution "
                                                                "is chosen at export (it sets the image token count)")
    tile_grid: Optional[tuple[int, int]] = Field(None, description="rows x cols of tiles an image is split into, plus the "
                                                   "global image, for families that split images (smolvlm / idefics3)")
    max_context: Optional[int] = Field(None, ge=8, le=32768, description="KV-cache length: prompt plus generated tokens "
                                       "(default 256, or the default prompt plus 64 generated tokens, rounded up to 64, "
                                       "for a model whose image tokens leave less)")
    max_prompt: Optional[int] = Field(None, ge=1, description="fixed prefill length of ONNX / Core ML (default: image tokens + 48, at most max_context)")
    prompt_template: Optional[str] = Field(None, description="where the image and the question go (default: the model family's chat turn)")
    onnx: OnnxOptions = Field(default_factory=OnnxOptions)
    executorch: ExecutorchOptions = Field(default_factory=ExecutorchOptions)
    coreml: CoremlOptions = Field(default_factory=CoremlOptions)
    tvm: TvmOptions = Field(default_factory=TvmOptions)
    verify: VerifyOptions = Field(default_factory=VerifyOptions)
    passes: list[dict] = Field(default_factory=list, description="token and quantization passes: {name, at, ...params} (vlmc passes)")
    calibration: CalibrationOptions = Field(default_factory=CalibrationOptions, description="data for quantization passes that calibrate")

    @field_validator("targets")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v):
            raise ValueError("a target is listed twice")
        return v

    @field_validator("passes")
    @classmethod
    def _named(cls, v):
        for i, spec in enumerate(v):
            if "name" not in spec:
                raise ValueError(f"pass {i} has no name")
            if not isinstance(spec["name"], str):
                raise ValueError(f"pass {i}: 'name' must be a pass's name (vlmc passes lists them), not {spec['name']!r}")
        return v

    @field_validator("tile_grid")
    @classmethod
    def _grid(cls, v):
        if v is not None and not all(1 <= n <= 8 for n in v):
            raise ValueError("rows and columns must be 1..8")
        return v

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v):
        if v is not None and ("<image>" not in v or "{prompt}" not in v):
            raise ValueError("must contain <image> and {prompt}")
        return v

    def with_template(self, default: str, image_wrap: tuple[str, str] = ("", "")) -> "Recipe":
        """The prompt template filled in (the family's chat turn when none is given), with the family's
        text around the image's token run (e.g. SmolVLM's `<fake_token_around_image><global-img>`) put
        around `<image>` unless the template already has it."""
        template = self.prompt_template or default
        wrapped = image_wrap[0] + "<image>" + image_wrap[1]
        if wrapped not in template:
            template = template.replace("<image>", wrapped)
        return self.model_copy(update={"prompt_template": template})

    def resolve(self, num_image_tokens: int) -> "Recipe":
        """Fill the defaults that depend on the model, and check the lengths fit together."""
        prompt = num_image_tokens + DEFAULT_TEXT_TOKENS
        max_context = self.max_context or (DEFAULT_CONTEXT if prompt < DEFAULT_CONTEXT
                                           else -(-(prompt + DEFAULT_NEW_TOKENS) // 64) * 64)
        max_prompt = self.max_prompt or min(max_context, prompt)
        if max_prompt > max_context:
            raise VlmcError(f"recipe field 'max_prompt': {max_prompt} exceeds max_context {max_context}")
        if max_prompt <= num_image_tokens:
            raise VlmcError(f"recipe field 'max_prompt': {max_prompt} leaves no room for text beside the model's {num_image_tokens} image tokens")
        return self.model_copy(update={"max_prompt": max_prompt, "max_context": max_context})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_error(e: ValidationError, source: str) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    return f"{source}: recipe field '{loc}': {msg}" + (f" (got {err['input']!r})" if err["type"] != "extra_forbidden" and not isinstance(err.get("input"), dict) else "")


def build(data: dict, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise VlmcError(_format_error(e, source)) from None


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file of fields (a recipe, a sweep's grid); errors name `what`, the file and where YAML stopped."""
    if not path.is_file():
        raise VlmcError(f"{what} {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise VlmcError(f"{what} {path}: {yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise VlmcError(f"{what} {path}: expected a mapping of fields")
    return data


def load(path: Optional[str], overrides: dict) -> Recipe:
    """A recipe from a YAML file (optional) with CLI overrides applied on top."""
    data = read_yaml_mapping(Path(path), "recipe") if path else {}
    for key, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for depth, part in enumerate(parents, 1):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                field = ".".join(parents[:depth])
                raise VlmcError(f"{path or 'command line'}: recipe field '{field}': expected a mapping, got {node!r} "
                                f"(the command line sets {key})")
        node[leaf] = value
    return build(data, path or "command line")


def parse_targets(text: str) -> list[str]:
    targets = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))  # repeated -t, in order
    for t in targets:
        if t not in TARGETS:
            raise VlmcError(f"unknown target {t!r} (choose from {', '.join(TARGETS)})")
    return targets


def parse_tile_grid(text: str) -> tuple[int, int]:
    """`--tile-grid ROWSxCOLS` -> (rows, cols)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise VlmcError(f"--tile-grid {text!r}: expected ROWSxCOLS, e.g. 2x2")
    return int(m.group(1)), int(m.group(2))
