"""vlmc's additions to TVM's importer: attention converted whole, transposes that cancel removed, fast math."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

tvm = pytest.importorskip("tvm")

from vlmc.exporter import tvm_ops  # noqa: E402


def _compiled(module: torch.nn.Module, args: tuple, fast_math: bool = True):
    """The module through vlmc's import path (decompositions, converters, rewrite), built for the host."""
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    with torch.no_grad():
        ep = torch.export.export(module.eval(), args).run_decompositions(tvm_ops.decompositions())
    mod = from_exported_program(ep, custom_convert_map=tvm_ops.CONVERTERS, run_ep_decomposition=False)
    mod = tvm_ops.rewrite(mod, fast_math)
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())

    def run(*inputs):
        out = vm["main"](*[tvm.runtime.tensor(x.numpy()) for x in inputs])
        return out[0].numpy() if not hasattr(out, "numpy") else out.numpy()

    return mod, run


class HeadsAttention(torch.nn.Module):
    """Heads split by a transpose, attended, merged by the inverse transpose: the vision encoder's shape."""

    def __init__(self, heads: int = 4, kv_heads: int = 4, **sdpa):
        super().__init__()
        self.heads, self.kv_heads, self.sdpa = heads, kv_heads, sdpa

    def forward(self, q, k, v, mask=None):
        b, t, _ = q.shape
        split = lambda x, h: x.view(b, x.shape[1], h, -1).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(q, self.heads), split(k, self.kv_heads), split(v, self.kv_heads),
                                             attn_mask=mask, **self.sdpa)
        return out.transpose(1, 2).reshape(b, t, -1)


def _qkv(t=7, s=7, width=32, kv_width=32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, t, width, generator=g), torch.randn(1, s, kv_width, generator=g),
            torch.randn(1, s, kv_width, generator=g))


def test_attention_reads_the_heads_in_place_and_matches_torch():
    q, k, v = _qkv()
    module = HeadsAttention()
    mod, run = _compiled(module, (q, k, v))
    # one transposed copy, the keys' [B,H,d,S]; q, v and the output are read and made as the projections lay them out
    assert re.findall(r"R\.permute_dims\(\w+, axes=(\[[0-9, ]+\])\)", mod.script()) == ["[0, 2, 3, 1]"]
    # one kernel for scores, softmax and values, the keys padded to whole vectors (7 -> 16)
    assert re.findall(r"R\.call_tir\(cls\.(\w+)", mod.script()) == ["attention"]
    assert "R.Tensor((1, 4, 8, 16)" in mod.script()
    np.testing.assert_allclose(run(q, k, v), module(q, k, v).numpy(), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("case", ["bool_mask_with_an_empty_row", "float_mask", "causal", "grouped_heads", "scale"])
def test_attention_variants_match_torch(case):
    q, k, v = _qkv(t=5, s=9)
    mask = None
    module = HeadsAttention()
    if case == "bool_mask_with_an_empty_row":
        mask = torch.rand(5, 9, generator=torch.Generator().manual_seed(1)) > 0.4
        mask[2] = False  # a query that sees nothing: torch gives 0 there, not NaN
    elif case == "float_mask":
        mask = torch.randn(1, 1, 5, 9)
    elif case == "causal":
        q, k, v = _qkv(t=6, s=6)
        module = HeadsAttention(is_causal=True)
    elif case == "grouped_heads":
        q, k, v = _qkv(t=5, s=9, width=32, kv_width=16)
        module = HeadsAttention(heads=4, kv_heads=2, enable_gqa=True)
    elif case == "scale":
        module = HeadsAttention(scale=0.3)
    args = (q, k, v) + ((mask,) if mask is not None else ())
    _, run = _compiled(module, args)
    expected = module(*args).numpy()
    got = run(*args)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, atol=2e-6, rtol=1e-5)


class Activations(torch.nn.Module):
    def forward(self, x):
        return torch.cat([torch.sigmoid(x), F.silu(x), F.gelu(x), F.gelu(x, approximate="tanh"), torch.exp(x),
                          torch.tanh(x), torch.softmax(x, -1)], -1)


@pytest.mark.parametrize("fast_math", [True, False])
def test_activations_match_torch_with_and_without_fast_math(fast_math):
    """The polynomial kernels stay within float32 rounding of torch over the range activations see."""
    x = torch.linspace(-12, 12, 4 * 64).reshape(4, 64)
    mod, run = _compiled(Activations(), (x,), fast_math)
    script = mod.script()
    assert ("fast_exp" in script or "fast_tanh" in script) == fast_math, script[:400]
    np.testing.assert_allclose(run(x), Activations()(x).numpy(), atol=2e-6, rtol=2e-5)


class Block(torch.nn.Module):
    """A transformer block's kernels: norm, linear + bias, activation, linear, softmax over rows."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.norm = torch.nn.LayerNorm(48)
        self.up, self.down = torch.nn.Linear(48, 72), torch.nn.Linear(72, 40)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        return torch.softmax(self.down(F.silu(self.up(self.norm(x)))), -1)


@pytest.mark.parametrize("rows", [16, "symbolic"])
def test_default_schedules_cover_every_kernel_and_keep_the_numbers(rows):
    """Every kernel of a block (static rows, and a symbolic row count as the decoder has) gets a schedule
    that spreads it over the cores and vectorizes it, and the results stay torch's."""
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program
    from tvm.target import Target

    from vlmc.exporter import tvm_schedules

    x = torch.randn(1, 16, 48)
    dynamic = None if rows == 16 else ({1: torch.export.Dim("rows", min=1, max=64)},)
    with torch.no_grad():
        ep = torch.export.export(Block().eval(), (x,), dynamic_shapes=dynamic).run_decompositions(tvm_ops.decompositions())
    mod = tvm_ops.rewrite(from_exported_program(ep, custom_convert_map=tvm_ops.CONVERTERS, run_ep_decomposition=False), True)
    target = Target({"kind": "llvm", "mcpu": "x86-64-v3"})
    with target:
        mod = relax.pipeline.zero_pipeline()(mod)
        mod = tvm_schedules.default_schedules()(mod)
    kernels = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert kernels and all(f.attrs and f.attrs.get("tirx.is_scheduled") for f in kernels.values()), list(kernels)
    matmuls = [f for name, f in kernels.items() if "matmul" in name]
    assert matmuls and all("T.parallel" in f.script() and "T.vectorized" in f.script() for f in matmuls)
    for f in matmuls:  # 16 or n rows in tiles of 6, 72 or 40 columns in vectors of 16: computed on padded blocks,
        update = f.script().split('T.sblock("matmul_update")')[1].split("T.reads")[0]  # no row or column test inside
        assert "_pad = T.sblock_alloc_buffer" in f.script() and "T.where" not in update
    norms = [f.script() for name, f in kernels.items() if "layer_norm" in name]
    assert norms and all("_rf = T.sblock_alloc_buffer" in n and "T.vectorized(" in n for n in norms)  # sums in lanes
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    for n in ([16] if rows == 16 else [1, 5, 16, 63]):
        xs = torch.randn(1, n, 48)
        out = vm["main"](tvm.runtime.tensor(xs.numpy()))
        out = out[0].numpy() if not hasattr(out, "numpy") else out.numpy()
        np.testing.assert_allclose(out, Block()(xs).detach().numpy(), atol=2e-6, rtol=1e-5)


class RepeatedCacheAttention(torch.nn.Module):
    """The decoder's shape: grouped queries over a cache whose heads repeat_kv repeats."""

    def forward(self, q, k, v, mask):
        from vlmc.models_zoo.layers import repeat_kv

        return F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=mask)


@pytest.mark.parametrize("case", ["vision", "decoder"])
def test_fused_attention_is_scheduled_and_keeps_the_numbers(case):
    """The default schedule of the fused attention kernel (blocks of query rows in parallel, vectorized keys
    and values) matches torch: 197 keys padded to 208, and the decoder's grouped heads over a cache with a
    mask and a symbolic number of query rows (1 and several, a last block of rows cut short)."""
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program
    from tvm.target import Target

    from vlmc.exporter import tvm_schedules

    g = torch.Generator().manual_seed(3)
    if case == "vision":
        module, dynamic = HeadsAttention(), None
        args = _qkv(t=197, s=197, width=128, kv_width=128)
        calls = [args]
    else:
        module, dynamic = RepeatedCacheAttention(), ({2: torch.export.Dim("rows", min=1, max=40)}, None, None, {0: torch.export.Dim("rows", min=1, max=40)})
        cache = torch.randn(1, 2, 64, 32, generator=g), torch.randn(1, 2, 64, 32, generator=g)
        calls = [(torch.randn(1, 4, n, 32, generator=g), *cache, torch.arange(64)[None] <= torch.arange(n)[:, None] + 20)
                 for n in (1, 11, 17)]
        args = calls[1]
    with torch.no_grad():
        ep = torch.export.export(module.eval(), args, dynamic_shapes=dynamic).run_decompositions(tvm_ops.decompositions())
    mod = tvm_ops.rewrite(from_exported_program(ep, custom_convert_map=tvm_ops.CONVERTERS, run_ep_decomposition=False), True)
    target = Target({"kind": "llvm", "mcpu": "x86-64-v3"})
    with target:
        mod = tvm_schedules.default_schedules()(relax.pipeline.zero_pipeline()(mod))
    attention = mod["attention"].script()
    assert "T.parallel" in attention and attention.count("T.vectorized") >= 5 and "T.unroll" in attention
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    for inputs in calls:
        out = vm["main"](*[tvm.runtime.tensor(x.numpy()) for x in inputs])
        out = out[0].numpy() if not hasattr(out, "numpy") else out.numpy()
        np.testing.assert_allclose(out, module(*inputs).numpy(), atol=3e-6, rtol=1e-5)


def test_a_repeated_cache_is_read_per_group_without_a_copy():
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(1, 4, 3, 8, generator=g), torch.randn(1, 2, 10, 8, generator=g), torch.randn(1, 2, 10, 8, generator=g)
    mask = torch.arange(10)[None] <= torch.arange(3)[:, None] + 6
    mod, run = _compiled(RepeatedCacheAttention(), (q, k, v, mask))
    assert "broadcast_to" not in mod.script()  # the repeated heads are not materialized
    np.testing.assert_allclose(run(q, k, v, mask), RepeatedCacheAttention()(q, k, v, mask).numpy(), atol=2e-6, rtol=1e-5)


def test_a_patch_embedding_becomes_one_product_and_other_convolutions_stay():
    g = torch.Generator().manual_seed(4)
    patches = torch.nn.Conv2d(3, 16, kernel_size=(4, 2), stride=(4, 2))
    overlapping = torch.nn.Conv2d(3, 16, kernel_size=3, stride=2)
    for conv in (patches, overlapping):
        with torch.no_grad():
            for p in conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(2, 3, 12, 10, generator=g)
    mod, run = _compiled(patches, (x,))
    assert "conv2d" not in mod.script() and "R.matmul" in mod.script()
    np.testing.assert_allclose(run(x), patches(x).detach().numpy(), atol=1e-5, rtol=1e-5)
    mod, run = _compiled(overlapping, (x,))
    assert "R.nn.conv2d" in mod.script()
    np.testing.assert_allclose(run(x), overlapping(x).detach().numpy(), atol=1e-5, rtol=1e-5)


class QuantizedBlock(torch.nn.Module):
    """Linears as the TVM target quantizes them (with and without a bias) around an activation, two of one shape."""

    def __init__(self, bits: int):
        from vlmc.passes.quant.tvm_quant import QuantizedLinear

        super().__init__()
        g = torch.Generator().manual_seed(3)
        up, down, side = torch.nn.Linear(64, 80), torch.nn.Linear(80, 64, bias=False), torch.nn.Linear(80, 64, bias=False)
        for layer in (up, down, side):
            layer.weight.data = torch.randn(layer.weight.shape, generator=g) / 8
        self.float_layers = torch.nn.ModuleList([up, down, side])
        self.layers = torch.nn.ModuleList([QuantizedLinear(layer, bits, 16) for layer in (up, down, side)])

    @staticmethod
    def _forward(layers, x):
        up, down, side = layers
        h = F.gelu(up(x))
        return down(h) + side(h)

    def forward(self, x):
        return self._forward(self.layers, x)

    def float_forward(self, x):
        return self._forward(self.float_layers, x)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [12, "symbolic"])
def test_a_quantized_linear_reads_its_integer_codes_in_one_scheduled_product(bits, rows):
    """The TVM target's int8 / int4 linears: one kernel per linear whose weight stays integer codes in the
    library (no float copy of it anywhere in the module), computed on rows padded to whole tiles (no row test
    in the product) over the cores and vectorized; its numbers are the dequantized weights' (torch's
    reference op) and within the grid's rounding of the float layer's."""
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program
    from tvm.target import Target

    from vlmc.exporter import tvm_schedules

    block = QuantizedBlock(bits).eval()
    x = torch.randn(1, 12, 64)
    dynamic = None if rows == 12 else ({1: torch.export.Dim("rows", min=1, max=64)},)
    with torch.no_grad():
        ep = torch.export.export(block, (x,), dynamic_shapes=dynamic).run_decompositions(tvm_ops.decompositions())
    mod = tvm_ops.rewrite(from_exported_program(ep, custom_convert_map=tvm_ops.CONVERTERS, run_ep_decomposition=False), True)
    imported = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len([name for name in imported if "quantized_linear" in name]) == 2  # the two 80 -> 64 linears share one
    target = Target({"kind": "llvm", "mcpu": "x86-64-v3"})
    with target:
        mod = relax.pipeline.zero_pipeline()(mod)
        mod = tvm_schedules.default_schedules()(mod)
    kernels = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    products = [f.script() for name, f in kernels.items() if "quantized_linear" in name]
    assert products
    code_type = "int8" if bits == 8 else "uint8"
    code_shapes = {(64, 80), (80, 64)} if bits == 8 else {(32, 80), (40, 64)}  # [in, out] / [in / 2, out]
    found = {tuple(int(d) for d in m.groups()) for p in products
             for m in re.finditer(rf"T\.Buffer\(\(T\.int64\((\d+)\), T\.int64\((\d+)\)\), \"{code_type}\"\)", p)}
    assert found == code_shapes
    tensors = {(tuple(c.value.shape), str(c.value.dtype)) for c in _constants(mod) if hasattr(c.value, "shape")}
    assert {(shape, code_type) for shape in code_shapes} <= tensors  # the codes are the module's constants
    assert not {((80, 64), "float32"), ((64, 80), "float32")} & tensors, "a float copy of a weight was folded in"
    codes = [c for c in _constants(mod) if hasattr(c.value, "shape") and str(c.value.dtype) == code_type]
    assert len(codes) == 3  # the shared kernel takes each linear's own codes
    for p in products:
        update = p.split('T.sblock("quantized_matmul_update")')[1].split("T.reads")[0]
        assert "T.parallel" in p and "T.vectorized" in p and "T.where" not in update
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    for n in ([12] if rows == 12 else [1, 5, 12, 63]):
        xs = torch.randn(1, n, 64)
        out = vm["main"](tvm.runtime.tensor(xs.numpy()))
        out = out[0].numpy() if not hasattr(out, "numpy") else out.numpy()
        np.testing.assert_allclose(out, block(xs).detach().numpy(), atol=2e-5, rtol=1e-4)
        ref = block.float_forward(xs).detach().numpy()
        assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < (0.02 if bits == 8 else 0.15)


def _constants(mod) -> list:
    from tvm import relax

    found = []
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, lambda e: found.append(e) if isinstance(e, tvm.ir.expr.Constant) else None)
    return found
