"""Tiny LFM2-VL checkpoints, built offline with transformers, and the processor's patch layout.

transformers' LFM2-VL image processor needs torchvision (which has no wheel for this torch), so the
tests write its preprocessor_config.json themselves and build its pixel layout (`patchify`) from the
processor's code: NaFlex patches in row, column, channel order, every patch real for a square image
whose side is a multiple of 32.
"""
from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import WORDS

LFM2_SPECIALS = ["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<|image_start|>",
                 "<|image_end|>"]
LFM2_WORDS = ["user", "assistant", "\n", "what", "color", "is", "the", "circle", "?"] + WORDS[:12]
IMAGE_TOKEN = 5


def write_lfm2_tokenizer(directory: Path, vocab_size: int):
    """A WordLevel tokenizer with LFM2's special tokens, saved by transformers 5 (BOS <|startoftext|> in the
    post-processor; `\\n` is a token)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = LFM2_SPECIALS + list(dict.fromkeys(LFM2_WORDS))
    pieces += [f"tok{i}" for i in range(len(pieces), vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(pieces)}, unk_token="<|endoftext|>"))
    tok.add_special_tokens(LFM2_SPECIALS)
    # the pieces kept, the spaces between them removed: a pre-tokenizer ExecuTorch's C++ loader reads too
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n+|\w+|[^\w\s]"), behavior="removed", invert=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|pad|>", unk_token="<|endoftext|>", add_bos_token=True)
    fast.save_pretrained(directory)
    data = json.loads((directory / "tokenizer.json").read_text())
    data["model"].setdefault("merges", [])  # ExecuTorch's HF tokenizer loader requires the key
    (directory / "tokenizer.json").write_text(json.dumps(data))
    return fast


def patchify(pixels, patch: int = 16):
    """Normalised [1,3,H,W] -> the processor's pixel_values [1, N, p*p*3] (its convert_image_to_patches)."""
    b, c, h, w = pixels.shape
    x = pixels.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // patch) * (w // patch), -1)


def make_hf_lfm2vl(directory: Path, seed: int = 0, heads: int = 4, kv_heads: int = 2, layer_types=("conv", "full_attention", "conv"),
                   positions: int = 16, vocab_size: int = 64, tie: bool = True, conv_kernel: int = 3, max_image_tokens: int = 64,
                   auto_ff: bool = True, conv_bias: bool = False, projector_layernorm: bool = True):
    """Save a tiny random LFM2-VL with save_pretrained, a transformers-5 tokenizer and the image processor's
    config; returns the model. Vision: SigLIP2 width 32, 2 layers, 16 px patches, a `positions` table;
    text: width 32, the given layer kinds."""
    import torch
    from transformers import Lfm2VlConfig, Lfm2VlForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Lfm2VlConfig(
        vision_config={"model_type": "siglip2_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "patch_size": 16, "num_patches": positions, "vision_use_head": False},
        text_config={"model_type": "lfm2", "vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 96,
                     "block_multiple_of": 16, "block_auto_adjust_ff_dim": auto_ff, "num_hidden_layers": len(layer_types),
                     "num_attention_heads": heads, "num_key_value_heads": kv_heads, "layer_types": list(layer_types),
                     "conv_L_cache": conv_kernel, "conv_bias": conv_bias, "norm_eps": 1e-5, "tie_word_embeddings": tie,
                     "bos_token_id": 1, "eos_token_id": 4, "pad_token_id": 0},
        image_token_id=IMAGE_TOKEN, projector_hidden_size=64, downsample_factor=2, tie_word_embeddings=tie,
        projector_use_layernorm=projector_layernorm)
    model = Lfm2VlForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # off the init values (norms at 1, biases at 0), so mistakes show in the logits
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    write_lfm2_tokenizer(directory, vocab_size)
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Lfm2VlImageProcessor", "encoder_patch_size": 16, "downsample_factor": 2,
        "min_image_tokens": 4, "max_image_tokens": max_image_tokens, "do_image_splitting": True, "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3, "resample": 2}))
    return model
