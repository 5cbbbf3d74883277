"""Fused WID ops behind one public surface, with swappable backends (DESIGN.md "Ops").

    y = compacted_linear(x, Q, W, L, bias=None, keep_out=None, keep_in=None)   # x (Q W L)ᵀ + Q b
    W_eff, b_eff = fold(Q, W, L, bias=None, keep_out=None, keep_in=None, scale=None)
    y = masked_layer_norm(x, residual, gamma, beta, keep, eps)
    wid_adamw_multi_tensor(params, grads, exp_avgs, exp_avg_sqs, keeps, keep_axes, is_compactor, lr=..., ...,
                           update_rule="authors")

Backends: `reference` (the unfused, UER-style baseline), `torch` (fold-first with torch matmuls),
and compiled/Triton backends when they are installed. Select with `set_backend(name)` or the
environment variable `WID_BACKEND`; `auto` (the default) picks the fastest available one.
An op a backend does not implement falls back to the `torch` backend's, then to the reference.
"""
from __future__ import annotations

import importlib
import os
import warnings

from . import reference

__all__ = [
    "compacted_linear",
    "fold",
    "masked_layer_norm",
    "wid_adamw_multi_tensor",
    "set_backend",
    "get_backend",
    "available_backends",
    "BACKENDS",
]

# name -> module path; order of preference for `auto` is fastest first.
BACKENDS = {
    "reference": "wid_kernels.reference",
    "torch": "wid_kernels.backends.torch_matmul",
    "triton": "wid_kernels.backends.triton_ops",
    "cuda": "wid_kernels.backends.cuda_ext",
}
# A backend module raises ImportError (with the reason) when it cannot run here, e.g. no GPU.
_AUTO_ORDER = ("cuda", "triton", "torch", "reference")

_loaded: dict = {}
_unavailable: dict = {}
_active = None


def _load(name: str):
    if name in _loaded:
        return _loaded[name]
    if name in _unavailable:
        return None
    try:
        module = importlib.import_module(BACKENDS[name])
    except Exception as exc:  # a broken optional backend must never break import
        _unavailable[name] = f"{type(exc).__name__}: {exc}".strip()
        return None
    _loaded[name] = module
    return module


def available_backends() -> dict:
    """Map every known backend name to None if usable, else the reason it is not."""
    status = {}
    for name in BACKENDS:
        module = _load(name)
        status[name] = None if module is not None else _unavailable.get(name, "not loaded")
    return status


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _resolve(name: str) -> str:
    name = (name or "auto").strip().lower()
    if name == "auto":
        for candidate in _AUTO_ORDER:
            if candidate in ("cuda", "triton") and not _has_gpu():
                # Triton on the CPU is the interpreter, and the extension's C++ CPU kernels measured slower than
                # torch's own ops (benchmarks/RESULTS.md: LayerNorm 4.8 vs 0.8 ms, optimizer 193 vs 75 ms, step 3.81 vs 3.63 s)
                continue
            if _load(candidate) is not None:
                return candidate
        return "reference"
    if name not in BACKENDS:
        raise ValueError(f"unknown WID backend '{name}'; choose one of: auto, {', '.join(BACKENDS)}")
    if _load(name) is None:
        warnings.warn(f"wid_kernels: backend '{name}' is unavailable ({_unavailable[name]}); using 'torch'", stacklevel=3)
        return "torch"
    return name


def set_backend(name: str) -> str:
    """Select the backend for every op; returns the name actually in use (after fallback)."""
    global _active
    _active = _resolve(name)
    return _active


def get_backend() -> str:
    if _active is None:
        set_backend(os.environ.get("WID_BACKEND", "auto"))
    return _active


def _op(op_name: str):
    """The active backend's op; else the fold-first `torch` backend's; else the reference."""
    for module in (_loaded.get(get_backend()), _loaded.get("torch") or _load("torch"), reference):
        fn = getattr(module, op_name, None) if module is not None else None
        if fn is not None:
            return fn
    raise AttributeError(op_name)


def compacted_linear(x, Q, W, L, bias=None, keep_out=None, keep_in=None):
    """y = x·(Q·W·L)ᵀ + Q·b, differentiable in every tensor.

    Q (m×m) or None, W (m×k), L (k×k) or None. `keep_out`/`keep_in` are optional bool masks over
    Q's rows / L's columns: a backend may leave the gradient of the other rows/columns uncomputed
    (the WID update rule discards it).
    """
    return _op("compacted_linear")(x, Q, W, L, bias, keep_out, keep_in)


def fold(Q, W, L, bias=None, keep_out=None, keep_in=None, scale=None):
    """(Q[keep_out]·W·L[:, keep_in])·scale and (Q·b)[keep_out]·scale: the structural re-parameterisation."""
    return _op("fold")(Q, W, L, bias, keep_out, keep_in, scale)


def masked_layer_norm(x, residual, gamma, beta, keep, eps):
    """LayerNorm(x + residual) with statistics over the channels where `keep` is True."""
    return _op("masked_layer_norm")(x, residual, gamma, beta, keep, eps)


def wid_adamw_multi_tensor(params, grads, exp_avgs, exp_avg_sqs, keeps, keep_axes, is_compactor, *, lr, beta1, beta2,
                           eps, weight_decay, penalty, masks_active, update_rule="authors"):
    """In-place WID-AdamW step over lists of tensors (update rule + AdamW without bias correction).

    keeps[i] is None (unmasked) or a 1-D bool mask along axis keep_axes[i] of params[i].
    `update_rule`: "authors" (the reference numerics of the authors' code) or "additive" (see
    `reference.wid_adamw_step`).
    """
    reference.check_update_rule(update_rule)
    return _op("wid_adamw_multi_tensor")(params, grads, exp_avgs, exp_avg_sqs, keeps, keep_axes, is_compactor, lr, beta1,
                                        beta2, eps, weight_decay, penalty, masks_active, update_rule)
