"""Model families vlmc knows, the built-in models it ships, and loading from a checkpoint directory.

A family adapter turns a Hugging Face checkpoint directory (config.json, *.safetensors,
tokenizer.json) into a vlmc model with a known anatomy; passes and the exporter see only that.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from vlmc.errors import VlmcError, first_line
from vlmc.models_zoo.tokenizer import TextTokenizer

if TYPE_CHECKING:  # torch is imported only by what needs it, so onnxruntime-only processes stay light
    from vlmc.models_zoo.llava import LlavaConfig, LlavaModel

BUILTIN_ROOT = Path(__file__).parent / "builtin"
BUILTINS = {
    "shapes-llava": "tiny LLaVA-1.5-style VLM (CLIP ViT 112px/8 -> 196 tokens, Llama decoder), ShapesVQA vocabulary",
}
FAMILIES = {
    "llava": "LLaVA-1.5: LlavaForConditionalGeneration (clip_vision_model + llama), config.json model_type 'llava'",
}
DEFAULT_MODEL = "shapes-llava"


@dataclass
class LoadedModel:
    name: str
    family: str
    source: str  # a built-in name or an absolute checkpoint directory: enough to load it again
    directory: Path
    model: "LlavaModel"
    tokenizer: TextTokenizer

    @property
    def config(self) -> "LlavaConfig":
        return self.model.config


def _directory(spec: str) -> tuple[str, Path, str]:
    if spec in BUILTINS:
        return spec, BUILTIN_ROOT / spec, spec
    path = Path(spec).expanduser()
    if not path.exists():
        raise VlmcError(f"model {spec!r} is neither a built-in ({', '.join(BUILTINS)}) nor an existing directory")
    if not path.is_dir():
        raise VlmcError(f"model {spec!r} is not a directory")
    path = path.resolve()
    return path.name, path, str(path)


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise VlmcError(f"{directory}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise VlmcError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(cfg, dict):
        raise VlmcError(f"{path}: expected a JSON object")
    return cfg


def load(spec: str = DEFAULT_MODEL) -> LoadedModel:
    """Load a built-in model by name or a checkpoint directory, checking every file it needs."""
    import safetensors.torch

    from vlmc.models_zoo.llava import LlavaConfig, LlavaModel, load_state

    name, directory, source = _directory(spec)
    cfg = read_config(directory)
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise VlmcError(f"{directory}/config.json: unknown model family {family!r} (vlmc loads: {', '.join(FAMILIES)})")
    mean_std = {}
    pre = directory / "preprocessor_config.json"
    if pre.is_file():
        p = json.loads(pre.read_text())
        mean_std = {k: tuple(p[k]) for k in ("image_mean", "image_std") if k in p}
    config = LlavaConfig.from_hf(cfg, **mean_std)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise VlmcError(f"{directory}: no *.safetensors weights")
    tokenizer = TextTokenizer(directory)
    tensors = {}
    for f in files:
        try:
            tensors.update(safetensors.torch.load_file(str(f)))
        except Exception as e:  # safetensors raises SafetensorError / OSError with its own text
            raise VlmcError(f"{f}: unreadable safetensors file ({first_line(e)})") from None
    model = LlavaModel(config)
    load_state(model, tensors, str(directory))
    if tokenizer.vocab_size > config.text.vocab_size:
        raise VlmcError(f"{directory}: tokenizer has {tokenizer.vocab_size} tokens, the model only {config.text.vocab_size}")
    return LoadedModel(name, family, source, directory, model.eval(), tokenizer)


def save_checkpoint(model: "LlavaModel", directory: Path, tokenizer_dir: Path | None = None) -> None:
    """Write `model` as a Hugging Face checkpoint directory (config.json + model.safetensors)."""
    import shutil

    import safetensors.torch

    from vlmc.models_zoo.llava import hf_state_dict, to_hf_config

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(to_hf_config(model.config), indent=2) + "\n")
    safetensors.torch.save_file(hf_state_dict(model), str(directory / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_dir is not None and tokenizer_dir.resolve() != directory.resolve():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (tokenizer_dir / name).is_file():
                shutil.copy(tokenizer_dir / name, directory / name)


def describe() -> list[dict]:
    """Rows for `vlmc models`."""
    rows = [{"name": n, "kind": "built-in", "description": d} for n, d in BUILTINS.items()]
    rows += [{"name": f, "kind": "family (from a checkpoint dir)", "description": d} for f, d in FAMILIES.items()]
    return rows
