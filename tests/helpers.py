"""Tiny checkpoints the tests build themselves (nothing is downloaded)."""
from __future__ import annotations

import json
from pathlib import Path

WORDS = ["what", "color", "is", "the", "circle", "square", "?", "red", "blue", "green", "yes", "no", "USER", "ASSISTANT", ":"]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]


def write_wordlevel_tokenizer(directory: Path, words=WORDS, vocab_size: int | None = None) -> dict[str, int]:
    """A WordLevel tokenizer.json that both HF tokenizers and ExecuTorch's C++ loader read."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    pieces = SPECIALS + list(words)
    if vocab_size:
        pieces += [f"tok{i}" for i in range(len(pieces), vocab_size)]
    vocab = {w: i for i, w in enumerate(pieces)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="removed", invert=True)
    tok.add_special_tokens(SPECIALS)
    directory.mkdir(parents=True, exist_ok=True)
    data = json.loads(tok.to_str())
    data["model"]["merges"] = []
    (directory / "tokenizer.json").write_text(json.dumps(data))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False}))
    return vocab


def make_hf_llava(directory: Path, seed: int = 0, vocab_size: int = 64, tie: bool = False, feature_layer: int = -2):
    """Save a tiny random transformers LlavaForConditionalGeneration with save_pretrained."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                       image_size=32, patch_size=8).to_dict(),
        text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=vocab_size, tie_word_embeddings=tie,
                                bos_token_id=1, eos_token_id=2).to_dict(),
        image_token_id=4, vision_feature_layer=feature_layer, tie_word_embeddings=tie,
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger than the default init, so differences would show in the logits
        for p in model.parameters():
            p.normal_(0, 0.15)
    model.save_pretrained(directory)
    write_wordlevel_tokenizer(directory, vocab_size=vocab_size)
    return model


SPACED_TEMPLATE = "USER : <image> {prompt} ASSISTANT :"


def three_target_bundle(ckpt, passes: list, out):
    """A bundle of the tiny checkpoint with `passes` on onnx, executorch and coreml (the conformance set)."""
    from vlmc import api

    return api.compile({"model": str(ckpt), "targets": ["onnx", "executorch", "coreml"], "max_context": 48,
                        "prompt_template": SPACED_TEMPLATE, "passes": passes}, out)


IDEFICS3_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<fake_token_around_image>", "<global-img>",
                     "<end_of_utterance>", "<|im_start|>"] + [f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)]
IDEFICS3_WORDS = ["User", "Assistant", ":"] + WORDS[:12]


def write_hf5_tokenizer(directory: Path, specials: list[str], words: list[str], vocab_size: int, bos: bool):
    """A WordLevel tokenizer saved by transformers 5's PreTrainedTokenizerFast.save_pretrained (the BOS
    rule lands in tokenizer.json's post-processor, not in tokenizer_config.json)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = specials + words
    pieces += [f"tok{i}" for i in range(len(pieces), vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(pieces)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="removed", invert=True)
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", add_bos_token=bos)
    fast.save_pretrained(directory)
    data = json.loads((directory / "tokenizer.json").read_text())
    data["model"].setdefault("merges", [])  # ExecuTorch's HF tokenizer loader requires the key
    (directory / "tokenizer.json").write_text(json.dumps(data))
    return fast


def make_hf_idefics3(directory: Path, seed: int = 0, model_type: str = "smolvlm", tie: bool = False, kv_heads: int = 2,
                     image_size: int = 32, patch_size: int = 4, scale_factor: int = 2, bos: bool = True, vocab_size: int = 64,
                     splitting: bool = False):
    """Save a tiny random transformers Idefics3 / SmolVLM model, its image processor (longest edge 2x the
    tile; one global tile, or with `splitting` up to 2x2 tiles plus the global one) and a transformers-5
    tokenizer (with the 2x2 grid's <row_R_col_C> pieces); returns (model, processor)."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.idefics3 import Idefics3ImageProcessorPil, Idefics3Processor

    torch.manual_seed(seed)
    config_class, model_class = ((SmolVLMConfig, SmolVLMForConditionalGeneration) if model_type == "smolvlm"
                                 else (Idefics3Config, Idefics3ForConditionalGeneration))
    cfg = config_class(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": image_size, "patch_size": patch_size},
        text_config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": kv_heads, "vocab_size": vocab_size,
                     "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2},
        scale_factor=scale_factor, image_token_id=4, tie_word_embeddings=tie,
    )
    model = model_class(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
    model.save_pretrained(directory)
    tokenizer = write_hf5_tokenizer(directory, IDEFICS3_SPECIALS, IDEFICS3_WORDS, vocab_size, bos)
    seq = (image_size // patch_size // scale_factor) ** 2
    images = Idefics3ImageProcessorPil(size={"longest_edge": 2 * image_size}, max_image_size={"longest_edge": image_size},
                                       do_image_splitting=splitting)
    images.save_pretrained(directory)
    processor = Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=seq)
    return model, processor


def parity_errors(hf, ours, ids, pixels, **hf_inputs) -> tuple[float, float, float]:
    """Max |vlmc - transformers| of a prompt's logits three ways: the whole prompt without a cache, the
    prefill through the growing cache, and one cached decode step. `pixels` are vlmc's, `hf_inputs` what
    the transformers model takes for the image (pixel_values, masks)."""
    import torch

    with torch.no_grad():
        out = hf(input_ids=ids, use_cache=True, **hf_inputs)
        whole = (ours(ids, pixels) - out.logits).abs().max().item()
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        hf_step = hf(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
        embeds = ours.merge_embeddings(ids, ours.encode_image(pixels))
        n = embeds.shape[1]
        logits, past = ours.decode(embeds, torch.arange(n)[None], None)
        step, _ = ours.decode(ours.embed_text(nxt), torch.tensor([[n]]), past)
    return whole, (logits - out.logits).abs().max().item(), (step[:, -1] - hf_step).abs().max().item()


def stock_runner_pieces(bundle, image_path, question: str, bos_piece: str = "", max_new_tokens: int = 6) -> list[str]:
    """The pieces ExecuTorch's stock MultimodalRunner generates for a bundle: the template's text before the
    image, the image, the text after it, as an app feeds them (the app writes the BOS piece, as a chat
    template does; the stock runner encodes text as given)."""
    import torch
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (the llama:: kernels)
    from executorch.extension.llm.runner import GenerationConfig, MultimodalRunner, make_image_input, make_text_input

    from vlmc.runtimes.image import load_image

    p = bundle.manifest["prompt"]
    before, after = p["template"].replace("{prompt}", question).split("<image>")
    if p["add_bos"]:
        before = bos_piece + before
    runner = MultimodalRunner(str(bundle.path / "model.pte"), str(bundle.path / "tokenizer.json"))
    image = torch.from_numpy(load_image(image_path, p["image_size"], p["image_resize"]))
    pieces = []
    runner.generate([make_text_input(before), make_image_input(image), make_text_input(after)],
                    GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, echo=False), token_callback=pieces.append)
    return [x for x in pieces if x and x not in ("</s>",)]


def assert_cache_decode_matches(hf, ours, ids, pixels, out, tol: float = 1e-4) -> None:
    """Our eager decode with a growing cache against transformers' logits `out` of the whole prompt: prefill
    to the middle of the question, the rest of the prompt row by row, then one new token against
    transformers' own cache (the last logits compared)."""
    import torch

    with torch.no_grad():
        embeds = ours.merge_embeddings(ids, ours.encode_image(pixels))
        assert embeds.shape[-1] == ours.embed_width
        n, cut = embeds.shape[1], embeds.shape[1] - 4
        logits, past = ours.decode(embeds[:, :cut], torch.arange(cut)[None], None)
        rows = [logits]
        for r in range(cut, n):
            step, past = ours.decode(embeds[:, r:r + 1], torch.tensor([[r]]), past)
            rows.append(step)
        assert (torch.cat(rows, 1) - out.logits).abs().max().item() <= tol
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        hf_step = hf(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
        step, _ = ours.decode(ours.embed_text(nxt), torch.tensor([[n]]), past)
    assert (step[:, -1] - hf_step).abs().max().item() <= tol


def assert_programs_continue_the_prefill(m, embeds, image_start: int, n_image: int, max_context: int = 40,
                                         steps: int = 3) -> tuple[list[int], list[int]]:
    """A model with in-LLM stages: its eager whole-prompt prefill (growing caches), the static-cache
    `text_prefill` (right-padded, as Core ML runs it) and ExecuTorch's prefill method give the same logits,
    and `steps` greedy decode steps continue them alike on the static-cache and ExecuTorch decoders.
    Returns the eager caches' lengths and the static caches' lengths per layer."""
    import torch

    from vlmc.models_zoo.core import PromptRows
    from vlmc.models_zoo.programs import ExecuTorchDecoder, StaticCacheDecoder, StaticCachePrefill
    from vlmc.runtimes.base import DecoderShape

    close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # noqa: E731
    t, start = embeds.shape[1], torch.tensor([image_start])
    with torch.no_grad():
        ref, past = m.decode(embeds, torch.arange(t)[None], None, PromptRows(start, n_image, torch.tensor([t - 1])))
        eager_lengths = [p[0].shape[2] for p in past]
        out = StaticCachePrefill(m, max_context)(torch.cat([embeds, torch.zeros(1, 4, embeds.shape[2])], 1), start,
                                                 torch.tensor([t - 1]))
        static_lengths = [out[1 + o].shape[2] for o in DecoderShape.of_model(m, max_context, max_context).cache_offsets()]
        close(out[0][0], ref[0, -1])
        et = ExecuTorchDecoder(m, max_context)
        close(et.prefill(embeds, start)[0], ref[0, -1])
        caches, decoder = list(out[1:]), StaticCacheDecoder(m, max_context)
        for step in range(steps):
            nxt = m.embed_text(ref[:, -1].argmax(-1, keepdim=True))
            p = t + step
            ref, past = m.decode(nxt, torch.tensor([[p]]), past)
            got, *caches = decoder(nxt, torch.tensor([[p]]), torch.tensor([p]), torch.tensor([0]), caches)
            close(got[0], ref[0, -1])
            close(et(nxt, torch.tensor([p]))[0], ref[0, -1])
    return eager_lengths, static_lengths


def tiny_pass_model(ckpt, specs: list, image_tokens: int):
    """The tiny checkpoint with `specs` applied, the spaced template's prompt with `image_tokens` image rows
    (USER : <image>xN what color is the ASSISTANT :) and seeded pixels: (model, records, ids, pixels)."""
    import torch

    from vlmc import passes
    from vlmc.models_zoo import load

    m = load(str(ckpt)).model.eval()
    records, _ = passes.apply(m, specs)
    ids = torch.tensor([[12, 14] + [4] * image_tokens + [5, 6, 7, 8, 13, 14]])
    return m, records, ids, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def assert_verified_with_the_same_tokens(bundle, image, runtimes=("eager", "onnxruntime"), max_new_tokens: int = 6,
                                        question: str = "what color is the circle ?") -> list[int]:
    """Every verification check of `bundle` passed, and greedy generation gives the same tokens on each of
    `runtimes` (as many as asked for: the tiny models never stop early). Returns them."""
    from vlmc import api

    failed = [r for r in bundle.manifest["verification"]["results"] if not r["passed"]]
    assert not failed, failed
    tokens = {rt: api.run(bundle.path, rt, image, question, max_new_tokens=max_new_tokens)["tokens"] for rt in runtimes}
    assert len({tuple(t) for t in tokens.values()}) == 1 and len(tokens[runtimes[0]]) == max_new_tokens, tokens
    return tokens[runtimes[0]]


def assert_export_refused(ckpt, out: Path, passes: list, fragment: str, template: str = SPACED_TEMPLATE,
                          **fields) -> None:
    """An onnx export of `ckpt` with `passes` (and any other recipe `fields`) ends in a VlmcError matching
    `fragment`, leaving no bundle."""
    import pytest

    from vlmc import api
    from vlmc.errors import VlmcError

    with pytest.raises(VlmcError, match=fragment):
        api.compile({"model": str(ckpt), "targets": ["onnx"], "prompt_template": template, "passes": passes, **fields}, out)
    assert not out.exists()


def whole_prompt_caches(m, ref, ids, pixels, image_start: int, n_image: int):
    """The prompt's embeds (by `m`) and two eager caches of it: `m`'s whole-prompt prefill through its in-LLM
    stages, and the reference model's plain one. Returns (embeds, past, full)."""
    import torch

    from vlmc.models_zoo.core import PromptRows

    with torch.no_grad():
        embeds = m.merge_embeddings(ids, m.encode_image(pixels))
        t = embeds.shape[1]
        _, past = m.decode(embeds, torch.arange(t)[None], None,
                           PromptRows(torch.tensor([image_start]), n_image, torch.tensor([t - 1])))
        _, full = ref.decode(embeds, torch.arange(t)[None], None)
    return embeds, past, full
