"""The pass registry: passes are classes with a typed config, found by name (Olive's idea, not its engine).

A recipe lists passes as data, `{name: divprune, at: projector.out, keep: 64}`; on the command line
`--pass divprune:keep=64`. Parameters are validated by the pass's pydantic config, then against the
model (a keep above the token count, a layer out of range) before any export work starts.
"""
from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from vlmc.errors import VlmcError

REGISTRY: dict[str, type["TokenPass"]] = {}
POINT_KINDS = ("vision.block", "vision.out", "projector.out", "decoder.layer")


class PassConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    at: str


class TokenPass:
    """A visual-token method: a stage inserted at a named point of the model's anatomy."""

    name: ClassVar[str]
    source: ClassVar[str]  # the paper / code it follows
    departures: ClassVar[str]  # where this static-shape version differs from the paper
    points: ClassVar[tuple[str, ...]]  # point kinds it may be inserted at: "vision.block", "vision.out", "projector.out"
    reads_text: ClassVar[bool] = False  # needs the question in the same prefill (not stock-runner compatible)
    Config: ClassVar[type[PassConfig]]

    def __init__(self, config: PassConfig):
        self.config = config

    def check(self, tokens_in: int, grid: int, model) -> None:
        """Refuse parameters that cannot work on this model (named in the message)."""

    def stage(self, model, point_module, tokens_in: int) -> nn.Module:
        """The module inserted at `config.at`; `point_module` is what produces the tokens there."""
        raise NotImplementedError


def register(cls: type[TokenPass]) -> type[TokenPass]:
    REGISTRY[cls.name] = cls
    return cls


def point_kind(point: str) -> str:
    return point.split("[")[0]


def build(spec: dict) -> TokenPass:
    """A pass instance from its recipe entry; bad names and parameters raise VlmcError naming them."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise VlmcError("recipe field 'passes': each pass needs a 'name'")
    name = spec["name"]
    if name not in REGISTRY:
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
    if point_kind(config.at) not in POINT_KINDS:
        raise VlmcError(f"pass {name}: parameter 'at': unknown insertion point {config.at!r} "
                        f"(points: vision.block[i], vision.out, projector.out, decoder.layer[i])")
    if point_kind(config.at) not in cls.points:
        raise VlmcError(f"pass {name}: parameter 'at': {config.at} is not a place this method works "
                        f"(it acts at {', '.join(cls.points)})")
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
        spec[key.strip()] = yaml.safe_load(value)
    return spec


def describe() -> list[dict]:
    rows = []
    for name, cls in sorted(REGISTRY.items()):
        fields = {k: (getattr(f.annotation, "__name__", str(f.annotation)), "required" if f.is_required() else f.default)
                  for k, f in cls.Config.model_fields.items()}
        rows.append({"name": name, "acts_at": list(cls.points), "parameters": fields, "source": cls.source,
                     "departures": cls.departures, "reads_text": cls.reads_text})
    return rows
