"""The InternVL family adapter (config.json model_type `internvl`, transformers' HF-native port): an
InternViT tower (CLS token, layer scale, optional qk-norm), a pixel-shuffle connector (downsample_ratio:
(1/r)^2 patches into one token) with a LayerNorm + 2-layer MLP projector, and a Qwen2 decoder, on the
family-agnostic core.

The image is one tile at the tower's resolution (the processor with `crop_to_patches=False`): the host
resizes it straight to image_size x image_size (bicubic by default, the aspect ignored, as
GotOcr2ImageProcessor does), so the token count is static: (image_size / patch_size * r)^2 (256 for the
released InternVL3 models). Module and parameter names mirror transformers' `InternVLForConditionalGeneration`,
so both its saved (legacy `language_model.model.*`) and runtime (`model.language_model.*`) layouts load.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlmc.errors import VlmcError
from vlmc.models_zoo import core
from vlmc.models_zoo.idefics3 import pixel_shuffle
from vlmc.models_zoo.layers import (ACTIVATIONS, LlamaBody, RMSNorm, TextConfig, ViTMLP, config_float, config_int,
                                    check_activation, interpolate_grid_table, parse_text_config)

DEFAULT_TEMPLATE = "<|im_start|>user\n<image>\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
# the processor writes `<img>` + `<IMG_CONTEXT>` * n + `</img>` where the chat template has the image
IMAGE_WRAP = ("<img>", "</img>")
PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
# GotOcr2ImageProcessor's class defaults (the released checkpoints write ImageNet's in preprocessor_config.json)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
QK_NORM_EPS = 1e-6  # InternVLVisionRMSNorm's default: transformers does not pass the config's eps
PROJECTOR_NORM_EPS = 1e-5  # nn.LayerNorm's default, as transformers builds the projector


@dataclass(frozen=True)
class InternViTConfig:
    """InternViT's geometry (`vision_config`, model_type internvl_vision)."""

    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    num_channels: int = 3
    attention_bias: bool = False
    use_qk_norm: bool = False
    norm_type: str = "layer_norm"
    use_mean_pooling: bool = True
    use_absolute_position_embeddings: bool = True
    use_mask_token: bool = False

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


VISION_DEFAULTS = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
                   "hidden_act": "gelu", "layer_norm_eps": 1e-6, "image_size": [448, 448], "patch_size": [14, 14],
                   "num_channels": 3, "attention_bias": False, "use_qk_norm": False, "norm_type": "layer_norm",
                   "use_mean_pooling": True, "use_absolute_position_embeddings": True, "use_mask_token": False}


def _side(v: dict, key: str) -> int:
    """image_size / patch_size: an int or a [height, width] pair that must be square."""
    value = v[key]
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise VlmcError(f"config.json: vision_config.{key} {list(value)} is not square (vlmc needs height == width)")
        value = value[0]
    return config_int("vision_config", {key: value}, key)


def parse_internvit_config(v: dict) -> InternViTConfig:
    if v.get("model_type", "internvl_vision") != "internvl_vision":
        raise VlmcError(f"config.json: vision_config.model_type {v.get('model_type')!r} is not supported (need internvl_vision)")
    d = {**VISION_DEFAULTS, **{k: x for k, x in v.items() if x is not None}}
    c = InternViTConfig(
        image_size=_side(d, "image_size"), patch_size=_side(d, "patch_size"),
        hidden_size=config_int("vision_config", d, "hidden_size"), intermediate_size=config_int("vision_config", d, "intermediate_size"),
        num_layers=config_int("vision_config", d, "num_hidden_layers"), num_heads=config_int("vision_config", d, "num_attention_heads"),
        layer_norm_eps=config_float("vision_config", d, "layer_norm_eps", 1e-6), hidden_act=d["hidden_act"],
        num_channels=config_int("vision_config", d, "num_channels"), attention_bias=bool(d["attention_bias"]),
        use_qk_norm=bool(d["use_qk_norm"]), norm_type=d["norm_type"], use_mean_pooling=bool(d["use_mean_pooling"]),
        use_absolute_position_embeddings=bool(d["use_absolute_position_embeddings"]), use_mask_token=bool(d["use_mask_token"]),
    )
    check_activation("vision_config.hidden_act", c.hidden_act)
    if c.norm_type not in ("layer_norm", "rms_norm"):
        raise VlmcError(f"config.json: vision_config.norm_type {c.norm_type!r} is not supported (layer_norm, rms_norm)")
    if c.image_size % c.patch_size:
        raise VlmcError("config.json: vision_config.image_size is not a multiple of patch_size")
    if c.hidden_size % c.num_heads:
        raise VlmcError("config.json: vision_config.hidden_size is not a multiple of num_attention_heads")
    return c


@dataclass(frozen=True)
class InternVLConfig:
    vision: InternViTConfig
    text: TextConfig
    image_token_id: int
    downsample_ratio: float = 0.5
    vision_feature_layer: int = -1
    projector_hidden_act: str = "gelu"
    model_type: str = "internvl"
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    resize_filter: str = "bicubic"

    @property
    def merge(self) -> int:
        return round(1 / self.downsample_ratio)

    @property
    def num_image_tokens(self) -> int:
        return (self.vision.grid // self.merge) ** 2

    @property
    def num_vision_layers_run(self) -> int:
        """Blocks the feature layer needs (hidden_states[0] is the embedding, -1 the last block)."""
        n, layer = self.vision.num_layers, self.vision_feature_layer
        return n + 1 + layer if layer < 0 else layer

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf(cls, cfg: dict, preprocessor: dict) -> "InternVLConfig":
        """Read a transformers `InternVLConfig` dict and the GotOcr2 image processor's preprocessor_config."""
        try:
            v, t = cfg["vision_config"], cfg["text_config"]
        except KeyError as e:
            raise VlmcError(f"config.json: missing {e.args[0]!r}") from None
        if t.get("model_type", "qwen2") != "qwen2":
            raise VlmcError(f"config.json: text_config.model_type {t.get('model_type')!r} is not supported (need qwen2)")
        if t.get("use_sliding_window"):
            raise VlmcError("config.json: text_config.use_sliding_window is true, which vlmc does not support")
        vision = parse_internvit_config(v)
        # Qwen2: q/k/v with biases, o_proj without (LlamaLayer's options); the top-level flag governs tying
        text = replace(parse_text_config(t, cfg), tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)))
        layer = cfg.get("vision_feature_layer", -1)
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise VlmcError(f"config.json: vision_feature_layer {layer!r} is not supported (need one integer layer)")
        n = vision.num_layers
        if not -n <= layer <= n or layer == 0:
            raise VlmcError(f"config.json: vision_feature_layer {layer} is not one of the {n} vision layers' outputs")
        strategy = cfg.get("vision_feature_select_strategy", "default")
        if strategy != "default":
            raise VlmcError(f"config.json: vision_feature_select_strategy {strategy!r} is not supported (need default: the CLS is dropped)")
        ratio = cfg.get("downsample_ratio", 0.5)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise VlmcError(f"config.json: downsample_ratio {ratio!r} is not a number in (0, 1]")
        merge = round(1 / ratio)
        if abs(1 / ratio - merge) > 1e-6 or vision.grid % merge:
            raise VlmcError(f"config.json: downsample_ratio {ratio} must be 1/k for an integer k dividing the "
                            f"{vision.grid}x{vision.grid} patch grid")
        act = cfg.get("projector_hidden_act", "gelu")
        check_activation("projector_hidden_act", act)
        image_token = cfg.get("image_token_id", cfg.get("image_token_index", 151667))
        if isinstance(image_token, bool) or not isinstance(image_token, int):
            raise VlmcError("config.json: image_token_id is not an integer")
        tokens = (vision.grid // merge) ** 2
        seq = cfg.get("image_seq_length", tokens)
        if seq != tokens:
            raise VlmcError(f"config.json: image_seq_length {seq} differs from the {tokens} tokens the geometry gives "
                            f"((image_size / patch_size * downsample_ratio)^2)")
        size = preprocessor.get("size") or {}
        side = (size.get("height"), size.get("width")) if "height" in size else (size.get("shortest_edge"),) * 2
        if side[0] is not None and tuple(side) != (vision.image_size, vision.image_size):
            raise VlmcError(f"preprocessor_config.json: size {size} differs from vision_config.image_size {vision.image_size} "
                            "(the position table would be interpolated, which vlmc does not support)")
        resample = preprocessor.get("resample", 3)
        if resample not in PIL_FILTERS:
            raise VlmcError(f"preprocessor_config.json: resample {resample!r} is not a PIL filter code (0..3)")
        return cls(vision=vision, text=text, image_token_id=image_token, downsample_ratio=float(ratio),
                   vision_feature_layer=layer, projector_hidden_act=act, model_type=cfg.get("model_type", "internvl"),
                   image_mean=tuple(preprocessor.get("image_mean", CLIP_MEAN)),
                   image_std=tuple(preprocessor.get("image_std", CLIP_STD)), resize_filter=PIL_FILTERS[resample])


# ---------------------------------------------------------------- vision: InternViT

class PatchEmbeddings(nn.Module):
    def __init__(self, c: InternViTConfig):
        super().__init__()
        self.projection = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size)


class InternViTEmbeddings(nn.Module):
    """A CLS token, the patch convolution (with bias) and an absolute position table (CLS slot first)."""

    def __init__(self, c: InternViTConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.hidden_size))
        if c.use_mask_token:  # loaded, unused (masked image modelling only)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, c.hidden_size))
        self.patch_embeddings = PatchEmbeddings(c)
        self.position_embeddings = (nn.Parameter(torch.zeros(1, c.grid ** 2 + 1, c.hidden_size))
                                    if c.use_absolute_position_embeddings else None)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embeddings.projection(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        return x if self.position_embeddings is None else x + self.position_embeddings


def _norm(c: InternViTConfig) -> nn.Module:
    return nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps) if c.norm_type == "layer_norm" else RMSNorm(c.hidden_size, c.layer_norm_eps)


class InternViTAttention(nn.Module):
    """Multi-head self-attention; with qk-norm, q and k are RMS-normalised over all heads jointly."""

    def __init__(self, c: InternViTConfig):
        super().__init__()
        d = c.hidden_size
        self.num_heads, self.head_dim = c.num_heads, d // c.num_heads
        self.q_proj = nn.Linear(d, d, bias=c.attention_bias)
        self.k_proj = nn.Linear(d, d, bias=c.attention_bias)
        self.v_proj = nn.Linear(d, d, bias=c.attention_bias)
        self.projection_layer = nn.Linear(d, d)
        self.q_norm = RMSNorm(d, QK_NORM_EPS) if c.use_qk_norm else nn.Identity()
        self.k_norm = RMSNorm(d, QK_NORM_EPS) if c.use_qk_norm else nn.Identity()

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def queries(self, h: torch.Tensor) -> torch.Tensor:
        return self.heads(self.q_norm(self.q_proj(h)))

    def keys(self, h: torch.Tensor) -> torch.Tensor:
        return self.heads(self.k_norm(self.k_proj(h)))

    def forward(self, h: torch.Tensor, size: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`size` [B,N,1]: patches each token stands for after a merge; log(size) is added to the logits
        (ToMe's proportional attention), as in layers.ViTAttention."""
        q, k, v = self.queries(h), self.keys(h), self.heads(self.v_proj(h))
        bias = None if size is None else size.log().transpose(1, 2)[:, None]  # [B,1,1,N]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.projection_layer(out.transpose(1, 2).reshape(h.shape))


class InternViTBlock(nn.Module):
    """InternVLVisionLayer: pre-norm attention and MLP, each branch scaled per channel (lambda_1, lambda_2)."""

    def __init__(self, c: InternViTConfig):
        super().__init__()
        self.attention = InternViTAttention(c)
        self.mlp = ViTMLP(c.hidden_size, c.intermediate_size, c.hidden_act)
        self.layernorm_before = _norm(c)
        self.layernorm_after = _norm(c)
        self.lambda_1 = nn.Parameter(torch.ones(c.hidden_size))
        self.lambda_2 = nn.Parameter(torch.ones(c.hidden_size))

    def forward(self, x: torch.Tensor, size: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.lambda_1 * self.attention(self.layernorm_before(x), size)
        return x + self.lambda_2 * self.mlp(self.layernorm_after(x))

    def queries(self, x_in: torch.Tensor) -> torch.Tensor:
        """The block's attention queries [B,H,N,d] for its input tokens x_in [B,N,D] (after qk-norm)."""
        return self.attention.queries(self.layernorm_before(x_in))

    def keys(self, x_in: torch.Tensor) -> torch.Tensor:
        return self.attention.keys(self.layernorm_before(x_in))

    def smoothing_groups(self) -> list[tuple[str, list[str]]]:
        # a smoothing factor folded into layernorm_before leaves q_proj's output unchanged, so the
        # qk-norm after it is unaffected; RMSNorm (no bias) folds like LayerNorm
        return [("layernorm_before", ["attention.q_proj", "attention.k_proj", "attention.v_proj"]),
                ("layernorm_after", ["mlp.fc1"])]


class InternViTEncoder(nn.Module):
    def __init__(self, c: InternViTConfig):
        super().__init__()
        self.layer = nn.ModuleList(InternViTBlock(c) for _ in range(c.num_layers))


class InternViT(nn.Module):
    def __init__(self, c: InternViTConfig):
        super().__init__()
        self.embeddings = InternViTEmbeddings(c)
        self.encoder = InternViTEncoder(c)
        # use_mean_pooling: transformers' final norm is an Identity (no weights); else a LayerNorm
        self.layernorm = nn.Identity() if c.use_mean_pooling else nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


# ---------------------------------------------------------------- connector and decoder

class Projector(nn.Module):
    """Pixel shuffle ((1/r)^2 neighbouring patches into one token), LayerNorm, linear, activation, linear.
    transformers runs the shuffle outside this module; its parameters keep the same names."""

    def __init__(self, c: InternVLConfig):
        super().__init__()
        self.grid, self.merge = c.vision.grid, c.merge
        width = c.vision.hidden_size * c.merge ** 2
        self.layer_norm = nn.LayerNorm(width, eps=PROJECTOR_NORM_EPS)
        self.linear_1 = nn.Linear(width, c.text.hidden_size)
        self.act = ACTIVATIONS[c.projector_hidden_act]
        self.linear_2 = nn.Linear(c.text.hidden_size, c.text.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pixel_shuffle(x, self.grid, self.merge)
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))


class InternVLModel(core.VisionLanguageModel):
    """InternVL: InternViT features (CLS dropped) -> pixel shuffle + MLP projector -> Qwen2 decoder."""

    family = "internvl"
    vision_blocks_path = "vision_tower.encoder.layer"
    connector_path = "multi_modal_projector"
    embed_tokens_path = "language_model.embed_tokens"
    decoder_layers_path = "language_model.layers"
    final_norm_path = "language_model.norm"
    parts = {"vision": ("vision_tower", "multi_modal_projector"), "decoder": ("language_model.layers", "lm_head")}
    vision_has_cls = True
    features_have_cls = False

    def __init__(self, config: InternVLConfig):
        super().__init__(config)
        self.connector_merge = config.merge
        self.image_resize = {"rule": "square", "filter": config.resize_filter}
        self.vision_tower = InternViT(config.vision)
        self.multi_modal_projector = Projector(config)
        self.language_model = LlamaBody(config.text, qkv_bias=True, o_bias=False)  # Qwen2
        self.add_head()

    @property
    def num_vision_blocks(self) -> int:
        return self.config.num_vision_layers_run

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_tower.embeddings(pixel_values)

    def select_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer goes through the tower's final norm (an Identity with mean pooling); an earlier
        one (hidden_states[i]) does not. The CLS token is dropped."""
        if self.config.vision_feature_layer == -1:
            x = self.vision_tower.layernorm(x)
        return x[:, 1:]

    def resize_positions(self, grid: int) -> None:
        emb = self.vision_tower.embeddings
        if emb.position_embeddings is not None:
            table = emb.position_embeddings[0]
            resized = torch.cat([table[:1].detach(), interpolate_grid_table(table[1:], grid)])
            emb.position_embeddings = nn.Parameter(resized[None])
        self.multi_modal_projector.grid = grid

    def rope(self, position_ids: torch.Tensor):
        return self.language_model.rotary(position_ids)


def build(cfg: dict, directory, preprocessor: dict) -> InternVLModel:
    return InternVLModel(InternVLConfig.from_hf(cfg, preprocessor))


# ---------------------------------------------------------------- checkpoint keys

_KEY_RULES = [
    (re.compile(r"^model\."), ""),  # runtime layout: model.language_model.*, model.vision_tower.*, ...
    (re.compile(r"^language_model\.model\."), "language_model."),  # save_pretrained's (legacy) layout
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
]


def normalize_hf_key(key: str) -> str:
    """transformers' saved and runtime InternVL names -> vlmc's."""
    for pattern, repl in _KEY_RULES:
        key = pattern.sub(repl, key)
    return key


to_hf_key = core.model_prefixed_key  # transformers' runtime layout, which it loads


def to_hf_config(c: InternVLConfig) -> dict:
    v, t = c.vision, c.text
    return {
        "architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl",
        "image_token_id": c.image_token_id, "image_seq_length": c.num_image_tokens,
        "downsample_ratio": c.downsample_ratio, "projector_hidden_act": c.projector_hidden_act,
        "vision_feature_layer": c.vision_feature_layer, "vision_feature_select_strategy": "default",
        "tie_word_embeddings": t.tie_word_embeddings,
        "vision_config": {
            "model_type": "internvl_vision", "image_size": [v.image_size, v.image_size],
            "patch_size": [v.patch_size, v.patch_size], "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads, "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act,
            "num_channels": v.num_channels, "attention_bias": v.attention_bias, "use_qk_norm": v.use_qk_norm,
            "norm_type": v.norm_type, "use_mean_pooling": v.use_mean_pooling,
            "use_absolute_position_embeddings": v.use_absolute_position_embeddings, "use_mask_token": v.use_mask_token,
        },
        "text_config": {
            "model_type": "qwen2", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim,
            "rms_norm_eps": t.rms_norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
            "hidden_act": t.hidden_act, "tie_word_embeddings": t.tie_word_embeddings, "use_sliding_window": False,
            "bos_token_id": t.bos_token_id,
            "eos_token_id": list(t.eos_token_ids) if len(t.eos_token_ids) > 1 else t.eos_token_ids[0],
        },
    }
