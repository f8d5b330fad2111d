"""Architecture presets: the geometry of real VLM releases with random weights, for latency and memory
profiling before anyone has the weights (`--model preset:NAME`).

A preset is a Hugging Face config.json (the release's published geometry), its image processor settings
and a stand-in tokenizer (a WordLevel vocabulary of the release's size with the family's special tokens
at the release's ids), written once into a cache folder; the weights are seeded random numbers, never
read or written. Bundles built from a preset say so in their manifest, and `vlmc eval` refuses them.
"""
from __future__ import annotations

import json
from pathlib import Path

from vlmc.cache import cache_root
from vlmc.errors import VlmcError

# The words vlmc's own prompts use (templates, the verification and profile question, ShapesVQA).
_WORDS = ["User", "Assistant", "USER", "ASSISTANT", "user", "assistant", "system", "model", "You", "are", "a", "helpful",
          ":", "?", ".", "what", "color", "is", "the", "circle", "square", "triangle", "how", "many", "are", "there",
          "left", "right", "of", "above", "below", "bigger", "smaller", "than", "red", "green", "blue", "yes", "no"]


def _llama(hidden, inter, layers, heads, kv, vocab, theta=10000.0, eps=1e-5, tie=False, head_dim=None, bos=1, eos=2):
    return {"model_type": "llama", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab, "rms_norm_eps": eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": theta}, "tie_word_embeddings": tie,
            "head_dim": head_dim or hidden // heads, "bos_token_id": bos, "eos_token_id": eos, "hidden_act": "silu"}


def _smolvlm(text: dict) -> dict:
    return {"model_type": "smolvlm", "architectures": ["SmolVLMForConditionalGeneration"], "image_token_id": 49190,
            "scale_factor": 4, "tie_word_embeddings": False,
            "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                              "image_size": 512, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6},
            "text_config": text}


SMOLVLM_SPECIALS = {"<|im_start|>": 1, "<end_of_utterance>": 49279, "<fake_token_around_image>": 49189,
                    "<image>": 49190, "<global-img>": 49152, "<|endoftext|>": 0, "<|im_end|>": 2}

PRESETS: dict[str, dict] = {
    "smolvlm2-256m": {
        "release": "HuggingFaceTB/SmolVLM2-256M-Video-Instruct (SigLIP-B/16 512px, pixel shuffle 4, SmolLM2-135M)",
        "config": _smolvlm(_llama(576, 1536, 30, 9, 3, 49280, theta=100000.0, head_dim=64, bos=1, eos=49279)),
        "preprocessor": {"size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512}, "resample": 1,
                         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
        "specials": SMOLVLM_SPECIALS, "bos": True,
    },
    "smolvlm2-500m": {
        "release": "HuggingFaceTB/SmolVLM2-500M-Video-Instruct (SigLIP-B/16 512px, pixel shuffle 4, SmolLM2-360M)",
        "config": _smolvlm(_llama(960, 2560, 32, 15, 5, 49280, theta=100000.0, head_dim=64, bos=1, eos=49279)),
        "preprocessor": {"size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512}, "resample": 1,
                         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
        "specials": SMOLVLM_SPECIALS, "bos": True,
    },
    "internvl3-1b": {
        "release": "OpenGVLab/InternVL3-1B-hf (InternViT-300M 448px, pixel shuffle 0.5, Qwen2.5-0.5B)",
        "config": {"model_type": "internvl", "architectures": ["InternVLForConditionalGeneration"], "image_token_id": 151667,
                   "image_seq_length": 256, "downsample_ratio": 0.5, "projector_hidden_act": "gelu", "vision_feature_layer": -1,
                   "vision_feature_select_strategy": "default", "tie_word_embeddings": True,
                   "vision_config": {"model_type": "internvl_vision", "hidden_size": 1024, "intermediate_size": 4096,
                                     "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": [448, 448],
                                     "patch_size": [14, 14], "attention_bias": True, "use_qk_norm": False, "norm_type": "layer_norm",
                                     "layer_norm_eps": 1e-6, "hidden_act": "gelu", "use_mean_pooling": True},
                   "text_config": {**_llama(896, 4864, 24, 14, 2, 151674, theta=1000000.0, eps=1e-6, tie=True,
                                            bos=151643, eos=151645), "model_type": "qwen2"}},
        "preprocessor": {"size": {"height": 448, "width": 448}, "resample": 3,
                         "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
        "specials": {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<img>": 151665,
                     "</img>": 151666, "<IMG_CONTEXT>": 151667}, "bos": False,
    },
    "qwen2.5-vl-3b": {
        "release": "Qwen/Qwen2.5-VL-3B-Instruct (window-attention ViT 448px -> 256 tokens, Qwen2.5-3B with M-RoPE)",
        "config": {"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"], "image_token_id": 151655,
                   "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
                   "tie_word_embeddings": True,
                   "vision_config": {"model_type": "qwen2_5_vl", "depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
                                     "num_heads": 16, "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2,
                                     "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                                     "hidden_act": "silu", "in_channels": 3},
                   "text_config": {**_llama(2048, 11008, 36, 16, 2, 151936, eps=1e-6, tie=True, bos=151643, eos=151645),
                                   "model_type": "qwen2_5_vl_text",
                                   "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}}},
        "preprocessor": {"min_pixels": 3136, "max_pixels": 12845056, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                         "image_std": [0.26862954, 0.26130258, 0.27577711]},
        "specials": {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
                     "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}, "bos": False,
    },
    "qwen3-vl-2b": {
        "release": "Qwen/Qwen3-VL-2B-Instruct (ViT 448px -> 196 tokens with DeepStack into 3 decoder layers, Qwen3-1.7B with interleaved M-RoPE)",
        "config": {"model_type": "qwen3_vl", "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655,
                   "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
                   "tie_word_embeddings": True,
                   "vision_config": {"model_type": "qwen3_vl", "depth": 24, "hidden_size": 1024, "intermediate_size": 4096,
                                     "num_heads": 16, "out_hidden_size": 2048, "patch_size": 16, "spatial_merge_size": 2,
                                     "temporal_patch_size": 2, "num_position_embeddings": 2304,
                                     "deepstack_visual_indexes": [5, 11, 17], "hidden_act": "gelu_pytorch_tanh", "in_channels": 3},
                   "text_config": {**_llama(2048, 6144, 28, 16, 8, 151936, eps=1e-6, tie=True, head_dim=128, bos=151643, eos=151645),
                                   "model_type": "qwen3_vl_text",
                                   "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                                       "mrope_interleaved": True}}},
        "preprocessor": {"size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16, "merge_size": 2,
                         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
        "specials": {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
                     "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}, "bos": False,
    },
    "lfm2-vl-450m": {
        "release": "LiquidAI/LFM2-VL-450M (SigLIP2 NaFlex base 512px -> 256 tokens, LFM2-350M: 10 short-convolution + 6 attention layers)",
        "config": {"model_type": "lfm2_vl", "architectures": ["Lfm2VlForConditionalGeneration"], "image_token_id": 396,
                   "downsample_factor": 2, "projector_hidden_size": 2560, "projector_hidden_act": "gelu", "projector_bias": True,
                   "projector_use_layernorm": True, "tie_word_embeddings": True,
                   "vision_config": {"model_type": "siglip2_vision_model", "hidden_size": 768, "intermediate_size": 3072,
                                     "num_hidden_layers": 12, "num_attention_heads": 12, "patch_size": 16, "num_patches": 256,
                                     "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "vision_use_head": False},
                   "text_config": {"model_type": "lfm2", "vocab_size": 65536, "hidden_size": 1024, "intermediate_size": 6656,
                                   "block_auto_adjust_ff_dim": True, "block_ffn_dim_multiplier": 1.0, "block_multiple_of": 256,
                                   "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 8,
                                   "layer_types": ["full_attention" if i in (2, 5, 8, 10, 12, 14) else "conv" for i in range(16)],
                                   "conv_L_cache": 3, "conv_bias": False, "norm_eps": 1e-5,
                                   "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                                   "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 7, "pad_token_id": 0}},
        "preprocessor": {"encoder_patch_size": 16, "downsample_factor": 2, "min_image_tokens": 64, "max_image_tokens": 256,
                         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
        "specials": {"<|pad|>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2, "<|im_start|>": 6, "<|im_end|>": 7,
                     "<image>": 396, "<|image_start|>": 498, "<|image_end|>": 499}, "bos": True,
    },
    "gemma3-4b": {
        "release": "google/gemma-3-4b-it (SigLIP-so400m 896px, 4x4 average pool -> 256 tokens, Gemma 3 4B)",
        "config": {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "image_token_index": 262144,
                   "boi_token_index": 255999, "eoi_token_index": 256000, "mm_tokens_per_image": 256,
                   "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                                     "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 896, "patch_size": 14,
                                     "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False},
                   "text_config": {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
                                   "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                                   "vocab_size": 262208, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
                                   "sliding_window": 1024, "sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
                                   "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
                                   "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "bos_token_id": 2, "eos_token_id": [1, 106],
                                   "tie_word_embeddings": True}},
        "preprocessor": {"size": {"height": 896, "width": 896}, "resample": 2, "image_mean": [0.5, 0.5, 0.5],
                         "image_std": [0.5, 0.5, 0.5], "do_pan_and_scan": False},
        "specials": {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 105, "<end_of_turn>": 106,
                     "<start_of_image>": 255999, "<end_of_image>": 256000, "<image_soft_token>": 262144}, "bos": True,
    },
    "llava-1.5-7b": {
        "release": "llava-hf/llava-1.5-7b-hf (CLIP ViT-L/14 336px, 2-layer MLP, Llama-2-7B)",
        "config": {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"], "image_token_id": 32000,
                   "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
                   "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                                     "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                                     "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
                   "text_config": _llama(4096, 11008, 32, 32, 32, 32064, eps=1e-5)},
        "preprocessor": {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]},
        "specials": {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 32000}, "bos": True,
    },
}


def names() -> list[str]:
    return list(PRESETS)


def _tokenizer_json(vocab_size: int, specials: dict[str, int]) -> str:
    """A WordLevel tokenizer of `vocab_size` pieces: the specials at their ids, vlmc's prompt words, fillers."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    pieces = [f"<tok{i}>" for i in range(vocab_size)]
    for piece, i in specials.items():
        pieces[i] = piece
    free = [i for i in range(vocab_size) if i not in set(specials.values())]
    for word, i in zip(dict.fromkeys(_WORDS), free):
        pieces[i] = word
    unk = "<unk>" if "<unk>" in specials else next(iter(specials))
    tok = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="removed", invert=True)
    tok.add_special_tokens(list(specials))
    data = json.loads(tok.to_str())
    data["model"]["merges"] = []  # ExecuTorch's HF tokenizer loader requires the key
    return json.dumps(data)


def materialize(name: str) -> Path:
    """The preset's folder (config.json, preprocessor_config.json, tokenizer files), written once."""
    if name not in PRESETS:
        raise VlmcError(f"unknown preset {name!r} (have: {', '.join(PRESETS)})")
    p = PRESETS[name]
    directory = cache_root() / "presets" / name
    config = json.dumps(p["config"], indent=2) + "\n"
    if (directory / "config.json").is_file() and (directory / "config.json").read_text() == config:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    text = p["config"].get("text_config", {})
    specials = p["specials"]
    bos = next((piece for piece, i in specials.items() if i == text.get("bos_token_id")), None)
    eos_id = text.get("eos_token_id")
    eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id
    eos = next((piece for piece, i in specials.items() if i == eos_id), None)
    (directory / "tokenizer.json").write_text(_tokenizer_json(text["vocab_size"], specials))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eos, "add_bos_token": bool(p["bos"] and bos),
         "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
    (directory / "preprocessor_config.json").write_text(json.dumps(p["preprocessor"], indent=2) + "\n")
    (directory / "config.json").write_text(config)  # last: its presence marks a complete folder
    return directory


def random_init(model, seed: int = 0) -> None:
    """Seeded random weights, scaled like a trained model's (normal, std 0.02; norms at one)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                continue  # norms' gains and biases keep their construction values (ones / zeros)
            p.normal_(0.0, 0.02, generator=g)
