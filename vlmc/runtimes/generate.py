"""Greedy generation over the static cache, the same loop on every runtime."""
from __future__ import annotations

import time

import numpy as np

from vlmc.errors import VlmcError
from vlmc.models_zoo.tokenizer import PromptIds
from vlmc.runtimes.base import Generation, Session
from vlmc.runtimes.image import tiles


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def encode_image(session: Session, image_u8: np.ndarray) -> list[np.ndarray]:
    """The vision_encoder's embeddings [1,N,D] of each image it runs on: one, or each tile of [k,3,H,W]."""
    return [session.vision(tile) for tile in tiles(image_u8)]


def prompt_embeds(session: Session, prompt: PromptIds, image_embeds: list[np.ndarray]) -> np.ndarray:
    """The decoder's input rows [1,T,D]: the prompt's text pieces (embedded in one token_embedding call)
    with the image runs between them, one run per tile."""
    if len(image_embeds) != prompt.runs:
        raise VlmcError(f"the prompt template has {prompt.runs} image runs but the image gives {len(image_embeds)} "
                        "(the bundle's prompt.image_tiles)")
    text_rows = session.embed(prompt.text_ids) if prompt.text_ids else None
    parts, start = [], 0
    for i, text in enumerate(prompt.texts):
        if text:
            parts.append(text_rows[:, start: start + len(text)])
            start += len(text)
        if i < len(image_embeds):
            parts.append(image_embeds[i])
    return np.concatenate(parts, axis=1)


def generate(session: Session, prompt: PromptIds, image_u8: np.ndarray, max_new_tokens: int, eos_ids) -> Generation:
    """Image (or its tiles) + prompt ids -> greedy tokens (EOS excluded), with the time of each stage."""
    session.check_prompt_length(len(prompt))
    gen = Generation(tokens=[], prompt_tokens=len(prompt))
    t0 = time.perf_counter()
    image_embeds = encode_image(session, image_u8)
    gen.vision_ms = _ms(t0)
    t0 = time.perf_counter()
    embeds = prompt_embeds(session, prompt, image_embeds)
    gen.embed_ms = _ms(t0)
    t0 = time.perf_counter()
    logits = session.prefill(embeds, image_start=len(prompt.before))
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


def record(gen: Generation, with_logits: bool = False) -> dict:
    """A generation's tokens and stage timings, as `vlmc run` reports them (and the first token's logits)."""
    logits = {"first_logits": gen.first_logits.astype(float).tolist()} if with_logits else {}
    return {**logits, "tokens": gen.tokens, "prompt_tokens": gen.prompt_tokens,
            "timings": {"vision_ms": round(gen.vision_ms, 3), "embed_ms": round(gen.embed_ms, 3),
                        "prefill_ms": round(gen.prefill_ms, 3), "time_to_first_token_ms": round(gen.time_to_first_token_ms, 3),
                        "decode_ms_per_token": round(sum(gen.decode_ms) / len(gen.decode_ms), 3) if gen.decode_ms else None}}


def generate_on(bundle_path: str, runtime: str, prompt: dict, image_u8: np.ndarray, max_new_tokens: int,
                with_logits: bool = False) -> dict:
    """Open the bundle on an artifact runtime and generate: what a device runs for `vlmc run --device`."""
    from vlmc.bundle import Bundle
    from vlmc.runtimes import open_session

    bundle = Bundle(bundle_path)
    gen = generate(open_session(bundle, runtime), PromptIds(**prompt), image_u8, max_new_tokens,
                   set(bundle.manifest["prompt"]["eos_token_ids"]))
    return record(gen, with_logits)
