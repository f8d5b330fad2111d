"""ExecuTorch target: one .pte with the methods of ExecuTorch's multimodal LLM contract.

Methods `vision_encoder` (uint8 [3,H,W], preprocessing inside), `token_embedding` and `text_decoder`
(embeds + start position; the KV cache is the method's mutable buffers, updated by the LLM custom ops),
plus the constant methods ExecuTorch's MultimodalRunner reads, so its stock runner and demo apps load
a vlmc bundle unchanged.
"""
from __future__ import annotations

import copy
import math
import sys
from contextlib import contextmanager
from typing import Optional

import torch
from torch.export import Dim, export

from vlmc.errors import VlmcError, first_line
from vlmc.exporter.context import PROGRAM_PARTS, ExportContext, io_entry
from vlmc.models_zoo.programs import ExecuTorchDecoder, ExecuTorchPrefill, TokenEmbeddingProgram, VisionEncoderProgram
from vlmc.passes.quant import executorch_quant
from vlmc.runtimes.executorch_runner import MIN_PREFILL_ROWS

PTE = "model.pte"


def _calibrator(ctx: ExportContext, program: str):
    """Runs a prepared (observed) program over the calibration set's inputs for it. With a separate
    text_prefill, the observed text_decoder gets each question's caches from the float prefill first, so
    its decode steps attend over a real prompt."""
    def run(module):
        cal = ctx.calibration()
        if program == "vision_encoder":
            for img in cal.images:
                module(torch.from_numpy(img))
            return
        split = ctx.decoder_shape.full_prompt_prefill
        filler = ExecuTorchPrefill(ctx.target_model("executorch"), ctx.recipe.max_context) if split else None
        caches = dict(module.named_buffers())
        for calls, runs in zip(cal.decoder_calls, cal.visual_rows):
            prompt, start = torch.from_numpy(calls[0][0]), torch.tensor([runs[0][0]])
            if program == "text_prefill":
                module(prompt, start)
                continue
            if split:
                filler(prompt, start)
                for i in range(ctx.num_layers):
                    for name in (f"k_cache_{i}", f"v_cache_{i}"):
                        caches[name].copy_(getattr(filler, name))
            for embeds, pos in calls[1:] if split else calls:
                module(torch.from_numpy(embeds), torch.tensor([pos]))
    return run


def _io(name: str, t: torch.Tensor, dynamic: dict | None = None) -> dict:
    shape = [dynamic.get(i, s) if dynamic else s for i, s in enumerate(t.shape)]
    return io_entry(name, shape, str(t.dtype).removeprefix("torch."))


def forget_lowered_graphs() -> None:
    """Drop the references exir and the XNNPACK partitioner keep at module level to the last graphs they
    saw (an unbounded `is_same_node` cache keyed by graph nodes; each partitioner config's `why` reporter
    holds its last rejected node). Through the graph they keep every lowered delegate module alive, and
    with them a serialised copy of the weights: about 1x the model's weights after export."""
    from executorch.exir.backend.utils import WhyNoPartition, is_same_node

    is_same_node.cache_clear()
    for name, module in list(sys.modules.items()):
        if name.startswith("executorch.backends.") and isinstance(getattr(module, "why", None), WhyNoPartition):
            module.why.node = None


@contextmanager
def partitions_share_weights():
    """While lowering, give XNNPACK's preprocess copies of the partitions that share their weight tensors.

    exir deep-copies every partition of every method before the backend preprocesses any (so a backend
    may rewrite its graph freely): a full copy of the delegated weights, alive through the whole
    lowering, on top of the serialised copy XNNPACK builds (about +0.9x of the weights for a 256M
    model). XNNPACK's passes rewrite graphs and state-dict entries but never a tensor in place, so the
    copy only needs its own graph and mappings; the hook exists for this (ExecuTorch's CUDA backend
    shares tensors the same way in its low-memory mode)."""
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    def share_tensors(cls, program, compile_specs):
        memo = {id(t): t for values in (program.state_dict, program.constants) for t in values.values()
                if isinstance(t, torch.Tensor)}
        return copy.deepcopy(program, memo)

    saved = XnnpackBackend.__dict__.get("copy_exported_program_for_preprocess")
    XnnpackBackend.copy_exported_program_for_preprocess = classmethod(share_tensors)
    try:
        yield
    finally:
        if saved is None:
            del XnnpackBackend.copy_exported_program_for_preprocess
        else:
            XnnpackBackend.copy_exported_program_for_preprocess = saved


def attention_as_batched_products(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                  enable_gqa=False):
    """`aten.scaled_dot_product_attention` without a mask, as two batched products around a softmax, all of
    which XNNPACK delegates. torch's own decomposition guards rows whose scores are all -inf (eq / any /
    logical_not / where over every score) and multiplies 4-D tensors through expand copies, all on portable
    kernels, which split a ViT into a delegate per block (docs/stock_exports: vision encode 2.5x faster than
    ExecuTorch's own LLaVA export on the built-in model, 1.24x on a ViT-B/16). Without a mask or causality no
    row can be all -inf, so the guard changes nothing.
    With one (or dropout, or grouped heads), torch's decomposition stays (NotImplemented falls back to it)."""
    if attn_mask is not None or is_causal or dropout_p or enable_gqa or q.dim() < 3 \
            or q.shape[:-2] != k.shape[:-2] or k.shape[:-2] != v.shape[:-2]:
        return NotImplemented
    batch, rows, cols = q.shape[:-2], q.shape[-2], k.shape[-2]
    factor = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.bmm((q * factor).reshape(-1, rows, q.shape[-1]), k.reshape(-1, cols, k.shape[-1]).transpose(1, 2))
    out = torch.bmm(torch.softmax(scores, -1), v.reshape(-1, cols, v.shape[-1]))
    return out.reshape(*batch, rows, v.shape[-1])


def mean_of_last_dim_as_product(x, dim, keepdim=False, dtype=None):
    """`aten.mean.dim` over the last dimension as a product with a constant column of 1/D, which XNNPACK
    delegates (its own mean takes only the two inner dimensions of a 4-D tensor), so a layer norm does not
    leave its delegate for a portable kernel and split the program at every norm.
    The column depends on no input: `fold_input_free_nodes` stores it as a constant. Other means: NotImplemented
    (torch's decomposition)."""
    if dtype is not None or dim is None or len(dim) != 1 or dim[0] not in (-1, x.dim() - 1) or not x.is_floating_point():
        return NotImplemented
    width = x.shape[-1]
    if x.dim() == 3:  # a batched product: matmul would view [B, T, D] as [B*T, D], at a dynamic T a portable view
        out = torch.bmm(x, torch.full((x.shape[0], width, 1), 1.0 / width, dtype=x.dtype))
    else:
        out = x @ torch.full((width, 1), 1.0 / width, dtype=x.dtype)
    return out if keepdim else out.squeeze(-1)


def layer_norm_as_products(x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    """`aten.layer_norm` over the last dimension from products, subtractions and a reciprocal square root,
    all delegated: the built-in model's ViT ran its layer norms on portable kernels between 7 delegates; as
    one delegate its vision encode takes 0.83-0.91x the time (docs/et_layer_norm)."""
    if len(normalized_shape) != 1 or not x.is_floating_point():
        return NotImplemented
    centred = x - mean_of_last_dim_as_product(x, [-1], keepdim=True)
    out = centred * torch.rsqrt(mean_of_last_dim_as_product(centred * centred, [-1], keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    return out + bias if bias is not None else out


XNNPACK_DECOMPOSITIONS = {torch.ops.aten.scaled_dot_product_attention.default: attention_as_batched_products}
NORM_DECOMPOSITIONS = {torch.ops.aten.layer_norm.default: layer_norm_as_products,
                       torch.ops.aten.mean.dim: mean_of_last_dim_as_product}


def decompositions_for(program: str) -> dict:
    """What `program` is decomposed with before lowering: the attention's everywhere, the norms' in the vision
    encoder only. Delegating the text programs' norms too (with the reshapes that split them) took the built-in
    text_prefill from 39 delegates to 10 and changed no time (docs/et_layer_norm), while each decomposition
    retraces the program."""
    return {**XNNPACK_DECOMPOSITIONS, **NORM_DECOMPOSITIONS} if program == "vision_encoder" else XNNPACK_DECOMPOSITIONS


FOLDED_CONSTANT_LIMIT = 1 << 20  # bytes: larger input-free results (a long context's mask) stay computed
QUANT_NAMESPACES = ("quantized_decomposed", "torchao")  # q/dq stay: XNNPACK reads the quantized ops by them


def fold_input_free_nodes(ep):
    """`ep` with every node that depends on no input, parameter or buffer computed once here and stored as
    a constant. Onnxruntime, TVM and coremltools fold such nodes themselves; exir does not, so the sizes a
    token pass builds its tensors from (an identity mask, tie-break offsets, one-hot ranges) ran at every
    call on portable kernels: DivPrune's selection on the built-in model took 1.53 ms, 0.83 ms once its
    196 x 196 identity mask was a constant. ExecuTorch's `constant_prop_pass` would also fold parameters through (a transposed or
    dequantized copy of a weight beside the original); this folds only what grows from lifted constants and
    factories, and no result above FOLDED_CONSTANT_LIMIT."""
    from executorch.exir.passes.constant_prop_pass import create_constant_nodes_and_return_specs
    from torch._export.utils import get_lifted_tensor_constant, is_lifted_tensor_constant

    graph = ep.graph
    folded: dict = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            if is_lifted_tensor_constant(ep, node):
                folded[node] = get_lifted_tensor_constant(ep, node)
            continue
        if node.op != "call_function" or node.is_impure() or getattr(node.target, "namespace", "") in QUANT_NAMESPACES:
            continue
        if not all(a in folded for a in node.all_input_nodes) or any(u.op == "output" for u in node.users):
            continue
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: folded[a])
        with torch.no_grad():
            value = node.target(*args, **kwargs)
        if not isinstance(value, torch.Tensor) or value.numel() * value.element_size() > FOLDED_CONSTANT_LIMIT:
            continue
        folded[node] = value.contiguous() if 0 in value.stride() else value
    if not any(n.op == "call_function" for n in folded):
        return ep
    specs = {s.arg.name: s for s in ep.graph_signature.input_specs}
    specs.update(create_constant_nodes_and_return_specs(folded, ep))
    ep.graph_signature.input_specs = [specs[n.name] for n in graph.find_nodes(op="placeholder")]
    graph.eliminate_dead_code()
    ep.graph_module.recompile()
    return ep


def leave_out_of_delegates(partitioner, names: list[str]):
    """`partitioner`, leaving the parameter known by `names` (module paths of one tied tensor) out of every
    partition it tags: the delegate takes it as an input (XNNPACK's dynamic-weight linear) and the program
    keeps it as one of its constants, which the emitter stores once per .pte however many methods name the
    same bytes. That is how a tied LM head shares the token_embedding's table instead of serialising a
    second copy into XNNPACK's data."""
    partition = partitioner.partition

    def partition_leaving_weight(exported_program):
        result = partition(exported_program)
        ep = result.tagged_exported_program
        params = ep.graph_signature.inputs_to_parameters
        for node in ep.graph.nodes:
            fqn = params.get(node.name, "") if node.op == "placeholder" else ""
            if any(fqn == n or fqn.endswith("." + n) for n in names):
                node.meta.pop("delegation_tag", None)
        return result

    partitioner.partition = partition_leaving_weight
    return partitioner


def shared_head(m, ctx: ExportContext) -> Optional[str]:
    """Why the LM head's weight does not share the token_embedding's table in the .pte, or None when it does."""
    if not m.tied_head:
        return "untied: the LM head has its own weight"
    if ctx.recipe.executorch.tied_embedding == "twice":
        return "recipe executorch.tied_embedding: twice (the LM head keeps a static XNNPACK copy: faster)"
    if ctx.scheme("token_embedding") or ctx.scheme("text_decoder"):
        return "the LM head or the embedding is quantized (their stored bytes differ)"
    return None


def lower(ctx: ExportContext) -> dict:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackDynamicallyQuantizedPartitioner, XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    m, r, c = ctx.target_model("executorch"), ctx.recipe, ctx.model.config
    seq = Dim("seq_len", min=1, max=r.max_prompt)
    image = VisionEncoderProgram(m, "chw_uint8").example_input()
    ids = torch.ones(1, 4, dtype=torch.long)
    embeds = torch.zeros(1, 4, m.embed_width)
    pos = torch.tensor([0])
    builders = {  # program -> (its module for a model, example args, dynamic shapes)
        "vision_encoder": (lambda model: VisionEncoderProgram(model, "chw_uint8"), (image,), None),
        "token_embedding": (TokenEmbeddingProgram, (ids,), ({1: seq},)),
        "text_decoder": (lambda model: ExecuTorchDecoder(model, r.max_context), (embeds, pos), ({1: seq}, None)),
    }
    shifts = m.cache_shifts()
    if any(shifts):  # a continuation chunk must fit the shortest cache, whose slots sit max(shift) lower
        step_len = Dim("seq_len", min=1, max=min(r.max_prompt, r.max_context - max(shifts)))
        builders["text_decoder"] = (*builders["text_decoder"][:2], ({1: step_len}, None))
    if r.executorch.text_prefill:  # the first prefill: attention over its own rows, inside XNNPACK
        shortest = ctx.shortest_full_prompt if m.decoder_stages() else MIN_PREFILL_ROWS
        prompt_len = Dim("prompt_len", min=shortest, max=r.max_prompt)
        builders["text_prefill"] = (lambda model: ExecuTorchPrefill(model, r.max_context),
                                    (torch.zeros(1, r.max_prompt, m.embed_width), torch.tensor([1])), ({1: prompt_len}, None))
    ctx.progress(f"executorch: torch.export of {', '.join(builders)}")
    exported, quantized = {}, {}
    with torch.no_grad():
        image_tokens = VisionEncoderProgram(m, "chw_uint8")(image).shape[1]
        for name, (make, args, dyn) in builders.items():
            scheme = ctx.scheme(name)
            eight_bit = ctx.promoted(name)
            model = (executorch_quant.quantize_w4(m, PROGRAM_PARTS[name], scheme.config.group_size, eight_bit)
                     if scheme and scheme.name == "w4" else m)
            ep = export(make(model).eval(), args, dynamic_shapes=dyn, strict=False)
            if scheme and scheme.name != "w4":
                ctx.progress(f"executorch: {scheme.name} quantization of {name} (PT2E, XNNPACKQuantizer)")
                module = executorch_quant.quantize_pt2e(ep, scheme, args, _calibrator(ctx, name))
                ep = export(module, args, dynamic_shapes=dyn, strict=False)
            table = decompositions_for(name)
            if any(n.target in table for n in ep.graph.nodes):  # each decomposition retraces the whole
                ep = ep.run_decompositions(table)  # program: only where it changes it
            ep = fold_input_free_nodes(ep)
            if scheme:
                quantized[name] = {**scheme.describe("executorch"), **executorch_quant.describe(scheme),
                                   **({"eight_bit_linears": eight_bit} if eight_bit else {})}
            exported[name] = ep
    constants = {
        "get_max_seq_len": r.max_prompt,
        "get_max_context_len": r.max_context,
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
        "use_sdpa_with_kv_cache": True,
        "get_vocab_size": c.text.vocab_size,
        "get_eos_ids": list(c.text.eos_token_ids),
    }
    if ctx.loaded.bos_token_id is not None:
        constants["get_bos_id"] = ctx.loaded.bos_token_id
    ctx.progress(f"executorch: lowering to {r.executorch.backend}")
    # the dynamically-quantized partitioner only when a part is w8 or w4 (dynamic int8 activations): on a float
    # or static-int8 program it finds nothing and costs a second partitioning pass over every method
    dynamic = any(scheme.name in ("w8", "w4") for scheme in ctx.quant.schemes.values())
    partitioner = ([XnnpackDynamicallyQuantizedPartitioner()] if dynamic else []) + [XnnpackPartitioner()] \
        if r.executorch.backend == "xnnpack" else []
    not_shared = shared_head(m, ctx)
    if partitioner and not_shared is None:
        names = [n for n, w in m.named_parameters(remove_duplicate=False) if w is m.lm_head.weight]
        partitioner = [leave_out_of_delegates(p, names) for p in partitioner]
    try:
        with partitions_share_weights():
            edge = to_edge_transform_and_lower(exported, partitioner=partitioner, constant_methods=constants,
                                               compile_config=EdgeCompileConfig(_check_ir_validity=False))
        program = edge.to_executorch(ExecutorchBackendConfig(
            # the KV cache in its own arena, shared by the methods that name it (text_prefill, text_decoder):
            # the runtime gives host-only methods one activation arena, which the cache must not live in
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=True),
            emit_mutable_buffer_names=True,
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass()))
    except Exception as e:  # exir raises many error types; the first line names the failing op or pass
        raise VlmcError(f"ExecuTorch lowering failed: {first_line(e)}") from None
    with open(ctx.out_dir / PTE, "wb") as f:  # streamed: `program.buffer` would join a second copy in memory
        program.write_to_file(f)
    del program
    delegated = {name: sum(1 for n in edge.exported_program(name).graph.nodes
                           if n.op == "call_function" and "executorch_call_delegate" in str(n.target))
                 for name in exported}
    hidden = m.embed_width
    programs = {
        "vision_encoder": {"file": PTE, "method": "vision_encoder", "inputs": [_io("image", image)],
                           "outputs": [io_entry("image_embeds", [1, image_tokens, hidden], "float32")]},
        "token_embedding": {"file": PTE, "method": "token_embedding", "inputs": [_io("input_ids", ids, {1: "seq_len"})],
                            "outputs": [io_entry("inputs_embeds", [1, "seq_len", hidden], "float32")]},
        "text_decoder": {"file": PTE, "method": "text_decoder",
                         "inputs": [_io("inputs_embeds", embeds, {1: "seq_len"}), _io("input_pos", pos)],
                         "outputs": [io_entry("logits", [1, c.text.vocab_size], "float32")]},
    }
    if "text_prefill" in exported:
        programs["text_prefill"] = {"file": PTE, "method": "text_prefill",
                                    "inputs": [io_entry("inputs_embeds", [1, "prompt_len", hidden], "float32"),
                                               io_entry("image_start", [1], "int64")],
                                    "outputs": [io_entry("logits", [1, c.text.vocab_size], "float32")],
                                    "min_prompt_len": shortest,
                                    "role": ("the whole prompt, the in-LLM token stages with it" if m.decoder_stages() else
                                             "a prompt's first prefill from slot 0, its attention inside XNNPACK (image_start "
                                             "unused); text_decoder from input_pos 0 gives the same logits, slower")}
    for name, n in delegated.items():
        programs[name]["delegate_calls"] = n
        if name in quantized:
            programs[name]["quantization"] = quantized[name]
    tied = {} if not m.tied_head else {"tied_embedding": (
        "stored once: the text_decoder's LM head reads the token_embedding's table (an input to its XNNPACK "
        "linear)" if not_shared is None and partitioner else f"stored twice: {not_shared or 'no XNNPACK partitioning'}")}
    return {"programs": programs, "runtime": "executorch", "backend": r.executorch.backend,
            "constant_methods": constants, **tied,
            "runner": ("vlmc (text_prefill takes the whole prompt)" if m.decoder_stages()
                       else "executorch MultimodalRunner (stock; prefills through text_decoder) or vlmc (through "
                            "text_prefill where the .pte has it)"),
            "kv_cache": "mutable buffers [1, max_context, kv_heads, head_dim] via llama::update_cache / llama::custom_sdpa"}
