"""The `triton` backend: fused WID ops written in Triton (DESIGN.md "Ops"), one file per op.

Importing raises ImportError with the reason when the kernels cannot run here (no triton, or no
CUDA GPU and no `TRITON_INTERPRET=1`), so `wid_kernels.available_backends()` reports it and `auto`
skips this backend. Ops not defined here fall back to the reference.
"""
from __future__ import annotations

import os

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the install
    raise ImportError(f"triton is not installed or broken ({type(exc).__name__}: {exc})") from exc

import torch

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
    raise ImportError("no CUDA GPU visible and TRITON_INTERPRET is not set")

from ._common import INTERPRET  # noqa: E402
from .compacted_linear import compacted_linear  # noqa: E402
from .fold import fold  # noqa: E402
from .masked_layer_norm import masked_layer_norm  # noqa: E402
from .wid_adamw import wid_adamw_multi_tensor  # noqa: E402

__all__ = ["compacted_linear", "fold", "masked_layer_norm", "wid_adamw_multi_tensor", "runs_on"]


def runs_on(device: torch.device) -> str | None:
    """None where `auto` may use these kernels: compiled, on a CUDA device (the interpreter is for tests only)."""
    if device.type != "cuda":
        return "its kernels take CUDA tensors"
    if INTERPRET:
        return "TRITON_INTERPRET is set: the kernels would be interpreted, not compiled"
    return None
