"""One small check of a backend's op against the reference, run by `auto` before first using it (selection.py).

Odd sizes, a scattered keep-mask, forward and backward (the optimizer: one in-place step of a masked compactor
and a bias); the reference runs in fp64 on the CPU. Returns None when the op agrees, else the reason in a few
words. It runs outside autocast, with gradients on, so the caller's context does not change what is checked.
"""
from __future__ import annotations

import torch

from . import reference

TOLERANCE = {torch.float64: 1e-8, torch.float32: 2e-3, torch.bfloat16: 6e-2, torch.float16: 1e-2}


def _make(generator, device, dtype, *shape, grad=False):
    t = torch.randn(*shape, generator=generator, dtype=torch.float64)
    return t.to(device=device, dtype=dtype).requires_grad_(grad)


def _compare(pairs, dtype) -> str | None:
    for what, got, expected in pairs:
        if got is None and expected is None:
            continue
        if got is None or expected is None or tuple(got.shape) != tuple(expected.shape):
            return f"{what}: shape {None if got is None else tuple(got.shape)} instead of {tuple(expected.shape)}"
        got, expected = got.detach().to("cpu", torch.float64), expected.detach()
        if not torch.isfinite(got).all():
            return f"{what}: non-finite values"
        scale = max(1.0, float(expected.abs().max()))
        error = float((got - expected).abs().max()) / scale
        if error > TOLERANCE.get(dtype, 1e-2):
            return f"{what}: relative error {error:.2g}"
    return None


def _linear_like(op, device, dtype, generator, fold: bool):
    m, k = 6, 7
    Q, W, L, b = (_make(generator, device, dtype, *s, grad=True) for s in ((m, m), (m, k), (k, k), (m,)))
    keep_out = torch.tensor([True, False, True, True, False, True], device=device)
    keep_in = torch.tensor([True, True, False, True, False, True, True], device=device)
    inputs = [Q, W, L, b]
    if fold:
        outputs = op(Q, W, L, b, keep_out, keep_in, 0.5)
        ref_inputs = [t.detach().cpu().double().requires_grad_() for t in inputs]
        expected = reference.fold(*ref_inputs, keep_out.cpu(), keep_in.cpu(), 0.5)
    else:
        x = _make(generator, device, dtype, 2, 5, k, grad=True)
        inputs = [x, *inputs]
        outputs = (op(x, Q, W, L, b, None, None),)
        ref_inputs = [t.detach().cpu().double().requires_grad_() for t in inputs]
        expected = (reference.compacted_linear(*ref_inputs, None, None),)
    seeds = [torch.randn(e.shape, generator=generator, dtype=torch.float64) for e in expected]
    grads = torch.autograd.grad(outputs, inputs, [s.to(device=device, dtype=dtype) for s in seeds], allow_unused=True)
    expected_grads = torch.autograd.grad(expected, ref_inputs, seeds, allow_unused=True)
    names = ["x"] * (not fold) + ["dQ", "dW", "dL", "db"]
    pairs = [(f"output {i}", o, e) for i, (o, e) in enumerate(zip(outputs, expected))]
    return pairs + [(f"d{name}" if name == "x" else name, g, e) for name, g, e in zip(names, grads, expected_grads)]


def _layer_norm(op, device, dtype, generator):
    """Without a residual, with one of x's dtype and, for half-precision x, with an fp32 one (autocast's case);
    9 channels (scalar accesses) and 16 (a kernel's vector path, for every dtype's vector width)."""
    pairs = []
    residual_dtypes = (None, dtype, *([torch.float32] if dtype in (torch.bfloat16, torch.float16) else []))
    for width, residual_dtype in ((w, r) for w in (9, 16) for r in residual_dtypes):
        keep = (torch.arange(width, device=device) % 4 != 1) & (torch.arange(width, device=device) != width - 2)
        x, gamma, beta = (_make(generator, device, dtype, *s, grad=True) for s in ((3, 4, width), (width,), (width,)))
        residual = None if residual_dtype is None else _make(generator, device, residual_dtype, 3, 4, width, grad=True)
        inputs = [t for t in (x, residual, gamma, beta) if t is not None]
        y = op(x, residual, gamma, beta, keep, 1e-5)
        ref_inputs = [None if t is None else t.detach().cpu().double().requires_grad_() for t in (x, residual, gamma, beta)]
        expected = reference.masked_layer_norm(*ref_inputs, keep.cpu(), 1e-5)
        seed = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
        grads = torch.autograd.grad(y, inputs, seed.to(device=device, dtype=y.dtype))
        expected_grads = torch.autograd.grad(expected, [t for t in ref_inputs if t is not None], seed)
        names = [n for n, t in zip(("dx", "dresidual", "dgamma", "dbeta"), (x, residual, gamma, beta)) if t is not None]
        with_what = f" ({width} channels" + ("" if residual is None else f", residual {str(residual_dtype)[6:]}") + ")"
        pairs += [(f"output{with_what}", y, expected)]
        pairs += [(name + with_what, g, e) for name, g, e in zip(names, grads, expected_grads)]
    return pairs


def _optimizer(op, device, dtype, generator):
    shapes, axes, compactor = [(5, 5), (5,)], [1, 0], [True, False]
    keep = torch.tensor([True, False, True, True, False], device=device)
    state = [[_make(generator, device, dtype, *s) for s in shapes] for _ in range(3)]  # params, grads, exp_avgs
    state.append([_make(generator, device, dtype, *s).abs() for s in shapes])  # exp_avg_sqs
    expected = [[t.detach().cpu().double().clone() for t in group] for group in state]
    settings = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, penalty=3.0, masks_active=True)
    op(*state, [keep, keep], axes, compactor, *settings.values(), "authors")
    reference.wid_adamw_multi_tensor(*expected, [keep.cpu(), keep.cpu()], axes, compactor, *settings.values(), "authors")
    names = ("param", "exp_avg", "exp_avg_sq")
    return [(f"{names[g]} {i}", state[g if g == 0 else g + 1][i], expected[g if g == 0 else g + 1][i])
            for g in range(3) for i in range(len(shapes))]


def self_check(op_name: str, function, device: torch.device, dtype) -> str | None:
    """None if `function` (a backend's `op_name`) agrees with the reference on a small input on `device`/`dtype`."""
    generator = torch.Generator().manual_seed(0)
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            if op_name in ("compacted_linear", "fold"):
                pairs = _linear_like(function, device, dtype, generator, fold=op_name == "fold")
            elif op_name == "masked_layer_norm":
                pairs = _layer_norm(function, device, dtype, generator)
            else:
                pairs = _optimizer(function, device, dtype, generator)
    except Exception as exc:  # noqa: BLE001 - a kernel that cannot run is a failed check
        return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}"
    return _compare(pairs, dtype)
