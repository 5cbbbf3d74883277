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
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import kept_indices
from .fold import _supported, fold_into, gather_gemm
from ... import reference

__all__ = ["compacted_linear", "CompactedLinearFunction", "compactor_grads"]


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


class CompactedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, Q, W, L, bias, keep_out, keep_in):
        W_eff, b_eff = fold_into(Q, W, L, bias) if (Q is not None or L is not None) else (W, bias)
        y = F.linear(x, W_eff, b_eff)
        ctx.save_for_backward(x, Q, W, L, bias, W_eff)
        # index lists are taken now (cached per mask version), not from saved tensors in backward
        ctx.rows = None if (keep_out is None or Q is None) else kept_indices(keep_out).to(W.device)
        ctx.cols = None if (keep_in is None or L is None) else kept_indices(keep_in).to(W.device)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, Q, W, L, bias, W_eff = ctx.saved_tensors
        need_x, need_q, need_w, need_l, need_b = ctx.needs_input_grad[:5]
        m, k = W.shape
        # under autocast y (hence dy) may be in a lower precision than the weights: compute in W_eff's dtype
        dy2 = dy.reshape(-1, m).to(W_eff.dtype)
        dx = (dy2 @ W_eff).reshape(x.shape).to(x.dtype) if need_x else None
        dQ = dW = dL = db = None
        if need_q or need_w or need_l or need_b:
            x2 = x.reshape(-1, k).to(W_eff.dtype)
            dW_eff = dy2.t() @ x2
            db_eff = dy2.sum(0) if bias is not None else None
            dQ, dW, dL, db = compactor_grads(dW_eff, db_eff, Q, W, L, bias, ctx.rows, ctx.cols,
                                             (need_q, need_w, need_l, need_b))
        return dx, dQ, dW, dL, db, None, None


def compacted_linear(x, Q, W, L, bias=None, keep_out=None, keep_in=None):
    """Same contract as `reference.compacted_linear`; dQ rows / dL columns outside the kept sets are zero."""
    if not _supported(x, Q, W, L, bias):
        return reference.compacted_linear(x, Q, W, L, bias, keep_out, keep_in)
    return CompactedLinearFunction.apply(x, Q, W, L, bias, keep_out, keep_in)
