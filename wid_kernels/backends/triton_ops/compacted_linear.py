"""compacted_linear y = x·(Q·W·L)ᵀ + Q·b as one autograd.Function on the Triton fold.

Forward: fold (two launches of the index-list GEMM, bias fold fused) then one big GEMM (F.linear,
cuBLAS: nothing to gain by replacing it). Only x and W_eff are kept for backward, not the two extra
activations per linear that the unfused three-GEMM path needs.

Backward: dx = dy·W_eff and dW_eff = dyᵀ·x are the two big GEMMs over the tokens (cuBLAS); then the
weight-side chain runs on the small index-list GEMM kernel:
    dQ[keep_out] = dW_eff[keep_out]·(W L)ᵀ + db_eff[keep_out]·bᵀ   (rank-1 bias term fused in the epilogue)
    dL[:, keep_in] = (Q W)ᵀ·dW_eff[:, keep_in]
    dW = (Qᵀ·dW_eff)·Lᵀ,  db = Qᵀ·db_eff                          (the GEMV rides in the first GEMM)
Rows of dQ / columns of dL that the WID update rule discards (keep False) are neither read nor
computed and are left zero, so this part of the backward shrinks as pruning proceeds.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from ._common import kept_indices, runs_here
from .fold import _supported, fold_into, gather_gemm
from .. import torch_matmul
from ...cost_model import folds_every_compactor
from ... import reference

__all__ = ["compacted_linear", "compactor_grads"]


def compactor_grads(dW_eff, db_eff, Q, W, L, bias, rows=None, cols=None, need=(True, True, True, True)):
    """The weight-side backward chain; returns dQ, dW, dL, db (None where not needed or not present).

    rows/cols: int32 kept lists of Q's rows / L's columns (None: all are computed).
    """
    need_q, need_w, need_l, need_b = need
    dQ = dW = dL = db = None
    if Q is not None and need_q:
        WL = W if L is None else gather_gemm(W, L)
        dQ = torch.zeros_like(Q) if rows is not None else torch.empty_like(Q)
        rank1 = dict(u=db_eff, v=bias) if bias is not None else {}
        gather_gemm(dW_eff, WL.t(), out=dQ, rows=rows, scatter_rows=True, **rank1)
    if L is not None and need_l:
        QW = W if Q is None else gather_gemm(Q, W)
        dL = torch.zeros_like(L) if cols is not None else torch.empty_like(L)
        gather_gemm(QW.t(), dW_eff, out=dL, cols=cols, scatter_cols=True)
    need_b = need_b and bias is not None
    if need_w:
        t = dW_eff
        if Q is not None:
            db = torch.empty_like(bias) if need_b else None
            fused = dict(bias_in=db_eff, bias_out=db) if need_b else {}
            t = gather_gemm(Q.t(), dW_eff, out_dtype=dW_eff.dtype, **fused)
        dW = t if L is None else gather_gemm(t, L.t(), out_dtype=W.dtype)
    if need_b and db is None:
        db = db_eff if Q is None else (Q.t().float() @ db_eff.float()).to(bias.dtype)
    return dQ, dW, dL, db


# As torch.library custom ops (schema, fake implementation, autograd), so torch.compile(fullgraph=True) traces a
# model that uses them: the Triton launches stay opaque to it. Absent optional outputs are empty tensors.


@torch.library.custom_op("wid_triton::compacted_linear", mutates_args=())
def _forward(x: torch.Tensor, Q: Optional[torch.Tensor], W: torch.Tensor, L: Optional[torch.Tensor],
             bias: Optional[torch.Tensor], keep_out: Optional[torch.Tensor], keep_in: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, W_eff): W_eff is kept for the backward (empty when there is no compactor: W is used)."""
    if Q is None and L is None:
        return F.linear(x, W, bias), W.new_empty(0)
    W_eff, b_eff = fold_into(Q, W, L, bias)
    return F.linear(x, W_eff, b_eff), W_eff


@_forward.register_fake
def _forward_fake(x, Q, W, L, bias, keep_out, keep_in):
    m, k = W.shape
    y = x.new_empty((*x.shape[:-1], m))
    if Q is None and L is None:
        return y, W.new_empty(0)
    dtype = W.dtype
    for t in (Q, L):
        dtype = dtype if t is None else torch.promote_types(dtype, t.dtype)
    return y, W.new_empty((m, k), dtype=dtype)


@torch.library.custom_op("wid_triton::compacted_linear_backward", mutates_args=())
def _backward(dy: torch.Tensor, x: torch.Tensor, Q: Optional[torch.Tensor], W: torch.Tensor, L: Optional[torch.Tensor],
              bias: Optional[torch.Tensor], W_eff: torch.Tensor, keep_out: Optional[torch.Tensor], keep_in: Optional[torch.Tensor],
              need: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dQ, dW, dL, db), empty where not needed or absent."""
    need_x, need_q, need_w, need_l, need_b = need
    W_eff = W if W_eff.numel() == 0 and W.numel() else W_eff
    m, k = W.shape
    # under autocast y (hence dy) may be in a lower precision than the weights: compute in W_eff's dtype
    dy2 = dy.reshape(-1, m).to(W_eff.dtype)
    dx = (dy2 @ W_eff).reshape(x.shape).to(x.dtype) if need_x else None
    dQ = dW = dL = db = None
    if need_q or need_w or need_l or need_b:
        # index lists of the kept rows/columns: cached per mask version, so the host syncs once per mask update
        rows = None if (keep_out is None or Q is None) else kept_indices(keep_out).to(W.device)
        cols = None if (keep_in is None or L is None) else kept_indices(keep_in).to(W.device)
        x2 = x.reshape(-1, k).to(W_eff.dtype)
        dW_eff = dy2.t() @ x2
        db_eff = dy2.sum(0) if bias is not None else None
        dQ, dW, dL, db = compactor_grads(dW_eff, db_eff, Q, W, L, bias, rows, cols, (need_q, need_w, need_l, need_b))
    return tuple(t if t is not None else dy.new_empty(0) for t in (dx, dQ, dW, dL, db))


@_backward.register_fake
def _backward_fake(dy, x, Q, W, L, bias, W_eff, keep_out, keep_in, need):
    like = (x, Q, W, L, bias)
    return tuple(torch.empty_like(t) if wanted and t is not None else dy.new_empty(0) for t, wanted in zip(like, need))


def _setup_context(ctx, inputs, output):
    x, Q, W, L, bias, keep_out, keep_in = inputs
    ctx.save_for_backward(x, Q, W, L, bias, output[1], keep_out, keep_in)


def _autograd_backward(ctx, dy, _dW_eff):
    x, Q, W, L, bias, W_eff, keep_out, keep_in = ctx.saved_tensors
    need = [bool(n) for n in ctx.needs_input_grad[:5]]
    grads = _backward(dy, x, Q, W, L, bias, W_eff, keep_out, keep_in, need)
    return (*(g if wanted else None for g, wanted in zip(grads, need)), None, None)


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def compacted_linear(x, Q, W, L, bias=None, keep_out=None, keep_in=None):
    """Same contract as `reference.compacted_linear`; dQ rows / dL columns outside the kept sets are zero.

    Fold-first only where the shared cost model (wid_kernels.cost_model) folds every compactor; where applying one
    to the activations is cheaper (few tokens, e.g. the MLM decoder at the masked positions) the torch backend's
    plan runs instead."""
    if not _supported(x, Q, W, L, bias):
        return reference.compacted_linear(x, Q, W, L, bias, keep_out, keep_in)
    if not runs_here(x, Q, W, L, bias):
        return torch_matmul.compacted_linear(x, Q, W, L, bias, keep_out, keep_in)
    m, k = W.shape
    if not folds_every_compactor(x.numel() // max(k, 1), m, k, Q is not None, L is not None):
        return torch_matmul.compacted_linear(x, Q, W, L, bias, keep_out, keep_in)
    return _forward(x, Q, W, L, bias, keep_out, keep_in)[0]
