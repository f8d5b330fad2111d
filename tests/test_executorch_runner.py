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


@pytest.fixture(scope="module")
def tied_twice_bundle(tmp_path_factory):
    """A tied checkpoint on ExecuTorch with the head's own copy of the table and no text_prefill method: the
    cases of two tests, one export."""
    from tests.helpers import SPACED_TEMPLATE, make_hf_llava

    ckpt = tmp_path_factory.mktemp("tied") / "ckpt"
    make_hf_llava(ckpt, tie=True)
    return api.compile({"model": str(ckpt), "targets": ["executorch"], "max_context": 48, "prompt_template": SPACED_TEMPLATE,
                        "executorch": {"tied_embedding": "twice", "text_prefill": False}}, ckpt.parent / "b")


def table_copies_in_pte(bundle) -> int:
    from vlmc.models_zoo import load

    table = load(bundle.manifest["recipe"]["model"]).model.embed_tokens.weight.detach().numpy().astype(np.float32)
    return (bundle.path / "model.pte").read_bytes().count(table.tobytes())


@pytest.mark.parametrize("tie, how, copies, note", [(True, "once", 1, "stored once"), (True, "twice", 2, "stored twice"),
                                                    pytest.param(False, "once", 1, "", marks=pytest.mark.slow)])
def test_a_tied_embedding_is_stored_once_in_the_pte_when_asked(tmp_path, sample_image, request, tie, how, copies, note):
    """With `executorch.tied_embedding: once` the LM head of a tied model reads the token_embedding's table (its
    XNNPACK linear takes the weight as an input), so the table's bytes appear once in the .pte, however many
    decoder methods (text_decoder, text_prefill) name the head; by default the head keeps its own static
    copy; an untied head always has its own weight."""
    from tests.helpers import SPACED_TEMPLATE, assert_verified_with_the_same_tokens, make_hf_llava

    if (tie, how) == (True, "twice"):
        b = request.getfixturevalue("tied_twice_bundle")
    else:
        make_hf_llava(tmp_path / "ckpt", tie=tie)
        b = api.compile({"model": str(tmp_path / "ckpt"), "targets": ["executorch"], "max_context": 48,
                         "prompt_template": SPACED_TEMPLATE, "executorch": {"tied_embedding": how, "text_prefill": tie}},
                        tmp_path / "b")
    assert b.manifest["recipe"]["executorch"]["tied_embedding"] == how
    assert table_copies_in_pte(b) == copies
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


@pytest.mark.parametrize("shape", [(7, 12), (2, 5, 12), (1, 2, 3, 12)])
def test_norms_as_products_equal_torch(shape):
    """Layer norm and a mean over the last dimension as products with a constant column give torch's numbers;
    other means are left to torch's decomposition."""
    from vlmc.exporter.executorch_target import layer_norm_as_products, mean_of_last_dim_as_product

    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(*shape, generator=g) * 3 + 1, torch.randn(12, generator=g), torch.randn(12, generator=g)
    torch.testing.assert_close(mean_of_last_dim_as_product(x, [-1], keepdim=True), x.mean(-1, keepdim=True))
    torch.testing.assert_close(mean_of_last_dim_as_product(x, [x.dim() - 1]), x.mean(-1))
    torch.testing.assert_close(layer_norm_as_products(x, [12], weight, bias, 1e-5),
                               torch.nn.functional.layer_norm(x, [12], weight, bias, 1e-5), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer_norm_as_products(x, [12]), torch.nn.functional.layer_norm(x, [12]), atol=1e-5, rtol=1e-5)
    assert mean_of_last_dim_as_product(x, [0]) is NotImplemented
    assert mean_of_last_dim_as_product(x, None) is NotImplemented
    assert mean_of_last_dim_as_product(x, [-1], dtype=torch.float64) is NotImplemented
    assert layer_norm_as_products(x, list(shape[-2:])) is NotImplemented


def test_a_vit_block_lowers_to_one_xnnpack_delegate(tmp_path):
    """A ViT's layer norm -> linear -> attention -> linear lowers to one XNNPACK delegate, no portable op left
    (torch's own attention decomposition leaves a -inf guard and expand copies outside it, and XNNPACK has no
    layer norm), and runs like eager."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from executorch.runtime import Runtime

    from vlmc.exporter.executorch_target import decompositions_for, fold_input_free_nodes

    class Block(torch.nn.Module):  # a ViT's attention
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(8)
            self.q, self.k, self.v, self.out = (torch.nn.Linear(8, 8) for _ in range(4))
            torch.nn.init.normal_(self.norm.weight), torch.nn.init.normal_(self.norm.bias)

        def forward(self, x):
            x = self.norm(x)
            q, k, v = (p(x).view(1, 9, 2, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
            return self.out(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))

    block, x = Block().eval(), torch.randn(1, 9, 8, generator=torch.Generator().manual_seed(0))
    ep = fold_input_free_nodes(torch.export.export(block, (x,)).run_decompositions(decompositions_for("vision_encoder")))
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()],
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False))
    calls = [str(n.target) for n in edge.exported_program().graph.nodes if n.op == "call_function"]
    assert [c for c in calls if "getitem" not in c] == ["executorch_call_delegate"]
    (tmp_path / "block.pte").write_bytes(edge.to_executorch().buffer)
    method = Runtime.get().load_program(str(tmp_path / "block.pte")).load_method("forward")
    torch.testing.assert_close(method.execute([x])[0], block(x), atol=1e-5, rtol=1e-5)


def test_input_free_nodes_are_computed_once_at_export(tmp_path):
    """What depends on no input becomes a constant of the program (DivPrune's identity mask, arange offsets);
    what reads a parameter or an input, and a result above the size limit, stays computed; the .pte runs
    like eager."""
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from executorch.runtime import Runtime

    from vlmc.exporter.executorch_target import FOLDED_CONSTANT_LIMIT, fold_input_free_nodes

    side = int((FOLDED_CONSTANT_LIMIT // 4) ** 0.5) + 1  # a float [side, side] is just above the limit

    class Selection(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(6, 6, generator=torch.Generator().manual_seed(1)))

        def forward(self, x):
            sim = x @ (self.w * 2.0).t()
            mask = torch.eye(6) * 3.0 - torch.arange(6, dtype=torch.float32) * 1e-3
            big = torch.ones(side, side).sum() / side ** 2
            return (sim - mask).amax(-1) * big

    model, x = Selection().eval(), torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    ep = fold_input_free_nodes(torch.export.export(model, (x,)))
    ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert not any(op.startswith(("aten.eye", "aten.arange", "aten.eq")) for op in ops), ops
    assert "aten.mul.Tensor" in ops and "aten.ones.default" in ops  # the parameter's product and the large result
    assert [s.kind.name for s in ep.graph_signature.input_specs].count("CONSTANT_TENSOR") == 1  # the folded mask
    edge = to_edge_transform_and_lower(ep, compile_config=EdgeCompileConfig(_check_ir_validity=False))
    (tmp_path / "m.pte").write_bytes(edge.to_executorch().buffer)
    method = Runtime.get().load_program(str(tmp_path / "m.pte")).load_method("forward")
    torch.testing.assert_close(method.execute([x])[0], model(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 2), (8, 1)])
def test_own_rows_attention_equals_masked_sdpa(heads, kv_heads):
    """text_prefill's attention (grouped heads on one batch axis, the mask an additive bias) equals SDPA over
    repeated KV heads under the causal, a sliding-window and a full mask; the delegable causal bias masks
    exactly what the boolean causal mask does."""
    from vlmc.models_zoo.layers import causal_bias, own_rows_attention
    from vlmc.models_zoo.programs import plain_sdpa

    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    t = 11
    q, k, v = torch.randn(1, heads, t, 8, generator=g), torch.randn(1, kv_heads, t, 8, generator=g), torch.randn(1, kv_heads, t, 8, generator=g)
    rows = torch.arange(t)
    causal = rows[None, :] <= rows[:, None]
    for mask in (causal, causal & (rows[:, None] - rows[None, :] < 3), torch.ones(t, t, dtype=torch.bool)):
        bias = torch.where(mask, 0.0, float("-inf"))
        torch.testing.assert_close(own_rows_attention(q, k, v, bias), plain_sdpa(q, k, v, mask), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(own_rows_attention(q, k, v, causal_bias(t)), plain_sdpa(q, k, v, causal), atol=1e-6, rtol=1e-5)
    assert (causal_bias(t) == 0).equal(causal) and causal_bias(t).min() == -1e9


def test_own_rows_attention_lowers_into_xnnpack_at_any_prompt_length(tmp_path):
    """Grouped-head causal attention over a dynamic number of rows: every product, the softmax and the causal
    bias run inside XNNPACK (outside stay the row index arange and copies), and the .pte equals eager at two
    lengths. llama::custom_sdpa, which text_decoder needs for its cache, runs outside it."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from executorch.runtime import Runtime

    from vlmc.models_zoo.layers import causal_bias, own_rows_attention

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = torch.nn.Linear(16, 16), torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)

        def forward(self, x):
            t = x.shape[1]
            q = self.q(x).view(1, t, 4, 4).transpose(1, 2)
            k, v = (p(x).view(1, t, 2, 4).transpose(1, 2) for p in (self.k, self.v))
            return own_rows_attention(q, k, v, causal_bias(t))

    block, g = Block().eval(), torch.Generator().manual_seed(0)
    ep = torch.export.export(block, (torch.randn(1, 12, 16),), dynamic_shapes=({1: torch.export.Dim("t", min=2, max=32)},))
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()],
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False))
    outside = [str(n.target).split(":")[1].split(">")[0].strip() for n in edge.exported_program().graph.nodes
               if n.op == "call_function" and "Edge" in str(n.target)]
    arithmetic = [op for op in outside if op.split(".")[1] in ("bmm", "_softmax", "add", "sub", "mul", "clamp", "where", "le", "expand_copy")]
    assert "aten.arange.start_step" in outside and not arithmetic, outside  # copies (cat, views) may stay outside
    (tmp_path / "block.pte").write_bytes(edge.to_executorch().buffer)
    method = Runtime.get().load_program(str(tmp_path / "block.pte")).load_method("forward")
    for t in (5, 29):
        x = torch.randn(1, t, 16, generator=g)
        torch.testing.assert_close(method.execute([x])[0], block(x), atol=1e-5, rtol=1e-5)


def test_vlmc_prefills_through_text_prefill_with_the_decoders_logits(tiny_bundle):
    """The .pte has a text_prefill method beside text_decoder; vlmc's session prefills through it, the stock
    runner's path (text_decoder from slot 0) gives the same logits, and a decode step reads the cache either
    wrote the same way."""
    from vlmc.runtimes.base import DecoderShape
    from vlmc.runtimes.executorch_runner import ExecuTorchSession

    entry = tiny_bundle.manifest["targets"]["executorch"]["programs"]["text_prefill"]
    assert entry["min_prompt_len"] == 2 and "inside XNNPACK" in entry["role"]
    shape = DecoderShape.from_manifest(tiny_bundle.manifest)
    session = ExecuTorchSession(tiny_bundle.path / "model.pte", shape)
    assert "text_prefill" in session.methods
    embeds = np.random.default_rng(0).standard_normal((1, 23, shape.hidden_size)).astype(np.float32)
    step = np.random.default_rng(1).standard_normal((1, 1, shape.hidden_size)).astype(np.float32)
    ours = session.prefill(embeds, 3)
    after_ours = session.step(step, 23)
    stock = session.call("text_decoder", [embeds, np.asarray([0], np.int64)])[0][0]
    after_stock = session.step(step, 23)
    np.testing.assert_allclose(ours, stock, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(after_ours, after_stock, atol=1e-5, rtol=1e-5)
    checks = {(r["program"], r["check"]) for r in tiny_bundle.manifest["verification"]["results"] if r["target"] == "executorch"}
    assert {("text_prefill", "prefill logits"), ("text_decoder", "prefill logits")} <= checks


def test_text_prefill_off_leaves_the_stock_methods_only(tiny_ckpt, tied_twice_bundle, tmp_path, sample_image):
    """`executorch: {text_prefill: false}`: no second method (its packed weights are not held twice) and
    vlmc prefills through text_decoder; in-LLM token stages, which need the method, are refused first."""
    from vlmc.errors import VlmcError
    from vlmc.runtimes.executorch_runner import ExecuTorchSession
    from vlmc.runtimes.base import DecoderShape

    with pytest.raises(VlmcError, match="executorch.text_prefill: false, but in-LLM token stages"):
        api.compile({"model": str(tiny_ckpt), "targets": ["executorch"], "max_context": 48, "executorch": {"text_prefill": False},
                     "prompt_template": "USER : <image> {prompt} ASSISTANT :", "passes": [{"name": "fastv", "keep": 6, "at": "decoder.layer[0]"}]}, tmp_path / "fastv")
    assert not (tmp_path / "fastv").exists()
    b = tied_twice_bundle
    assert b.manifest["recipe"]["executorch"]["text_prefill"] is False
    assert set(b.manifest["targets"]["executorch"]["programs"]) == {"vision_encoder", "token_embedding", "text_decoder"}
    session = ExecuTorchSession(b.path / "model.pte", DecoderShape.from_manifest(b.manifest))
    assert "text_prefill" not in session.methods and "text_prefill" not in session.program.method_names
    assert api.run(b.path, "executorch", sample_image, "what color is the circle ?", max_new_tokens=4)["pieces"]
