"""The Qwen3-VL family adapter (config.json model_type `qwen3_vl`): a ViT with a learned position table
resampled to the grid plus 2-D rotary positions, full attention in every block; a patch merger (LayerNorm
+ MLP over each 2x2 patch group) as the connector; DeepStack mergers on intermediate blocks; and a Qwen3
decoder (q/k RMSNorm per head) with interleaved M-RoPE.

Built on the Qwen2.5-VL adapter's fixed-grid machinery (`qwen2_5_vl`): one square resolution chosen at
export (recipe field `image_size`, a multiple of patch_size x spatial_merge_size = 32), the processor's
patch order (2x2 merge groups in raster order) and the rotary tables as constants of that grid, the
Conv3d patch embedding as a Conv2d with the kernel summed over time, M-RoPE positions from row numbers.
What Qwen3-VL adds:

- the learned position table (`pos_embed`, a square grid) is resampled bilinearly (align_corners) to the
  image's grid, as transformers does: a constant gather of 4 table rows and weights per patch;
- DeepStack: the outputs of `deepstack_visual_indexes` blocks go through their own mergers (norm after the
  2x2 shuffle) and decoder layer j adds the j-th of them to the image rows of its output. vlmc carries
  them as extra columns of the image embeddings (`core.VisionLanguageModel.deepstack_layers`): the
  vision encoder gives [N, (1 + k) D] rows, the token embedding pads text rows with zeros, so the
  programs keep the signatures every runner (and ExecuTorch's stock MultimodalRunner) expects;
- interleaved M-RoPE: frequency j follows h when j % 3 == 1, w when j % 3 == 2 (within 3 x section), else t.

Token stages at projector.out see the wide rows, so a method that scores tokens by their features reads
the DeepStack columns too; selection and merging keep each row's slices together.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn

from vlmc.errors import VlmcError
from vlmc.models_zoo import core
from vlmc.models_zoo.layers import (
    ACTIVATIONS, LlamaBody, LlamaLayer, RMSNorm, TextConfig, apply_rope, check_activation, config_int,
)
from vlmc.models_zoo import qwen2_5_vl
from vlmc.models_zoo.qwen2_5_vl import (
    MRope, PatchEmbed, QwenFixedGrid, QwenVisionBlock, _common_vision, image_fields, parse_mrope_text, read_preprocessor,
    vision_geometry,
)

DEFAULT_TEMPLATE = "<|im_start|>user\n<image>{prompt}<|im_end|>\n<|im_start|>assistant\n"  # no default system turn
IMAGE_WRAP = qwen2_5_vl.IMAGE_WRAP


@dataclass(frozen=True)
class Qwen3VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    hidden_act: str = "gelu_pytorch_tanh"
    in_channels: int = 3
    rope_theta: float = 10000.0
    window_size: int = 0  # every block attends to the whole image (read by the shared grid geometry)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_side(self) -> int:
        return int(self.num_position_embeddings ** 0.5)


@dataclass(frozen=True)
class Qwen3VLConfig:
    vision: Qwen3VisionConfig
    text: TextConfig
    image_token_id: int
    mrope_section: tuple
    image_size: int
    model_type: str = "qwen3_vl"
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    min_pixels: int = 65536
    max_pixels: int = 16777216
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf(cls, cfg: dict, preprocessor: dict, image_size: Optional[int] = None) -> "Qwen3VLConfig":
        text, section = parse_mrope_text(cfg, rms_norm_eps=1e-6)
        vision = _vision_config(cfg.get("vision_config") or {})
        if vision.out_hidden_size != text.hidden_size:
            raise VlmcError(f"config.json: vision_config.out_hidden_size {vision.out_hidden_size} is not the decoder's "
                            f"hidden_size {text.hidden_size}")
        if len(vision.deepstack_visual_indexes) > text.num_layers:
            raise VlmcError(f"config.json: {len(vision.deepstack_visual_indexes)} deepstack_visual_indexes but only "
                            f"{text.num_layers} decoder layers to add them to")
        return cls(vision=vision, text=text, mrope_section=section,
                   **image_fields(cfg, preprocessor, vision.patch_size * vision.spatial_merge_size, image_size))


def _vision_config(v: dict) -> Qwen3VisionConfig:
    v = {k: x for k, x in v.items() if x is not None}
    s = "vision_config"
    for key in ("patch_size", "temporal_patch_size"):
        if isinstance(v.get(key), (list, tuple)):
            raise VlmcError(f"config.json: {s}.{key} {v[key]!r}: only a single (square) size is supported")
    if (v.get("rope_parameters") or {}).get("rope_type", "axial") not in ("axial", "default"):
        raise VlmcError(f"config.json: {s}.rope_parameters.rope_type {v['rope_parameters']['rope_type']!r} is not supported")
    depth = config_int(s, v, "depth", 27)
    deep = v.get("deepstack_visual_indexes", (8, 16, 24))
    if not isinstance(deep, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in deep):
        raise VlmcError(f"config.json: {s}.deepstack_visual_indexes {deep!r} is not a list of block numbers")
    if any(not 0 <= i < depth for i in deep) or len(set(deep)) != len(deep):
        raise VlmcError(f"config.json: {s}.deepstack_visual_indexes {list(deep)} must be distinct blocks in 0..{depth - 1}")
    c = Qwen3VisionConfig(
        depth=depth, hidden_size=config_int(s, v, "hidden_size", 1152), intermediate_size=config_int(s, v, "intermediate_size", 4304),
        num_heads=config_int(s, v, "num_heads", 16), out_hidden_size=config_int(s, v, "out_hidden_size", 3584),
        num_position_embeddings=config_int(s, v, "num_position_embeddings", 2304), deepstack_visual_indexes=tuple(deep),
        hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"), **_common_vision(v))
    check_activation(f"{s}.hidden_act", c.hidden_act)
    if c.in_channels != 3:
        raise VlmcError(f"config.json: {s}.in_channels {c.in_channels}: only RGB (3) is supported")
    if c.hidden_size % c.num_heads or c.head_dim % 4:
        raise VlmcError(f"config.json: {s}.hidden_size / num_heads is not a multiple of 4 (2-D rotary halves)")
    if c.position_side ** 2 != c.num_position_embeddings:
        raise VlmcError(f"config.json: {s}.num_position_embeddings {c.num_position_embeddings} is not a square grid")
    return c


# ---------------------------------------------------------------- the fixed grid's position table

def position_taps(side: int, grid: int, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [N, 4] of a side x side position table and their weights [N, 4] that give the table resampled
    bilinearly (align_corners=True) to a grid x grid image, for the patches in `order` (raster indices)."""
    def axis(i: torch.Tensor):
        src = i.double() * ((side - 1) / (grid - 1)) if grid > 1 else torch.zeros_like(i, dtype=torch.float64)
        lo = src.floor().long().clamp(0, side - 1)
        hi = (lo + 1).clamp(max=side - 1)
        frac = src - lo.double()
        return lo, hi, frac

    r0, r1, fr = axis(order // grid)
    c0, c1, fc = axis(order % grid)
    index = torch.stack([r0 * side + c0, r0 * side + c1, r1 * side + c0, r1 * side + c1], -1)
    weight = torch.stack([(1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc], -1)
    return index, weight.float()


# ---------------------------------------------------------------- vision

class FcMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.linear_fc1 = nn.Linear(hidden, intermediate)
        self.linear_fc2 = nn.Linear(intermediate, hidden)
        self.act = ACTIVATIONS[act]

    def forward(self, x):
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class Qwen3VisionBlock(QwenVisionBlock):
    """LayerNorms and a fc1/fc2 MLP with biases; full attention."""

    @staticmethod
    def norms_and_mlp(c: Qwen3VisionConfig):
        d = c.hidden_size
        return nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6), FcMLP(d, c.intermediate_size, c.hidden_act)

    def smoothing_groups(self) -> list[tuple[str, list[str]]]:
        return [("norm1", ["attn.qkv"]), ("norm2", ["mlp.linear_fc1"])]


class Merger(nn.Module):
    """Each 2x2 patch group (consecutive in the tower's order) concatenated and projected by an MLP; the
    LayerNorm runs per patch before the shuffle (the main merger) or on the group after it (DeepStack's)."""

    def __init__(self, c: Qwen3VisionConfig, norm_after_shuffle: bool):
        super().__init__()
        self.width = c.hidden_size * c.spatial_merge_size ** 2
        self.norm_after_shuffle = norm_after_shuffle
        self.norm = nn.LayerNorm(self.width if norm_after_shuffle else c.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.width, self.width)
        self.act_fn = nn.GELU()
        self.linear_fc2 = nn.Linear(self.width, c.out_hidden_size)

    def forward(self, x):
        b, n, d = x.shape
        shape = (b, n * d // self.width, self.width)
        x = self.norm(x.reshape(shape)) if self.norm_after_shuffle else self.norm(x).reshape(shape)
        return self.linear_fc2(self.act_fn(self.linear_fc1(x)))


class VisionTower(nn.Module):
    """`visual`: patch embedding, position table, blocks, merger and DeepStack mergers under Hugging Face's
    names, and the grid's constants."""

    def __init__(self, c: Qwen3VisionConfig, image_size: int):
        super().__init__()
        self.config = c
        self.patch_embed = PatchEmbed(c, bias=True)
        self.pos_embed = nn.Embedding(c.num_position_embeddings, c.hidden_size)
        self.blocks = nn.ModuleList(Qwen3VisionBlock(c, True) for _ in range(c.depth))
        self.merger = Merger(c, norm_after_shuffle=False)
        self.deepstack_merger_list = nn.ModuleList(Merger(c, norm_after_shuffle=True) for _ in c.deepstack_visual_indexes)
        for name in ("patch_order", "rope_cos", "rope_sin", "pos_index", "pos_weight"):
            self.register_buffer(name, None, persistent=False)
        self.set_grid(image_size // c.patch_size)
        for block in self.blocks:
            block._tower.append(self)

    def set_grid(self, grid: int) -> None:
        geo = vision_geometry(self.config, grid * self.config.patch_size)
        self.patch_order, self.rope_cos, self.rope_sin = geo["order"], geo["cos"], geo["sin"]
        self.pos_index, self.pos_weight = position_taps(self.config.position_side, grid, geo["order"])

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # [B, N, D], raster
        positions = (self.pos_embed(self.pos_index) * self.pos_weight[..., None]).sum(1)
        return x.index_select(1, self.patch_order) + positions


# ---------------------------------------------------------------- text

class Qwen3Layer(LlamaLayer):
    """Qwen3's decoder layer: Llama's with an RMSNorm on each head's queries and keys before RoPE."""

    def __init__(self, t: TextConfig, qkv_bias: Optional[bool] = None, o_bias: Optional[bool] = None):
        super().__init__(t, qkv_bias, o_bias)
        self.self_attn.q_norm = RMSNorm(t.head_dim, t.rms_norm_eps)
        self.self_attn.k_norm = RMSNorm(t.head_dim, t.rms_norm_eps)

    def forward(self, h, rope, index: int, attend, shift: int = 0):
        cos, sin = rope
        attn = self.self_attn
        q, k, v = attn.project(self.input_layernorm(h))
        q, k = apply_rope(attn.q_norm(q), cos, sin), apply_rope(attn.k_norm(k), cos, sin)
        h = h + attn.o_proj(attend(index, q, k, v, shift))
        return h + self.mlp(self.post_attention_layernorm(h)), q, k


class Qwen3VLModel(QwenFixedGrid, core.VisionLanguageModel):
    """Qwen3-VL: ViT -> patch merger (+ DeepStack mergers) -> Qwen3 decoder with interleaved M-RoPE."""

    family = "qwen3_vl"

    def __init__(self, config: Qwen3VLConfig):
        super().__init__(config)
        v = config.vision
        self.connector_merge = v.spatial_merge_size
        self.tapped_blocks = tuple(sorted(v.deepstack_visual_indexes))
        self.deepstack_layers = len(v.deepstack_visual_indexes)
        self.visual = VisionTower(v, config.image_size)
        self.model = LlamaBody(config.text, rope=False, layer=Qwen3Layer)
        self.rotary = MRope(config.text.head_dim, config.text.rope_theta, config.mrope_section, interleaved=True)
        self.add_head()
        self._rows: tuple = ((), self.num_image_tokens)  # (projector.out stages, image rows they leave)

    def connect(self, features: torch.Tensor, taps: list[torch.Tensor]) -> torch.Tensor:
        """[main merger | DeepStack merger of each tapped block, in the order decoder layers add them]."""
        order = self.config.vision.deepstack_visual_indexes
        mergers = self.visual.deepstack_merger_list
        deep = [mergers[order.index(b)](x) for b, x in zip(self.tapped_blocks, taps)]
        return torch.cat([self.visual.merger(features), *deep], -1) if deep else self.visual.merger(features)

    def resize_positions(self, grid: int) -> None:
        """Qwen3-VL resamples its position table and rotary positions to any grid: done for this one."""
        self.visual.set_grid(grid)
        self._rows = ((), (grid // self.connector_merge) ** 2)


def build(cfg: dict, directory, preprocessor: dict, image_size: Optional[int] = None) -> Qwen3VLModel:
    return Qwen3VLModel(Qwen3VLConfig.from_hf(cfg, read_preprocessor(directory, preprocessor), image_size))


def normalize_hf_key(key: str) -> str:
    """transformers 5's names (`model.visual.`, `model.language_model.`; also the flat `visual.`, `model.`)
    -> vlmc's (`visual.`, `model.`)."""
    key = re.sub(r"^model\.visual\.", "visual.", key)
    return re.sub(r"^model\.language_model\.", "model.", key)


def to_hf_key(key: str) -> str:
    if key.startswith("visual."):
        return "model." + key
    return re.sub(r"^model\.", "model.language_model.", key)


def to_hf_config(c: Qwen3VLConfig) -> dict:
    v, t = c.vision, c.text
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
        "image_token_id": c.image_token_id, "video_token_id": c.video_token_id,
        "vision_start_token_id": c.vision_start_token_id, "vision_end_token_id": c.vision_end_token_id,
        "tie_word_embeddings": t.tie_word_embeddings,
        "vision_config": {"model_type": "qwen3_vl_vision", "depth": v.depth, "hidden_size": v.hidden_size,
                          "intermediate_size": v.intermediate_size, "num_heads": v.num_heads, "out_hidden_size": v.out_hidden_size,
                          "num_position_embeddings": v.num_position_embeddings,
                          "deepstack_visual_indexes": list(v.deepstack_visual_indexes), "hidden_act": v.hidden_act,
                          "patch_size": v.patch_size, "spatial_merge_size": v.spatial_merge_size,
                          "temporal_patch_size": v.temporal_patch_size, "in_channels": v.in_channels},
        "text_config": {"model_type": "qwen3_vl_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
                        "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim,
                        "rms_norm_eps": t.rms_norm_eps, "hidden_act": t.hidden_act, "attention_bias": t.attention_bias,
                        "tie_word_embeddings": t.tie_word_embeddings,
                        "rope_parameters": {"rope_type": "default", "mrope_section": list(c.mrope_section),
                                            "mrope_interleaved": True, "rope_theta": t.rope_theta},
                        "bos_token_id": t.bos_token_id,
                        "eos_token_id": list(t.eos_token_ids) if len(t.eos_token_ids) > 1 else t.eos_token_ids[0]},
    }
