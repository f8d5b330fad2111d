"""Tiny Qwen2.5-VL / Qwen2-VL checkpoints, their tokenizer and an image-only processor, built offline."""
from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import WORDS

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>"]
QWEN_WORDS = ["system", "user", "assistant", "You", "are", "a", "helpful", ".", "\n", "Describe", "this", "image"] + WORDS[:12]
IMAGE_TOKEN = 5  # <|image_pad|>


def write_qwen_tokenizer(directory: Path, vocab_size: int):
    """A WordLevel tokenizer with Qwen's special tokens, saved by transformers 5 (no BOS; `\\n` is a token)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = QWEN_SPECIALS + QWEN_WORDS
    pieces += [f"tok{i}" for i in range(len(pieces), vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(pieces)}, unk_token="<|endoftext|>"))
    tok.add_special_tokens(QWEN_SPECIALS)
    # the pieces kept, the spaces between them removed: a pre-tokenizer ExecuTorch's C++ loader reads too
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n+|\w+|[^\w\s]"), behavior="removed", invert=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})
    fast.save_pretrained(directory)
    data = json.loads((directory / "tokenizer.json").read_text())
    data["model"].setdefault("merges", [])  # ExecuTorch's HF tokenizer loader requires the key
    (directory / "tokenizer.json").write_text(json.dumps(data))
    return fast


def image_processor(min_pixels: int = 28 * 28, max_pixels: int = 28 * 28 * 64):
    from transformers import Qwen2VLImageProcessor  # the PIL variant without torchvision

    return Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)


def processor(images, tokenizer):
    """Qwen2_5_VLProcessor without its video processor (which needs torchvision)."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = tokenizer.image_token, tokenizer.video_token
            self.image_token_id, self.video_token_id = tokenizer.image_token_id, tokenizer.video_token_id
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyProcessor(image_processor=images, tokenizer=tokenizer)


def make_hf_qwen(directory: Path, seed: int = 0, model_type: str = "qwen2_5_vl", tie: bool = False, heads: int = 4,
                 kv_heads: int = 2, depth: int = 3, fullatt=(1,), window_size: int = 56, vocab_size: int = 64,
                 layers: int = 2, mrope_section=(1, 1, 2)):
    """Save a tiny random Qwen2.5-VL (or Qwen2-VL) with save_pretrained, a transformers-5 tokenizer and
    the image processor's preprocessor_config.json; returns (model, processor). Text: width 32, head_dim
    32/heads; vision: width 32, 4 heads (head_dim 8), 2x2-merged-unit windows at window_size 56."""
    import torch

    torch.manual_seed(seed)
    text = {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-6,
            "bos_token_id": 0, "eos_token_id": 2, "tie_word_embeddings": tie,
            "rope_parameters": {"rope_type": "default", "mrope_section": list(mrope_section), "rope_theta": 1e6}}
    common = {"image_token_id": IMAGE_TOKEN, "video_token_id": 6, "vision_start_token_id": 3, "vision_end_token_id": 4,
              "tie_word_embeddings": tie}
    if model_type == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        cfg = Qwen2VLConfig(text_config=text, vision_config={"depth": depth, "embed_dim": 32, "hidden_size": 32, "mlp_ratio": 2,
                                                             "num_heads": 4, "patch_size": 14, "spatial_merge_size": 2,
                                                             "temporal_patch_size": 2}, **common)
        model = Qwen2VLForConditionalGeneration(cfg).eval()
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        cfg = Qwen2_5_VLConfig(text_config=text, vision_config={
            "depth": depth, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "out_hidden_size": 32,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": window_size,
            "fullatt_block_indexes": list(fullatt)}, **common)
        model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # off the init values (norms at 1, biases at 0), so mistakes show in the logits
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    tokenizer = write_qwen_tokenizer(directory, vocab_size)
    images = image_processor()
    images.save_pretrained(directory)
    return model, processor(images, tokenizer)
