"""The fold W_eff = Q[keep_out]·W·L[:, keep_in]·scale, b_eff = (Q·b)[keep_out]·scale, in Triton.

One kernel, a GEMM with index lists, does every product of the fold and of compacted_linear's
backward chain:
    C[i, j] = scale · Σ_t A[ra(i), t]·B[t, cb(j)]   (+ u[ra(i)]·v[cb(j)], a fused rank-1 update)
ra/cb are the kept-row/column lists (gather: the pruned rows of Q and columns of L are never read),
and C is written either compact (the fold's student-sized output) or back at ra/cb (the backward's
dQ/dL rows/columns, so the skipped ones cost nothing). The epilogue applies the scale (the
attention-scale of WID_METHOD §8) and casts to the output dtype; the bias fold b_eff = (Q·b)[keep] is
a GEMV over the same A tiles the kernel already loads, so it rides along in the K loop instead of
being a separate launch (programs of the first column tile store it).

The chain Q·W·L is two launches of this kernel, ordered by cost ((Q·W)·L vs Q·(W·L), in
multiply-adds given the kept counts). A single launch that keeps the intermediate tile on chip
(flash-attention style) would recompute Q·W once per output column tile, k/BLOCK_N times the work:
for these shapes (m, k ≥ 384) two launches move less and compute less.

Tile shapes and split-K (`choose_config`). WID's outputs are small next to the GPU and often next to their K:
a 768×768 output is 36 tiles of 128×128, so on an H100/H200 (132 SMs) a fixed 128×128 grid leaves 96 SMs idle,
and the decoder's dL = (Q·W)ᵀ·dW_eff (768×768, K = the vocabulary, 30522) runs ~950 serial K steps on those 36.
So the tile follows (M, N, K) and the SM count (`torch.cuda.get_device_properties(dev).multi_processor_count`,
132 assumed without a GPU, as the compile report does):
  * 128×128 tiles, 8 warps, where their grid fills the SMs: the most multiply-adds per loaded byte;
  * else, where K is long enough to give every split at least MIN_SPLIT_K elements, split-K on 128×128 tiles:
    SPLIT_K = SMs // tiles programs per output tile (one wave: a partial second wave costs a whole one) along the
    grid's second axis, each reducing its own range of K into an fp32 workspace (SPLIT_K, M, N);
  * else the largest smaller tile (64×128, then 64×64, 4 warps) whose grid fills the SMs, or 64×64.
Split-K is deterministic, without atomics: a second launch of the same binary (n_sum = SPLIT_K: no K steps) adds
the partial sums in a fixed order, then runs the epilogue every launch shares (scale, rank-1 term, scatter, cast,
the bias GEMV's per-split partials): the epilogue exists once, and the compile report's binary is the one that
runs (a separate reduction kernel would be a second binary, without tensor-core work). The workspace round trip
(SPLIT_K·M·N·8 bytes, L2-resident at these sizes) is why a short K is not split. On a GPU the first launch per
shape bucket (powers of two of M, N, K; per dtypes, operand layouts and index-list flags) is timed by
`triton.autotune` over this choice and one or two neighbours, split-K candidates with their combine launch
(WID_TRITON_AUTOTUNE=0: the heuristic only; none while a CUDA graph is being captured). Under the interpreter,
whose cost is per program and per K step, one config of few big programs is used.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, SUM, TL_DTYPE, dot_precision, kept_indices, launch, runs_here, upcast_needed
from ... import reference

__all__ = ["fold", "gather_gemm", "choose_config", "GemmConfig"]


@triton.jit(do_not_specialize=["n_sum"])  # 0 or SPLIT_K: both launches of a split-K GEMM run one binary
def _gather_gemm_kernel(A, B, C, IDX_M, IDX_N, BIAS_IN, BIAS_OUT, U, V, WS, BWS,
                        M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn, scale, bias_scale, n_sum,
                        GATHER_M: tl.constexpr, SCATTER_M: tl.constexpr, GATHER_N: tl.constexpr,
                        SCATTER_N: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RANK1: tl.constexpr,
                        COMPUTE: tl.constexpr, PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Offsets are int32: every operand here is weight-sized (the launcher asserts each one's last element is below
    # 2^31); 64-bit pointer tiles of the 128x128 store and the gathered loads cost registers the accumulator needs.
    # grouped tile order: consecutive programs share A row tiles in L2
    pid = tl.program_id(0)
    grid_m = (M + BLOCK_M - 1) // BLOCK_M
    grid_n = (N + BLOCK_N - 1) // BLOCK_N
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
    pid_n = (pid % (GROUP_M * grid_n)) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    if GATHER_M:
        a_rows = tl.load(IDX_M + rm, mask=m_ok, other=0)
    else:
        a_rows = rm
    if GATHER_N:
        b_cols = tl.load(IDX_N + rn, mask=n_ok, other=0)
    else:
        b_cols = rn

    if SPLIT_K == 1:
        k_lo = 0
        k_hi = K
    else:  # split pid_k's range: whole BLOCK_K steps, so a tile never crosses into the next split
        k_len = ((K + BLOCK_K - 1) // BLOCK_K + SPLIT_K - 1) // SPLIT_K * BLOCK_K
        k_lo = tl.program_id(1) * k_len
        k_hi = tl.where(n_sum == 0, tl.minimum(k_lo + k_len, K), k_lo)  # the combine launch: no K steps
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    bacc = tl.full([BLOCK_M], 0.0, tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        a = tl.load(A + a_rows[:, None] * s_am + rk[None, :] * s_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(B + rk[:, None] * s_bk + b_cols[None, :] * s_bn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        a = a.to(COMPUTE)
        b = b.to(COMPUTE)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if HAS_BIAS:
            bv = tl.load(BIAS_IN + rk, mask=k_ok, other=0.0).to(tl.float32)
            bacc += tl.reduce(a.to(tl.float32) * bv[None, :], 1, SUM)

    if SPLIT_K > 1:
        # partial launch (n_sum = 0): store this split's sums; combine launch (n_sum = SPLIT_K): add the
        # SPLIT_K partial sums in order, then fall through to the epilogue, which the partial launch masks off
        # compact (split, M, N) workspace, int32 offsets like every operand (`_workspace` asserts SPLIT_K·M·N < 2^31)
        ws = rm[:, None] * N + rn[None, :]
        mn_ok = m_ok[:, None] & n_ok[None, :]
        for s in tl.range(0, n_sum, num_stages=1):
            acc += tl.load(WS + (ws + s * M * N), mask=mn_ok, other=0.0)
        tl.store(WS + (ws + tl.program_id(1) * M * N), acc, mask=mn_ok & (n_sum == 0))
        if HAS_BIAS:
            bias_ok = m_ok & (pid_n == 0)
            for s in tl.range(0, n_sum, num_stages=1):
                bacc += tl.load(BWS + s * M + rm, mask=bias_ok, other=0.0)
            tl.store(BWS + tl.program_id(1) * M + rm, bacc, mask=bias_ok & (n_sum == 0))
        m_ok = m_ok & (n_sum > 0)

    acc = acc * scale
    if HAS_RANK1:
        u = tl.load(U + a_rows, mask=m_ok, other=0.0).to(tl.float32)
        v = tl.load(V + b_cols, mask=n_ok, other=0.0).to(tl.float32)
        acc += u[:, None] * v[None, :]
    if SCATTER_M:
        c_rows = a_rows
    else:
        c_rows = rm
    if SCATTER_N:
        c_cols = b_cols
    else:
        c_cols = rn
    tl.store(C + c_rows[:, None] * s_cm + c_cols[None, :] * s_cn, acc.to(C.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])
    if HAS_BIAS:
        tl.store(BIAS_OUT + c_rows, (bacc * bias_scale).to(BIAS_OUT.dtype.element_ty), mask=m_ok & (pid_n == 0))


# ----------------------------------------------------------------------------------------- launch configuration
SMS_ASSUMED = 132  # H100/H200 SXM: the SM count without a GPU (the compile report's target)
MIN_SPLIT_K = 1024  # K elements per split at least: below that the workspace round trip outweighs the idle SMs
MAX_SPLIT_K = 16
AUTOTUNE = not INTERPRET and os.environ.get("WID_TRITON_AUTOTUNE", "1") not in ("", "0")


class GemmConfig(NamedTuple):
    """One launch configuration of `_gather_gemm_kernel`: tile, grouped order, warps, pipeline stages, K splits."""
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    split_k: int = 1

    def meta(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP_M=self.group_m,
                    SPLIT_K=self.split_k, num_warps=self.num_warps, num_stages=self.num_stages)

    def __str__(self):
        split = f", split-K {self.split_k}" if self.split_k > 1 else ""
        return (f"tile {self.block_m}x{self.block_n}x{self.block_k}{split}, {self.num_warps} warps, "
                f"{self.num_stages} stages")


INTERPRET_CONFIG = GemmConfig(64, 64, 64, 1, 4, 1)  # few, big programs: the interpreter's cost is per program and K step


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device) -> int:
    """The SMs of `device` (a CUDA device), SMS_ASSUMED for anything else."""
    device = torch.device(device)
    if device.type != "cuda":
        return SMS_ASSUMED
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _tiles(M, N, block_m, block_n):
    return triton.cdiv(M, block_m) * triton.cdiv(N, block_n)


def choose_config(M, N, K, elem_bytes=2, sms=SMS_ASSUMED, interpret=INTERPRET) -> GemmConfig:
    """The deterministic choice for C (M×N) = A (M×K)·B (K×N) in `elem_bytes`-wide operands (module docstring)."""
    if interpret:
        return INTERPRET_CONFIG
    # half precision: 128-byte rows of K, 32 KB of operands per 128x128 stage. fp32: 64-byte rows (two 32-byte
    # sectors), 16 KB per stage, one more stage: at BLOCK_K 32 the IEEE FMA loop of the 128x128 dQ tile (rank-1
    # epilogue) needed more than 255 registers and spilled (the compile report)
    bk, stages = (64, 4) if elem_bytes <= 2 else (16, 4)
    tiles = _tiles(M, N, 128, 128)
    if tiles >= sms:
        return GemmConfig(128, 128, bk, 8, 8, stages)
    split = min(sms // tiles, K // MIN_SPLIT_K, MAX_SPLIT_K)
    if split >= 2:
        return GemmConfig(128, 128, bk, 8, 8, stages, split)
    for bm, bn in ((64, 128), (64, 64)):
        if _tiles(M, N, bm, bn) >= sms:
            break
    return GemmConfig(bm, bn, bk, 8, 4, stages)


def _candidates(M, N, K, elem_bytes, sms) -> list[GemmConfig]:
    """What the autotuner times: the heuristic's choice first, then its nearest alternatives."""
    best = choose_config(M, N, K, elem_bytes, sms, interpret=False)
    bk, stages = best.block_k, best.num_stages
    tiles = _tiles(M, N, 128, 128)
    found = [best]
    if best.split_k > 1:  # more, shorter splits (a second partial wave); no workspace at all
        found += [best._replace(split_k=min(triton.cdiv(sms, tiles), MAX_SPLIT_K)), GemmConfig(64, 64, bk, 8, 4, stages)]
    elif best.block_m == 128:  # a finer grid has a smaller last wave
        found += [GemmConfig(64, 128, bk, 8, 4, stages), best._replace(num_stages=3)]
    else:  # split-K with less K per split than the heuristic asks for, and the other small tile
        split = min(sms // tiles, K // (MIN_SPLIT_K // 4), MAX_SPLIT_K)
        if split >= 2:
            found.append(GemmConfig(128, 128, bk, 8, 8, stages, split))
        found.append(GemmConfig(64, 64 if best.block_n == 128 else 128, bk, 8, 4, stages))
    return list(dict.fromkeys(found))


# ----------------------------------------------------------------------------------------- launchers
_tuned: dict = {}  # (device, shape bucket, dtypes, layouts, flags) -> the GemmConfig triton.autotune chose here
_do_bench = None  # the autotuner's benchmarker (None: Triton's); tests put a stand-in here


def _workspace(params, split):
    """The split-K partial sums (fp32, compact: split × M × N, and split × M for the bias GEMV) into params."""
    C, M, N = params["C"], params["M"], params["N"]
    assert split * M * N < 2 ** 31, "split-K workspace offsets are 32-bit"
    params["WS"] = torch.empty((split, M, N), dtype=torch.float32, device=C.device)
    if params["HAS_BIAS"]:
        params["BWS"] = torch.empty((split, M), dtype=torch.float32, device=C.device)


def _combine(params, exception=None):
    """Split-K's second launch: the same binary, with no K steps, sums the partials and runs the epilogue."""
    if exception is None and params["SPLIT_K"] > 1:
        grid = (_tiles(params["M"], params["N"], params["BLOCK_M"], params["BLOCK_N"]), 1)
        args = {name: params[name] for name in (*_gather_gemm_kernel.arg_names, "num_warps", "num_stages")}
        launch(_gather_gemm_kernel, grid, params["C"], **dict(args, n_sum=params["SPLIT_K"]))


def _run(params, config: GemmConfig):
    params = dict(params, **config.meta())
    if config.split_k > 1:
        _workspace(params, config.split_k)
    grid = (_tiles(params["M"], params["N"], config.block_m, config.block_n), config.split_k)
    launch(_gather_gemm_kernel, grid, params["C"], **params)
    _combine(params)


def _autotune(params, candidates) -> GemmConfig:
    """Run the GEMM once through triton.autotune over `candidates` (each split-K one timed with its combine) and
    return the config it chose; the result is in params["C"]."""
    params = dict(params)
    split = max(c.split_k for c in candidates)
    if split > 1:
        _workspace(params, split)  # the largest split's; a smaller one uses its first slices
    configs = [triton.Config({k: v for k, v in c.meta().items() if k not in ("num_warps", "num_stages")},
                             num_warps=c.num_warps, num_stages=c.num_stages) for c in candidates]
    tuner = triton.autotune(configs, key=[], post_hook=_combine, do_bench=_do_bench)(_gather_gemm_kernel)
    M, N = params["M"], params["N"]
    grid = lambda meta: (_tiles(M, N, meta["BLOCK_M"], meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
    launch(tuner, grid, params["C"], **params)
    best = tuner.best_config
    chosen = GemmConfig(best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"], best.kwargs["BLOCK_K"], best.kwargs["GROUP_M"],
                        best.num_warps, best.num_stages, best.kwargs["SPLIT_K"])
    _combine(dict(params, **chosen.meta()))  # the autotuner's own last launch is the partial one only
    return chosen


def gather_gemm(a, b, *, out=None, rows=None, cols=None, scatter_rows=False, scatter_cols=False, scale=1.0,
                bias_in=None, bias_out=None, bias_scale=1.0, u=None, v=None, out_dtype=None,
                config: Optional[GemmConfig] = None):
    """C = scale·A[rows]·B[:, cols] (+ u[rows] vᵀ[cols]); optionally bias_out = bias_scale·A[rows]·bias_in.

    a: (Ma, K), b: (K, Nb), any strides (transposes are free). `rows`/`cols` are int32 index lists
    (None: all). With scatter_rows/cols the output has a's rows / b's columns and only the listed
    ones are written; otherwise it is compact (len(rows) × len(cols)). `out`, when given, is used as C
    (its other elements are left untouched; it must not overlap a or b). `config` forces a launch
    configuration (tests, benchmarks); by default it is autotuned per shape bucket on a GPU, else
    `choose_config`'s. Returns C.
    """
    M = a.shape[0] if rows is None else rows.numel()
    N = b.shape[1] if cols is None else cols.numel()
    K = a.shape[1]
    assert b.shape[0] == K
    if out_dtype is None:
        out_dtype = torch.result_type(a, b)
    if out is None:
        out_shape = (a.shape[0] if scatter_rows else M, b.shape[1] if scatter_cols else N)
        out = torch.empty(out_shape, dtype=out_dtype, device=a.device)
    has_bias = bias_in is not None
    if has_bias:
        assert bias_out is not None and bias_out.is_contiguous() and bias_in.numel() == K
    if M == 0:
        return out
    if N == 0:  # nothing to tile; only the bias GEMV is left (degenerate, e.g. an empty kept set)
        if has_bias:
            a_sel = a if rows is None else a[rows.long()]
            bias_out.copy_((a_sel.float() @ bias_in.float()) * bias_scale)
        return out
    for name, t in (("a", a), ("b", b), ("out", out)):  # the kernel's int32 offsets
        assert _last_offset(t) < 2 ** 31, f"gather_gemm: {name} of shape {tuple(t.shape)} is too large for int32 offsets"
    compute = torch.float32 if upcast_needed(a.dtype, b.dtype) else torch.promote_types(a.dtype, b.dtype)
    flags = dict(GATHER_M=rows is not None, SCATTER_M=bool(scatter_rows and rows is not None),
                 GATHER_N=cols is not None, SCATTER_N=bool(scatter_cols and cols is not None),
                 HAS_BIAS=has_bias, HAS_RANK1=u is not None)
    params = dict(A=a, B=b, C=out, IDX_M=rows if rows is not None else a, IDX_N=cols if cols is not None else a,
                  BIAS_IN=bias_in if has_bias else a, BIAS_OUT=bias_out if has_bias else a,
                  U=u if u is not None else a, V=v if v is not None else a, WS=a, BWS=a,
                  M=M, N=N, K=K, s_am=a.stride(0), s_ak=a.stride(1), s_bk=b.stride(0), s_bn=b.stride(1),
                  s_cm=out.stride(0), s_cn=out.stride(1), scale=float(scale), bias_scale=float(bias_scale), n_sum=0,
                  COMPUTE=TL_DTYPE[compute], PRECISION=dot_precision(compute), **flags)
    if config is None and AUTOTUNE:
        bucket = tuple(triton.next_power_of_2(x) for x in (M, N, K))
        key = (a.device, bucket, a.dtype, b.dtype, out.dtype, a.stride(1) == 1, b.stride(1) == 1, *flags.values())
        config = _tuned.get(key)  # a CUDA graph captured after warm-up steps replays the tuned choice
        if config is None and not (a.is_cuda and torch.cuda.is_current_stream_capturing()):  # timing syncs
            _tuned[key] = _autotune(params, _candidates(M, N, K, compute.itemsize, sm_count(a.device)))
            return out
    if config is None:
        config = choose_config(M, N, K, compute.itemsize, sm_count(a.device))
    _run(params, config)
    return out


def _last_offset(t: torch.Tensor) -> int:
    """The element offset of a 2-D tensor's last element from its first (0 when empty)."""
    if t.numel() == 0:
        return 0
    return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


def _supported(*tensors):
    return all(t is None or t.dtype in TL_DTYPE for t in tensors)


def fold_into(Q, W, L, bias=None, rows=None, cols=None, scale=1.0, out=None, bias_out=None):
    """The fold with index lists instead of masks and optional preallocated outputs (W_eff, b_eff)."""
    dtype = torch.result_type(W, Q) if Q is not None else W.dtype
    if L is not None:
        dtype = torch.promote_types(dtype, L.dtype)
    m, k = W.shape
    m_out = m if rows is None else rows.numel()
    k_out = k if cols is None else cols.numel()
    b_eff = None
    if bias is not None and Q is not None:
        b_dtype = torch.promote_types(Q.dtype, bias.dtype)
        b_eff = bias_out if bias_out is not None else torch.empty(m_out, dtype=b_dtype, device=W.device)
    if out is None:
        out = torch.empty(m_out, k_out, dtype=dtype, device=W.device)
    bias_kw = dict(bias_in=bias, bias_out=b_eff, bias_scale=scale) if b_eff is not None else {}
    if Q is None:  # L is not None here: one GEMM, both gathers
        gather_gemm(W, L, out=out, rows=rows, cols=cols, scale=scale)
    elif L is None:
        gather_gemm(Q, W, out=out, rows=rows, cols=cols, scale=scale, **bias_kw)
    elif m_out * m * k + m_out * k * k_out <= m * k * k_out + m_out * m * k_out:  # (Q·W)·L is cheaper
        t = gather_gemm(Q, W, rows=rows, out_dtype=torch.result_type(Q, W), **bias_kw)
        gather_gemm(t, L, out=out, cols=cols, scale=scale)
    else:  # Q·(W·L)
        t = gather_gemm(W, L, cols=cols, out_dtype=torch.result_type(W, L))
        gather_gemm(Q, t, out=out, rows=rows, scale=scale, **bias_kw)
    if bias is not None and Q is None:
        b_eff = bias if rows is None else bias[rows.long()]
        if scale != 1.0:
            b_eff = b_eff * scale
    return out, b_eff


# The differentiable fold (RepVGG-style training through the fold) as torch.library custom ops, so
# torch.compile(fullgraph=True) traces it: the backward scatters the student-sized gradient into the teacher-sized
# dW_eff and runs compacted_linear's chain, which then touches only the kept rows of Q and columns of L.


def _rows_cols(keep_out, keep_in, device):
    rows = None if keep_out is None else kept_indices(keep_out).to(device)
    cols = None if keep_in is None else kept_indices(keep_in).to(device)
    return rows, cols


@torch.library.custom_op("wid_triton::fold", mutates_args=())
def _forward(Q: Optional[torch.Tensor], W: torch.Tensor, L: Optional[torch.Tensor], bias: Optional[torch.Tensor],
             keep_out: Optional[torch.Tensor], keep_in: Optional[torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_eff, b_eff); b_eff is empty without a bias."""
    rows, cols = _rows_cols(keep_out, keep_in, W.device)
    W_eff, b_eff = fold_into(Q, W, L, bias, rows, cols, scale)
    if b_eff is None:
        return W_eff, W.new_empty(0)
    return W_eff, b_eff.clone() if b_eff is bias or b_eff._base is bias else b_eff


@_forward.register_fake
def _forward_fake(Q, W, L, bias, keep_out, keep_in, scale):
    m, k = W.shape
    rows = m if keep_out is None else torch.library.get_ctx().new_dynamic_size()
    cols = k if keep_in is None else torch.library.get_ctx().new_dynamic_size()
    dtype = W.dtype
    for t in (Q, L):
        dtype = dtype if t is None else torch.promote_types(dtype, t.dtype)
    b_dtype = None if bias is None else (bias.dtype if Q is None else torch.promote_types(Q.dtype, bias.dtype))
    return W.new_empty((rows, cols), dtype=dtype), (W.new_empty(0) if bias is None else W.new_empty(rows, dtype=b_dtype))


@torch.library.custom_op("wid_triton::fold_backward", mutates_args=())
def _backward(gW: torch.Tensor, gb: torch.Tensor, Q: Optional[torch.Tensor], W: torch.Tensor, L: Optional[torch.Tensor],
              bias: Optional[torch.Tensor], keep_out: Optional[torch.Tensor], keep_in: Optional[torch.Tensor], scale: float,
              need: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dW, dL, db), empty where not needed or absent."""
    from .compacted_linear import compactor_grads

    rows, cols = _rows_cols(keep_out, keep_in, W.device)
    m, k = W.shape
    if rows is None and cols is None:
        gW_full = gW * scale
    else:
        gW_full = torch.zeros(m, k, dtype=gW.dtype, device=W.device)
        r = torch.arange(m, device=W.device) if rows is None else rows.long()
        c = torch.arange(k, device=W.device) if cols is None else cols.long()
        gW_full[r[:, None], c[None, :]] = gW * scale
    gb_full = None
    if bias is not None:
        gb_full = torch.zeros(m, dtype=bias.dtype, device=W.device)
        if gb.numel():
            if rows is None:
                gb_full = gb * scale
            else:
                gb_full[rows.long()] = gb * scale
    grads = compactor_grads(gW_full, gb_full, Q, W, L, bias, rows, cols, need)
    return tuple(t if t is not None else W.new_empty(0) for t in grads)


@_backward.register_fake
def _backward_fake(gW, gb, Q, W, L, bias, keep_out, keep_in, scale, need):
    return tuple(torch.empty_like(t) if wanted and t is not None else W.new_empty(0) for t, wanted in zip((Q, W, L, bias), need))


def _setup_context(ctx, inputs, output):
    Q, W, L, bias, keep_out, keep_in, scale = inputs
    ctx.save_for_backward(Q, W, L, bias, keep_out, keep_in)
    ctx.scale = scale


def _autograd_backward(ctx, gW, gb):
    Q, W, L, bias, keep_out, keep_in = ctx.saved_tensors
    need = [bool(n) for n in ctx.needs_input_grad[:4]]
    if gW is None:
        gW = W.new_zeros(0 if keep_out is None else kept_indices(keep_out).numel(),
                         0 if keep_in is None else kept_indices(keep_in).numel())  # cached: no host sync
    gb = W.new_empty(0) if gb is None else gb
    grads = _backward(gW, gb, Q, W, L, bias, keep_out, keep_in, ctx.scale, need)
    return (*(g if wanted else None for g, wanted in zip(grads, need)), None, None, None)


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def fold(Q, W, L, bias=None, keep_out=None, keep_in=None, scale=None):
    """Same contract as `reference.fold` (differentiable too); with no compactor (pure selection) or
    fp64 it defers to the reference."""
    if (Q is None and L is None) or not _supported(Q, W, L, bias) or torch.is_tensor(scale) or not runs_here(Q, W, L, bias):
        return reference.fold(Q, W, L, bias, keep_out, keep_in, scale)
    scale = 1.0 if scale is None else float(scale)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (Q, W, L, bias)):
        W_eff, b_eff = _forward(Q, W, L, bias, keep_out, keep_in, scale)
        return W_eff, (b_eff if bias is not None else None)
    return fold_into(Q, W, L, bias, *_rows_cols(keep_out, keep_in, W.device), scale)
