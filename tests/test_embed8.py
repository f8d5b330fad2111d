"""`embed8`: the token table stored as int8 codes with one float scale per row, on every target."""
import pytest
import torch

from tests.helpers import SPACED_TEMPLATE, assert_verified_with_the_same_tokens, make_hf_llava
from vlmc import api, passes
from vlmc.errors import VlmcError
from vlmc.models_zoo import load
from vlmc.passes.embedding import Int8Embedding
from vlmc.sweep import parse_quant_config

EMBED8 = {"name": "embed8"}
VOCAB = 2048  # a table large enough that its bytes dominate the tiny model's


@pytest.fixture(scope="module")
def tied_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tied_llava")
    make_hf_llava(path, vocab_size=VOCAB, tie=True)
    return path


def test_rows_are_int8_codes_on_their_absmax_grid():
    weight = torch.randn(50, 24, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 5, 50)[:, None]
    table = Int8Embedding(weight)
    assert table.codes.dtype == torch.int8 and table.codes.shape == (50, 24) and table.scales.shape == (50, 1)
    assert torch.equal(table.codes.abs().amax(1), torch.full((50,), 127, dtype=torch.int8))  # each row's absmax is +-127
    assert bool(((table.weight - weight).abs() <= table.scales / 2 + 1e-7).all())  # round to nearest
    ids = torch.tensor([[3, 0, 49, 3]])
    assert torch.equal(table(ids), table.weight[ids])


def test_a_tied_head_keeps_the_float_table_and_logits_stay_close(tied_ckpt):
    ref = load(str(tied_ckpt)).model.eval()
    m = load(str(tied_ckpt)).model.eval()
    float_table = m.embed_tokens.weight.detach().clone()
    records, _ = passes.apply(m, [EMBED8])
    assert records[0]["name"] == "embed8" and records[0]["at"] == "decoder.embedding"
    assert isinstance(m.embed_tokens, Int8Embedding) and not m.tied_head
    assert torch.equal(m.lm_head.weight, float_table)
    ids = torch.tensor([[1, 17, 18] + [4] * 16 + [19, 20]])
    pixels = m.normalize(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8))
    with torch.no_grad():
        want, got = ref(ids, pixels)[0, -1], m(ids, pixels)[0, -1]
    assert 0 < float((got - want).norm() / want.norm()) < 0.02


def test_embed8_is_given_once(tied_ckpt):
    m = load(str(tied_ckpt)).model
    with pytest.raises(VlmcError, match="pass embed8: given more than once"):
        passes.apply(m, [EMBED8, EMBED8])


def test_the_sweep_takes_it_as_a_storage_option():
    assert [s["name"] for s in parse_quant_config("w4:at=decoder+embed8")] == ["w4", "embed8"]


def test_onnx_and_executorch_store_the_table_in_8_bits_and_verify(tied_ckpt, tmp_path, sample_image):
    import onnx

    from vlmc.runtimes.executorch_runner import method_bytes

    small = api.compile({"model": str(tied_ckpt), "targets": ["onnx", "executorch"], "max_context": 48,
                         "prompt_template": SPACED_TEMPLATE, "passes": [EMBED8],
                         "executorch": {"text_prefill": False}},  # the tables are the token_embedding's and the head's
                        tmp_path / "embed8")
    assert_verified_with_the_same_tokens(small, sample_image, runtimes=("eager", "onnxruntime", "executorch"))
    onnx_entry = small.manifest["targets"]["onnx"]
    assert onnx_entry["tied_embedding"].startswith("untied by pass embed8")
    graph = onnx.load(str(small.path / onnx_entry["programs"]["token_embedding"]["file"]), load_external_data=False).graph
    tables = [t for t in graph.initializer if list(t.dims) == [VOCAB, 64]]
    assert [t.data_type for t in tables] == [onnx.TensorProto.INT8]
    # ExecuTorch's default stores a tied table twice in float (token_embedding, the head's XNNPACK copy):
    # now once in float (the head) and once in 8 bits with a float scale per row (token_embedding's own bytes)
    weight = load(str(tied_ckpt)).model.embed_tokens.weight.detach()
    pte = (small.path / small.manifest["targets"]["executorch"]["programs"]["token_embedding"]["file"]).read_bytes()
    assert pte.count(weight.numpy().tobytes()) == 1 and pte.count(Int8Embedding(weight).codes.numpy().tobytes()) == 1
    own = method_bytes(small.path / "model.pte")["token_embedding"]["bytes"]
    assert VOCAB * 64 + VOCAB * 4 <= own < VOCAB * 64 + VOCAB * 4 + 4096, own


def _weights_bytes(mlpackage) -> int:
    return sum(f.stat().st_size for f in (mlpackage / "Data" / "com.apple.CoreML" / "weights").iterdir())


def test_core_ml_stores_the_table_in_8_bits(tied_ckpt, tmp_path):
    """Core ML runs on macOS only; here the converted token_embedding's weights file is int8 codes plus scales,
    not the fp16 table coremltools writes by default."""
    b = api.compile({"model": str(tied_ckpt), "targets": ["coreml"], "max_context": 48, "prompt_template": SPACED_TEMPLATE,
                     "passes": [EMBED8]}, tmp_path / "b")
    assert all(r["passed"] for r in b.manifest["verification"]["results"])
    stored = _weights_bytes(b.path / b.manifest["targets"]["coreml"]["programs"]["token_embedding"]["file"])
    assert VOCAB * 64 <= stored < VOCAB * 64 * 1.1  # int8 codes (the fp16 table would be twice that)


@pytest.mark.slow
def test_tvm_builds_and_verifies_the_int8_table(tied_ckpt, tmp_path):
    b = api.compile({"model": str(tied_ckpt), "targets": ["tvm"], "max_context": 48, "prompt_template": SPACED_TEMPLATE,
                     "passes": [EMBED8]}, tmp_path / "b")
    checks = b.manifest["verification"]["results"]
    assert checks and all(r["passed"] for r in checks)
    assert next(r for r in checks if r["program"] == "token_embedding")["max_abs_err"] == 0.0
