"""Fold the compactors into the weight, or apply them to the activations: one cost model for every backend.

`compacted_linear` computes y = x·(Q·W·L)ᵀ + Q·b. Folding a compactor costs a weight-sized GEMM once per call;
applying it costs a token-sized one. For N tokens and W of m×k:
    folding Q (m×m) costs m·m·k multiply-adds, applying it N·m·m: fold iff N > k;
    folding L (k×k) costs m·k·k, applying it N·k·k: fold iff N > m.
A training step's tokens (thousands) fold every linear of the encoder; the MLM decoder at the masked positions
only (m = vocabulary ≈ 30k, N ≈ 2.4k for 128×128 tokens) applies its L to the activations, about 12× less work.
"""
from __future__ import annotations


def should_fold(tokens: int, compactor_size: int, other_size: int) -> bool:
    """Fold a compactor of size s into an s×o weight iff that costs less than applying it to `tokens` tokens."""
    return tokens > other_size


def fold_plan(tokens: int, m: int, k: int, has_q: bool, has_l: bool) -> tuple[bool, bool]:
    """(fold Q, fold L) for a linear of m outputs and k inputs over `tokens` tokens."""
    return has_q and should_fold(tokens, m, k), has_l and should_fold(tokens, k, m)


def folds_every_compactor(tokens: int, m: int, k: int, has_q: bool, has_l: bool) -> bool:
    """True when the plan folds each compactor that exists (the fused fold-first kernels' case)."""
    fold_q, fold_l = fold_plan(tokens, m, k, has_q, has_l)
    return fold_q == has_q and fold_l == has_l
