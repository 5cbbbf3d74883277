"""Fused multi-tensor WID-AdamW step (WID_METHOD §5) in Triton: one launch per parameter group.

The step is memory-bound (BERT-base compactor state is ~4.8 GB), so the kernel makes exactly one
pass: it reads param, grad, exp_avg, exp_avg_sq (and one byte of keep-mask per element, L2-resident)
and writes param, exp_avg, exp_avg_sq. Per element, with k = keep[row] (keep_axis 0) or keep[col]
(keep_axis 1):
    masks off:  g = ∇ + p for masked compactors, else ∇
    masks on:   g = k ? ∇ : min(λ,1)·p ;  e = k ? 0 : (λ−1)·p when λ > 1 (else no injection)
    authors:    m = β1·(β1·m + (1−β1)·e) + (1−β1)·g   (the pre-step injection decays the whole tensor)
                v = β2·v + (1−β2)·g² ;  p = (p − lr·m/(√v + eps))·(1 − lr·wd)
    additive:   m = β1·m + (1−β1)·(g + e) ;  v as above ;  p = p·(1 − lr·wd) − lr·m/(√v + eps)
All arithmetic is fp32 whatever the storage dtype. `k ? ∇ : ...` is a select, not `k·∇`, so a
gradient left uncomputed (even NaN) in a pruned row cannot leak into the step; for finite
gradients it is identical to the reference's arithmetic form.

Multi-tensor: the tensors of a group are described by a small int64 table (addresses, sizes, keep
indexing), and the grid runs over fixed-size chunks of all of them; each program reads its tensor's
row of the table and turns the addresses back into typed pointers. The tables are cached while the
tensors' addresses stay the same, so a steady training loop does no host-to-device copy per step.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, TL_DTYPE, launch
from ... import reference

__all__ = ["wid_adamw_multi_tensor"]

# columns of the per-tensor table
_P, _G, _M, _V, _KEEP, _NUMEL, _DIV, _MOD, _HAS_KEEP, _ADD_PARAM = range(10)
_N_META = 10


@triton.jit
def _wid_adamw_kernel(META, CHUNKS, lr, beta1, beta2, eps, decay, pen_lo, pen_hi,
                      P_DT: tl.constexpr, G_DT: tl.constexpr, M_DT: tl.constexpr, V_DT: tl.constexpr,
                      MASKS_ACTIVE: tl.constexpr, HAS_EXTRA: tl.constexpr, AUTHORS: tl.constexpr,
                      N_META: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(CHUNKS + 2 * pid)
    chunk = tl.load(CHUNKS + 2 * pid + 1)
    row = META + t * N_META
    p_ptr = tl.load(row + 0).to(tl.pointer_type(P_DT), bitcast=True)
    g_ptr = tl.load(row + 1).to(tl.pointer_type(G_DT), bitcast=True)
    m_ptr = tl.load(row + 2).to(tl.pointer_type(M_DT), bitcast=True)
    v_ptr = tl.load(row + 3).to(tl.pointer_type(V_DT), bitcast=True)
    k_ptr = tl.load(row + 4).to(tl.pointer_type(tl.uint8), bitcast=True)
    numel = tl.load(row + 5)
    div = tl.load(row + 6)
    mod = tl.load(row + 7)
    has_keep = tl.load(row + 8)
    add_param = tl.load(row + 9)

    offs = chunk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = offs < numel
    p = tl.load(p_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    grad = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if MASKS_ACTIVE:
        kv = tl.load(k_ptr + (offs // div) % mod, mask=ok & (has_keep != 0), other=1)
        kept = kv != 0
        g = tl.where(kept, grad, pen_lo * p)
    else:
        g = tl.where(add_param != 0, grad + p, grad)
    if MASKS_ACTIVE:
        if HAS_EXTRA:
            if AUTHORS:  # only tensors under the rule get the pre-step decay
                injected = m * beta1 + (1.0 - beta1) * tl.where(kept, 0.0, pen_hi * p)
                m = tl.where(has_keep != 0, injected, m)
    m = m * beta1 + (1.0 - beta1) * g
    if MASKS_ACTIVE:
        if HAS_EXTRA:
            if not AUTHORS:
                m = m + (1.0 - beta1) * tl.where(kept, 0.0, pen_hi * p)
    v = v * beta2 + (1.0 - beta2) * g * g
    if AUTHORS:
        p = (p - lr * (m / (tl.sqrt(v) + eps))) * decay
    else:
        p = p * decay - lr * (m / (tl.sqrt(v) + eps))
    tl.store(p_ptr + offs, p.to(P_DT), mask=ok)
    tl.store(m_ptr + offs, m.to(M_DT), mask=ok)
    tl.store(v_ptr + offs, v.to(V_DT), mask=ok)


_BLOCK = 4096 if INTERPRET else 2048
_table_cache: dict = {}
_chunk_cache: dict = {}
_dummy: dict = {}


def _fusable(p, g, m, v, keep, axis):
    tensors = (p, g, m, v)
    if any(t.dtype not in TL_DTYPE for t in tensors) or any(not t.is_contiguous() for t in tensors):
        return False
    if any(t.device != p.device or t.shape != p.shape for t in tensors) or p.dim() > 2:
        return False
    if keep is not None:
        if keep.device != p.device or keep.dim() != 1 or not keep.is_contiguous():
            return False
        expected = p.numel() if p.dim() <= 1 else p.shape[axis]
        if keep.numel() != expected:
            return False
    return True


def _keep_indexing(p, axis):
    """(div, mod) with keep index = (flat offset // div) % mod, matching `reference.keep_broadcast`."""
    if p.dim() <= 1:
        return 1, max(p.numel(), 1)
    rows, cols = p.shape
    return (cols, max(rows, 1)) if axis == 0 else (1, max(cols, 1))


def _chunks(numels, device):
    """int32 (tensor index, chunk index) pairs covering every tensor, built with torch ops (a BERT-base
    group has ~10⁵ chunks: no Python loop over them); depends on the sizes only, so it is cached."""
    key = (device, _BLOCK, numels)
    hit = _chunk_cache.get(key)
    if hit is None:
        counts = torch.tensor([triton.cdiv(n, _BLOCK) for n in numels], dtype=torch.int64)
        tensor_idx = torch.repeat_interleave(torch.arange(len(numels)), counts)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        chunk_idx = torch.arange(int(counts.sum())) - first
        hit = torch.stack([tensor_idx, chunk_idx], 1).to(torch.int32).to(device)
        if len(_chunk_cache) > 64:
            _chunk_cache.clear()
        _chunk_cache[key] = hit
    return hit


def _tables(items, device):
    """int64 per-tensor table (addresses, sizes, keep indexing), cached on the addresses and layout, and
    the chunk list. A steady loop (same tensors, same addresses) does no host-to-device copy."""
    key = (device,) + tuple(
        (p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), 0 if k is None else k.data_ptr(), tuple(p.shape),
         axis, bool(comp))
        for p, g, m, v, k, axis, comp in items)
    meta_t = _table_cache.get(key)
    if meta_t is None:
        if device not in _dummy:
            _dummy[device] = torch.ones(1, dtype=torch.uint8, device=device)
        dummy = _dummy[device].data_ptr()
        meta = []
        for p, g, m, v, k, axis, comp in items:
            div, mod = _keep_indexing(p, axis)
            meta.append([p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), dummy if k is None else k.data_ptr(),
                         p.numel(), div, mod, int(k is not None), int(k is not None and bool(comp))])
        meta_t = torch.tensor(meta, dtype=torch.int64).to(device)
        if len(_table_cache) > 64:
            _table_cache.clear()
        _table_cache[key] = meta_t
    return meta_t, _chunks(tuple(p.numel() for p, *_ in items), device)


def _step(params, grads, exp_avgs, exp_avg_sqs, keeps, keep_axes, is_compactor, lr, beta1, beta2, eps, weight_decay, penalty,
          masks_active, update_rule):
    """The step itself: tensors bucketed by device and dtypes, one launch per bucket, the rest by the reference."""
    authors = reference.check_update_rule(update_rule)
    buckets: dict = {}
    for i in range(len(params)):
        p, g, m, v, k, axis = params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], keeps[i], keep_axes[i]
        if k is not None and k.dtype != torch.bool:
            k = k != 0
        if not _fusable(p, g, m, v, k, axis):
            reference.wid_adamw_step(p, g, m, v, keeps[i], axis, lr, beta1, beta2, eps, weight_decay, penalty,
                                     masks_active, is_compactor[i], update_rule)
            continue
        if p.numel() == 0:
            continue
        bucket_key = (p.device, p.dtype, g.dtype, m.dtype, v.dtype)
        buckets.setdefault(bucket_key, []).append((p, g, m, v, None if k is None else k.view(torch.uint8), axis,
                                                   is_compactor[i]))
    for (device, p_dt, g_dt, m_dt, v_dt), items in buckets.items():
        meta, chunks = _tables(items, device)
        decay = 1.0 - lr * weight_decay if weight_decay else 1.0
        launch(_wid_adamw_kernel, (chunks.shape[0],), chunks,
            meta, chunks, float(lr), float(beta1), float(beta2), float(eps), float(decay),
            float(min(penalty, 1.0)), float(penalty - 1.0),
            P_DT=TL_DTYPE[p_dt], G_DT=TL_DTYPE[g_dt], M_DT=TL_DTYPE[m_dt], V_DT=TL_DTYPE[v_dt],
            MASKS_ACTIVE=bool(masks_active), HAS_EXTRA=bool(penalty > 1), AUTHORS=authors, N_META=_N_META, BLOCK=_BLOCK,
            num_warps=4,
        )


@torch.library.custom_op("wid_triton::wid_adamw_step", mutates_args=("params", "exp_avgs", "exp_avg_sqs"))
def _step_op(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
             exp_avg_sqs: list[torch.Tensor], keeps: list[Optional[torch.Tensor]], keep_axes: list[int],
             is_compactor: list[bool], lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
             penalty: float, masks_active: bool, update_rule: str) -> None:
    """The step as a torch.library custom op (mutating its state lists), so torch.compile can trace an optimizer
    step that calls it."""
    _step(params, grads, exp_avgs, exp_avg_sqs, keeps, keep_axes, is_compactor, lr, beta1, beta2, eps, weight_decay, penalty,
          masks_active, update_rule)


@_step_op.register_fake
def _step_fake(params, grads, exp_avgs, exp_avg_sqs, keeps, keep_axes, is_compactor, lr, beta1, beta2, eps, weight_decay,
               penalty, masks_active, update_rule):
    return None


def wid_adamw_multi_tensor(params, grads, exp_avgs, exp_avg_sqs, keeps, keep_axes, is_compactor, lr, beta1, beta2, eps,
                           weight_decay, penalty, masks_active, update_rule="authors"):
    """In-place WID-AdamW over lists of tensors: one kernel launch per (device, dtypes) bucket.

    Tensors the kernel cannot address (non-contiguous, >2-D, exotic dtype) take the reference step.
    """
    reference.check_update_rule(update_rule)
    if not params:
        return
    _step_op(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(keeps), [int(a) for a in keep_axes],
             [bool(c) for c in is_compactor], float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
             float(penalty), bool(masks_active), update_rule)
