"""Tiny Qwen3-VL checkpoints, built offline with transformers (the Qwen tokenizer of helpers_qwen2_5_vl)."""
from __future__ import annotations

from pathlib import Path

from tests.helpers_qwen2_5_vl import IMAGE_TOKEN, processor, write_qwen_tokenizer

__all__ = ["IMAGE_TOKEN", "make_hf_qwen3", "image_processor"]


def image_processor(min_pixels: int = 32 * 32, max_pixels: int = 32 * 32 * 64):
    from transformers import Qwen2VLImageProcessor  # Qwen3-VL's image processor is Qwen2-VL's with 16px patches

    return Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                 image_std=[0.5] * 3, min_pixels=min_pixels, max_pixels=max_pixels)


def make_hf_qwen3(directory: Path, seed: int = 0, tie: bool = False, heads: int = 4, kv_heads: int = 2, depth: int = 3,
                  deepstack=(0, 1), vocab_size: int = 64, layers: int = 3, mrope_section=(2, 1, 1), head_dim: int = 8,
                  positions: int = 16):
    """Save a tiny random Qwen3-VL with save_pretrained, a transformers-5 tokenizer and the image processor's
    config; returns (model, processor). Text: width 32, explicit head_dim; vision: width 32, 4 heads, a
    `positions`-entry learned position table, DeepStack mergers on the `deepstack` blocks."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    text = {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim, "rms_norm_eps": 1e-6,
            "bos_token_id": 0, "eos_token_id": 2, "tie_word_embeddings": tie,
            "rope_parameters": {"rope_type": "default", "mrope_section": list(mrope_section), "mrope_interleaved": True,
                                "rope_theta": 5e6}}
    vision = {"depth": depth, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "out_hidden_size": 32,
              "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": positions,
              "deepstack_visual_indexes": list(deepstack)}
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN, video_token_id=6,
                        vision_start_token_id=3, vision_end_token_id=4, tie_word_embeddings=tie)
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # off the init values (norms at 1, biases at 0), so mistakes show in the logits
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    tokenizer = write_qwen_tokenizer(directory, vocab_size)
    images = image_processor()
    images.save_pretrained(directory)
    return model, processor(images, tokenizer)
