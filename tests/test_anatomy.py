"""Named insertion points: passes reach the model through these only."""
import pytest
import torch

from vlmc.errors import VlmcError
from vlmc.models_zoo import load


class KeepEveryOther(torch.nn.Module):
    def forward(self, x):
        return x[:, ::2]


def test_insertion_points_are_named_and_resolve(tiny_ckpt):
    m = load(str(tiny_ckpt)).model
    points = m.insertion_points()
    # feature layer -2 of 3 blocks: blocks 0 and 1 run
    assert points == ["vision.block[0]", "vision.block[1]", "vision.out", "projector.out", "decoder.layer[0]", "decoder.layer[1]"]
    assert m.resolve("vision.block[1]") is m.vision_tower.encoder.layers[1]
    assert m.resolve("decoder.layer[1]") is m.language_model.layers[1]
    with pytest.raises(VlmcError, match="unknown insertion point"):
        m.resolve("vision.block[7]")


@pytest.mark.parametrize("point", ["vision.out", "projector.out"])
def test_a_stage_at_a_point_changes_the_token_count(tiny_ckpt, point):
    m = load(str(tiny_ckpt)).model
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        full = m.encode_image(pixels)
        m.insert(point, KeepEveryOther())
        reduced = m.encode_image(pixels)
    assert full.shape[1] == 16 and reduced.shape[1] == 8
    if point == "projector.out":
        assert torch.allclose(reduced, full[:, ::2])


def test_a_visual_token_stage_is_refused_inside_the_llm(tiny_ckpt):
    m = load(str(tiny_ckpt)).model
    with pytest.raises(VlmcError, match=r"decoder.layer\[0\]: a visual-token stage cannot run there"):
        m.insert("decoder.layer[0]", KeepEveryOther())
