"""Building blocks several families share: activations, norms, a pre-norm ViT block (CLIP, SigLIP),
a Llama-style decoder layer (Llama, Qwen2: biases are options) and 1-D RoPE.

Every block here keeps Hugging Face's parameter names, so a family's checkpoint keys map by a prefix
rule, and implements the protocol the core reads (see `core.py`):
- a vision block: `forward(x, size)`, `queries(x_in)` / `keys(x_in)` (per head, from the block's input,
  for token passes that score with the block's attention) and `smoothing_groups()`;
- a decoder layer: `forward(h, rope, index, attend, shift) -> (h, q, k)` and `smoothing_groups()`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlmc.errors import VlmcError


@dataclass(frozen=True)
class VisionConfig:
    """A ViT's geometry (CLIP, SigLIP)."""

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
    """A Llama-style decoder's geometry: what the core, the programs and the runners read."""

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


def config_int(section: str, d: dict, key: str, default=None) -> int:
    value = d.get(key, default)
    if value is None:
        raise VlmcError(f"config.json: {section} is missing {key!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise VlmcError(f"config.json: {section}.{key} {value!r} is not an integer")
    return int(value)


def config_float(section: str, d: dict, key: str, default: float) -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise VlmcError(f"config.json: {section}.{key} {value!r} is not a number")
    return float(value)


def check_activation(name: str, act) -> None:
    if act not in ACTIVATIONS:
        raise VlmcError(f"config.json: {name} {act!r} is not supported ({', '.join(ACTIVATIONS)})")


def parse_vision_config(v: dict, defaults: dict) -> VisionConfig:
    """A CLIP or SigLIP `vision_config` (transformers' defaults of that model passed in `defaults`)."""
    d = {**defaults, **{k: x for k, x in v.items() if x is not None}}
    c = VisionConfig(
        image_size=config_int("vision_config", d, "image_size"), patch_size=config_int("vision_config", d, "patch_size"),
        hidden_size=config_int("vision_config", d, "hidden_size"), intermediate_size=config_int("vision_config", d, "intermediate_size"),
        num_layers=config_int("vision_config", d, "num_hidden_layers"), num_heads=config_int("vision_config", d, "num_attention_heads"),
        layer_norm_eps=config_float("vision_config", d, "layer_norm_eps", 1e-6), hidden_act=d.get("hidden_act"),
        num_channels=config_int("vision_config", d, "num_channels", 3),
    )
    check_activation("vision_config.hidden_act", c.hidden_act)
    if c.image_size % c.patch_size:
        raise VlmcError("config.json: vision_config.image_size is not a multiple of patch_size")
    if c.hidden_size % c.num_heads:
        raise VlmcError("config.json: vision_config.hidden_size is not a multiple of num_attention_heads")
    return c


def parse_text_config(t: dict, top: dict, defaults: Optional[dict] = None) -> TextConfig:
    """A Llama / Qwen2 `text_config` (transformers 4.x or 5.x spelling; `top` is the whole config, for
    keys some versions keep at the top level)."""
    t = {**(defaults or {}), **{k: x for k, x in t.items() if x is not None}}
    rope = t.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or (t.get("rope_scaling") or {}).get("rope_type", "default") != "default":
        raise VlmcError("config.json: text_config uses RoPE scaling, which vlmc does not support yet")
    heads = config_int("text_config", t, "num_attention_heads", 32)
    hidden = config_int("text_config", t, "hidden_size", 4096)
    eos = t.get("eos_token_id", 2)
    tie = t.get("tie_word_embeddings", top.get("tie_word_embeddings", False))
    c = TextConfig(
        vocab_size=config_int("text_config", t, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=config_int("text_config", t, "intermediate_size", 11008),
        num_layers=config_int("text_config", t, "num_hidden_layers", 32),
        num_heads=heads,
        num_kv_heads=config_int("text_config", t, "num_key_value_heads", heads),
        head_dim=config_int("text_config", t, "head_dim", hidden // heads),
        rms_norm_eps=config_float("text_config", t, "rms_norm_eps", 1e-6),
        rope_theta=config_float("text_config", {"rope_theta": rope.get("rope_theta", t.get("rope_theta", 10000.0))}, "rope_theta", 10000.0),
        hidden_act=t.get("hidden_act", "silu"),
        attention_bias=bool(t.get("attention_bias", False)),
        mlp_bias=bool(t.get("mlp_bias", False)),
        tie_word_embeddings=bool(tie),
        bos_token_id=t.get("bos_token_id", 1),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,),
    )
    check_activation("text_config.hidden_act", c.hidden_act)
    if c.num_heads % c.num_kv_heads:
        raise VlmcError("config.json: num_attention_heads is not a multiple of num_key_value_heads")
    return c


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": _quick_gelu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B,Hkv,T,d] -> [B,Hkv*n_rep,T,d], each KV head repeated for its query group."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def causal_bias(t: int) -> torch.Tensor:
    """[T,T] additive causal mask, 0 where a row may look and -1e9 after it: a clamped difference of
    positions rather than a compare and a select, so XNNPACK computes it (the portable compare and select
    over [T,T] cost more than the attention). exp(-1e9 + s) is exactly 0 in float32, as exp(-inf)."""
    rows = torch.arange(t, dtype=torch.float32)
    return (rows[None, :] - rows[:, None]).clamp(0.0, 1.0) * -1e9


def own_rows_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Attention of q [1,H,T,d] over the same call's rows k, v [1,Hkv,T,d] with an additive mask bias [T,T]
    (every row sees itself) -> [1,T,H*d], as products of 3-D batches without a guard for rows that see
    nothing. Every size is the call's own (backed), so XNNPACK runs it whole; attention over a cache's first
    `slot + T` slots (an unbacked size) cannot be delegated. Grouped heads: the batch is ordered (copy of the
    KV heads, KV head), so the keys repeat by concatenation and only static dims are split."""
    _, heads, t, d = q.shape
    kv_heads = k.shape[1]
    n_rep = heads // kv_heads
    q = q.reshape(kv_heads, n_rep, t, d).transpose(0, 1).reshape(heads, t, d)
    k, v = k.reshape(kv_heads, t, d), v.reshape(kv_heads, t, d)
    if n_rep > 1:
        k, v = torch.cat([k] * n_rep), torch.cat([v] * n_rep)
    scores = torch.bmm(q * (1.0 / math.sqrt(d)), k.transpose(1, 2)) + bias
    out = torch.bmm(torch.softmax(scores, -1), v)  # [(copy, KV head), T, d]
    out = out.reshape(n_rep, kv_heads, t, d).transpose(0, 1).reshape(heads, t, d)
    return out.transpose(0, 1).reshape(1, t, heads * d)


class OwnRowsAttention(nn.Module):
    """`own_rows_attention` as a module, so PT2E quantizers can leave it float (`executorch_quant`): an int8
    grid over scores plus a -1e9 mask bias would keep the bias and lose the scores."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return own_rows_attention(q, k, v, bias)


def packed_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, packed, basis_k: torch.Tensor,
                basis_v: torch.Tensor) -> torch.Tensor:
    """Attention of q [1,H,T,d] over a layer's float cache rows k, v [1,Hkv,S,d] (under mask [T,S] bool) and
    its packed image rows (AttentionPack) -> [1,T,H*d]. `packed` = (k_rows, v_rows [1,M,r], k_lite, v_lite
    [1,L,r']): the rows' coefficients on the layer's bases basis_k, basis_v [1,Hkv,r,d] (heads concatenated),
    the light rows on the first r' of them. The image precedes every query that reads a packed cache, so all
    see it. Scores and outputs stay in the rank space, q.(cB)^T = (qB^T).c^T and P(cB) = (Pc)B: no row is
    ever decompressed, and a light row costs r' of the r multiply-adds."""
    k_rows, v_rows, k_lite, v_lite = packed
    n_rep, lite = q.shape[1] // k.shape[1], k_lite.shape[-1]
    scale = 1.0 / math.sqrt(q.shape[-1])
    bk, bv = repeat_kv(basis_k, n_rep), repeat_kv(basis_v, n_rep)  # [1,H,r,d]
    qb = q @ bk.transpose(-1, -2)  # [1,H,T,r]
    full = (q @ repeat_kv(k, n_rep).transpose(-1, -2)) * scale
    full = full.masked_fill(~mask[None, None], float("-inf"))  # (TVM cannot legalize full_like at a symbolic length)
    heavy = (qb @ k_rows[:, None].transpose(-1, -2)) * scale  # [1,H,T,M]
    light = (qb[..., :lite] @ k_lite[:, None].transpose(-1, -2)) * scale  # [1,H,T,L]
    p_full, p_heavy, p_light = torch.softmax(torch.cat([full, heavy, light], -1), -1).split(
        [full.shape[-1], heavy.shape[-1], light.shape[-1]], -1)
    out = p_full @ repeat_kv(v, n_rep) + (p_heavy @ v_rows[:, None]) @ bv + (p_light @ v_lite[:, None]) @ bv[:, :, :lite]
    return out.transpose(1, 2).flatten(2)


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


class Rope1D(nn.Module):
    """Llama's rotary positions: integer positions [B,T] -> (cos, sin) [B,T,d]."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


# ---------------------------------------------------------------- vision: pre-norm ViT block (CLIP, SigLIP)

class ViTAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.num_heads, self.head_dim = heads, hidden // heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

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


class ViTMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    """CLIP's and SigLIP's encoder layer (the same names and math)."""

    def __init__(self, hidden: int, intermediate: int, heads: int, eps: float, act: str):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.self_attn = ViTAttention(hidden, heads)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = ViTMLP(hidden, intermediate, act)

    def forward(self, x, size: Optional[torch.Tensor] = None):
        x = x + self.self_attn(self.layer_norm1(x), size)
        return x + self.mlp(self.layer_norm2(x))

    def queries(self, x_in: torch.Tensor) -> torch.Tensor:
        """The block's attention queries [B,H,N,d] for its input tokens x_in [B,N,D]."""
        return self.self_attn.heads(self.layer_norm1(x_in), self.self_attn.q_proj)

    def keys(self, x_in: torch.Tensor) -> torch.Tensor:
        return self.self_attn.heads(self.layer_norm1(x_in), self.self_attn.k_proj)

    def smoothing_groups(self) -> list[tuple[str, list[str]]]:
        return [("layer_norm1", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]), ("layer_norm2", ["mlp.fc1"])]


class ViTEncoder(nn.Module):
    """`encoder.layers`: the ViT blocks under Hugging Face's CLIP / SigLIP names."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            ViTBlock(c.hidden_size, c.intermediate_size, c.num_heads, c.layer_norm_eps, c.hidden_act) for _ in range(c.num_layers))


class SiglipEmbeddings(nn.Module):
    """SigLIP's: the patch convolution (with bias) and a learned position table read at `position_ids`."""

    def __init__(self, c: VisionConfig, position_ids: torch.Tensor):
        super().__init__()
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size)
        self.position_embedding = nn.Embedding(c.num_patches, c.hidden_size)
        self.register_buffer("position_ids", position_ids, persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        return patches + self.position_embedding(self.position_ids)[None]

    def interpolate(self, grid: int) -> None:
        """SigLIP's `interpolate_pos_encoding`: the table resampled to a grid x grid input."""
        resized = interpolate_grid_table(self.position_embedding.weight, grid)
        self.position_embedding = nn.Embedding.from_pretrained(resized, freeze=False)
        self.position_ids = torch.arange(grid * grid)


class SiglipTower(nn.Module):
    """SigLIP without its head: embeddings (no CLS), the encoder, the post-layernorm."""

    def __init__(self, c: VisionConfig, position_ids: Optional[torch.Tensor] = None):
        super().__init__()
        self.embeddings = SiglipEmbeddings(c, torch.arange(c.num_patches) if position_ids is None else position_ids)
        self.encoder = ViTEncoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


# ---------------------------------------------------------------- decoder: Llama-style layer

# attend(layer_index, q [B,H,T,d], k [B,Hkv,T,d], v [B,Hkv,T,d], shift) -> [B,T,H*d]; `shift`: how many
# cache slots before the layer-0 slot this layer's rows sit (image tokens dropped at earlier layers)
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


class StatefulAttend:
    """An `Attend` that also keeps the state of recurrent decoder layers (LFM2's short convolutions): a
    program that has a cache wraps its `attend` with `carry(layer, rows [B,T,W]) -> [B,S+T,W]`, the layer's
    S state rows before its new ones, keeping the new state. Without it (whole-prompt calibration runs)
    a recurrent layer starts from zeros."""

    def __init__(self, attend: Attend, carry: Callable[[int, torch.Tensor], torch.Tensor]):
        self.attend, self.carry = attend, carry

    def __call__(self, index, q, k, v, shift):
        return self.attend(index, q, k, v, shift)


def carried_rows(attend, index: int, rows: torch.Tensor, state_rows: int) -> torch.Tensor:
    """A recurrent layer's input `rows` [B,T,W] behind its state (zeros without a cache): [B,S+T,W]."""
    if isinstance(attend, StatefulAttend):
        return attend.carry(index, rows)
    return F.pad(rows, (0, 0, state_rows, 0))


class DecoderAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=o_bias)

    def project(self, x):
        """q [B,H,T,d] and k, v [B,Hkv,T,d], not rotated."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B,H,T,d] by cos, sin [B,T,d]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool = False):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    """Llama's decoder layer (Qwen2's with q/k/v biases): pre-RMSNorm attention and SwiGLU MLP."""

    def __init__(self, t, qkv_bias: Optional[bool] = None, o_bias: Optional[bool] = None):
        super().__init__()
        qkv_bias = t.attention_bias if qkv_bias is None else qkv_bias
        o_bias = t.attention_bias if o_bias is None else o_bias
        self.input_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.self_attn = DecoderAttention(t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim, qkv_bias, o_bias)
        self.post_attention_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.mlp = GatedMLP(t.hidden_size, t.intermediate_size, t.hidden_act, t.mlp_bias)

    def forward(self, h, rope, index: int, attend: Attend, shift: int = 0):
        """-> (h, q, k): the rotated queries and keys too, for token stages that score with attention."""
        cos, sin = rope
        q, k, v = self.self_attn.project(self.input_layernorm(h))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        h = h + self.self_attn.o_proj(attend(index, q, k, v, shift))
        return h + self.mlp(self.post_attention_layernorm(h)), q, k

    def smoothing_groups(self) -> list[tuple[str, list[str]]]:
        return [("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"])]


class LlamaBody(nn.Module):
    """A Llama / Qwen2 body under Hugging Face's names: the embedding table, the layers, the final norm
    (the head sits beside it, on the model) and 1-D RoPE."""

    def __init__(self, c: TextConfig, qkv_bias: Optional[bool] = None, o_bias: Optional[bool] = None, rope: bool = True,
                 layer: type = LlamaLayer):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(layer(c, qkv_bias, o_bias) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if rope:
            self.rotary = Rope1D(c.head_dim, c.rope_theta)


def interpolate_grid_table(table: torch.Tensor, grid: int) -> torch.Tensor:
    """A learned position table of a square patch grid [g*g, D] resampled to grid x grid [grid*grid, D]:
    bicubic, align_corners=False, as CLIP's, SigLIP's and InternViT's `interpolate_pos_encoding` do."""
    n, d = table.shape
    side = math.isqrt(n)
    if side * side != n:
        raise VlmcError(f"a position table of {n} rows is not a square patch grid")
    square = table.detach().float().reshape(1, side, side, d).permute(0, 3, 1, 2)
    out = F.interpolate(square, size=(grid, grid), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(grid * grid, d).to(table.dtype)

