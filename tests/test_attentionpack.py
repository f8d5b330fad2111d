"""AttentionPack: each layer's cache holds the image rows as coefficients on calibrated low-rank key and
value bases (heads concatenated), the rows the question attends to most at the full rank and the others at
fewer; the prompt is computed in full, decode steps attend in the rank space."""
import subprocess
import sys

import pytest
import torch

from tests.helpers import (
    SPACED_TEMPLATE, assert_export_refused, assert_programs_continue_the_prefill,
    assert_verified_with_the_same_tokens, whole_prompt_caches)
from vlmc import api, passes
from vlmc.models_zoo import load
from vlmc.models_zoo.layers import packed_sdpa
from vlmc.models_zoo.programs import plain_sdpa
from vlmc.passes.kv import PackedKVStage
from vlmc.passes.quant.calibration import CalibrationSource
from vlmc.passes.token import functional as T
from vlmc.recipe import build

PACK = {"name": "attentionpack", "keep": 4, "rank": 8, "light_rank": 2}


def test_the_basis_is_orthonormal_and_leaves_only_the_singular_value_tail():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g) @ torch.randn(6, 12, generator=g) + 0.05 * torch.randn(50, 12, generator=g)
    basis = T.principal_basis(x, 4)
    torch.testing.assert_close(basis @ basis.T, torch.eye(4), atol=1e-5, rtol=0)
    s = torch.linalg.svdvals(x.double())
    torch.testing.assert_close((x - x @ basis.T @ basis).norm().double(), s[4:].norm(), atol=1e-4, rtol=1e-4)
    low = x[:, :3] @ torch.randn(3, 12, generator=g)  # rank 3: three ranks hold it exactly
    torch.testing.assert_close(low @ T.principal_basis(low, 3).T @ T.principal_basis(low, 3), low, atol=1e-4, rtol=1e-4)


def _orthonormal(hkv, r, d, g):
    q, _ = torch.linalg.qr(torch.randn(hkv * d, r, generator=g))
    return q.T.reshape(r, hkv, d).transpose(0, 1)[None].contiguous()  # [1, Hkv, r, d]


def test_attention_in_the_rank_space_equals_attention_over_the_decompressed_rows():
    g = torch.Generator().manual_seed(1)
    hkv, d, r, lite = 2, 8, 6, 2
    q, k, v = torch.randn(1, 4, 3, d, generator=g), torch.randn(1, hkv, 7, d, generator=g), torch.randn(1, hkv, 7, d, generator=g)
    bk, bv = _orthonormal(hkv, r, d, g), _orthonormal(hkv, r, d, g)
    packed = [torch.randn(1, 5, r, generator=g), torch.randn(1, 5, r, generator=g),
              torch.randn(1, 9, lite, generator=g), torch.randn(1, 9, lite, generator=g)]
    mask = torch.arange(7)[None, :] <= torch.tensor([4, 5, 6])[:, None]

    def rows(c, basis):  # [1, M, r'] coefficients -> [1, Hkv, M, d] rows
        return torch.einsum("mj,hjd->hmd", c[0], basis[0, :, : c.shape[-1]])[None]

    keys = torch.cat([k, rows(packed[0], bk), rows(packed[2], bk)], 2)
    values = torch.cat([v, rows(packed[1], bv), rows(packed[3], bv)], 2)
    full_mask = torch.cat([mask, torch.ones(3, 14, dtype=torch.bool)], 1)  # the image rows precede every query
    torch.testing.assert_close(packed_sdpa(q, k, v, mask, packed, bk, bv), plain_sdpa(q, keys, values, full_mask),
                               atol=1e-5, rtol=1e-5)


def test_the_rows_the_question_attends_to_most_keep_the_full_rank():
    g = torch.Generator().manual_seed(2)
    hkv, d, r = 2, 8, 6
    q, k, v = torch.randn(1, 4, 20, d, generator=g), torch.randn(1, hkv, 20, d, generator=g), torch.randn(1, hkv, 20, d, generator=g)
    image, last = torch.arange(3, 15), torch.tensor([17])
    stage = PackedKVStage(12, 4, 2, _orthonormal(hkv, r, d, g), _orthonormal(hkv, r, d, g))
    assert stage.packed_shape == (4, 6, 8, 2)
    k_rows, v_rows, k_lite, v_lite = stage.pack(q, k, v, image, last)
    attention = T.instruction_attention(q, k, image, last)  # the question's rows 15..17 over the image rows
    by_attention = sorted(range(12), key=lambda j: -float(attention[j]))  # the order the blocks hold them in
    flat = lambda x, j: x[0, :, 3 + j].reshape(-1)  # noqa: E731  (image row j, heads concatenated)
    basis_k, basis_v = (b[0].transpose(0, 1).reshape(r, -1) for b in (stage.basis_k, stage.basis_v))  # [r, Hkv*d]
    assert k_rows.shape == v_rows.shape == (1, 4, 6) and k_lite.shape == v_lite.shape == (1, 8, 2)
    for i, j in enumerate(by_attention):
        k_block, v_block, at = (k_rows, v_rows, i) if i < 4 else (k_lite, v_lite, i - 4)
        ranks = k_block.shape[-1]
        torch.testing.assert_close(k_block[0, at], flat(k, j) @ basis_k[:ranks].T, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v_block[0, at], flat(v, j) @ basis_v[:ranks].T, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def pack_models(tiny_ckpt, calibration_jsonl):
    loaded = load(str(tiny_ckpt))
    m = loaded.model.eval()
    recipe = loaded.template(build({"model": str(tiny_ckpt), "prompt_template": SPACED_TEMPLATE,
                                    "calibration": {"dataset": str(calibration_jsonl), "n": 8}})).resolve(16)
    records, _ = passes.apply(m, [PACK], CalibrationSource(recipe, loaded.tokenizer, m))
    ids = torch.tensor([[12, 14] + [4] * 16 + [5, 6, 7, 8, 13, 14]])
    return load(str(tiny_ckpt)).model.eval(), m, records, ids, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_the_prompt_is_computed_in_full_and_decoding_reads_the_image_at_its_ranks(pack_models):
    ref, m, records, ids, pixels = pack_models
    assert records[0]["in_llm"] and m.cache_shifts() == [16, 16] and list(m.packed_layers()) == [0, 1]
    with torch.no_grad():
        torch.testing.assert_close(m(ids, pixels), ref(ids, pixels), atol=1e-6, rtol=1e-6)  # nothing packed yet
        embeds, past, full = whole_prompt_caches(m, ref, ids, pixels, 2, 16)
        t = embeds.shape[1]
        # the reference: the float cache with each image row replaced by its reconstruction at its group's rank
        rebuilt = []
        for layer, stage in m.packed_layers().items():
            k, v, packed = past[layer]
            assert k.shape[2] == t - 16 and [p.shape for p in packed] == [(1, 4, 8)] * 2 + [(1, 12, 2)] * 2
            torch.testing.assert_close(k, full[layer][0][:, :, torch.cat([torch.arange(2), torch.arange(18, t)])])
            heavy_rank = [torch.einsum("mj,hjd->hmd", c[0], b[0, :, : c.shape[-1]])[None]
                          for c, b in zip(packed, (stage.basis_k, stage.basis_v, stage.basis_k, stage.basis_v))]
            rebuilt.append((torch.cat([k[:, :, :2], heavy_rank[0], heavy_rank[2], k[:, :, 2:]], 2),
                            torch.cat([v[:, :, :2], heavy_rank[1], heavy_rank[3], v[:, :, 2:]], 2)))
        nxt = m.embed_text(torch.tensor([[9]]))
        got, _ = m.decode(nxt, torch.tensor([[t]]), past)
        want, _ = ref.decode(nxt, torch.tensor([[t]]), rebuilt)  # a decode step sees every image row: order is free
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        exact, _ = ref.decode(nxt, torch.tensor([[t]]), full)
        assert float((got - exact).abs().max()) > 1e-4  # the ranks left out do change the step


def test_prefill_and_decode_programs_continue_with_the_packed_caches(pack_models):
    _, m, _, ids, pixels = pack_models
    with torch.no_grad():
        embeds = m.merge_embeddings(ids, m.encode_image(pixels))
    eager, static = assert_programs_continue_the_prefill(m, embeds, 2, 16)
    assert eager == [embeds.shape[1] - 16] * 2 and static == [24, 24]


def test_attentionpack_exports_to_onnx_verifies_and_gives_eagers_tokens(tiny_ckpt, calibration_jsonl, tmp_path, sample_image):
    b = api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "max_context": 48, "prompt_template": SPACED_TEMPLATE,
                     "calibration": {"dataset": str(calibration_jsonl), "n": 8}, "passes": [PACK]}, tmp_path / "p")
    d = b.manifest["decoder"]
    assert d["cache_lengths"] == [32, 32] and d["kv_cache"]["packed"] == [[0, 4, 8, 12, 2], [1, 4, 8, 12, 2]]
    # per layer: 32 text slots x 2 heads x 16 dims, k and v, plus (4 x 8 + 12 x 2) coefficients, k and v
    assert d["kv_cache"]["bytes"] == 2 * 4 * (2 * 32 * 2 * 16 + 2 * (4 * 8 + 12 * 2))
    assert_verified_with_the_same_tokens(b, sample_image)
    shown = subprocess.run([sys.executable, "-m", "vlmc.cli", "inspect", str(b.path)], capture_output=True, text=True)
    text = " ".join(shown.stdout.split())  # rich wraps lines at the terminal's width
    assert "image rows packed in layers 0, 1: 4 at rank 8, 12 at rank 2" in text, shown.stdout + shown.stderr


@pytest.mark.slow  # three targets (-m slow)
def test_attentionpack_verifies_on_every_target_with_the_same_tokens(tiny_ckpt, calibration_jsonl, tmp_path, sample_image):
    b = api.compile({"model": str(tiny_ckpt), "targets": ["onnx", "executorch", "coreml"], "max_context": 48,
                     "prompt_template": SPACED_TEMPLATE, "calibration": {"dataset": str(calibration_jsonl), "n": 8},
                     "passes": [{"name": "divprune", "keep": 12}, PACK]}, tmp_path / "p3")
    assert b.manifest["decoder"]["kv_cache"]["packed"][0] == [0, 4, 8, 8, 2]  # DivPrune's 12 rows enter the decoder
    assert_verified_with_the_same_tokens(b, sample_image, ("eager", "onnxruntime", "executorch"))


@pytest.mark.parametrize("spec, fragment", [
    ([{**PACK, "keep": 16}], "parameter 'keep': 16 must be below the 16 image rows"),
    ([{**PACK, "rank": 32}], "parameter 'rank': 32 must be below the 32 key dimensions"),
    ([{**PACK, "light_rank": 9}], "parameter 'light_rank': 9 must be at most rank 8"),
    ([PACK, {"name": "kv8"}], "the KV cache has one storage"),
    ([PACK, {"name": "flashcache", "keep": 6, "at": "decoder.layer[1]"}], "evicts image rows from this layer's cache"),
])
def test_bad_attentionpack_parameters_are_refused(tiny_ckpt, calibration_jsonl, tmp_path, spec, fragment):
    assert_export_refused(tiny_ckpt, tmp_path / "b", spec, fragment, SPACED_TEMPLATE,
                          calibration={"dataset": str(calibration_jsonl), "n": 8})
