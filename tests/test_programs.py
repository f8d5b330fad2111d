"""The export programs compute what the eager model computes."""
import numpy as np
import pytest
import torch

from vlmc import passes
from vlmc.models_zoo import load
from vlmc.models_zoo.programs import ExecuTorchDecoder, StaticCacheDecoder, cache_shape, empty_caches
from vlmc.models_zoo.tokenizer import PromptIds
from vlmc.runtimes.base import DecoderShape
from vlmc.runtimes.eager_runner import EagerSession
from vlmc.runtimes.generate import generate


def _model(path):
    return load(str(path)).model


def _prompt_and_reference(m):
    """A prompt with 16 image tokens, its pixels, merged embeddings and the full-forward logits."""
    ids = torch.tensor([[1, 17, 18] + [4] * 16 + [19, 20, 21]])
    pixels = m.normalize(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8))
    with torch.no_grad():
        return ids, pixels, m.merge_embeddings(ids, m.encode_image(pixels)), m(ids, pixels)


def test_static_cache_decoder_matches_full_forward(tiny_ckpt):
    m = _model(tiny_ckpt)
    ids, pixels, embeds, ref = _prompt_and_reference(m)
    with torch.no_grad():
        n, padded_len, ctx = embeds.shape[1], 30, 40
        dec = StaticCacheDecoder(m, ctx)
        padded = torch.cat([embeds, torch.randn(1, padded_len - n, embeds.shape[2])], 1)  # garbage padding
        pos = torch.arange(padded_len)
        zeros = [torch.zeros(cache_shape(m, ctx)) for _ in range(4)]
        out = dec(padded, pos[None], pos, torch.tensor([n - 1]), zeros)
        assert (out[0] - ref[:, -1]).abs().max() < 1e-5
        nxt = torch.tensor([[9]])
        ref2 = m(torch.cat([ids, nxt], 1), pixels)[:, -1]
        step = dec(m.language_model.embed_tokens(nxt), torch.tensor([[n]]), torch.tensor([n]), torch.tensor([0]), list(out[1:]))
        assert (step[0] - ref2).abs().max() < 1e-5


def test_executorch_decoder_matches_full_forward_in_segments(tiny_ckpt):
    m = _model(tiny_ckpt)
    _, _, embeds, ref = _prompt_and_reference(m)
    with torch.no_grad():
        dec = ExecuTorchDecoder(m, 40)
        dec(embeds[:, :3], torch.tensor([0]))  # text, image, text: the stock runner's segments
        dec(embeds[:, 3:19], torch.tensor([3]))
        logits = dec(embeds[:, 19:], torch.tensor([19]))
    assert (logits - ref[:, -1]).abs().max() < 1e-5


def test_padded_prefill_gives_eager_answers_for_any_prompt_length(tiny_ckpt):
    m = _model(tiny_ckpt)
    t = m.config.text
    session = EagerSession(m, DecoderShape(t.num_layers, t.num_kv_heads, t.head_dim, t.hidden_size, 64, 40))
    image = np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    for after in ([20], [20, 21, 22, 23, 24], list(range(20, 42))):
        prompt = PromptIds([1, 17], after, 16, 4)
        got = generate(session, prompt, image, 6, eos_ids=()).tokens
        # reference: eager decoding with a growing cache, no padding at all
        with torch.no_grad():
            embeds = m.merge_embeddings(torch.tensor([prompt.ids]), m.encode_image(m.normalize(torch.from_numpy(image))))
            n = embeds.shape[1]
            logits, past = m.decode(embeds, torch.arange(n)[None], None)
            want = []
            for i in range(6):
                tok = int(logits[0, -1].argmax())
                want.append(tok)
                logits, past = m.decode(m.language_model.embed_tokens(torch.tensor([[tok]])), torch.tensor([[n + i]]), past)
        assert got == want, f"prompt of {len(prompt)} tokens"


def _turns(m, decoder, caches, g):
    """A first prompt at slot 0, a second turn's prompt after it, two decode steps: each call's logits."""
    logits, width = [], m.config.text.hidden_size
    for start, rows in ((0, 12), (12, 7), (19, 1), (20, 1)):
        pos = torch.arange(start, start + rows)
        out = decoder(torch.randn(1, rows, width, generator=g), pos[None], pos, torch.tensor([rows - 1]), caches)
        logits.append(out[0])
        caches = list(out[1:])
    return logits, caches


@pytest.mark.parametrize("kv", ["float", "int8"])
def test_scattered_cache_writes_equal_the_blend(tiny_ckpt, kv):
    """TVM's decoder form (rows scattered, every slot read) gives the blend's logits and caches exactly."""
    m = _model(tiny_ckpt).eval()
    if kv == "int8":
        passes.apply(m, [{"name": "kv8"}])
    ctx = 40
    with torch.no_grad():
        blend = _turns(m, StaticCacheDecoder(m, ctx), empty_caches(m, ctx), torch.Generator().manual_seed(0))
        scatter = _turns(m, StaticCacheDecoder(m, ctx, cache_writes="scatter"), empty_caches(m, ctx),
                         torch.Generator().manual_seed(0))
    for a, b in zip(blend[0] + blend[1], scatter[0] + scatter[1]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="cache_writes 'inplace'"):
        StaticCacheDecoder(m, ctx, cache_writes="inplace")


@pytest.mark.parametrize("kv", ["float", "int8"])
def test_the_filled_slot_form_reads_no_slot_past_the_last_written_one(tiny_ckpt, kv):
    """onnxruntime's decoder form: the same logits and caches as the static one, and the unwritten slots
    are never read (NaN there would reach every output of the masked static form through P @ V)."""
    m = _model(tiny_ckpt).eval()
    if kv == "int8":
        passes.apply(m, [{"name": "kv8"}])
    ctx = 40
    with torch.no_grad():
        static, static_caches = _turns(m, StaticCacheDecoder(m, ctx), empty_caches(m, ctx), torch.Generator().manual_seed(0))
        filled, filled_caches = _turns(m, StaticCacheDecoder(m, ctx, cache_writes="filled"), empty_caches(m, ctx),
                                       torch.Generator().manual_seed(0))
        for a, b in zip(static + static_caches, filled + filled_caches):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        poisoned = [c.clone() for c in empty_caches(m, ctx)]
        for c in poisoned:
            if c.is_floating_point():
                c.fill_(float("nan"))
        logits, caches = _turns(m, StaticCacheDecoder(m, ctx, cache_writes="filled"), poisoned, torch.Generator().manual_seed(0))
    for a, b in zip(logits, filled):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for c in caches:  # the 21 written slots hold what the clean run wrote; the rest were carried untouched
        assert not c[:, :, :21].isnan().any() and (c[:, :, 21:].isnan().all() or not c.is_floating_point())
