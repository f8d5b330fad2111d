"""Greedy generation over the static cache, the same loop on every runtime."""
from __future__ import annotations

import time

import numpy as np

from vlmc.models_zoo.tokenizer import PromptIds
from vlmc.runtimes.base import Generation, Session


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def generate(session: Session, prompt: PromptIds, image_u8: np.ndarray, max_new_tokens: int, eos_ids) -> Generation:
    """Image + prompt ids -> greedy tokens (EOS excluded), with the time of each stage."""
    session.check_prompt_length(len(prompt))
    gen = Generation(tokens=[], prompt_tokens=len(prompt))
    t0 = time.perf_counter()
    image_embeds = session.vision(image_u8)
    gen.vision_ms = _ms(t0)
    t0 = time.perf_counter()
    parts = [session.embed(prompt.before)] if prompt.before else []
    parts.append(image_embeds)
    if prompt.after:
        parts.append(session.embed(prompt.after))
    gen.embed_ms = _ms(t0)
    t0 = time.perf_counter()
    logits = session.prefill(np.concatenate(parts, axis=1), image_start=len(prompt.before))
    gen.prefill_ms = _ms(t0)
    gen.first_logits = logits
    pos = len(prompt)
    budget = min(max_new_tokens, session.shape.max_context - pos)
    while len(gen.tokens) < budget:
        token = int(np.argmax(logits))
        if token in eos_ids:
            break
        gen.tokens.append(token)
        if len(gen.tokens) == budget:
            break
        t0 = time.perf_counter()
        logits = session.step(session.embed([token]), pos)
        gen.decode_ms.append(_ms(t0))
        pos += 1
    return gen
