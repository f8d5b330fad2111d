"""Image files to the uint8 [3,H,W] tensors every vision_encoder takes (PIL + numpy, no torchvision).

Resizing happens on the host, as each family's Hugging Face image processor does it (normalisation is
inside the vision_encoder program). The rule travels in the bundle's manifest (`prompt.image_resize`):
- `shortest_edge_center_crop` (CLIP, LLaVA): the shorter side to `size`, bicubic, then a centre crop;
- `square` (Gemma 3, InternVL without tiles): straight to size x size with `filter`, ignoring the aspect;
- `longest_edge_then_square` (Idefics3 / SmolVLM without image splitting): the longer side to
  `longest_edge` (the other in proportion, rounded up to even), then to size x size, each step with
  `filter` on uint8;
- `longest_edge_tiles` (Idefics3 / SmolVLM with a tile grid `grid` [rows, cols]): the longer side to
  `longest_edge`, then to rows*size x cols*size, cut into rows x cols tiles (row by row), then that image
  squeezed to size x size as the global image, last. The image becomes uint8 [rows*cols+1, 3, size, size]:
  the vision_encoder runs once per tile.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from vlmc.errors import VlmcError, first_line

CLIP_RESIZE = {"rule": "shortest_edge_center_crop", "filter": "bicubic"}
RULES = ("shortest_edge_center_crop", "square", "longest_edge_then_square", "longest_edge_tiles")


def _filter(name: str):
    from PIL import Image

    filters = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS, "nearest": Image.NEAREST}
    if name not in filters:
        raise VlmcError(f"image resize filter {name!r} is not one of {', '.join(filters)}")
    return filters[name]


def _longest_edge(im, longest: int, resample):
    """The longer side to `longest`, the other in proportion (truncated, rounded up to even), as Idefics3's
    processor does."""
    w, h = im.size
    if w >= h:
        nw, nh = longest, int(longest / (w / h))
        nh += nh % 2
    else:
        nh, nw = longest, int(longest * (w / h))
        nw += nw % 2
    return im.resize((max(nw, 1), max(nh, 1)), resample)


def resize(im, size: int, rule: Optional[dict] = None) -> list:
    """A PIL RGB image resized by `rule` (default: CLIP's): the size x size images the vision encoder takes
    (one, or a tile grid's tiles and the global image)."""
    rule = rule or CLIP_RESIZE
    kind, resample = rule.get("rule"), _filter(rule.get("filter", "bicubic"))
    w, h = im.size
    if kind == "shortest_edge_center_crop":
        short, long = min(w, h), max(w, h)
        new_long = int(size * long / short)  # truncated, as transformers' get_resize_output_image_size does
        im = im.resize((size, new_long) if w <= h else (new_long, size), resample)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        return [im.crop((left, top, left + size, top + size))]
    if kind == "square":
        return [im.resize((size, size), resample)]
    if kind == "longest_edge_then_square":
        return [_longest_edge(im, int(rule["longest_edge"]), resample).resize((size, size), resample)]
    if kind == "longest_edge_tiles":
        rows, cols = rule["grid"]
        im = _longest_edge(im, int(rule["longest_edge"]), resample).resize((cols * size, rows * size), resample)
        tiles = [im.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)) for r in range(rows) for c in range(cols)]
        return tiles + [im.resize((size, size), resample)]
    raise VlmcError(f"image resize rule {kind!r} is not one of {', '.join(RULES)}")


def _array(images: list) -> np.ndarray:
    """PIL images -> uint8 [3,H,W] for one image, [k,3,H,W] for k tiles."""
    arrays = [np.asarray(im, dtype=np.uint8).transpose(2, 0, 1) for im in images]
    return np.ascontiguousarray(arrays[0] if len(arrays) == 1 else np.stack(arrays))


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
    """A uint8 [3,H,W] image resized by `rule`: [3, size, size], or [k, 3, size, size] for k tiles."""
    from PIL import Image

    return _array(resize(Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))), size, rule))


def tiles(image: np.ndarray) -> list[np.ndarray]:
    """The images the vision_encoder runs on, one call each: a uint8 [3,H,W] image or [k,3,H,W] tiles."""
    return [image] if image.ndim == 3 else list(image)


def load_image(path: str | Path, size: int, rule: Optional[dict] = None) -> np.ndarray:
    """An image file as uint8 [3, size, size] (or [k, 3, size, size] tiles), resized by the family's `rule`
    (default: CLIP's)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return _array(resize(to_rgb(im), size, rule))
    except FileNotFoundError:
        raise VlmcError(f"image {path}: no such file") from None
    except Image.DecompressionBombError as e:  # PIL's guard against images that decode to gigabytes
        raise VlmcError(f"image {path}: too large to decode safely ({first_line(e)})") from None
    except (UnidentifiedImageError, OSError) as e:
        raise VlmcError(f"image {path}: cannot read it as an image ({e.__class__.__name__})") from None
