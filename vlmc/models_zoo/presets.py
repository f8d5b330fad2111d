"""Architecture presets: the geometry of real VLM releases with random weights, for latency and memory
profiling before anyone has the weights (`--model preset:NAME`).

A preset is a Hugging Face config.json (the release's published geometry), its image processor settings
and a stand-in tokenizer (a WordLevel vocabulary of the release's size with the family's special tokens
at the release's ids), written once into a cache folder; the weights are seeded random numbers, never
read or written. Bundles built from a preset say so in their manifest, and `vlmc eval` refuses them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

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


def cache_root() -> Path:
    return Path(os.environ.get("VLMC_CACHE", Path.home() / ".cache" / "vlmc"))


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
