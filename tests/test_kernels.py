"""Every op of every available backend against the pure-PyTorch reference: forward and backward,
odd shapes, several dtypes, kept sets that are empty, full and scattered."""
import json
import os
import subprocess
import sys

import pytest
import torch

import wid_kernels
from wid_kernels import reference

BACKENDS = [name for name, reason in wid_kernels.available_backends().items() if reason is None]
# (tokens, m, k): odd, not block multiples; the last applies the compactors to the activations (cost model)
SHAPES = [(5, 7, 3), (37, 13, 19), (130, 33, 17), (1, 1, 1), (3, 41, 29)]
TOLERANCE = {torch.float32: 2e-4, torch.float64: 1e-10, torch.bfloat16: 6e-2}


def _keep(size, kind, generator):
    if kind == "none":
        return None
    if kind == "full":
        return torch.ones(size, dtype=torch.bool)
    if kind == "empty":
        return torch.zeros(size, dtype=torch.bool)
    keep = torch.rand(size, generator=generator) < 0.5
    keep[0] = True
    return keep


def _close(got, expected, dtype, what):
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    scale = max(1.0, float(expected.abs().max()))
    error = float((got.float() - expected.float()).abs().max()) / scale
    assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.3g}"


GPU = torch.cuda.is_available()
CUDA_KERNELS = GPU and getattr(wid_kernels._load("cuda"), "CUDA_BUILT", False)
# Where each backend's kernels run in these tests: compiled on the GPU when there is one, so a GPU run tests the
# kernels it names (on the CPU, Triton is its interpreter and the extension its C++ kernels).
BACKEND_DEVICE = {"triton": "cuda" if GPU else "cpu", "cuda": "cuda" if CUDA_KERNELS else "cpu"}


def on_device_of(backend, fn):
    """`fn` with its tensor arguments moved to the backend's device and its outputs brought back (differentiably)."""
    device = BACKEND_DEVICE.get(backend, "cpu")
    if device == "cpu":
        return fn

    def run(*args, **kwargs):
        move = lambda t: t.to(device) if torch.is_tensor(t) else t
        out = fn(*map(move, args), **{key: move(value) for key, value in kwargs.items()})
        assert all(o.device.type == device for o in (out if isinstance(out, tuple) else (out,)) if torch.is_tensor(o))
        return tuple(o.cpu() if torch.is_tensor(o) else o for o in out) if isinstance(out, tuple) else out.cpu()

    return run


@pytest.fixture(params=BACKENDS)
def backend(request):
    previous = wid_kernels.get_backend()
    wid_kernels.set_backend(request.param)
    yield request.param
    wid_kernels.set_backend(previous)


def test_reference_and_torch_backends_are_always_available():
    assert {"reference", "torch"} <= set(BACKENDS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("tokens, m, k", SHAPES)
@pytest.mark.parametrize("keep_kind", ["none", "full", "empty", "scattered"])
def test_compacted_linear_forward_and_backward(backend, tokens, m, k, dtype, keep_kind):
    generator = torch.Generator().manual_seed(tokens * 31 + m)
    make = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
    x, Q, W, L, b = make(2, tokens, k), make(m, m), make(m, k), make(k, k), make(m)
    keep_out, keep_in = _keep(m, keep_kind, generator), _keep(k, keep_kind, generator)
    grad_y = torch.randn(2, tokens, m, generator=generator, dtype=torch.float64).to(dtype)

    def run(fn):
        for t in (x, Q, W, L, b):
            t.grad = None
        y = fn(x, Q, W, L, b, keep_out=keep_out, keep_in=keep_in)
        y.backward(grad_y)
        return y.detach(), [t.grad.clone() for t in (x, Q, W, L, b)]

    y_ref, grads_ref = run(lambda *a, **kw: reference.compacted_linear(*(t.double() for t in a), **kw).to(dtype))
    y, grads = run(on_device_of(backend, wid_kernels.compacted_linear))
    _close(y, y_ref, dtype, "y")
    names = ("dx", "dQ", "dW", "dL", "db")
    for name, got, expected in zip(names, grads, grads_ref):
        if name == "dQ" and keep_out is not None:  # rows the update rule discards may be left uncomputed
            got, expected = got[keep_out], expected[keep_out]
        if name == "dL" and keep_in is not None:
            got, expected = got[:, keep_in], expected[:, keep_in]
        _close(got, expected, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m, k", [(7, 5), (33, 17), (1, 9)])
@pytest.mark.parametrize("keep_kind", ["none", "full", "scattered"])
def test_fold_matches_explicit_products(backend, m, k, dtype, keep_kind):
    generator = torch.Generator().manual_seed(m * k)
    Q, W, L, b = (torch.randn(*s, generator=generator).to(dtype) for s in ((m, m), (m, k), (k, k), (m,)))
    keep_out, keep_in = _keep(m, keep_kind, generator), _keep(k, keep_kind, generator)
    W_eff, b_eff = on_device_of(backend, wid_kernels.fold)(Q, W, L, b, keep_out=keep_out, keep_in=keep_in, scale=0.75)
    full_w = Q.double() @ W.double() @ L.double() * 0.75
    full_b = Q.double() @ b.double() * 0.75
    rows = slice(None) if keep_out is None else keep_out
    cols = slice(None) if keep_in is None else keep_in
    assert W_eff.dtype == dtype
    _close(W_eff, full_w[rows][:, cols], dtype, "W_eff")
    _close(b_eff, full_b[rows], dtype, "b_eff")


def test_fold_without_compactors_only_selects():
    W, b = torch.randn(6, 4), torch.randn(6)
    keep_out = torch.tensor([True, False, True, True, False, True])
    W_eff, b_eff = wid_kernels.fold(None, W, None, b, keep_out=keep_out)
    assert torch.equal(W_eff, W[keep_out]) and torch.equal(b_eff, b[keep_out])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("width", [1, 7, 45, 129])
@pytest.mark.parametrize("keep_kind", ["none", "full", "scattered"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_masked_layer_norm_forward_and_backward(backend, width, dtype, keep_kind, with_residual):
    generator = torch.Generator().manual_seed(width)
    make = lambda *shape: (torch.randn(*shape, generator=generator, dtype=torch.float64) * 2 + 0.5).to(dtype).requires_grad_()
    x, residual, gamma, beta = make(3, 5, width), make(3, 5, width), make(width), make(width)
    residual = residual if with_residual else None
    keep = _keep(width, keep_kind, generator)
    grad_y = torch.randn(3, 5, width, generator=generator, dtype=torch.float64).to(dtype)
    tensors = [t for t in (x, residual, gamma, beta) if t is not None]

    def run(fn):
        for t in tensors:
            t.grad = None
        y = fn(x, residual, gamma, beta, keep, 1e-5)
        y.backward(grad_y)
        return y.detach(), [t.grad.clone() for t in tensors]

    y_ref, grads_ref = run(lambda *a: reference.masked_layer_norm(*(t.double() if torch.is_tensor(t) and t.is_floating_point() else t for t in a)).to(dtype))
    y, grads = run(on_device_of(backend, wid_kernels.masked_layer_norm))
    _close(y, y_ref, dtype, "y")
    for got, expected in zip(grads, grads_ref):
        _close(got, expected, dtype, "grad")


def test_masked_layer_norm_equals_a_plain_layer_norm_over_the_kept_channels():
    torch.manual_seed(0)
    x, gamma, beta = torch.randn(4, 11) * 3 + 1, torch.randn(11), torch.randn(11)
    keep = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    y = reference.masked_layer_norm(x, None, gamma, beta, keep, 1e-12)
    plain = torch.nn.functional.layer_norm(x[:, keep], (int(keep.sum()),), gamma[keep], beta[keep], 1e-12)
    torch.testing.assert_close(y[:, keep], plain)
    mean = x[:, keep].mean(-1, keepdim=True)
    std = x[:, keep].var(-1, unbiased=False, keepdim=True).add(1e-12).sqrt()
    torch.testing.assert_close(y[:, ~keep], (x[:, ~keep] - mean) / std * gamma[~keep] + beta[~keep])


def test_one_cost_model_decides_fold_or_apply():
    from wid_kernels.cost_model import fold_plan, folds_every_compactor, should_fold

    assert should_fold(tokens=4096, compactor_size=768, other_size=3072)
    assert not should_fold(tokens=16, compactor_size=768, other_size=768)
    # a BERT-base step: every encoder linear folds; the decoder at ~2.4k masked positions applies its L
    assert folds_every_compactor(16384, 3072, 768, True, True)
    assert fold_plan(2458, 30522, 768, False, True) == (False, False)


def test_the_triton_backend_follows_the_cost_model(monkeypatch):
    import importlib

    if "triton" not in BACKENDS:
        pytest.skip("triton backend not available here")
    module = importlib.import_module("wid_kernels.backends.triton_ops.compacted_linear")
    folded = []
    original = module.fold_into
    monkeypatch.setattr(module, "fold_into", lambda *a, **k: folded.append(1) or original(*a, **k))
    generator = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=generator)
    W, L = make(40, 12), make(12, 12)
    few, many = make(3, 12), make(64, 12)  # 3 tokens < 40 outputs: applying L is cheaper; 64 tokens: fold
    device = BACKEND_DEVICE["triton"]
    run = lambda x: module.compacted_linear(x.to(device), None, W.to(device), L.to(device)).cpu()
    torch.testing.assert_close(run(few), reference.compacted_linear(few, None, W, L), rtol=1e-4, atol=1e-4)
    assert folded == []
    torch.testing.assert_close(run(many), reference.compacted_linear(many, None, W, L), rtol=1e-4, atol=1e-4)
    assert folded == [1]


def test_unknown_backend_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="choose one of: auto, reference, torch, triton, cuda"):
        wid_kernels.set_backend("cudnn")


def test_environment_variable_selects_the_backend():
    code = "import wid_kernels; print(wid_kernels.get_backend())"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, WID_BACKEND="reference", PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"


def _auto_choices(extra_env=None) -> dict:
    """backends_in_use of `auto` in a fresh process: {device: {op: backend}} for the CPU and the GPU if there is one."""
    code = ("import json, torch, wid_kernels; devices = ['cpu'] + (['cuda'] if torch.cuda.is_available() else []); "
            "print(json.dumps({d: {op: b for op, (b, _) in wid_kernels.backends_in_use(d).items()} for d in devices}))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, WID_BACKEND="auto", PYTHONPATH=root, **(extra_env or {}))
    return json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)


def test_auto_never_picks_an_interpreted_triton():
    for device, choices in _auto_choices({"TRITON_INTERPRET": "1"}).items():
        assert "triton" not in choices.values(), (device, choices)


def test_auto_chooses_per_op_and_device():
    choices = _auto_choices()
    assert choices["cpu"] == {"compacted_linear": "torch", "fold": "reference", "masked_layer_norm": "reference",
                              "wid_adamw_multi_tensor": "reference"}
    if "cuda" in choices:  # the first candidate of selection.ORDER that is built here and passes its self-check
        from wid_kernels.selection import ORDER

        for op, backend in choices["cuda"].items():
            assert backend in ORDER["cuda"][op] and backend != "reference", (op, backend)
