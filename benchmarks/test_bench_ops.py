"""Per-op speed of the WID ops against the unfused reference, torch.compile and the plain-op limit.

One test per op and mode; each point (case, shape, tokens, kept fraction, dtype) is measured for
every provider in the same session (see conftest.py). FLOP and byte counts are the model of
DESIGN.md "Performance model", per provider's own algorithm and counted densely (a backend that
skips pruned rows does less work than counted):
    reference (three GEMMs on activations)  2N(k² + km + m²)
    fold-first                               2mk(m+k) + 2Nmk  (a compactor is folded iff that is cheaper)
    limit (plain linear)                     2Nmk
forward + backward = 3 × forward (each GEMM has two backward GEMMs of its size). Bytes are the
one-pass traffic of the op's inputs and outputs, what a memory-bound kernel cannot go below.
`test_ceiling_*` measure the device's own GEMM and copy speeds in the same run, for the report's
"% of ceiling" columns.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import wid
from benchmarks.conftest import (
    DTYPES,
    OP_PROVIDERS,
    assert_compiled,
    assert_finite,
    backend_op,
    measure,
    random_keep,
    record,
)

EPS = 1e-12  # BERT's LayerNorm eps


def _bytes_per(dtype: str) -> int:
    return torch.finfo(DTYPES[dtype]).bits // 8


def linear_forward_flops(provider: str, m: int, k: int, n: int) -> int:
    """Multiply-adds × 2 of one forward, by the provider's algorithm (DESIGN.md "Performance model")."""
    if provider == "limit":
        return 2 * n * m * k
    if provider == "reference":
        return 2 * n * (k * k + k * m + m * m)
    fold_q, fold_l = n > k, n > m  # the cost model: fold Q iff N > k, fold L iff N > m
    flops = 2 * n * m * k
    flops += 2 * m * m * k if fold_q else 2 * n * m * m
    flops += 2 * m * k * k if fold_l else 2 * n * k * k
    return flops


def linear_bytes(provider: str, m: int, k: int, n: int, element: int, backward: bool) -> int:
    """x, y (+ dy, x again, dx) and each weight once (+ its gradient): the one-pass traffic."""
    weights = m * k if provider == "limit" else m * k + m * m + k * k
    forward = n * k + n * m + weights + m
    if not backward:
        return forward * element
    return (forward + n * m + n * k + n * k + 2 * weights + 2 * m) * element


def _generator(device, seed):
    """Random inputs are made on the device itself: BERT-base-sized ones would take seconds on a host."""
    return torch.Generator(device=device).manual_seed(seed)


def _randn(*shape, generator, device, dtype=torch.float32):
    return torch.randn(*shape, generator=generator, device=device).to(dtype)


def _linear_inputs(m, k, n, dtype, device, requires_grad):
    g = _generator(device, 1)

    def make(*shape, scale=1.0, eye=False):
        t = _randn(*shape, generator=g, device=device) * scale
        if eye:
            t += torch.eye(shape[0], device=device)
        return t.to(DTYPES[dtype]).requires_grad_(requires_grad)

    x = make(n, k)
    Q = make(m, m, scale=0.02, eye=True)
    W = make(m, k, scale=k ** -0.5)
    L = make(k, k, scale=0.02, eye=True)
    bias = make(m, scale=0.02)
    return x, Q, W, L, bias


def _forward_backward(forward, leaves, dy):
    """One timed call: clear the leaves' gradients, run `forward`, back-propagate `dy`; returns the output."""
    def run():
        for leaf in leaves:
            leaf.grad = None
        y = forward()
        y.backward(dy)
        return y

    return run


def _linear_run(provider, device, x, Q, W, L, bias, keep_out, keep_in):
    """The provider's compacted linear as a closure; the limit is a plain linear with the teacher's weight."""
    if provider == "limit":
        return lambda: F.linear(x, W, bias)
    op = backend_op(provider, "compacted_linear", device)
    return lambda: op(x, Q, W, L, bias, keep_out, keep_in)


@pytest.mark.parametrize("provider", OP_PROVIDERS)
def test_compacted_linear_forward(benchmark, case, device, shape, tokens, dtype, provider):
    """y = x(QWL)ᵀ + Qb at the teacher's width; the forward never depends on the masks, so kept = 1."""
    m, k = shape
    x, Q, W, L, bias = _linear_inputs(m, k, tokens, dtype, device, requires_grad=False)
    run = _linear_run(provider, device, x, Q, W, L, bias, None, None)
    record(benchmark, op="compacted_linear", mode="forward", provider=provider, case=case, device=device, shape=shape,
           dtype=dtype, kept=1.0, tokens=tokens, flops=linear_forward_flops(provider, m, k, tokens),
           bytes=linear_bytes(provider, m, k, tokens, _bytes_per(dtype), backward=False))
    with torch.no_grad():
        y = measure(benchmark, run, device, graphable=True)
    assert_compiled(provider)
    assert y.shape == (tokens, m)
    assert_finite(y)


@pytest.mark.parametrize("provider", OP_PROVIDERS)
def test_compacted_linear_forward_backward(benchmark, case, device, shape, tokens, kept, dtype, provider):
    """Forward and backward to x, Q, W, L and b (a backend may skip the pruned rows of dQ and columns of dL)."""
    m, k = shape
    x, Q, W, L, bias = _linear_inputs(m, k, tokens, dtype, device, requires_grad=True)
    keep_out, keep_in = random_keep(m, kept, device, seed=2), random_keep(k, kept, device, seed=3)
    dy = _randn(tokens, m, generator=_generator(device, 4), device=device, dtype=DTYPES[dtype])
    leaves = (x, W, bias) if provider == "limit" else (x, Q, W, L, bias)
    run = _forward_backward(_linear_run(provider, device, x, Q, W, L, bias, keep_out, keep_in), leaves, dy)

    record(benchmark, op="compacted_linear", mode="forward+backward", provider=provider, case=case, device=device,
           shape=shape, dtype=dtype, kept=kept, tokens=tokens, flops=3 * linear_forward_flops(provider, m, k, tokens),
           bytes=linear_bytes(provider, m, k, tokens, _bytes_per(dtype), backward=True))
    y = measure(benchmark, run, device)
    assert_compiled(provider)
    assert y.shape == (tokens, m)
    assert_finite(y, x.grad, W.grad, bias.grad)
    if provider != "limit":  # rows/columns the update rule discards may be left uncomputed
        assert_finite(Q.grad if keep_out is None else Q.grad[keep_out], L.grad if keep_in is None else L.grad[:, keep_in])


@pytest.mark.parametrize("provider", OP_PROVIDERS)
def test_fold(benchmark, case, device, shape, kept, dtype, provider):
    """W_eff = Q[keep_out]·W·L[:, keep_in], b_eff = (Q·b)[keep_out]: the limit is the two plain GEMMs of those shapes."""
    m, k = shape
    _, Q, W, L, bias = _linear_inputs(m, k, 1, dtype, device, requires_grad=False)
    keep_out, keep_in = random_keep(m, kept, device, seed=2), random_keep(k, kept, device, seed=3)
    rows = m if keep_out is None else int(keep_out.sum())
    cols = k if keep_in is None else int(keep_in.sum())
    if provider == "limit":
        Q_kept = Q if keep_out is None else Q[keep_out].contiguous()
        L_kept = L if keep_in is None else L[:, keep_in].contiguous()

        def run():
            return torch.mm(torch.mm(Q_kept, W), L_kept), torch.mv(Q_kept, bias)
    else:
        op = backend_op(provider, "fold", device)

        def run():
            return op(Q, W, L, bias, keep_out, keep_in, None)
    element = _bytes_per(dtype)
    record(benchmark, op="fold", mode="forward", provider=provider, case=case, device=device, shape=shape, dtype=dtype,
           kept=kept, flops=2 * rows * m * k + 2 * rows * k * cols,
           bytes=(rows * m + m * k + k * cols + rows * cols + m + rows) * element)
    with torch.no_grad():  # boolean-mask indexing syncs with the host, which a CUDA graph cannot capture
        W_eff, b_eff = measure(benchmark, run, device, graphable=kept >= 1.0 or provider == "limit")
    assert_compiled(provider)
    assert W_eff.shape == (rows, cols) and b_eff.shape == (rows,)
    assert_finite(W_eff, b_eff)


def _layer_norm_inputs(n, h, dtype, device, requires_grad):
    g = _generator(device, 5)

    def make(*shape, base=0.0, scale=1.0):
        return (base + scale * _randn(*shape, generator=g, device=device)).to(DTYPES[dtype]).requires_grad_(requires_grad)

    return make(n, h), make(n, h), make(h, base=1.0, scale=0.1), make(h, scale=0.1)


def _layer_norm_run(provider, device, x, residual, gamma, beta, keep):
    if provider == "limit":
        return lambda: F.layer_norm(x + residual, x.shape[-1:], gamma, beta, EPS)
    op = backend_op(provider, "masked_layer_norm", device)
    return lambda: op(x, residual, gamma, beta, keep, EPS)


@pytest.mark.parametrize("provider", OP_PROVIDERS)
def test_masked_layer_norm_forward(benchmark, case, device, tokens, kept, dtype, provider):
    """LayerNorm(x + residual) over the kept channels, at the case's hidden width; the limit is plain LayerNorm."""
    h = case.model.hidden
    x, residual, gamma, beta = _layer_norm_inputs(tokens, h, dtype, device, requires_grad=False)
    run = _layer_norm_run(provider, device, x, residual, gamma, beta, random_keep(h, kept, device))
    record(benchmark, op="masked_layer_norm", mode="forward", provider=provider, case=case, device=device, shape=(tokens, h),
           dtype=dtype, kept=kept, tokens=tokens, bytes=(3 * tokens * h + 2 * h) * _bytes_per(dtype))
    with torch.no_grad():  # a backend may count the kept channels on the host: no CUDA graph then
        y = measure(benchmark, run, device, graphable=kept >= 1.0 or provider == "limit")
    assert_compiled(provider)
    assert y.shape == (tokens, h)
    assert_finite(y)


@pytest.mark.parametrize("provider", OP_PROVIDERS)
def test_masked_layer_norm_forward_backward(benchmark, case, device, tokens, kept, dtype, provider):
    """Forward and backward to x, residual, γ and β."""
    h = case.model.hidden
    leaves = _layer_norm_inputs(tokens, h, dtype, device, requires_grad=True)
    dy = _randn(tokens, h, generator=_generator(device, 6), device=device, dtype=DTYPES[dtype])
    run = _forward_backward(_layer_norm_run(provider, device, *leaves, random_keep(h, kept, device)), leaves, dy)

    record(benchmark, op="masked_layer_norm", mode="forward+backward", provider=provider, case=case, device=device,
           shape=(tokens, h), dtype=dtype, kept=kept, tokens=tokens, bytes=(6 * tokens * h + 4 * h) * _bytes_per(dtype))
    y = measure(benchmark, run, device)
    assert_compiled(provider)
    assert y.shape == (tokens, h)
    assert_finite(y, *(leaf.grad for leaf in leaves))


def _compactor_tensors(case, kept, dtype, device):
    """Every compactor of the case's encoder layers (L: k×k, kept along columns; Q: m×m, along rows), with
    random gradients and fresh AdamW state: the ~4.8 GB (BERT-base, fp32) the WID step streams through."""
    model = case.model
    g = _generator(device, 7)
    groups = {}  # one keep-mask per mask group, shared by its members as in the real model

    def keep_of(group, width):
        if group not in groups:
            mask = random_keep(width, kept, "cpu", seed=len(groups))
            groups[group] = (torch.ones(width, dtype=torch.bool) if mask is None else mask).to(device)
        return groups[group]

    sides = {"query": ("hidden", "attention"), "key": ("hidden", "attention"), "value": ("hidden", "attention"),
             "attention.output": ("attention", "hidden"), "intermediate": ("hidden", "intermediate"),
             "output": ("intermediate", "hidden")}
    params, keeps, axes = [], [], []
    for layer in range(model.layers):
        for name, m, k in model.linears():
            group_in, group_out = sides[name]
            for size, group, axis in ((k, group_in, 1), (m, group_out, 0)):
                group = group if group == "hidden" else f"{group}.{layer}"
                p = torch.eye(size, device=device) + 0.02 * _randn(size, size, generator=g, device=device)
                params.append(p.to(DTYPES[dtype]))
                keeps.append(keep_of(group, size))
                axes.append(axis)
    grads = [(1e-3 * _randn(*p.shape, generator=g, device=device)).to(p.dtype) for p in params]
    return params, grads, keeps, axes


@pytest.mark.parametrize("provider", OP_PROVIDERS)
def test_wid_adamw_step(benchmark, case, device, kept, dtype, provider):
    """One WID-AdamW step over all compactors of the encoder (kept = 1: before the first mask update).

    Memory-bound: per element it reads p, ∇, m, v and writes p, m, v. The limit is torch.optim.AdamW over
    the same tensors (fused on a GPU, foreach on a CPU, where fused does not run).
    """
    config = wid.WIDConfig(preset="half")
    params, grads, keeps, axes = _compactor_tensors(case, kept, dtype, device)
    numel = sum(p.numel() for p in params)
    beta1, beta2 = config.adam_betas
    if provider == "limit":
        leaves = [torch.nn.Parameter(p) for p in params]
        for leaf, grad in zip(leaves, grads):
            leaf.grad = grad
        fused = device.type == "cuda"
        optimizer = torch.optim.AdamW(leaves, lr=config.compactor_lr, betas=config.adam_betas, eps=config.adam_eps,
                                      weight_decay=config.weight_decay, fused=fused, foreach=not fused)
        optimizer.step()  # allocate the state before timing, as the WID state below exists before timing

        def run():
            optimizer.step()
            return leaves
    else:
        op = backend_op(provider, "wid_adamw_multi_tensor", device)
        exp_avgs = [torch.zeros_like(p) for p in params]
        exp_avg_sqs = [torch.zeros_like(p) for p in params]
        is_compactor = [True] * len(params)

        def run():
            op(params, grads, exp_avgs, exp_avg_sqs, keeps, axes, is_compactor, config.compactor_lr, beta1, beta2,
               config.adam_eps, config.weight_decay, config.penalty, kept < 1.0, config.update_rule)
            return params
    record(benchmark, op="wid_adamw", mode="step", provider=provider, case=case, device=device, dtype=dtype, kept=kept,
           shape=(numel,), bytes=7 * numel * _bytes_per(dtype), tensors=len(params))
    out = measure(benchmark, run, device)
    assert_compiled(provider)
    assert len(out) == len(params)
    assert_finite(*(p.detach() for p in out))


# ------------------------------------------------------------------------------------------- ceilings
def test_ceiling_gemm(benchmark, case, device, dtype):
    """The device's own n×n×n GEMM speed: the FLOP/s ceiling the report compares every op against.

    A·Bᵀ, nn.Linear's layout: on this project's CPU a bf16 A·B runs a fallback ~20× slower than A·Bᵀ.
    """
    n = case.gemm_ceiling
    g = _generator(device, 8)
    a, b = (_randn(n, n, generator=g, device=device, dtype=DTYPES[dtype]) for _ in range(2))
    record(benchmark, op="ceiling", mode="gemm", provider="ceiling", case=case, device=device, shape=(n, n, n),
           dtype=dtype, flops=2 * n ** 3, bytes=3 * n * n * _bytes_per(dtype))
    c = measure(benchmark, lambda: torch.mm(a, b.t()), device)
    assert c.shape == (n, n)
    assert_finite(c)


def test_ceiling_copy(benchmark, case, device):
    """The device's own large-copy speed (read + write): the bandwidth ceiling of the memory-bound ops."""
    size = case.copy_ceiling_mib * 2 ** 20
    source = torch.ones(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    record(benchmark, op="ceiling", mode="copy", provider="ceiling", case=case, device=device, shape=(size,), bytes=2 * size)
    out = measure(benchmark, lambda: target.copy_(source), device)
    assert out.shape == (size,) and bool(out[-1] == 1)
