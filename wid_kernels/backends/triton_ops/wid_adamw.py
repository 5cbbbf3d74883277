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

Bandwidth: offsets are int32 (tensors under 2^31 elements; larger ones take the reference step), the
keep index of an element is one int32 division (rows: offset // columns) or remainder (columns:
offset % columns), never the two 64-bit divisions of a general (offset // div) % mod, and buckets whose
tensors all start at 16-byte boundaries (every fresh allocation) tell the compiler so, which lets it
use 128-bit loads and stores. `python -m wid_kernels.compile_report` shows the registers it takes.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, TL_DTYPE, launch, runs_here
from ... import reference

__all__ = ["wid_adamw_multi_tensor"]

# columns of the per-tensor table; KEEP_BY is 0 (no mask), 1 (keep[offset // WIDTH]: rows) or 2 (keep[offset % WIDTH])
_P, _G, _M, _V, _KEEP, _NUMEL, _WIDTH, _KEEP_BY, _ADD_PARAM = range(9)
_N_META = 9
_ALIGN = 16  # bytes: 128-bit accesses


@triton.jit
def _wid_adamw_kernel(META, CHUNKS, lr, beta1, beta2, eps, decay, pen_lo, pen_hi,
                      P_DT: tl.constexpr, G_DT: tl.constexpr, M_DT: tl.constexpr, V_DT: tl.constexpr,
                      MASKS_ACTIVE: tl.constexpr, HAS_EXTRA: tl.constexpr, AUTHORS: tl.constexpr,
                      ALIGNED: tl.constexpr, N_META: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(CHUNKS + 2 * pid)
    chunk = tl.load(CHUNKS + 2 * pid + 1)
    row = META + t * N_META
    p_ptr = tl.load(row + 0).to(tl.pointer_type(P_DT), bitcast=True)
    g_ptr = tl.load(row + 1).to(tl.pointer_type(G_DT), bitcast=True)
    m_ptr = tl.load(row + 2).to(tl.pointer_type(M_DT), bitcast=True)
    v_ptr = tl.load(row + 3).to(tl.pointer_type(V_DT), bitcast=True)
    k_ptr = tl.load(row + 4).to(tl.pointer_type(tl.uint8), bitcast=True)
    numel = tl.load(row + 5).to(tl.int32)
    width = tl.load(row + 6).to(tl.int32)
    keep_by = tl.load(row + 7)
    add_param = tl.load(row + 8)
    has_keep = keep_by != 0
    if ALIGNED:  # the size is a multiple of 8 too, so the bounds mask is constant over 128-bit vectors
        numel = tl.multiple_of(numel, 8)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
    ok = offs < numel
    p_at, g_at, m_at, v_at = p_ptr + offs, g_ptr + offs, m_ptr + offs, v_ptr + offs
    if ALIGNED:  # each run of BLOCK addresses starts on a 16-byte boundary: 128-bit accesses
        p_at = tl.max_contiguous(tl.multiple_of(p_at, 16), BLOCK)
        g_at = tl.max_contiguous(tl.multiple_of(g_at, 16), BLOCK)
        m_at = tl.max_contiguous(tl.multiple_of(m_at, 16), BLOCK)
        v_at = tl.max_contiguous(tl.multiple_of(v_at, 16), BLOCK)
    p = tl.load(p_at, mask=ok, other=0.0).to(tl.float32)
    grad = tl.load(g_at, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(m_at, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(v_at, mask=ok, other=0.0).to(tl.float32)
    if MASKS_ACTIVE:
        if keep_by == 1:
            index = offs // width
        else:
            index = offs % width
        kv = tl.load(k_ptr + index, mask=ok & has_keep, other=1)
        kept = kv != 0
        g = tl.where(kept, grad, pen_lo * p)
    else:
        g = tl.where(add_param != 0, grad + p, grad)
    if MASKS_ACTIVE:
        if HAS_EXTRA:
            if AUTHORS:  # only tensors under the rule get the pre-step decay
                injected = m * beta1 + (1.0 - beta1) * tl.where(kept, 0.0, pen_hi * p)
                m = tl.where(has_keep, injected, m)
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
    tl.store(p_at, p.to(P_DT), mask=ok)
    tl.store(m_at, m.to(M_DT), mask=ok)
    tl.store(v_at, v.to(V_DT), mask=ok)


_BLOCK = 4096 if INTERPRET else 1024
_WARPS = 8
_MAX_NUMEL = 2**31 - 1 - _BLOCK  # int32 offsets (chunk·BLOCK + lane) must not overflow
_table_cache: dict = {}
_chunk_cache: dict = {}
_dummy: dict = {}


def vector_aligned(*tensors) -> bool:
    """True when every tensor starts on a 16-byte boundary and has a multiple of 8 elements: the kernel may then
    use 128-bit accesses (the bounds mask is constant over each vector)."""
    return all(t.numel() % 8 == 0 and t.data_ptr() % _ALIGN == 0 for t in tensors)


def _fusable(p, g, m, v, keep, axis):
    tensors = (p, g, m, v)
    if any(t.dtype not in TL_DTYPE for t in tensors) or any(not t.is_contiguous() for t in tensors):
        return False
    if not runs_here(*tensors, keep):  # compiled kernels read CUDA memory only: the others take the reference step
        return False
    if any(t.device != p.device or t.shape != p.shape for t in tensors) or p.dim() > 2 or p.numel() > _MAX_NUMEL:
        return False
    if keep is not None:
        if keep.device != p.device or keep.dim() != 1 or not keep.is_contiguous():
            return False
        expected = p.numel() if p.dim() <= 1 else p.shape[axis]
        if keep.numel() != expected:
            return False
    return True


def _keep_indexing(p, axis):
    """(width, keep_by): keep index = offset // width (1: rows) or offset % width (2: columns or a vector),
    matching `reference.keep_broadcast`."""
    if p.dim() <= 1:
        return max(p.numel(), 1), 2
    rows, cols = p.shape
    return (max(cols, 1), 1) if axis == 0 else (max(cols, 1), 2)


def _upload(table: torch.Tensor, device) -> torch.Tensor:
    """A host table on `device` without stopping the host: pinned memory and an asynchronous copy (a pageable copy
    waits for the device; the tables are rebuilt whenever a tensor's address changes, e.g. grads set to None)."""
    if torch.device(device).type != "cuda":
        return table.to(device)
    return table.pin_memory().to(device, non_blocking=True)


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
        hit = _upload(torch.stack([tensor_idx, chunk_idx], 1).to(torch.int32), device)
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
            width, keep_by = _keep_indexing(p, axis)
            meta.append([p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), dummy if k is None else k.data_ptr(),
                         p.numel(), width, keep_by if k is not None else 0, int(k is not None and bool(comp))])
        meta_t = _upload(torch.tensor(meta, dtype=torch.int64), device)
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
        aligned = vector_aligned(p, g, m, v)
        bucket_key = (p.device, p.dtype, g.dtype, m.dtype, v.dtype, aligned)
        buckets.setdefault(bucket_key, []).append((p, g, m, v, None if k is None else k.view(torch.uint8), axis,
                                                   is_compactor[i]))
    for (device, p_dt, g_dt, m_dt, v_dt, aligned), items in buckets.items():
        meta, chunks = _tables(items, device)
        decay = 1.0 - lr * weight_decay if weight_decay else 1.0
        launch(_wid_adamw_kernel, (chunks.shape[0],), chunks,
            meta, chunks, float(lr), float(beta1), float(beta2), float(eps), float(decay),
            float(min(penalty, 1.0)), float(penalty - 1.0),
            P_DT=TL_DTYPE[p_dt], G_DT=TL_DTYPE[g_dt], M_DT=TL_DTYPE[m_dt], V_DT=TL_DTYPE[v_dt],
            MASKS_ACTIVE=bool(masks_active), HAS_EXTRA=bool(penalty > 1), AUTHORS=authors, ALIGNED=aligned, N_META=_N_META,
            BLOCK=_BLOCK,
            num_warps=_WARPS,
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
