"""The `torch` backend: fold-first with plain torch matmuls (DESIGN.md "Ops").

The algorithmic win without custom kernels: instead of three GEMMs on the activations, fold the
compactors into the weight and run one GEMM. Autograd of the fold gives the backward chain
dQ = dW_eff·(W L)ᵀ, dW = Qᵀ·dW_eff·Lᵀ, dL = (Q W)ᵀ·dW_eff. A compactor is folded only when that
is cheaper than applying it to the activations (wid_kernels.cost_model), so tiny batches stay cheap.
"""
from __future__ import annotations

import torch.nn.functional as F

from ..cost_model import fold_plan, should_fold  # noqa: F401 - should_fold is part of this backend's surface


def compacted_linear(x, Q, W, L, bias=None, keep_out=None, keep_in=None):
    m, k = W.shape
    tokens = x.numel() // max(x.shape[-1], 1)
    fold_q, fold_l = fold_plan(tokens, m, k, Q is not None, L is not None)
    weight, b = W, bias
    if fold_q:
        weight = Q @ weight
        b = None if b is None else Q @ b
    if fold_l:
        weight = weight @ L
    h = x if (L is None or fold_l) else F.linear(x, L)
    h = F.linear(h, weight, b)
    return h if (Q is None or fold_q) else F.linear(h, Q)
