"""Tiny InternVL checkpoints the tests build with transformers (nothing is downloaded)."""
from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import WORDS

INTERNVL_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<IMG_CONTEXT>", "<img>", "</img>", "<video>", "<|im_start|>", "<|im_end|>"]
INTERNVL_WORDS = ["user", "assistant", "system"] + WORDS[:12]
IMAGE_TOKEN_ID = 4  # <IMG_CONTEXT>
EOS_TOKEN_ID = 9  # <|im_end|>
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# InternVL3-hf's chat template (Qwen-style turns; an image becomes `<IMG_CONTEXT>\n`)
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is string %}"
                 "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
                 "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
                 "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}")


def write_internvl_tokenizer(directory: Path, vocab_size: int, bos: bool):
    """A WordLevel tokenizer saved by transformers 5 (BOS rule in tokenizer.json's post-processor), with the
    image markers InternVLProcessor reads from the tokenizer (start/end/context image tokens)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = INTERNVL_SPECIALS + INTERNVL_WORDS
    pieces += [f"tok{i}" for i in range(len(pieces), vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(pieces)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="removed", invert=True)
    tok.add_special_tokens(INTERNVL_SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>", pad_token="<pad>",
        add_bos_token=bos, extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                                                 "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    fast.save_pretrained(directory)
    data = json.loads((directory / "tokenizer.json").read_text())
    data["model"].setdefault("merges", [])  # ExecuTorch's HF tokenizer loader requires the key
    (directory / "tokenizer.json").write_text(json.dumps(data))
    return fast


def internvl_processor(image_processor, tokenizer, image_seq_length: int):
    """InternVLProcessor without its video processor (that one needs torchvision, not installed)."""
    from transformers.models.internvl import InternVLProcessor

    class InternVLProcessorNoVideo(InternVLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    return InternVLProcessorNoVideo(image_processor=image_processor, tokenizer=tokenizer,
                                    image_seq_length=image_seq_length, chat_template=CHAT_TEMPLATE)


def make_hf_internvl(directory: Path, seed: int = 0, tie: bool = True, kv_heads: int = 2, image_size: int = 32,
                     patch_size: int = 4, downsample_ratio: float = 0.5, feature_layer: int = -1, vision_layers: int = 2,
                     qk_norm: bool = False, norm_type: str = "layer_norm", attention_bias: bool = True,
                     mean_pooling: bool = True, bos: bool = True, vocab_size: int = 64):
    """Save a tiny random transformers InternVLForConditionalGeneration (legacy saved layout), its
    GotOcr2 image processor (one tile, bicubic, ImageNet mean/std) and a transformers-5 tokenizer;
    returns (model, processor)."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2 import GotOcr2ImageProcessorPil

    torch.manual_seed(seed)
    seq = (image_size // patch_size // round(1 / downsample_ratio)) ** 2
    cfg = InternVLConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": vision_layers,
                       "num_attention_heads": 4, "image_size": image_size, "patch_size": patch_size,
                       "attention_bias": attention_bias, "use_qk_norm": qk_norm, "norm_type": norm_type,
                       "use_mean_pooling": mean_pooling},
        text_config={"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": kv_heads, "vocab_size": vocab_size,
                     "rope_theta": 1e6, "bos_token_id": 1, "eos_token_id": EOS_TOKEN_ID},
        image_token_id=IMAGE_TOKEN_ID, image_seq_length=seq, downsample_ratio=downsample_ratio,
        vision_feature_layer=feature_layer, tie_word_embeddings=tie,
    )
    model = InternVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger than the default init (lambda 0.1, CLS and positions 0), so errors show
        for p in model.parameters():
            p.normal_(0, 0.15)
    model.save_pretrained(directory)
    tokenizer = write_internvl_tokenizer(directory, vocab_size, bos)
    images = GotOcr2ImageProcessorPil(size={"height": image_size, "width": image_size}, image_mean=IMAGENET_MEAN,
                                      image_std=IMAGENET_STD, resample=3, crop_to_patches=False, max_patches=12)
    images.save_pretrained(directory)
    return model, internvl_processor(images, tokenizer, seq)
