"""The Triton backend against `wid_kernels.reference`, op by op, forward and backward.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before they are
imported), so every kernel is exercised on this CPU; with a GPU they are compiled and run on it.
Sizes are odd (never multiples of the block sizes), kept sets are empty, full and scattered, and every
allocation the launchers make is pre-filled with NaN, so an element a kernel forgets to write fails.
A separate test compiles every kernel for the H100 (sm_90) without a GPU.
"""
import importlib
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():  # tests/conftest.py sets it too; this keeps the module runnable on its own
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of the kernels

import pytest

from poisoned_allocations import poison_allocations  # noqa: E402

pytest.importorskip("triton")

import wid_kernels  # noqa: E402
from wid_kernels import reference  # noqa: E402

triton_ops = importlib.import_module("wid_kernels.backends.triton_ops")
mln_mod = importlib.import_module("wid_kernels.backends.triton_ops.masked_layer_norm")
adamw_mod = importlib.import_module("wid_kernels.backends.triton_ops.wid_adamw")
fold_mod = importlib.import_module("wid_kernels.backends.triton_ops.fold")
linear_mod = importlib.import_module("wid_kernels.backends.triton_ops.compacted_linear")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]  # bf16 is wrong in the interpreter: GPU-only test below
TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _keep(size, kind, generator):
    if kind == "none":
        return None
    if kind == "full":
        return torch.ones(size, dtype=torch.bool, device=DEVICE)
    if kind == "empty":
        return torch.zeros(size, dtype=torch.bool, device=DEVICE)
    keep = torch.rand(size, generator=generator) < 0.5
    keep[0], keep[-1] = True, False if size > 1 else True
    return keep.to(DEVICE)


def _close(got, expected, tol, what):
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    assert torch.isfinite(got).all(), f"{what}: non-finite values (an element left unwritten?)"
    got, expected = got.detach(), expected.detach()
    scale = max(1.0, float(expected.abs().max()))
    error = float((got.double() - expected.double()).abs().max()) / scale
    assert error <= tol, f"{what}: relative error {error:.3g} > {tol}"


@pytest.fixture(autouse=True)
def poisoned_allocations(monkeypatch):
    """Every float tensor the launchers allocate (outputs, statistics, partial sums, intermediates)
    starts as NaN, so an element a kernel does not write shows up."""
    poison_allocations(monkeypatch, (mln_mod, adamw_mod, fold_mod, linear_mod))


def _rand(generator, *shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale + shift).to(DEVICE, dtype)


# ----------------------------------------------------------------------------------------- LayerNorm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, width", [(15, 1), (67, 7), (15, 45), (3, 129)])
@pytest.mark.parametrize("keep_kind", ["none", "full", "empty", "scattered"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_masked_layer_norm_forward_and_backward(rows, width, dtype, keep_kind, with_residual):
    generator = torch.Generator().manual_seed(rows * 1000 + width)
    x = _rand(generator, rows, width, dtype=dtype, scale=2, shift=0.5).requires_grad_()
    residual = _rand(generator, rows, width, dtype=dtype).requires_grad_() if with_residual else None
    gamma, beta = (_rand(generator, width, dtype=dtype).requires_grad_() for _ in range(2))
    keep = _keep(width, keep_kind, generator)
    grad_y = _rand(generator, rows, width, dtype=dtype)
    inputs = [t for t in (x, residual, gamma, beta) if t is not None]

    as64 = [None if t is None else t.detach().double().requires_grad_() for t in (x, residual, gamma, beta)]
    y_ref = reference.masked_layer_norm(*as64, keep, 1e-5)
    grads_ref = torch.autograd.grad(y_ref, [t for t in as64 if t is not None], grad_y.double())
    y = triton_ops.masked_layer_norm(x, residual, gamma, beta, keep, 1e-5)
    grads = torch.autograd.grad(y, inputs, grad_y)
    assert y.dtype == dtype
    _close(y, y_ref, TOL[dtype], "y")
    names = [n for n, t in zip(("dx", "dresidual", "dgamma", "dbeta"), (x, residual, gamma, beta)) if t is not None]
    for name, got, expected in zip(names, grads, grads_ref):
        _close(got, expected, TOL[dtype] * (4 if keep_kind == "empty" else 1), name)


MIXED = [(torch.float16, torch.float32), (torch.float32, torch.float16)] + (
    [(torch.bfloat16, torch.float32)] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("x_dtype, residual_dtype", MIXED)
@pytest.mark.parametrize("needs", ["both", "x", "residual"])
def test_masked_layer_norm_with_x_and_residual_in_different_dtypes(x_dtype, residual_dtype, needs):
    """Autocast's case: a half-precision sublayer output added to the fp32 stream inside the kernel. y takes the
    promoted dtype; each input's gradient comes in its own dtype, rounded once from the fp32 dh (the fp32
    residual's gradient must not pass through x's lower precision)."""
    generator = torch.Generator().manual_seed(11)
    x = _rand(generator, 37, 45, dtype=x_dtype, scale=2, shift=0.5).requires_grad_(needs in ("both", "x"))
    residual = _rand(generator, 37, 45, dtype=residual_dtype).requires_grad_(needs in ("both", "residual"))
    gamma, beta = (_rand(generator, 45, dtype=torch.float32) for _ in range(2))
    keep = _keep(45, "scattered", generator)
    promoted = torch.promote_types(x_dtype, residual_dtype)
    grad_y = _rand(generator, 37, 45, dtype=promoted)
    wanted = [t for t in (x, residual) if t.requires_grad]

    y = triton_ops.masked_layer_norm(x, residual, gamma, beta, keep, 1e-5)
    grads = torch.autograd.grad(y, wanted, grad_y)
    as64 = [t.detach().double().requires_grad_(t.requires_grad) for t in (x, residual)]
    y_ref = reference.masked_layer_norm(*as64, gamma.double(), beta.double(), keep, 1e-5)
    grads_ref = torch.autograd.grad(y_ref, [t for t in as64 if t.requires_grad], grad_y.double())
    assert y.dtype == promoted
    _close(y, y_ref, TOL[promoted], "y")
    for tensor, got, expected in zip(wanted, grads, grads_ref):
        assert got.dtype == tensor.dtype
        _close(got, expected, TOL[tensor.dtype], f"grad of the {tensor.dtype} input")


def test_masked_layer_norm_without_affine_and_into_a_poisoned_output():
    generator = torch.Generator().manual_seed(5)
    x = _rand(generator, 9, 23, dtype=torch.float32)
    keep = _keep(23, "scattered", generator)
    out = torch.full_like(x, float("nan"))
    y, mean, rstd = mln_mod.masked_layer_norm_forward(x, None, None, None, keep, 1e-6, out=out)
    assert y is out
    _close(y, reference.masked_layer_norm(x.double(), None, None, None, keep, 1e-6), 2e-5, "y")
    kept = x[:, keep].double()
    _close(mean, kept.mean(-1), 2e-5, "mean")
    _close(rstd, kept.var(-1, unbiased=False).add(1e-6).rsqrt(), 2e-5, "rstd")


def test_masked_layer_norm_gradient_of_unkept_channels_flows_through_the_statistics():
    """A pruned channel's output depends on the kept channels' mean and std: the input gradient of a
    kept channel must include that path (the sums in the backward run over all channels)."""
    x = torch.randn(4, 6, dtype=torch.float64)
    keep = torch.tensor([True, True, False, True, False, True], device=DEVICE)
    gamma, beta = torch.ones(6), torch.zeros(6)
    grad_y = torch.zeros(4, 6)
    grad_y[:, 2] = 1.0  # loss on a pruned channel only
    xt = x.float().to(DEVICE).requires_grad_()
    (dx,) = torch.autograd.grad(triton_ops.masked_layer_norm(xt, None, gamma.to(DEVICE), beta.to(DEVICE), keep, 1e-5),
                                xt, grad_y.to(DEVICE))
    xr = x.clone().requires_grad_()
    (dx_ref,) = torch.autograd.grad(reference.masked_layer_norm(xr, None, gamma.double(), beta.double(), keep.cpu(), 1e-5),
                                    xr, grad_y.double())
    assert float(dx_ref[:, keep.cpu()].abs().max()) > 0.1
    _close(dx.cpu(), dx_ref, 2e-5, "dx")


# ----------------------------------------------------------------------------------------- WID-AdamW
def _adamw_case(dtype, keep_kind, generator):
    """Tensors of a group: row- and column-masked compactors, a masked vector, an unmasked matrix,
    a 1×1 tensor and a vector longer than one kernel chunk; odd sizes, and sizes a multiple of 8 (the kernel's
    128-bit path: fresh allocations are 16-byte aligned)."""
    shapes = [(37, 13), (13, 37), (45,), (9, 5), (1, 1), (adamw_mod._BLOCK + 7,), (24, 16), (16, 24), (40,),
              (2 * adamw_mod._BLOCK + 8,)]
    axes = [0, 1, 0, 0, 1, 0, 0, 1, 0, 0]
    masked = [True, True, True, False, True, True, True, True, True, False]
    is_compactor = [True, True, False, True, True, False, True, True, False, False]
    state = []
    for shape in shapes:
        p, g, m = (_rand(generator, *shape, dtype=dtype) for _ in range(3))
        v = (torch.rand(*shape, generator=generator, dtype=torch.float64) * 0.1).to(DEVICE, dtype)
        state.append([p, g, m * 0.1, v])
    keeps = []
    for shape, axis, is_masked in zip(shapes, axes, masked):
        size = shape[axis] if len(shape) == 2 else shape[0]
        keeps.append(_keep(size, keep_kind, generator) if is_masked else None)
    return state, keeps, axes, is_compactor


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masks_active", [False, True])
@pytest.mark.parametrize("penalty", [20.0, 1.0, 0.5])
@pytest.mark.parametrize("keep_kind", ["full", "empty", "scattered"])
@pytest.mark.parametrize("rule", ["authors", "additive"])
def test_wid_adamw_matches_the_reference_step(dtype, masks_active, penalty, keep_kind, rule):
    generator = torch.Generator().manual_seed(int(penalty * 10) + masks_active)
    state, keeps, axes, is_compactor = _adamw_case(dtype, keep_kind, generator)
    ours = [[t.clone() for t in s] for s in state]
    ref = [[t.double() for t in s] for s in state]
    hyper = dict(lr=3e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, penalty=penalty, masks_active=masks_active,
                 update_rule=rule)
    for step in range(2):  # the second step reuses the cached tables with fresh gradients
        if step:
            for o, r in zip(ours, ref):
                o[1] = _rand(generator, *o[1].shape, dtype=dtype)
                r[1] = o[1].double()
        reference.wid_adamw_multi_tensor(*zip(*ref), keeps, axes, is_compactor, **hyper)
        triton_ops.wid_adamw_multi_tensor(*[list(c) for c in zip(*ours)], keeps, axes, is_compactor, *hyper.values())
    for i, (o, r) in enumerate(zip(ours, ref)):
        for name, got, expected in zip(("param", "grad", "exp_avg", "exp_avg_sq"), o, r):
            _close(got, expected, TOL[dtype] if dtype != torch.float32 else 1e-5, f"tensor {i} {name}")


def test_wid_adamw_takes_the_vector_path_only_for_aligned_tensors():
    whole = torch.zeros(64, device=DEVICE)
    assert adamw_mod.vector_aligned(whole, whole[:32])
    assert not adamw_mod.vector_aligned(whole[1:33])  # 4 bytes in: not a 16-byte boundary
    assert not adamw_mod.vector_aligned(whole[:36])  # 36 elements: the bounds mask would split a vector
    # and a group mixing both computes what the reference does
    generator = torch.Generator().manual_seed(5)
    state = [[_rand(generator, *shape, dtype=torch.float32) for _ in range(4)] for shape in ((8, 8), (8, 8))]
    buffer = torch.zeros(65, device=DEVICE)
    state[1] = [buffer[1:].view(8, 8).copy_(t) if i == 0 else t for i, t in enumerate(state[1])]
    for s in state:
        s[3] = s[3].abs()
    ref = [[t.double() for t in s] for s in state]
    keeps = [_keep(8, "scattered", generator), _keep(8, "scattered", generator)]
    args = (keeps, [0, 1], [True, True], 1e-2, 0.9, 0.999, 1e-6, 0.01, 20.0, True)
    triton_ops.wid_adamw_multi_tensor(*[list(c) for c in zip(*state)], *args)
    reference.wid_adamw_multi_tensor(*zip(*ref), *args)
    for s, r in zip(state, ref):
        _close(s[0], r[0], 1e-5, "param")


def test_wid_adamw_first_moment_injection_follows_the_authors_rule():
    p = torch.ones(3, 4, device=DEVICE)
    g, m, v = torch.zeros_like(p), torch.full_like(p, 0.5), torch.zeros_like(p)
    keep = torch.tensor([True, False, True], device=DEVICE)
    untouched = [t.clone() for t in (p, g, torch.full_like(p, 0.5), v)]  # a tensor not under the rule (no keep mask)
    triton_ops.wid_adamw_multi_tensor([p, untouched[0]], [g, untouched[1]], [m, untouched[2]], [v, untouched[3]],
                                      [keep, None], [0, 0], [True, False], 1e-3, 0.9, 0.999, 1e-6, 0.0, 20.0, True)
    # pruned: 0.9·(0.9·0.5 + 0.1·19·1) + 0.1·1 (the penalty gradient min(λ,1)·p); kept: 0.9·0.9·0.5 (g = 0)
    torch.testing.assert_close(m[1], torch.full((4,), 0.9 * (0.45 + 1.9) + 0.1, device=DEVICE))
    torch.testing.assert_close(m[[0, 2]], torch.full((2, 4), 0.81 * 0.5, device=DEVICE))
    torch.testing.assert_close(untouched[2], torch.full_like(p, 0.45))  # one decay only


def test_wid_adamw_ignores_uncomputed_gradients_of_pruned_rows_and_handles_odd_layouts():
    generator = torch.Generator().manual_seed(11)
    p = _rand(generator, 7, 6, dtype=torch.float32)
    g = _rand(generator, 7, 6, dtype=torch.float32)
    keep = torch.tensor([True, False, True, True, False, True, True], device=DEVICE)
    g_nan = g.clone()
    g_nan[~keep] = float("nan")  # a backend may leave these rows unwritten
    args = lambda grad: ([p.clone()], [grad], [torch.zeros_like(p)], [torch.zeros_like(p)])
    ours, ref = args(g_nan), args(g)
    triton_ops.wid_adamw_multi_tensor(*ours, [keep], [0], [True], 1e-2, 0.9, 0.999, 1e-6, 0.01, 20.0, True)
    reference.wid_adamw_multi_tensor(*ref, [keep], [0], [True], 1e-2, 0.9, 0.999, 1e-6, 0.01, 20.0, True)
    torch.testing.assert_close(ours[0][0], ref[0][0])
    # a transposed (non-contiguous) parameter takes the reference path and still gets the right step
    pt = _rand(generator, 6, 7, dtype=torch.float32).t()
    gt = _rand(generator, 7, 6, dtype=torch.float32)
    a = ([pt.clone().t().contiguous().t()], [gt], [torch.zeros(7, 6, device=DEVICE)], [torch.zeros(7, 6, device=DEVICE)])
    b = ([pt.clone()], [gt.clone()], [torch.zeros(7, 6, device=DEVICE)], [torch.zeros(7, 6, device=DEVICE)])
    triton_ops.wid_adamw_multi_tensor(*a, [keep], [0], [True], 1e-2, 0.9, 0.999, 1e-6, 0.01, 0.5, True)
    reference.wid_adamw_multi_tensor(*b, [keep], [0], [True], 1e-2, 0.9, 0.999, 1e-6, 0.01, 0.5, True)
    torch.testing.assert_close(a[0][0], b[0][0])


# ----------------------------------------------------------------------------------------- fold
FOLD_VARIANTS = ["QWL", "QW", "WL"]


def _fold_inputs(m, k, dtype, variant, generator):
    Q, W, L, b = (_rand(generator, *s, dtype=dtype).requires_grad_() for s in ((m, m), (m, k), (k, k), (m,)))
    return (Q if "Q" in variant else None), W, (L if "L" in variant else None), b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, k", [(7, 5), (33, 17), (1, 9), (70, 130)])
@pytest.mark.parametrize("variant", FOLD_VARIANTS)
@pytest.mark.parametrize("keep_kind", ["none", "full", "empty", "scattered"])
def test_fold_forward_and_backward(m, k, dtype, variant, keep_kind):
    generator = torch.Generator().manual_seed(m * 100 + k)
    Q, W, L, b = _fold_inputs(m, k, dtype, variant, generator)
    keep_out, keep_in = _keep(m, keep_kind, generator), _keep(k, keep_kind, generator)
    scale = None if keep_kind == "full" else 0.75
    inputs = [t for t in (Q, W, L, b) if t is not None]
    as64 = [None if t is None else t.detach().double().requires_grad_() for t in (Q, W, L, b)]
    W_ref, b_ref = reference.fold(*as64, keep_out, keep_in, scale)
    W_eff, b_eff = triton_ops.fold(Q, W, L, b, keep_out, keep_in, scale)
    assert W_eff.dtype == dtype and b_eff.dtype == dtype
    _close(W_eff, W_ref, TOL[dtype], "W_eff")
    _close(b_eff, b_ref, TOL[dtype], "b_eff")
    gW, gb = _rand(generator, *W_ref.shape, dtype=dtype), _rand(generator, *b_ref.shape, dtype=dtype)
    grads_ref = torch.autograd.grad((W_ref, b_ref), [t for t in as64 if t is not None], (gW.double(), gb.double()))
    grads = torch.autograd.grad((W_eff, b_eff), inputs, (gW, gb))
    for got, expected in zip(grads, grads_ref):
        _close(got, expected, TOL[dtype], "grad")


@pytest.mark.parametrize("kept_rows, kept_cols", [(1, 30), (30, 1)])
def test_fold_chain_in_both_orders_into_poisoned_outputs(kept_rows, kept_cols):
    """(Q·W)·L is chosen when few rows are kept, Q·(W·L) when few columns are: both must be right,
    and every element of preallocated outputs must be written."""
    generator = torch.Generator().manual_seed(kept_rows)
    m, k = 41, 37
    Q, W, L, b = (_rand(generator, *s, dtype=torch.float32) for s in ((m, m), (m, k), (k, k), (m,)))
    rows = torch.randperm(m, generator=generator)[:kept_rows].sort().values.to(DEVICE, torch.int32)
    cols = torch.randperm(k, generator=generator)[:kept_cols].sort().values.to(DEVICE, torch.int32)
    out = torch.full((kept_rows, kept_cols), float("nan"), device=DEVICE)
    bias_out = torch.full((kept_rows,), float("nan"), device=DEVICE)
    W_eff, b_eff = fold_mod.fold_into(Q, W, L, b, rows, cols, 0.5, out=out, bias_out=bias_out)
    assert W_eff is out and b_eff is bias_out
    full = Q.double() @ W.double() @ L.double() * 0.5
    _close(W_eff, full[rows.long()][:, cols.long()], 2e-5, "W_eff")
    _close(b_eff, (Q.double() @ b.double() * 0.5)[rows.long()], 2e-5, "b_eff")


def test_gather_gemm_scatters_only_the_listed_rows_and_fuses_the_rank1_term():
    generator = torch.Generator().manual_seed(3)
    a, bt = _rand(generator, 19, 21, dtype=torch.float32), _rand(generator, 23, 21, dtype=torch.float32)
    u, v = _rand(generator, 19, dtype=torch.float32), _rand(generator, 23, dtype=torch.float32)
    rows = torch.tensor([0, 4, 5, 18], dtype=torch.int32, device=DEVICE)
    out = torch.full((19, 23), float("nan"), device=DEVICE)
    fold_mod.gather_gemm(a, bt.t(), out=out, rows=rows, scatter_rows=True, u=u, v=v)
    expected = a.double() @ bt.double().t() + u.double()[:, None] * v.double()[None, :]
    _close(out[rows.long()], expected[rows.long()], 2e-5, "listed rows")
    others = torch.ones(19, dtype=torch.bool)
    others[rows.long()] = False
    assert torch.isnan(out[others.to(DEVICE)]).all(), "rows outside the list must not be touched"


# ----------------------------------------------------------------------------------------- compacted_linear
LINEAR_VARIANTS = ["QWL+b", "QW+b", "WL+b", "QWL"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, m, k", [(5, 7, 3), (37, 13, 19), (130, 33, 70)])
@pytest.mark.parametrize("variant", LINEAR_VARIANTS)
@pytest.mark.parametrize("keep_kind", ["none", "full", "empty", "scattered"])
def test_compacted_linear_forward_and_backward(tokens, m, k, dtype, variant, keep_kind):
    generator = torch.Generator().manual_seed(tokens + m + k)
    x = _rand(generator, 2, tokens, k, dtype=dtype).requires_grad_()
    Q, W, L, b = (_rand(generator, *s, dtype=dtype, scale=0.5).requires_grad_() for s in ((m, m), (m, k), (k, k), (m,)))
    Q = Q if "Q" in variant else None
    L = L if "L" in variant else None
    b = b if "+b" in variant else None
    keep_out, keep_in = _keep(m, keep_kind, generator), _keep(k, keep_kind, generator)
    grad_y = _rand(generator, 2, tokens, m, dtype=dtype)
    tensors = (x, Q, W, L, b)
    inputs = [t for t in tensors if t is not None]
    as64 = [None if t is None else t.detach().double().requires_grad_() for t in tensors]
    y_ref = reference.compacted_linear(*as64, keep_out=keep_out, keep_in=keep_in)
    grads_ref = torch.autograd.grad(y_ref, [t for t in as64 if t is not None], grad_y.double())
    y = triton_ops.compacted_linear(x, Q, W, L, b, keep_out, keep_in)
    grads = torch.autograd.grad(y, inputs, grad_y)
    _close(y, y_ref, TOL[dtype], "y")
    names = [n for n, t in zip(("dx", "dQ", "dW", "dL", "db"), tensors) if t is not None]
    for name, got, expected in zip(names, grads, grads_ref):
        if name == "dQ" and keep_out is not None:  # discarded rows: not computed, left zero
            assert float(got[~keep_out].abs().sum()) == 0.0
            got, expected = got[keep_out], expected[keep_out]
        if name == "dL" and keep_in is not None:
            assert float(got[:, ~keep_in].abs().sum()) == 0.0
            got, expected = got[:, keep_in], expected[:, keep_in]
        _close(got, expected, TOL[dtype], name)


def test_compacted_linear_backward_work_falls_with_the_kept_counts(monkeypatch):
    """The dQ and dL GEMMs run over the kept rows/columns only (M or N of the launch)."""
    calls = []
    real = linear_mod.gather_gemm

    def recording(a, b, **kw):
        calls.append((kw.get("rows"), kw.get("cols"), kw.get("scatter_rows", False), kw.get("scatter_cols", False)))
        return real(a, b, **kw)

    monkeypatch.setattr(linear_mod, "gather_gemm", recording)
    generator = torch.Generator().manual_seed(2)
    m, k = 21, 17
    x = _rand(generator, 40, k, dtype=torch.float32)
    Q, W, L, b = (_rand(generator, *s, dtype=torch.float32).requires_grad_() for s in ((m, m), (m, k), (k, k), (m,)))
    keep_out = torch.zeros(m, dtype=torch.bool, device=DEVICE)
    keep_out[[1, 7]] = True
    keep_in = torch.zeros(k, dtype=torch.bool, device=DEVICE)
    keep_in[[0, 3, 16]] = True
    triton_ops.compacted_linear(x, Q, W, L, b, keep_out, keep_in).sum().backward()
    dq_rows = [rows for rows, _, scatter_rows, _ in calls if scatter_rows]
    dl_cols = [cols for _, cols, _, scatter_cols in calls if scatter_cols]
    assert len(dq_rows) == 1 and dq_rows[0].tolist() == [1, 7]
    assert len(dl_cols) == 1 and dl_cols[0].tolist() == [0, 3, 16]


# ----------------------------------------------------------------------------------------- GPU only
@pytest.mark.parametrize("op", ["masked_layer_norm", "fold", "compacted_linear", "wid_adamw"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_on_the_gpu(op):
    """bf16 operands (tensor cores, fp32 accumulation) against the fp64 reference, errors relative to the output's
    own size: these products are ~1e-2, where an absolute 5e-2 (as `_close` allows below 1) would accept anything."""
    generator = torch.Generator().manual_seed(0)
    dt = torch.bfloat16

    def close_relative(got, expected, tol, what):
        size = float(expected.abs().max()) or 1.0
        _close(got.double() / size, expected / size, tol, what)

    if op == "masked_layer_norm":
        x, r, g, b = (_rand(generator, *s, dtype=dt) for s in ((300, 771), (300, 771), (771,), (771,)))
        keep = _keep(771, "scattered", generator)
        y = triton_ops.masked_layer_norm(x, r, g, b, keep, 1e-12)
        _close(y, reference.masked_layer_norm(x.double(), r.double(), g.double(), b.double(), keep, 1e-12), 5e-2, "y")
    elif op in ("fold", "compacted_linear"):
        m, k = 389, 771
        Q, W, L, b = (_rand(generator, *s, dtype=dt, scale=0.05) for s in ((m, m), (m, k), (k, k), (m,)))
        keep_out, keep_in = _keep(m, "scattered", generator), _keep(k, "scattered", generator)
        if op == "fold":
            W_eff, b_eff = triton_ops.fold(Q, W, L, b, keep_out, keep_in, 0.5)
            W_ref, b_ref = reference.fold(Q.double(), W.double(), L.double(), b.double(), keep_out, keep_in, 0.5)
            close_relative(W_eff, W_ref, 5e-2, "W_eff")
            close_relative(b_eff, b_ref, 5e-2, "b_eff")
        else:
            x = _rand(generator, 1000, k, dtype=dt)
            y = triton_ops.compacted_linear(x, Q, W, L, b, keep_out, keep_in)
            close_relative(y, reference.compacted_linear(x.double(), Q.double(), W.double(), L.double(), b.double()), 5e-2, "y")
    else:
        state, keeps, axes, comp = _adamw_case(dt, "scattered", generator)
        ref = [[t.double() for t in s] for s in state]
        triton_ops.wid_adamw_multi_tensor(*[list(c) for c in zip(*state)], keeps, axes, comp, 1e-2, 0.9, 0.999, 1e-6,
                                          0.01, 20.0, True)
        reference.wid_adamw_multi_tensor(*zip(*ref), keeps, axes, comp, 1e-2, 0.9, 0.999, 1e-6, 0.01, 20.0, True)
        for s, r in zip(state, ref):
            _close(s[0], r[0], 5e-2, "param")


# ----------------------------------------------------------------------------------------- registry
# (every kernel lowered for the H100 without a GPU: tests/test_compile_report.py)


def test_the_dispatcher_routes_every_op_to_this_backend():
    previous = wid_kernels.get_backend()
    # a module collected earlier in this process may have probed the backend before TRITON_INTERPRET was set
    wid_kernels._unavailable.pop("triton", None)
    try:
        assert wid_kernels.set_backend("triton") == "triton"
        for name in ("compacted_linear", "fold", "masked_layer_norm", "wid_adamw_multi_tensor"):
            assert wid_kernels._op(name) is getattr(triton_ops, name)
    finally:
        wid_kernels.set_backend(previous)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_backend_refuses_to_load_without_gpu_or_interpreter():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root
    code = "import wid_kernels; print(wid_kernels.available_backends()['triton']); print(wid_kernels.get_backend())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    reason, chosen = out.stdout.strip().splitlines()
    assert "no CUDA GPU" in reason and chosen != "triton"


def test_compiled_ops_hand_cpu_tensors_to_the_torch_backend_or_the_reference(monkeypatch):
    """Compiled Triton reads CUDA memory only (a CPU pointer is refused at launch): with the interpreter off, each op
    given CPU tensors runs the torch backend's or the reference's computation instead of launching a kernel (as on a
    GPU machine with `set_backend("triton")` and a model left on the CPU)."""
    common = importlib.import_module("wid_kernels.backends.triton_ops._common")
    monkeypatch.setattr(common, "INTERPRET", False)

    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched on CPU tensors")

    monkeypatch.setattr(common, "launch", no_launch)
    for module in (fold_mod, mln_mod, adamw_mod):
        monkeypatch.setattr(module, "launch", no_launch)
    generator = torch.Generator().manual_seed(2)
    x, Q, W, L, b = (torch.randn(*s, generator=generator) for s in ((3, 5, 7), (6, 6), (6, 7), (7, 7), (6,)))
    keep_out = torch.tensor([True, False, True, True, False, True])
    _close(triton_ops.compacted_linear(x, Q, W, L, b, keep_out, None),
           reference.compacted_linear(x, Q, W, L, b, keep_out, None), 1e-5, "compacted_linear")
    for got, expected in zip(triton_ops.fold(Q, W, L, b, keep_out, None, 0.5), reference.fold(Q, W, L, b, keep_out, None, 0.5)):
        _close(got, expected, 1e-5, "fold")
    gamma, beta, keep = torch.randn(7, generator=generator), torch.randn(7, generator=generator), torch.rand(7, generator=generator) < 0.6
    _close(triton_ops.masked_layer_norm(x, None, gamma, beta, keep, 1e-5),
           reference.masked_layer_norm(x, None, gamma, beta, keep, 1e-5), 1e-5, "masked_layer_norm")
    state = [[torch.randn(6, 7, generator=generator)] for _ in range(3)] + [[torch.rand(6, 7, generator=generator)]]
    expected = [[t.clone() for t in group] for group in state]
    settings = (1e-2, 0.9, 0.999, 1e-6, 0.01, 3.0, True, "authors")
    triton_ops.wid_adamw_multi_tensor(*state, [keep_out], [0], [True], *settings)
    reference.wid_adamw_multi_tensor(*expected, [keep_out], [0], [True], *settings)
    for got, exp in zip(state, expected):
        _close(got[0], exp[0], 1e-6, "wid_adamw_multi_tensor")
