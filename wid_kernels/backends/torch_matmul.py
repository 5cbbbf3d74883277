"""The `torch` backend: fold-first with plain torch matmuls (DESIGN.md "Ops").

The algorithmic win without custom kernels: instead of three GEMMs on the activations, fold the
compactors into the weight and run one GEMM. Autograd of the fold gives the backward chain
dQ = dW_eff·(W L)ᵀ, dW = Qᵀ·dW_eff·Lᵀ, dL = (Q W)ᵀ·dW_eff. A compactor is folded only when that
is cheaper than applying it to the activations (cost model below), so tiny batches stay cheap.
"""
from __future__ import annotations

import torch.nn.functional as F


def should_fold(tokens: int, compactor_size: int, other_size: int) -> bool:
    """Fold a compactor of size s into an s×o weight iff that costs less than applying it to N tokens.

    Folding Q (m×m) into W (m×k) costs m·m·k multiply-adds; applying it costs N·m·m: fold iff N > k.
    Folding L (k×k) costs m·k·k; applying it costs N·k·k: fold iff N > m.
    """
    return tokens > other_size


def compacted_linear(x, Q, W, L, bias=None, keep_out=None, keep_in=None):
    m, k = W.shape
    tokens = x.numel() // max(x.shape[-1], 1)
    fold_q = Q is not None and should_fold(tokens, m, k)
    fold_l = L is not None and should_fold(tokens, k, m)
    weight, b = W, bias
    if fold_q:
        weight = Q @ weight
        b = None if b is None else Q @ b
    if fold_l:
        weight = weight @ L
    h = x if (L is None or fold_l) else F.linear(x, L)
    h = F.linear(h, weight, b)
    return h if (Q is None or fold_q) else F.linear(h, Q)
