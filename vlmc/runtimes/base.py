"""What every runtime session offers: raw program calls, and the VLM steps that generation drives.

A session holds one bundle loaded on one runtime. `call` runs one program on numpy arrays (used by
verification and profiling); `vision`, `embed`, `prefill` and `step` are the stages a VLM user
measures (vision encode, prefill, decode), built on `call`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from vlmc.errors import VlmcError


@dataclass(frozen=True)
class DecoderShape:
    """What a session needs to know about the text decoder it drives."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    max_context: int
    max_prompt: int
    cache_shifts: tuple = ()  # per layer, image rows in-LLM stages dropped before it (its cache is shorter)
    state_layers: tuple = ()  # (layer, rows, width) of each recurrent layer: its state split across its (k, v) pair
    kv_cache: str = "float32"  # or int8: codes plus a float scale per head and slot (the kv8 pass)
    # (layer, heavy rows, rank, light rows, light rank) of each layer whose image rows are packed (attentionpack)
    packed: tuple = ()

    @classmethod
    def from_manifest(cls, manifest: dict) -> "DecoderShape":
        d = manifest["decoder"]
        return cls(d["num_layers"], d["num_kv_heads"], d["head_dim"], d["hidden_size"], d["max_context"], d["max_prompt"],
                   tuple(d.get("cache_shifts", ())), tuple(tuple(s) for s in d.get("state_layers", ())),
                   d.get("kv_cache", {}).get("dtype", "float32"), tuple(tuple(p) for p in d.get("kv_cache", {}).get("packed", ())))

    @classmethod
    def of_model(cls, model, max_context: int, max_prompt: int) -> "DecoderShape":
        """The shape of a VisionLanguageModel's decoder with its token stages, at these lengths."""
        t = model.config.text
        return cls(t.num_layers, t.num_kv_heads, t.head_dim, t.hidden_size, max_context, max_prompt,
                   tuple(model.cache_shifts()), tuple((i, *s) for i, s in model.state_layers().items()), model.kv_cache,
                   tuple((i, *stage.packed_shape) for i, stage in model.packed_layers().items()))

    def cache_dims(self, layer: int) -> tuple[int, int, int]:
        """(heads, slots, dim) of the layer's k and v cache tensors (see VisionLanguageModel.cache_dims)."""
        for index, rows, width in self.state_layers:
            if index == layer:
                return (1, rows, width // 2)
        return (self.num_kv_heads, self.cache_length(layer), self.head_dim)

    @property
    def full_prompt_prefill(self) -> bool:
        """In-LLM token stages: the prompt is prefilled whole by `text_prefill`, told where the image starts."""
        return any(self.cache_shifts)

    def cache_length(self, layer: int) -> int:
        return self.max_context - (self.cache_shifts[layer] if self.cache_shifts else 0)

    def cache_layout(self) -> list[tuple[str, tuple, type]]:
        """(name, shape, dtype) of every cache tensor the programs take and return, in their order: per layer
        k_cache and v_cache, with an int8 cache k_scale and v_scale, with packed image rows (attentionpack)
        k_rows, v_rows (the heavy rows' coefficients on the layer's bases) and k_lite, v_lite (the others')."""
        out = []
        for i in range(self.num_layers):
            shape = (1, *self.cache_dims(i))
            if self.kv_cache == "int8":
                out += [(f"k_cache_{i}", shape, np.int8), (f"v_cache_{i}", shape, np.int8),
                        (f"k_scale_{i}", (*shape[:3], 1), np.float32), (f"v_scale_{i}", (*shape[:3], 1), np.float32)]
            else:
                out += [(f"k_cache_{i}", shape, np.float32), (f"v_cache_{i}", shape, np.float32)]
            out += self.packed_layout(i)
        return out

    def packed_layout(self, layer: int) -> list[tuple[str, tuple, type]]:
        """(name, shape, dtype) of a packed layer's coefficient blocks (k_rows, v_rows, k_lite, v_lite); none
        for a layer that is not packed."""
        for i, heavy, rank, light, light_rank in self.packed:
            if i == layer:
                return [(f"{kv}_{part}_{i}", (1, rows, r), np.float32)
                        for part, rows, r in (("rows", heavy, rank), ("lite", light, light_rank)) for kv in "kv"]
        return []

    def cache_names(self) -> list[str]:
        return [name for name, _, _ in self.cache_layout()]

    def cache_offsets(self) -> list[int]:
        """Index of each layer's k_cache in the programs' cache list."""
        names = self.cache_names()
        return [names.index(f"k_cache_{i}") for i in range(self.num_layers)]

    def empty_caches(self) -> list[np.ndarray]:
        """The decoder's cache inputs at the start of a sequence, in the programs' order (`cache_layout`)."""
        return [np.zeros(shape, dtype) for _, shape, dtype in self.cache_layout()]

    def cache_bytes(self) -> int:
        """What the KV cache (and any recurrent state) occupies: every slot, at its storage type."""
        return sum(a.nbytes for a in self.empty_caches())


class Session(ABC):
    runtime: str = ""

    def __init__(self, shape: DecoderShape):
        self.shape = shape

    @abstractmethod
    def call(self, program: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Run one program (or ExecuTorch method) on its inputs, in the manifest's order."""

    def vision(self, image_u8: np.ndarray) -> np.ndarray:
        """uint8 [3,H,W] -> image embeddings [1,N,D]."""
        return self.call("vision_encoder", [image_u8])[0]

    def embed(self, ids: list[int]) -> np.ndarray:
        return self.call("token_embedding", [np.asarray([ids], dtype=np.int64)])[0]

    @abstractmethod
    def prefill(self, embeds: np.ndarray, image_start: Optional[int] = None) -> np.ndarray:
        """Start a sequence: embeds [1,T,D] fill cache slots 0..T-1; returns the last token's logits [V].
        `image_start`: the prompt's first image row, which a bundle with in-LLM token stages needs."""

    def _image_start(self, image_start: Optional[int]) -> np.ndarray:
        if image_start is None:
            raise VlmcError("this bundle drops image tokens inside the LLM: its prefill needs the whole prompt and where the image starts")
        return np.asarray([image_start], np.int64)

    @abstractmethod
    def step(self, embeds: np.ndarray, pos: int) -> np.ndarray:
        """One decode step at slot/position `pos`: embeds [1,1,D] -> logits [V]."""

    def check_prompt_length(self, length: int) -> None:
        if length > self.shape.max_prompt:
            raise VlmcError(f"prompt is {length} tokens, over the bundle's max_prompt of {self.shape.max_prompt}")


class StaticCacheSession(Session):
    """Sessions whose decoder takes and returns the KV cache explicitly (onnxruntime, Core ML, eager).

    With `pad_prefill` (Core ML: accelerators want one static shape) the prompt is right-padded to
    max_prompt and `logits_index` picks the last real token; padded slots are overwritten by decode steps
    before any query can see them (`pad_full_prompt_prefill`: only the in-LLM stages' text_prefill).
    Otherwise the prefill runs at the prompt's own length (the graph's length is bounded-dynamic), which
    is what a pruned prompt saves.
    """

    pad_prefill = False
    pad_full_prompt_prefill = False  # TVM: text_prefill is built at max_prompt rows, the decoder stays dynamic

    def __init__(self, shape: DecoderShape):
        super().__init__(shape)
        self.caches: list[np.ndarray] = []

    def _decode(self, embeds, positions, logits_index) -> np.ndarray:
        pos = np.asarray(positions, np.int64)
        out = self.call("text_decoder", [embeds.astype(np.float32), pos[None], pos, np.asarray([logits_index], np.int64), *self.caches])
        self.caches = list(out[1:])
        return out[0][0]

    def prefill(self, embeds: np.ndarray, image_start: Optional[int] = None) -> np.ndarray:
        t = embeds.shape[1]
        self.check_prompt_length(t)
        if self.pad_prefill or (self.pad_full_prompt_prefill and self.shape.full_prompt_prefill):
            padded = np.zeros((1, self.shape.max_prompt, embeds.shape[2]), np.float32)
            padded[:, :t] = embeds
            embeds = padded
        last = np.asarray([t - 1], np.int64)
        if self.shape.full_prompt_prefill:
            out = self.call("text_prefill", [embeds.astype(np.float32), self._image_start(image_start), last])
            self.caches = list(out[1:])
            return out[0][0]
        self.caches = self._empty_caches()
        return self._decode(embeds, range(embeds.shape[1]), t - 1)

    def _empty_caches(self) -> list:
        """The zero caches a prefill starts from."""
        return self.shape.empty_caches()

    def step(self, embeds: np.ndarray, pos: int) -> np.ndarray:
        if pos >= self.shape.max_context:
            raise VlmcError(f"sequence reached the bundle's max_context of {self.shape.max_context}")
        return self._decode(embeds, [pos], 0)


@dataclass
class Generation:
    tokens: list[int]
    prompt_tokens: int
    vision_ms: float = 0.0
    embed_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: list[float] = field(default_factory=list)
    first_logits: Optional[np.ndarray] = None  # the distribution of the first generated token

    @property
    def time_to_first_token_ms(self) -> float:
        return self.vision_ms + self.embed_ms + self.prefill_ms
