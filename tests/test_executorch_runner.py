"""ExecuTorch's stock MultimodalRunner (the runner of its Android / iOS apps) runs a vlmc bundle unchanged."""
import numpy as np
import pytest
import torch

from vlmc import api
from vlmc.runtimes.image import load_image

BEFORE, AFTER = "USER : ", " what color is the circle ? ASSISTANT :"


def stock_runner_pieces(bundle, image_path):
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (the llama:: kernels)
    from executorch.extension.llm.runner import GenerationConfig, MultimodalRunner, make_image_input, make_text_input

    runner = MultimodalRunner(str(bundle.path / "model.pte"), str(bundle.path / "tokenizer.json"))
    image = torch.from_numpy(np.ascontiguousarray(load_image(image_path, bundle.manifest["prompt"]["image_size"])))
    pieces = []
    runner.generate([make_text_input(BEFORE), make_image_input(image), make_text_input(AFTER)],
                    GenerationConfig(max_new_tokens=8, temperature=0.0, echo=False), token_callback=pieces.append)
    return [p for p in pieces if p and p != "</s>"]


@pytest.fixture(scope="module")
def divprune_bundle(tiny_ckpt, tmp_path_factory):
    return api.compile({"model": str(tiny_ckpt), "targets": ["executorch"], "max_context": 48,
                        "prompt_template": "USER : <image> {prompt} ASSISTANT :", "passes": [{"name": "divprune", "keep": 6}]},
                       tmp_path_factory.mktemp("stock") / "div")


@pytest.mark.parametrize("which", ["tiny_bundle", pytest.param("divprune_bundle", marks=pytest.mark.slow)])
def test_stock_multimodal_runner_generates_vlmc_tokens(which, request, sample_image):
    bundle = request.getfixturevalue(which)
    ours = api.run(bundle.path, "executorch", sample_image, AFTER.split("ASSISTANT")[0].strip(), max_new_tokens=8)
    assert stock_runner_pieces(bundle, sample_image) == ours["pieces"]


@pytest.mark.parametrize("tie, how, copies, note", [(True, "once", 1, "stored once"), (True, "twice", 2, "stored twice"),
                                                      (False, "once", 1, "")])
def test_a_tied_embedding_is_stored_once_in_the_pte_when_asked(tmp_path, sample_image, tie, how, copies, note):
    """With `executorch.tied_embedding: once` the LM head of a tied model reads the token_embedding's table (its
    XNNPACK linear takes the weight as an input), so the table's bytes appear once in the .pte; by default
    the head keeps its own static copy; an untied head always has its own weight."""
    from tests.helpers import SPACED_TEMPLATE, assert_verified_with_the_same_tokens, make_hf_llava
    from vlmc.models_zoo import load

    ckpt = tmp_path / "ckpt"
    make_hf_llava(ckpt, tie=tie)
    b = api.compile({"model": str(ckpt), "targets": ["executorch"], "max_context": 48, "prompt_template": SPACED_TEMPLATE,
                     "executorch": {"tied_embedding": how}}, tmp_path / "b")
    pte = (b.path / "model.pte").read_bytes()
    assert pte.count(load(str(ckpt)).model.embed_tokens.weight.detach().numpy().astype(np.float32).tobytes()) == copies
    assert b.manifest["targets"]["executorch"].get("tied_embedding", "").split(":")[0] == note
    assert_verified_with_the_same_tokens(b, sample_image, ("eager", "executorch"))


def test_onnx_stores_a_tied_table_once(tmp_path, sample_image):
    """The ONNX programs' weights share one file: the LM head reads token_embedding's table through a Transpose
    (the exporter had folded the head's transpose into a second copy)."""
    from tests.helpers import SPACED_TEMPLATE, assert_verified_with_the_same_tokens, make_hf_llava
    from vlmc.models_zoo import load

    ckpt = tmp_path / "ckpt"
    make_hf_llava(ckpt, tie=True)
    b = api.compile({"model": str(ckpt), "targets": ["onnx"], "max_context": 48, "prompt_template": SPACED_TEMPLATE},
                    tmp_path / "b")
    table = load(str(ckpt)).model.embed_tokens.weight.detach().numpy().astype(np.float32)
    stored = b"".join(p.read_bytes() for p in sorted(b.path.iterdir()) if p.suffix in (".onnx", ".data"))
    assert stored.count(table.tobytes()) == 1 and stored.count(np.ascontiguousarray(table.T).tobytes()) == 0
    entry = b.manifest["targets"]["onnx"]
    assert entry["tied_embedding"].startswith("stored once")
    assert entry["programs"]["token_embedding"]["shared_bytes"] == table.nbytes == entry["weights"]["saved_bytes"]
    assert_verified_with_the_same_tokens(b, sample_image, ("eager", "onnxruntime"))


@pytest.mark.parametrize("shape", [(2, 4, 9, 8), (3, 9, 8)])
def test_unmasked_attention_as_batched_products_equals_torch(shape):
    """A mask-free SDPA (ExecuTorch's vision encoders) becomes bmm / softmax / bmm with torch's result; with a
    mask or causality torch's own decomposition stays."""
    from vlmc.exporter.executorch_target import attention_as_batched_products

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    for scale in (None, 0.3):
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
        torch.testing.assert_close(attention_as_batched_products(q, k, v, scale=scale), want, atol=1e-6, rtol=1e-5)
    mask = torch.ones(shape[-2], shape[-2], dtype=torch.bool)
    assert attention_as_batched_products(q, k, v, attn_mask=mask) is NotImplemented  # torch's guard stays
    assert attention_as_batched_products(q, k, v, is_causal=True) is NotImplemented


def test_unmasked_attention_lowers_to_one_xnnpack_delegate(tmp_path):
    """A ViT's linear -> attention -> linear lowers to one XNNPACK delegate, no portable op left (torch's own
    decomposition leaves a -inf guard and expand copies outside it), and runs like eager."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from executorch.runtime import Runtime

    from vlmc.exporter.executorch_target import XNNPACK_DECOMPOSITIONS

    class Block(torch.nn.Module):  # a ViT's attention
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.out = (torch.nn.Linear(8, 8) for _ in range(4))

        def forward(self, x):
            q, k, v = (p(x).view(1, 9, 2, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
            return self.out(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))

    block, x = Block().eval(), torch.randn(1, 9, 8, generator=torch.Generator().manual_seed(0))
    ep = torch.export.export(block, (x,)).run_decompositions(XNNPACK_DECOMPOSITIONS)
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()],
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False))
    calls = [str(n.target) for n in edge.exported_program().graph.nodes if n.op == "call_function"]
    assert [c for c in calls if "getitem" not in c] == ["executorch_call_delegate"]
    (tmp_path / "block.pte").write_bytes(edge.to_executorch().buffer)
    method = Runtime.get().load_program(str(tmp_path / "block.pte")).load_method("forward")
    torch.testing.assert_close(method.execute([x])[0], block(x), atol=1e-5, rtol=1e-5)
