"""The Gemma 3 family adapter (config.json model_type `gemma3`, `Gemma3ForConditionalGeneration`): a SigLIP
tower (no CLS, post-layernorm, last layer), an average-pool projector (patch grid pooled to
sqrt(mm_tokens_per_image) per side, Gemma RMSNorm, a [in, out] projection matrix) and the Gemma 3 decoder,
on the family-agnostic core.

What the Gemma 3 decoder adds to a Llama-style one, all as transformers 5 computes it:
- RMSNorms with a (1 + w) gain, computed in float32; q_norm / k_norm per head before RoPE; norms before and
  after both the attention and the MLP (GELU-tanh gated);
- sliding-window layers (RoPE base `rope_local_base_freq`, never scaled) and global layers (RoPE base
  `rope_theta`, optionally linear-scaled), from `layer_types` or `sliding_window_pattern`;
- token embeddings scaled by sqrt(hidden_size) rounded to the weight dtype (image rows are not scaled);
- attention scores scaled by query_pre_attn_scalar**-0.5 instead of head_dim**-0.5;
- the image's rows attend to each other bidirectionally in the prefill (transformers builds that mask when
  the processor's token_type_ids are passed, as its processor and generate() do); text stays causal and
  sliding layers see only keys with position > query - sliding_window.

The image is one square at the tower's resolution (no pan-and-scan): the host resizes straight to it with
the processor's filter, ignoring the aspect (vlmc.runtimes.image rule "square").

Token passes: visual-token passes run at projector.out (the pooling connector needs the whole patch grid);
in-LLM passes (decoder.layer[i]) are refused: after a drop, cache slots no longer equal positions, and the
sliding windows and the image's bidirectional block are defined on positions.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlmc.errors import VlmcError
from vlmc.models_zoo import core
from vlmc.models_zoo.layers import (DecoderAttention, GatedMLP, RMSNorm, SiglipTower, TextConfig, VisionConfig, apply_rope,
                                    check_activation, config_float, config_int, parse_vision_config)

SIGLIP_DEFAULTS = {"image_size": 224, "patch_size": 16, "hidden_size": 768, "intermediate_size": 3072,
                   "num_hidden_layers": 12, "num_attention_heads": 12, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"}
# Gemma3TextConfig's defaults (transformers 5)
TEXT_DEFAULTS = {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                 "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
                 "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256, "sliding_window": 4096, "bos_token_id": 2,
                 "eos_token_id": 1}
# The chat turn of Gemma 3's chat template with the image before the question. No <bos>: the tokenizer's
# own rule adds it (the real tokenizer's post-processor / add_bos_token), as vlmc does for every family.
DEFAULT_TEMPLATE = "<start_of_turn>user\n<image>{prompt}<end_of_turn>\n<start_of_turn>model\n"
# what Gemma3Processor puts around the image's run of <image_soft_token> (it replaces <start_of_image>)
IMAGE_WRAP = ("\n\n<start_of_image>", "<end_of_image>\n\n")
PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class Gemma3TextConfig(TextConfig):
    """A Gemma 3 decoder: the Llama-style geometry plus what Gemma 3 adds."""

    query_pre_attn_scalar: float = 256.0
    sliding_window: Optional[int] = 4096
    layer_types: tuple = ()
    rope_local_theta: float = 10000.0
    rope_global_factor: float = 1.0  # linear RoPE scaling of the global layers (1: none)


@dataclass(frozen=True)
class Gemma3Config:
    vision: VisionConfig
    text: Gemma3TextConfig
    image_token_id: int
    mm_tokens_per_image: int = 256
    boi_token_id: Optional[int] = None
    eoi_token_id: Optional[int] = None
    model_type: str = "gemma3"
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    resize_filter: str = "bilinear"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf(cls, cfg: dict, preprocessor: dict, generation: Optional[dict] = None) -> "Gemma3Config":
        try:
            v, t = cfg["vision_config"], cfg.get("text_config") or {}
        except KeyError as e:
            raise VlmcError(f"config.json: missing {e.args[0]!r}") from None
        if v.get("model_type", "siglip_vision_model") != "siglip_vision_model":
            raise VlmcError(f"config.json: vision_config.model_type {v.get('model_type')!r} is not supported (need siglip_vision_model)")
        if t.get("model_type", "gemma3_text") != "gemma3_text":
            raise VlmcError(f"config.json: text_config.model_type {t.get('model_type')!r} is not supported (need gemma3_text)")
        if v.get("vision_use_head", True):  # SigLIP's default: a pooling head in the weights
            raise VlmcError("config.json: vision_config.vision_use_head must be false (Gemma 3 never uses SigLIP's pooling head)")
        vision = parse_vision_config(v, SIGLIP_DEFAULTS)
        text = parse_gemma3_text(t, cfg, generation)
        mm = config_int("config", cfg, "mm_tokens_per_image", 256)
        side, grid = math.isqrt(mm), vision.image_size // vision.patch_size
        if side * side != mm or side < 1 or grid % side:
            raise VlmcError(f"config.json: mm_tokens_per_image {mm} must be a square whose side divides the {grid}x{grid} patch grid")
        image_token = cfg.get("image_token_id", cfg.get("image_token_index", 262144))
        if not isinstance(image_token, int) or isinstance(image_token, bool):
            raise VlmcError("config.json: image_token_index is not an integer")
        return cls(vision=vision, text=text, image_token_id=image_token, mm_tokens_per_image=mm,
                   boi_token_id=cfg.get("boi_token_id", cfg.get("boi_token_index")),
                   eoi_token_id=cfg.get("eoi_token_id", cfg.get("eoi_token_index")),
                   **parse_preprocessor(preprocessor, vision.image_size))


def parse_gemma3_text(t: dict, top: dict, generation: Optional[dict] = None) -> Gemma3TextConfig:
    """A `text_config` of model_type gemma3_text, in transformers 5's spelling (per-layer-type
    `rope_parameters`) or the older one (`rope_theta`, `rope_local_base_freq`, `rope_scaling`)."""
    d = {**TEXT_DEFAULTS, **{k: x for k, x in t.items() if x is not None}}
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if d.get(key) is not None:
            raise VlmcError(f"config.json: text_config.{key} {d[key]!r} is not supported (Gemma 3 uses none)")
    if d.get("use_bidirectional_attention"):
        raise VlmcError("config.json: text_config.use_bidirectional_attention (the embedding variant) is not supported")
    if d.get("attention_bias"):
        raise VlmcError("config.json: text_config.attention_bias true is not supported (Gemma 3 has no attention biases)")
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    check_activation("text_config.hidden_activation", act)
    n = config_int("text_config", d, "num_hidden_layers")
    types = d.get("layer_types")
    if types is None:
        pattern = d.get("sliding_window_pattern", d.get("_sliding_window_pattern", 6))
        if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern < 1:
            raise VlmcError(f"config.json: text_config.sliding_window_pattern {pattern!r} is not a positive integer")
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
    if not isinstance(types, list) or len(types) != n or any(x not in (SLIDING, FULL) for x in types):
        raise VlmcError(f"config.json: text_config.layer_types must list {n} entries of {SLIDING!r} / {FULL!r}")
    window = d.get("sliding_window")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise VlmcError(f"config.json: text_config.sliding_window {window!r} is not a positive integer")
    local_theta, global_theta, factor = _rope(d)
    heads = config_int("text_config", d, "num_attention_heads")
    # generation_config.json's stop tokens where given (the instruction-tuned models add <end_of_turn>)
    eos = (generation or {}).get("eos_token_id")
    eos = d.get("eos_token_id", 1) if eos is None or eos == [] else eos
    eos = tuple(eos) if isinstance(eos, list) else (eos,)
    c = Gemma3TextConfig(
        vocab_size=config_int("text_config", d, "vocab_size"), hidden_size=config_int("text_config", d, "hidden_size"),
        intermediate_size=config_int("text_config", d, "intermediate_size"), num_layers=n, num_heads=heads,
        num_kv_heads=config_int("text_config", d, "num_key_value_heads", heads), head_dim=config_int("text_config", d, "head_dim"),
        rms_norm_eps=config_float("text_config", d, "rms_norm_eps", 1e-6), rope_theta=global_theta, hidden_act=act,
        # the top-level flag decides tying in Gemma3ForConditionalGeneration
        tie_word_embeddings=bool(top.get("tie_word_embeddings", True)),
        bos_token_id=d.get("bos_token_id", 2), eos_token_ids=eos,
        query_pre_attn_scalar=config_float("text_config", d, "query_pre_attn_scalar", 256.0), sliding_window=window,
        layer_types=tuple(types), rope_local_theta=local_theta, rope_global_factor=factor)
    if c.num_heads % c.num_kv_heads:
        raise VlmcError("config.json: text_config.num_attention_heads is not a multiple of num_key_value_heads")
    if c.query_pre_attn_scalar <= 0:
        raise VlmcError("config.json: text_config.query_pre_attn_scalar must be positive")
    return c


def _rope(d: dict) -> tuple[float, float, float]:
    """(sliding theta, global theta, global linear factor) from either spelling."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and (SLIDING in params or FULL in params):
        local, full = dict(params.get(SLIDING) or {}), dict(params.get(FULL) or {})
    else:  # the older keys, or one flat dict (what transformers merges into the global layers only)
        local, full = {}, dict(params or {})
        if d.get("rope_scaling"):
            full.update(d["rope_scaling"])
    local.setdefault("rope_theta", d.get("rope_local_base_freq", 10000.0))
    full.setdefault("rope_theta", d.get("rope_theta", 1000000.0))
    for name, p in ((SLIDING, local), (FULL, full)):
        kind = p.get("rope_type", p.get("type", "default"))
        if kind not in ("default", "linear"):
            raise VlmcError(f"config.json: text_config.rope_parameters[{name!r}].rope_type {kind!r} is not supported "
                            "(vlmc supports default and linear)")
    factor = 1.0
    if full.get("rope_type", full.get("type")) == "linear":
        factor = config_float("text_config.rope_parameters", full, "factor", 1.0)
    if local.get("rope_type", local.get("type")) == "linear" and float(local.get("factor", 1.0)) != 1.0:
        raise VlmcError("config.json: text_config.rope_parameters['sliding_attention'] is linear-scaled, which Gemma 3 never does")
    return (config_float("text_config.rope_parameters", local, "rope_theta", 10000.0),
            config_float("text_config.rope_parameters", full, "rope_theta", 1000000.0), factor)


def parse_preprocessor(p: dict, image_size: int) -> dict:
    """Gemma3ImageProcessor's settings vlmc reproduces (one square image, no pan-and-scan)."""
    if p.get("do_pan_and_scan"):
        raise VlmcError("preprocessor_config.json: do_pan_and_scan is not supported (vlmc feeds one image, no crops)")
    size = p.get("size") or {"height": image_size, "width": image_size}
    if size.get("height", image_size) != image_size or size.get("width", image_size) != image_size:
        raise VlmcError(f"preprocessor_config.json: size {size} differs from the vision tower's {image_size}x{image_size}")
    if p.get("do_resize", True) is False:
        raise VlmcError("preprocessor_config.json: do_resize false is not supported (vlmc resizes every image to the tower's size)")
    if p.get("do_rescale", True) is False or abs(float(p.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
        raise VlmcError("preprocessor_config.json: rescale_factor other than 1/255 is not supported")
    resample = p.get("resample", 2)
    if resample not in PIL_FILTERS:
        raise VlmcError(f"preprocessor_config.json: resample {resample!r} is not a PIL filter code (0..3)")
    normalize = p.get("do_normalize", True)
    mean = tuple(p.get("image_mean", (0.5, 0.5, 0.5))) if normalize else (0.0, 0.0, 0.0)
    std = tuple(p.get("image_std", (0.5, 0.5, 0.5))) if normalize else (1.0, 1.0, 1.0)
    if len(mean) != 3 or len(std) != 3:
        raise VlmcError("preprocessor_config.json: image_mean and image_std need three values")
    return {"image_mean": mean, "image_std": std, "resize_filter": PIL_FILTERS[resample]}


# ---------------------------------------------------------------- modules (transformers' names)

class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: y = x / rms(x) * (1 + w), in float32, with w stored as an offset in checkpoints.

    The module keeps the gain (1 + w) in `weight`, so it reads like every other RMSNorm (smoothing folds
    divide `weight`); loading adds 1, `state_dict()` subtracts it again (checkpoints keep Gemma's offsets).
    """

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps)
        self.register_load_state_dict_pre_hook(self._from_offset)
        self.register_state_dict_post_hook(self._to_offset)

    @staticmethod
    def _from_offset(module, state_dict, prefix, *args):
        key = prefix + "weight"
        if key in state_dict:
            state_dict[key] = state_dict[key].float() + 1.0

    @staticmethod
    def _to_offset(module, state_dict, prefix, local_metadata):
        key = prefix + "weight"
        if key in state_dict:
            state_dict[key] = state_dict[key].detach() - 1.0

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


class Gemma3Projector(nn.Module):
    """Gemma3MultiModalProjector: average-pool the patch grid, Gemma RMSNorm, x @ W (W is [in, out])."""

    def __init__(self, c: Gemma3Config):
        super().__init__()
        self.grid = c.vision.image_size // c.vision.patch_size
        self.kernel = self.grid // math.isqrt(c.mm_tokens_per_image)
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(c.vision.hidden_size, c.text.hidden_size))
        self.mm_soft_emb_norm = GemmaRMSNorm(c.vision.hidden_size, c.vision.layer_norm_eps)

    def forward(self, x):
        b, _, d = x.shape
        x = x.transpose(1, 2).reshape(b, d, self.grid, self.grid)
        x = F.avg_pool2d(x, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        return self.mm_soft_emb_norm(x) @ self.mm_input_projection_weight


class Gemma3Attention(DecoderAttention):
    def __init__(self, t: Gemma3TextConfig):
        super().__init__(t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim, False, False)
        self.q_norm = GemmaRMSNorm(t.head_dim, t.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(t.head_dim, t.rms_norm_eps)


class Gemma3Layer(nn.Module):
    """Gemma 3's decoder layer. `attend` scales scores by 1/sqrt(head_dim); the queries it gets are
    pre-multiplied by sqrt(head_dim) / sqrt(query_pre_attn_scalar) (no op where the two are equal, as in
    the 1B/4B/12B models), and the layer returns the unscaled rotated queries (what token stages read)."""

    def __init__(self, t: Gemma3TextConfig, sliding: bool):
        super().__init__()
        self.sliding = sliding
        self.q_scale = math.sqrt(t.head_dim) / math.sqrt(t.query_pre_attn_scalar)
        self.input_layernorm = GemmaRMSNorm(t.hidden_size, t.rms_norm_eps)
        self.self_attn = Gemma3Attention(t)
        self.post_attention_layernorm = GemmaRMSNorm(t.hidden_size, t.rms_norm_eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(t.hidden_size, t.rms_norm_eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(t.hidden_size, t.rms_norm_eps)
        self.mlp = GatedMLP(t.hidden_size, t.intermediate_size, t.hidden_act)

    def forward(self, h, rope, index: int, attend, shift: int = 0):
        cos, sin = (rope[0], rope[1]) if self.sliding else (rope[2], rope[3])
        q, k, v = self.self_attn.project(self.input_layernorm(h))
        q, k = self.self_attn.q_norm(q), self.self_attn.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        scaled = q if self.q_scale == 1.0 else q * self.q_scale
        h = h + self.post_attention_layernorm(self.self_attn.o_proj(attend(index, scaled, k, v, shift)))
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return h, q, k

    def smoothing_groups(self) -> list[tuple[str, list[str]]]:
        return [("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                ("pre_feedforward_layernorm", ["mlp.gate_proj", "mlp.up_proj"])]


class Gemma3Rope(nn.Module):
    """Positions [B,T] -> (cos_local, sin_local, cos_global, sin_global), each [B,T,head_dim]."""

    def __init__(self, t: Gemma3TextConfig):
        super().__init__()
        exponent = torch.arange(0, t.head_dim, 2, dtype=torch.int64).float() / t.head_dim
        self.register_buffer("inv_freq_local", 1.0 / (t.rope_local_theta ** exponent), persistent=False)
        self.register_buffer("inv_freq_global", 1.0 / (t.rope_theta ** exponent) / t.rope_global_factor, persistent=False)

    def forward(self, position_ids):
        out = []
        for inv in (self.inv_freq_local, self.inv_freq_global):
            freqs = position_ids[..., None].float() * inv
            emb = torch.cat((freqs, freqs), dim=-1)
            out += [emb.cos(), emb.sin()]
        return tuple(out)


class Gemma3TextModel(nn.Module):
    def __init__(self, t: Gemma3TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleList(Gemma3Layer(t, kind == SLIDING) for kind in t.layer_types)
        self.norm = GemmaRMSNorm(t.hidden_size, t.rms_norm_eps)
        self.rotary = Gemma3Rope(t)


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


class Gemma3Model(core.VisionLanguageModel):
    """Gemma 3: SigLIP -> average pool + RMSNorm + projection -> Gemma 3 decoder."""

    family = "gemma3"
    needs_image_start = True
    vision_blocks_path = "vision_tower.encoder.layers"
    connector_path = "multi_modal_projector"
    embed_tokens_path = "language_model.embed_tokens"
    decoder_layers_path = "language_model.layers"
    final_norm_path = "language_model.norm"
    parts = {"vision": ("vision_tower", "multi_modal_projector"), "decoder": ("language_model.layers", "lm_head")}
    causal_attention = False

    def __init__(self, config: Gemma3Config):
        super().__init__(config)
        self.connector_merge = self.patch_grid // math.isqrt(config.mm_tokens_per_image)
        self.embed_scale = config.text.hidden_size ** 0.5
        self.image_resize = {"rule": "square", "filter": config.resize_filter}
        self.vision_tower = SiglipTower(config.vision)
        self.multi_modal_projector = Gemma3Projector(config)
        self.language_model = Gemma3TextModel(config.text)
        self.add_head()
        self._image_rows: Optional[int] = None  # rows the decoder receives per image, after visual-token stages

    def embed_image(self, pixel_values):
        return self.vision_tower.embeddings(pixel_values)

    def select_features(self, x):
        return self.vision_tower.post_layernorm(x)

    def resize_positions(self, grid: int) -> None:
        """SigLIP's interpolated table; the projector keeps its pooling kernel, so it emits fewer soft tokens."""
        self.vision_tower.embeddings.interpolate(grid)
        self.multi_modal_projector.grid = grid
        self._image_rows = None

    def rope(self, position_ids):
        return self.language_model.rotary(position_ids)

    def embed_text(self, input_ids):
        if self.config.image_token_id >= self.config.text.vocab_size:  # transformers embeds such placeholders as id 0
            input_ids = torch.where(input_ids == self.config.image_token_id, torch.zeros_like(input_ids), input_ids)
        return super().embed_text(input_ids)

    # ----- token stages: visual ones change the image's extent in the prompt, in-LLM ones are refused
    def insert(self, point: str, stage: nn.Module) -> None:
        transparent = getattr(stage, "transparent", False)
        if point.startswith("decoder.") and not transparent:
            self.resolve(point)
            raise VlmcError(f"insertion at {point}: in-LLM token passes are not supported for gemma3 (its sliding-window "
                            "layers and bidirectional image attention are defined on positions, which dropped rows "
                            "separate from cache slots); reduce visual tokens at projector.out instead")
        super().insert(point, stage)
        if not transparent:
            self._image_rows = None

    def pop(self, point: str) -> nn.Module:
        stage = super().pop(point)
        if not getattr(stage, "transparent", False):
            self._image_rows = None
        return stage

    def encode_image(self, pixel_values):
        out = super().encode_image(pixel_values)
        self._image_rows = int(out.shape[1])
        return out

    def image_rows(self) -> int:
        """The image's rows in the prompt: what the connector and the stages after it leave."""
        if self._image_rows is None:
            if _tracing():
                raise VlmcError("gemma3: the image's row count is unknown while tracing (encode an image first)")
            s = self.image_size
            with torch.no_grad():
                self.encode_image(torch.zeros(1, 3, s, s))
        return self._image_rows

    def attention_mask(self, layer: int, q_slots: torch.Tensor, k_slots: torch.Tensor) -> torch.Tensor:
        """Causal, or-ed with the image's rows seeing each other (where the template fixes the image's start),
        and-ed on sliding layers with key > query - sliding_window (transformers' masks)."""
        # logical_and / logical_or, not & / |: Core ML's converter has no aten.__and__ / __or__
        q, k = q_slots[:, None], k_slots[None, :]
        allowed = k <= q
        if self.image_start is not None:
            start, end = self.image_start, self.image_start + self.image_rows()
            q_image = torch.logical_and(q >= start, q < end)
            k_image = torch.logical_and(k >= start, k < end)
            allowed = torch.logical_or(allowed, torch.logical_and(q_image, k_image))
        t = self.config.text
        if t.layer_types[layer] == SLIDING and t.sliding_window is not None:
            allowed = torch.logical_and(allowed, k > q - t.sliding_window)
        return allowed

    def forward(self, input_ids, pixel_values=None, position_ids=None):
        """Whole-prompt logits; with an image, its rows attend to each other wherever the prompt puts it."""
        saved = self.image_start
        if pixel_values is not None:
            hits = (input_ids[0] == self.config.image_token_id).nonzero()
            if len(hits):
                self.image_start = int(hits[0, 0])
        try:
            return super().forward(input_ids, pixel_values, position_ids)
        finally:
            self.image_start = saved


def build(cfg: dict, directory, preprocessor: dict) -> Gemma3Model:
    generation = None
    if directory is not None:
        path = directory / "generation_config.json"
        if path.is_file():
            try:
                generation = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise VlmcError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    return Gemma3Model(Gemma3Config.from_hf(cfg, preprocessor, generation if isinstance(generation, dict) else None))


_KEYS = [(re.compile(r"^(model\.language_model\.|language_model\.model\.)"), "language_model."),
         (re.compile(r"^(model\.vision_tower\.|vision_tower\.)(vision_model\.)?"), "vision_tower."),
         (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
         (re.compile(r"^language_model\.lm_head\."), "lm_head.")]


def normalize_hf_key(key: str) -> str:
    """transformers' names (save_pretrained's `language_model.model.` / `vision_tower[.vision_model].` /
    `multi_modal_projector.`, or the in-memory `model.*` layout) -> vlmc's."""
    for pattern, repl in _KEYS:
        key, n = pattern.subn(repl, key, count=1)
        if n:
            return key
    return key


def to_hf_key(key: str) -> str:
    """vlmc's names -> the layout of the published Gemma 3 checkpoints."""
    if key.startswith("language_model."):
        return "language_model.model." + key[len("language_model."):]
    if key.startswith("vision_tower."):
        return "vision_tower.vision_model." + key[len("vision_tower."):]
    return key


def to_hf_config(c: Gemma3Config) -> dict:
    v, t = c.vision, c.text
    full = {"rope_type": "default", "rope_theta": t.rope_theta}
    if t.rope_global_factor != 1.0:
        full = {"rope_type": "linear", "factor": t.rope_global_factor, "rope_theta": t.rope_theta}
    return {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "image_token_index": c.image_token_id, "boi_token_index": c.boi_token_id, "eoi_token_index": c.eoi_token_id,
        "mm_tokens_per_image": c.mm_tokens_per_image, "tie_word_embeddings": t.tie_word_embeddings,
        "vision_config": {"model_type": "siglip_vision_model", "image_size": v.image_size, "patch_size": v.patch_size,
                          "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                          "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
                          "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act, "num_channels": v.num_channels,
                          "vision_use_head": False},
        "text_config": {"model_type": "gemma3_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
                        "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim,
                        "rms_norm_eps": t.rms_norm_eps, "hidden_activation": t.hidden_act,
                        "query_pre_attn_scalar": int(q) if (q := t.query_pre_attn_scalar).is_integer() else q, "sliding_window": t.sliding_window,
                        "layer_types": list(t.layer_types),
                        "rope_parameters": {SLIDING: {"rope_type": "default", "rope_theta": t.rope_local_theta}, FULL: full},
                        "tie_word_embeddings": t.tie_word_embeddings, "bos_token_id": t.bos_token_id,
                        "eos_token_id": list(t.eos_token_ids) if len(t.eos_token_ids) > 1 else t.eos_token_ids[0]},
    }
