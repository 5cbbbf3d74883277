"""The compiled extension `wid_kernels._C`: every C++ CPU kernel (and, on a GPU, every CUDA kernel)
against `wid_kernels.reference`, forward and backward, odd sizes, several dtypes, empty/full/scattered
keep masks; the fused WID-AdamW step against `reference.wid_adamw_step`; the fake (meta) kernels."""
import os

import pytest
import torch

import wid_kernels
from wid_kernels import reference

try:
    from wid_kernels.backends import cuda_ext
    IMPORT_ERROR = None
except ImportError as exc:  # reported by test_extension_imports; everything else skips
    cuda_ext, IMPORT_ERROR = None, exc

needs_ext = pytest.mark.skipif(cuda_ext is None, reason=f"extension not importable: {IMPORT_ERROR}")
HAS_GPU = torch.cuda.is_available() and cuda_ext is not None and cuda_ext.CUDA_BUILT
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and the CUDA kernels")

ops = torch.ops.wid_kernels
# relative to max(1, |expected|max); bf16/fp16 allow for the one rounding of each output
TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 2e-3}
LN_SHAPES = [(1, 1), (3, 5, 7), (2, 3, 45), (17, 129), (4, 384)]


def _close(got, expected, dtype, what, tolerance=None):
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(got).any(), f"{what}: NaN in the output"
    if expected.numel() == 0:
        return
    scale = max(1.0, float(expected.abs().max()))
    error = float((got.double() - expected.double()).abs().max()) / scale
    assert error <= (tolerance or TOLERANCE[dtype]), f"{what}: relative error {error:.3g}"


def _keep(size, kind, generator, device="cpu"):
    if kind == "none":
        return None
    if kind == "full":
        keep = torch.ones(size, dtype=torch.bool)
    elif kind == "empty":
        keep = torch.zeros(size, dtype=torch.bool)
    else:
        keep = torch.rand(size, generator=generator) < 0.5
        keep[0] = True
        keep[-1] = size == 1
    return keep.to(device)


def test_extension_imports():
    if os.environ.get("WID_BUILD_EXT") == "0":
        pytest.skip("installed with WID_BUILD_EXT=0 (no extension by request)")
    assert IMPORT_ERROR is None, f"wid_kernels._C failed to import: {IMPORT_ERROR}"
    assert wid_kernels.available_backends()["cuda"] is None
    for name in ("masked_layer_norm_fwd", "masked_layer_norm_fwd_out", "masked_layer_norm_bwd", "wid_adamw_step"):
        assert hasattr(ops, name), name
    assert isinstance(cuda_ext.CUDA_BUILT, bool)
    if torch.version.cuda and os.environ.get("WID_BUILD_CUDA") == "1":
        assert cuda_ext.CUDA_BUILT, "WID_BUILD_CUDA=1 but the extension has no CUDA kernels"


# ------------------------------------------------------------------------------------------ masked LayerNorm


# (x dtype, residual dtype): the autocast pairs the kernels add themselves, and pairs the op casts to the promoted dtype
MIXED_LN_DTYPES = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.bfloat16),
                   (torch.float16, torch.bfloat16)]


def _ln_inputs(shape, dtype, keep_kind, with_residual, device="cpu", seed=0, residual_dtype=None):
    """x, γ, β in `dtype`; the residual in `residual_dtype` (default `dtype`); dy in their promoted dtype (y's)."""
    generator = torch.Generator().manual_seed(seed + sum(shape))
    make = lambda *s, dt=dtype: (torch.randn(*s, generator=generator, dtype=torch.float64) * 2 + 0.5).to(dt).to(device)
    width = shape[-1]
    x, gamma, beta = make(*shape), make(width), make(width)
    residual = make(*shape, dt=residual_dtype or dtype) if with_residual else None
    out_dtype = dtype if residual is None else torch.promote_types(dtype, residual.dtype)
    dy = torch.randn(*shape, generator=generator, dtype=torch.float64).to(out_dtype).to(device)
    return x, residual, gamma, beta, _keep(width, keep_kind, generator, device), dy


def _ln_expected(x, residual, gamma, beta, keep, dy, eps=1e-5):
    """The reference on fp64 copies (on the CPU): y, dx, dresidual, dγ, dβ."""
    leaves = [None if t is None else t.detach().cpu().double().requires_grad_() for t in (x, residual, gamma, beta)]
    y = reference.masked_layer_norm(*leaves, None if keep is None else keep.cpu(), eps)
    y.backward(dy.cpu().double())
    return y.detach(), [None if t is None else t.grad for t in leaves]


def _ln_tolerance(dtype, keep):
    # the reference computes the masked case in fp32 (`h.float()`), so fp64 can only agree to fp32 rounding
    return 2e-5 if dtype == torch.float64 and keep is not None else TOLERANCE[dtype]


def _check_ln_ops(shape, x_dtype, keep_kind, with_residual, device, residual_dtype=None):
    x, residual, gamma, beta, keep, dy = _ln_inputs(shape, x_dtype, keep_kind, with_residual, device,
                                                    residual_dtype=residual_dtype)
    y_ref, (dx_ref, dr_ref, dg_ref, db_ref) = _ln_expected(x, residual, gamma, beta, keep, dy)
    dtype = dy.dtype  # y's and dh's: x's and the residual's promoted; one rounding of each from exact inputs
    tol = _ln_tolerance(dtype, keep)

    y, mean, rstd = ops.masked_layer_norm_fwd(x, residual, gamma, beta, keep, 1e-5)
    assert y.dtype == dtype and mean.shape == rstd.shape == (x.numel() // shape[-1],)
    _close(y.cpu(), y_ref, dtype, "y", tol)

    poisoned = torch.full_like(x, float("nan"), dtype=dtype)  # every element must be written
    mean2, rstd2 = ops.masked_layer_norm_fwd_out(x, residual, gamma, beta, keep, 1e-5, poisoned)
    _close(poisoned.cpu(), y_ref, dtype, "y (out=)", tol)
    assert torch.equal(mean2, mean) and torch.equal(rstd2, rstd)

    dh, dgamma, dbeta = ops.masked_layer_norm_bwd(dy, x, residual, gamma, keep, mean, rstd)
    assert dh.dtype == dtype
    _close(dh.cpu(), dx_ref, dtype, "dx", tol)
    if residual is not None:
        _close(dh.cpu(), dr_ref, dtype, "dresidual", tol)
    _close(dgamma.cpu(), dg_ref, dtype, "dgamma", tol)
    _close(dbeta.cpu(), db_ref, dtype, "dbeta", tol)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", LN_SHAPES)
@pytest.mark.parametrize("keep_kind", ["none", "full", "empty", "scattered"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_cpu_masked_layer_norm_ops_match_reference(shape, dtype, keep_kind, with_residual):
    _check_ln_ops(shape, dtype, keep_kind, with_residual, "cpu")


@needs_ext
@pytest.mark.parametrize("x_dtype,residual_dtype", MIXED_LN_DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 7), (17, 128)])
@pytest.mark.parametrize("keep_kind", ["none", "scattered"])
def test_cpu_masked_layer_norm_ops_take_a_residual_of_another_dtype(shape, x_dtype, residual_dtype, keep_kind):
    """y and dh in the promoted dtype, computed from the inputs as they are (no rounding of x or the residual)."""
    _check_ln_ops(shape, x_dtype, keep_kind, True, "cpu", residual_dtype)


@needs_ext
@pytest.mark.parametrize("x_dtype,residual_dtype", MIXED_LN_DTYPES)
def test_cpu_masked_layer_norm_mixed_dtypes_give_each_gradient_its_input_dtype(x_dtype, residual_dtype):
    x, residual, gamma, beta, keep, dy = _ln_inputs((6, 32), x_dtype, "scattered", True, residual_dtype=residual_dtype)
    leaves = [t.requires_grad_() for t in (x, residual, gamma, beta)]
    y = cuda_ext.masked_layer_norm(x, residual, gamma, beta, keep, 1e-5)
    assert y.dtype == dy.dtype
    y.backward(dy)
    y_ref, grads_ref = _ln_expected(x, residual, gamma, beta, keep, dy)
    _close(y.detach(), y_ref, y.dtype, "y")
    for name, leaf, expected in zip(("dx", "dresidual", "dgamma", "dbeta"), leaves, grads_ref):
        assert leaf.grad.dtype == leaf.dtype, name
        _close(leaf.grad, expected, leaf.dtype, name)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keep_kind", ["none", "scattered"])
@pytest.mark.parametrize("affine", ["none", "gamma", "beta"])
def test_cpu_masked_layer_norm_autograd_function(dtype, keep_kind, affine):
    """The backend entry point (autograd.Function) with γ and/or β absent, gradients through autograd."""
    x, residual, gamma, beta, keep, dy = _ln_inputs((6, 33), dtype, keep_kind, True)
    gamma = gamma if affine == "gamma" else None
    beta = beta if affine == "beta" else None
    leaves = [t.requires_grad_() for t in (x, residual, gamma, beta) if t is not None]
    y = cuda_ext.masked_layer_norm(x, residual, gamma, beta, keep, 1e-5)
    y.backward(dy)
    y_ref, grads_ref = _ln_expected(x, residual, gamma, beta, keep, dy)
    _close(y.detach(), y_ref, dtype, "y")
    for leaf, expected in zip(leaves, [g for g in grads_ref if g is not None]):
        assert leaf.grad.dtype == leaf.dtype
        _close(leaf.grad, expected, dtype, "grad")


@needs_ext
def test_masked_layer_norm_leaves_statistics_to_kept_channels():
    """Changing a pruned channel's input must not change any kept output (a check independent of the reference)."""
    x, _, gamma, beta, _, _ = _ln_inputs((5, 21), torch.float32, "none", False)
    keep = torch.arange(21) % 3 != 0
    y1, _, _ = ops.masked_layer_norm_fwd(x, None, gamma, beta, keep, 1e-5)
    x2 = x.clone()
    x2[:, ~keep] += 100.0
    y2, _, _ = ops.masked_layer_norm_fwd(x2, None, gamma, beta, keep, 1e-5)
    torch.testing.assert_close(y1[:, keep], y2[:, keep])
    assert not torch.allclose(y1[:, ~keep], y2[:, ~keep])


@needs_ext
def test_masked_layer_norm_falls_back_for_what_the_kernels_do_not_take():
    x, keep = torch.randn(4, 9), torch.arange(9) % 2 == 0
    residual = torch.randn(4, 9, dtype=torch.float64)  # promoted to fp64 with a mask: the reference's fp32 case
    y = cuda_ext.masked_layer_norm(x, residual, None, None, keep, 1e-5)
    torch.testing.assert_close(y, reference.masked_layer_norm(x, residual, None, None, keep, 1e-5))
    residual = torch.randn(4, 1)  # broadcast: the kernels take equal shapes only
    y = cuda_ext.masked_layer_norm(x, residual, None, None, None, 1e-5)
    torch.testing.assert_close(y, reference.masked_layer_norm(x, residual, None, None, None, 1e-5))


# ------------------------------------------------------------------------------------------ WID-AdamW

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01)


def _adamw_case(dtype, device="cpu", seed=0, sizes=((7, 9), (13, 5), (11,), (3, 4))):
    """Tensors with keep None / by row / by column / 1-D, moved away from zero state."""
    generator = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=generator, dtype=torch.float64)
    params, grads, avgs, sqs, keeps, axes = [], [], [], [], [], []
    kinds = [("row", 0), ("column", 1), ("1d", 0), ("none", 0)]
    for index, shape in enumerate(sizes):
        kind, axis = kinds[index % len(kinds)]
        params.append(make(*shape))
        grads.append(make(*shape))
        avgs.append(make(*shape) * 0.1)
        sqs.append(make(*shape).abs() * 0.01)
        if kind == "none":
            keeps.append(None)
        else:
            keep = torch.rand(shape[axis] if len(shape) == 2 else shape[0], generator=generator) < 0.5
            keep[0], keep[-1] = True, False
            keeps.append(keep.to(device))
        axes.append(axis)
    cast = lambda ts: [t.to(dtype).to(device) for t in ts]
    return cast(params), cast(grads), cast(avgs), cast(sqs), keeps, axes


def _reference_step(state, keeps, axes, compactor, penalty, masks_active, as_dtype=None, rule="authors"):
    params, grads, avgs, sqs = ([t.clone() if as_dtype is None else t.to(as_dtype) for t in ts] for ts in state)
    for i in range(len(params)):
        reference.wid_adamw_step(params[i], grads[i], avgs[i], sqs[i], None if keeps[i] is None else keeps[i].to(params[i].device),
                                 axes[i], **{k: HYPER[k] for k in ("lr", "beta1", "beta2", "eps", "weight_decay")},
                                 penalty=penalty, masks_active=masks_active, is_compactor=compactor[i], update_rule=rule)
    return params, avgs, sqs


def _check_adamw(dtype, device, penalty, masks_active, is_compactor, steps=3, sizes=None, state=None, rule="authors"):
    kwargs = {} if sizes is None else {"sizes": sizes}
    params, grads, avgs, sqs, keeps, axes = state or _adamw_case(dtype, device, **kwargs)
    compactor = [is_compactor] * len(params)
    # the reference in fp64 on the CPU for low-precision dtypes (it would round after every sub-operation),
    # in the same dtype otherwise
    ref_dtype = torch.float64 if dtype in (torch.bfloat16, torch.float16) else dtype
    copy = lambda ts: [t.detach().cpu().to(ref_dtype, copy=True) for t in ts]  # copies: the kernel works in place
    expected = (copy(params), copy(avgs), copy(sqs))
    cpu_grads = [g.cpu().to(ref_dtype) for g in grads]
    cpu_keeps = [None if k is None else k.cpu() for k in keeps]
    for _ in range(steps):
        cuda_ext.wid_adamw_multi_tensor(params, grads, avgs, sqs, keeps, axes, compactor, HYPER["lr"], HYPER["beta1"],
                                        HYPER["beta2"], HYPER["eps"], HYPER["weight_decay"], penalty, masks_active, rule)
        expected = _reference_step((*expected[:1], cpu_grads, *expected[1:]), cpu_keeps, axes, compactor, penalty,
                                   masks_active, rule=rule)
        if ref_dtype != dtype:  # the kernel stores in `dtype` after every step; so must the reference
            expected = tuple([t.to(dtype).to(ref_dtype) for t in ts] for ts in expected)
    for name, got_list, expected_list in zip(("param", "exp_avg", "exp_avg_sq"), (params, avgs, sqs), expected):
        for i, (got, exp) in enumerate(zip(got_list, expected_list)):
            assert got.dtype == dtype
            fp32_tol = 1e-6 if device == "cpu" else 1e-5  # the CPU kernel computes in fp64; the GPU in fp32 + FMA
            _close(got.cpu(), exp, dtype, f"{name}[{i}]", fp32_tol if dtype == torch.float32 else None)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("masks_active", [False, True])
@pytest.mark.parametrize("penalty", [20.0, 0.5])
@pytest.mark.parametrize("is_compactor", [True, False])
def test_cpu_wid_adamw_matches_reference(dtype, masks_active, penalty, is_compactor):
    _check_adamw(dtype, "cpu", penalty, masks_active, is_compactor)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("is_compactor", [True, False])
def test_cpu_wid_adamw_additive_variant_matches_reference(dtype, is_compactor):
    _check_adamw(dtype, "cpu", 20.0, True, is_compactor, rule="additive")


@needs_ext
def test_cpu_wid_adamw_changes_what_the_rule_says():
    """Independent of the reference: with masks on, a pruned row's loss gradient is ignored (even NaN)
    and the penalty pulls the row towards zero; without masks a compactor gets the L2 term."""
    params, grads, avgs, sqs, keeps, axes = _adamw_case(torch.float32)
    p, g, keep = params[0], grads[0], keeps[0]  # keep by row
    g[~keep] = float("nan")
    before = p.clone()
    cuda_ext.wid_adamw_multi_tensor([p], [g], [avgs[0].zero_()], [sqs[0].zero_()], [keep], [0], [True], 1e-2, 0.9,
                                    0.999, 1e-6, 0.0, 20.0, True)
    assert torch.isfinite(p).all()
    # with zero state, the first step moves each entry by lr·(1−β1)·g_eff/(√((1−β2)) g_eff²) ≈ ±lr·sign(g_eff)·const
    pruned_move = (p - before)[~keep]
    assert (torch.sign(pruned_move) == -torch.sign(before[~keep])).all()  # towards zero


@needs_ext
def test_cpu_wid_adamw_falls_back_for_non_contiguous_and_3d():
    torch.manual_seed(0)
    base = torch.randn(6, 8)
    p_nc = base.t()  # non-contiguous
    p3 = torch.randn(2, 3, 4)
    state = [[p_nc, p3], [torch.randn(8, 6), torch.randn(2, 3, 4)], [torch.zeros(8, 6), torch.zeros(2, 3, 4)],
             [torch.zeros(8, 6), torch.zeros(2, 3, 4)]]
    expected = _reference_step(state, [torch.arange(8) % 2 == 0, None], [0, 0], [True, True], 20.0, True)
    cuda_ext.wid_adamw_multi_tensor(*state, [torch.arange(8) % 2 == 0, None], [0, 0], [True, True], **{
        "lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "weight_decay": 0.01, "penalty": 20.0,
        "masks_active": True})
    for got, exp in zip(state[0], expected[0]):
        torch.testing.assert_close(got, exp)


# ------------------------------------------------------------------------------------------ fake kernels


@needs_ext
@pytest.mark.parametrize("x_dtype,residual_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_opcheck_masked_layer_norm_ops(x_dtype, residual_dtype):
    x, residual, gamma, beta, keep, dy = _ln_inputs((3, 11), x_dtype, "scattered", True, residual_dtype=residual_dtype)
    torch.library.opcheck(ops.masked_layer_norm_fwd.default, (x, residual, gamma, beta, keep, 1e-5))
    torch.library.opcheck(ops.masked_layer_norm_fwd_out.default, (x, residual, gamma, beta, keep, 1e-5,
                                                                  torch.empty_like(x, dtype=dy.dtype)))
    _, mean, rstd = ops.masked_layer_norm_fwd(x, residual, gamma, beta, keep, 1e-5)
    torch.library.opcheck(ops.masked_layer_norm_bwd.default, (dy, x, residual, gamma, keep, mean, rstd))


@needs_ext
@pytest.mark.parametrize("shape", [(5, 0), (0, 7), (2, 0, 3, 0)])
def test_fake_layer_norm_matches_the_kernel_on_empty_inputs(shape):
    """Zero rows or zero channels: the fake gives the statistics the kernel returns (torch.compile and opcheck
    compare them)."""
    x = torch.randn(shape)
    keep = torch.ones(shape[-1], dtype=torch.bool)
    torch.library.opcheck(ops.masked_layer_norm_fwd.default, (x, None, None, None, keep, 1e-5))
    real = ops.masked_layer_norm_fwd(x, None, None, None, keep, 1e-5)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = ops.masked_layer_norm_fwd(mode.from_tensor(x), None, None, None, mode.from_tensor(keep), 1e-5)
    assert [tuple(t.shape) for t in fake] == [tuple(t.shape) for t in real]


@needs_ext
def test_opcheck_wid_adamw_step():
    params, grads, avgs, sqs, keeps, axes = _adamw_case(torch.float32)
    torch.library.opcheck(ops.wid_adamw_step.default, (params, grads, avgs, sqs, keeps, axes, [True] * 4, 1e-2, 0.9,
                                                       0.999, 1e-6, 0.01, 20.0, True))


@needs_ext
def test_masked_layer_norm_traces_under_torch_compile():
    x, residual, gamma, beta, keep, dy = _ln_inputs((4, 10), torch.float32, "scattered", True)
    x.requires_grad_()
    compiled = torch.compile(cuda_ext.masked_layer_norm, backend="aot_eager", fullgraph=True)
    y = compiled(x, residual, gamma, beta, keep, 1e-5)
    y.backward(dy)
    y_ref, grads_ref = _ln_expected(x, residual, gamma, beta, keep, dy)
    _close(y.detach(), y_ref, torch.float32, "y")
    _close(x.grad, grads_ref[0], torch.float32, "dx")


# ------------------------------------------------------------------------------------------ the same on a GPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# 4100: > shared dγ/dβ; (1001, 96): 8 rows per block, a partial last block; (40003, 40): more rows than the
# backward's resident blocks hold, so every row slot loops, with idle slots in the last round
@pytest.mark.parametrize("shape", LN_SHAPES + [(64, 768), (5, 3000), (3, 4100), (1001, 96), (40003, 40)])
@pytest.mark.parametrize("keep_kind", ["none", "empty", "scattered"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.gpu
@needs_gpu
def test_gpu_masked_layer_norm_ops_match_reference(shape, dtype, keep_kind, with_residual):
    _check_ln_ops(shape, dtype, keep_kind, with_residual, "cuda")


@pytest.mark.parametrize("x_dtype,residual_dtype", MIXED_LN_DTYPES)
# 768: 4-element vectors (8-byte x loads beside 16-byte fp32 ones); 45: scalar; (1001, 96): rows sharing a block
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 3, 45), (64, 768), (1001, 96), (3, 4100)])
@pytest.mark.parametrize("keep_kind", ["none", "scattered"])
@pytest.mark.gpu
@needs_gpu
def test_gpu_masked_layer_norm_ops_take_a_residual_of_another_dtype(shape, x_dtype, residual_dtype, keep_kind):
    _check_ln_ops(shape, x_dtype, keep_kind, True, "cuda", residual_dtype)


@pytest.mark.parametrize("dtype,residual_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                   (torch.bfloat16, torch.float32)])
@pytest.mark.gpu
@needs_gpu
def test_gpu_masked_layer_norm_misaligned_rows_take_the_scalar_path(dtype, residual_dtype):
    # 256 columns would take vectors; x at storage offset 1 is not aligned to them
    x, residual, gamma, beta, keep, dy = _ln_inputs((9, 256), dtype, "scattered", True, "cuda",
                                                    residual_dtype=residual_dtype)
    x = torch.cat([x.new_zeros(1), x.flatten()])[1:].view(9, 256)
    _check = _ln_expected(x, residual, gamma, beta, keep, dy)
    y, mean, rstd = ops.masked_layer_norm_fwd(x, residual, gamma, beta, keep, 1e-5)
    _close(y.cpu(), _check[0], y.dtype, "y")
    dh, dgamma, dbeta = ops.masked_layer_norm_bwd(dy, x, residual, gamma, keep, mean, rstd)
    _close(dh.cpu(), _check[1][0], dh.dtype, "dx")
    _close(dgamma.cpu(), _check[1][2], dh.dtype, "dgamma")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masks_active", [False, True])
@pytest.mark.parametrize("penalty", [20.0, 0.5])
@pytest.mark.parametrize("is_compactor", [True, False])
@pytest.mark.gpu
@needs_gpu
def test_gpu_wid_adamw_matches_reference(dtype, masks_active, penalty, is_compactor):
    _check_adamw(dtype, "cuda", penalty, masks_active, is_compactor)


@pytest.mark.gpu
@needs_gpu
def test_gpu_wid_adamw_many_and_large_tensors():
    """Many tensors in one launch, tensors spanning several 64k chunks (the blocks' binary search), odd sizes
    (vector tails), and one misaligned tensor (its own launch, the scalar path)."""
    sizes = [(3, 5), (700, 300), (11,), (1, 1)] * 5 + [(4100, 4100)]
    state = _adamw_case(torch.float32, "cuda", seed=1, sizes=sizes)
    params = state[0]
    params[1] = torch.cat([params[1].new_zeros(1), params[1].flatten()])[1:].view(700, 300)
    _check_adamw(torch.float32, "cuda", 20.0, True, True, steps=2, state=state)


def _repeated_adamw(seed, sizes):
    """(step, check) for one fixed CUDA WID-AdamW case: `step()` runs one in-place step of it, `check(steps, what)`
    compares its tensors with that many reference steps on the CPU."""
    params, grads, avgs, sqs, keeps, axes = _adamw_case(torch.float32, "cuda", seed=seed, sizes=sizes)
    compactor = [True] * len(sizes)
    start = tuple([t.detach().cpu().clone() for t in ts] for ts in (params, avgs, sqs))
    cpu_grads, cpu_keeps = [g.cpu() for g in grads], [None if k is None else k.cpu() for k in keeps]

    def step():
        cuda_ext.wid_adamw_multi_tensor(params, grads, avgs, sqs, keeps, axes, compactor, HYPER["lr"], HYPER["beta1"],
                                        HYPER["beta2"], HYPER["eps"], HYPER["weight_decay"], 20.0, True, "authors")

    def check(steps, what):
        expected = start
        for _ in range(steps):
            expected = _reference_step((expected[0], cpu_grads, expected[1], expected[2]), cpu_keeps, axes, compactor,
                                       20.0, True)
        for got_list, expected_list in zip((params, avgs, sqs), expected):
            for got, exp in zip(got_list, expected_list):
                _close(got.cpu(), exp, torch.float32, what, 1e-5)

    return step, check


@pytest.mark.gpu
@needs_gpu
def test_gpu_wid_adamw_steps_on_another_stream_after_the_table_was_uploaded():
    """The descriptor table uploaded by a step on one stream serves steps on another (which wait for the upload and
    keep the table alive for that stream)."""
    step, check = _repeated_adamw(seed=4, sizes=[(37, 700), (5, 3)])
    step()  # uploads on the default stream
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()  # the same addresses: the same table, on another stream
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    check(3, "across streams")


@pytest.mark.gpu
@needs_gpu
def test_gpu_wid_adamw_replays_in_a_cuda_graph_after_a_warm_up_step():
    """The descriptor table is uploaded once per set of addresses: after one eager step the step captures
    into a CUDA graph (torch.cuda.graph captures on a stream of its own; the table outlives the graph) and each
    replay is one more step; without the warm-up the capture is refused in one line that says what to do."""
    step, check = _repeated_adamw(seed=3, sizes=[(37, 70000), (5, 3)])
    fresh = [torch.zeros(4, 4, device="cuda") for _ in range(4)]
    with pytest.raises(RuntimeError, match="run one optimizer step eagerly first"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            cuda_ext.wid_adamw_multi_tensor([fresh[0]], [fresh[1]], [fresh[2]], [fresh[3]], [None], [0], [False], 1e-2,
                                            0.9, 0.999, 1e-6, 0.0, 1.0, False, "authors")
    step()  # warm-up, eager
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()  # captured, not run
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    check(3, "after replays")
