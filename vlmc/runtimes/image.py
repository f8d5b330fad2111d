"""Image files to the uint8 [3,H,W] tensors every vision_encoder takes (PIL + numpy, no torchvision)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vlmc.errors import VlmcError


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Resize the shorter side to `size` (bicubic) and centre-crop, as CLIP's processor does."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = size / min(w, h)
            im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))
    except FileNotFoundError:
        raise VlmcError(f"image {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise VlmcError(f"image {path}: cannot read it as an image ({e.__class__.__name__})") from None
