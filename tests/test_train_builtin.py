"""The training script's attention supervision: which patches each question must fetch, and the loss on them."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from train_builtin import fetch_loss, fetch_selectors  # noqa: E402


def test_fetch_selectors_name_the_objects_each_question_needs():
    # (colour class, shape class) per object, 0 = any, -1 = no object; classes are 1 + index; then 1 if it counts
    assert fetch_selectors("what color is the circle?") == [0, 1, -1, -1, 0]
    assert fetch_selectors("which shape is blue?") == [3, 0, -1, -1, 0]
    assert fetch_selectors("how many diamonds are there?") == [0, 4, -1, -1, 1]
    assert fetch_selectors("is there a red square?") == [1, 2, -1, -1, 0]
    assert fetch_selectors("is the red circle left or right of the green diamond?") == [1, 1, 2, 4, 0]
    assert fetch_selectors("is the orange triangle bigger or smaller than the red square?") == [6, 3, 1, 2, 0]


def _scene(patches=6, text=4, d=8):
    """One sequence: 2 text rows, `patches` image rows, then `text` rows; the answer is predicted at the last."""
    length = 2 + patches + text
    q, k = torch.zeros(1, 4, length, d), torch.zeros(1, 2, length, d)
    target_pos = torch.tensor([[length, length + 1]])  # the answer sits one past the last row
    colors = torch.tensor([[0, 1, 1, 2, 0, 1]])  # classes of the six patches
    shapes = torch.tensor([[0, 1, 1, 3, 0, 2]])
    return q, k, target_pos, colors, shapes


def test_fetch_loss_is_zero_when_the_head_attends_to_the_named_object_only():
    q, k, target_pos, colors, shapes = _scene()
    q[0, 0, -1, 0] = 1.0
    k[0, 0, 2 + 1, 0] = k[0, 0, 2 + 2, 0] = 100.0  # kv head 0 serves query head 0: the two red-circle patches
    selectors = torch.tensor([[[1, 1, -1, -1, 0]]])
    assert fetch_loss(q, k, target_pos, selectors, colors, shapes, image_start=2).item() < 1e-6


def test_fetch_loss_is_minus_log_of_the_mass_on_the_object():
    q, k, target_pos, colors, shapes = _scene()  # zero queries: uniform attention over the 12 causal rows
    selectors = torch.tensor([[[0, 1, 2, 3, 0]]])  # any-coloured circle (2 patches), green triangle (1 patch)
    loss = fetch_loss(q, k, target_pos, selectors, colors, shapes, image_start=2).item()
    assert math.isclose(loss, (-math.log(2 / 12) - math.log(1 / 12)) / 2, rel_tol=1e-5)


def test_fetch_loss_skips_absent_objects_and_counts_only_earlier_rows():
    q, k, target_pos, colors, shapes = _scene()
    absent = torch.tensor([[[4, 4, -1, -1, 0]]])  # "is there a yellow diamond?" -> no: nothing to fetch
    assert fetch_loss(q, k, target_pos, absent, colors, shapes, image_start=2).item() == 0
    q[0, 0, -1, 0] = 1.0
    k[0, 0, 2 + 3, 0] = -100.0  # the triangle patch gets no mass, the other 11 rows share it evenly
    selectors = torch.tensor([[[0, 2, -1, -1, 0]]])  # the one square patch
    loss = fetch_loss(q, k, target_pos, selectors, colors, shapes, image_start=2).item()
    assert math.isclose(loss, -math.log(1 / 11), rel_tol=1e-5)
    q[0, 0, 7, 0] = 1.0
    target_pos = torch.tensor([[8, 9]])  # predicted at row 7: rows 8.. come later, rows 0..7 less the triangle count
    loss = fetch_loss(q, k, target_pos, selectors, colors, shapes, image_start=2).item()
    assert math.isclose(loss, -math.log(1 / 7), rel_tol=1e-5)


def test_count_sink_lets_a_count_question_attend_to_the_text_as_well():
    q, k, target_pos, colors, shapes = _scene()  # uniform attention over the 12 causal rows, 6 of them text
    circles = torch.tensor([[[0, 1, -1, -1, 1]]])  # "how many circles?": 2 circle patches
    patches_only = fetch_loss(q, k, target_pos, circles, colors, shapes, image_start=2).item()
    assert math.isclose(patches_only, -math.log(2 / 12), rel_tol=1e-5)
    with_sink = fetch_loss(q, k, target_pos, circles, colors, shapes, image_start=2, count_sink=True).item()
    assert math.isclose(with_sink, -math.log(8 / 12), rel_tol=1e-5)
    diamonds = torch.tensor([[[0, 4, -1, -1, 1]]])  # none in the image: the answer 0 is read off the sink
    assert fetch_loss(q, k, target_pos, diamonds, colors, shapes, image_start=2).item() == 0
    assert math.isclose(fetch_loss(q, k, target_pos, diamonds, colors, shapes, image_start=2, count_sink=True).item(),
                        -math.log(6 / 12), rel_tol=1e-5)


def test_compile_regions_falls_back_to_eager_without_a_compiler(monkeypatch, tmp_path, capsys):
    import torch._dynamo
    import torch._inductor.config as inductor_config
    from train_builtin import PatchHeads, RetrievalHead, compile_regions
    from vlmc.models_zoo.builtin import builtin_config
    from vlmc.models_zoo.llava import LlavaModel

    torch._dynamo.reset()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, str(tmp_path / "no-such-g++")))
    model = LlavaModel(builtin_config(vocab_size=64))
    forwards = [block.forward for block in model.language_model.layers]
    try:
        fetch = compile_regions(model, PatchHeads(128, 196), RetrievalHead(128, 1))
    finally:
        torch._dynamo.reset()
    assert fetch is fetch_loss
    assert [block.forward for block in model.language_model.layers] == forwards  # nothing was wrapped
    out = capsys.readouterr().out
    assert "torch.compile unavailable" in out and "training eager" in out


@pytest.mark.slow
def test_compiled_training_steps_match_eager(tmp_path):
    """The benchmark trains an eager and a compiled copy side by side: their losses must agree step by step."""
    import json
    import subprocess

    script = Path(__file__).resolve().parents[1] / "tools" / "bench_train_compile.py"
    subprocess.run([sys.executable, str(script), "--steps", "8", "--warmup", "2", "--items", "16", "--batch-size", "4",
                    "--out", str(tmp_path)], check=True, capture_output=True, timeout=900)
    report = json.loads((tmp_path / "train_compile.json").read_text())
    assert report["steps_timed"] == 6
    assert report["max_loss_difference"] < 1e-4
    assert report["per_step"]["eager"]["median_s"] > 0 and report["per_step"]["compiled"]["median_s"] > 0
