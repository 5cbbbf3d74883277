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
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, SUM, TL_DTYPE, dot_precision, kept_indices, launch, upcast_needed
from ... import reference

__all__ = ["fold", "gather_gemm"]


@triton.jit
def _gather_gemm_kernel(A, B, C, IDX_M, IDX_N, BIAS_IN, BIAS_OUT, U, V,
                        M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn, scale, bias_scale,
                        GATHER_M: tl.constexpr, SCATTER_M: tl.constexpr, GATHER_N: tl.constexpr,
                        SCATTER_N: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RANK1: tl.constexpr,
                        COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
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
        a_rows = tl.load(IDX_M + rm, mask=m_ok, other=0).to(tl.int64)
    else:
        a_rows = rm.to(tl.int64)
    if GATHER_N:
        b_cols = tl.load(IDX_N + rn, mask=n_ok, other=0).to(tl.int64)
    else:
        b_cols = rn.to(tl.int64)

    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    bacc = tl.full([BLOCK_M], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
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

    acc = acc * scale
    if HAS_RANK1:
        u = tl.load(U + a_rows, mask=m_ok, other=0.0).to(tl.float32)
        v = tl.load(V + b_cols, mask=n_ok, other=0.0).to(tl.float32)
        acc += u[:, None] * v[None, :]
    if SCATTER_M:
        c_rows = a_rows
    else:
        c_rows = rm.to(tl.int64)
    if SCATTER_N:
        c_cols = b_cols
    else:
        c_cols = rn.to(tl.int64)
    tl.store(C + c_rows[:, None] * s_cm + c_cols[None, :] * s_cn, acc.to(C.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])
    if HAS_BIAS:
        tl.store(BIAS_OUT + c_rows, (bacc * bias_scale).to(BIAS_OUT.dtype.element_ty), mask=m_ok & (pid_n == 0))


def _config(M, N):
    if INTERPRET:  # few, big programs: the interpreter's cost is per program and per K step
        return 64, 64, 64, 1, 4, 1
    if M >= 512 and N >= 512:
        return 128, 128, 32, 8, 8, 3
    return 64, 64, 32, 8, 4, 3


def gather_gemm(a, b, *, out=None, rows=None, cols=None, scatter_rows=False, scatter_cols=False, scale=1.0,
                bias_in=None, bias_out=None, bias_scale=1.0, u=None, v=None, out_dtype=None):
    """C = scale·A[rows]·B[:, cols] (+ u[rows] vᵀ[cols]); optionally bias_out = bias_scale·A[rows]·bias_in.

    a: (Ma, K), b: (K, Nb), any strides (transposes are free). `rows`/`cols` are int32 index lists
    (None: all). With scatter_rows/cols the output has a's rows / b's columns and only the listed
    ones are written; otherwise it is compact (len(rows) × len(cols)). `out`, when given, is used as C
    (its other elements are left untouched). Returns C.
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
    compute = torch.float32 if upcast_needed(a.dtype, b.dtype) else torch.promote_types(a.dtype, b.dtype)
    bm, bn, bk, group_m, warps, stages = _config(M, N)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    launch(_gather_gemm_kernel, grid, out,
        a, b, out, rows if rows is not None else a, cols if cols is not None else a,
        bias_in if has_bias else a, bias_out if has_bias else a,
        u if u is not None else a, v if v is not None else a,
        M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        float(scale), float(bias_scale),
        GATHER_M=rows is not None, SCATTER_M=bool(scatter_rows and rows is not None),
        GATHER_N=cols is not None, SCATTER_N=bool(scatter_cols and cols is not None),
        HAS_BIAS=has_bias, HAS_RANK1=u is not None,
        COMPUTE=TL_DTYPE[compute], PRECISION=dot_precision(compute),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, num_warps=warps, num_stages=stages,
    )
    return out


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
    if (Q is None and L is None) or not _supported(Q, W, L, bias) or torch.is_tensor(scale):
        return reference.fold(Q, W, L, bias, keep_out, keep_in, scale)
    scale = 1.0 if scale is None else float(scale)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (Q, W, L, bias)):
        W_eff, b_eff = _forward(Q, W, L, bias, keep_out, keep_in, scale)
        return W_eff, (b_eff if bias is not None else None)
    return fold_into(Q, W, L, bias, *_rows_cols(keep_out, keep_in, W.device), scale)
