"""The LFM2-VL family adapter (config.json model_type `lfm2_vl`): a SigLIP2 NaFlex tower (a linear patch
embedding and a learned position grid resampled to the image's grid), a pixel-unshuffle projector
(LayerNorm + MLP over each 2x2 patch group) and the LFM2 hybrid decoder, whose layers are either grouped-
query attention (q/k RMSNorm per head) or a gated short convolution over the last `conv_L_cache` rows.

Export-first, at one square resolution chosen at export (recipe field `image_size`, a multiple of
encoder_patch_size x downsample_factor = 32; default the processor's largest single tile: max_image_tokens
x 4 patches, 512 px -> 256 tokens). The processor's NaFlex padding and its tiling of large images are not
used: one image, resized straight to the square (bilinear, as the processor resamples), every patch real.
The position grid's antialiased bilinear resampling (transformers' `resize_positional_embeddings`) is a
constant [patches, grid^2] matrix of that side.

The short convolutions keep a state, the last kernel - 1 rows of their gated input, instead of a KV
cache: the core's recurrent-layer protocol (`state_shape`), which every program stores in the layer's
(k, v) cache pair, split by width. In-LLM token passes are refused (the convolution mixes neighbouring
rows); token passes act at projector.out.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn

from vlmc.errors import VlmcError
from vlmc.models_zoo import core
from vlmc.models_zoo.layers import (
    ACTIVATIONS, DecoderAttention, RMSNorm, Rope1D, TextConfig, VisionConfig, ViTEncoder, apply_rope, carried_rows,
    check_activation, config_float, config_int, parse_text_config, parse_vision_config,
)

DEFAULT_TEMPLATE = "<|im_start|>user\n<image>{prompt}<|im_end|>\n<|im_start|>assistant\n"
IMAGE_WRAP = ("<|image_start|>", "<|image_end|>")
SIGLIP2_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "patch_size": 16, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}


@dataclass(frozen=True)
class Lfm2TextConfig(TextConfig):
    """LFM2's decoder: `layer_types` says which layers attend ("full_attention") and which convolve ("conv")."""

    layer_types: tuple = ()
    conv_kernel: int = 3
    conv_bias: bool = False


@dataclass(frozen=True)
class Lfm2VlConfig:
    vision: VisionConfig  # image_size: the export side
    text: Lfm2TextConfig
    image_token_id: int
    position_grid: int  # the learned position table's side
    downsample_factor: int = 2
    projector_hidden_size: int = 2560
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    projector_layernorm: bool = True
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf(cls, cfg: dict, preprocessor: dict, image_size: Optional[int] = None) -> "Lfm2VlConfig":
        v = {k: x for k, x in (cfg.get("vision_config") or {}).items() if x is not None}
        patch = config_int("vision_config", {**SIGLIP2_DEFAULTS, **v}, "patch_size")
        factor = config_int("config.json", cfg, "downsample_factor", 2)
        unit = patch * factor
        if image_size is None:  # the processor's largest single tile
            tokens = config_int("preprocessor_config.json", preprocessor, "max_image_tokens", 256)
            image_size = math.isqrt(tokens) * unit
        elif image_size % unit:
            raise VlmcError(f"recipe field 'image_size': {image_size} is not a multiple of {unit} "
                            f"(patch_size {patch} x downsample_factor {factor}), e.g. {max(unit, image_size // unit * unit)}")
        num_patches = config_int("vision_config", v, "num_patches", 256)
        grid = math.isqrt(num_patches)
        if grid * grid != num_patches:
            raise VlmcError(f"config.json: vision_config.num_patches {num_patches} is not a square position grid")
        vision = parse_vision_config({**v, "image_size": image_size}, SIGLIP2_DEFAULTS)
        text = _text_config(cfg)
        for key in ("do_resize", "do_rescale", "do_normalize"):
            if preprocessor.get(key) is False:
                raise VlmcError(f"preprocessor_config.json: {key} false is not supported")
        act = cfg.get("projector_hidden_act", "gelu")
        check_activation("projector_hidden_act", act)
        return cls(vision=vision, text=text, image_token_id=config_int("config.json", cfg, "image_token_id", 396),
                   position_grid=grid, downsample_factor=factor,
                   projector_hidden_size=config_int("config.json", cfg, "projector_hidden_size", 2560),
                   projector_hidden_act=act, projector_bias=bool(cfg.get("projector_bias", True)),
                   projector_layernorm=bool(cfg.get("projector_use_layernorm", True)),
                   image_mean=tuple(preprocessor.get("image_mean", (0.5, 0.5, 0.5))),
                   image_std=tuple(preprocessor.get("image_std", (0.5, 0.5, 0.5))))


def feed_forward_width(t: dict) -> int:
    """LFM2's MLP width: 2/3 of intermediate_size, scaled by block_ffn_dim_multiplier and rounded up to
    block_multiple_of when block_auto_adjust_ff_dim (transformers' rule)."""
    width = config_int("text_config", t, "intermediate_size", 12288)
    if t.get("block_auto_adjust_ff_dim", True):
        width = int(2 * width / 3)
        multiplier = t.get("block_ffn_dim_multiplier", 1.0)
        if multiplier is not None:
            multiple = config_int("text_config", t, "block_multiple_of", 256)
            width = int(config_float("text_config", t, "block_ffn_dim_multiplier", 1.0) * width)
            width = multiple * ((width + multiple - 1) // multiple)
    return width


def _text_config(cfg: dict) -> Lfm2TextConfig:
    t = {k: x for k, x in (cfg.get("text_config") or {}).items() if x is not None}
    if "block_ff_dim" in t:
        t.setdefault("intermediate_size", t["block_ff_dim"])
    t.setdefault("tie_word_embeddings", t.get("tie_embedding", cfg.get("tie_word_embeddings", True)))
    layers = config_int("text_config", t, "num_hidden_layers", 32)
    kinds = t.get("layer_types")
    if kinds is None:
        full = t.get("full_attn_idxs")
        full = range(layers) if full is None else full
        kinds = ["full_attention" if i in full else "conv" for i in range(layers)]
    if len(kinds) != layers or any(k not in ("full_attention", "conv") for k in kinds):
        raise VlmcError(f"config.json: text_config.layer_types must name 'full_attention' or 'conv' for each of the "
                        f"{layers} layers")
    base = parse_text_config({**t, "intermediate_size": feed_forward_width(t), "rms_norm_eps": t.get("norm_eps", 1e-5),
                              "head_dim": None, "hidden_act": "silu"}, cfg,
                             {"bos_token_id": 1, "eos_token_id": 7, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    kernel = config_int("text_config", t, "conv_L_cache", 3)
    if kernel < 2:
        raise VlmcError(f"config.json: text_config.conv_L_cache {kernel}: the short convolution needs a kernel of 2 or more")
    if base.hidden_size % 2:
        raise VlmcError(f"config.json: text_config.hidden_size {base.hidden_size} is odd (the convolution state is split in two)")
    return Lfm2TextConfig(**asdict(base), layer_types=tuple(kinds), conv_kernel=kernel, conv_bias=bool(t.get("conv_bias", False)))


# ---------------------------------------------------------------- vision

def position_resize_weights(side: int, grid: int) -> torch.Tensor:
    """[grid^2, side^2]: each patch of a grid x grid image as a weighted sum of a side x side position table,
    the weights of F.interpolate(bilinear, align_corners=False, antialias=True) (separable: row x column)."""
    scale = side / grid
    support = max(scale, 1.0)
    center = (torch.arange(grid, dtype=torch.float64) + 0.5) * scale - 0.5
    w = (1 - (torch.arange(side, dtype=torch.float64)[None] - center[:, None]).abs() / support).clamp(min=0)
    w = w / w.sum(-1, keepdim=True)  # [grid, side] per axis
    return (w[:, None, :, None] * w[None, :, None, :]).reshape(grid * grid, side * side).float()


class NaflexEmbeddings(nn.Module):
    """SigLIP2's: a linear embedding of each patch's pixels (row, column, channel order) plus the position
    table resampled to the image's grid."""

    def __init__(self, c: VisionConfig, position_grid: int):
        super().__init__()
        self.patch_size = c.patch_size
        self.patch_embedding = nn.Linear(c.num_channels * c.patch_size ** 2, c.hidden_size)
        self.position_embedding = nn.Embedding(position_grid ** 2, c.hidden_size)
        self.register_buffer("position_weights", None, persistent=False)
        self.set_grid(c.image_size // c.patch_size)

    def set_grid(self, grid: int) -> None:
        side = math.isqrt(self.position_embedding.num_embeddings)
        self.position_weights = position_resize_weights(side, grid)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[0] > 1:
            return torch.cat([self(p[None]) for p in pixels])
        c, h, w = pixels.shape[1:]
        p = self.patch_size
        patches = pixels[0].reshape(c, h // p, p, w // p, p).permute(1, 3, 2, 4, 0).reshape(1, (h // p) * (w // p), p * p * c)
        return self.patch_embedding(patches) + (self.position_weights @ self.position_embedding.weight)[None]


class Siglip2Tower(nn.Module):
    """`vision_tower`: embeddings, the SigLIP encoder layers, the post-layernorm (no head)."""

    def __init__(self, c: VisionConfig, position_grid: int):
        super().__init__()
        self.embeddings = NaflexEmbeddings(c, position_grid)
        self.encoder = ViTEncoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class Projector(nn.Module):
    """Pixel unshuffle (each factor x factor patch group's features side by side, row-major within the
    group), LayerNorm, MLP. Reads the grid from the token count, so it follows the resolution pass."""

    def __init__(self, c: Lfm2VlConfig):
        super().__init__()
        width = c.vision.hidden_size * c.downsample_factor ** 2
        self.factor = c.downsample_factor
        self.layer_norm = nn.LayerNorm(width) if c.projector_layernorm else None
        self.linear_1 = nn.Linear(width, c.projector_hidden_size, bias=c.projector_bias)
        self.act = ACTIVATIONS[c.projector_hidden_act]
        self.linear_2 = nn.Linear(c.projector_hidden_size, c.text.hidden_size, bias=c.projector_bias)

    def forward(self, x):
        b, n, d = x.shape
        f, g = self.factor, math.isqrt(n)
        x = x.reshape(b * (g // f), f, g // f, f * d).permute(0, 2, 1, 3).reshape(b, (g // f) ** 2, f * f * d)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return self.linear_2(self.act(self.linear_1(x)))


# ---------------------------------------------------------------- text

class ShortConv(nn.Module):
    """LFM2's gated short convolution: in_proj -> (B, C, x); y = C * causal depthwise conv(B * x); out_proj."""

    def __init__(self, t: Lfm2TextConfig):
        super().__init__()
        d = t.hidden_size
        self.in_proj = nn.Linear(d, 3 * d, bias=t.conv_bias)
        self.conv = nn.Conv1d(d, d, t.conv_kernel, groups=d, bias=t.conv_bias, padding=t.conv_kernel - 1)
        self.out_proj = nn.Linear(d, d, bias=t.conv_bias)

    def forward(self, x, index: int, attend):
        gate_b, gate_c, value = self.in_proj(x).chunk(3, -1)
        kernel = self.conv.weight.shape[-1]
        rows = carried_rows(attend, index, gate_b * value, kernel - 1)  # [B, kernel - 1 + T, D]
        t, w = x.shape[1], self.conv.weight[:, 0]  # [D, kernel]
        conv = sum(rows[:, j:j + t] * w[:, j] for j in range(kernel))  # static slices: exports everywhere
        if self.conv.bias is not None:
            conv = conv + self.conv.bias
        return self.out_proj(gate_c * conv)


class Lfm2Attention(DecoderAttention):
    """Grouped-query attention with `out_proj` and an RMSNorm on each head's queries and keys."""

    def __init__(self, t: Lfm2TextConfig):
        super().__init__(t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim, False, False)
        self.out_proj = self.o_proj
        del self.o_proj
        self.q_layernorm = RMSNorm(t.head_dim, t.rms_norm_eps)
        self.k_layernorm = RMSNorm(t.head_dim, t.rms_norm_eps)


class FeedForward(nn.Module):
    def __init__(self, t: Lfm2TextConfig):
        super().__init__()
        self.w1 = nn.Linear(t.hidden_size, t.intermediate_size, bias=False)
        self.w3 = nn.Linear(t.hidden_size, t.intermediate_size, bias=False)
        self.w2 = nn.Linear(t.intermediate_size, t.hidden_size, bias=False)

    def forward(self, x):
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


class Lfm2Layer(nn.Module):
    """An LFM2 block: pre-RMSNorm attention or short convolution, then a SwiGLU feed-forward."""

    def __init__(self, t: Lfm2TextConfig, attention: bool):
        super().__init__()
        self.attention = attention
        if attention:
            self.self_attn = Lfm2Attention(t)
        else:
            self.conv = ShortConv(t)
        self.feed_forward = FeedForward(t)
        self.operator_norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.ffn_norm = RMSNorm(t.hidden_size, t.rms_norm_eps)

    def forward(self, h, rope, index: int, attend, shift: int = 0):
        x = self.operator_norm(h)
        q = k = None
        if self.attention:
            attn = self.self_attn
            q, k, v = attn.project(x)
            cos, sin = rope
            q, k = apply_rope(attn.q_layernorm(q), cos, sin), apply_rope(attn.k_layernorm(k), cos, sin)
            h = h + attn.out_proj(attend(index, q, k, v, shift))
        else:
            h = h + self.conv(x, index, attend)
        return h + self.feed_forward(self.ffn_norm(h)), q, k

    def smoothing_groups(self) -> list[tuple[str, list[str]]]:
        first = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"] if self.attention else ["conv.in_proj"]
        return [("operator_norm", first), ("ffn_norm", ["feed_forward.w1", "feed_forward.w3"])]


class Lfm2Body(nn.Module):
    """`language_model`: embedding table, layers, the final norm (`embedding_norm`, transformers' name) and RoPE."""

    def __init__(self, t: Lfm2TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleList(Lfm2Layer(t, kind == "full_attention") for kind in t.layer_types)
        self.embedding_norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.rotary = Rope1D(t.head_dim, t.rope_theta)


class Lfm2VlModel(core.VisionLanguageModel):
    """LFM2-VL: SigLIP2 NaFlex -> pixel-unshuffle projector -> LFM2 (attention and short-convolution layers)."""

    family = "lfm2_vl"
    vision_blocks_path = "vision_tower.encoder.layers"
    connector_path = "multi_modal_projector"
    embed_tokens_path = "language_model.embed_tokens"
    decoder_layers_path = "language_model.layers"
    final_norm_path = "language_model.embedding_norm"
    parts = {"vision": ("vision_tower", "multi_modal_projector"), "decoder": ("language_model.layers", "lm_head")}
    image_resize = {"rule": "square", "filter": "bilinear"}

    def __init__(self, config: Lfm2VlConfig):
        super().__init__(config)
        self.connector_merge = config.downsample_factor
        self.vision_tower = Siglip2Tower(config.vision, config.position_grid)
        self.multi_modal_projector = Projector(config)
        self.language_model = Lfm2Body(config.text)
        self.add_head()

    def embed_image(self, pixel_values):
        return self.vision_tower.embeddings(pixel_values)

    def select_features(self, x):
        return self.vision_tower.post_layernorm(x)

    def resize_positions(self, grid: int) -> None:
        """NaFlex resamples its position table to any grid: done for this one."""
        self.vision_tower.embeddings.set_grid(grid)

    def rope(self, position_ids):
        return self.language_model.rotary(position_ids)

    def state_shape(self, layer: int) -> Optional[tuple[int, int]]:
        t = self.config.text
        return None if t.layer_types[layer] == "full_attention" else (t.conv_kernel - 1, t.hidden_size)


def build(cfg: dict, directory, preprocessor: dict, image_size: Optional[int] = None) -> Lfm2VlModel:
    from vlmc.models_zoo.qwen2_5_vl import read_preprocessor

    return Lfm2VlModel(Lfm2VlConfig.from_hf(cfg, read_preprocessor(directory, preprocessor), image_size))


_HF_PREFIXES = (("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
                ("model.language_model.", "language_model."))


def normalize_hf_key(key: str) -> str:
    """transformers 5's names (also with SigLIP2's `vision_model.` level) -> vlmc's."""
    key = key.replace("model.vision_tower.vision_model.", "model.vision_tower.", 1)
    for hf, ours in _HF_PREFIXES:
        if key.startswith(hf):
            return ours + key[len(hf):]
    return key


def to_hf_key(key: str) -> str:
    for hf, ours in _HF_PREFIXES:
        if key.startswith(ours):
            return hf + key[len(ours):]
    return key


def to_hf_config(c: Lfm2VlConfig) -> dict:
    v, t = c.vision, c.text
    return {
        "architectures": ["Lfm2VlForConditionalGeneration"], "model_type": "lfm2_vl", "image_token_id": c.image_token_id,
        "downsample_factor": c.downsample_factor, "projector_hidden_size": c.projector_hidden_size,
        "projector_hidden_act": c.projector_hidden_act, "projector_bias": c.projector_bias,
        "projector_use_layernorm": c.projector_layernorm, "tie_word_embeddings": t.tie_word_embeddings,
        "vision_config": {"model_type": "siglip2_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                          "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "patch_size": v.patch_size,
                          "num_patches": c.position_grid ** 2, "hidden_act": v.hidden_act, "layer_norm_eps": v.layer_norm_eps,
                          "num_channels": v.num_channels, "vision_use_head": False},
        "text_config": {"model_type": "lfm2", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                        "intermediate_size": t.intermediate_size, "block_auto_adjust_ff_dim": False,
                        "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
                        "num_key_value_heads": t.num_kv_heads, "norm_eps": t.rms_norm_eps, "conv_bias": t.conv_bias,
                        "conv_L_cache": t.conv_kernel, "layer_types": list(t.layer_types),
                        "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
                        "tie_word_embeddings": t.tie_word_embeddings, "bos_token_id": t.bos_token_id,
                        "eos_token_id": list(t.eos_token_ids) if len(t.eos_token_ids) > 1 else t.eos_token_ids[0]},
    }
