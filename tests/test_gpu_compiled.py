"""On a GPU the tests run the compiled kernels they name: no interpreter, CUDA tensors, compiled Triton functions."""
import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_the_triton_interpreter_is_off():
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


def test_the_triton_kernels_are_compiled_functions():
    import importlib

    import triton

    # the modules, not the package's names: `triton_ops.fold` and `.masked_layer_norm` are the ops (functions)
    fold, masked_layer_norm, wid_adamw = (importlib.import_module(f"wid_kernels.backends.triton_ops.{name}")
                                          for name in ("fold", "masked_layer_norm", "wid_adamw"))

    kernels = [fold._gather_gemm_kernel, masked_layer_norm._mln_forward_kernel, masked_layer_norm._mln_backward_kernel,
               wid_adamw._wid_adamw_kernel]
    for kernel in kernels:
        assert isinstance(kernel, triton.runtime.jit.JITFunction), type(kernel)
        assert type(kernel).__name__ != "InterpretedFunction"


def test_auto_uses_compiled_kernels_on_the_gpu():
    import wid_kernels

    choices = wid_kernels.backends_in_use("cuda")
    assert choices["compacted_linear"][0] in ("triton", "torch") and choices["masked_layer_norm"][0] in ("cuda", "triton")
    x = torch.randn(4, 33, 19, device="cuda")
    y = wid_kernels.masked_layer_norm(x, None, torch.ones(19, device="cuda"), torch.zeros(19, device="cuda"), None, 1e-5)
    assert y.is_cuda
