"""The built-in model's architecture and tokenizer: a tiny LLaVA-1.5 sized for ShapesVQA.

112x112 images in 8x8 patches give 196 visual tokens (LLaVA-1.5 has 576), so token passes have
something to prune. The tokenizer is a WordLevel tokenizer.json with a Split pre-tokenizer and an
empty merges list: the form both Hugging Face tokenizers and ExecuTorch's C++ loader read.
"""
from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
PAD, BOS, EOS, UNK, IMAGE = range(5)
TEMPLATE_WORDS = ["USER", "ASSISTANT", ":", "?"]


def builtin_config(vocab_size: int):
    from vlmc.models_zoo.layers import TextConfig, VisionConfig
    from vlmc.models_zoo.llava import LlavaConfig

    return LlavaConfig(
        vision=VisionConfig(image_size=112, patch_size=8, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4),
        text=TextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                        num_kv_heads=2, head_dim=32, bos_token_id=BOS, eos_token_ids=(EOS,)),
        image_token_id=IMAGE,
        image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
    )


def write_tokenizer(directory: Path, words: list[str]) -> dict[str, int]:
    """Write tokenizer.json + tokenizer_config.json for SPECIALS + TEMPLATE_WORDS + words; return the vocab."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    pieces = SPECIALS + [w for w in dict.fromkeys(TEMPLATE_WORDS + list(words)) if w not in SPECIALS]
    vocab = {w: i for i, w in enumerate(pieces)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="removed", invert=True)
    tok.add_special_tokens(SPECIALS)
    data = json.loads(tok.to_str())
    data["model"]["merges"] = []  # ExecuTorch's HF tokenizer loader requires the key
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": False,
         "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1024}, indent=2) + "\n")
    (directory / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "crop_size": {"height": 112, "width": 112},
         "size": {"shortest_edge": 112}, "image_processor_type": "CLIPImageProcessor", "do_rescale": True,
         "rescale_factor": 1 / 255, "do_normalize": True, "do_resize": True, "do_center_crop": True}, indent=2) + "\n")
    # what transformers' LlavaProcessor needs to expand <image> into the 196 image tokens
    (directory / "processor_config.json").write_text(json.dumps(
        {"processor_class": "LlavaProcessor", "patch_size": 8, "vision_feature_select_strategy": "default",
         "num_additional_image_tokens": 1, "image_token": "<image>"}, indent=2) + "\n")
    return vocab
