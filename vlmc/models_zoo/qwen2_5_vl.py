"""The Qwen2.5-VL family adapter (config.json model_type `qwen2_5_vl`; also Qwen2-VL, `qwen2_vl`): a ViT
with 2-D rotary positions and window attention (full attention in `fullatt_block_indexes`), a patch merger
(RMSNorm + MLP over each 2x2 patch group) as the connector, and a Qwen2 decoder with M-RoPE.

Export-first, at one square resolution chosen at export (recipe field `image_size`, a multiple of
patch_size * spatial_merge_size = 28; default: the largest multiple of 28 not above 448 that the
preprocessor's `max_pixels` allows). What transformers computes from `image_grid_thw` on the host is a
constant of that grid here: the processor's patch order (2x2 merge groups in raster order), the window
permutation and its inverse, the vision rotary tables and the window blocks' attention mask. The Conv3d
patch embedding over a still image (the frame repeated temporal_patch_size times) is a Conv2d with the
kernel summed over time.

The host resizes the image straight to image_size x image_size (bicubic, rule `square`): Qwen's
smart_resize leaves an image whose sides are multiples of 28 (within min/max_pixels) unchanged, so this
equals the processor on the pre-resized image. Image tokens: (image_size / 28)^2.

M-RoPE positions are computed in the graph from the prompt's row numbers (`rope`): rows before the image
keep theirs, the image's rows are (S, S + row, S + col) for the image's first row S, later rows continue at
row - N + max(grid_h, grid_w). S comes from the prompt template, so the template must put the image before
the question. After a token pass at projector.out the N' kept rows take the grid positions of the first N'
raster slots (the kept tokens' own cells are not passed to the decoder) and the text after the image keeps
the positions it has without the pass.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlmc.errors import VlmcError
from vlmc.models_zoo import core
from vlmc.models_zoo.layers import (
    GatedMLP, LlamaBody, RMSNorm, TextConfig, ViTMLP, config_float, config_int, check_activation, parse_text_config,
    rotate_half,
)

DEFAULT_TEMPLATE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n<image>{prompt}<|im_end|>\n<|im_start|>assistant\n")
IMAGE_WRAP = ("<|vision_start|>", "<|vision_end|>")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_SIDE = 448


@dataclass(frozen=True)
class QwenVisionConfig:
    """The Qwen ViT's geometry. `hidden_size` is the ViT's width (Qwen2-VL's `embed_dim`), `out_hidden_size`
    the merger's output (the decoder's width). `window_size` 0: every block attends to the whole image (Qwen2-VL)."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple = (7, 15, 23, 31)
    hidden_act: str = "silu"
    in_channels: int = 3
    rope_theta: float = 10000.0
    qwen2_vl: bool = False  # LayerNorm norms, fc1/fc2 MLP, no windows

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class QwenVLConfig:
    vision: QwenVisionConfig
    text: TextConfig
    image_token_id: int
    mrope_section: tuple
    image_size: int
    model_type: str = "qwen2_5_vl"
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf(cls, cfg: dict, preprocessor: dict, image_size: Optional[int] = None) -> "QwenVLConfig":
        model_type = cfg.get("model_type", "qwen2_5_vl")
        text, section = parse_mrope_text(cfg)
        vision = _vision_config(cfg.get("vision_config") or {}, model_type == "qwen2_vl")
        if vision.out_hidden_size != text.hidden_size:
            raise VlmcError(f"config.json: vision_config's output width {vision.out_hidden_size} is not the decoder's hidden_size {text.hidden_size}")
        return cls(vision=vision, text=text, mrope_section=section, model_type=model_type,
                   **image_fields(cfg, preprocessor, vision.patch_size * vision.spatial_merge_size, image_size))


def parse_mrope_text(cfg: dict, rms_norm_eps: float = 1e-5) -> tuple[TextConfig, tuple]:
    """The decoder config of a Qwen-VL checkpoint and its M-RoPE section (t, h, w frequency counts)."""
    # transformers 5 nests the text keys in text_config; the original configs keep them at the top level
    top = {k: v for k, v in cfg.items() if k not in ("text_config", "vision_config")}
    t = {**top, **{k: v for k, v in (cfg.get("text_config") or {}).items() if v is not None}}
    if t.get("use_sliding_window"):
        raise VlmcError("config.json: text_config.use_sliding_window is true; vlmc supports Qwen-VL's full attention only")
    rope = dict(t.get("rope_parameters") or t.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "mrope"):
        raise VlmcError(f"config.json: text_config.rope_parameters.rope_type {kind!r} is not supported (default / mrope only)")
    section = rope.get("mrope_section")
    if not isinstance(section, (list, tuple)) or len(section) != 3:
        raise VlmcError("config.json: text_config.rope_parameters.mrope_section is missing or not three numbers")
    theta = rope.get("rope_theta", t.get("rope_theta", 1000000.0))
    t = {k: v for k, v in t.items() if k not in ("rope_scaling", "rope_theta")}
    t["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    t.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
    text = parse_text_config(t, cfg, {"bos_token_id": 151643, "eos_token_id": 151645, "rms_norm_eps": rms_norm_eps})
    if 2 * sum(section) != text.head_dim:
        raise VlmcError(f"config.json: text_config.rope_parameters.mrope_section {list(section)} does not sum to head_dim/2 = {text.head_dim // 2}")
    return text, tuple(int(s) for s in section)


def image_fields(cfg: dict, preprocessor: dict, factor: int, image_size: Optional[int]) -> dict:
    """The config fields a Qwen-VL family shares: special tokens, normalisation, pixel bounds and the export
    side (a multiple of `factor` = patch x merge; default the largest one not above 448 that max_pixels allows)."""
    size = preprocessor.get("size") or {}
    min_pixels = int(preprocessor.get("min_pixels") or size.get("shortest_edge") or 56 * 56)
    max_pixels = int(preprocessor.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280)
    if image_size is None:
        image_size = max(factor, min(DEFAULT_SIDE, math.isqrt(max_pixels)) // factor * factor)
    elif image_size % factor:
        raise VlmcError(f"recipe field 'image_size': {image_size} is not a multiple of {factor} "
                        f"(patch_size x spatial_merge_size), e.g. {max(factor, image_size // factor * factor)}")
    for key in ("do_resize", "do_rescale", "do_normalize"):
        if preprocessor.get(key) is False:
            raise VlmcError(f"preprocessor_config.json: {key} false is not supported")
    return dict(image_token_id=config_int("config.json", cfg, "image_token_id", 151655), image_size=int(image_size),
                video_token_id=int(cfg.get("video_token_id", 151656)),
                vision_start_token_id=int(cfg.get("vision_start_token_id", 151652)),
                vision_end_token_id=int(cfg.get("vision_end_token_id", 151653)),
                image_mean=tuple(preprocessor.get("image_mean", CLIP_MEAN)),
                image_std=tuple(preprocessor.get("image_std", CLIP_STD)), min_pixels=min_pixels, max_pixels=max_pixels)


def _vision_config(v: dict, qwen2: bool) -> QwenVisionConfig:
    v = {k: x for k, x in v.items() if x is not None}
    for key in ("patch_size", "temporal_patch_size"):
        if isinstance(v.get(key), (list, tuple)):
            raise VlmcError(f"config.json: vision_config.{key} {v[key]!r}: only a single (square) size is supported")
    rope = v.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") not in ("axial", "default"):
        raise VlmcError(f"config.json: vision_config.rope_parameters.rope_type {rope['rope_type']!r} is not supported")
    s = "vision_config"
    if qwen2:
        width = config_int(s, v, "embed_dim", 1280)
        c = QwenVisionConfig(
            depth=config_int(s, v, "depth", 32), hidden_size=width, intermediate_size=int(width * config_float(s, v, "mlp_ratio", 4)),
            num_heads=config_int(s, v, "num_heads", 16), out_hidden_size=config_int(s, v, "hidden_size", 3584), window_size=0,
            fullatt_block_indexes=tuple(range(config_int(s, v, "depth", 32))), hidden_act=v.get("hidden_act", "quick_gelu"),
            qwen2_vl=True, **_common_vision(v))
    else:
        full = v.get("fullatt_block_indexes", (7, 15, 23, 31))
        c = QwenVisionConfig(
            depth=config_int(s, v, "depth", 32), hidden_size=config_int(s, v, "hidden_size", 3584),
            intermediate_size=config_int(s, v, "intermediate_size", 3420), num_heads=config_int(s, v, "num_heads", 16),
            out_hidden_size=config_int(s, v, "out_hidden_size", 3584), window_size=config_int(s, v, "window_size", 112),
            fullatt_block_indexes=tuple(int(i) for i in full), hidden_act=v.get("hidden_act", "silu"), **_common_vision(v))
        if c.window_size < c.patch_size * c.spatial_merge_size:
            raise VlmcError(f"config.json: vision_config.window_size {c.window_size} is smaller than one merged patch "
                            f"({c.patch_size * c.spatial_merge_size} px)")
    check_activation("vision_config.hidden_act", c.hidden_act)
    if c.in_channels != 3:
        raise VlmcError(f"config.json: vision_config.in_channels {c.in_channels}: only RGB (3) is supported")
    if c.hidden_size % c.num_heads or c.head_dim % 4:
        raise VlmcError("config.json: vision_config.hidden_size / num_heads is not a multiple of 4 (2-D rotary halves)")
    return c


def _common_vision(v: dict) -> dict:
    s = "vision_config"
    return dict(patch_size=config_int(s, v, "patch_size", 14), spatial_merge_size=config_int(s, v, "spatial_merge_size", 2),
                temporal_patch_size=config_int(s, v, "temporal_patch_size", 2),
                in_channels=config_int(s, v, "in_channels", v.get("in_chans", 3)),
                rope_theta=config_float(s, {"t": (v.get("rope_parameters") or {}).get("rope_theta", 10000.0)}, "t", 10000.0))


# ---------------------------------------------------------------- the fixed grid's constants

def vision_geometry(c: QwenVisionConfig, image_size: int) -> dict[str, torch.Tensor]:
    """For a square image of `image_size`: `order` [N] the conv grid's raster patches in the tower's order
    (2x2 merge groups, windows in raster order, raster inside a window), `unwindow` [N/4] the inverse
    permutation of the merged tokens, `window` [N] each patch's window id, `cos`/`sin` [N, hd] the 2-D
    rotary tables in the tower's order."""
    m, g = c.spatial_merge_size, image_size // c.patch_size
    lg = g // m
    vws = c.window_size // m // c.patch_size if c.window_size else lg
    per_row = -(-lg // vws)
    cells = [(r, col) for r in range(lg) for col in range(lg)]
    wid = {cell: (cell[0] // vws) * per_row + cell[1] // vws for cell in cells}
    windowed = sorted(cells, key=lambda cell: wid[cell])  # stable: raster inside each window
    order, window = [], []
    for r, col in windowed:
        for sr in range(m):
            for sc in range(m):
                order.append((r * m + sr) * g + col * m + sc)
                window.append(wid[(r, col)])
    order_t = torch.tensor(order)
    merged = torch.tensor([r * lg + col for r, col in windowed])
    hd = c.head_dim
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd // 2, 2, dtype=torch.float32) / (hd // 2)))
    hpos, wpos = (order_t // g).float(), (order_t % g).float()
    freqs = torch.cat([hpos[:, None] * inv, wpos[:, None] * inv], -1)
    emb = torch.cat([freqs, freqs], -1)
    return {"order": order_t, "unwindow": torch.argsort(merged), "window": torch.tensor(window),
            "cos": emb.cos(), "sin": emb.sin()}


# ---------------------------------------------------------------- vision

class PatchEmbed(nn.Module):
    def __init__(self, c, bias: bool = False):
        super().__init__()
        k = (c.temporal_patch_size, c.patch_size, c.patch_size)
        self.proj = nn.Conv3d(c.in_channels, c.hidden_size, k, stride=k, bias=bias)
        self.patch_size = c.patch_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> [B,D,H/p,W/p]: a still image is its frame repeated over time, so the Conv3d is a
        Conv2d with the kernel summed over the temporal axis."""
        return F.conv2d(pixels, self.proj.weight.sum(2), self.proj.bias, stride=self.patch_size)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v  # [B,H,N,d] each


def _rotate(x, cos, sin):
    return x * cos + rotate_half(x) * sin


class QwenVisionBlock(nn.Module):
    """A Qwen2.5-VL vision block (RMSNorms, SwiGLU MLP with biases) or a Qwen2-VL one (LayerNorms, fc1/fc2),
    window attention unless `full`. The grid's rotary tables and window mask live on the tower (shared by
    every block), reached through a reference that is not a submodule."""

    def __init__(self, c, full: bool):
        super().__init__()
        self.norm1, self.norm2, self.mlp = self.norms_and_mlp(c)
        self.attn = VisionAttention(c.hidden_size, c.num_heads)
        self.full = full
        self._tower: list = []  # [the tower], set by it

    @staticmethod
    def norms_and_mlp(c: QwenVisionConfig) -> tuple[nn.Module, nn.Module, nn.Module]:
        d = c.hidden_size
        if c.qwen2_vl:
            return nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6), ViTMLP(d, c.intermediate_size, c.hidden_act)
        return RMSNorm(d, 1e-6), RMSNorm(d, 1e-6), GatedMLP(d, c.intermediate_size, c.hidden_act, bias=True)

    def _rope(self):
        t = self._tower[0]
        return t.rope_cos, t.rope_sin

    def _rotated(self, x_in):
        cos, sin = self._rope()
        q, k, v = self.attn.qkv_heads(self.norm1(x_in))
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def forward(self, x, size: Optional[torch.Tensor] = None):
        q, k, v = self._rotated(x)
        mask = None if self.full else self._tower[0].window_mask
        if size is not None:  # proportional attention of merged tokens (see layers.ViTAttention)
            bias = size.log().transpose(1, 2)[:, None]
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.attn.proj(out.transpose(1, 2).reshape(x.shape))
        return x + self.mlp(self.norm2(x))

    def queries(self, x_in: torch.Tensor) -> torch.Tensor:
        return self._rotated(x_in)[0]

    def keys(self, x_in: torch.Tensor) -> torch.Tensor:
        return self._rotated(x_in)[1]

    def smoothing_groups(self) -> list[tuple[str, list[str]]]:
        mlp = ["mlp.fc1"] if isinstance(self.mlp, ViTMLP) else ["mlp.gate_proj", "mlp.up_proj"]
        return [("norm1", ["attn.qkv"]), ("norm2", mlp)]


class PatchMerger(nn.Module):
    """The connector: each 2x2 patch group (consecutive in the tower's order) normalised, concatenated and
    projected by an MLP; then the merged tokens are put back from window order into raster order."""

    def __init__(self, c: QwenVisionConfig, unwindow: torch.Tensor):
        super().__init__()
        width = c.hidden_size * c.spatial_merge_size ** 2
        self.ln_q = nn.LayerNorm(c.hidden_size, eps=1e-6) if c.qwen2_vl else RMSNorm(c.hidden_size, 1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, c.out_hidden_size))
        self.width = width
        self.register_buffer("unwindow", unwindow, persistent=False)

    def forward(self, x):
        b, n, _ = x.shape
        y = self.mlp(self.ln_q(x).reshape(b, n * x.shape[2] // self.width, self.width))
        return y.index_select(1, self.unwindow)


class VisionTower(nn.Module):
    """`visual`: patch embedding, blocks and merger under Hugging Face's names, and the grid's constants."""

    def __init__(self, c: QwenVisionConfig, image_size: int):
        super().__init__()
        geo = vision_geometry(c, image_size)
        self.patch_embed = PatchEmbed(c)
        self.blocks = nn.ModuleList(QwenVisionBlock(c, i in c.fullatt_block_indexes) for i in range(c.depth))
        self.merger = PatchMerger(c, geo["unwindow"])
        for name in ("patch_order", "rope_cos", "rope_sin", "window_mask"):
            self.register_buffer(name, None, persistent=False)
        self.set_geometry(geo)
        for block in self.blocks:
            block._tower.append(self)

    def set_geometry(self, geo: dict[str, torch.Tensor]) -> None:
        """The grid's constants (`vision_geometry`): patch order, rotary tables, window mask, merger order."""
        self.patch_order, self.rope_cos, self.rope_sin = geo["order"], geo["cos"], geo["sin"]
        self.window_mask = geo["window"][:, None] == geo["window"][None, :]
        self.merger.unwindow = geo["unwindow"]

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # [B, N, D], raster
        return x.index_select(1, self.patch_order)


# ---------------------------------------------------------------- text

class MRope(nn.Module):
    """Multimodal rotary embedding: frequency j rotates by the t, h or w position (mrope_section). Qwen2-VL
    and 2.5 give each axis a contiguous run of frequencies; Qwen3-VL (`interleaved`) cycles t, h, w over
    the first 3 x section[1|2] frequencies and gives the rest to t."""

    def __init__(self, head_dim: int, theta: float, section: tuple, interleaved: bool = False):
        super().__init__()
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if interleaved:
            j = torch.arange(head_dim // 2)
            owner = torch.zeros_like(j)
            for axis in (1, 2):
                owner[(j % 3 == axis) & (j < 3 * section[axis])] = axis
        else:
            owner = torch.repeat_interleave(torch.arange(3), torch.tensor(section), output_size=sum(section))
        for axis, name in enumerate(("inv_t", "inv_h", "inv_w")):
            self.register_buffer(name, torch.where(owner == axis, inv, torch.zeros_like(inv)), persistent=False)

    def forward(self, t, h, w):
        freqs = t[..., None].float() * self.inv_t + h[..., None].float() * self.inv_h + w[..., None].float() * self.inv_w
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


class QwenFixedGrid:
    """What the Qwen-VL families share (mixed into their model before the core): the `visual` / `model`
    anatomy under transformers' names, one square grid fixed at export, M-RoPE positions from the prompt's
    row numbers."""

    needs_image_start = True
    vision_blocks_path = "visual.blocks"
    connector_path = "visual.merger"
    embed_tokens_path = "model.embed_tokens"
    decoder_layers_path = "model.layers"
    final_norm_path = "model.norm"
    parts = {"vision": ("visual",), "decoder": ("model.layers", "lm_head")}
    image_resize = {"rule": "square", "filter": "bicubic"}

    @property
    def num_vision_blocks(self) -> int:
        return self.config.vision.depth

    @property
    def native_image_size(self) -> int:
        return self.config.image_size

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual.embed(pixel_values)

    def select_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def insert(self, point, stage) -> None:
        super().insert(point, stage)
        self.image_rows()

    def pop(self, point):
        stage = super().pop(point)
        self.image_rows()
        return stage

    def image_rows(self) -> int:
        """The image rows a prompt holds: what the stages at projector.out leave of the merged grid (found
        by running them on zeros, once per set of stages; shapes are static)."""
        stages = tuple(self.insertions["projector_out"]) if "projector_out" in self.insertions else ()
        cached, rows = self._rows
        if len(cached) != len(stages) or any(a is not b for a, b in zip(cached, stages)):
            with torch.no_grad():
                x = torch.zeros(1, self.num_image_tokens, self.embed_width)
                rows = self._stage("projector.out", x).shape[1] if stages else self.num_image_tokens
            self._rows = (stages, rows)
        return rows

    def mrope_positions(self, position_ids: torch.Tensor):
        """Row numbers [B,T] (int64) -> the (t, h, w) positions transformers' get_rope_index gives them."""
        if self.image_start is None:
            raise VlmcError(f"the {self.family} family needs the prompt template to put <image> before {{prompt}}: "
                            "its M-RoPE positions depend on the row where the image starts")
        s, n, side = self.image_start, self.image_rows(), self.patch_grid // self.connector_merge
        i = position_ids
        before, image = i < s, i < s + n  # (no `&`: Core ML's converter lacks it)
        after = core.add_int(i, side - n)
        k = core.add_int(i, -s).clamp(0, n - 1).reshape(-1)
        rows = torch.tensor([s + j // side for j in range(n)]).index_select(0, k).view_as(i)
        cols = torch.tensor([s + j % side for j in range(n)]).index_select(0, k).view_as(i)
        return tuple(torch.where(before, i, torch.where(image, inner, after)) for inner in (torch.full_like(i, s), rows, cols))

    def rope(self, position_ids: torch.Tensor):
        return self.rotary(*self.mrope_positions(position_ids))


class QwenVLModel(QwenFixedGrid, core.VisionLanguageModel):
    """Qwen2.5-VL / Qwen2-VL: window-attention ViT -> patch merger -> Qwen2 decoder with M-RoPE."""

    def __init__(self, config: QwenVLConfig):
        super().__init__(config)
        self.family = config.model_type
        self.connector_merge = config.vision.spatial_merge_size
        self.visual = VisionTower(config.vision, config.image_size)
        self.model = LlamaBody(config.text, qkv_bias=True, o_bias=False, rope=False)  # Qwen2; M-RoPE below
        self.rotary = MRope(config.text.head_dim, config.text.rope_theta, config.mrope_section)
        self.add_head()
        self._rows: tuple = ((), self.num_image_tokens)  # (projector.out stages, image rows they leave)

    def resize_positions(self, grid: int) -> None:
        """Qwen's vision rotary positions, windows and merge order all follow the grid: recomputed for it."""
        self.visual.set_geometry(vision_geometry(self.config.vision, grid * self.config.vision.patch_size))
        self._rows = ((), (grid // self.connector_merge) ** 2)


def read_preprocessor(directory, preprocessor: dict) -> dict:
    """preprocessor_config.json's fields, or the image processor's in processor_config.json, where
    transformers 5's processor.save_pretrained writes them."""
    if preprocessor or directory is None:
        return preprocessor
    import json
    from pathlib import Path

    path = Path(directory) / "processor_config.json"
    if not path.is_file():
        return preprocessor
    try:
        return json.loads(path.read_text()).get("image_processor") or {}
    except (json.JSONDecodeError, AttributeError):
        raise VlmcError(f"{path}: invalid JSON object") from None


def build(cfg: dict, directory, preprocessor: dict, image_size: Optional[int] = None) -> QwenVLModel:
    return QwenVLModel(QwenVLConfig.from_hf(cfg, read_preprocessor(directory, preprocessor), image_size))


def normalize_hf_key(key: str) -> str:
    """transformers 5's module names (`model.visual.`, `model.language_model.`) and the on-disk layout
    (`visual.`, `model.`) -> vlmc's (the on-disk layout)."""
    key = re.sub(r"^model\.visual\.", "visual.", key)
    return re.sub(r"^model\.language_model\.", "model.", key)


def to_hf_key(key: str) -> str:
    return key


def to_hf_config(c: QwenVLConfig) -> dict:
    v, t = c.vision, c.text
    qwen2 = c.model_type == "qwen2_vl"
    if qwen2:
        vision = {"model_type": "qwen2_vl", "depth": v.depth, "embed_dim": v.hidden_size, "hidden_size": v.out_hidden_size,
                  "mlp_ratio": v.intermediate_size / v.hidden_size, "num_heads": v.num_heads, "hidden_act": v.hidden_act}
    else:
        vision = {"model_type": "qwen2_5_vl", "depth": v.depth, "hidden_size": v.hidden_size,
                  "intermediate_size": v.intermediate_size, "num_heads": v.num_heads, "out_hidden_size": v.out_hidden_size,
                  "window_size": v.window_size, "fullatt_block_indexes": list(v.fullatt_block_indexes), "hidden_act": v.hidden_act}
    vision.update({"patch_size": v.patch_size, "spatial_merge_size": v.spatial_merge_size, "in_channels": v.in_channels,
                   "temporal_patch_size": v.temporal_patch_size})
    return {
        "architectures": ["Qwen2VLForConditionalGeneration" if qwen2 else "Qwen2_5_VLForConditionalGeneration"],
        "model_type": c.model_type, "image_token_id": c.image_token_id, "video_token_id": c.video_token_id,
        "vision_start_token_id": c.vision_start_token_id, "vision_end_token_id": c.vision_end_token_id,
        "tie_word_embeddings": t.tie_word_embeddings, "vision_config": vision,
        "text_config": {"model_type": f"{c.model_type}_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
                        "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
                        "rms_norm_eps": t.rms_norm_eps, "hidden_act": t.hidden_act, "tie_word_embeddings": t.tie_word_embeddings,
                        "rope_parameters": {"rope_type": "default", "mrope_section": list(c.mrope_section), "rope_theta": t.rope_theta},
                        "bos_token_id": t.bos_token_id,
                        "eos_token_id": list(t.eos_token_ids) if len(t.eos_token_ids) > 1 else t.eos_token_ids[0]},
    }
