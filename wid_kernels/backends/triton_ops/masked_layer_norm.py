"""Fused residual add + masked LayerNorm (WID_METHOD §6), forward and backward in Triton.

Forward, one pass per row tile: h = x + residual in fp32, mean and biased variance over the kept
channels only (count clamped to 1 so an empty keep-set gives mean 0, var 0 as in the reference),
y = (h − mean)·rstd·γ + β on every channel. mean/rstd are saved (fp32, one pair per row) so the
backward never recomputes the statistics.

Backward, with g = dy·γ, x̂ = (h − mean)·rstd, k the keep mask and c the kept count:
    dh = rstd·(g − k·(Σ g + x̂·Σ g·x̂)/c)        (the sums run over ALL channels: pruned
                                                  outputs depend on mean and rstd too)
dx = dresidual = dh. dγ, dβ are summed per program into an fp32 buffer of partial rows and reduced
by one torch sum, so no atomics are needed.

x and residual may differ in dtype (under autocast: a bf16 sublayer output added to the fp32 residual stream):
the add happens in fp32 in the kernel, so x is never cast in a pass of its own; y takes the promoted dtype, and
the backward writes dx in x's dtype and, only then, a second copy of dh in the residual's. With equal dtypes
the residual's gradient is dx itself (no copy, no clone).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, SUM, kept_indices, launch, runs_here
from ... import reference

__all__ = ["masked_layer_norm", "masked_layer_norm_forward", "masked_layer_norm_backward"]


@triton.jit
def _mln_forward_kernel(X, R, GAMMA, BETA, KEEP, Y, MEAN, RSTD, n_rows, n_cols, count, eps,
                        HAS_RESIDUAL: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                        HAS_KEEP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    ok = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    h = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(R + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_KEEP:
        k = (tl.load(KEEP + cols, mask=col_ok, other=0) != 0).to(tl.float32)
    else:
        k = col_ok.to(tl.float32)
    mean = tl.reduce(h * k[None, :], 1, SUM) / count
    centered = h - mean[:, None]
    var = tl.reduce(centered * centered * k[None, :], 1, SUM) / count
    rstd = 1.0 / tl.sqrt(var + eps)
    y = centered * rstd[:, None]
    if HAS_GAMMA:
        y = y * tl.load(GAMMA + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BETA:
        y = y + tl.load(BETA + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=ok)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _mln_backward_kernel(DY, X, R, GAMMA, KEEP, MEAN, RSTD, DH, DH2, DGAMMA_PART, DBETA_PART, n_rows, n_cols, count,
                         HAS_RESIDUAL: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_KEEP: tl.constexpr,
                         NEED_DH: tl.constexpr, STORE_DH2: tl.constexpr, NEED_DGAMMA: tl.constexpr,
                         NEED_DBETA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Persistent: program p handles row tiles p, p + P, p + 2P, ... and keeps its dγ/dβ partials in registers.
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    if HAS_KEEP:
        k = (tl.load(KEEP + cols, mask=col_ok, other=0) != 0).to(tl.float32)
    else:
        k = col_ok.to(tl.float32)
    if HAS_GAMMA:
        gamma = tl.load(GAMMA + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        gamma = col_ok.to(tl.float32)
    dgamma = tl.full([BLOCK_N], 0.0, tl.float32)
    dbeta = tl.full([BLOCK_N], 0.0, tl.float32)
    n_tiles = (n_rows + BLOCK_M - 1) // BLOCK_M
    for tile in range(pid, n_tiles, n_prog):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        ok = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
        h = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            h += tl.load(R + offs, mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = (h - mean[:, None]) * rstd[:, None]
        xhat = tl.where(ok, xhat, 0.0)
        if NEED_DH:
            g = dy * gamma[None, :]
            sum_g = tl.reduce(g, 1, SUM)
            sum_gx = tl.reduce(g * xhat, 1, SUM)
            dh = rstd[:, None] * (g - k[None, :] * (sum_g[:, None] + xhat * sum_gx[:, None]) / count)
            tl.store(DH + offs, dh.to(DH.dtype.element_ty), mask=ok)
            if STORE_DH2:  # the same gradient in a second dtype (x and the residual differ)
                tl.store(DH2 + offs, dh.to(DH2.dtype.element_ty), mask=ok)
        if NEED_DGAMMA:
            dgamma += tl.reduce(dy * xhat, 0, SUM)
        if NEED_DBETA:
            dbeta += tl.reduce(dy, 0, SUM)
    if NEED_DGAMMA:
        tl.store(DGAMMA_PART + pid * n_cols + cols, dgamma, mask=col_ok)
    if NEED_DBETA:
        tl.store(DBETA_PART + pid * n_cols + cols, dbeta, mask=col_ok)


def _blocks(n_cols):
    block_n = triton.next_power_of_2(max(n_cols, 1))
    # ~4k elements per tile on a GPU; the interpreter is vectorised by numpy, so bigger tiles are cheaper there.
    budget = 65536 if INTERPRET else 4096
    block_m = max(1, min(64, budget // block_n))
    num_warps = 4 if block_n * block_m <= 4096 else 8
    return block_m, block_n, num_warps


def _keep_arg(keep, n_cols, like):
    """Bool mask as uint8 (zero-copy view) plus the fp32 kept count, clamped to 1 like the reference."""
    if keep is None:
        return like, float(max(n_cols, 1)), False
    # the count is a host scalar for the kernels; kept_indices caches it per mask (by identity and
    # version), so it must see the caller's tensor object, not a reshaped view
    count = float(max(kept_indices(keep).numel(), 1))
    keep = keep.reshape(-1)
    if keep.dtype != torch.bool:
        keep = keep != 0
    return keep.contiguous().view(torch.uint8), count, True


def masked_layer_norm_forward(x, residual, gamma, beta, keep, eps, out=None):
    """Launch the forward kernel; returns y (shape of x, dtype of x + residual), mean, rstd (fp32, per row).

    `out`, when given, is the preallocated y (any contents; every element is written).
    """
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols).contiguous()
    n_rows = x2.shape[0]
    r2 = residual.reshape(-1, n_cols).contiguous() if residual is not None else x2
    out_dtype = x.dtype if residual is None else torch.result_type(x, residual)
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    assert out.is_contiguous() and out.shape == x.shape
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    keep_arg, count, has_keep = _keep_arg(keep, n_cols, x2)
    if n_rows == 0 or n_cols == 0:
        return out, mean, rstd
    block_m, block_n, num_warps = _blocks(n_cols)
    grid = (triton.cdiv(n_rows, block_m),)
    launch(_mln_forward_kernel, grid, out,
        x2, r2, gamma if gamma is not None else x2, beta if beta is not None else x2, keep_arg, out, mean, rstd,
        n_rows, n_cols, count, float(eps),
        HAS_RESIDUAL=residual is not None, HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None,
        HAS_KEEP=has_keep, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return out, mean, rstd


def _num_programs(n_tiles, device):
    if INTERPRET or device.type != "cuda":
        return max(1, min(n_tiles, 2))
    return max(1, min(n_tiles, 4 * torch.cuda.get_device_properties(device).multi_processor_count))


def masked_layer_norm_backward(dy, x, residual, gamma, keep, mean, rstd, need_dh=True, need_dgamma=True,
                               need_dbeta=True, dh_dtype=None, dh2_dtype=None):
    """Launch the backward kernel; returns dh (grad of x and of residual, in `dh_dtype`, default x's), the same in
    `dh2_dtype` (None unless asked), dγ, dβ (None where not needed)."""
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols).contiguous()
    n_rows = x2.shape[0]
    dy2 = dy.reshape(-1, n_cols).contiguous()
    r2 = residual.reshape(-1, n_cols).contiguous() if residual is not None else x2
    keep_arg, count, has_keep = _keep_arg(keep, n_cols, x2)
    block_m, block_n, num_warps = _blocks(n_cols)
    n_prog = _num_programs(triton.cdiv(max(n_rows, 1), block_m), x.device)
    dh = torch.empty(x.shape, dtype=dh_dtype or x.dtype, device=x.device) if need_dh else None
    dh2 = torch.empty(x.shape, dtype=dh2_dtype, device=x.device) if need_dh and dh2_dtype is not None else None
    dgamma_part = torch.empty(n_prog, n_cols, dtype=torch.float32, device=x.device) if need_dgamma else None
    dbeta_part = torch.empty(n_prog, n_cols, dtype=torch.float32, device=x.device) if need_dbeta else None
    if n_cols > 0:
        launch(_mln_backward_kernel, (n_prog,), x2,
            dy2, x2, r2, gamma if gamma is not None else x2, keep_arg, mean, rstd,
            dh if need_dh else x2, dh2 if dh2 is not None else x2, dgamma_part if need_dgamma else x2,
            dbeta_part if need_dbeta else x2, n_rows, n_cols, count,
            HAS_RESIDUAL=residual is not None, HAS_GAMMA=gamma is not None, HAS_KEEP=has_keep,
            NEED_DH=need_dh, STORE_DH2=dh2 is not None, NEED_DGAMMA=need_dgamma, NEED_DBETA=need_dbeta,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )
    dgamma = dgamma_part.sum(0).to(gamma.dtype) if need_dgamma else None
    dbeta = dbeta_part.sum(0) if need_dbeta else None
    return dh, dh2, dgamma, dbeta


# torch.library custom ops (schema, fake implementation, autograd), so torch.compile(fullgraph=True) traces them.


@torch.library.custom_op("wid_triton::masked_layer_norm", mutates_args=())
def _forward(x: torch.Tensor, residual: Optional[torch.Tensor], gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor],
             keep: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd): the per-row statistics are kept for the backward."""
    return masked_layer_norm_forward(x, residual, gamma, beta, keep, eps)


@_forward.register_fake
def _forward_fake(x, residual, gamma, beta, keep, eps):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    dtype = x.dtype if residual is None else torch.result_type(x, residual)
    stats = x.new_empty(rows, dtype=torch.float32)
    return x.new_empty(x.shape, dtype=dtype), stats, torch.empty_like(stats)


def _gradient_dtypes(x, residual, need):
    """(dtype of the kernel's dh, dtype of its second copy or None): dh serves dx when x needs it, else the residual;
    the copy exists only when both need it in different dtypes. With equal dtypes the residual's gradient is dx."""
    need_x, need_r = need[0], need[1] and residual is not None
    primary = x.dtype if need_x or not need_r else residual.dtype
    second = residual.dtype if need_x and need_r and residual.dtype != x.dtype else None
    return primary, second


@torch.library.custom_op("wid_triton::masked_layer_norm_backward", mutates_args=())
def _backward(dy: torch.Tensor, x: torch.Tensor, residual: Optional[torch.Tensor], gamma: Optional[torch.Tensor],
              keep: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, need: list[bool],
              beta_dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dresidual, dγ, dβ), empty where not needed or absent; dresidual also empty where it equals dx (the
    outputs of a custom op must not alias: `_autograd_backward` hands dx to both)."""
    need_x, need_r, need_g, need_b = need
    primary, second = _gradient_dtypes(x, residual, need)
    dh, dh2, dgamma, dbeta = masked_layer_norm_backward(
        dy, x, residual, gamma, keep, mean, rstd, need_dh=need_x or need_r, need_dgamma=need_g and gamma is not None,
        need_dbeta=need_b and beta_dtype is not None, dh_dtype=primary, dh2_dtype=second)
    dx = dh if need_x else None
    dr = (dh2 if need_x else dh) if need_r and residual is not None else None
    if dbeta is not None:
        dbeta = dbeta.to(beta_dtype)
    return tuple(t if t is not None else dy.new_empty(0) for t in (dx, dr, dgamma, dbeta))


@_backward.register_fake
def _backward_fake(dy, x, residual, gamma, keep, mean, rstd, need, beta_dtype):
    need_x, need_r, need_g, need_b = need
    empty = dy.new_empty(0)
    _, second = _gradient_dtypes(x, residual, need)
    own_dr = need_r and residual is not None and (not need_x or second is not None)
    return (torch.empty_like(x) if need_x else empty, torch.empty_like(residual) if own_dr else empty,
            torch.empty_like(gamma) if need_g and gamma is not None else empty,
            x.new_empty(x.shape[-1], dtype=beta_dtype) if need_b and beta_dtype is not None else empty)


def _setup_context(ctx, inputs, output):
    x, residual, gamma, beta, keep, eps = inputs
    ctx.save_for_backward(x, residual, gamma, keep, output[1], output[2])
    ctx.beta_dtype = None if beta is None else beta.dtype


def _autograd_backward(ctx, dy, _mean, _rstd):
    x, residual, gamma, keep, mean, rstd = ctx.saved_tensors
    need = [bool(n) for n in ctx.needs_input_grad[:4]]
    dx, dr, dgamma, dbeta = _backward(dy, x, residual, gamma, keep, mean, rstd, need, ctx.beta_dtype)
    if need[0] and need[1] and _gradient_dtypes(x, residual, need)[1] is None:
        dr = dx  # equal dtypes: the residual's gradient is dx itself
    return (*(g if wanted else None for g, wanted in zip((dx, dr, dgamma, dbeta), need)), None, None)


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def masked_layer_norm(x, residual, gamma, beta, keep, eps):
    """LayerNorm(x + residual) with statistics over the kept channels; same signature as the reference.

    fp64 (not a training dtype; the kernels compute in fp32) and tensors the kernels cannot read (CPU tensors when
    compiled) go to the reference.
    """
    fp64 = any(t is not None and t.dtype == torch.float64 for t in (x, residual, gamma, beta))
    if fp64 or not runs_here(x, residual, gamma, beta, keep):
        return reference.masked_layer_norm(x, residual, gamma, beta, keep, eps)
    return _forward(x, residual, gamma, beta, keep, eps)[0]
