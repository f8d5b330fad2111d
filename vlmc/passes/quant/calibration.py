"""Calibration data for quantization: real images and questions, and the program inputs they produce.

The eager model runs each question once (prefill and a few greedy decode steps); what each program
received is recorded, so every target calibrates on the inputs its own programs will see: ExecuTorch's
decoder takes (embeds, start position), the static-cache decoder of ONNX / Core ML its padded prefill
and decode-step inputs with the caches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from vlmc.errors import VlmcError

DECODE_STEPS = 2  # greedy steps after each prefill: decode-time activations get calibrated too


@dataclass
class ZeroTail:
    """A 4-D input kept up to its last non-zero slot (axis -2): a static KV cache holds the prompt's rows and
    zeros after them. Recorded in full, a 220M model's 60 caches of 768 slots made 3.3 GB for 32 questions."""

    head: np.ndarray
    shape: tuple

    @classmethod
    def of(cls, a: np.ndarray):
        a = np.asarray(a)
        if a.ndim != 4:
            return np.array(a)
        written = np.flatnonzero(np.any(a != 0, axis=(0, 1, 3)))
        return cls(np.array(a[..., :int(written[-1]) + 1 if written.size else 0, :]), a.shape)

    def full(self) -> np.ndarray:
        out = np.zeros(self.shape, self.head.dtype)
        out[..., :self.head.shape[-2], :] = self.head
        return out


@dataclass
class Calibration:
    images: list[np.ndarray] = field(default_factory=list)  # uint8 [3,H,W]: what the vision_encoder takes (each tile)
    decoder_calls: list[list[tuple[np.ndarray, int]]] = field(default_factory=list)  # per question: (embeds [1,T,D], start)
    static_decoder_inputs: list[list] = field(default_factory=list)  # text_decoder inputs, in call order (caches as ZeroTail)
    static_prefill_inputs: list[list] = field(default_factory=list)  # text_prefill's (in-LLM token stages)
    visual_rows: list[tuple[tuple[int, int], ...]] = field(default_factory=list)  # per question: each image run's rows [a, b)
    source: dict = field(default_factory=dict)

    def static_inputs(self, program: str):
        """The static-cache `program`'s recorded inputs, one call at a time, caches rebuilt to full size."""
        for inputs in self.static_prefill_inputs if program == "text_prefill" else self.static_decoder_inputs:
            yield [a.full() if isinstance(a, ZeroTail) else a for a in inputs]


def check_source(options) -> None:
    """Refuse a calibration source that cannot give `n` questions, before any work."""
    if options.dataset == "shapes-vqa":
        return
    path = Path(options.dataset)
    if path.suffix != ".jsonl":
        raise VlmcError(f"recipe field 'calibration.dataset': {options.dataset!r} is neither shapes-vqa nor a .jsonl file")
    if not path.is_file():
        raise VlmcError(f"recipe field 'calibration.dataset': {path}: no such file")
    lines = sum(1 for line in path.read_text().splitlines() if line.strip())
    if lines < options.n:
        raise VlmcError(f"recipe field 'calibration.n': {path} has {lines} questions, fewer than the {options.n} asked "
                        "(lower calibration.n or add questions)")


def _questions(options, image_size: int, resize=None):
    from vlmc.eval.evaluate import jsonl_questions, shapes_vqa_questions

    if options.dataset == "shapes-vqa":
        return shapes_vqa_questions(options.split, options.n, image_size, resize)
    return jsonl_questions(Path(options.dataset), options.n, image_size, resize)


def calibration_images(options, image_size: int, resize=None) -> list[np.ndarray]:
    """The calibration questions' images (uint8 [3,H,W], or [k,3,H,W] tiles), for token passes that fix
    their choice from data."""
    check_source(options)
    return [q.image for q in _questions(options, image_size, resize)]


class CalibrationSource:
    """The recipe's calibration questions, for token passes that fix a choice from data: calling it gives
    the images (uint8 [3,H,W]); `prompts(model)` the whole prompts as `model`, with the stages inserted so
    far, embeds them: (embeds [1,T,D], the first image row, the last row)."""

    def __init__(self, recipe, tokenizer, model):
        self.options, self.template, self.tokenizer = recipe.calibration, recipe.prompt_template, tokenizer
        self.config, self.model = model.config, model

    @property
    def image_size(self) -> int:  # read when used: the resolution pass may have lowered it since
        return self.model.image_size

    @property
    def resize(self) -> dict:
        return self.model.image_resize

    def __call__(self) -> list[np.ndarray]:
        return calibration_images(self.options, self.image_size, self.resize)

    def _encoded(self, model):
        """Per question: (normalised pixels, its Prompt, the image embeddings), under no_grad."""
        check_source(self.options)
        c = self.config
        with torch.no_grad():
            for q in _questions(self.options, self.image_size, self.resize):
                unknown = self.tokenizer.unknown_words(q.question)
                if unknown:
                    raise VlmcError(f"calibration {q.where}: words outside the model's vocabulary: {', '.join(dict.fromkeys(unknown))}")
                pixels = model.normalize(torch.from_numpy(q.image))
                image = model.encode_image(pixels)
                yield pixels, self.tokenizer.prompt(self.template, q.question, image.shape[1], c.image_token_id,
                                                    c.text.bos_token_id), image

    def prompts(self, model) -> list[tuple[torch.Tensor, int, int]]:
        with torch.no_grad():
            return [(model.merge_embeddings(torch.tensor([p.ids]), image), len(p.before), len(p) - 1)
                    for _, p, image in self._encoded(model)]

    def questions(self, model) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(normalised pixels [k,3,H,W], prompt ids [1,T]) per question: what the whole model takes."""
        return [(pixels, torch.tensor([p.ids])) for pixels, p, _ in self._encoded(model)]


def collect(model, tokenizer, recipe, image_tokens: int, shape) -> Calibration:
    """Run the eager model over the calibration questions and record every program's inputs."""
    from vlmc.runtimes.eager_runner import EagerSession
    from vlmc.runtimes.generate import encode_image, prompt_embeds
    from vlmc.runtimes.image import tiles

    class RecordingSession(EagerSession):
        """Keeps the text_decoder (and text_prefill) inputs the static-cache generation loop produces."""

        def __init__(self, *args):
            super().__init__(*args)
            self.recorded: dict[str, list[list[np.ndarray]]] = {"text_decoder": [], "text_prefill": []}

        def call(self, program, inputs):
            if program in self.recorded:
                self.recorded[program].append([ZeroTail.of(a) for a in inputs])
            return super().call(program, inputs)

    options, c = recipe.calibration, model.config
    check_source(options)
    session = RecordingSession(model, shape)
    cal = Calibration(source={"dataset": options.dataset, "n": options.n,
                              **({"split": options.split} if options.dataset == "shapes-vqa" else {})})
    for q in _questions(options, model.image_size, model.image_resize):
        unknown = tokenizer.unknown_words(q.question)
        if unknown:
            raise VlmcError(f"calibration {q.where}: words outside the model's vocabulary: {', '.join(dict.fromkeys(unknown))}")
        p = tokenizer.prompt(recipe.prompt_template, q.question, image_tokens, c.image_token_id, c.text.bos_token_id)
        if len(p) > recipe.max_prompt:
            raise VlmcError(f"calibration {q.where}: the prompt is {len(p)} tokens, over max_prompt {recipe.max_prompt}")
        embeds = prompt_embeds(session, p, encode_image(session, q.image))
        calls = [(embeds, 0)]
        logits = session.prefill(embeds, image_start=len(p.before))
        pos = embeds.shape[1]
        for _ in range(DECODE_STEPS):
            step = session.embed([int(np.argmax(logits))])
            calls.append((step, pos))
            logits = session.step(step, pos)
            pos += 1
        cal.images += tiles(q.image)
        cal.decoder_calls.append(calls)
        cal.visual_rows.append(p.run_rows())
    cal.static_decoder_inputs = session.recorded["text_decoder"]
    cal.static_prefill_inputs = session.recorded["text_prefill"]
    return cal


@dataclass
class LayerInputs:
    """What one linear layer received over the calibration set, visual and text rows kept apart: the
    second moments E[x x^T] (GPTQ's Hessian, MASQuant's whitening) and each channel's largest |x|
    (SmoothQuant's factors)."""

    visual: torch.Tensor  # sum of x x^T over visual rows [in, in], float64
    text: torch.Tensor
    visual_absmax: torch.Tensor  # [in]
    text_absmax: torch.Tensor
    n_visual: int = 0
    n_text: int = 0
    keep_rows: int = 0  # a uniform sample of at most this many input rows is kept (Quant Experts clusters them)
    rows: Optional[torch.Tensor] = None

    @classmethod
    def empty(cls, dim: int, keep_rows: int = 0) -> "LayerInputs":
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        return cls(z(dim, dim), z(dim, dim), z(dim), z(dim), keep_rows=keep_rows)

    def add(self, x: torch.Tensor, visual: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        if self.keep_rows:
            self._keep(x.float())
        for rows, moments, peak in ((x[visual], self.visual, self.visual_absmax), (x[~visual], self.text, self.text_absmax)):
            moments += rows.T @ rows
            if len(rows):
                torch.maximum(peak, rows.abs().amax(0), out=peak)
        self.n_visual += int(visual.sum())
        self.n_text += int((~visual).sum())

    def _keep(self, x: torch.Tensor) -> None:
        """Reservoir sampling: after n rows, each is in the sample with probability keep_rows / n."""
        seen = self.n_visual + self.n_text
        if self.rows is None:
            self.rows = x.new_zeros(0, x.shape[1])
        room = max(0, self.keep_rows - len(self.rows))
        self.rows = torch.cat([self.rows, x[:room]])
        rest = x[room:]
        if len(rest):
            g = torch.Generator().manual_seed(seen)
            slot = (torch.rand(len(rest), generator=g) * (seen + room + torch.arange(1, len(rest) + 1))).long()
            hit = slot < self.keep_rows
            self.rows[slot[hit]] = rest[hit]

    def sample(self) -> torch.Tensor:
        """The kept input rows [n, in] (float32)."""
        return self.rows if self.rows is not None else torch.zeros(0, len(self.visual_absmax))

    def hessian(self, text_share: Optional[float]) -> torch.Tensor:
        """E[x x^T] over all rows as they come (text_share None: plain GPTQ), or the two modalities'
        normalised moments mixed with `text_share` for the text (the modality-aware Hessian)."""
        if text_share is None or not self.n_visual or not self.n_text:
            return (self.visual + self.text) / max(1, self.n_visual + self.n_text)
        return (1 - text_share) * self.visual / self.n_visual + text_share * self.text / self.n_text


def layer_inputs(model, layers: list[tuple[str, "torch.nn.Linear"]], calibration: Calibration,
                 keep_rows: int = 0) -> dict[str, LayerInputs]:
    """Run the float model over the calibration questions and keep what every listed layer received
    (the vision tower and projector see only visual rows; the decoder both, told apart by position), with a
    sample of up to `keep_rows` input rows per layer."""
    stats = {name: LayerInputs.empty(m.in_features, keep_rows) for name, m in layers}
    current: dict[str, Optional[torch.Tensor]] = {"visual": None}  # the decoder call's visual rows [T]; None: all

    def hook(name):
        def record(_module, args):
            x = args[0].detach()
            rows = current["visual"]
            visual = torch.ones(x.shape[:-1], dtype=torch.bool) if rows is None else rows.expand(x.shape[:-1])
            stats[name].add(x, visual.reshape(-1))
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers]
    try:
        with torch.no_grad():
            for image in calibration.images:
                model.encode_image(model.normalize(torch.from_numpy(image)[None].float()))
            for calls, runs in zip(calibration.decoder_calls, calibration.visual_rows):
                embeds = torch.from_numpy(np.concatenate([e for e, _ in calls], axis=1))
                current["visual"] = torch.zeros(embeds.shape[1], dtype=torch.bool)
                for a, b in runs:
                    current["visual"][a:b] = True
                model.decode(embeds, torch.arange(embeds.shape[1])[None], None)
    finally:
        for h in handles:
            h.remove()
    return stats
