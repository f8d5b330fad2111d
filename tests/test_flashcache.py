"""FlashCache: each layer's cache keeps only the image rows whose keys deviate most from the DCT low-pass
of the image's keys; the prompt is computed in full (same logits), decode steps read the shorter caches."""
import math

import pytest
import torch

from tests.helpers import (
    SPACED_TEMPLATE, assert_export_refused, assert_programs_continue_the_prefill,
    assert_verified_with_the_same_tokens, three_target_bundle, tiny_pass_model, whole_prompt_caches)
from vlmc import api
from vlmc.models_zoo import load
from vlmc.passes.kv import OutlierKVStage, allocate
from vlmc.passes.token import functional as T

FLASH = {"name": "flashcache", "keep": 6}


def test_the_low_pass_is_orthonormal_and_a_spike_deviates_from_it_more_than_a_slow_wave():
    basis = T.dct_low_pass(32, 6)
    torch.testing.assert_close(basis @ basis.T, torch.eye(6), atol=1e-5, rtol=0)
    n = torch.arange(32, dtype=torch.float32)
    slow = torch.cos(math.pi * (n + 0.5) * 2 / 32)[:, None] * torch.ones(1, 4)  # frequency 2: inside the low-pass
    assert float(T.low_pass_deviation(slow, basis).max()) < 1e-5
    spike = slow.clone()
    spike[17] += 3.0
    deviation = T.low_pass_deviation(spike, basis)
    assert int(deviation.argmax()) == 17 and float(deviation[17]) > 2.0


def test_the_stage_keeps_the_rows_farthest_from_the_low_pass():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 20, 8, generator=g)  # [1, Hkv, T, d]: image rows 3..14
    rows = torch.arange(3, 15)
    stage = OutlierKVStage(4, 12, 0.25)
    keys = torch.cat([k[0, 0, 3:15], k[0, 1, 3:15]], dim=1)  # heads concatenated, per row
    basis = T.dct_low_pass(12, 3)
    deviation = [float((keys[j] - (basis.T @ (basis @ keys))[j]).norm()) for j in range(12)]
    expected = sorted(sorted(range(12), key=lambda j: -deviation[j])[:4])
    assert stage.select(type("View", (), {"k": k, "image_rows": rows})()).tolist() == expected


def test_budgets_split_in_proportion_within_bounds():
    assert allocate(12, [1.0, 1.0, 2.0], 10) == [3, 3, 6]
    assert allocate(12, [0.0, 0.0, 1.0], 9) == [1, 2, 9] or allocate(12, [0.0, 0.0, 1.0], 9) == [2, 1, 9]
    assert sum(allocate(17, [0.3, 0.5, 0.2, 0.9], 15)) == 17


@pytest.fixture(scope="module")
def flash_models(tiny_ckpt):
    return (load(str(tiny_ckpt)).model.eval(), *tiny_pass_model(tiny_ckpt, [FLASH], 16))


def test_the_prompt_is_computed_in_full_and_each_cache_keeps_its_outliers(flash_models):
    ref, m, records, ids, pixels = flash_models
    assert records[0]["in_llm"] and records[0]["tokens_out"] == 16
    assert m.cache_shifts() == [10, 10] and m.cache_evictions() == [10, 10]
    with torch.no_grad():
        torch.testing.assert_close(m(ids, pixels), ref(ids, pixels), atol=1e-6, rtol=1e-6)  # nothing evicted yet
    embeds, past, full = whole_prompt_caches(m, ref, ids, pixels, 2, 16)
    t = embeds.shape[1]
    stages = m.decoder_stages()
    for layer in (0, 1):
        kept = stages[layer][0].select(type("View", (), {"k": full[layer][0], "image_rows": torch.arange(2, 18)})())
        rows = torch.cat([torch.arange(2), 2 + kept, torch.arange(18, t)])
        torch.testing.assert_close(past[layer][0], full[layer][0][:, :, rows])
        torch.testing.assert_close(past[layer][1], full[layer][1][:, :, rows])


def test_prefill_and_decode_programs_continue_with_the_evicted_caches(flash_models):
    _, m, _, ids, pixels = flash_models
    with torch.no_grad():
        embeds = m.merge_embeddings(ids, m.encode_image(pixels))
    eager, static = assert_programs_continue_the_prefill(m, embeds, 2, 16)
    assert eager == [embeds.shape[1] - 10] * 2 and static == [30, 30]


def test_flashcache_exports_to_onnx_verifies_and_gives_eagers_tokens(tiny_ckpt, tmp_path, sample_image):
    b = api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "max_context": 48, "prompt_template": SPACED_TEMPLATE,
                     "passes": [FLASH]}, tmp_path / "f")
    d = b.manifest["decoder"]
    assert d["cache_evictions"] == [10, 10] and d["cache_lengths"] == [38, 38] and b.manifest["prompt"]["num_image_tokens"] == 16
    assert_verified_with_the_same_tokens(b, sample_image)


def test_flashcache_allocates_its_budgets_from_calibration_into_the_recipe(tiny_ckpt, calibration_jsonl, tmp_path):
    b = api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "max_context": 48, "prompt_template": SPACED_TEMPLATE,
                     "calibration": {"dataset": str(calibration_jsonl), "n": 8},
                     "passes": [{**FLASH, "allocate": True}]}, tmp_path / "a")
    budgets = b.manifest["recipe"]["passes"][0]["budgets"]
    assert len(budgets) == 2 and sum(budgets) == 12 and all(1 <= x <= 15 for x in budgets)
    assert b.manifest["decoder"]["cache_evictions"] == [16 - x for x in budgets]
    assert all(r["passed"] for r in b.manifest["verification"]["results"])


@pytest.mark.slow  # three targets (-m slow)
def test_flashcache_verifies_on_every_target_with_the_same_tokens(tiny_ckpt, tmp_path, sample_image):
    b = three_target_bundle(tiny_ckpt, [FLASH], tmp_path / "f3")
    assert_verified_with_the_same_tokens(b, sample_image, ("eager", "onnxruntime", "executorch"))


@pytest.mark.parametrize("spec, fragment", [
    ({**FLASH, "keep": 16}, "parameter 'keep': 16 must be below the 16 image rows"),
    ({**FLASH, "budgets": [5, 6]}, "parameter 'budgets': needs 2 counts in 1..15 .* summing to keep x layers = 12"),
    ({**FLASH, "cutoff": 1.0}, "parameter 'cutoff'"),
    ([FLASH, {"name": "fastv", "keep": 8, "at": "decoder.layer[0]"}], "evicts image rows from this layer's cache"),
])
def test_bad_flashcache_parameters_are_refused(tiny_ckpt, tmp_path, spec, fragment):
    assert_export_refused(tiny_ckpt, tmp_path / "b", spec if isinstance(spec, list) else [spec], fragment, SPACED_TEMPLATE)
