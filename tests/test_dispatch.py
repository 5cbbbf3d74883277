"""`auto` per op (wid_kernels.selection): the self-check, the fallback with one warning, bad input left alone,
dtype parity of every backend under autocast, and the device guard of the Triton launches."""
import contextlib
import types
import warnings

import pytest
import torch

import wid_kernels
from wid_kernels import reference, selection

BACKENDS_HERE = [name for name, reason in wid_kernels.available_backends().items() if reason is None]


@pytest.fixture
def auto():
    """`auto` with a fresh selection; the real backends restored afterwards."""
    previous = wid_kernels.get_backend()
    wid_kernels.set_backend("auto")
    wid_kernels._selection.reset()
    yield wid_kernels._selection
    wid_kernels._selection.reset()
    wid_kernels.set_backend(previous)


def _fake_backend(monkeypatch, compacted_linear):
    """Put a fake `torch` backend (the CPU's first candidate for compacted_linear) in place."""
    monkeypatch.setitem(wid_kernels._loaded, "torch", types.SimpleNamespace(compacted_linear=compacted_linear))


def _inputs(tokens=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens, 7, generator=generator)
    Q, W, L, b = torch.randn(6, 6, generator=generator), torch.randn(6, 7, generator=generator), torch.randn(7, 7, generator=generator), torch.randn(6, generator=generator)
    return x, Q, W, L, b


def test_a_kernel_that_raises_is_replaced_with_one_warning(auto, monkeypatch):
    def breaks_on_big_inputs(x, *rest):  # passes the small self-check, then fails like a launch that runs out of resources
        if x.numel() > 200:
            raise RuntimeError("OutOfResources: shared memory, required: 233472, hardware limit: 232448")
        return reference.compacted_linear(x, *rest)

    _fake_backend(monkeypatch, breaks_on_big_inputs)
    x, Q, W, L, b = _inputs(tokens=40)
    with pytest.warns(RuntimeWarning) as caught:
        y = wid_kernels.compacted_linear(x, Q, W, L, b)
    messages = [str(w.message) for w in caught if "wid_kernels" in str(w.message)]
    assert len(messages) == 1 and "compacted_linear" in messages[0] and "torch backend" in messages[0]
    assert "OutOfResources" in messages[0] and "using reference" in messages[0]
    assert torch.allclose(y, reference.compacted_linear(x, Q, W, L, b), atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the broken kernel is not tried again
        wid_kernels.compacted_linear(x, Q, W, L, b)
    assert wid_kernels.backends_in_use("cpu")["compacted_linear"][0] == "reference"


def test_a_kernel_that_computes_wrong_values_fails_its_self_check(auto, monkeypatch):
    _fake_backend(monkeypatch, lambda *args: reference.compacted_linear(*args) * 1.01)
    x, Q, W, L, b = _inputs()
    with pytest.warns(RuntimeWarning, match=r"compacted_linear on the torch backend failed .*self-check: output 0: relative error"):
        y = wid_kernels.compacted_linear(x, Q, W, L, b)
    assert torch.allclose(y, reference.compacted_linear(x, Q, W, L, b), atol=1e-5)
    backend, why = wid_kernels.backends_in_use("cpu")["compacted_linear"]
    assert backend == "reference" and "torch failed its self-check" in why


def test_bad_input_is_an_error_not_a_fallback(auto):
    x, Q, W, L, b = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError):
            wid_kernels.compacted_linear(x[..., :5], Q, W, L, b)  # 5 input features for a 7-wide L
    assert wid_kernels.backends_in_use("cpu")["compacted_linear"][0] == "torch"  # nothing was dropped


def test_an_explicit_backend_is_used_as_it_is(monkeypatch):
    previous = wid_kernels.get_backend()
    try:
        assert wid_kernels.set_backend("torch") == "torch"
        _fake_backend(monkeypatch, lambda *args: reference.compacted_linear(*args) * 2)
        x, Q, W, L, b = _inputs()
        assert torch.allclose(wid_kernels.compacted_linear(x, Q, W, L, b), 2 * reference.compacted_linear(x, Q, W, L, b))
        assert wid_kernels.backends_in_use("cpu")["compacted_linear"][0] == "torch"
    finally:
        wid_kernels.set_backend(previous)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_every_backend_returns_the_reference_dtypes_under_autocast(backend):
    """bf16 autocast on the CPU: matmul ops give bf16, the LayerNorm fp32 (torch's own policy), on every backend."""
    previous = wid_kernels.get_backend()
    x, Q, W, L, b = _inputs()
    h = torch.randn(3, 4, 9)
    gamma, beta, keep = torch.randn(9), torch.randn(9), torch.tensor([1, 0, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    results = {}
    try:
        for name in ("reference", backend):
            wid_kernels.set_backend(name)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                results[name] = (wid_kernels.compacted_linear(x, Q, W, L, b), *wid_kernels.fold(Q, W, L, b, scale=0.5),
                                 wid_kernels.masked_layer_norm(h, None, gamma, beta, keep, 1e-5),
                                 wid_kernels.masked_layer_norm(h, None, gamma, beta, None, 1e-5))
    finally:
        wid_kernels.set_backend(previous)
    expected_dtypes = [torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    assert [t.dtype for t in results["reference"]] == expected_dtypes
    assert [t.dtype for t in results[backend]] == expected_dtypes
    for got, expected in zip(results[backend], results["reference"]):
        scale = max(1.0, float(expected.float().abs().max()))
        assert float((got.float() - expected.float()).abs().max()) / scale <= 3e-2


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_a_half_precision_sublayer_output_joins_the_fp32_stream_under_autocast(backend):
    """LayerNorm(bf16 x + fp32 residual) under autocast: fp32 out, dx in bf16, dresidual in fp32, on every backend
    as in the reference (which adds in fp32: exactly x.float() + residual)."""
    previous = wid_kernels.get_backend()
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 9, generator=generator).bfloat16().requires_grad_()
    stream = torch.randn(3, 4, 9, generator=generator).requires_grad_()
    gamma, beta = torch.randn(9, generator=generator), torch.randn(9, generator=generator)
    keep = torch.tensor([1, 0, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    seed = torch.randn(3, 4, 9, generator=generator)
    results = {}
    try:
        for name in ("reference", backend):
            wid_kernels.set_backend(name)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = wid_kernels.masked_layer_norm(x, stream, gamma, beta, keep, 1e-5)
            results[name] = (y, *torch.autograd.grad(y, (x, stream), seed))
    finally:
        wid_kernels.set_backend(previous)
    assert [t.dtype for t in results["reference"]] == [torch.float32, torch.bfloat16, torch.float32]
    assert [t.dtype for t in results[backend]] == [torch.float32, torch.bfloat16, torch.float32]
    expected = reference.masked_layer_norm(x.double(), stream.double(), gamma.double(), beta.double(), keep, 1e-5)
    torch.testing.assert_close(results[backend][0].double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[backend][2], results["reference"][2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[backend][1].float(), results["reference"][1].float(), atol=2e-2, rtol=2e-2)


def test_triton_launches_go_to_the_tensors_gpu(monkeypatch):
    """The guard makes the tensor's device current around the launch (checked without a GPU: recorded)."""
    from wid_kernels.backends.triton_ops import _common  # importable here: the interpreter is on without a GPU

    entered = []

    @contextlib.contextmanager
    def record(device):
        entered.append(("enter", device))
        yield
        entered.append(("exit", device))

    monkeypatch.setattr(torch.cuda, "device", record)
    kernel = {(4,): lambda *args, **meta: entered.append(("launch", args, meta))}
    on_gpu1 = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    _common.launch(kernel, (4,), on_gpu1, "a", BLOCK=8)
    assert entered == [("enter", torch.device("cuda", 1)), ("launch", ("a",), {"BLOCK": 8}), ("exit", torch.device("cuda", 1))]
    entered.clear()
    _common.launch(kernel, (4,), torch.zeros(1), "b")
    assert entered == [("launch", ("b",), {})]  # CPU tensors (the interpreter): no CUDA device touched


def test_every_triton_launch_is_guarded():
    import pathlib
    import re

    folder = pathlib.Path(wid_kernels.__file__).parent / "backends" / "triton_ops"
    for path in folder.glob("*.py"):
        direct = [line for line in path.read_text().splitlines() if re.search(r"\b_\w+_kernel\[", line)]
        assert not direct, f"{path.name} launches a kernel without _common.launch: {direct}"


def test_wid_info_shows_the_backend_of_every_op(capsys):
    from wid.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    cpu = out.split("ops on cpu (fp32):", 1)[1]
    for op in selection.OPS:
        assert op in cpu
    assert "self-check passed" in cpu or "the reference" in cpu


def _bad_mask_calls(keep):
    """One call of every op whose mask is `keep` (a stand-in for a bool mask over 6 channels)."""
    x, W, Q, L = torch.randn(3, 5), torch.randn(6, 5), torch.eye(6), torch.eye(5)
    good_in = torch.ones(5, dtype=torch.bool)
    p = torch.randn(6, 5)
    return {
        "compacted_linear": lambda: wid_kernels.compacted_linear(x, Q, W, L, None, keep, good_in),
        "fold": lambda: wid_kernels.fold(Q, W, L, None, keep, good_in),
        "masked_layer_norm": lambda: wid_kernels.masked_layer_norm(torch.randn(3, 6), None, torch.ones(6), torch.zeros(6),
                                                                   keep, 1e-5),
        "wid_adamw_multi_tensor": lambda: wid_kernels.wid_adamw_multi_tensor(
            [p], [torch.randn(6, 5)], [torch.zeros(6, 5)], [torch.zeros(6, 5)], [keep], [0], [True], lr=1e-3, beta1=0.9,
            beta2=0.999, eps=1e-6, weight_decay=0.0, penalty=20.0, masks_active=True),
    }


@pytest.mark.parametrize("backend", ["auto", *BACKENDS_HERE])
@pytest.mark.parametrize("keep, fragment", [
    (torch.tensor([1, 0, 1, 1, 0, 1]), "a torch.int64 tensor of shape (6,)"),  # 0/1 integers would index, not mask
    (torch.ones(4, dtype=torch.bool), "a torch.bool tensor of shape (4,)"),
    (torch.ones(2, 3, dtype=torch.bool), "a torch.bool tensor of shape (2, 3)"),
])
def test_a_keep_mask_that_is_not_a_bool_mask_over_the_channels_is_refused(backend, keep, fragment):
    previous = wid_kernels.get_backend()
    wid_kernels.set_backend(backend)
    try:
        for op, call in _bad_mask_calls(keep).items():
            with pytest.raises(ValueError, match="must be a 1-D bool mask over 6 channels") as error:
                call()
            assert str(error.value).startswith(op) and fragment in str(error.value), op
        good = torch.tensor([True, False, True, True, False, True])
        assert wid_kernels.fold(torch.eye(6), torch.randn(6, 5), torch.eye(5), None, good, None)[0].shape == (4, 5)
    finally:
        wid_kernels.set_backend(previous)


@pytest.mark.parametrize("axis", [2, -1])
def test_a_keep_axis_outside_the_parameter_is_refused(axis):
    """The backends read the axis as given: -1 would mask rows where the caller meant columns."""
    p = torch.randn(5, 5)
    with pytest.raises(ValueError, match=rf"keep_axes\[0\] = {axis} is not an axis \(0 to 1\) of a 2-D parameter"):
        wid_kernels.wid_adamw_multi_tensor([p], [torch.randn(5, 5)], [torch.zeros(5, 5)], [torch.zeros(5, 5)],
                                           [torch.ones(5, dtype=torch.bool)], [axis], [True], lr=1e-3, beta1=0.9, beta2=0.999,
                                           eps=1e-6, weight_decay=0.0, penalty=20.0, masks_active=True)
