"""The TVM target: Relax from torch.export, host and aarch64 libraries, verified; the TVM runner."""
from __future__ import annotations

import pytest

from vlmc import api
from vlmc.errors import VlmcError

PROMPT = "what color is the circle ?"
TEMPLATE = "USER : <image> {prompt} ASSISTANT :"


@pytest.fixture(scope="module")
def tvm_bundle(pruned_every_target):
    """DivPrune keeping 8 of 16 image tokens; TVM libraries for the host and aarch64 (built once per session)."""
    return pruned_every_target


def test_tvm_bundle_is_verified_on_the_host_and_cross_built(tvm_bundle):
    from vlmc.runtimes.tvm_runner import host_architecture

    entry = tvm_bundle.manifest["targets"]["tvm"]
    assert entry["math"].startswith("fast: exp, erf and tanh as TVM's polynomials")  # tvm.fast_math's default
    host = host_architecture()
    for program in ("vision_encoder", "token_embedding", "text_decoder"):
        libs = entry["programs"][program]["libraries"]
        assert set(libs) == {host, "aarch64"} and all(name in tvm_bundle.manifest["files"] for name in libs.values())
    decoder = entry["programs"]["text_decoder"]
    assert decoder["inputs"][0] == {"name": "inputs_embeds", "shape": [1, "seq_len", 64], "dtype": "float32"}
    assert entry["programs"]["vision_encoder"]["outputs"][0]["shape"] == [1, 8, 64]  # DivPrune kept 8 in the graph
    rows = tvm_bundle.manifest["verification"]["results"]
    numeric = [r for r in rows if r["max_abs_err"] is not None]
    assert {r["check"] for r in numeric} >= {"image embeddings", "prefill logits", "decode step KV cache"}
    assert all(r["passed"] for r in rows)
    cross = [r for r in rows if r["check"] == "aarch64 build (ELF shared object)"]
    assert len(cross) == 3 and all("numerics need an aarch64 machine (--verify-on qemu-aarch64" in r["detail"] for r in cross)


def test_tvm_generates_the_eager_tokens(tvm_bundle, sample_image):
    tokens = {rt: api.run(tvm_bundle.path, rt, sample_image, PROMPT, max_new_tokens=6)["tokens"] for rt in ("eager", "tvm")}
    assert tokens["tvm"] == tokens["eager"]


def test_the_session_keeps_one_device_tensor_per_input_while_its_shape_holds(tvm_bundle):
    """Decode steps write their inputs into the tensors the previous step used (a tensor per call cost a tenth
    of a step); a new shape gets a new tensor; the results are those of fresh tensors."""
    import numpy as np

    from vlmc.bundle import Bundle
    from vlmc.runtimes import open_session

    session = open_session(Bundle(tvm_bundle.path), "tvm")
    fresh = open_session(Bundle(tvm_bundle.path), "tvm")
    fresh._device_input = lambda program, index, value: fresh._tvm.runtime.tensor(value.copy(), device=fresh.device)
    width = tvm_bundle.manifest["decoder"]["embed_width"]
    embeds = np.random.default_rng(0).standard_normal((1, 12, width)).astype(np.float32)
    for s in (session, fresh):
        s.prefill(embeds, 1)
    first = session.step(embeds[:, :1], 12)
    kept = session._inputs["text_decoder", 0][0]
    step = embeds[:, 1:2].copy()
    second = session.step(step, 13)
    step[...] = 0  # the caller's array is copied, not kept
    assert session._inputs["text_decoder", 0][0] is kept
    assert np.array_equal(first, fresh.step(embeds[:, :1], 12)) and np.array_equal(second, fresh.step(embeds[:, 1:2], 13))
    session.prefill(embeds[:, :7], 1)
    assert session._inputs["text_decoder", 0][0] is not kept and session._inputs["text_decoder", 0][1].shape == (1, 7, width)


def test_tvm_profile_with_ops(tvm_bundle):
    p = api.profile(tvm_bundle.path, "tvm", warmup=1, iterations=2, ops=True, new_tokens=2)
    assert p["runtime"] == "tvm" and p["device"] == "local"
    assert p["stages"]["vision_encode_ms"] > 0 and p["memory"]["peak_rss_mb"] > 0
    assert {r["program"] for r in p["ops"]} == {"vision_encoder", "token_embedding", "text_decoder"}
    assert all(r["calls"] > 0 and r["total_ms"] >= 0 for r in p["ops"])
    assert any("matmul" in r["op"] for r in p["ops"])


def test_tvm_quantizes_weights_to_int8_and_int4_and_verifies(tiny_ckpt, calibration_jsonl, tmp_path, sample_image):
    """w8a8 on the vision tower and w4 on the decoder: each program's linears hold integer codes (int8 per
    channel; int4 in groups, two per byte), the activations stay float and the manifest says so; the host
    and aarch64 libraries build, the host one is verified against eager by the quantized criterion, and
    generation runs on it."""
    from vlmc.runtimes.tvm_runner import host_architecture

    b = api.compile({"model": str(tiny_ckpt), "targets": ["tvm"], "max_context": 48, "prompt_template": TEMPLATE,
                     "tvm": {"architectures": ["host", "aarch64"]}, "calibration": {"dataset": str(calibration_jsonl), "n": 8},
                     "passes": [{"name": "w8a8", "at": "vision"}, {"name": "w4", "at": "decoder", "group_size": 16}]},
                    tmp_path / "q")
    programs = b.manifest["targets"]["tvm"]["programs"]
    vision, decoder = programs["vision_encoder"]["quantization"], programs["text_decoder"]["quantization"]
    assert vision["scheme"] == "w8a8" and vision["how"].startswith("per-channel symmetric int8 weights")
    assert decoder["scheme"] == "w4" and decoder["group_size"] == 16 and "groups of 16" in decoder["how"]
    assert all(q["activations"].startswith("float32: TVM has no integer-activation CPU kernels") for q in (vision, decoder))
    assert "quantization" not in programs["token_embedding"]
    assert all(set(programs[p]["libraries"]) == {host_architecture(), "aarch64"} for p in programs)
    rows = [r for r in b.manifest["verification"]["results"] if r["target"] == "tvm" and r["max_abs_err"] is not None]
    assert all(r["passed"] for r in rows) and {r["program"] for r in rows if r.get("quantized")} == {"vision_encoder", "text_decoder"}
    assert all(r["top1_agrees"] for r in rows if "top1_agrees" in r)
    assert len(api.run(b.path, "tvm", sample_image, PROMPT, max_new_tokens=4)["tokens"]) == 4


def test_in_llm_token_passes_build_with_tvm_and_give_eagers_tokens(tiny_ckpt, tmp_path, sample_image):
    """FastV's full-prompt prefill is built at max_prompt rows (the runner right-pads the prompt; with a dynamic
    length the rows after the drop are a symbolic expression TVM's scheduler cannot split)."""
    from tests.helpers import assert_verified_with_the_same_tokens

    b = api.compile({"model": str(tiny_ckpt), "targets": ["tvm"], "max_context": 48, "prompt_template": TEMPLATE,
                     "tvm": {"architectures": ["host"]}, "passes": [{"name": "fastv", "keep": 5, "at": "decoder.layer[0]"}]},
                    tmp_path / "f")
    prefill = b.manifest["targets"]["tvm"]["programs"]["text_prefill"]
    assert prefill["inputs"][0]["shape"] == [1, b.manifest["decoder"]["max_prompt"], b.manifest["decoder"]["embed_width"]]
    assert ("tvm", "text_prefill") in {(r["target"], r["program"]) for r in b.manifest["verification"]["results"]}
    assert_verified_with_the_same_tokens(b, sample_image, ("eager", "tvm"))


@pytest.mark.slow  # a TVM build per method (-m slow)
@pytest.mark.parametrize("spec", [
    {"name": "v2drop", "at": "decoder.layer[0]", "keep": 5},
    {"name": "duet", "at": "decoder.layer[0]", "dominant": 7, "contextual": 3, "keep": 5},
    {"name": "horizon", "at": "decoder.layer[0]", "keep": 5},
    {"name": "flashcache", "keep": 6},
    {"name": "attentionpack", "keep": 4, "rank": 8, "light_rank": 2},
], ids=lambda s: s["name"])
def test_every_kind_of_in_llm_stage_builds_with_tvm(tiny_ckpt, calibration_jsonl, tmp_path, sample_image, spec):
    """Row drops, a vision-stage + LLM-stage pair, an evicting and a packing KV stage: each verifies on TVM
    and generates eager's tokens."""
    from tests.helpers import assert_verified_with_the_same_tokens

    b = api.compile({"model": str(tiny_ckpt), "targets": ["tvm"], "max_context": 48, "prompt_template": TEMPLATE,
                     "tvm": {"architectures": ["host"]}, "calibration": {"dataset": str(calibration_jsonl), "n": 8},
                     "passes": [spec]}, tmp_path / spec["name"])
    assert_verified_with_the_same_tokens(b, sample_image, ("eager", "tvm"))


def test_tvm_tuning_records_must_exist(tiny_ckpt, tmp_path):
    (tmp_path / "records").mkdir()
    with pytest.raises(VlmcError, match="tvm.tuning_records.*holds no MetaSchedule records"):
        api.compile({"model": str(tiny_ckpt), "targets": ["tvm"], "tvm": {"tuning_records": str(tmp_path / "records")}}, tmp_path / "b")


def test_tvm_recipe_fields_are_checked():
    from vlmc.recipe import build

    for fields, message in (({"architectures": ["riscv64"]}, "tvm.architectures"), ({"tune_trials": -1}, "tvm.tune_trials"),
                            ({"mcpu": "native; rm -rf /"}, "tvm.mcpu")):
        with pytest.raises(VlmcError, match=message):
            build({"targets": ["tvm"], "tvm": fields})


@pytest.mark.slow
def test_tuning_records_are_saved_and_reused(tiny_ckpt, tmp_path):
    """MetaSchedule records land in the bundle; a second export reuses them without new trials."""
    recipe = {"model": str(tiny_ckpt), "targets": ["tvm"], "max_context": 64, "max_prompt": 40, "prompt_template": TEMPLATE}
    tuned = api.compile({**recipe, "tvm": {"tune_trials": 16}}, tmp_path / "tuned")
    records = tuned.path / "tvm_tuning"
    lines = (records / "database_tuning_record.json").read_text().splitlines()
    workloads = (records / "database_workload.json").read_text().splitlines()
    # the 16 trials, and each workload's default schedule offered as one more candidate
    assert len(lines) == 16 + len(workloads) and len(workloads) >= 2
    assert tuned.manifest["targets"]["tvm"]["tuning"]["vision_encoder"]["trials"] == 16
    reused = api.compile({**recipe, "tvm": {"tuning_records": str(records)}}, tmp_path / "reused")
    assert reused.manifest["targets"]["tvm"]["tuning"]["vision_encoder"]["reused"] == str(records)
    assert all(r["passed"] for r in reused.manifest["verification"]["results"])
    again = (reused.path / "tvm_tuning" / "database_tuning_record.json").read_text().splitlines()
    assert len(again) == len(lines)  # the defaults are on record already: not timed and added twice


_POOL_SIZE = """
import os, sys
from vlmc.runtimes.tvm_runner import physical_cores, size_thread_pool
size_thread_pool()
import tvm
print(tvm.runtime.num_threads(), physical_cores(), os.environ.get("TVM_NUM_THREADS"))
"""


@pytest.mark.parametrize("user_threads", [None, "1"])
def test_the_runner_sizes_tvms_thread_pool_to_the_physical_cores_unless_the_user_chose(user_threads):
    """TVM alone halves the logical CPUs on x86 (it assumes hyperthreads): one thread on this 2-core host."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    if user_threads:
        env["TVM_NUM_THREADS"] = user_threads
    out = subprocess.run([sys.executable, "-c", _POOL_SIZE], env=env, capture_output=True, text=True, check=True)
    pool, cores, variable = out.stdout.split()
    assert 1 <= int(cores) <= len(os.sched_getaffinity(0))
    assert int(pool) == (int(user_threads) if user_threads else int(cores))
    assert variable == (user_threads or cores)
