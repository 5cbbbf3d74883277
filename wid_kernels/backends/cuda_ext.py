"""The `cuda` backend: the compiled extension `wid_kernels._C` (csrc/), ops under `torch.ops.wid_kernels`.

Its C++ CPU kernels run (and are tested) everywhere; its CUDA kernels exist when the extension was
built with CUDA (`wid_kernels._C.cuda_built`). Importing raises ImportError with the reason when the
extension is missing or broken, so the dispatcher reports the backend unavailable and falls back.
Ops not defined here (compacted_linear, fold) fall back to the reference.

Tensors a kernel cannot take (an unsupported dtype or device, a CUDA tensor without CUDA kernels, mixed
optimizer dtypes, > 2-D optimizer tensors) go to the reference, so every call is correct.
"""
from __future__ import annotations

import math

import torch

try:
    from .. import _C  # noqa: F401  (loads the library, registering torch.ops.wid_kernels.*)
except Exception as exc:  # ImportError, or OSError for a .so built against another torch
    raise ImportError(
        f"the compiled extension wid_kernels._C is not available ({type(exc).__name__}: {exc}); "
        'build it with `pip install --no-build-isolation -e .`') from exc

from .. import reference

__all__ = ["masked_layer_norm", "wid_adamw_multi_tensor", "MaskedLayerNormFunction", "CUDA_BUILT", "runs_on"]

CUDA_BUILT = bool(getattr(_C, "cuda_built", False))
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_ops = torch.ops.wid_kernels


def _runs_here(device: torch.device) -> bool:
    return device.type == "cpu" or (device.type == "cuda" and CUDA_BUILT)


def runs_on(device: torch.device) -> str | None:
    """None where the extension has kernels for `device` (its C++ CPU kernels everywhere, CUDA ones if built)."""
    if _runs_here(device):
        return None
    return "the extension was built without CUDA" if device.type == "cuda" else f"no kernels for {device.type}"


# ---------------------------------------------------------------------------------------------------------------
# fake (meta) implementations: shapes and dtypes only, so torch.compile / torch.export can trace the ops


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(x):
    """The statistics' length, as the kernels count it: x.numel() / width rows, none for a zero-width x."""
    if x.dim() and x.shape[-1] == 0:
        return 0
    return math.prod(x.shape[:-1]) if x.dim() else 1


def _out_dtype(x, residual):
    """y's and dh's dtype: x's and the residual's promoted (the reference's x + residual)."""
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


@torch.library.register_fake("wid_kernels::masked_layer_norm_fwd")
def _mln_fwd_fake(x, residual, gamma, beta, keep, eps):
    rows, out = _rows(x), _out_dtype(x, residual)
    stats = _stats_dtype(out)
    return (torch.empty_like(x, dtype=out, memory_format=torch.contiguous_format), x.new_empty(rows, dtype=stats),
            x.new_empty(rows, dtype=stats))


@torch.library.register_fake("wid_kernels::masked_layer_norm_fwd_out")
def _mln_fwd_out_fake(x, residual, gamma, beta, keep, eps, y):
    rows = _rows(x)
    stats = _stats_dtype(_out_dtype(x, residual))
    return x.new_empty(rows, dtype=stats), x.new_empty(rows, dtype=stats)


@torch.library.register_fake("wid_kernels::masked_layer_norm_bwd")
def _mln_bwd_fake(dy, x, residual, gamma, keep, mean, rstd):
    out = _out_dtype(x, residual)
    stats = _stats_dtype(out)
    cols = x.shape[-1]
    return (torch.empty_like(x, dtype=out, memory_format=torch.contiguous_format), x.new_empty(cols, dtype=stats),
            x.new_empty(cols, dtype=stats))


@torch.library.register_fake("wid_kernels::wid_adamw_step")
def _adamw_fake(params, grads, exp_avgs, exp_avg_sqs, keeps, keep_axes, is_compactor, lr, beta1, beta2, eps,
                weight_decay, penalty, masks_active, authors_rule=True):
    return None


# ---------------------------------------------------------------------------------------------------------------
# masked LayerNorm


class MaskedLayerNormFunction(torch.autograd.Function):
    """Forward/backward through the compiled ops; mean/rstd (fp32, per row) are saved, not recomputed."""

    @staticmethod
    def forward(ctx, x, residual, gamma, beta, keep, eps):
        y, mean, rstd = _ops.masked_layer_norm_fwd(x, residual, gamma, beta, keep, float(eps))
        ctx.save_for_backward(x, residual, gamma, keep, mean, rstd)
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (x, residual, gamma, beta))
        return y

    @staticmethod
    def backward(ctx, dy):
        x, residual, gamma, keep, mean, rstd = ctx.saved_tensors
        dh, dgamma, dbeta = _ops.masked_layer_norm_bwd(dy, x, residual, gamma, keep, mean, rstd)
        x_dtype, r_dtype, g_dtype, b_dtype = ctx.dtypes
        need_x, need_r, need_g, need_b = ctx.needs_input_grad[:4]
        return (dh.to(x_dtype) if need_x else None,
                dh.to(r_dtype) if need_r else None,
                dgamma.to(g_dtype) if need_g and g_dtype is not None else None,
                dbeta.to(b_dtype) if need_b and b_dtype is not None else None,
                None, None)


def masked_layer_norm(x, residual, gamma, beta, keep, eps):
    """LayerNorm(x + residual) with statistics over the kept channels; the reference's signature.

    fp64 with a keep mask goes to the reference, which defines that case in fp32 (`h.float()`); the
    kernels would compute it in fp64 and so differ from the source of truth by fp32 rounding. x and a residual
    of the same shape may differ in dtype: a bf16/fp16 x (a sublayer's output under autocast) is added to an fp32
    residual stream inside the kernels, other pairs are cast to the promoted dtype by the op; y has the promoted
    dtype, the gradients their inputs' dtypes (the reference's x + residual).
    """
    if (any(t is not None and t.dtype not in _KERNEL_DTYPES for t in (x, residual)) or x.dim() == 0
            or (_out_dtype(x, residual) == torch.float64 and keep is not None) or not _runs_here(x.device)
            or (residual is not None and residual.shape != x.shape)
            or any(t is not None and t.device != x.device for t in (residual, gamma, beta, keep))):
        return reference.masked_layer_norm(x, residual, gamma, beta, keep, eps)
    return MaskedLayerNormFunction.apply(x, residual, gamma, beta, keep, eps)


# ---------------------------------------------------------------------------------------------------------------
# WID-AdamW


def _fusable(p, g, m, v, keep, axis):
    if p.dtype not in _KERNEL_DTYPES or not _runs_here(p.device) or p.dim() > 2:
        return False
    if any(t.dtype != p.dtype or t.device != p.device or t.shape != p.shape or not t.is_contiguous()
           for t in (p, g, m, v)):
        return False
    if keep is not None:
        expected = p.numel() if p.dim() <= 1 else p.shape[axis]
        if keep.device != p.device or keep.dim() != 1 or keep.numel() != expected or axis not in (0, 1):
            return False
    return True


def wid_adamw_multi_tensor(params, grads, exp_avgs, exp_avg_sqs, keeps, keep_axes, is_compactor, lr, beta1, beta2, eps,
                           weight_decay, penalty, masks_active, update_rule="authors"):
    """In-place WID-AdamW over lists of tensors: one op call per device (the CUDA kernel is multi-tensor).

    Tensors the kernels cannot take run the reference step.
    """
    authors = reference.check_update_rule(update_rule)
    groups: dict = {}
    for i in range(len(params)):
        p, g, m, v, k, axis = params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], keeps[i], int(keep_axes[i])
        if not _fusable(p, g, m, v, k, axis):
            reference.wid_adamw_step(p, g, m, v, k, axis, lr, beta1, beta2, eps, weight_decay, penalty, masks_active,
                                     is_compactor[i], update_rule)
            continue
        groups.setdefault(p.device, []).append((p, g, m, v, k, axis, bool(is_compactor[i])))
    with torch.no_grad():
        for items in groups.values():
            p, g, m, v, k, axis, comp = (list(column) for column in zip(*items))
            _ops.wid_adamw_step(p, g, m, v, k, axis, comp, float(lr), float(beta1), float(beta2), float(eps),
                                float(weight_decay), float(penalty), bool(masks_active), authors)
