"""Image files to the uint8 [3,H,W] tensors every vision_encoder takes (PIL + numpy, no torchvision).

Resizing happens on the host, as each family's Hugging Face image processor does it (normalisation is
inside the vision_encoder program). The rule travels in the bundle's manifest (`prompt.image_resize`):
- `shortest_edge_center_crop` (CLIP, LLaVA): the shorter side to `size`, bicubic, then a centre crop;
- `square` (Gemma 3, InternVL without tiles): straight to size x size with `filter`, ignoring the aspect;
- `longest_edge_then_square` (Idefics3 / SmolVLM without image splitting): the longer side to
  `longest_edge` (the other in proportion, rounded up to even), then to size x size, each step with
  `filter` on uint8.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from vlmc.errors import VlmcError, first_line

CLIP_RESIZE = {"rule": "shortest_edge_center_crop", "filter": "bicubic"}
RULES = ("shortest_edge_center_crop", "square", "longest_edge_then_square")


def _filter(name: str):
    from PIL import Image

    filters = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS, "nearest": Image.NEAREST}
    if name not in filters:
        raise VlmcError(f"image resize filter {name!r} is not one of {', '.join(filters)}")
    return filters[name]


def resize(im, size: int, rule: Optional[dict] = None):
    """A PIL RGB image resized by `rule` (default: CLIP's) to size x size."""
    rule = rule or CLIP_RESIZE
    kind, resample = rule.get("rule"), _filter(rule.get("filter", "bicubic"))
    w, h = im.size
    if kind == "shortest_edge_center_crop":
        short, long = min(w, h), max(w, h)
        new_long = int(size * long / short)  # truncated, as transformers' get_resize_output_image_size does
        im = im.resize((size, new_long) if w <= h else (new_long, size), resample)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        return im.crop((left, top, left + size, top + size))
    if kind == "square":
        return im.resize((size, size), resample)
    if kind == "longest_edge_then_square":
        longest = int(rule["longest_edge"])
        if w >= h:
            nw, nh = longest, int(longest / (w / h))
            nh += nh % 2
        else:
            nh, nw = longest, int(longest * (w / h))
            nw += nw % 2
        im = im.resize((max(nw, 1), max(nh, 1)), resample)
        return im.resize((size, size), resample)
    raise VlmcError(f"image resize rule {kind!r} is not one of {', '.join(RULES)}")


def to_rgb(im):
    """8-bit RGB. 16- and 32-bit greyscale (PIL modes I;16*, I) are scaled by their range to 0-255 first:
    PIL's own convert clips them, turning most 16-bit images all white."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.float64)
        full = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        im = Image.fromarray(np.clip(np.round(a * 255.0 / full), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def resize_array(image: np.ndarray, size: int, rule: Optional[dict] = None) -> np.ndarray:
    """A uint8 [3,H,W] image resized by `rule` to [3, size, size]."""
    from PIL import Image

    im = resize(Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))), size, rule)
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))


def load_image(path: str | Path, size: int, rule: Optional[dict] = None) -> np.ndarray:
    """An image file as uint8 [3, size, size], resized by the family's `rule` (default: CLIP's)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = resize(to_rgb(im), size, rule)
            return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))
    except FileNotFoundError:
        raise VlmcError(f"image {path}: no such file") from None
    except Image.DecompressionBombError as e:  # PIL's guard against images that decode to gigabytes
        raise VlmcError(f"image {path}: too large to decode safely ({first_line(e)})") from None
    except (UnidentifiedImageError, OSError) as e:
        raise VlmcError(f"image {path}: cannot read it as an image ({e.__class__.__name__})") from None
