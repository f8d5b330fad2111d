"""Model families vlmc knows, the built-in models it ships, and loading from a checkpoint directory.

A family adapter (one module: `llava.py`, ...) turns a Hugging Face checkpoint directory (config.json,
*.safetensors, tokenizer.json) into a model on the family-agnostic core (`core.py`); passes and the
exporter see only the core's anatomy. An adapter module provides `build(config, directory,
preprocessor_config) -> model`, `normalize_hf_key`, `to_hf_key`, `to_hf_config` and `DEFAULT_TEMPLATE`.
"""
from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from vlmc.errors import VlmcError, first_line
from vlmc.models_zoo.tokenizer import TextTokenizer

if TYPE_CHECKING:  # torch is imported only by what needs it, so onnxruntime-only processes stay light
    from vlmc.models_zoo.core import VisionLanguageModel

BUILTIN_ROOT = Path(__file__).parent / "builtin"
BUILTINS = {
    "shapes-llava": "tiny LLaVA-1.5-style VLM (CLIP ViT 112px/8 -> 196 tokens, Llama decoder), ShapesVQA vocabulary",
}
FAMILIES = {
    "llava": "LLaVA-1.5: LlavaForConditionalGeneration (clip_vision_model + llama), config.json model_type 'llava'",
    "idefics3": "Idefics3: SigLIP + pixel-shuffle connector + Llama, one global image tile, model_type 'idefics3'",
    "smolvlm": "SmolVLM / SmolVLM2 (the Idefics3 architecture), one global image tile, model_type 'smolvlm'",
    "internvl": "InternVL (HF-native): InternViT + pixel-shuffle MLP projector + Qwen2, one image tile, model_type 'internvl'",
    "qwen2_5_vl": "Qwen2.5-VL: window-attention ViT + patch merger + Qwen2 with M-RoPE, one square image (recipe image_size), model_type 'qwen2_5_vl'",
    "qwen2_vl": "Qwen2-VL (the Qwen2.5-VL design with full attention and LayerNorms), model_type 'qwen2_vl'",
    "qwen3_vl": "Qwen3-VL: ViT with DeepStack mergers + patch merger + Qwen3 with interleaved M-RoPE, one square image (recipe image_size), model_type 'qwen3_vl'",
    "lfm2_vl": "LFM2-VL: SigLIP2 NaFlex + pixel-unshuffle projector + LFM2 (attention and gated short-convolution layers), one square image (recipe image_size), model_type 'lfm2_vl'",
    "gemma3": "Gemma 3: SigLIP + average-pool projector + Gemma 3 (sliding-window layers, bidirectional image rows), one square image, model_type 'gemma3'",
}
# config.json model_type -> the adapter module under vlmc.models_zoo
ADAPTERS = {"llava": "llava", "idefics3": "idefics3", "smolvlm": "idefics3", "internvl": "internvl", "qwen2_5_vl": "qwen2_5_vl", "qwen2_vl": "qwen2_5_vl",
            "qwen3_vl": "qwen3_vl", "lfm2_vl": "lfm2_vl", "gemma3": "gemma3"}
DEFAULT_MODEL = "shapes-llava"


@dataclass
class LoadedModel:
    name: str
    family: str
    source: str  # a built-in name or an absolute checkpoint directory: enough to load it again
    directory: Path
    model: "VisionLanguageModel"
    tokenizer: TextTokenizer
    random_weights: bool = False  # an architecture preset: profile it, never evaluate it

    @property
    def config(self):
        return self.model.config

    @property
    def bos_token_id(self):
        """The BOS id the tokenizer's own rule names, else the config's."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.config.text.bos_token_id

    @property
    def image_resize(self) -> dict:
        """How the host resizes an image for this model, as its Hugging Face processor does."""
        return self.model.image_resize

    def template(self, recipe):
        """`recipe` with its prompt template filled in for this model's family; the model learns where the
        template puts the image (when that does not depend on the question)."""
        family = adapter(self.family)
        wrap = getattr(family, "IMAGE_WRAP", ("", ""))
        template = recipe.with_template(family.DEFAULT_TEMPLATE, wrap).prompt_template
        tiles = self.model.image_tiles
        if tiles > 1 and template.count("<image>") == 1:  # one run per tile, with the family's separators
            wrapped = wrap[0] + "<image>" + wrap[1]
            template = template.replace(wrapped, self.model.image_text(wrapped))
            for piece in dict.fromkeys(re.findall(r"<[^<>\s]+>", self.model.image_text(wrapped))):
                if piece != "<image>" and self.tokenizer.token_id(piece) is None:
                    raise VlmcError(f"recipe field 'tile_grid': {self.directory}/tokenizer.json has no {piece} token "
                                    f"(the {self.family} tile grid's separators)")
        if template.count("<image>") != tiles:
            what = f"{tiles} tiles (tile_grid plus the global image)" if tiles > 1 else "one image"
            raise VlmcError(f"recipe field 'prompt_template': {template.count('<image>')} <image> placeholders, but the "
                            f"model fills {what}")
        recipe = recipe.model_copy(update={"prompt_template": template})
        if template.index("<image>") < template.index("{prompt}"):
            probe = self.tokenizer.prompt(template, "", 1, self.config.image_token_id, self.bos_token_id)
            self.model.set_image_start(len(probe.before))
        elif self.model.needs_image_start:
            raise VlmcError(f"recipe field 'prompt_template': the {self.family} family needs the image before the question "
                            "(its positions / attention mask depend on where the image starts)")
        return recipe


def adapter(family: str):
    """The adapter module of a family (config.json's model_type)."""
    import importlib

    return importlib.import_module(f"vlmc.models_zoo.{ADAPTERS[family]}")


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


def load(spec: str = DEFAULT_MODEL, image_size: int | None = None, tile_grid: tuple[int, int] | None = None) -> LoadedModel:
    """Load a built-in model by name, a checkpoint directory or an architecture preset (`preset:NAME`,
    random weights), checking every file it needs. `image_size`: the input resolution, for families whose
    resolution is chosen at export; `tile_grid`: rows x cols of tiles, for families that split images."""
    import safetensors.torch

    from vlmc.models_zoo import presets
    import torch

    from vlmc.models_zoo.core import assign_state, check_state, skip_init

    preset = spec[len("preset:"):] if spec.startswith("preset:") else None
    if preset is not None:
        name, directory, source = preset, presets.materialize(preset), spec
    else:
        name, directory, source = _directory(spec)
    cfg = read_config(directory)
    family = cfg.get("model_type")
    if family not in ADAPTERS:
        raise VlmcError(f"{directory}/config.json: unknown model family {family!r} (vlmc loads: {', '.join(ADAPTERS)})")
    family_module = adapter(family)
    pre = directory / "preprocessor_config.json"
    preprocessor = {}
    if pre.is_file():
        try:
            preprocessor = json.loads(pre.read_text())
        except json.JSONDecodeError as e:
            raise VlmcError(f"{pre}: invalid JSON ({e.msg} at line {e.lineno})") from None
    files = sorted(directory.glob("*.safetensors"))
    if not files and preset is None:
        raise VlmcError(f"{directory}: no *.safetensors weights")
    tokenizer = TextTokenizer(directory)
    tensors = {}
    for f in files if preset is None else ():
        try:
            tensors.update(safetensors.torch.load_file(str(f)))
        except Exception as e:  # safetensors raises SafetensorError / OSError with its own text
            raise VlmcError(f"{f}: unreadable safetensors file ({first_line(e)})") from None
    takes = inspect.signature(family_module.build).parameters
    if image_size is not None and "image_size" not in takes:
        raise VlmcError(f"recipe field 'image_size': the {family} family's resolution is fixed by its config "
                        "(only families with a variable resolution take it)")
    if tile_grid is not None and "tile_grid" not in takes:
        raise VlmcError(f"recipe field 'tile_grid': the {family} family does not split images into tiles "
                        "(smolvlm and idefics3 do)")
    options = {k: v for k, v in (("image_size", image_size), ("tile_grid", tile_grid)) if v is not None}
    if preset is not None:
        model = family_module.build(cfg, directory, preprocessor, **options)
        presets.random_init(model)
    else:
        with torch.device("meta"):  # the config's shapes, checked against the weights before anything is allocated
            skeleton = family_module.build(cfg, directory, preprocessor, **options)
        tied = skeleton.config.text.tie_word_embeddings
        state = check_state(skeleton, tensors, str(directory), family_module.normalize_hf_key, tied)
        del skeleton, tensors
        with skip_init():  # the checkpoint's tensors become the parameters: no second copy of the weights
            model = family_module.build(cfg, directory, preprocessor, **options)
        assign_state(model, state, tied)
        del state
    if tokenizer.vocab_size > model.config.text.vocab_size:
        raise VlmcError(f"{directory}: tokenizer has {tokenizer.vocab_size} tokens, the model only {model.config.text.vocab_size}")
    return LoadedModel(name, family, source, directory, model.eval(), tokenizer, random_weights=preset is not None)


def save_checkpoint(model: "VisionLanguageModel", directory: Path, tokenizer_dir: Path | None = None) -> None:
    """Write `model` as a Hugging Face checkpoint directory (config.json + model.safetensors)."""
    import shutil

    import safetensors.torch

    from vlmc.models_zoo.core import hf_state_dict

    family = adapter(model.family)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(family.to_hf_config(model.config), indent=2) + "\n")
    safetensors.torch.save_file(hf_state_dict(model, family.to_hf_key), str(directory / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_dir is not None and tokenizer_dir.resolve() != directory.resolve():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (tokenizer_dir / name).is_file():
                shutil.copy(tokenizer_dir / name, directory / name)


def describe() -> list[dict]:
    """Rows for `vlmc models`."""
    rows = [{"name": n, "kind": "built-in", "description": d} for n, d in BUILTINS.items()]
    from vlmc.models_zoo import presets

    rows += [{"name": f"preset:{n}", "kind": "preset (random weights)", "description": p["release"]}
             for n, p in presets.PRESETS.items() if p["config"]["model_type"] in ADAPTERS]
    rows += [{"name": f, "kind": "family (from a checkpoint dir)", "description": d} for f, d in FAMILIES.items()]
    return rows
