"""Small helpers shared by the Triton ops: dtype mapping, interpreter detection, cached index lists."""
from __future__ import annotations

import contextlib
import os
import weakref

import torch
import triton.language as tl

# Under TRITON_INTERPRET=1 kernels run on CPU tensors via numpy, which gets bf16 arithmetic wrong. Every
# elementwise kernel casts to fp32 right after the load anyway; the GEMM kernel's COMPUTE dtype becomes
# fp32 for bf16 only in the interpreter, so on a GPU bf16 operands stay bf16 for the tensor cores.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def upcast_needed(*dtypes) -> bool:
    """True where a kernel must compute in fp32 instead of the storage dtype (bf16 in the interpreter)."""
    return INTERPRET and any(d == torch.bfloat16 for d in dtypes)


def runs_here(*tensors) -> bool:
    """True where the kernels can take these tensors: compiled Triton reads CUDA memory only (a CPU tensor's pointer
    is refused at launch), the interpreter reads CPU tensors. The ops hand the others to the torch backend or the
    reference, as the CUDA extension does, so `set_backend("triton")` with a model on the CPU still runs."""
    return INTERPRET or all(t is None or t.is_cuda for t in tensors)


def dot_precision(dtype) -> str:
    """fp32 GEMMs follow torch's TF32 switch, so the backend is as exact as torch.matmul by default."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


_index_cache: dict = {}  # id(mask) -> (weakref to mask, version, indices); tensors are not hashable by value


def kept_indices(keep: torch.Tensor) -> torch.Tensor:
    """int32 indices of the True entries of a 1-D bool mask, cached per mask tensor and version.

    `nonzero` synchronises a GPU with the host; masks change only every `w_step` steps, so the
    list is computed once per change instead of once per linear per step.
    """
    key = id(keep)
    hit = _index_cache.get(key)
    if hit is not None and hit[0]() is keep and hit[1] == keep._version:
        return hit[2]
    idx = torch.nonzero(keep.reshape(-1), as_tuple=False).reshape(-1).to(torch.int32)
    _index_cache[key] = (weakref.ref(keep, lambda _, key=key: _index_cache.pop(key, None)), keep._version, idx)
    return idx


# Kernels reduce with tl.reduce(x, axis, SUM) instead of tl.sum, and use tl.full / inline cdiv instead of
# tl.zeros / tl.cdiv: those library helpers are @jit functions, made interpreted or compiled when triton
# is first imported, so in a process that imported triton before TRITON_INTERPRET was set (e.g. via
# transformers) they cannot run under the interpreter. The interpreter recognises this combiner and
# reduces with numpy; compiled, it is exactly what tl.sum uses.
SUM = tl.standard._sum_combine


def launch(kernel, grid, like: torch.Tensor, *args, **meta):
    """`kernel[grid](*args, **meta)` on the GPU that holds `like`, not on the current one: a model moved with
    `.to("cuda:1")` without `torch.cuda.set_device` would otherwise get kernels launched on cuda:0 with its pointers."""
    guard = torch.cuda.device(like.device) if like.is_cuda else contextlib.nullcontext()
    with guard:
        return kernel[grid](*args, **meta)
