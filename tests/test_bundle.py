"""Bundle: manifest contents, hash checks, atomic writes, verification that fails the export."""
import json
import shutil

import pytest

from vlmc import api
from vlmc.bundle import Bundle, sha256_of
from vlmc.errors import VlmcError


def test_manifest_describes_every_program(tiny_bundle):
    m = tiny_bundle.manifest
    assert m["format"] == "vlmc-bundle/1" and m["passes"] == []
    assert set(m["targets"]) == {"onnx", "executorch", "coreml"}
    for target, entry in m["targets"].items():
        first_prefill = {"text_prefill"} if target == "executorch" else set()  # its own method there, by default
        assert set(entry["programs"]) == {"vision_encoder", "token_embedding", "text_decoder"} | first_prefill
        for p in entry["programs"].values():
            assert p["file"] in m["files"] and p["inputs"] and p["outputs"]
            assert all({"name", "shape", "dtype"} <= set(io) for io in p["inputs"] + p["outputs"])
    onnx_dec = m["targets"]["onnx"]["programs"]["text_decoder"]
    assert [i["name"] for i in onnx_dec["inputs"][:4]] == ["inputs_embeds", "position_ids", "cache_position", "logits_index"]
    assert onnx_dec["inputs"][4]["shape"] == [1, 2, 64, 16]  # [1, kv_heads, max_context, head_dim]
    # the prompt length by its name, not the exporter's internal symbol
    assert [i["shape"][1] for i in onnx_dec["inputs"][:2]] == ["seq_len", "seq_len"] and onnx_dec["inputs"][2]["shape"] == ["seq_len"]
    et = m["targets"]["executorch"]
    assert et["constant_methods"]["get_max_context_len"] == 64 and et["constant_methods"]["get_max_seq_len"] == 40
    assert m["targets"]["coreml"]["programs"]["text_decoder"]["ops"]  # the MIL op list is recorded
    assert m["recipe"]["max_prompt"] == 40 and (tiny_bundle.path / "recipe.yaml").is_file()
    for name, entry in m["files"].items():
        assert sha256_of(tiny_bundle.path / name) == entry["sha256"]


def test_every_check_ran_and_passed(tiny_bundle):
    v = tiny_bundle.manifest["verification"]
    checks = {(r["target"], r["program"], r["check"]) for r in v["results"]}
    assert ("onnx", "text_decoder", "decode step KV cache") in checks
    assert ("executorch", "text_decoder", "prefill logits") in checks
    assert ("coreml", "text_decoder", "structure (spec loads, I/O match)") in checks
    assert all(r["passed"] for r in v["results"])
    assert max(r["max_abs_err"] for r in v["results"] if r["max_abs_err"] is not None) < 1e-4


def test_a_changed_file_is_refused(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle.path, copy)
    with open(copy / "text_decoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(VlmcError, match="does not match its sha256"):
        Bundle(copy).file("text_decoder.onnx")


def test_failed_verification_leaves_no_bundle(tiny_ckpt, tmp_path):
    out = tmp_path / "strict"
    with pytest.raises(VlmcError) as e:
        api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "max_context": 40, "max_prompt": 32,
                     "verify": {"atol": 1e-12, "rtol": 0.0}}, out)
    assert "verification failed" in str(e.value) and "text_decoder" in str(e.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tiny_bundle):
    with pytest.raises(VlmcError, match="exists"):
        api.compile({"model": tiny_bundle.manifest["model"]["source"], "targets": ["onnx"]}, tiny_bundle.path)


def test_inspect_checks_hashes(tiny_bundle):
    assert json.dumps(api.inspect(tiny_bundle.path))


def test_max_prompt_too_short_for_the_template_is_refused_before_export(tiny_ckpt, tmp_path):
    with pytest.raises(VlmcError, match="'max_prompt': 20 cannot hold"):
        api.compile({"model": str(tiny_ckpt), "targets": ["onnx"], "max_prompt": 20}, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_the_same_recipe_gives_byte_identical_artifacts_on_every_target(tiny_bundle, tmp_path):
    """ONNX, the .pte and the Core ML packages (item ids, metadata) are the same bytes when exported again."""
    again = api.compile(tiny_bundle.manifest["recipe"], tmp_path / "again")
    digests = lambda b: {name: f["sha256"] for name, f in b.manifest["files"].items()}  # noqa: E731
    assert {n.rsplit(".", 1)[-1] for n in digests(again)} >= {"onnx", "pte", "mlpackage"}
    assert digests(again) == digests(tiny_bundle)


def test_each_executorch_method_has_its_own_size(tiny_bundle):
    """`vlmc inspect` reports what each method of the one .pte owns (delegate payloads, the named weights
    they reference, constants), not the whole file per row."""
    from vlmc.runtimes.executorch_runner import method_bytes

    sizes = method_bytes(tiny_bundle.path / "model.pte")
    d = tiny_bundle.manifest["decoder"]
    table = 4 * d["vocab_size"] * d["hidden_size"]
    assert table <= sizes["token_embedding"]["bytes"] < table + 4096  # the embedding table, no other weights
    programs = ("vision_encoder", "token_embedding", "text_decoder")
    assert all(sizes[p]["bytes"] > 0 for p in programs)
    assert sum(sizes[p]["bytes"] for p in programs) <= tiny_bundle.manifest["files"]["model.pte"]["bytes"]
    assert sizes["text_decoder"]["bytes"] > sizes["vision_encoder"]["bytes"] // 10


def test_release_memory_drops_the_caches_that_held_lowered_graphs(tiny_bundle):
    """exir's `is_same_node` cache, the XNNPACK partitioner configs' `why` reporters and torch's fake-tensor
    dispatch cache held lowered delegate modules (and a serialised copy of the weights) after export."""
    import sys

    from executorch.exir.backend.utils import WhyNoPartition, is_same_node
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vlmc.exporter.build import release_memory

    release_memory()
    reporters = [m.why for name, m in list(sys.modules.items())
                 if name.startswith("executorch.backends.") and isinstance(getattr(m, "why", None), WhyNoPartition)]
    assert reporters and all(r.node is None for r in reporters)
    assert is_same_node.cache_info().currsize == 0 and len(FakeTensorMode.cache) == 0


def test_xnnpack_partitions_share_weights_only_while_vlmc_lowers():
    """exir copies every partition before XNNPACK preprocesses any: while vlmc lowers, the copy has its own
    graph but the original's weight tensors (no second copy of the weights); afterwards exir's deep copy is back."""
    import torch
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    from vlmc.exporter.executorch_target import partitions_share_weights

    program = torch.export.export(torch.nn.Linear(8, 4), (torch.zeros(1, 8),))
    with partitions_share_weights():
        copy = XnnpackBackend.copy_exported_program_for_preprocess(program, [])
    assert copy.graph is not program.graph and copy.state_dict is not program.state_dict
    assert all(copy.state_dict[k] is v for k, v in program.state_dict.items())
    copy = XnnpackBackend.copy_exported_program_for_preprocess(program, [])
    assert all(copy.state_dict[k] is not v for k, v in program.state_dict.items())
