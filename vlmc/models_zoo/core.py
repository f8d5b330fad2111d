"""The family-agnostic core every vlmc model is built on: its anatomy and the machinery passes need.

A family adapter subclasses `VisionLanguageModel` and supplies only its parts (see "What a family
supplies" below): its modules under Hugging Face's names, how pixels become the first vision tokens, what
the feature layer hands to the connector, the connector, the decoder layers and their position scheme.
Everything passes and the exporter read lives here, once:

- named insertion points (`vision.block[i]`, `vision.out`, `projector.out`, `decoder.layer[L]`),
  `insert` / `pop`, the order rules of stages inside the vision tower and merged sizes threaded through it;
- the in-LLM drop loop: image rows dropped after a layer keep their original positions, and every later
  layer's cache is shorter by what was dropped (`cache_shifts`); bypass stages let image rows skip one
  layer (their hidden state passes it unchanged and rejoins after it; that layer's cache is shorter);
  merging stages fold the dropped rows into the kept ones before dropping them; eviction stages keep
  every row in the computation but only some image rows in their layer's cache (KV-cache compression);
- the part lists quantization reads (`part_modules`, `norm_consumers`);
- the eager reference: image encoding, embedding merge, whole-prompt logits and a growing-cache decode.

Passes import this module's types (`LayerView`, `PromptRows`); this module imports nothing from passes.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlmc.errors import VlmcError
from vlmc.models_zoo.layers import Attend, StatefulAttend, packed_sdpa, repeat_kv

POINTS = re.compile(r"^(vision\.block\[(\d+)\]|vision\.out|projector\.out|decoder\.layer\[(\d+)\])$")


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


def is_bypass(stage) -> bool:
    """A stage that picks the image rows one layer computes (the others skip it), dropping none for good."""
    return getattr(stage, "bypass", False)


def evicts(stage) -> bool:
    """A stage that picks the image rows whose keys and values one layer's cache keeps: every row runs the
    layer and the prompt's own attention, only the decode steps read fewer (KV-cache compression)."""
    return getattr(stage, "evicts", False)


def packs(stage) -> bool:
    """An eviction stage that keeps the image rows it evicts, packed (`pack(q, k, v, rows, last)`: low-rank
    coefficients the decode steps attend to through `packed_sdpa`)."""
    return getattr(stage, "packs", False)


def shortens_one_layer(stage) -> bool:
    """The stage shortens only its own layer's cache (bypass, eviction), not every later one (a drop)."""
    return is_bypass(stage) or evicts(stage)


def rejoin(h: torch.Tensor, computed: torch.Tensor, start: torch.Tensor, kept: torch.Tensor, n: int) -> torch.Tensor:
    """`h` [1,T,D] with the rows that ran a layer replaced by their outputs `computed` [1,T-(n-R),D] (the
    rows before the image, the kept image rows `kept` [R] ascending, the rows after): a gather, so the
    skipped rows come back exactly as they were."""
    t, r = h.shape[1], kept.shape[0]
    j = torch.arange(t)
    inside = torch.logical_and(j >= start, j < add_int(start, n))  # (Core ML converts no `&` / `|` on bools)
    chosen = ((torch.arange(n)[:, None] == kept[None, :]).to(torch.int32).amax(1) if r  # [n]: 1 where the row ran it
              else torch.zeros(n, dtype=torch.int32))
    ran = torch.logical_or(torch.logical_not(inside), chosen.index_select(0, (j - start).clamp(0, n - 1)) > 0)
    source = (torch.cumsum(ran.to(torch.int64), 0) - 1).clamp(0, t - (n - r) - 1)
    return torch.where(ran[None, :, None], computed.index_select(1, source), h)


def replace_image_rows(h: torch.Tensor, rows: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """`h` [1,T,D] with its image rows (from `start` [1]) replaced by `rows` [1,R,D]: a gather and a select,
    so the image's start may be a program input."""
    t, r = h.shape[1], rows.shape[1]
    j = torch.arange(t)
    inside = torch.logical_and(j >= start, j < add_int(start, r))
    return torch.where(inside[None, :, None], rows.index_select(1, (j - start).clamp(0, r - 1)), h)


def add_int(x: torch.Tensor, c: int) -> torch.Tensor:
    """x + c for an integer tensor, with c as a tensor: PT2E's prepare turns scalar operands of add into
    float constants, which would make index arithmetic float."""
    return x + torch.full_like(x, c)


def keep_rows(length, start: torch.Tensor, kept: torch.Tensor, n: int) -> torch.Tensor:
    """Row indices of a prompt of `length` rows after dropping image rows: the rows before the image
    (which starts at `start` [1]), the kept image rows (`kept` [R], ascending, into the n image rows),
    the rows after. One comparison per output row, so the image's start may be a program input."""
    r = kept.shape[0]
    j = torch.arange(length - (n - r))
    if r == 0:  # no image row (image rows that enter the decoder at a later layer)
        return torch.where(j < start, j, add_int(j, n))
    inside = kept.index_select(0, (j - start).clamp(0, r - 1)) + start
    return torch.where(j < start, j, torch.where(j < add_int(start, r), inside, add_int(j, n - r)))


def _key(point: str) -> str:
    return point.replace(".", "_").replace("[", "_").replace("]", "")


class VisionLanguageModel(nn.Module):
    """An image -> vision blocks -> features -> connector -> decoder VLM with named insertion points.

    What a family supplies:
    - `family` (the config's model_type) and the module paths of its parts: `vision_blocks_path`,
      `connector_path`, `embed_tokens_path`, `decoder_layers_path`, `final_norm_path`, and `parts`
      (what quantization covers: {"vision": [paths], "decoder": [paths]}); an `lm_head` attribute;
    - `embed_image(pixels)` -> the tokens entering vision block 0, `select_features(x)` -> the tokens at
      `vision.out` (the feature layer's output, CLS dropped or kept, post-norm where the family has one);
    - `rope(position_ids)` -> a tuple of [B,T,...] tensors its decoder layers take (the position scheme);
    - geometry where it differs from config.vision's: `num_vision_blocks` (the blocks the feature layer
      needs), `image_size` (square input side), `patch_grid`; `connector_merge` (the connector's spatial
      merge: 1 for an MLP, the pixel-shuffle or pooling factor otherwise), `vision_has_cls`, `features_have_cls`;
    - config: `config.text` with the decoder geometry (num_layers, num_heads, num_kv_heads, head_dim,
      hidden_size, vocab_size, bos_token_id, eos_token_ids, tie_word_embeddings), `config.image_token_id`,
      `config.image_mean` / `config.image_std`, and `config.to_dict()`.
    """

    family: str = ""
    vision_blocks_path = connector_path = embed_tokens_path = decoder_layers_path = final_norm_path = ""
    parts: dict[str, tuple[str, ...]] = {}
    vision_has_cls = False
    features_have_cls = False
    connector_merge = 1
    embed_scale: Optional[float] = None  # the decoder scales token embeddings by it (Gemma); image rows are not scaled
    image_resize = {"rule": "shortest_edge_center_crop", "filter": "bicubic"}  # the host's resize (vlmc.runtimes.image)
    # False when `attention_mask` is more than causal (sliding windows, bidirectional image rows): the
    # ExecuTorch decoder then attends with an explicit mask instead of llama::custom_sdpa (causal only)
    causal_attention = True
    # positions or masks depend on where the image starts: the template must fix it (image before the question)
    needs_image_start = False
    # vision blocks whose outputs the connector reads beside the final features (`connect`), and the first
    # decoder layers that each add one more slice of the image rows to their output (DeepStack, Qwen3-VL):
    # the image embeddings carry those slices as extra columns ([main | layer 0's | layer 1's ...]), text
    # rows carry zeros there, so every program keeps its inputs and only the rows get wider (`embed_width`)
    tapped_blocks: tuple[int, ...] = ()
    deepstack_layers = 0

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.register_buffer("image_mean", torch.tensor(config.image_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(config.image_std).view(3, 1, 1), persistent=False)
        # the rows' positions during a decoder call, for modules whose weights depend on a row's modality
        # (MASQuant's smoothing: the image's rows sit at positions the prompt template fixes)
        self.row_positions: Optional[torch.Tensor] = None
        # the prompt row where the image's tokens start: set from the prompt template (`set_image_start`)
        # for families whose positions or masks depend on it (M-RoPE, bidirectional image attention)
        self.image_start: Optional[int] = None
        # the side images are encoded at when the resolution pass lowered it (None: the native side)
        self.input_side: Optional[int] = None
        # how the decoder's KV cache is stored between calls: float32, or int8 codes with a float scale per
        # head and slot (the kv8 pass); every program form reads it
        self.kv_cache = "float32"
        # Token stages inserted by passes at named points of the anatomy (see `insert`).
        self.insertions = nn.ModuleDict()

    def set_image_start(self, row: int) -> None:
        """Where the prompt template puts the image (constant for a template with the image before the question)."""
        self.image_start = row

    def state_shape(self, layer: int) -> Optional[tuple[int, int]]:
        """(rows, width) of the recurrent state a decoder layer keeps instead of a KV cache (LFM2's short
        convolutions keep their last kernel - 1 input rows); None for an attention layer."""
        return None

    def state_layers(self) -> dict[int, tuple[int, int]]:
        return {i: s for i in range(self.config.text.num_layers) if (s := self.state_shape(i)) is not None}

    def cache_dims(self, layer: int, max_context: int) -> tuple[int, int, int]:
        """(heads, slots, dim) of a decoder layer's two cache tensors: an attention layer's keys and values
        (slots shorter by the image rows in-LLM stages dropped before it), or a recurrent layer's state
        split by width across the two, so every program keeps one (k, v) pair per layer."""
        state = self.state_shape(layer)
        if state is not None:
            return (1, state[0], state[1] // 2)
        t = self.config.text
        return (t.num_kv_heads, max_context - self.cache_shifts()[layer], t.head_dim)

    def attention_projections(self, layer: int) -> tuple[nn.Module, nn.Linear, nn.Linear]:
        """(input norm, query projection, key projection) of a decoder attention layer: what a scorer that
        estimates the layer's attention from its input reads. Families name them as Hugging Face does
        (`input_layernorm`, `self_attn.q_proj` / `k_proj`); one that does not overrides this."""
        block = self.decoder_layers[layer]
        attn = getattr(block, "self_attn", None)
        if not hasattr(block, "input_layernorm") or not hasattr(attn, "q_proj") or not hasattr(attn, "k_proj"):
            raise VlmcError(f"decoder layer {layer} of the {self.family} decoder is not an attention layer with "
                            "input_layernorm and self_attn.q_proj / k_proj")
        return block.input_layernorm, attn.q_proj, attn.k_proj

    def attention_mask(self, layer: int, q_slots: torch.Tensor, k_slots: torch.Tensor) -> torch.Tensor:
        """Which cache slots [C] each query slot [T] of decoder `layer` sees: [T, C] bool. Causal here;
        a family overrides it (and sets `causal_attention = False`) for sliding windows or image rows
        that see each other."""
        return k_slots[None, :] <= q_slots[:, None]

    @property
    def tied_head(self) -> bool:
        """The LM head is the token embedding table (one tensor)."""
        return self.lm_head.weight is self.embed_tokens.weight

    def add_head(self) -> None:
        """The LM head (`lm_head`), sharing the embedding table where the config ties them."""
        t = self.config.text
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        if t.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    # ----- the parts, by path
    def _part(self, path: str) -> nn.Module:
        """The submodule at a dotted path, read from the module tree (not attributes: a family may name a
        module like one of the accessors below)."""
        module: nn.Module = self
        for name in path.split("."):
            module = module._modules[name]
        return module

    def replace_embed_tokens(self, table: nn.Module) -> None:
        """Swap the token table module (a storage pass: `embed8`); a tied LM head keeps the float tensor."""
        parent, _, name = self.embed_tokens_path.rpartition(".")
        (self._part(parent) if parent else self)._modules[name] = table

    @property
    def vision_blocks(self) -> nn.ModuleList:
        return self._part(self.vision_blocks_path)

    @property
    def connector(self) -> nn.Module:
        return self._part(self.connector_path)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self._part(self.embed_tokens_path)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self._part(self.decoder_layers_path)

    @property
    def final_norm(self) -> nn.Module:
        return self._part(self.final_norm_path)

    # geometry: what most families read off config.vision; a family overrides what differs
    @property
    def num_vision_blocks(self) -> int:
        """The vision blocks that run (those the feature layer needs)."""
        return self.config.vision.num_layers

    @property
    def native_image_size(self) -> int:
        """Side of the square image the checkpoint was built for."""
        return self.config.vision.image_size

    @property
    def image_size(self) -> int:
        """Side of the square image the vision_encoder takes (lower than native after `set_resolution`)."""
        return self.input_side or self.native_image_size

    def set_resolution(self, side: int) -> None:
        """Encode images at side x side, below the native side (the resolution pass): the vision encoder
        itself runs on fewer patches, and every later stage sees a smaller grid. The family resizes its
        position scheme the way its own code does for another input size (`resize_positions`)."""
        patch, native = self.config.vision.patch_size, self.native_image_size
        unit = patch * self.connector_merge
        if self.insertions:
            raise VlmcError("pass resolution: the input size is fixed before any token stage is placed")
        if side >= native:
            raise VlmcError(f"pass resolution: parameter 'size': {side} is not below the model's {native}x{native} input")
        if side % unit:
            why = f"the {patch}px patch" if unit == patch else f"the {patch}px patch x the connector's {self.connector_merge}x merge"
            raise VlmcError(f"pass resolution: parameter 'size': {side} is not a multiple of {unit} ({why}); "
                            f"e.g. {max(unit, side // unit * unit)}")
        self.resize_positions(side // patch)
        self.input_side = side

    def resize_positions(self, grid: int) -> None:
        """Make the vision tower (and a connector that knows the grid) take a grid x grid patch grid."""
        raise VlmcError(f"pass resolution: the {self.family} family has no rule for a smaller input")

    @property
    def patch_grid(self) -> int:
        return self.image_size // self.config.vision.patch_size

    @property
    def image_tiles(self) -> int:
        """Images the vision encoder runs on per prompt: 1, or a tile grid's tiles plus the global image
        (each a run of `num_image_tokens` rows in the prompt, with the family's text between runs)."""
        return 1

    def image_text(self, wrapped: str) -> str:
        """The template text that stands for the image: `wrapped` (one `<image>` run in the family's wrap);
        a family that splits images into tiles returns one `<image>` run per tile, with its separators."""
        return wrapped

    @property
    def num_image_tokens(self) -> int:
        """Image tokens the decoder receives per image (per tile) without token passes."""
        n = (self.patch_grid // self.connector_merge) ** 2
        return n + 1 if self.features_have_cls else n

    @property
    def embed_width(self) -> int:
        """The width of the decoder's input rows (image and token embeddings): the hidden size, plus one
        hidden size per DeepStack layer."""
        return self.config.text.hidden_size * (1 + self.deepstack_layers)

    @property
    def vision_width(self) -> int:
        """The width of the tokens at vision.out (what the connector reads)."""
        return self.config.vision.hidden_size

    def token_grid(self, point: str) -> int:
        """Side of the square token grid at a pre-LLM point, before any stage there."""
        return self.patch_grid // self.connector_merge if point == "projector.out" else self.patch_grid

    # ----- anatomy
    def part_modules(self, part: str) -> list[tuple[str, nn.Module]]:
        """The modules of a part that quantization covers: `vision` is the vision_encoder program's
        weights (vision tower + connector), `decoder` the text_decoder's (layers + head; the embedding
        table is the token_embedding program's)."""
        if part not in self.parts:
            raise ValueError(f"unknown part {part!r}")
        return [(path, self._part(path)) for path in self.parts[part]]

    def norm_consumers(self, part: str) -> list[tuple[str, nn.Module, list[tuple[str, nn.Linear]]]]:
        """(norm name, norm, [(linear name, linear)]) for each norm and the linears it feeds directly: where
        smoothing factors fold (the norm's gain divided, the linears' input columns multiplied)."""
        if part == "vision":
            path, blocks = self.vision_blocks_path, list(self.vision_blocks)[: self.num_vision_blocks]
        elif part == "decoder":
            path, blocks = self.decoder_layers_path, list(self.decoder_layers)
        else:
            raise ValueError(f"unknown part {part!r}")
        out = []
        for i, block in enumerate(blocks):
            p = f"{path}.{i}"
            for norm, linears in block.smoothing_groups():
                out.append((f"{p}.{norm}", block.get_submodule(norm),
                            [(f"{p}.{name}", block.get_submodule(name)) for name in linears]))
        return out

    def insertion_points(self) -> list[str]:
        return ([f"vision.block[{i}]" for i in range(self.num_vision_blocks)] + ["vision.out", "projector.out"]
                + [f"decoder.layer[{i}]" for i in range(self.config.text.num_layers)])

    def resolve(self, point: str) -> nn.Module:
        """The module that produces the tokens at a named insertion point."""
        if point not in self.insertion_points():
            raise VlmcError(f"unknown insertion point {point!r} (have vision.block[0..{self.num_vision_blocks - 1}], "
                            f"vision.out, projector.out, decoder.layer[0..{self.config.text.num_layers - 1}])")
        m = POINTS.match(point)
        if m.group(2) is not None:
            return self.vision_blocks[int(m.group(2))]
        if point == "vision.out":
            return self.vision_blocks[self.num_vision_blocks - 1]
        if point == "projector.out":
            return self.connector
        return self.decoder_layers[int(m.group(3))]

    def check_in_llm(self, point: str) -> None:
        """Refuse in-LLM token stages where the decoder cannot take them (before any work places one)."""
        if self.state_layers():
            raise VlmcError(f"insertion at {point}: the {self.family} decoder's convolution layers mix neighbouring rows "
                            "and carry a state over them; in-LLM token stages (which drop rows between layers) are not "
                            "supported there (reduce tokens at projector.out)")
        if self.image_tiles > 1:
            raise VlmcError(f"insertion at {point}: the image fills {self.image_tiles} tile runs with the tile grid's text "
                            "between them; in-LLM token stages need the image as one run of rows (export without tile_grid)")

    def insert(self, point: str, stage: nn.Module) -> None:
        """Run `stage(tokens) -> tokens` on the visual tokens leaving `point` (after earlier stages there).

        Vision points see [B, N, D] (CLS first where the family has one) at blocks, the selected features
        at vision.out, the connector's output at projector.out. A stage with `wants_block_input = True` at a
        block also gets the block's input, for scores read from that block's attention. A stage with
        `tracks_size = True` (a merge) takes and returns the tokens' sizes too, which the later blocks'
        attention reads; a stage that does not track sizes cannot follow one inside the vision tower. At
        `decoder.layer[i]` a stage is an in-LLM one (`select(LayerView) -> kept image indices`, `dropped`
        rows; optionally `merge(view, kept)` -> the kept rows' new states, so the dropped rows' content
        joins them): see `run_decoder`. A pre-LLM stage with `orders_rows` hands a later in-LLM stage with
        `reads_row_order` the image rows in an order it relies on: nothing may follow the first at its
        point, or drop image rows at or before the second's layer. A stage that `evicts` rows from its
        layer's cache (every row still runs the layer) shares its layer with no other stage. A connector
        that merges the patch grid (pixel shuffle, pooling) needs all of it, so only transparent stages may
        run before it.
        """
        self.resolve(point)
        transparent = getattr(stage, "transparent", False)
        if point.startswith("decoder."):
            self.check_in_llm(point)
        if point.startswith("decoder.") != hasattr(stage, "dropped") and not transparent:
            kind = "an in-LLM stage" if hasattr(stage, "dropped") else "a visual-token stage"
            raise VlmcError(f"insertion at {point}: {kind} cannot run there")
        if self.connector_merge > 1 and point.startswith("vision.") and not transparent:
            raise VlmcError(f"insertion at {point}: the {self.family} connector merges the full {self.patch_grid}x"
                            f"{self.patch_grid} patch grid, so visual tokens can only be reduced after it (projector.out)")
        block = POINTS.match(point).group(2)
        if block is not None:
            self._check_size_order(point, int(block), stage)
        key = _key(point)
        here = list(self.insertions[key]) if key in self.insertions else []
        if point.startswith("decoder.") and here and any(is_bypass(s) != is_bypass(stage) for s in here):
            raise VlmcError(f"insertion at {point}: a stage that lets image rows skip this layer and one that drops rows "
                            "after it cannot share a layer")
        if point.startswith("decoder.") and is_bypass(stage) and here:
            raise VlmcError(f"insertion at {point}: another pass already chooses which image rows skip this layer")
        if point.startswith("decoder.") and here and (evicts(stage) or any(evicts(s) for s in here)):
            raise VlmcError(f"insertion at {point}: a stage that evicts image rows from this layer's cache shares the "
                            "layer with no other in-LLM stage")
        if here and getattr(here[-1], "orders_rows", False) and not transparent:
            raise VlmcError(f"insertion at {point}: the stage there orders the image rows for a later layer; no token "
                            "stage may follow it at this point (place the other pass first in the recipe)")
        self._check_row_order(point, stage)
        if key not in self.insertions:
            self.insertions[key] = nn.ModuleList()
        self.insertions[key].append(stage)

    def _check_row_order(self, point: str, stage: nn.Module) -> None:
        """An in-LLM stage that `reads_row_order` (it knows which image rows are which from the order a
        pre-LLM stage left them in, or is built for as many as enter the decoder) needs every image row to
        reach it: no stage may drop rows at or before its layer."""
        m = POINTS.match(point)
        if m.group(3) is None:
            return
        layer, stages = int(m.group(3)), self.decoder_stages()
        if getattr(stage, "reads_row_order", False):
            early = [i for i, here in stages.items() if i <= layer and any(not shortens_one_layer(s) for s in here)]
            clash = early[0] if early else None
        else:
            later = [i for i, here in stages.items() if i > layer and any(getattr(s, "reads_row_order", False) for s in here)]
            clash = later[0] if later and not shortens_one_layer(stage) else None
        if clash is not None:
            raise VlmcError(f"insertion at {point}: decoder.layer[{max(clash, layer)}]'s stage needs the image rows as "
                            f"they enter the decoder, so no stage may drop image rows at or before it "
                            f"(decoder.layer[{min(clash, layer)}])")

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
        keys = {i: _key(f"vision.block[{i}]") for i in range(self.num_vision_blocks)}
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
        """Per decoder layer, the image rows dropped before it or skipping it: that layer's KV cache is that
        much shorter and a token at slot s of layer 0 sits at slot s - shift there."""
        stages, shift, out = self.decoder_stages(), 0, []
        for i in range(self.config.text.num_layers):
            here = stages.get(i, ())
            out.append(shift + sum(s.dropped for s in here if shortens_one_layer(s)))
            shift += sum(s.dropped for s in here if not shortens_one_layer(s))
        return out

    def cache_evictions(self) -> list[int]:
        """Per decoder layer, the image rows its cache evicted after the prefill (they ran the layer)."""
        stages = self.decoder_stages()
        return [sum(s.dropped for s in stages.get(i, ()) if evicts(s)) for i in range(self.config.text.num_layers)]

    def packed_layers(self) -> dict[int, nn.Module]:
        """The decoder layers whose cache holds the image rows packed (AttentionPack), with their stage."""
        return {i: s for i, stages in self.decoder_stages().items() for s in stages if packs(s)}

    def dropped_through(self, layer: int) -> int:
        """Image rows dropped for good by the in-LLM stages up to and including `layer`'s."""
        return sum(s.dropped for i, stages in self.decoder_stages().items() if i <= layer for s in stages
                   if not shortens_one_layer(s))

    def dropped_in_llm(self) -> int:
        """Image rows the in-LLM stages drop in all."""
        return self.dropped_through(self.config.text.num_layers)

    def image_rows_in_llm(self) -> int:
        """The image rows a prompt holds when in-LLM stages exist: what the first of them receives."""
        stages = self.decoder_stages()
        first = stages[min(stages)][0]
        return first.keep + first.dropped

    # ----- vision
    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 or 0..255 float image [3,H,W] or [B,3,H,W] -> normalised float [B,3,H,W]."""
        x = image.float()
        if x.dim() == 3:
            x = x.unsqueeze(0)
        return (x / 255.0 - self.image_mean) / self.image_std

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B,3,H,W] -> image embeddings in the decoder's space [B,N',D]. With token stages
        each image (tile) is encoded on its own, as the vision_encoder program runs it: stages see one image."""
        if pixel_values.shape[0] > 1 and self.insertions:
            return torch.cat([self.encode_image(p[None]) for p in pixel_values])
        x = self.embed_image(pixel_values)
        size = None  # patches each token stands for, once a merging stage ran
        blocks, taps = self.vision_blocks, []
        for i in range(self.num_vision_blocks):
            x, size = self._block_stages(i, blocks[i](x, size), x, size)
            if i in self.tapped_blocks:
                taps.append(x)
        x = self._stage("vision.out", self.select_features(x))
        return self._stage("projector.out", self.connect(x, taps))

    def connect(self, features: torch.Tensor, taps: list[torch.Tensor]) -> torch.Tensor:
        """The connector on the features at vision.out; `taps`: the outputs of `tapped_blocks`, for a family
        whose connector reads intermediate blocks too."""
        return self.connector(features)

    # ----- text
    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> the decoder's input rows (the token_embedding program)."""
        embeds = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            embeds = embeds * torch.tensor(self.embed_scale, dtype=embeds.dtype)
        if self.deepstack_layers:  # text rows add nothing in the DeepStack layers
            embeds = F.pad(embeds, (0, self.embed_width - embeds.shape[-1]))
        return embeds

    def merge_embeddings(self, input_ids: torch.Tensor, image_embeds: Optional[torch.Tensor]) -> torch.Tensor:
        """Token embeddings with the image-token placeholders replaced by the image embeddings, in order."""
        embeds = self.embed_text(input_ids)
        if image_embeds is None:
            return embeds
        mask = input_ids == self.config.image_token_id
        if int(mask.sum()) != image_embeds.shape[0] * image_embeds.shape[1]:
            raise VlmcError(f"prompt has {int(mask.sum())} image tokens but the image gives {image_embeds.shape[1]}")
        return embeds.masked_scatter(mask[..., None], image_embeds.to(embeds.dtype))

    def run_decoder(self, inputs_embeds, position_ids, attend: Attend, prompt: Optional[PromptRows] = None,
                    stages: Optional[dict] = None):
        """Hidden states after the final norm. `stages` {layer: [stage]} (default: this model's in-LLM
        stages): with `prompt` (a full-prompt prefill) each one drops image rows after its layer, the kept
        rows keep their original positions and the later layers' caches get the compacted rows; without it
        (a decode step, later text) they only shift the later layers' cache slots by what they dropped. A
        bypass stage acts before its layer: only the image rows it picks (`select` on a view of the layer's
        input, no q / k yet) run the layer and enter its cache; the others pass it unchanged. An eviction
        stage picks, from the layer's own keys, the image rows its cache keeps (`attend.evicting`); the
        prefill's rows all run the layer."""
        stages = self.decoder_stages() if stages is None else stages
        rope = self.rope(position_ids)
        d, deep = self.config.text.hidden_size, self.deepstack_layers
        h, positions, shift = (inputs_embeds[..., :d] if deep else inputs_embeds), position_ids, 0
        if prompt is not None:
            n, last = prompt.num_image, prompt.last
        try:
            for i, layer in enumerate(self.decoder_layers):
                self.row_positions = positions
                h_in = h
                here = stages.get(i, ())
                bypass = [stage for stage in here if is_bypass(stage)]
                evicting = [stage for stage in here if evicts(stage)]
                if bypass and prompt is not None:  # only the chosen image rows (and the text) run this layer
                    rows = prompt.image_start + torch.arange(n)
                    kept = bypass[0].select(LayerView(h, h, None, None, rows, last))
                    idx = keep_rows(h.shape[1], prompt.image_start, kept, n)
                    self.row_positions = positions.index_select(1, idx)
                    computed, q, k = layer(h.index_select(1, idx), tuple(r.index_select(1, idx) for r in rope), i, attend,
                                           shift)
                    h = rejoin(h, computed, prompt.image_start, kept, n)
                elif evicting and prompt is not None:  # every row runs the layer; its cache keeps the chosen image rows
                    rows = prompt.image_start + torch.arange(n)
                    h, q, k = layer(h, rope, i, _evicting(attend, evicting[0], prompt.image_start, rows, last, n), shift)
                else:  # a decode step or later text: the layer's cache holds only the rows that ran it
                    h, q, k = layer(h, rope, i, attend, shift + sum(stage.dropped for stage in bypass + evicting))
                if i < deep:
                    h = h + inputs_embeds[..., (i + 1) * d:(i + 2) * d]
                for stage in (stage for stage in here if not shortens_one_layer(stage)):
                    if prompt is None:
                        shift += stage.dropped
                        continue
                    rows = prompt.image_start + torch.arange(n)
                    view = LayerView(h_in, h, q, k, rows, last)
                    kept = stage.select(view)
                    merged = stage.merge(view, kept) if hasattr(stage, "merge") else None
                    idx = keep_rows(h.shape[1], prompt.image_start, kept, n)
                    h, rope = h.index_select(1, idx), tuple(r.index_select(1, idx) for r in rope)
                    if merged is not None:
                        h = replace_image_rows(h, merged, prompt.image_start)
                    if i + 1 < deep:
                        inputs_embeds = inputs_embeds.index_select(1, idx)
                    positions = positions.index_select(1, idx)
                    n, last = kept.shape[0], add_int(last, -stage.dropped)
        finally:
            self.row_positions = None
        return self.final_norm(h)

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
        """Eager decoding with a growing cache: past = [(k, v)] per layer (a packed layer's coefficients
        third) or None. Returns logits, cache. `prompt`: this call is a full-prompt prefill, the in-LLM
        stages drop image rows."""
        n_rep = self.config.text.num_heads // self.config.text.num_kv_heads
        new_past, packed_layers = [], self.packed_layers()

        def attend(i, q, k, v, shift):
            if past is not None:
                k, v = torch.cat([past[i][0], k], dim=2), torch.cat([past[i][1], v], dim=2)
            packed = past[i][2] if past is not None and len(past[i]) > 2 else None
            new_past.append((k, v) if packed is None else (k, v, packed))
            t, s = q.shape[2], k.shape[2]
            mask = self.attention_mask(i, torch.arange(s - t, s), torch.arange(s))
            if packed is not None:
                stage = packed_layers[i]
                return packed_sdpa(q, k, v, mask, packed, stage.basis_k, stage.basis_v)
            out = F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask)
            return out.transpose(1, 2).flatten(2)

        def evicting(i, q, k, v, idx, packed=None):  # a whole-prompt prefill: the cache keeps rows idx
            out = attend(i, q, k, v, 0)
            kept = (k.index_select(2, idx), v.index_select(2, idx))
            new_past[-1] = kept if packed is None else (*kept, packed)
            return out

        attend.evicting = evicting

        def carry(i, x):
            rows = self.state_shape(i)[0]
            state = join_state(*past[i]) if past is not None else x.new_zeros(x.shape[0], rows, x.shape[2])
            full = torch.cat([state, x], 1)
            new_past.append(split_state(full[:, full.shape[1] - rows:]))
            return full

        h = self.run_decoder(embeds, position_ids, StatefulAttend(attend, carry) if self.state_layers() else attend, prompt)
        return self.lm_head(h), new_past


def _evicting(attend, stage, start: torch.Tensor, rows: torch.Tensor, last: torch.Tensor, n: int):
    """`attend` for a prefill layer whose cache evicts image rows: the stage picks the rows to keep from the
    layer's own keys, and the program's `attend.evicting(i, q, k, v, idx)` attends over every row of the
    call while its cache takes only the rows `idx` (text, kept image rows), compacted from slot 0, and, for
    a packing stage, the evicted image rows' coefficients `packed`."""

    def attend_evicting(i, q, k, v, shift):
        kept = stage.select(LayerView(None, None, q, k, rows, last))
        packed = stage.pack(q, k, v, rows, last) if packs(stage) else None
        return attend.evicting(i, q, k, v, keep_rows(q.shape[2], start, kept, n), packed)

    return attend_evicting


def split_state(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A recurrent layer's state [B,S,W] as its (k, v) cache pair [B,1,S,W/2] each."""
    half = state.shape[2] // 2
    return state[:, None, :, :half], state[:, None, :, half:]


def join_state(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.cat([k, v], -1)[:, 0]


@contextmanager
def skip_init():
    """Build modules without initialising their parameters (allocated, never written), for a model whose
    parameters a checkpoint's tensors replace: the untouched allocations cost no memory."""
    layers = (nn.Linear, nn.Embedding, nn.LayerNorm, nn.modules.conv._ConvNd)
    saved = [(cls, cls.__dict__["reset_parameters"]) for cls in layers]
    try:
        for cls in layers:
            cls.reset_parameters = lambda self: None
        yield
    finally:
        for cls, fn in saved:
            cls.reset_parameters = fn


def check_state(skeleton: nn.Module, tensors: dict[str, torch.Tensor], source: str, normalize_key, tied: bool) -> dict:
    """A checkpoint's tensors (names mapped by `normalize_key`) against the parameters a model built from its
    config would have — `skeleton`, built on the meta device so a config that implies terabytes allocates
    nothing: missing or unexpected names and shape mismatches are errors, not silent skips."""
    state = {normalize_key(k): v for k, v in tensors.items()}
    expected = {k: v for k, v in skeleton.state_dict().items() if not k.startswith("insertions.")}
    if tied:
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
    return state


def assign_state(model: nn.Module, state: dict[str, torch.Tensor], tied: bool) -> None:
    """The checked tensors become the parameters (float32; assigned, not copied); a tied head shares the table."""
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.embed_tokens.weight


def model_prefixed_key(key: str) -> str:
    """vlmc's parameter name -> transformers 5's for the families that nest everything under `model.`
    and keep `lm_head` at the top."""
    return key if key.startswith("lm_head.") else "model." + key


def hf_state_dict(model: VisionLanguageModel, to_hf_key) -> dict[str, torch.Tensor]:
    """Parameters under the family's Hugging Face names (`to_hf_key`), without token stages or a tied head."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("insertions."):
            continue
        if k == "lm_head.weight" and model.config.text.tie_word_embeddings:
            continue
        out[to_hf_key(k)] = v.detach().contiguous().clone()
    return out
