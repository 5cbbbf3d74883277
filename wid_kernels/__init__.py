"""Fused WID ops behind one public surface, with swappable backends (DESIGN.md "Ops").

    y = compacted_linear(x, Q, W, L, bias=None, keep_out=None, keep_in=None)   # x (Q W L)ᵀ + Q b
    W_eff, b_eff = fold(Q, W, L, bias=None, keep_out=None, keep_in=None, scale=None)
    y = masked_layer_norm(x, residual, gamma, beta, keep, eps)
    wid_adamw_multi_tensor(params, grads, exp_avgs, exp_avg_sqs, keeps, keep_axes, is_compactor, lr=..., ...,
                           update_rule="authors")

Backends: `reference` (the unfused, UER-style baseline), `torch` (fold-first with torch matmuls),
and compiled/Triton backends when they are installed. Select with `set_backend(name)` or the
environment variable `WID_BACKEND`. `auto` (the default) chooses per op, device and dtype among the
backends that run there, checks each choice once against the reference and falls back, with one
warning, when a kernel fails (selection.py); `backends_in_use(device)` says what it chose and why.
With a backend named explicitly, an op it does not implement falls back to the `torch` backend's, then
to the reference. Under autocast every backend computes what the reference computes: compacted_linear
and fold in the autocast dtype, masked_layer_norm in fp32 (as torch's own layer_norm).
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

from . import reference
from .selection import OPS, Selection

__all__ = [
    "compacted_linear",
    "fold",
    "masked_layer_norm",
    "wid_adamw_multi_tensor",
    "set_backend",
    "get_backend",
    "available_backends",
    "backends_in_use",
    "BACKENDS",
]

# name -> module path; order of preference for `auto` is fastest first.
BACKENDS = {
    "reference": "wid_kernels.reference",
    "torch": "wid_kernels.backends.torch_matmul",
    "triton": "wid_kernels.backends.triton_ops",
    "cuda": "wid_kernels.backends.cuda_ext",
}
# A backend module raises ImportError (with the reason) when it cannot run here, e.g. no GPU; it may define
# `runs_on(device)` (None, or why not) for the devices its kernels take.

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


_selection = Selection(_load)


def _resolve(name: str) -> str:
    name = (name or "auto").strip().lower()
    if name == "auto":
        return name
    if name not in BACKENDS:
        raise ValueError(f"unknown WID backend '{name}'; choose one of: auto, {', '.join(BACKENDS)}")
    if _load(name) is None:
        warnings.warn(f"wid_kernels: backend '{name}' is unavailable ({_unavailable[name]}); using 'torch'", stacklevel=3)
        return "torch"
    return name


def set_backend(name: str) -> str:
    """Select the backend for every op ("auto": per op, see selection.py); returns the name actually in use."""
    global _active
    _active = _resolve(name)
    return _active


def backends_in_use(device="cpu", dtype=torch.float32) -> dict:
    """{op: (backend, why)} for tensors of `device` and `dtype` under the current selection."""
    device = torch.device(device)
    if get_backend() == "auto":
        return _selection.table(device, dtype)
    out = {}
    for op in OPS:
        module = next(m for m in (_loaded.get(get_backend()), _load("torch"), reference)
                      if m is not None and getattr(m, op, None) is not None)
        name = "reference" if module is reference else next(n for n, m in _loaded.items() if m is module)
        out[op] = (name, f"{'chosen' if name == get_backend() else 'not in ' + get_backend()} (WID_BACKEND / set_backend)")
    return out


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


def _call(op_name: str, like, *args):
    if get_backend() == "auto":
        return _selection.call(op_name, like, *args)
    return _op(op_name)(*args)


def _autocast_dtype(t):
    """The dtype autocast would compute a matmul of `t` in, or None outside autocast."""
    device_type = t.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(tensors, dtype):
    return [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]


def _matmul_op(op_name: str, like, tensors: list, extra: tuple):
    """A matmul op under autocast runs, on every backend, on its inputs cast to the autocast dtype (as F.linear)."""
    dtype = _autocast_dtype(like)
    if dtype is None:
        return _call(op_name, like, *tensors, *extra)
    with torch.autocast(like.device.type, enabled=False):
        tensors = _cast(tensors, dtype)
        return _call(op_name, next(t for t in tensors if t is not None), *tensors, *extra)


def _check_mask(op_name: str, name: str, keep, length: int) -> None:
    """A keep mask is None or a 1-D bool tensor over `length` channels: an integer 0/1 tensor would index instead of
    mask (fold would return rows 0 and 1 over and over), and a wrong length is ignored by some backends."""
    if keep is None:
        return
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() != 1 or keep.numel() != length:
        got = (f"a {keep.dtype} tensor of shape {tuple(keep.shape)}" if isinstance(keep, torch.Tensor)
               else type(keep).__name__)
        raise ValueError(f"{op_name}: {name} must be a 1-D bool mask over {length} channels, got {got}; "
                         "pass index lists as a mask, e.g. torch.zeros(n, dtype=torch.bool).index_fill_(0, idx, True)")


def compacted_linear(x, Q, W, L, bias=None, keep_out=None, keep_in=None):
    """y = x·(Q·W·L)ᵀ + Q·b, differentiable in every tensor.

    Q (m×m) or None, W (m×k), L (k×k) or None. `keep_out`/`keep_in` are optional bool masks over
    Q's rows / L's columns: a backend may leave the gradient of the other rows/columns uncomputed
    (the WID update rule discards it).
    """
    _check_mask("compacted_linear", "keep_out", keep_out, W.shape[0])
    _check_mask("compacted_linear", "keep_in", keep_in, W.shape[1])
    return _matmul_op("compacted_linear", x, [x, Q, W, L, bias], (keep_out, keep_in))


def fold(Q, W, L, bias=None, keep_out=None, keep_in=None, scale=None):
    """(Q[keep_out]·W·L[:, keep_in])·scale and (Q·b)[keep_out]·scale: the structural re-parameterisation."""
    _check_mask("fold", "keep_out", keep_out, W.shape[0])
    _check_mask("fold", "keep_in", keep_in, W.shape[1])
    return _matmul_op("fold", W, [Q, W, L, bias], (keep_out, keep_in, scale))


_HALF = (torch.bfloat16, torch.float16)


def masked_layer_norm(x, residual, gamma, beta, keep, eps):
    """LayerNorm(x + residual) with statistics over the channels where `keep` is True.

    Under autocast it computes in fp32, as torch's layer_norm does. A half-precision x (a sublayer's output)
    with an fp32 residual (the stream) goes in as it is: x + residual is the fp32 sum either way, and a backend
    that adds inside its kernel saves the pass that casting x first would cost.
    """
    _check_mask("masked_layer_norm", "keep", keep, x.shape[-1])
    if _autocast_dtype(x) is None:
        return _call("masked_layer_norm", x, x, residual, gamma, beta, keep, eps)
    with torch.autocast(x.device.type, enabled=False):
        if residual is not None and x.dtype in _HALF and residual.dtype == torch.float32:
            gamma, beta = _cast([gamma, beta], torch.float32)
        else:
            x, residual, gamma, beta = _cast([x, residual, gamma, beta], torch.float32)
        return _call("masked_layer_norm", x, x, residual, gamma, beta, keep, eps)


def wid_adamw_multi_tensor(params, grads, exp_avgs, exp_avg_sqs, keeps, keep_axes, is_compactor, *, lr, beta1, beta2,
                           eps, weight_decay, penalty, masks_active, update_rule="authors", check_masks=True):
    """In-place WID-AdamW step over lists of tensors (update rule + AdamW without bias correction).

    keeps[i] is None (unmasked) or a 1-D bool mask along axis keep_axes[i] of params[i].
    `update_rule`: "authors" (the reference numerics of the authors' code) or "additive" (see
    `reference.wid_adamw_step`). `check_masks=False` skips the per-tensor mask checks (a caller whose masks are
    valid by construction, every step: wid.WIDAdamW).
    """
    reference.check_update_rule(update_rule)
    if not params:
        return None
    for index, (param, keep, axis) in enumerate(zip(params, keeps, keep_axes)):
        if keep is not None and check_masks:
            if not 0 <= axis < param.dim():  # the backends read the axis as given: no negative axes
                raise ValueError(f"wid_adamw_multi_tensor: keep_axes[{index}] = {axis} is not an axis (0 to "
                                 f"{param.dim() - 1}) of a {param.dim()}-D parameter")
            _check_mask("wid_adamw_multi_tensor", f"keeps[{index}]", keep, param.shape[axis])
    return _call("wid_adamw_multi_tensor", params[0], params, grads, exp_avgs, exp_avg_sqs, keeps, keep_axes, is_compactor, lr,
                 beta1, beta2, eps, weight_decay, penalty, masks_active, update_rule)
