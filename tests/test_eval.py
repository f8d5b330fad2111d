"""vlmc eval: numbers, runtime agreement, and errors that name the dataset line."""
import json

import numpy as np
import pytest
from PIL import Image

from vlmc import api
from vlmc.errors import VlmcError
from vlmc.eval.evaluate import wilson

QUESTIONS = ["what color is the circle ?", "is the square red ?", "what is the color ?", "is the circle blue ?"]


def test_wilson_interval():
    assert wilson(50, 100) == (40.38, 59.62)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 100.0


@pytest.fixture(scope="module")
def own_dataset(tiny_bundle, tmp_path_factory):
    """A questions.jsonl whose answers are the eager model's own answers: eager scores 100%."""
    d = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(3)
    lines = []
    for i, q in enumerate(QUESTIONS * 3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
        answer = api.run(tiny_bundle.path, "eager", d / f"{i}.png", q, max_new_tokens=4)["text"] or "<empty>"
        lines.append(json.dumps({"image": f"{i}.png", "question": q, "answer": answer, "type": f"t{i % 2}"}))
    (d / "questions.jsonl").write_text("\n".join(lines) + "\n")
    return d / "questions.jsonl"


def test_every_runtime_matches_eager_accuracy(tiny_bundle, own_dataset):
    results = {rt: api.evaluate(tiny_bundle.path, rt, str(own_dataset), n=None) for rt in ("eager", "onnxruntime", "executorch")}
    answerable = sum(1 for l in own_dataset.read_text().splitlines() if json.loads(l)["answer"] != "<empty>")
    assert results["eager"]["accuracy"] == pytest.approx(100 * answerable / 12, abs=0.01)
    for rt, r in results.items():
        assert abs(r["accuracy"] - results["eager"]["accuracy"]) <= 0.5, rt
        assert r["agreement"] == 100.0 and r["mean_kl"] < 1e-6, rt
        assert set(r["per_type"]) == {"t0", "t1"} and r["n"] == 12


@pytest.mark.parametrize("content,fragment", [
    ('{"image": "0.png", "question": "what"}\n', "line 1: needs non-empty string fields"),
    ('\n{"image": "0.png", "question": "what", "answer": "red"}\nnot json\n', "line 3: not valid JSON"),
    ('{"image": "missing.png", "question": "what", "answer": "red"}\n', "line 1: image"),
    ('{"image": "0.png", "question": "what is a zebra ?", "answer": "red"}\n', "line 1: words outside the model's vocabulary: a, zebra"),
    ("\n\n", "no questions"),
])
def test_bad_dataset_lines_are_named(tiny_bundle, own_dataset, tmp_path, content, fragment):
    path = own_dataset.parent / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(VlmcError, match=fragment):
        api.evaluate(tiny_bundle.path, "onnxruntime", str(path), n=None)


def test_a_model_directory_evaluates_eager_only(tiny_ckpt):
    with pytest.raises(VlmcError, match="not a bundle"):
        api.evaluate(str(tiny_ckpt), "onnxruntime", "shapes-vqa", n=2)


def test_a_model_is_evaluated_on_the_questions_asked_for_with_or_without_reference():
    ticks = []
    full = api.evaluate("shapes-llava", "eager", "shapes-vqa", "test", 5, tick=lambda done, what: ticks.append(done))
    assert full["n"] == 5 and ticks == [1, 2, 3, 4, 5] and full["agreement"] == 100.0
    alone = api.evaluate("shapes-llava", "eager", "shapes-vqa", "test", 5, reference=False)
    assert alone["accuracy"] == full["accuracy"] and "agreement" not in alone and alone["reference"] is None
