"""Calibration data for quantization: real images and questions, and the program inputs they produce.

The eager model runs each question once (prefill and a few greedy decode steps); what each program
received is recorded, so every target calibrates on the inputs its own programs will see: ExecuTorch's
decoder takes (embeds, start position), the static-cache decoder of ONNX / Core ML its padded prefill
and decode-step inputs with the caches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlmc.errors import VlmcError

DECODE_STEPS = 2  # greedy steps after each prefill: decode-time activations get calibrated too


@dataclass
class Calibration:
    images: list[np.ndarray] = field(default_factory=list)  # uint8 [3,H,W]
    decoder_calls: list[list[tuple[np.ndarray, int]]] = field(default_factory=list)  # per question: (embeds [1,T,D], start)
    static_decoder_inputs: list[list[np.ndarray]] = field(default_factory=list)  # text_decoder inputs, in call order
    visual_rows: list[tuple[int, int]] = field(default_factory=list)  # per question: the image tokens' rows [a, b)
    source: dict = field(default_factory=dict)


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


def _questions(options, image_size: int):
    from vlmc.eval.evaluate import jsonl_questions, shapes_vqa_questions

    if options.dataset == "shapes-vqa":
        return shapes_vqa_questions(options.split, options.n, image_size)
    return jsonl_questions(Path(options.dataset), options.n, image_size)


def calibration_images(options, image_size: int) -> list[np.ndarray]:
    """The calibration questions' images (uint8 [3,H,W]), for token passes that fix their choice from data."""
    check_source(options)
    return [q.image for q in _questions(options, image_size)]


def collect(model, tokenizer, recipe, image_tokens: int, shape) -> Calibration:
    """Run the eager model over the calibration questions and record every program's inputs."""
    from vlmc.runtimes.eager_runner import EagerSession

    class RecordingSession(EagerSession):
        """Keeps the text_decoder inputs the static-cache generation loop produces."""

        def __init__(self, *args):
            super().__init__(*args)
            self.recorded: list[list[np.ndarray]] = []

        def call(self, program, inputs):
            if program == "text_decoder":
                self.recorded.append([np.array(a) for a in inputs])
            return super().call(program, inputs)

    options, c = recipe.calibration, model.config
    check_source(options)
    session = RecordingSession(model, shape)
    cal = Calibration(source={"dataset": options.dataset, "n": options.n,
                              **({"split": options.split} if options.dataset == "shapes-vqa" else {})})
    for q in _questions(options, c.vision.image_size):
        unknown = tokenizer.unknown_words(q.question)
        if unknown:
            raise VlmcError(f"calibration {q.where}: words outside the model's vocabulary: {', '.join(dict.fromkeys(unknown))}")
        p = tokenizer.prompt(recipe.prompt_template, q.question, image_tokens, c.image_token_id, c.text.bos_token_id)
        if len(p) > recipe.max_prompt:
            raise VlmcError(f"calibration {q.where}: the prompt is {len(p)} tokens, over max_prompt {recipe.max_prompt}")
        parts = ([session.embed(p.before)] if p.before else []) + [session.vision(q.image)] + ([session.embed(p.after)] if p.after else [])
        embeds = np.concatenate(parts, axis=1)
        calls = [(embeds, 0)]
        logits = session.prefill(embeds)
        pos = embeds.shape[1]
        for _ in range(DECODE_STEPS):
            step = session.embed([int(np.argmax(logits))])
            calls.append((step, pos))
            logits = session.step(step, pos)
            pos += 1
        cal.images.append(q.image)
        cal.decoder_calls.append(calls)
        a = len(p.before)
        cal.visual_rows.append((a, a + image_tokens))
    cal.static_decoder_inputs = session.recorded
    return cal
