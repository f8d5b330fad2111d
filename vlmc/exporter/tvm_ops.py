"""What vlmc adds to TVM's torch importer and Relax graph, so the compiled programs run fast on a CPU.

- Attention: `aten.scaled_dot_product_attention` is kept whole through torch.export's decompositions and
  converted to one kernel (scaled scores with the mask fused, the row softmax, the weighted values), which
  tvm_schedules computes a block of query rows at a time while its scores are in cache (the built-in vision
  encoder untuned: 8.8 -> 6.0 ms against three kernels). q and v are read in the [B,T,H,d] layout their
  projections made and the result is made in it (no transposed copies of them); the keys are transposed
  once to [B,H,d,S] and padded to whole vectors, so the scores vectorize along the keys; a KV cache whose
  heads repeat_kv repeated for grouped queries is read per group in place. The decomposition TVM would
  import instead scales q and k separately and adds a pass over every probability to zero rows that see
  nothing; that guard is kept here (a row whose scores are all -inf gives 0, as torch's does).
- Fast math (`tvm.fast_math`, on by default): exp, sigmoid, SiLU, erf-GELU, tanh-GELU and softmax use
  TVM's polynomial exp / erf / tanh (`topi.fast_*`), which vectorize; LLVM lowers the exact ones to one
  libm call per element. Measured on the built-in vision encoder: the quick-GELU kernel 249 -> 23 us.
- Patch embeddings: a convolution whose stride is its kernel is one product of the image's patches with
  the kernel, scheduled like the linear layers (untuned, TVM's convolution is scalar loops: the built-in
  vision encoder 10.1 -> 6.0 ms).
- Quantized linears (`vlmc::quantized_linear`, the TVM target's int8 / int4 weights, passes/quant/tvm_quant):
  one kernel that reads the integer codes and dequantizes them in registers inside the product (a
  dequantize of its own would be folded back into a float constant, or write a float copy per call), its
  rows padded to whole register tiles so the product's schedule has no row test.
- `aten.amax`, which TVM 0.27's importer lacks.
"""
from __future__ import annotations

import math

import torch

KEPT_WHOLE = (torch.ops.aten.scaled_dot_product_attention.default,)


def decompositions() -> dict:
    """torch.export's default decompositions minus the ops converted whole here."""
    table = torch.export.default_decompositions()
    for op in KEPT_WHOLE:
        table.pop(op, None)
    return table


def _reduce_max(node, importer):
    """aten.amax (token scorers take a max over a dimension): Relax's max."""
    from tvm import relax

    args = importer.retrieve_args(node)
    dims = args[1] if len(args) > 1 and args[1] else None
    keepdim = bool(args[2]) if len(args) > 2 else False
    return importer.block_builder.emit(relax.op.max(args[0], dims, keepdims=keepdim))


def _softmax_rows(x):
    """Softmax over the last axis with the polynomial exp."""
    from tvm import topi

    m = topi.max(x, axis=-1, keepdims=True)
    e = topi.fast_exp(topi.subtract(x, m))
    return topi.divide(e, topi.sum(e, axis=-1, keepdims=True))


def _bound_call(lookup, var, op: str):
    """The call to Relax op `op` that made `var` (looked up with `lookup`), or None."""
    from tvm import relax

    call = lookup(var) if isinstance(var, relax.Var) else None
    return call if isinstance(call, relax.Call) and getattr(call.op, "name", None) == op else None


def _made_as_heads_last(bb, x):
    """x [B,H,T,d] = permute_dims(y [B,T,H,d], [0,2,1,3]) -> (y, True): read y in place; else (x, False)."""
    permute = _bound_call(bb.lookup_binding, x, "relax.permute_dims")
    if permute is not None and permute.attrs.axes is not None and [int(a) for a in permute.attrs.axes] == [0, 2, 1, 3]:
        return permute.args[0], True
    return x, False


def _repeated_heads(bb, x):
    """x [B,H,S,d] = each of y's [B,Hkv,S,d] heads repeated H/Hkv times (repeat_kv: expand, then reshape)
    -> (y, H/Hkv): read y's heads in place instead of a copy of the repeated cache; else (x, 1)."""
    from tvm import relax, tirx

    reshape = _bound_call(bb.lookup_binding, x, "relax.reshape")
    expand = _bound_call(bb.lookup_binding, reshape.args[0], "relax.broadcast_to") if reshape is not None else None
    if expand is None:
        return x, 1
    single, wide = expand.args[0].ty.shape, expand.ty.shape  # [B,Hkv,1,S,d] -> [B,Hkv,rep,S,d]
    if (len(single) != 5 or not isinstance(single[2], tirx.IntImm) or int(single[2]) != 1 or len(wide) != 5
            or not isinstance(wide[2], tirx.IntImm)):
        return x, 1
    dims = list(single.values)
    return bb.emit(relax.op.reshape(expand.args[0], dims[:2] + dims[3:])), int(wide[2])


def _reader(t, heads_last: bool):
    """t[b, h, i, d] whichever of the two layouts t is in."""
    return (lambda b, h, i, d: t[b, i, h, d]) if heads_last else (lambda b, h, i, d: t[b, h, i, d])


KEY_BLOCK = 16  # keys are padded to a multiple of this (the widest CPU vector, 16 float32 lanes), so every key loop vectorizes


def _rounded_up(extent, block: int):
    """A static or symbolic extent rounded up to whole blocks."""
    from tvm import tirx

    if isinstance(extent, tirx.IntImm):
        return tirx.IntImm(extent.ty, -(-int(extent) // block) * block)
    return tirx.floordiv(extent + block - 1, block) * block


def _fused_attention(q, k_t, v, mask, keys, scale: float, causal: bool, q_heads_last: bool, v_heads_last: bool,
                     k_group: int, v_group: int):
    """softmax(scale * q k^T + mask) v as one kernel, out [B,T,H,d], so a schedule computes a block of query
    rows whole (scores, softmax, values) while its scores are in cache. k^T [B,Hkv,d,S'] is padded with zero
    keys past `keys` (masked out here); max and sum over the keys are taken in KEY_BLOCK lanes first, so they
    vectorize; the values are normalized once per output element instead of once per probability; a row that
    sees no key gives 0, as torch's does."""
    from tvm import te, tirx, topi

    Q, V = _reader(q, q_heads_last), _reader(v, v_heads_last)
    b, t, h = (q.shape[0], q.shape[1], q.shape[2]) if q_heads_last else (q.shape[0], q.shape[2], q.shape[1])
    padded, dtype = k_t.shape[3], q.dtype
    lanes = KEY_BLOCK if isinstance(padded, tirx.IntImm) and int(padded) % KEY_BLOCK == 0 else 1
    rows = t
    if not isinstance(t, tirx.IntImm) or int(t) % KEY_BLOCK:  # whole blocks of query rows: a schedule's last block
        # needs no row test (197 rows: 0.46 -> 0.28 ms); a symbolic row count is rounded up the same way
        rows = _rounded_up(t, KEY_BLOCK)
        Q = (lambda read: lambda bi, hi, i, d: read(bi, hi, tirx.min(i, t - 1), d))(Q)  # padded rows repeat the last
    r = te.reduce_axis((0, k_t.shape[2]), name="d")
    qk = te.compute((b, h, rows, padded), lambda bi, hi, i, j: te.sum(Q(bi, hi, i, r) * k_t[bi, hi // k_group, r, j], axis=r),
                    name="attention_qk")
    scale, neg_inf = tirx.const(scale, dtype), tirx.const(-math.inf, dtype)

    def masked(*i):
        j = i[-1]
        value = qk(*i) * scale
        if mask is not None:  # read inside the mask: a padded key is masked out below, a padded row is dropped
            row = i[-2] if rows is t else tirx.min(i[-2], t - 1)
            m = mask(*_broadcast_index(mask, (*i[:-2], row, tirx.min(j, keys - 1))))
            value = tirx.Select(m, value, neg_inf) if mask.dtype == "bool" else value + m
        keep = j < keys
        if causal:  # torch's is_causal: query i sees keys 0..i
            keep = tirx.all(keep, j <= i[-2])
        return tirx.Select(keep, value, neg_inf)

    def over_keys(x, reducer, name):
        """x reduced over the keys in `lanes` partial results first (a vectorizable loop), then across them."""
        jo, la = te.reduce_axis((0, padded // lanes), name=f"{name}_jo"), te.reduce_axis((0, lanes), name=f"{name}_la")
        per_lane = te.compute((b, h, rows, lanes), lambda bi, hi, i, lane: reducer(x[bi, hi, i, jo * lanes + lane], axis=jo),
                              name=f"attention_lane_{name}")
        return te.compute((b, h, rows), lambda bi, hi, i: reducer(per_lane[bi, hi, i, la], axis=la), name=f"attention_{name}")

    scores = te.compute(qk.shape, masked, name="attention_scores")
    row_max = over_keys(scores, te.max, "max")
    shifted = te.compute(qk.shape, lambda bi, hi, i, j: scores[bi, hi, i, j] - row_max[bi, hi, i], name="attention_shifted")
    e = topi.fast_exp(shifted)
    row_sum = over_keys(e, te.sum, "sum")
    jv = te.reduce_axis((0, keys), name="jv")
    pv = te.compute((b, rows, h, v.shape[3]), lambda bi, i, hi, d: te.sum(e[bi, hi, i, jv] * V(bi, hi // v_group, jv, d), axis=jv),
                    name="attention_pv")
    lowest, zero = tirx.min_value(dtype), tirx.const(0, dtype)  # a row's max starts at the lowest float: a row of only -inf ends there
    return te.compute((b, t, h, v.shape[3]), lambda bi, i, hi, d: tirx.Select(row_max[bi, hi, i] <= lowest, zero,
                                                                 pv[bi, i, hi, d] / row_sum[bi, hi, i]), name="attention_out")


def _broadcast_index(t, index):
    """The element of t (aligned to the trailing axes) that broadcasting gives at `index`."""
    from tvm import tirx

    tail = index[len(index) - len(t.shape):]
    return [0 if isinstance(d, tirx.IntImm) and int(d) == 1 else i for d, i in zip(t.shape, tail)]


def _attention(node, importer):
    """aten.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)."""
    from tvm import relax, tirx

    bb = importer.block_builder
    q, k, v = (importer.env[a] for a in node.args[:3])
    named = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults = (None, 0.0, False, None, False)
    mask, dropout, causal, scale, gqa = (node.args[3 + i] if len(node.args) > 3 + i else node.kwargs.get(n, d)
                                         for i, (n, d) in enumerate(zip(named, defaults)))
    if dropout:
        raise ValueError("scaled_dot_product_attention with dropout")
    if len(q.ty.shape) != 4:
        raise ValueError("scaled_dot_product_attention of other than 4-D tensors")
    heads, kv_heads = int(q.ty.shape[1]), int(k.ty.shape[1])
    if heads != kv_heads and not gqa:
        raise ValueError("scaled_dot_product_attention with fewer key heads and enable_gqa=False")
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(int(q.ty.shape[-1])) if scale is None else float(scale)
    (k, k_rep), (v, v_rep) = _repeated_heads(bb, k), _repeated_heads(bb, v)
    (q, q_last), (k, k_last), (v, v_last) = (_made_as_heads_last(bb, t) for t in (q, k, v))
    k_t = bb.emit(relax.op.permute_dims(k, [0, 2, 3, 1] if k_last else [0, 1, 3, 2]))
    keys = k_t.ty.shape[3]
    if isinstance(keys, tirx.IntImm):
        keys = int(keys)
        if keys % KEY_BLOCK:
            k_t = bb.emit(relax.op.nn.pad(k_t, [0, 0, 0, 0, 0, 0, 0, -keys % KEY_BLOCK]))
    extra = [importer.env[mask]] if mask is not None else []
    out = bb.emit_te(lambda a, c, w, *m: _fused_attention(a, c, w, m[0] if m else None, keys, scale, causal, q_last, v_last,
                                                          group * k_rep, group * v_rep),
                     q, k_t, v, *extra, primfunc_name_hint="attention")
    return bb.emit(relax.op.permute_dims(out, [0, 2, 1, 3]))  # SDPA's [B,H,T,d]; the merge's transpose cancels it


QUANTIZED_STAGES = ("quantized_rows", "quantized_weight")  # staged per tile by tvm_schedules.Matmul, never inlined


def _quantized_product(x, codes, scales, *bias, bits: int, group_size: int):
    """y [..., M, N] = x [..., M, K] @ dequantized codes (+ bias). Two stages that the product's schedule
    computes per register tile: the rows padded to whole tiles (the padding repeats the last row, so the
    product has no row test) and the weights dequantized (int8 codes [K, N]; int4 codes two per byte
    [K / 2, N], each times its group's scale), one vector of columns per input channel, shared by the tile's
    rows. int8's scale multiplies each column once, after the sum."""
    from tvm import te, tirx

    from vlmc.exporter.tvm_schedules import Matmul

    *lead, m, k_dim = x.shape
    n = scales.shape[-1]
    rows = _rounded_up(m, Matmul.ROWS)
    padded = te.compute((*lead, rows, k_dim), lambda *i: x(*i[:-2], tirx.min(i[-2], m - 1), i[-1]), name=QUANTIZED_STAGES[0])
    if bits == 8:
        def dequantized(kk, j):
            return codes[kk, j].astype(x.dtype)
    else:
        def dequantized(kk, j):
            nibble = (codes[kk // 2, j].astype("int32") >> ((kk % 2) * 4).astype("int32")) & 15
            return (nibble - 8).astype(x.dtype) * scales[kk // group_size, j]
    weight = te.compute((k_dim, n), dequantized, name=QUANTIZED_STAGES[1])
    k = te.reduce_axis((0, k_dim), name="k")
    product = te.compute((*lead, rows, n), lambda *i: te.sum(padded(*i[:-1], k) * weight[k, i[-1]], axis=k),
                         name="quantized_matmul")

    def out(*i):
        y = product(*i) * scales[i[-1]] if bits == 8 else product(*i)
        return y + bias[0][i[-1]] if bias else y

    return te.compute((*lead, m, n), out, name="quantized_matmul_out")


def _quantized_linear(node, importer):
    """vlmc::quantized_linear(x, codes, scales, bias, bits, group_size): one kernel, marked as a product with an
    elementwise epilogue so the ops after it (a residual add) fuse into it as they do into a float linear's."""
    from tvm import relax

    bb = importer.block_builder
    x, codes, scales, bias, bits, group_size = importer.retrieve_args(node)
    vector = len(x.ty.shape) == 1
    rows = bb.emit(relax.op.expand_dims(x, 0)) if vector else x
    args = [rows, codes, scales] + ([bias] if bias is not None else [])
    signature = (int(bits), int(group_size), *((str(a.ty.shape), str(a.ty.dtype)) for a in args))
    kernels = importer.__dict__.setdefault("vlmc_quantized_kernels", {})  # one kernel per shape, shared by its linears
    if signature in kernels:
        kernel, out = kernels[signature]
        y = bb.emit(relax.call_tir(kernel, relax.Tuple(args), out))
    else:
        y = bb.emit_te(lambda a, c, s, *b: _quantized_product(a, c, s, *b, bits=int(bits), group_size=int(group_size)),
                       *args, primfunc_name_hint="quantized_linear")
        kernel = bb.lookup_binding(y).args[0]
        bb.update_func(kernel, bb.get()[kernel].with_attr("op_pattern", 4))  # TVM's analysis calls a staged kernel opaque
        kernels[signature] = (kernel, y.ty)
    return bb.emit(relax.op.squeeze(y, [0])) if vector else y


CONVERTERS = {"amax.default": _reduce_max, "scaled_dot_product_attention.default": _attention,
              "quantized_linear.default": _quantized_linear}


def _sigmoid(x):
    from tvm import te, tirx, topi

    one = tirx.const(1, x.dtype)
    e = topi.fast_exp(topi.negative(x))
    return te.compute(x.shape, lambda *i: one / (one + e(*i)), name="sigmoid")


def _silu(x):
    from tvm import te

    s = _sigmoid(x)
    return te.compute(x.shape, lambda *i: x(*i) * s(*i), name="silu")


def _gelu(x):
    from tvm import te, tirx, topi

    half, one = tirx.const(0.5, x.dtype), tirx.const(1, x.dtype)
    erf = topi.fast_erf(topi.multiply(x, tirx.const(1 / math.sqrt(2), x.dtype)))
    return te.compute(x.shape, lambda *i: half * x(*i) * (one + erf(*i)), name="gelu")


def _gelu_tanh(x):
    from tvm import te, tirx, topi

    half, one = tirx.const(0.5, x.dtype), tirx.const(1, x.dtype)
    c, a = tirx.const(math.sqrt(2 / math.pi), x.dtype), tirx.const(0.044715, x.dtype)
    inner = te.compute(x.shape, lambda *i: c * (x(*i) + a * x(*i) * x(*i) * x(*i)), name="gelu_inner")
    t = topi.fast_tanh(inner)
    return te.compute(x.shape, lambda *i: half * x(*i) * (one + t(*i)), name="gelu_tanh")


def _fast_kernels() -> dict:
    from tvm import topi

    return {"relax.exp": topi.fast_exp, "relax.erf": topi.fast_erf, "relax.tanh": topi.fast_tanh,
            "relax.sigmoid": _sigmoid, "relax.nn.silu": _silu, "relax.nn.gelu": _gelu, "relax.nn.gelu_tanh": _gelu_tanh,
            "relax.nn.softmax": _softmax_rows}


def _permutes_cancel(outer, inner) -> bool:
    outer_axes, inner_axes = [int(a) for a in outer.attrs.axes], [int(a) for a in inner.attrs.axes]
    return [inner_axes[a] for a in outer_axes] == list(range(len(outer_axes)))


def _patches_as_product(bb, call):
    """A convolution whose stride is its kernel (a ViT's patch embedding) as one product of the image's
    patches [N, C*kh*kw] with the kernel [C*kh*kw, O]: the linear layers' schedules then cover it (untuned,
    TVM runs a convolution as scalar loops). None where the convolution is not of that kind."""
    from tvm import relax, tirx

    x, w = call.args
    a = call.attrs
    shapes = x.ty.shape.values, w.ty.shape.values
    if (len(shapes[0]) != 4 or len(shapes[1]) != 4 or not all(isinstance(d, tirx.IntImm) for d in (*shapes[0], *shapes[1]))
            or (a.data_layout, a.kernel_layout, a.out_layout) != ("NCHW", "OIHW", "NCHW") or int(a.groups) != 1):
        return None
    (n, c, height, width), (o, _, kh, kw) = ([int(d) for d in shape] for shape in shapes)
    if ([int(v) for v in a.strides] != [kh, kw] or any(int(v) for v in a.padding) or any(int(v) != 1 for v in a.dilation)
            or height % kh or width % kw):
        return None
    h, wd = height // kh, width // kw
    patches = bb.emit(relax.op.permute_dims(relax.op.reshape(x, [n, c, h, kh, wd, kw]), [0, 2, 4, 1, 3, 5]))
    kernel = relax.op.permute_dims(relax.op.reshape(w, [o, c * kh * kw]), [1, 0])
    y = bb.emit(relax.op.matmul(relax.op.reshape(patches, [n * h * wd, c * kh * kw]), kernel, out_dtype=str(a.out_dtype) or "void"))
    return relax.op.permute_dims(relax.op.reshape(y, [n, h, wd, o]), [0, 3, 1, 2])


def rewrite(mod, fast_math: bool):
    """Transposes that cancel (heads split, attended and merged in one layout) removed; patch embeddings
    as products; with `fast_math`, exact transcendental ops replaced by TVM's polynomial kernels."""
    from tvm import relax
    from tvm.relax import PyExprMutator, expr_functor

    kernels = _fast_kernels() if fast_math else {}

    @expr_functor.mutator
    class Rewriter(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            name = getattr(call.op, "name", None)
            if name == "relax.permute_dims" and call.attrs.axes is not None:
                inner = _bound_call(self.lookup_binding, call.args[0], "relax.permute_dims")
                if inner is not None and inner.attrs.axes is not None and _permutes_cancel(call, inner):
                    return inner.args[0]
            if name == "relax.nn.conv2d":
                product = _patches_as_product(self.builder_, call)
                return call if product is None else product
            if name in kernels and str(call.args[0].ty.dtype) in ("float32", "float16"):
                if name == "relax.nn.softmax" and int(call.attrs.axis) not in (-1, len(call.args[0].ty.shape) - 1):
                    return call
                return self.builder_.call_te(kernels[name], call.args[0], primfunc_name_hint=name.rsplit(".", 1)[1])
            return call

    rewriter = Rewriter(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return relax.transform.DeadCodeElimination()(rewriter.builder_.get())
