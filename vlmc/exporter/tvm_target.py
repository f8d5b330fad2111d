"""TVM target: each program imported into Relax from torch.export and compiled to one shared library
per architecture.

The programs are the explicit-cache ones ONNX exports (the KV cache as inputs/outputs, the text length
bounded-dynamic 1..max_prompt): Relax keeps the symbolic length, so one library serves prefill and
decode, and the token passes are in the graph as they are in every other target. The host build is
verified here like every target; an aarch64 build is cross-compiled with Debian's
aarch64-linux-gnu-gcc and runs on an ARM device (`vlmc profile --device`). MetaSchedule tunes the vision
encoder (static shapes) when the recipe gives trials; its records are saved in the bundle and reused.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vlmc.errors import VlmcError, first_line
from vlmc.exporter import tvm_ops
from vlmc.exporter.context import PROGRAM_PARTS, ExportContext, io_entry
from vlmc.runtimes.tvm_runner import host_architecture, physical_cores, size_thread_pool

if TYPE_CHECKING:
    import tvm

TUNING_DIR = "tvm_tuning"
CROSS_CC = {"aarch64": "aarch64-linux-gnu-gcc"}
TUNING_RECORDS = ("database_workload.json", "database_tuning_record.json")


def library_name(program: str, arch: str) -> str:
    return f"{program}.{arch}.so"


def compile_target(arch: str, options) -> dict:
    """The LLVM target of one architecture as TVM's JSON form: the host's own CPU, or a cross triple."""
    from tvm.target import codegen

    if arch == host_architecture():
        mcpu = codegen.llvm_get_system_cpu() if options.mcpu == "native" else options.mcpu
        if arch == "x86_64":  # LLVM's AVX-512 tuning splits TVM's 16-lane vectors in two: the exp kernel ran 2.3x slower
            return {"kind": "llvm", "mcpu": mcpu, "mattr": ["-prefer-256-bit"]}
        return {"kind": "llvm", "mcpu": mcpu}
    if arch == "aarch64":
        return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": options.aarch64_mcpu, "mattr": ["+neon"]}
    raise VlmcError(f"recipe field 'tvm.architectures': no cross build for {arch} from {host_architecture()}")


def architectures(options) -> list[str]:
    """The recipe's architectures, `host` resolved to this machine's, each once."""
    resolved = [host_architecture() if a == "host" else a for a in options.architectures]
    return list(dict.fromkeys(resolved))


def check(recipe) -> None:
    """What the TVM target needs, refused before any export work: the package, the cross compiler, records."""
    try:
        import tvm  # noqa: F401
    except ImportError:
        raise VlmcError("target tvm needs Apache TVM: pip install 'vlmc[tvm]'") from None
    for arch in architectures(recipe.tvm):
        if arch != host_architecture():
            cc = CROSS_CC.get(arch)
            if cc is None:
                raise VlmcError(f"recipe field 'tvm.architectures': no cross build for {arch} from {host_architecture()}")
            if shutil.which(cc) is None:
                raise VlmcError(f"target tvm for {arch} needs the cross compiler {cc}: apt-get install gcc-aarch64-linux-gnu")
    records = recipe.tvm.tuning_records
    if records is not None and not all((Path(records) / f).is_file() for f in TUNING_RECORDS):
        raise VlmcError(f"recipe field 'tvm.tuning_records': {records} holds no MetaSchedule records ({', '.join(TUNING_RECORDS)})")


def _import(job, fast_math: bool) -> "tvm.IRModule":
    from tvm.relax.frontend.torch import from_exported_program

    try:
        with torch.no_grad():
            ep = torch.export.export(job.module.eval(), job.args, dynamic_shapes=job.dynamic_shapes)
            ep = ep.run_decompositions(tvm_ops.decompositions())
        mod = from_exported_program(ep, keep_params_as_input=False, unwrap_unit_return_tuple=False,
                                    custom_convert_map=tvm_ops.CONVERTERS, run_ep_decomposition=False)
        return tvm_ops.rewrite(mod, fast_math)
    except Exception as e:  # the importer raises many types; the first line names the unsupported op
        raise VlmcError(f"TVM import of {job.name} failed: {first_line(e)}") from None


def _in_process_builder():
    """MetaSchedule's LocalBuilder starts fresh worker processes per batch, and each spends ~50 s importing
    TVM's tensor intrinsics before its first build (past the builder's 30 s timeout here): build in this
    process instead, where they are imported once."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder, local_builder

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            results = []
            for item in build_inputs:
                try:
                    built = local_builder.default_build(item.mod, item.target, None)
                    results.append(BuilderResult(local_builder.default_export(built), None))
                except Exception as e:  # a candidate schedule that does not build is a failed trial, not an error
                    results.append(BuilderResult(None, first_line(e)))
            return results

    return InProcessBuilder()


def _tasks_worth_tuning(mod, target) -> list:
    """MetaSchedule's tasks of the module, less the kernels it should not spend trials on: those scheduled
    already (tvm_schedules' fused attention, where 230 trials found 1.0 ms against the default schedule's
    0.3 ms), pure reshapes, which the VM runs as views, and kernels without a reduction (copies, transposes,
    elementwise chains), where its best of 1000 trials ran slower in the pipeline than tvm_schedules'
    flattened, vectorized loop (the keys' transpose: 113 against 42 us)."""
    from tvm import s_tir
    from tvm.relax.analysis import has_reshape_pattern
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.meta_schedule.relax_integration import extract_tasks

    def kept(task):
        func = task.mod["main"]
        if (func.attrs and func.attrs.get("tirx.is_scheduled")) or has_reshape_pattern(func):
            return False
        blocks = normalize_prim_func(s_tir.Schedule(func))
        return blocks is None or not all(block.is_injective() for block in blocks)

    return [task for task in extract_tasks(mod, target) if kept(task)]


def _tune(ctx: ExportContext, mod, target):
    """MetaSchedule over the (legalized) module's tasks, records in the bundle's tvm_tuning/; then apply the best."""
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.relax_integration import extracted_tasks_to_tune_contexts

    options = ctx.recipe.tvm
    work_dir = ctx.out_dir / TUNING_DIR
    work_dir.mkdir(exist_ok=True)
    if options.tuning_records:
        for name in TUNING_RECORDS:
            shutil.copy(Path(options.tuning_records) / name, work_dir / name)
    size_thread_pool()  # MetaSchedule's runner processes time each candidate on the cores the runtime will use
    with target, contextlib.redirect_stdout(io.StringIO()):
        tasks = _tasks_worth_tuning(mod, target)
    if options.tune_trials:
        ctx.progress(f"tvm: MetaSchedule, {options.tune_trials} trials on the vision encoder"
                     + (f" (adding to {options.tuning_records})" if options.tuning_records else ""))
        with contextlib.redirect_stdout(io.StringIO()):
            contexts, weights = extracted_tasks_to_tune_contexts(tasks, str(work_dir), seed=0)
            ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(work_dir), max_trials_global=options.tune_trials,
                               num_trials_per_iter=min(64, options.tune_trials), builder=_in_process_builder(),
                               runner=ms.runner.LocalRunner(timeout_sec=60))
    ctx.progress("tvm: the default schedules timed as MetaSchedule candidates")
    with target, contextlib.redirect_stdout(io.StringIO()):
        _offer_default_schedules(tasks, work_dir, target)
    shutil.rmtree(work_dir / "logs", ignore_errors=True)  # MetaSchedule's own logs: not part of the bundle
    with target:
        return relax.transform.MetaScheduleApplyDatabase(str(work_dir))(mod)


def _offer_default_schedules(tasks, work_dir: Path, target) -> None:
    """Each task's default schedule (tvm_schedules), timed by MetaSchedule's own runner and committed to the
    records as one more candidate: the database's best, which is what gets applied, is then never slower than
    the default (on the built-in encoder, 1000 trials picked layer norms and products slower than it). Records
    reused from another bundle get the same offer; a default already on record is not timed again."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    from vlmc.exporter import tvm_schedules

    database = ms.database.JSONDatabase(work_dir=str(work_dir))
    offers = []
    for task in tasks:
        sch = tvm_schedules.default_schedule(task.mod["main"], target)
        if sch is None:
            continue
        workload = database.commit_workload(task.mod)
        if any(str(r.trace) == str(sch.trace) for r in database.get_top_k(workload, 1 << 20)):
            continue
        offers.append((workload, sch, ArgInfo.from_prim_func(task.mod["main"])))
    if not offers:
        return
    built = _in_process_builder().build([BuilderInput(sch.mod, target) for _, sch, _ in offers])
    runs = ms.runner.LocalRunner(timeout_sec=60).run([RunnerInput(b.artifact_path, "cpu", args)
                                                     for b, (_, _, args) in zip(built, offers) if b.error_msg is None])
    timed = [offer for b, offer in zip(built, offers) if b.error_msg is None]
    for (workload, sch, args), future in zip(timed, runs):
        result = future.result()
        if result.error_msg is None and result.run_secs:
            database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, result.run_secs, target, args))


def _scheduled(ctx: ExportContext, name: str, mod, target: dict, tune: bool):
    """The module legalized and fused into kernels, MetaSchedule's records applied where `tune`, and every
    kernel left over given vlmc's default CPU schedule (tvm_schedules)."""
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight

    from vlmc.exporter import tvm_schedules

    target = tvm.target.Target({**target, "num-cores": physical_cores()})
    prepare = [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
               relax.backend.DispatchSampling(), relax.backend.DispatchSortScan(), relax.transform.LegalizeOps(),
               relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant()]
    with target:
        mod = tvm.transform.Sequential(prepare)(mod)
        try:
            mod = tvm.transform.Sequential([relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
        except Exception as e:  # TVM 0.27's fusion fails to type some symbolic shapes (LFM2's decoder); its FFI raises its own types
            ctx.progress(f"tvm: {name} built unfused (TVM's FuseOps: {first_line(e)[:120]})")
    if tune:  # the fused attention keeps its own schedule: MetaSchedule found none as fast
        with target:
            mod = dlight.ApplyDefaultSchedule(tvm_schedules.Attention())(mod)
        mod = _tune(ctx, mod, target)
    with target:
        return tvm_schedules.default_schedules()(mod)


def _io(mod, job) -> dict:
    """Input/output names, shapes (symbolic dims by name) and dtypes as the Relax function states them."""
    from tvm import tirx

    dims = {d.__name__ for spec in job.dynamic_shapes or () for axes in (spec if isinstance(spec, list) else [spec])
            if isinstance(axes, dict) for d in axes.values()}
    symbol = dims.pop() if len(dims) == 1 else None  # torch's own symbol names (s29) say less than the Dim's

    def entry(name, ty):
        return io_entry(name, [int(d) if isinstance(d, tirx.IntImm) else symbol or str(d) for d in ty.shape.values], str(ty.dtype))

    def flat(ty):  # a returned list of caches is a nested tuple
        return [leaf for field in ty.fields for leaf in flat(field)] if hasattr(ty, "fields") else [ty]

    main = mod["main"]
    return {"inputs": [entry(n, p.ty) for n, p in zip(job.input_names, main.params)],
            "outputs": [entry(n, ty) for n, ty in zip(job.output_names, flat(main.ret_ty))]}


def _bounded(mod, max_prompt: int):
    """The program's symbolic text length bounded by max_prompt (Relax's `tir_var_upper_bound`), so its
    intermediate tensors are planned once at their largest instead of allocated per call (a decode step 5%
    faster on the built-in model)."""
    from tvm import tirx

    symbols = {d.name for p in mod["main"].params for d in getattr(p.ty, "shape", None) or () if isinstance(d, tirx.Var)}
    if symbols:
        mod["main"] = mod["main"].with_attr("tir_var_upper_bound", {name: max_prompt for name in sorted(symbols)})
    return mod


def _quantized_model(ctx: ExportContext):
    """The model the programs are exported from: the target's model with its quantized parts' linears holding
    integer weights (tvm_quant), and what each quantized part records."""
    from vlmc.passes.quant import promoted_layers, tvm_quant

    model = ctx.target_model("tvm")
    if not ctx.quant:
        return model, {}
    promoted = {part: promoted_layers(model, scheme, part) for part, scheme in ctx.quant.schemes.items()}
    ctx.progress(f"tvm: integer weights for {', '.join(f'{p} ({s.name})' for p, s in ctx.quant.schemes.items())}")
    return tvm_quant.quantize(model, ctx.quant.schemes, promoted)


def lower(ctx: ExportContext) -> dict:
    import tvm
    from tvm.support import cc

    options = ctx.recipe.tvm
    archs = architectures(options)
    targets = {arch: compile_target(arch, options) for arch in archs}
    tuned = options.tune_trials > 0 or options.tuning_records is not None
    model, quantized = _quantized_model(ctx)
    programs = {}
    for job in ctx.explicit_cache_programs("tvm", "chw_uint8", model):
        ctx.progress(f"tvm: importing {job.name} (torch.export -> Relax)")
        mod = _bounded(_import(job, options.fast_math), ctx.recipe.max_prompt)
        io_spec = _io(mod, job)
        libraries = {}
        for arch, target in targets.items():
            program_mod = _scheduled(ctx, job.name, mod, target, job.name == "vision_encoder" and tuned and arch == host_architecture())
            ctx.progress(f"tvm: compiling {job.name} for {arch} ({target.get('mcpu')})")
            path = ctx.out_dir / library_name(job.name, arch)
            try:
                executable = tvm.compile(program_mod, target=tvm.target.Target(target))
                fcompile = cc.cross_compiler(CROSS_CC[arch]) if arch in CROSS_CC and arch != host_architecture() else None
                executable.export_library(str(path), fcompile=fcompile)
            except Exception as e:  # TVM's FFI raises its own error types
                raise VlmcError(f"TVM build of {job.name} for {arch} failed: {first_line(e)}") from None
            libraries[arch] = path.name
        programs[job.name] = {"file": libraries.get(host_architecture(), next(iter(libraries.values()))),
                              "files": list(libraries.values()), "libraries": libraries, **io_spec}
        part = PROGRAM_PARTS.get(job.name)
        if part in quantized:
            programs[job.name]["quantization"] = {**ctx.scheme(job.name).describe("tvm"), **quantized[part]}
    entry = {"programs": programs, "runtime": "tvm", "tvm_version": tvm.__version__,
             "architectures": {arch: {"target": json.dumps(t)} for arch, t in targets.items()},
             "kv_cache": "explicit inputs/outputs [1, kv_heads, max_context, head_dim]",
             "math": "fast: exp, erf and tanh as TVM's polynomials (topi.fast_*)" if options.fast_math else "exact (libm)",
             "prefill": f"at the prompt's length (1..max_prompt={ctx.recipe.max_prompt}); logits_index picks the last token",
             "tuning": {"vision_encoder": {"trials": options.tune_trials, "records": TUNING_DIR, "reused": options.tuning_records}}
             if tuned else None}
    return entry
