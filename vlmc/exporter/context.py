"""What every target's lowering reads: the prepared model, the resolved recipe, the output folder."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from vlmc.models_zoo import LoadedModel
from vlmc.passes.quant import QuantPlan
from vlmc.recipe import Recipe
from vlmc.runtimes.base import DecoderShape

PROGRAM_PARTS = {"vision_encoder": "vision", "text_prefill": "decoder", "text_decoder": "decoder"}  # token_embedding: the embed8 pass


@dataclass
class ExportContext:
    loaded: LoadedModel
    recipe: Recipe
    out_dir: Path
    progress: Callable[[str], None]
    image_tokens: int  # visual tokens the decoder sees, after token passes
    quant: QuantPlan = field(default_factory=lambda: QuantPlan({}, []))
    _calibration: object = None
    _target_models: dict = field(default_factory=dict)  # target -> its GPTQ-rounded / expert-compensated model
    _layer_statistics: object = None  # what each GPTQ / Quant Experts linear received over the calibration set
    _smoothed: object = None  # the model with smoothing folded in, shared by every target
    _split: object = None  # the (smoothed) model with DASQ's dense kernels and sparse outliers, shared by every target

    @property
    def model(self):
        return self.loaded.model

    def target_model(self, target: str):
        """The model a target lowers: the float model with its smoothed parts' weights rewritten (SmoothQuant,
        MASQuant), its DASQ parts' linears split into dense kernels and sparse outliers, its GPTQ parts
        rounded on that target's own 4-bit grid (its quantizer then reproduces them exactly), and its Quant
        Experts parts given float experts fitted to that grid's rounding error."""
        from vlmc.passes.quant import PER_TARGET_METHODS, experts, gptq, linear_layers
        from vlmc.passes.quant.calibration import layer_inputs

        schemes = {part: s for part, s in self.quant.schemes.items() if s.config.method in PER_TARGET_METHODS}
        base = self._rewritten_model()
        if not schemes:
            return base
        if target not in self._target_models:
            if self._layer_statistics is None:
                layers = [layer for part in schemes for layer in linear_layers(base, part)]
                sample = experts.SAMPLE_ROWS if any(s.config.method == "quant-experts" for s in schemes.values()) else 0
                self._layer_statistics = layer_inputs(base, layers, self.calibration(), keep_rows=sample)
            grid = gptq.GRIDS[target]
            model = base
            # GPTQ's parts, and the Quant Experts parts whose experts rebuild what GPTQ's rounding left
            rounded = {part: s for part, s in schemes.items()
                       if s.config.method.startswith("gptq") or s.param("base_rounding") == "gptq"}
            if rounded:
                self.progress(f"{target}: GPTQ of {', '.join(rounded)} on the {grid.name} grid")
                model = gptq.apply(model, rounded, self._layer_statistics, grid)
            compensated = {part: s for part, s in schemes.items() if s.config.method == "quant-experts"}
            if compensated:
                self.progress(f"{target}: Quant Experts of {', '.join(compensated)} fitted to the {grid.name} grid")
                model = experts.apply(model, compensated, self._layer_statistics, grid, original=base)
            self._target_models[target] = model
        return self._target_models[target]

    def _rewritten_model(self):
        """The float model with the target-independent weight rewrites: smoothing, then DASQ's split."""
        from vlmc.passes.quant import dasq

        schemes = {part: s for part, s in self.quant.schemes.items() if s.config.method == "dasq"}
        if not schemes:
            return self._smoothed_model()
        if self._split is None:
            self.progress(f"DASQ: dense kernels and sparse outliers of {', '.join(schemes)}")
            self._split = dasq.apply(self._smoothed_model(), schemes)
        return self._split

    def _smoothed_model(self):
        from vlmc.passes.quant import smoothing
        from vlmc.passes.quant.calibration import layer_inputs

        schemes = {part: s for part, s in self.quant.schemes.items() if s.config.method in smoothing.METHODS}
        if not schemes:
            return self.model
        if self._smoothed is None:
            cal = self.calibration()
            layers = [(name, lin) for part in schemes for _, _, consumers in self.model.norm_consumers(part)
                      for name, lin in consumers[:1]]
            rows = smoothing.image_rows(cal.visual_rows) if any(s.config.method == "masquant" for s in schemes.values()) else None
            self.progress(f"smoothing ({', '.join(f'{p}: {s.config.method}' for p, s in schemes.items())})")
            self._smoothed = smoothing.apply(self.model, schemes, layer_inputs(self.model, layers, cal), rows)
        return self._smoothed

    @property
    def num_layers(self) -> int:
        return self.model.config.text.num_layers

    @property
    def decoder_shape(self) -> DecoderShape:
        return DecoderShape.of_model(self.model, self.recipe.max_context, self.recipe.max_prompt)

    def scheme(self, program: str):
        """The quantization pass of the part a program belongs to, or None (float)."""
        part = PROGRAM_PARTS.get(program)
        return self.quant.get(part) if part else None

    @property
    def shortest_full_prompt(self) -> int:
        """The fewest rows a `text_prefill` takes: the image and a text row; two text rows where a layer runs
        the text alone (image rows injected at a later layer), as torch.export takes no dynamic size of 1."""
        text_alone = any(stage.keep == 0 for stages in self.model.decoder_stages().values() for stage in stages)
        return self.image_tokens + 1 + text_alone

    def promoted(self, program: str) -> list[str]:
        """The linears of a program's part that its w4 scheme gives 8 bits (QIG's plan), by module name."""
        from vlmc.passes.quant import promoted_layers

        scheme = self.scheme(program)
        return promoted_layers(self.model, scheme, PROGRAM_PARTS[program]) if scheme else []

    @property
    def calibration_source(self) -> Optional[dict]:
        """Where the calibration data came from, if a target used it."""
        return None if self._calibration is None else self._calibration.source

    def calibration(self):
        """The calibration set's program inputs, computed once for every target."""
        if self._calibration is None:
            from vlmc.passes.quant.calibration import collect

            self.progress(f"calibration: {self.recipe.calibration.n} questions from {self.recipe.calibration.dataset}")
            self._calibration = collect(self.model, self.loaded.tokenizer, self.recipe, self.image_tokens, self.decoder_shape)
        return self._calibration

    def explicit_cache_programs(self, target: str, image_layout: str, model=None) -> list["ProgramJob"]:
        """The three programs of targets that take the KV cache explicitly (ONNX, Core ML, TVM), of `model`
        (default: the target's model).

        The text length is bounded-dynamic (1..max_prompt): one decoder graph for prefill and decode,
        unless in-LLM token stages need a full-prompt prefill (`text_prefill`) that the decode step must not run.
        """
        from torch.export import Dim

        from vlmc.models_zoo.programs import (StaticCacheDecoder, StaticCachePrefill, TokenEmbeddingProgram,
                                              VisionEncoderProgram, empty_caches, static_decoder_io)

        m, r = model if model is not None else self.target_model(target), self.recipe
        seq = Dim("seq_len", min=1, max=r.max_prompt)
        pos = torch.arange(r.max_prompt)  # position_ids gets a copy: an input that is a view of another adds a guard on its base
        caches = empty_caches(m, r.max_context)
        in_names, out_names = static_decoder_io(DecoderShape.of_model(m, r.max_context, r.max_prompt))
        vision = VisionEncoderProgram(m, image_layout)
        cache_writes = {"onnx": "filled", "tvm": "scatter"}.get(target, "blend")  # Core ML: no index_put
        prefill = []
        if m.decoder_stages():
            # TVM builds it at max_prompt rows (right-padded, logits_index picks the last real one): with a
            # dynamic length the rows left after a drop are a symbolic expression its scheduler cannot split
            prompt_len = None if target == "tvm" else {1: Dim("prompt_len", min=self.shortest_full_prompt, max=r.max_prompt)}
            prefill = [ProgramJob("text_prefill", StaticCachePrefill(m, r.max_context, cache_writes),
                                  (torch.zeros(1, r.max_prompt, m.embed_width), torch.tensor([1]),
                                   torch.tensor([r.max_prompt - 1])),
                                  (prompt_len, None, None), ["inputs_embeds", "image_start", "logits_index"], out_names)]
        return prefill + [
            ProgramJob("vision_encoder", vision, (vision.example_input(),), None, ["image"], ["image_embeds"]),
            ProgramJob("token_embedding", TokenEmbeddingProgram(m), (torch.ones(1, 4, dtype=torch.long),), ({1: seq},),
                       ["input_ids"], ["inputs_embeds"]),
            ProgramJob("text_decoder", StaticCacheDecoder(m, r.max_context, cache_writes),
                       (torch.zeros(1, r.max_prompt, m.embed_width), pos[None].clone(), pos,
                        torch.tensor([r.max_prompt - 1]), caches),
                       ({1: seq}, {1: seq}, {0: seq}, None, [None] * len(caches)), in_names, out_names),
        ]


@dataclass
class ProgramJob:
    """One program to export: the module, example args, dynamic shapes and its I/O names."""

    name: str
    module: torch.nn.Module
    args: tuple
    dynamic_shapes: Optional[tuple]
    input_names: list[str]
    output_names: list[str]


def io_entry(name: str, shape, dtype: str) -> dict:
    return {"name": name, "shape": list(shape), "dtype": dtype}
