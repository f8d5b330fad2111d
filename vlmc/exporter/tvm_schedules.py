"""Default CPU schedules for the kernels MetaSchedule did not tune.

TVM 0.27 lowers an unscheduled kernel to plain loops: one thread, no vectors (the built-in model's
decoder prefill took 170 ms that way, its vision encoder 98 ms). The decoder is never tuned (its text
length is symbolic, which MetaSchedule cannot tune) and the vision encoder only when the recipe gives
trials, so every program gets these schedules first; MetaSchedule's records replace them where it tuned:

- `Attention`: tvm_ops' fused attention kernel, blocks of query rows in parallel, each computed whole.
- `Matmul`: a product with an elementwise epilogue (linear layers) computed in register tiles of rows x
  vectors on whole tiles (rows and columns padded), the tiles spread over the cores, the epilogue applied
  per tile.
- `RowReduction`: norms, a row per task, their sums kept in a vector of lanes.
- TVM's own dlight CPU rules for matrix-vector products and other reductions.
- `Elementwise`: every other loop nest of elementwise work, flattened, split across the cores and
  vectorized.
"""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline_contiguous_spatial
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.s_tir.schedule import ScheduleError
from tvm.target.codegen import llvm_get_vector_width

from vlmc.exporter.tvm_ops import QUANTIZED_STAGES

ATTENTION_BLOCKS = ("attention_qk", "attention_lane_max", "attention_max", "T_fast_exp", "attention_lane_sum",
                    "attention_sum", "attention_pv")  # tvm_ops' fused attention, producers first (T_fast_exp: topi's name)


def _lanes(target, dtype_bits: int = 32) -> int:
    bits = llvm_get_vector_width(target)
    return max((bits if bits > 0 else 128) // dtype_bits, 4)


def _extent(sch, loop):
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


class Matmul(CPUScheduleRule):
    """C[..., i, j] = sum_k A[..., i, k] B[..., k, j] (then elementwise): register tiles of ROWS x VECTORS vectors."""

    ROWS, VECTORS = 6, 2  # 12 accumulators: measured 6x2 > 8x2 > 4x2 > 4x4 on the built-in model
    CHANNEL_PAIRS = 2  # quantized products: input channels per unrolled step (int4's two nibbles of a byte, constant shifts)

    def apply(self, func, target, _):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = normalize_prim_func(sch)
        if blocks is None:
            return None
        staged = {b.name: b.block_rv for b in blocks if b.name in QUANTIZED_STAGES}  # tvm_ops' quantized product
        infos = try_inline_contiguous_spatial(sch, [b for b in blocks if b.name not in staged])
        if not infos or infos[0].is_injective() or any(not b.is_injective() for b in infos[1:]):
            return None
        main = infos[0]
        kinds = main.dom_kind()
        spatial = len(kinds) - len(kinds.lstrip("S"))
        if spatial < 2 or set(kinds[spatial:]) != {"R"}:
            return None
        loops = sch.get_loops(main.block_rv)
        n = _extent(sch, loops[spatial - 1])
        lanes = _lanes(target)
        if n is None or n < lanes:
            return None  # the vectors run along the output's last axis: it must be known and wide enough
        m = _extent(sch, loops[spatial - 2])  # None: a symbolic row count (the decoder's prompt)
        pad_rows, pad_cols = m is None or m % self.ROWS != 0, n % lanes != 0
        copy, padded_inputs = None, []
        if staged:  # its rows come padded to whole tiles, its columns stay as they are
            padded_inputs = [staged["quantized_rows"]]
        elif pad_rows or pad_cols:
            # whole tiles: a ragged last tile of rows put a row test in every inner loop (206 x 128 x 512: 211 ->
            # 120 us; symbolic rows 325 us), a ragged last vector left the whole loop scalar
            try:
                sch.pad_einsum(main.block_rv, [1] * (spatial - 2) + [self.ROWS if pad_rows else 1, lanes if pad_cols else 1]
                               + [1] * (len(kinds) - spatial))
            except ScheduleError:  # a block pad_einsum refuses (FlashCache's, for one): the last tile stays ragged
                pass
            else:
                loops = sch.get_loops(main.block_rv)
                n = _extent(sch, loops[spatial - 1])
                padded_inputs = sch.get_producers(main.block_rv)
                copy = sch.get_consumers(main.block_rv)[0]  # the padded result's real rows and columns
        rows, cols, reduction = loops[spatial - 2], loops[spatial - 1], loops[spatial:]
        wide = lanes * self.VECTORS
        width = wide if n % wide == 0 or n % lanes else lanes  # a divisor of n where one fits
        i_out, i_in = sch.split(rows, [None, self.ROWS])
        j_out, j_in = sch.split(cols, [None, width])
        k = sch.fuse(*reduction) if len(reduction) > 1 else reduction[0]
        sch.reorder(*loops[:spatial - 2], i_out, j_out, k, i_in, j_in)
        outer = sch.fuse(*loops[:spatial - 2], i_out, j_out)
        sch.parallel(outer)
        for padded_input in padded_inputs:  # each tile pads the rows it reads (no parallel loop of its own to start)
            sch.compute_at(padded_input, outer, preserve_unit_loops=True)
            _, vec = sch.split(sch.get_loops(padded_input)[-1], [None, lanes])
            sch.vectorize(vec)
        accumulator = sch.cache_write(main.block_rv, 0, "local")
        sch.reverse_compute_at(accumulator, outer, preserve_unit_loops=True)
        copies = [copy] if copy is not None else []
        for epilogue in infos[1:]:
            try:
                sch.reverse_compute_inline(epilogue.block_rv)
            except Exception:  # one over fewer rows than the tiles (tvm_ops' quantized product cuts its own
                copies.append(epilogue.block_rv)  # padding) is copied out per tile like pad_einsum's
        for block in copies:  # each tile's real part copied out (with the epilogue) while it is in cache
            try:
                sch.reverse_compute_at(block, outer, preserve_unit_loops=True)
            except ScheduleError:  # an epilogue that reads other rows: it stays a loop nest of its own
                continue
            _, vec = sch.split(sch.get_loops(block)[-1], [None, lanes])
            sch.vectorize(vec)
        _, vec = sch.split(j_in, [None, lanes])
        sch.vectorize(vec)  # before the init is split off: a reduction block (with its init) may be vectorized
        sch.unroll(i_in)
        k_outer = k
        if "quantized_weight" in staged:  # each input channel's vectors of columns dequantized once for the tile's rows
            k_outer, k_at = sch.split(k, [None, self.CHANNEL_PAIRS])
            sch.compute_at(staged["quantized_weight"], k_at, preserve_unit_loops=True)
            _, vec = sch.split(sch.get_loops(staged["quantized_weight"])[-1], [None, lanes])
            sch.vectorize(vec)
            sch.unroll(k_at)  # int4: prefill's products 1.7x -> 1.4x float's
        init = sch.decompose_reduction(main.block_rv, k_outer)
        for block in (init, accumulator):
            loops = sch.get_loops(block)
            if sch.get(loops[-1]).kind != tirx.ForKind.VECTORIZED:
                _, vec = sch.split(loops[-1], [None, lanes])
                sch.vectorize(vec)
        return sch


class Attention(CPUScheduleRule):
    """tvm_ops' fused attention: blocks of ROWS query rows of one head in parallel, each computed whole (its
    scores in tiles of ROWS x one vector of keys, the softmax's lane maxima and sums vectorized, the values in
    tiles of ROWS x head_dim) while its scores stay in cache."""

    ROWS = 8

    def apply(self, func, target, _):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        try:
            blocks = {name: sch.get_sblock(name) for name in ATTENTION_BLOCKS + ("attention_out",)}
            for name in ("attention_scores", "attention_shifted"):
                sch.compute_inline(sch.get_sblock(name))
        except (ScheduleError, ValueError):  # not the fused attention kernel
            return None
        lanes = _lanes(target)
        b, i, h, d = sch.get_loops(blocks["attention_out"])
        rows_out, rows_in = sch.split(i, [None, self.ROWS])
        sch.reorder(b, h, rows_out, rows_in, d)
        block_of_rows = sch.fuse(b, h, rows_out)
        sch.parallel(block_of_rows)
        sch.vectorize(d)
        for name in reversed(ATTENTION_BLOCKS):
            sch.compute_at(blocks[name], block_of_rows, preserve_unit_loops=True)
        self._tile(sch, blocks["attention_qk"], lanes, values=False)
        for name in ("attention_lane_max", "attention_lane_sum"):
            *_, lane, keys = sch.get_loops(blocks[name])
            sch.reorder(keys, lane)
            sch.vectorize(lane)
            sch.decompose_reduction(blocks[name], keys)
        _, vec = sch.split(sch.get_loops(blocks["T_fast_exp"])[-1], [None, lanes])
        sch.vectorize(vec)
        self._tile(sch, blocks["attention_pv"], lanes, values=True)
        return sch

    @staticmethod
    def _tile(sch, block, lanes, values: bool):
        """A product under the row block: rows x (a vector of keys | the head's values), accumulated in registers."""
        loops = sch.get_loops(block)
        if values:  # [.., rows, 1, head_dim] reduced over keys: head_dim in chunks of at most two vectors
            rows, head, cols, reduction = loops[-4:]
            outer, cols = sch.split(cols, [None, min(2 * lanes, _extent(sch, cols) or lanes)])
            sch.reorder(outer, reduction, rows, head, cols)
        else:  # [.., 1, rows, keys] reduced over head_dim: keys in vectors
            rows, cols, reduction = loops[-3:]
            outer, cols = sch.split(cols, [None, lanes])
            sch.reorder(outer, reduction, rows, cols)
        accumulator = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(accumulator, outer, preserve_unit_loops=True)
        sch.vectorize(cols)
        sch.unroll(rows)
        sch.decompose_reduction(block, reduction)
        sch.vectorize(sch.get_loops(accumulator)[-1])


class RowReduction(CPUScheduleRule):
    """Reductions over the last axis with their elementwise epilogue (layer and RMS norms): rows in parallel,
    each computed whole, every reduction kept in a vector of `lanes` partial results and then summed across
    it (a serial chain of one add per element was latency-bound: the built-in encoder's layer norm 30 us)."""

    def apply(self, func, target, _):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or len(infos) < 2 or not infos[-1].is_injective():
            return None
        rank = len(infos[-1].dom_kind())
        lanes = _lanes(target)
        reductions = [b for b in infos if not b.is_injective()]
        if not reductions or rank < 2:
            return None
        for block in reductions:
            loops = sch.get_loops(block.block_rv)
            width = _extent(sch, loops[-1])
            if block.dom_kind() != "S" * (rank - 1) + "R" or width is None or width % lanes:
                return None
        for block in infos[:-1]:
            if block.is_injective() and len(block.dom_kind()) not in (rank - 1, rank):
                return None
        partials = {}  # each reduction as `lanes` partial results (a vector), then one reduction across them
        for block in reductions:
            _, lane = sch.split(sch.get_loops(block.block_rv)[-1], [None, lanes])
            partials[block.name] = sch.rfactor(lane, factor_axis=rank - 1)
        loops = sch.get_loops(infos[-1].block_rv)
        rows = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        sch.parallel(rows)
        _, vec = sch.split(loops[-1], [None, lanes])
        sch.vectorize(vec)
        for block in reversed(infos[:-1]):
            try:
                sch.compute_at(block.block_rv, rows, preserve_unit_loops=True)
            except ScheduleError:  # a block that reads other rows than its consumer's
                return None
            if block.name in partials:
                sch.compute_at(partials[block.name], rows, preserve_unit_loops=True)
        for partial in partials.values():  # under the row: [lane, unit loops, keys / lanes] -> the lanes innermost, one vector
            lane, *_, outer = sch.get_loops(partial)[1:]  # [0]: the rows
            if _extent(sch, lane) == lanes:
                sch.reorder(outer, lane)
                sch.vectorize(lane)
            sch.decompose_reduction(partial, outer)
        return sch


class Elementwise(CPUScheduleRule):
    """A kernel of elementwise blocks only: its loops flattened, split across the cores, vectorized."""

    def apply(self, func, target, _):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = try_inline_contiguous_spatial(sch, normalize_prim_func(sch))
        if not infos or len(infos) != 1 or not infos[0].is_injective():
            return None
        loops = sch.get_loops(infos[0].block_rv)
        if not loops:
            return None
        flat = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        lanes = _lanes(target)
        outer, vec = sch.split(flat, [None, lanes])
        sch.parallel(outer)
        sch.vectorize(vec)
        return sch


class Tolerant(CPUScheduleRule):
    """One of TVM's own rules, taken as not applying where it fails on a kernel instead of saying so (dlight's
    GEMV asserts on a product fused with DASQ's outlier sum)."""

    def __init__(self, rule):
        self.rule = rule

    def apply(self, func, target, tunable):
        try:
            return self.rule.apply(func, target, tunable)
        except (AssertionError, ScheduleError):
            return None


def _rules() -> tuple:
    return (Attention(), Matmul(), Tolerant(dlight.cpu.GEMV()), RowReduction(), Tolerant(dlight.cpu.Reduction()),
            Elementwise())


def default_schedules():
    """The pass that schedules every kernel left unscheduled (run under the target)."""
    return dlight.ApplyDefaultSchedule(*_rules())


def default_schedule(func, target):
    """The schedule `default_schedules` gives one kernel (its trace is what MetaSchedule replays), or None."""
    for rule in _rules():
        sch = rule.apply(func, target, False)
        sch = (sch[0] if sch else None) if isinstance(sch, list) else sch
        if sch is not None:
            return sch
    return None
