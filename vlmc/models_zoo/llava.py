"""The LLaVA-1.5 family adapter: a CLIP ViT (CLS token, a chosen feature layer), a 2-layer MLP projector
and a Llama decoder, on the family-agnostic core.

Module and parameter names mirror Hugging Face's `LlavaForConditionalGeneration`, so its checkpoints
(transformers 4.x and 5.x names) load by a short key normalisation.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
from torch import nn

from vlmc.errors import VlmcError
from vlmc.models_zoo import core
from vlmc.models_zoo.layers import (ACTIVATIONS, LlamaBody, TextConfig, ViTEncoder, VisionConfig, check_activation,
                                    interpolate_grid_table, parse_text_config, parse_vision_config)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_DEFAULTS = {"image_size": 224, "patch_size": 32, "hidden_size": 768, "intermediate_size": 3072,
                 "num_hidden_layers": 12, "num_attention_heads": 12, "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu"}
DEFAULT_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"


@dataclass(frozen=True)
class LlavaConfig:
    vision: VisionConfig
    text: TextConfig
    image_token_id: int
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD

    @property
    def num_image_tokens(self) -> int:
        n = self.vision.num_patches
        return n if self.vision_feature_select_strategy == "default" else n + 1

    @property
    def num_vision_layers_run(self) -> int:
        """Blocks the feature layer needs; later blocks never run (hidden_states[0] is the embedding)."""
        n = self.vision.num_layers
        return n + 1 + self.vision_feature_layer if self.vision_feature_layer < 0 else self.vision_feature_layer

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf(cls, cfg: dict, image_mean=CLIP_MEAN, image_std=CLIP_STD) -> "LlavaConfig":
        """Read a Hugging Face `LlavaConfig` dict (transformers 4.x or 5.x spelling)."""
        try:
            v, t = cfg["vision_config"], cfg["text_config"]
        except KeyError as e:
            raise VlmcError(f"config.json: missing {e.args[0]!r}") from None
        if v.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise VlmcError(f"config.json: vision_config.model_type {v.get('model_type')!r} is not supported (need clip_vision_model)")
        if t.get("model_type", "llama") != "llama":
            raise VlmcError(f"config.json: text_config.model_type {t.get('model_type')!r} is not supported (need llama)")
        layer = cfg.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise VlmcError(f"config.json: vision_feature_layer {layer!r} is not supported (need one integer layer)")
        strategy = cfg.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise VlmcError(f"config.json: vision_feature_select_strategy {strategy!r} is not supported")
        image_token = cfg.get("image_token_id", cfg.get("image_token_index"))
        if image_token is None:
            raise VlmcError("config.json: missing 'image_token_id'")
        vision = parse_vision_config(v, CLIP_DEFAULTS)
        text = parse_text_config(t, cfg)
        check_activation("projector_hidden_act", cfg.get("projector_hidden_act", "gelu"))
        if not -vision.num_layers <= layer <= vision.num_layers:
            raise VlmcError(f"config.json: vision_feature_layer {layer} is outside the {vision.num_layers} vision layers")
        return cls(
            vision=vision, text=text, image_token_id=int(image_token),
            vision_feature_layer=layer, vision_feature_select_strategy=strategy,
            projector_hidden_act=cfg.get("projector_hidden_act", "gelu"),
            projector_bias=bool(cfg.get("multimodal_projector_bias", True)),
            image_mean=tuple(image_mean), image_std=tuple(image_std),
        )


class VisionEmbeddings(nn.Module):
    """CLIP's: a CLS token, the patch convolution (no bias) and a learned position table."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size, bias=False)
        self.position_embedding = nn.Embedding(c.num_patches + 1, c.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight[None]


class VisionTower(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.encoder = ViTEncoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # loaded, unused by LLaVA


class Projector(nn.Module):
    def __init__(self, c: LlavaConfig):
        super().__init__()
        self.linear_1 = nn.Linear(c.vision.hidden_size, c.text.hidden_size, bias=c.projector_bias)
        self.act = ACTIVATIONS[c.projector_hidden_act]
        self.linear_2 = nn.Linear(c.text.hidden_size, c.text.hidden_size, bias=c.projector_bias)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaModel(core.VisionLanguageModel):
    """LLaVA-1.5: image -> ViT features at `vision_feature_layer` -> projector -> Llama decoder."""

    family = "llava"
    vision_blocks_path = "vision_tower.encoder.layers"
    connector_path = "multi_modal_projector"
    embed_tokens_path = "language_model.embed_tokens"
    decoder_layers_path = "language_model.layers"
    final_norm_path = "language_model.norm"
    parts = {"vision": ("vision_tower", "multi_modal_projector"), "decoder": ("language_model.layers", "lm_head")}
    vision_has_cls = True

    def __init__(self, config: LlavaConfig):
        super().__init__(config)
        self.vision_tower = VisionTower(config.vision)
        self.multi_modal_projector = Projector(config)
        self.language_model = LlamaBody(config.text)
        self.add_head()

    @property
    def features_have_cls(self) -> bool:
        return self.config.vision_feature_select_strategy != "default"

    @property
    def num_vision_blocks(self) -> int:
        return self.config.num_vision_layers_run

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_tower.pre_layrnorm(self.vision_tower.embeddings(pixel_values))

    def select_features(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.features_have_cls else x[:, 1:]

    def resize_positions(self, grid: int) -> None:
        table = self.vision_tower.embeddings.position_embedding.weight
        resized = torch.cat([table[:1].detach(), interpolate_grid_table(table[1:], grid)])
        self.vision_tower.embeddings.position_embedding = nn.Embedding.from_pretrained(resized, freeze=False)

    def rope(self, position_ids: torch.Tensor):
        return self.language_model.rotary(position_ids)


# ---------------------------------------------------------------- checkpoint keys

_KEY_RULES = [
    (re.compile(r"^model\."), ""),
    (re.compile(r"^vision_tower\.vision_model\."), "vision_tower."),
    (re.compile(r"^language_model\.model\."), "language_model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
]


def normalize_hf_key(key: str) -> str:
    """Map transformers 4.x and 5.x LLaVA parameter names onto vlmc's."""
    for pattern, repl in _KEY_RULES:
        key = pattern.sub(repl, key)
    return key


to_hf_key = core.model_prefixed_key


def build(cfg: dict, directory, preprocessor: dict) -> LlavaModel:
    """The family's entry point for the loader: an unloaded model from config.json (+ preprocessor_config)."""
    mean_std = {k: tuple(preprocessor[k]) for k in ("image_mean", "image_std") if k in preprocessor}
    return LlavaModel(LlavaConfig.from_hf(cfg, **mean_std))


def to_hf_config(c: LlavaConfig) -> dict:
    """The transformers `LlavaConfig` dict that `from_hf` reads back (and transformers loads)."""
    v, t = c.vision, c.text
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_id": c.image_token_id,
        "image_seq_length": c.num_image_tokens,
        "vision_feature_layer": c.vision_feature_layer,
        "vision_feature_select_strategy": c.vision_feature_select_strategy,
        "projector_hidden_act": c.projector_hidden_act,
        "multimodal_projector_bias": c.projector_bias,
        "tie_word_embeddings": t.tie_word_embeddings,
        "vision_config": {
            "model_type": "clip_vision_model", "image_size": v.image_size, "patch_size": v.patch_size,
            "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
            "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act, "num_channels": v.num_channels,
            "projection_dim": v.hidden_size,
        },
        "text_config": {
            "model_type": "llama", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim,
            "rms_norm_eps": t.rms_norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
            "hidden_act": t.hidden_act, "attention_bias": t.attention_bias, "mlp_bias": t.mlp_bias,
            "tie_word_embeddings": t.tie_word_embeddings, "bos_token_id": t.bos_token_id,
            "eos_token_id": list(t.eos_token_ids) if len(t.eos_token_ids) > 1 else t.eos_token_ids[0],
            "max_position_embeddings": 4096,
        },
    }
