"""Runtimes: the same tokens everywhere, and one profile schema for onnxruntime and executorch."""
import platform

import pytest

from vlmc import api
from vlmc.errors import VlmcError

PROMPT = "what color is the circle ?"


def test_eager_onnxruntime_and_executorch_generate_the_same_tokens(tiny_bundle, sample_image):
    results = {rt: api.run(tiny_bundle.path, rt, sample_image, PROMPT, max_new_tokens=8)
               for rt in ("eager", "onnxruntime", "executorch")}
    tokens = {rt: r["tokens"] for rt, r in results.items()}
    assert tokens["eager"] == tokens["onnxruntime"] == tokens["executorch"], tokens
    assert results["onnxruntime"]["prompt_tokens"] == 2 + 16 + 8


@pytest.mark.parametrize("runtime", ["onnxruntime", "executorch"])
def test_profile_schema(tiny_bundle, runtime):
    p = api.profile(tiny_bundle.path, runtime, warmup=1, iterations=3, ops=True, new_tokens=4)
    assert p["runtime"] == runtime and p["iterations"] == 3
    for program in ("vision_encoder", "token_embedding", "text_decoder.prefill", "text_decoder.decode"):
        stats = p["programs"][program]
        assert {"p50_ms", "p90_ms", "p99_ms", "mean_ms"} <= set(stats)
        assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
    s = p["stages"]
    assert s["time_to_first_token_ms"] >= s["vision_encode_ms"] + s["prefill_ms"]
    assert s["decode_ms_per_token"] > 0
    assert p["memory"]["peak_rss_mb"] >= p["memory"]["rss_after_load_mb"] > 0
    assert p["artifact_bytes_total"] == sum(p["artifacts"].values()) > 0
    assert p["ops"] and all(r["calls"] > 0 and r["total_ms"] >= 0 for r in p["ops"])


@pytest.mark.skipif(platform.system() == "Darwin", reason="Core ML runs on macOS")
def test_coreml_says_it_needs_macos(tiny_bundle, sample_image):
    with pytest.raises(VlmcError, match="only on macOS"):
        api.profile(tiny_bundle.path, "coreml")
    with pytest.raises(VlmcError, match="only on macOS"):
        api.run(tiny_bundle.path, "coreml", sample_image, PROMPT)


def test_prompt_longer_than_the_bundle_allows_is_refused(tiny_bundle, sample_image):
    with pytest.raises(VlmcError, match="max_prompt"):
        api.run(tiny_bundle.path, "onnxruntime", sample_image, " ".join(["the"] * 30))


def test_executorch_kv_cache_has_its_own_arena(tiny_bundle):
    """ExecuTorch's runtime gives a program's host methods one activation arena (running the vision
    encoder between decode steps would overwrite a cache planned there); the caches are planned as shared
    mutable buffers in an arena of their own, which no activation uses."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte = deserialize_pte_binary((tiny_bundle.path / "model.pte").read_bytes())
    plans = {plan.name: plan for plan in getattr(pte, "program", pte).execution_plan}
    arenas: dict[int, set] = {}
    for value in plans["text_decoder"].values:
        alloc = getattr(value.val, "allocation_info", None)
        if alloc is not None:
            info = getattr(value.val, "extra_tensor_info", None)
            arenas.setdefault(alloc.memory_id, set()).add(getattr(info, "fully_qualified_name", None) or "activation")
    (cache_arena,) = [mem for mem, names in arenas.items() if "k_cache_0" in names]
    assert arenas[cache_arena] == {f"{kv}_cache_{i}" for kv in "kv" for i in range(2)}


def test_peak_memory_is_the_measuring_process_own_not_its_parent_at_fork():
    """getrusage's ru_maxrss survives exec: a child of a large process (a sweep) would report the parent's size."""
    import subprocess
    import sys

    import numpy as np

    held = np.ones(60_000_000)  # 480 MB in this (parent) process
    code = "from vlmc.runtimes.profile import peak_rss_mb; print(peak_rss_mb())"
    peak = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert peak < 300 and held.sum() == held.size


def test_onnxruntime_reads_only_the_filled_cache_slots(tiny_bundle):
    """The exported decoder attends over the slots written so far, not all max_context (64) of them: NaN in
    every unwritten slot changes nothing, where the static form's P @ V would carry it into the logits."""
    import numpy as np

    from vlmc.runtimes import open_session

    session = open_session(tiny_bundle, "onnxruntime")
    rng = np.random.default_rng(0)
    prompt, nxt = (rng.standard_normal((1, t, session.shape.hidden_size)).astype(np.float32) for t in (30, 1))

    def run(caches):
        pos = np.arange(30)
        out = session.call("text_decoder", [prompt, pos[None], pos, np.asarray([29]), *caches])
        step = session.call("text_decoder", [nxt, np.asarray([[30]]), np.asarray([30]), np.asarray([0]), *out[1:]])
        return out[0], step[0], step[1:]

    clean = run(session.shape.empty_caches())
    poisoned = run([np.full_like(c, np.nan) for c in session.shape.empty_caches()])
    np.testing.assert_allclose(poisoned[0], clean[0], atol=1e-5)
    np.testing.assert_allclose(poisoned[1], clean[1], atol=1e-5)
    assert all(np.isnan(c[:, :, 31:]).all() and not np.isnan(c[:, :, :31]).any() for c in poisoned[2])


def test_onnxruntime_writes_the_cache_arrays_in_place(tiny_bundle):
    """The session binds each cache the decoder scatters into as its own output: a step writes its row into
    the session's arrays (no new cache arrays), the same values the plain call returns."""
    import numpy as np

    from vlmc.runtimes import open_session

    session = open_session(tiny_bundle, "onnxruntime")
    assert session.in_place == set(session.input_names["text_decoder"][4:])
    rng = np.random.default_rng(1)
    prompt, nxt = (rng.standard_normal((1, t, session.shape.hidden_size)).astype(np.float32) for t in (30, 1))
    session.prefill(prompt)
    before = list(session.caches)
    expected = session.call("text_decoder", [nxt, np.asarray([[30]]), np.asarray([30]), np.asarray([0]), *before])
    logits = session.step(nxt, 30)
    assert all(a is b for a, b in zip(session.caches, before))
    np.testing.assert_allclose(logits, expected[0][0], atol=1e-6)
    for got, want in zip(session.caches, expected[1:]):
        np.testing.assert_array_equal(got, want)
