"""ShapesVQA: deterministic, splits that never overlap, every question type, answers in the vocabulary."""
import json
from collections import Counter

import numpy as np
import pytest

from vlmc.errors import VlmcError
from vlmc.eval import shapes_vqa as s


def test_generation_is_deterministic():
    a, b = list(s.items("test", 6)), list(s.items("test", 6))
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image) and (x.question, x.answer, x.scene_id) == (y.question, y.answer, y.scene_id)
    assert len({x.question + x.scene_id for x in a}) == 6


def test_splits_never_share_a_scene():
    ids = {split: {it.scene_id for it in s.items(split, 150)} for split in s.SPLITS}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    for split, (lo, hi) in s.SPLITS.items():
        assert all(lo <= int(sid, 16) % 10 < hi for sid in ids[split])


def test_items_cover_every_type_with_vocabulary_answers():
    items = list(s.items("val", 240))
    types = Counter(it.qtype for it in items)
    assert set(types) == set(s.QUESTION_TYPES)
    words = set(s.VOCABULARY) | {"?"}
    for it in items:
        assert it.image.shape == (112, 112, 3) and it.image.dtype == np.uint8
        assert it.answer in words
        assert set(it.question.replace("?", " ?").split()) <= words
    counts = Counter(it.answer for it in items if it.qtype == "count")
    assert len(counts) >= 4  # not one answer for every count question


def test_background_is_busy():
    img = next(iter(s.items("train", 1))).image.astype(float)
    patches = img.reshape(14, 8, 14, 8, 3).std(axis=(1, 3)).mean(-1)
    assert (patches > 3).mean() > 0.8  # almost no flat background patch


def test_write_makes_images_and_jsonl(tmp_path):
    path = s.write("test", 3, tmp_path)
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    assert len(rows) == 3 and all((tmp_path / r["image"]).is_file() for r in rows)
    with pytest.raises(VlmcError, match="unknown split"):
        s.generate("dev", 0)


def test_scene_questions_ask_only_the_requested_types():
    scene = next(it for it in s.items("train", 50) if len({(o.color, o.shape) for o in it.objects}) >= 3).objects
    asked = s.scene_questions(scene, np.random.default_rng(0), 6, ("position", "size"))
    assert asked and {t for _, _, t in asked} <= {"position", "size"}
    assert all(a in {"left", "right", "above", "below", "bigger", "smaller"} for _, a, _ in asked)


def test_patch_labels_mark_each_objects_patches_with_its_colour_shape_and_size_class():
    small = s.Obj("circle", "red", 12, 20, 20)  # box 14..26: patch centres 20 (column / row 2)
    large = s.Obj("square", "blue", 24, 80, 60)  # box 68..92 x 48..72: centres 68..92 x 52..68
    colors, shapes, sizes = (a.reshape(14, 14) for a in s.patch_labels([small, large]))
    assert sizes[2, 2] == 1 and colors[2, 2] == 1 + list(s.COLORS).index("red") and shapes[2, 2] == 1
    assert (sizes[6:9, 8:12] == 2).all() and (shapes[6:9, 8:12] == 1 + s.SHAPES.index("square")).all()
    assert (sizes > 0).sum() == 1 + 3 * 4 and (colors > 0).sum() == (sizes > 0).sum()
