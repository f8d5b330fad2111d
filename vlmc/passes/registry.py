"""The pass registry: passes are classes with a typed config, found by name (Olive's idea, not its engine).

A recipe lists passes as data, `{name: divprune, at: projector.out, keep: 64}` or
`{name: w4, at: decoder, group_size: 32}`; on the command line `--pass divprune:keep=64`. Parameters are
validated by the pass's pydantic config, then against the model (a keep above the token count, a layer
out of range, a group size that does not divide a layer) before any export work starts.
Two kinds share the registry: token passes change the model's graph at an anatomy point; quantization
passes say how a part (vision / decoder) is quantized, which each target does with its own stack.
"""
from __future__ import annotations

import types
import typing
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from vlmc.errors import VlmcError

REGISTRY: dict[str, type["Pass"]] = {}
POINT_KINDS = ("vision.block", "vision.out", "projector.out", "decoder.layer")


class PassConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    at: str


class Pass:
    """A registered pass: a name, a typed config, its source and where it departs from it."""

    name: ClassVar[str]
    kind: ClassVar[str]  # "input", "token", "quant", "kv" or "embedding"
    source: ClassVar[str]  # the paper / code it follows
    departures: ClassVar[str]  # where this version differs from the paper
    Config: ClassVar[type[PassConfig]]

    def __init__(self, config: PassConfig):
        self.config = config

    @classmethod
    def check_at(cls, at: str) -> None:
        """Refuse an `at` this pass cannot act at (VlmcError naming the parameter)."""

    @classmethod
    def acts_at(cls) -> list[str]:
        raise NotImplementedError


class TokenPass(Pass):
    """A visual-token method: a stage inserted at a named point of the model's anatomy."""

    kind = "token"
    points: ClassVar[tuple[str, ...]]  # point kinds it may be inserted at: "vision.block", "vision.out", "projector.out"
    reads_text: ClassVar[bool] = False  # needs the question in the same prefill (not stock-runner compatible)

    @classmethod
    def check_at(cls, at: str) -> None:
        if point_kind(at) not in POINT_KINDS:
            raise VlmcError(f"pass {cls.name}: parameter 'at': unknown insertion point {at!r} "
                            f"(points: vision.block[i], vision.out, projector.out, decoder.layer[i])")
        if point_kind(at) not in cls.points:
            raise VlmcError(f"pass {cls.name}: parameter 'at': {at} is not a place this method works "
                            f"(it acts at {', '.join(cls.points)})")

    @classmethod
    def acts_at(cls) -> list[str]:
        return list(cls.points)

    def check(self, tokens_in: int, grid: int, model) -> None:
        """Refuse parameters that cannot work on this model (named in the message)."""

    def locate(self, model, calibration=None) -> None:
        """Fix `config.at` where it is found from the model or data (a calibrated layer); before any check."""

    def stage(self, model, point_module, tokens_in: int) -> nn.Module:
        """The module inserted at `config.at`; `point_module` is what produces the tokens there."""
        raise NotImplementedError

    def place(self, model, tokens_in: int, calibration=None) -> list[tuple[str, nn.Module]]:
        """(point, stage) pairs to insert; one stage at `config.at` unless a method acts at several points.
        `calibration()` gives calibration images (uint8 [3,H,W]) to methods that fix their choice from data."""
        return [(self.config.at, self.stage(model, model.resolve(self.config.at), tokens_in))]


def register(cls: type[Pass]) -> type[Pass]:
    REGISTRY[cls.name] = cls
    return cls


def point_kind(point: str) -> str:
    return point.split("[")[0]


def build(spec: dict) -> Pass:
    """A pass instance from its recipe entry; bad names and parameters raise VlmcError naming them."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise VlmcError("recipe field 'passes': each pass needs a 'name'")
    name = spec["name"]
    if not isinstance(name, str) or name not in REGISTRY:
        raise VlmcError(f"unknown pass {name!r} (vlmc passes lists: {', '.join(sorted(REGISTRY))})")
    cls = REGISTRY[name]
    params = {k: v for k, v in spec.items() if k != "name"}
    try:
        config = cls.Config.model_validate(params)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        msg = "unknown parameter" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise VlmcError(f"pass {name}: parameter '{field}': {msg}") from None
    cls.check_at(config.at)
    return cls(config)


def parse_cli(text: str) -> dict:
    """`divprune:keep=64,at=projector.out` -> {"name": "divprune", "keep": 64, "at": "projector.out"}."""
    import yaml

    name, _, rest = text.partition(":")
    spec: dict = {"name": name.strip()}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            raise VlmcError(f"--pass {text!r}: expected key=value, got {part!r}")
        try:
            spec[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:  # not a YAML scalar (`at=@x`): the text itself, for the pass to accept or refuse
            spec[key.strip()] = value
    return spec


def type_name(annotation) -> str:
    """A parameter's type as a user reads it: `minmax | gptq` for a Literal, `int | None` for an Optional."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else type_name(a) for a in args)
    if origin is list:
        return f"list[{', '.join(type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def describe() -> list[dict]:
    rows = []
    for name, cls in sorted(REGISTRY.items()):
        fields = {k: (type_name(f.annotation), "required" if f.is_required() else f.default)
                  for k, f in cls.Config.model_fields.items()}
        rows.append({"name": name, "kind": cls.kind, "acts_at": cls.acts_at(), "parameters": fields, "source": cls.source,
                     "departures": cls.departures, "reads_text": getattr(cls, "reads_text", False)})
    return rows
