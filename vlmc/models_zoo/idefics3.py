"""The Idefics3 / SmolVLM / SmolVLM2 family adapter (config.json model_type `idefics3` or `smolvlm`):
a SigLIP tower (no CLS, post-layernorm, last layer), a pixel-shuffle connector (scale_factor^2 patches
into one token, a linear without bias) and a Llama decoder, on the family-agnostic core.

Without a tile grid the image is one global tile at the tower's resolution (the processor with
`do_image_splitting=False`): the host resizes the longer side to the processor's `size.longest_edge`,
then to a square of `max_image_size` (LANCZOS, on uint8, as Idefics3's image processor does), so the
token count is static: (image_size / patch_size / scale_factor)^2 (64 for SmolVLM2-256M / 500M).

With a tile grid (recipe `tile_grid: [rows, cols]`, fixed at export) the host splits the image as the
processor does with `do_image_splitting=True` for an image of that grid: the longer side to
`size.longest_edge`, the whole to rows x cols tiles of the tower's side, the tiles row by row and then the
global image (the resized image squeezed to one tile). The vision encoder runs once per tile, and the
prompt holds one run of image tokens per tile between the processor's separators
(`<fake_token_around_image><row_R_col_C>`, a newline after each row, then the global image's wrap).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
from torch import nn

from vlmc.errors import VlmcError
from vlmc.models_zoo import core
from vlmc.models_zoo.layers import LlamaBody, SiglipTower, TextConfig, VisionConfig, parse_text_config, parse_vision_config

SIGLIP_DEFAULTS = {"image_size": 224, "patch_size": 32, "hidden_size": 1152, "intermediate_size": 3072,
                   "num_hidden_layers": 12, "num_attention_heads": 16, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"}
DEFAULT_TEMPLATE = "<|im_start|>User:<image>{prompt}<end_of_utterance>\nAssistant:"
AROUND_IMAGE = "<fake_token_around_image>"
IMAGE_WRAP = (AROUND_IMAGE + "<global-img>", AROUND_IMAGE)
MAX_TILES = 8  # per side of the tile grid
PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class Idefics3Config:
    vision: VisionConfig
    text: TextConfig
    image_token_id: int
    scale_factor: int = 2
    model_type: str = "idefics3"
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    resize_longest_edge: int = 1456
    resize_filter: str = "lanczos"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf(cls, cfg: dict, preprocessor: dict) -> "Idefics3Config":
        try:
            v, t = cfg["vision_config"], cfg.get("text_config") or {}
        except KeyError as e:
            raise VlmcError(f"config.json: missing {e.args[0]!r}") from None
        if t.get("model_type", "llama") != "llama":
            raise VlmcError(f"config.json: text_config.model_type {t.get('model_type')!r} is not supported (need llama)")
        vision = parse_vision_config(v, SIGLIP_DEFAULTS)
        # the top-level flag decides tying in this family (text_config's is ignored by transformers)
        text = replace(parse_text_config(t, cfg, {"rms_norm_eps": 1e-5}),
                       tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))
        scale = cfg.get("scale_factor", 2)
        grid = vision.image_size // vision.patch_size
        if not isinstance(scale, int) or scale < 1 or grid % scale:
            raise VlmcError(f"config.json: scale_factor {scale!r} must be a positive integer dividing the {grid}x{grid} patch grid")
        image_token = cfg.get("image_token_id")
        if not isinstance(image_token, int):
            raise VlmcError("config.json: missing integer 'image_token_id'")
        max_size = (preprocessor.get("max_image_size") or {}).get("longest_edge", vision.image_size)
        if max_size != vision.image_size:
            raise VlmcError(f"preprocessor_config.json: max_image_size.longest_edge {max_size} differs from the vision "
                            f"tower's image_size {vision.image_size}")
        longest = (preprocessor.get("size") or {}).get("longest_edge", 4 * vision.image_size)
        resample = preprocessor.get("resample", 1)
        if resample not in PIL_FILTERS:
            raise VlmcError(f"preprocessor_config.json: resample {resample!r} is not a PIL filter code (0..3)")
        return cls(vision=vision, text=text, image_token_id=image_token, scale_factor=scale,
                   model_type=cfg.get("model_type", "idefics3"),
                   image_mean=tuple(preprocessor.get("image_mean", (0.5, 0.5, 0.5))),
                   image_std=tuple(preprocessor.get("image_std", (0.5, 0.5, 0.5))),
                   resize_longest_edge=int(longest), resize_filter=PIL_FILTERS[resample])


def bucketed_position_ids(grid: int, table: Optional[int] = None) -> torch.Tensor:
    """The position ids Idefics3's embeddings give a full, unpadded grid x grid image read from a
    table x table position table (default: the same grid): fractional patch coordinates bucketed in
    float32. Not always arange(grid^2) (float rounding differs at grid 19, 25, 29, ...), so they are
    computed the way transformers computes them and kept as a constant. A smaller image reads a spread
    subset of the table: how Idefics3 encodes any image below its maximum size."""
    table = table or grid
    boundaries = torch.arange(1 / table, 1.0, 1 / table)
    frac = torch.clamp(torch.arange(grid, dtype=torch.float32) * (1.0 / grid), max=1 - 1e-6)
    buckets = torch.bucketize(frac, boundaries, right=True)
    return (buckets[:, None] * table + buckets[None, :]).reshape(-1)


class ModalityProjection(nn.Module):
    def __init__(self, width_in: int, width_out: int):
        super().__init__()
        self.proj = nn.Linear(width_in, width_out, bias=False)

    def forward(self, x):
        return self.proj(x)


def pixel_shuffle(x: torch.Tensor, grid: int, scale: int) -> torch.Tensor:
    """[B, grid^2, D] -> [B, (grid/scale)^2, scale^2 D]: each scale x scale block of patches becomes one
    token, its patches concatenated row by row (out[i*g'+j, (r*s+c)*D:] = x[(s*i+r)*grid + s*j+c])."""
    b, _, d = x.shape
    g = grid // scale
    return x.view(b, g, scale, g, scale, d).permute(0, 1, 3, 2, 4, 5).reshape(b, g * g, scale * scale * d)


class Connector(nn.Module):
    def __init__(self, c: Idefics3Config):
        super().__init__()
        self.grid, self.scale_factor = c.vision.image_size // c.vision.patch_size, c.scale_factor
        self.modality_projection = ModalityProjection(c.vision.hidden_size * c.scale_factor ** 2, c.text.hidden_size)

    def forward(self, x):
        return self.modality_projection(pixel_shuffle(x, self.grid, self.scale_factor))


class Idefics3Model(core.VisionLanguageModel):
    """Idefics3 / SmolVLM: SigLIP -> pixel shuffle + linear -> Llama."""

    vision_blocks_path = "vision_model.encoder.layers"
    connector_path = "connector"
    embed_tokens_path = "text_model.embed_tokens"
    decoder_layers_path = "text_model.layers"
    final_norm_path = "text_model.norm"
    parts = {"vision": ("vision_model", "connector"), "decoder": ("text_model.layers", "lm_head")}

    def __init__(self, config: Idefics3Config, tile_grid: Optional[tuple[int, int]] = None):
        super().__init__(config)
        self.family = config.model_type
        self.connector_merge = config.scale_factor
        self.tile_grid = tile_grid
        rule = "longest_edge_tiles" if tile_grid else "longest_edge_then_square"
        self.image_resize = {"rule": rule, "filter": config.resize_filter, "longest_edge": config.resize_longest_edge,
                             **({"grid": list(tile_grid)} if tile_grid else {})}
        self.vision_model = SiglipTower(config.vision, bucketed_position_ids(self.patch_grid))
        self.connector = Connector(config)
        self.text_model = LlamaBody(config.text)
        self.add_head()

    @property
    def image_tiles(self) -> int:
        if self.tile_grid is None:
            return 1
        rows, cols = self.tile_grid
        return rows * cols + 1

    def image_text(self, wrapped: str) -> str:
        """The processor's prompt for a split image: each tile's run after its row/column marker, a newline
        after each row of tiles, then a newline and the global image's run in its usual wrap."""
        if self.tile_grid is None:
            return wrapped
        rows, cols = self.tile_grid
        grid = "".join("".join(f"{AROUND_IMAGE}<row_{r + 1}_col_{c + 1}><image>" for c in range(cols)) + "\n"
                       for r in range(rows))
        return grid + "\n" + wrapped

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model.embeddings(pixel_values)

    def select_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.vision_model.post_layernorm(x)

    def resize_positions(self, grid: int) -> None:
        table = self.config.vision.image_size // self.config.vision.patch_size
        self.vision_model.embeddings.position_ids = bucketed_position_ids(grid, table)
        self.connector.grid = grid

    def rope(self, position_ids: torch.Tensor):
        return self.text_model.rotary(position_ids)


def build(cfg: dict, directory, preprocessor: dict, tile_grid: Optional[tuple[int, int]] = None) -> Idefics3Model:
    if tile_grid is not None:
        rows, cols = tile_grid
        if rows * cols < 2:
            raise VlmcError("recipe field 'tile_grid': a 1x1 grid is the global image alone (the processor never splits "
                            "into one tile); omit tile_grid, or give at least 2 tiles")
    return Idefics3Model(Idefics3Config.from_hf(cfg, preprocessor), tile_grid)


def normalize_hf_key(key: str) -> str:
    """transformers' names (`model.vision_model.`, `model.connector.`, `model.text_model.`) -> vlmc's."""
    return re.sub(r"^model\.", "", key)


to_hf_key = core.model_prefixed_key


def to_hf_config(c: Idefics3Config) -> dict:
    v, t = c.vision, c.text
    arch = "SmolVLMForConditionalGeneration" if c.model_type == "smolvlm" else "Idefics3ForConditionalGeneration"
    return {
        "architectures": [arch], "model_type": c.model_type, "image_token_id": c.image_token_id,
        "scale_factor": c.scale_factor, "tie_word_embeddings": t.tie_word_embeddings,
        "vision_config": {"model_type": f"{c.model_type}_vision", "image_size": v.image_size, "patch_size": v.patch_size,
                          "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                          "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
                          "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act, "num_channels": v.num_channels},
        "text_config": {"model_type": "llama", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
                        "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim,
                        "rms_norm_eps": t.rms_norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
                        "hidden_act": t.hidden_act, "attention_bias": t.attention_bias, "mlp_bias": t.mlp_bias,
                        "tie_word_embeddings": t.tie_word_embeddings, "bos_token_id": t.bos_token_id,
                        "eos_token_id": list(t.eos_token_ids) if len(t.eos_token_ids) > 1 else t.eos_token_ids[0]},
    }
