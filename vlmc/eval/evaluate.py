"""Accuracy of a bundle (on any runtime) or a model (eager) on ShapesVQA or a user's questions.jsonl.

Reports accuracy overall and per question type with Wilson 95% intervals, agreement with the
uncompressed model's answers, the mean KL divergence of the first answer token's distribution from the
uncompressed model's, and the wall time.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from vlmc.errors import VlmcError
from vlmc.models_zoo.tokenizer import TextTokenizer

MAX_ANSWER_TOKENS = 4


@dataclass
class Question:
    image: np.ndarray  # uint8 [3,H,W] (or [k,3,H,W] tiles) at the size asked for (the uncompressed model's, in eval)
    question: str
    answer: str
    qtype: str
    where: str  # "shapes-vqa test #12" or "questions.jsonl line 3", for error messages
    path: Optional[Path] = None  # the image file, read again at another size
    resize: Optional[dict] = None  # the family's resize rule the image was read with
    original: Optional[np.ndarray] = None  # a rendered image [3,H,W] (ShapesVQA), resized again for another size

    def image_at(self, size: int, rule: Optional[dict] = None) -> np.ndarray:
        """The image at size x size by `rule`: a bundle whose resolution pass lowered its input, or whose
        tile grid differs, reads the file itself at its size (ShapesVQA's rendered image is resized), as
        `vlmc run` would."""
        if self.image.shape[-1] == size and rule == self.resize:
            return self.image
        from vlmc.runtimes.image import load_image, resize_array

        if self.path:
            return load_image(self.path, size, rule)
        return resize_array(self.original if self.original is not None else self.image, size, rule)


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion, in percent."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (round(max(0.0, 100 * (centre - half)), 2), round(min(100.0, 100 * (centre + half)), 2))


def normalize_answer(text: str) -> str:
    return re.sub(r"[^\w\s]", "", text.lower()).strip()


def shapes_vqa_questions(split: str, n: int, image_size: int, resize: Optional[dict] = None) -> Iterator[Question]:
    """ShapesVQA items; rendered at 112px, resized by the family's rule to a model that takes another size."""
    from vlmc.eval import shapes_vqa

    if n < 1:
        raise VlmcError(f"shapes-vqa split {split!r}: --n must be at least 1")
    for i, item in enumerate(shapes_vqa.items(split, n)):
        rendered = np.ascontiguousarray(item.image.transpose(2, 0, 1))
        q = Question(rendered, item.question, item.answer, item.qtype, f"shapes-vqa {split} #{i}", original=rendered)
        yield Question(q.image_at(image_size, resize), q.question, q.answer, q.qtype, q.where, None, resize, rendered)


def jsonl_questions(path: Path, n: Optional[int], image_size: int, resize: Optional[dict] = None) -> Iterator[Question]:
    """Lines of {"image": path relative to the file, "question": ..., "answer": ..., "type": optional};
    images resized by the model family's rule (`resize`, see vlmc.runtimes.image)."""
    from vlmc.runtimes.image import load_image

    if not path.is_file():
        raise VlmcError(f"dataset {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise VlmcError(f"dataset {path}: not UTF-8 text (byte {e.start})") from None
    lines = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    if not lines:
        raise VlmcError(f"dataset {path}: no questions")
    for lineno, line in lines[:n] if n is not None else lines:
        where = f"{path.name} line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise VlmcError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row.get(k) for k in ("image", "question", "answer")):
            raise VlmcError(f"{where}: needs non-empty string fields image, question, answer")
        image_path = (path.parent / row["image"])
        try:
            image = load_image(image_path, image_size, resize)
        except VlmcError as e:
            raise VlmcError(f"{where}: {e}") from None
        yield Question(image, row["question"], row["answer"], str(row.get("type", "all")), where, image_path, resize)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max()
    e = np.exp(z)
    return e / e.sum()


class Answerer:
    """Greedy answers and first-token distributions from one session."""

    def __init__(self, session, tokenizer: TextTokenizer, prompt_info: dict):
        self.session, self.tok, self.p = session, tokenizer, prompt_info

    def __call__(self, q: Question) -> tuple[str, np.ndarray]:
        from vlmc.runtimes.generate import generate

        p = self.p
        unknown = self.tok.unknown_words(q.question)
        if unknown:
            raise VlmcError(f"{q.where}: words outside the model's vocabulary: {', '.join(dict.fromkeys(unknown))}")
        ids = self.tok.prompt(p["template"], q.question, p["num_image_tokens"], p["image_token_id"], p["bos_token_id"])
        image = q.image_at(p["image_size"], p.get("image_resize"))
        gen = generate(self.session, ids, image, MAX_ANSWER_TOKENS, set(p["eos_token_ids"]))
        return normalize_answer(self.tok.decode(gen.tokens)), _softmax(gen.first_logits)


def evaluate(answer: Callable, reference: Optional[Callable], questions: Iterator[Question],
             progress: Optional[Callable[[str], None]] = None, tick: Optional[Callable[[int, str], None]] = None) -> dict:
    """Score `answer` on `questions`; compare with `reference` (the uncompressed model) when given."""
    t0 = time.perf_counter()
    per_type: dict[str, list[int]] = {}
    agree, kls, n = 0, [], 0
    for q in questions:
        got, probs = answer(q)
        ok = int(got == normalize_answer(q.answer))
        per_type.setdefault(q.qtype, []).append(ok)
        if reference is not None:
            ref_answer, ref_probs = (got, probs) if reference is answer else reference(q)
            agree += int(got == ref_answer)
            kls.append(float(np.sum(ref_probs * (np.log(ref_probs + 1e-12) - np.log(probs + 1e-12)))))
        n += 1
        if tick:  # after every question: a progress bar's count and the running accuracy
            tick(n, f"{100 * sum(map(sum, per_type.values())) / n:.1f}% correct")
        elif progress and n % 200 == 0:
            progress(f"{n} questions, {100 * sum(map(sum, per_type.values())) / n:.1f}% correct")
    if n == 0:
        raise VlmcError("the dataset gave no questions")
    correct = sum(map(sum, per_type.values()))
    result = {
        "n": n, "accuracy": round(100 * correct / n, 2), "ci95": wilson(correct, n),
        "per_type": {t: {"n": len(v), "accuracy": round(100 * sum(v) / len(v), 2), "ci95": wilson(sum(v), len(v))}
                     for t, v in sorted(per_type.items())},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if reference is not None:
        result["agreement"] = round(100 * agree / n, 2)
        result["mean_kl"] = float(np.mean(kls))
    return result
