"""vlmc's LLaVA-1.5 family, written for export.

A CLIP-style ViT (CLS token, a chosen feature layer), a 2-layer MLP projector and a Llama-style decoder
(RMSNorm, RoPE, SwiGLU, grouped-query attention). Module and parameter names mirror Hugging Face's
`LlavaForConditionalGeneration`, so its checkpoints load by a short key normalisation.

Export-first choices:
- the number of visual tokens is fixed by the image size; position ids are always inputs;
- attention is a pluggable `attend(layer, q, k, v)` callable, so each target chooses its KV-cache form
  (explicit tensors, mutable buffers with ExecuTorch's custom ops) without forking the layer code;
- `attention_row` computes one query's attention (the CLS row, the last prompt token's row) without
  materialising full attention maps, for the token passes that score with it.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlmc.errors import VlmcError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    num_channels: int = 3

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 1
    eos_token_ids: tuple = (2,)


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
        rope = t.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or t.get("rope_scaling"):
            raise VlmcError("config.json: text_config uses RoPE scaling, which vlmc does not support yet")
        eos = t.get("eos_token_id", 2)
        heads = t.get("num_attention_heads", 32)
        hidden = t.get("hidden_size", 4096)
        image_token = cfg.get("image_token_id", cfg.get("image_token_index"))
        if image_token is None:
            raise VlmcError("config.json: missing 'image_token_id'")
        try:
            vision = VisionConfig(
                image_size=int(v.get("image_size", 224)),
                patch_size=int(v.get("patch_size", 32)),
                hidden_size=int(v.get("hidden_size", 768)),
                intermediate_size=int(v.get("intermediate_size", 3072)),
                num_layers=int(v.get("num_hidden_layers", 12)),
                num_heads=int(v.get("num_attention_heads", 12)),
                layer_norm_eps=float(v.get("layer_norm_eps", 1e-5)),
                hidden_act=v.get("hidden_act", "quick_gelu"),
                num_channels=int(v.get("num_channels", 3)),
            )
            text = TextConfig(
                vocab_size=int(t["vocab_size"]),
                hidden_size=int(hidden),
                intermediate_size=int(t.get("intermediate_size", 11008)),
                num_layers=int(t.get("num_hidden_layers", 32)),
                num_heads=int(heads),
                num_kv_heads=int(t.get("num_key_value_heads") or heads),
                head_dim=int(t.get("head_dim") or hidden // heads),
                rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 10000.0))),
                hidden_act=t.get("hidden_act", "silu"),
                attention_bias=bool(t.get("attention_bias", False)),
                mlp_bias=bool(t.get("mlp_bias", False)),
                tie_word_embeddings=bool(t.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
                bos_token_id=t.get("bos_token_id", 1),
                eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,),
            )
        except KeyError as e:
            raise VlmcError(f"config.json: text_config is missing {e.args[0]!r}") from None
        for name, act in (("vision_config.hidden_act", vision.hidden_act), ("text_config.hidden_act", text.hidden_act),
                          ("projector_hidden_act", cfg.get("projector_hidden_act", "gelu"))):
            if act not in ACTIVATIONS:
                raise VlmcError(f"config.json: {name} {act!r} is not supported ({', '.join(ACTIVATIONS)})")
        if vision.image_size % vision.patch_size:
            raise VlmcError("config.json: vision_config.image_size is not a multiple of patch_size")
        if text.num_heads % text.num_kv_heads:
            raise VlmcError("config.json: num_attention_heads is not a multiple of num_key_value_heads")
        return cls(
            vision=vision, text=text, image_token_id=int(image_token),
            vision_feature_layer=layer, vision_feature_select_strategy=strategy,
            projector_hidden_act=cfg.get("projector_hidden_act", "gelu"),
            projector_bias=bool(cfg.get("multimodal_projector_bias", True)),
            image_mean=tuple(image_mean), image_std=tuple(image_std),
        )


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": _quick_gelu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


def attention_row(q_row: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Softmax attention of one query per head over all keys: q_row [B,H,1,d], k [B,H,N,d] -> [B,H,N].

    The score token passes read (CLS attention, last prompt token attention), computed alone so that
    fused SDPA kernels stay usable for the attention itself.
    """
    scores = (q_row @ k.transpose(-1, -2)) / math.sqrt(q_row.shape[-1])
    return torch.softmax(scores, dim=-1).squeeze(-2)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B,Hkv,T,d] -> [B,Hkv*n_rep,T,d], each KV head repeated for its query group."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


# ---------------------------------------------------------------- vision tower (CLIP)

class VisionEmbeddings(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size, bias=False)
        self.position_embedding = nn.Embedding(c.num_patches + 1, c.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight[None]


class VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = c.num_heads, c.hidden_size // c.num_heads
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def heads(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        b, n, _ = x.shape
        return proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, size: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`size` [B,N,1]: patches each token stands for after merging; adding log(size) to the logits
        makes a merged token weigh as much as the tokens it replaced (ToMe's proportional attention)."""
        q, k, v = self.heads(x, self.q_proj), self.heads(x, self.k_proj), self.heads(x, self.v_proj)
        bias = None if size is None else size.log().transpose(1, 2)[:, None]  # [B,1,1,N]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out_proj(out.transpose(1, 2).reshape(x.shape))

    def cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention of the CLS token (index 0) to every token, per head: [B,H,N]."""
        return attention_row(self.heads(x[:, :1], self.q_proj), self.heads(x, self.k_proj))


class VisionMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.act = ACTIVATIONS[c.hidden_act]
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = VisionAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = VisionMLP(c)

    def forward(self, x, size: Optional[torch.Tensor] = None):
        x = x + self.self_attn(self.layer_norm1(x), size)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoderLayers(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(c) for _ in range(c.num_layers))


class VisionTower(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.encoder = VisionEncoderLayers(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # loaded, unused by LLaVA


class Projector(nn.Module):
    def __init__(self, c: LlavaConfig):
        super().__init__()
        self.linear_1 = nn.Linear(c.vision.hidden_size, c.text.hidden_size, bias=c.projector_bias)
        self.act = ACTIVATIONS[c.projector_hidden_act]
        self.linear_2 = nn.Linear(c.text.hidden_size, c.text.hidden_size, bias=c.projector_bias)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


# ---------------------------------------------------------------- language model (Llama)

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class DecoderAttention(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)

    def qkv(self, x, cos, sin):
        """Projected, rotated q [B,H,T,d] and k, v [B,Hkv,T,d]."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v


class DecoderMLP(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.act = ACTIVATIONS[c.hidden_act]
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


# attend(layer_index, q [B,H,T,d], k [B,Hkv,T,d], v [B,Hkv,T,d], shift) -> [B,T,H*d]; `shift`: how many
# cache slots before the layer-0 slot this layer's rows sit (image tokens dropped at earlier layers)
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class PromptRows:
    """Where a full prompt's image rows are (a prefill that runs the in-LLM token stages).

    `image_start` [1] int64 (the template fixes it, but a program takes it as an input), `num_image` the
    image rows (static), `last` [1] int64 the row whose next token is predicted (the query FastV reads).
    """

    image_start: torch.Tensor
    num_image: int
    last: torch.Tensor


@dataclass
class LayerView:
    """What an in-LLM token stage reads at its layer: the layer's input and output rows, its rotated
    queries and keys, the image rows' indices [N] and the last prompt row [1]."""

    h_in: torch.Tensor  # [1,T,D]
    h: torch.Tensor  # [1,T,D]
    q: torch.Tensor  # [1,H,T,d]
    k: torch.Tensor  # [1,Hkv,T,d]
    image_rows: torch.Tensor  # [N]
    last: torch.Tensor  # [1]


class DecoderLayer(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = DecoderAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = DecoderMLP(c)

    def forward(self, h, cos, sin, index: int, attend: Attend, shift: int = 0):
        """-> (h, q, k): the rotated queries and keys too, for token stages that score with attention."""
        q, k, v = self.self_attn.qkv(self.input_layernorm(h), cos, sin)
        h = h + self.self_attn.o_proj(attend(index, q, k, v, shift))
        return h + self.mlp(self.post_attention_layernorm(h)), q, k


class LanguageModel(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.row_positions: Optional[torch.Tensor] = None
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rope(self, position_ids: torch.Tensor):
        """cos, sin [B,T,d] for integer positions [B,T]."""
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, inputs_embeds, position_ids, attend: Attend, stages: Optional[dict] = None,
                prompt: Optional[PromptRows] = None):
        """Hidden states after the final norm. `stages` {layer: [stage]} are in-LLM token stages: with
        `prompt` (a full-prompt prefill) each one drops image rows after its layer, the kept rows keep
        their original positions and the later layers' caches get the compacted rows; without it (a decode
        step, later text) they only shift the later layers' cache slots by what they dropped."""
        from vlmc.passes.token.functional import add_int, keep_rows

        stages = stages or {}
        cos, sin = self.rope(position_ids)
        h, positions, shift = inputs_embeds, position_ids, 0
        if prompt is not None:
            n, last = prompt.num_image, prompt.last
        try:
            for i, layer in enumerate(self.layers):
                # the rows' positions, for modules whose weights depend on a row's modality (MASQuant's
                # smoothing: the image's rows sit at positions the prompt template fixes)
                self.row_positions = positions
                h_in = h
                h, q, k = layer(h, cos, sin, i, attend, shift)
                for stage in stages.get(i, ()):
                    if prompt is None:
                        shift += stage.dropped
                        continue
                    rows = prompt.image_start + torch.arange(n)
                    kept = stage.select(LayerView(h_in, h, q, k, rows, last))
                    idx = keep_rows(h.shape[1], prompt.image_start, kept, n)
                    h, cos, sin = h.index_select(1, idx), cos.index_select(1, idx), sin.index_select(1, idx)
                    positions = positions.index_select(1, idx)
                    n, last = kept.shape[0], add_int(last, -stage.dropped)
        finally:
            self.row_positions = None
        return self.norm(h)


# ---------------------------------------------------------------- the whole model

VISION_POINTS = re.compile(r"^(vision\.block\[(\d+)\]|vision\.out|projector\.out|decoder\.layer\[(\d+)\])$")


class LlavaModel(nn.Module):
    """LLaVA-1.5: image -> ViT features at `vision_feature_layer` -> projector -> Llama decoder."""

    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config.vision)
        self.multi_modal_projector = Projector(config)
        self.language_model = LanguageModel(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        if config.text.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight
        self.register_buffer("image_mean", torch.tensor(config.image_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(config.image_std).view(3, 1, 1), persistent=False)
        # Token stages inserted by passes at named points of the anatomy (see `insert`).
        self.insertions = nn.ModuleDict()

    # ----- anatomy
    def part_modules(self, part: str) -> list[tuple[str, nn.Module]]:
        """The modules of a part that quantization covers: `vision` is the vision_encoder program's
        weights (ViT + projector), `decoder` the text_decoder's (layers + head; the embedding table is
        the token_embedding program's)."""
        if part == "vision":
            return [("vision_tower", self.vision_tower), ("multi_modal_projector", self.multi_modal_projector)]
        if part == "decoder":
            return [("language_model.layers", self.language_model.layers), ("lm_head", self.lm_head)]
        raise ValueError(f"unknown part {part!r}")

    def norm_consumers(self, part: str) -> list[tuple[str, nn.Module, list[tuple[str, nn.Linear]]]]:
        """(norm name, norm, [(linear name, linear)]) for each norm and the linears it feeds directly: where
        smoothing factors fold (the norm's gain divided, the linears' input columns multiplied)."""
        out = []
        if part == "vision":
            for i, block in enumerate(self.vision_tower.encoder.layers[: self.config.num_vision_layers_run]):
                p, attn = f"vision_tower.encoder.layers.{i}", block.self_attn
                out.append((f"{p}.layer_norm1", block.layer_norm1,
                            [(f"{p}.self_attn.{n}", getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj")]))
                out.append((f"{p}.layer_norm2", block.layer_norm2, [(f"{p}.mlp.fc1", block.mlp.fc1)]))
        elif part == "decoder":
            for i, layer in enumerate(self.language_model.layers):
                p, attn, mlp = f"language_model.layers.{i}", layer.self_attn, layer.mlp
                out.append((f"{p}.input_layernorm", layer.input_layernorm,
                            [(f"{p}.self_attn.{n}", getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj")]))
                out.append((f"{p}.post_attention_layernorm", layer.post_attention_layernorm,
                            [(f"{p}.mlp.{n}", getattr(mlp, n)) for n in ("gate_proj", "up_proj")]))
        else:
            raise ValueError(f"unknown part {part!r}")
        return out

    def insertion_points(self) -> list[str]:
        n_run = self.config.num_vision_layers_run
        return ([f"vision.block[{i}]" for i in range(n_run)] + ["vision.out", "projector.out"]
                + [f"decoder.layer[{i}]" for i in range(self.config.text.num_layers)])

    def resolve(self, point: str) -> nn.Module:
        """The module that produces the tokens at a named insertion point."""
        if point not in self.insertion_points():
            raise VlmcError(f"unknown insertion point {point!r} (have vision.block[0..{self.config.num_vision_layers_run - 1}], "
                            f"vision.out, projector.out, decoder.layer[0..{self.config.text.num_layers - 1}])")
        m = VISION_POINTS.match(point)
        if m.group(2) is not None:
            return self.vision_tower.encoder.layers[int(m.group(2))]
        if point == "vision.out":
            return self.vision_tower
        if point == "projector.out":
            return self.multi_modal_projector
        return self.language_model.layers[int(m.group(3))]

    def insert(self, point: str, stage: nn.Module) -> None:
        """Run `stage(tokens) -> tokens` on the visual tokens leaving `point` (after earlier stages there).

        Vision points see [B, 1+N, D] with CLS first (blocks) or the selected features (vision.out,
        projector.out). A stage with `wants_block_input = True` at a block also gets the block's input,
        for scores read from that block's attention. A stage with `tracks_size = True` (a merge) takes
        and returns the tokens' sizes too, which the later blocks' attention reads; a stage that does not
        track sizes cannot follow one inside the vision tower. At `decoder.layer[i]` a stage is an in-LLM
        one (`select(LayerView) -> kept image indices`, `dropped` rows): see `LanguageModel.forward`.
        """
        self.resolve(point)
        if point.startswith("decoder.") != hasattr(stage, "dropped") and not getattr(stage, "transparent", False):
            kind = "an in-LLM stage" if hasattr(stage, "dropped") else "a visual-token stage"
            raise VlmcError(f"insertion at {point}: {kind} cannot run there")
        block = VISION_POINTS.match(point).group(2)
        if block is not None:
            self._check_size_order(point, int(block), stage)
        key = _key(point)
        if key not in self.insertions:
            self.insertions[key] = nn.ModuleList()
        self.insertions[key].append(stage)

    def pop(self, point: str) -> nn.Module:
        """Remove the stage inserted last at `point` (calibration probes)."""
        key = _key(point)
        stage = self.insertions[key][-1]
        del self.insertions[key][-1]
        if not len(self.insertions[key]):
            del self.insertions[key]
        return stage

    def _stage(self, point: str, x: torch.Tensor, block_input: Optional[torch.Tensor] = None) -> torch.Tensor:
        key = _key(point)
        if key in self.insertions:
            for stage in self.insertions[key]:
                x = stage(x, block_input) if getattr(stage, "wants_block_input", False) else stage(x)
        return x

    def _check_size_order(self, point: str, block: int, stage: nn.Module) -> None:
        """Inside the vision tower, no stage that ignores merged sizes may run at or after a merging one."""
        tracks = lambda s: getattr(s, "tracks_size", False)  # noqa: E731
        keys = {i: _key(f"vision.block[{i}]") for i in range(self.config.num_vision_layers_run)}
        staged = [(block, stage)] + [(i, s) for i, k in keys.items() if k in self.insertions for s in self.insertions[k]]
        staged = [(i, s) for i, s in staged if not getattr(s, "transparent", False)]
        first_merge = min((i for i, s in staged if tracks(s)), default=None)
        if first_merge is not None and any(i >= first_merge and not tracks(s) for i, s in staged):
            raise VlmcError(f"insertion at {point}: a token stage that does not track merged sizes cannot run inside "
                            "the vision tower at or after a merging one (place it at vision.out or projector.out)")

    def _block_stages(self, i: int, x, block_input, size):
        """The stages after vision block i, threading the merged tokens' sizes (None until a merge)."""
        key = _key(f"vision.block[{i}]")
        for stage in self.insertions[key] if key in self.insertions else ():
            if getattr(stage, "tracks_size", False):
                x, size = stage(x, block_input, size)
            else:
                x = stage(x, block_input) if getattr(stage, "wants_block_input", False) else stage(x)
        return x, size

    def decoder_stages(self) -> dict[int, list[nn.Module]]:
        """The in-LLM token stages by decoder layer."""
        out = {}
        for i in range(self.config.text.num_layers):
            key = _key(f"decoder.layer[{i}]")
            if key in self.insertions:
                out[i] = list(self.insertions[key])
        return out

    def cache_shifts(self) -> list[int]:
        """Per decoder layer, the image rows dropped before it: that layer's KV cache is that much shorter
        and a token at slot s of layer 0 sits at slot s - shift there."""
        stages, shift, out = self.decoder_stages(), 0, []
        for i in range(self.config.text.num_layers):
            out.append(shift)
            shift += sum(s.dropped for s in stages.get(i, ()))
        return out

    def dropped_in_llm(self) -> int:
        """Image rows the in-LLM stages drop in all."""
        return sum(s.dropped for stages in self.decoder_stages().values() for s in stages)

    def image_rows_in_llm(self) -> int:
        """The image rows a prompt holds when in-LLM stages exist: what the first of them receives."""
        stages = self.decoder_stages()
        first = stages[min(stages)][0]
        return first.keep + first.dropped

    def run_decoder(self, embeds, position_ids, attend: Attend, prompt: Optional[PromptRows] = None):
        """The language model with this model's in-LLM stages (see `LanguageModel.forward`)."""
        return self.language_model(embeds, position_ids, attend, self.decoder_stages(), prompt)

    # ----- vision
    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 or 0..255 float image [3,H,W] or [B,3,H,W] -> CLIP-normalised float [B,3,H,W]."""
        x = image.float()
        if x.dim() == 3:
            x = x.unsqueeze(0)
        return (x / 255.0 - self.image_mean) / self.image_std

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B,3,H,W] -> image embeddings in the decoder's space [B,N',D]."""
        vt = self.vision_tower
        x = vt.pre_layrnorm(vt.embeddings(pixel_values))
        size = None  # patches each token stands for, once a merging stage ran
        for i in range(self.config.num_vision_layers_run):
            x, size = self._block_stages(i, vt.encoder.layers[i](x, size), x, size)
        if self.config.vision_feature_select_strategy == "default":
            x = x[:, 1:]
        x = self._stage("vision.out", x)
        return self._stage("projector.out", self.multi_modal_projector(x))

    # ----- text
    def merge_embeddings(self, input_ids: torch.Tensor, image_embeds: Optional[torch.Tensor]) -> torch.Tensor:
        """Token embeddings with the image-token placeholders replaced by the image embeddings, in order."""
        embeds = self.language_model.embed_tokens(input_ids)
        if image_embeds is None:
            return embeds
        mask = input_ids == self.config.image_token_id
        if int(mask.sum()) != image_embeds.shape[0] * image_embeds.shape[1]:
            raise VlmcError(f"prompt has {int(mask.sum())} image tokens but the image gives {image_embeds.shape[1]}")
        return embeds.masked_scatter(mask[..., None], image_embeds.to(embeds.dtype))

    def forward(self, input_ids, pixel_values=None, position_ids=None):
        """Logits [B,T',V] of a whole prompt, no cache (the reference every program is checked against);
        T' = T less the rows in-LLM stages drop (batch 1 then)."""
        image_embeds = self.encode_image(pixel_values) if pixel_values is not None else None
        embeds = self.merge_embeddings(input_ids, image_embeds)
        if position_ids is None:
            position_ids = torch.arange(embeds.shape[1])[None].expand(embeds.shape[0], -1)
        prompt = None
        if image_embeds is not None and self.decoder_stages():
            start = (input_ids[0] == self.config.image_token_id).long().argmax()[None]
            prompt = PromptRows(start, image_embeds.shape[1], torch.tensor([embeds.shape[1] - 1]))
        logits, _ = self.decode(embeds, position_ids, None, prompt)
        return logits

    def decode(self, embeds, position_ids, past: Optional[list], prompt: Optional[PromptRows] = None):
        """Eager decoding with a growing cache: past = [(k, v)] per layer or None. Returns logits, cache.
        `prompt`: this call is a full-prompt prefill, the in-LLM stages drop image rows."""
        n_rep = self.config.text.num_heads // self.config.text.num_kv_heads
        new_past = []

        def attend(i, q, k, v, shift):
            if past is not None:
                k, v = torch.cat([past[i][0], k], dim=2), torch.cat([past[i][1], v], dim=2)
            new_past.append((k, v))
            t, s = q.shape[2], k.shape[2]
            mask = torch.ones(t, s, dtype=torch.bool).tril(diagonal=s - t)
            out = F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask)
            return out.transpose(1, 2).flatten(2)

        h = self.run_decoder(embeds, position_ids, attend, prompt)
        return self.lm_head(h), new_past


def _key(point: str) -> str:
    return point.replace(".", "_").replace("[", "_").replace("]", "")


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


def load_state(model: LlavaModel, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load a checkpoint's tensors strictly: missing or unexpected names are errors, not silent skips."""
    state = {normalize_hf_key(k): v for k, v in tensors.items()}
    expected = dict(model.state_dict())
    if model.config.text.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise VlmcError(f"{source}: checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    if unexpected:
        raise VlmcError(f"{source}: checkpoint has {len(unexpected)} unknown tensors, e.g. {unexpected[0]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise VlmcError(f"{source}: tensor {k} has shape {tuple(v.shape)}, config implies {tuple(expected[k].shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)


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


def hf_state_dict(model: LlavaModel) -> dict[str, torch.Tensor]:
    """Parameters under transformers 5.x names (`model.` prefix, `lm_head` at the top)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("insertions."):
            continue
        if k == "lm_head.weight" and model.config.text.tie_word_embeddings:
            continue
        out[k if k.startswith("lm_head.") else "model." + k] = v.detach().contiguous().clone()
    return out
