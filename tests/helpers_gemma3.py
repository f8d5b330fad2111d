"""Tiny Gemma 3 checkpoints the tests build themselves: transformers' Gemma3ForConditionalGeneration saved
with save_pretrained, a transformers-5 tokenizer that adds <bos> like the real one, and its image processor."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from tests.helpers import WORDS

GEMMA3_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                   "<end_of_image>", "<image_soft_token>"]
GEMMA3_WORDS = ["user", "model", "\n", "\n\n", "\n\n\n", "Describe", "this", "image", "."] + WORDS[:12]
IMAGE_TOKEN, BOI, EOI = 8, 6, 7


def write_gemma3_tokenizer(directory: Path, vocab_size: int):
    """A WordLevel tokenizer keeping newline runs as one piece (as Gemma's SentencePiece does), saved by
    transformers 5 with the BOS rule in its post-processor."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = GEMMA3_SPECIALS + GEMMA3_WORDS
    pieces += [f"tok{i}" for i in range(len(pieces), vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(pieces)}, unk_token="<unk>"))
    tok.add_special_tokens(GEMMA3_SPECIALS)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(" "), behavior="removed"),
                                                 pre_tokenizers.Split(Regex(r"\n+|\w+|[^\w\s]"), behavior="isolated")])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"})
    fast.save_pretrained(directory)
    data = json.loads((directory / "tokenizer.json").read_text())
    data["model"].setdefault("merges", [])  # ExecuTorch's HF tokenizer loader requires the key
    (directory / "tokenizer.json").write_text(json.dumps(data))
    return fast


def make_hf_gemma3(directory: Path, seed: int = 0, heads: int = 4, kv_heads: int = 2, head_dim: int = 8,
                   layer_types: Optional[list] = None, num_layers: int = 3, sliding_window_pattern: Optional[int] = None,
                   sliding_window: int = 4, tie: bool = True, image_size: int = 28, patch_size: int = 7,
                   mm_tokens: int = 4, query_pre_attn_scalar: float = 8, rope_factor: Optional[float] = 8.0,
                   vocab_size: int = 64, image_token: int = IMAGE_TOKEN, resample: int = 2, hidden: int = 32):
    """Save a tiny random transformers Gemma 3 (SigLIP 2 layers), its tokenizer and image processor;
    returns (model, processor). Every weight is drawn at random (the default init zeroes the Gemma norms
    and the projection, which would hide mistakes)."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig
    from transformers.models.gemma3 import Gemma3ImageProcessorPil, Gemma3Processor

    torch.manual_seed(seed)
    full = {"rope_type": "default", "rope_theta": 1000000.0}
    if rope_factor:
        full = {"rope_type": "linear", "factor": rope_factor, "rope_theta": 1000000.0}
    text = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, sliding_window=sliding_window,
                query_pre_attn_scalar=query_pre_attn_scalar,
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}, "full_attention": full})
    if layer_types is not None:
        text["layer_types"] = layer_types
    if sliding_window_pattern is not None:
        text["sliding_window_pattern"] = sliding_window_pattern
    cfg = Gemma3Config(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         image_size=image_size, patch_size=patch_size, vision_use_head=False),
        text_config=Gemma3TextConfig(**text), mm_tokens_per_image=mm_tokens, boi_token_index=BOI, eoi_token_index=EOI,
        image_token_index=image_token, tie_word_embeddings=tie)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
    model.save_pretrained(directory)
    tokenizer = write_gemma3_tokenizer(directory, vocab_size)
    images = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}, resample=resample,
                                     image_mean=[0.5] * 3, image_std=[0.5] * 3)
    images.save_pretrained(directory)
    processor = Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=mm_tokens)
    return model, processor
