"""The resolution pass: the image encoded at a lower side, chosen at export.

The simplest competitor of every token method (issue 24): a smaller input shrinks the patch grid, so
the vision encoder itself runs on fewer patches, and the LLM receives fewer image tokens, with no
selection cost. Each family resizes its position scheme the way its own code handles another input
size (CLIP / SigLIP / InternViT: the learned table interpolated bicubically; Idefics3: bucketed
position ids; Qwen2.5-VL: rotary positions and windows recomputed for the grid).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from vlmc.passes.registry import Pass, PassConfig, register


class ResolutionConfig(PassConfig):
    at: Literal["image"] = Field("image", description="the input image (before the vision encoder)")
    size: int = Field(..., ge=8, description="side of the square image the vision encoder takes (below the model's "
                                             "native side, a multiple of its patch x connector merge)")


@register
class Resolution(Pass):
    name = "resolution"
    kind = "input"
    source = "the resolution baseline: position tables resampled as the family's interpolate_pos_encoding does"
    departures = "one square side for every image (tiled families keep one tile)"
    Config = ResolutionConfig

    @classmethod
    def acts_at(cls) -> list[str]:
        return ["image"]

    def apply(self, model) -> None:
        model.set_resolution(self.config.size)
