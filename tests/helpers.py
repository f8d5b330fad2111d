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
