"""Which backend runs each op under `auto`: chosen per op, device and dtype, checked once, replaced on failure.

A fused kernel that has never run on a machine must not be able to spoil or stop a training run. So `auto`
walks an op's candidates (ORDER: the fastest first where it was measured, a stated default otherwise), skips
those that cannot run on the tensor's device, and checks each one once against the reference on a small input
(`self_check`) before using it. A candidate that fails the check, or raises when it is called, is dropped for
that op with one warning naming the op, the backend and the reason, and the next one takes over. Explicitly
chosen backends (`set_backend("triton")`, WID_BACKEND=torch) are used as they are: no check, no fallback.
"""
from __future__ import annotations

import warnings

import torch

from . import reference

OPS = ("compacted_linear", "fold", "masked_layer_norm", "wid_adamw_multi_tensor")

# Candidates of `auto` per op, fastest first. On a CUDA device this is a stated default until a GPU
# measurement ranks them (benchmarks/RESULTS.md); on the CPU Triton is only its interpreter and the
# extension's C++ kernels measured slower than torch's own ops (RESULTS.md: LayerNorm 4.8 vs 0.8 ms,
# optimizer 193 vs 75 ms), so the CPU gets the torch backend and the reference.
ORDER = {
    "cuda": {
        "compacted_linear": ("triton", "torch", "reference"),
        "fold": ("triton", "reference"),
        "masked_layer_norm": ("cuda", "triton", "reference"),
        "wid_adamw_multi_tensor": ("cuda", "triton", "reference"),
    },
    "cpu": {
        "compacted_linear": ("torch", "reference"),
        "fold": ("reference",),
        "masked_layer_norm": ("reference",),
        "wid_adamw_multi_tensor": ("reference",),
    },
}


class Selection:
    """The per-(op, device, dtype) choices of `auto`, with the reason for each and the candidates dropped."""

    def __init__(self, load):
        self._load = load  # backend name -> module or None (wid_kernels._load)
        self.chosen: dict = {}  # (op, device, dtype) -> (backend, function, reason)
        self.latest: dict = {}  # (op, device type) -> the function last chosen: what torch.compile traces
        self.dropped: dict = {}  # (op, device, dtype, backend) -> reason

    def reset(self) -> None:
        self.chosen.clear()
        self.dropped.clear()
        self.latest.clear()

    def _candidates(self, op: str, device: torch.device, dtype):
        """(backend, function or None, why not) for every candidate of `op` on `device`, in order."""
        for name in ORDER.get(device.type, ORDER["cpu"])[op]:
            module = reference if name == "reference" else self._load(name)
            if module is None:
                yield name, None, "unavailable"
                continue
            runs_on = getattr(module, "runs_on", None)
            why_not = runs_on(device) if runs_on is not None else None
            function = getattr(module, op, None)
            yield name, (function if why_not is None else None), why_not or ("" if function is not None else "no such op")

    def choose(self, op: str, device: torch.device, dtype) -> tuple:
        """(backend, function) for `op` on tensors of `device` and `dtype`: the first candidate that runs there and
        passes its self-check."""
        key = (op, device, dtype)
        hit = self.chosen.get(key)
        if hit is not None:
            return hit[0], hit[1]
        skipped = []
        for name, function, why_not in self._candidates(op, device, dtype):
            if function is None:
                skipped.append(f"{name} {why_not}")
                continue
            if (op, device, dtype, name) in self.dropped:
                skipped.append(f"{name} dropped")
                continue
            if name != "reference":
                from .self_check import self_check

                failure = self_check(op, function, device, dtype)
                if failure is not None:
                    self.drop(op, device, dtype, name, f"self-check: {failure}")
                    skipped.append(f"{name} failed its self-check")
                    continue
            reason = "self-check passed" if name != "reference" else "the reference"
            if skipped:
                reason += f" ({'; '.join(skipped)})"
            self.chosen[key] = (name, function, reason)
            self.latest[(op, device.type)] = function
            return name, function
        raise RuntimeError(f"no backend can run {op} on {device}")  # unreachable: the reference runs everywhere

    def drop(self, op: str, device: torch.device, dtype, backend: str, reason: str) -> None:
        """Stop using `backend` for `op` on this device and dtype, with one warning; the next candidate takes over."""
        key = (op, device, dtype)
        self.dropped[(*key, backend)] = reason
        if self.chosen.get(key, (None,))[0] == backend:
            del self.chosen[key]
        following = next((name for name, function, _ in self._candidates(op, device, dtype)
                          if function is not None and (*key, name) not in self.dropped), "reference")
        dtype_name = str(dtype).replace("torch.", "")
        warnings.warn(f"wid_kernels: {op} on the {backend} backend failed on {device} {dtype_name} ({reason}); "
                      f"using {following} for it", RuntimeWarning, stacklevel=4)

    def traced(self, op: str, device_type: str):
        """What torch.compile traces: the function chosen (and checked) in eager mode on this kind of device, else the
        first candidate that loads; no check and no fallback inside a compiled graph."""
        function = self.latest.get((op, device_type))
        if function is not None:
            return function
        for name in ORDER.get(device_type, ORDER["cpu"])[op]:
            module = reference if name == "reference" else self._load(name)
            if module is not None and getattr(module, op, None) is not None:
                return getattr(module, op)
        return getattr(reference, op)

    def call(self, op: str, like: torch.Tensor, *args):
        """Run `op` on the chosen backend; if it raises, drop it and run the next one. When every candidate raises
        (bad input, not a broken kernel), the first error is re-raised and nothing is dropped."""
        if torch.compiler.is_compiling():
            return self.traced(op, like.device.type)(*args)
        device, dtype = like.device, like.dtype
        name, function = self.choose(op, device, dtype)
        if name == "reference":
            return function(*args)
        try:
            return function(*args)
        except Exception as first:  # noqa: BLE001 - any failure of a fused kernel falls back
            failed = [name]
            for candidate, fallback, _ in self._candidates(op, device, dtype):
                if fallback is None or candidate in failed or (op, device, dtype, candidate) in self.dropped:
                    continue
                try:
                    result = fallback(*args)
                except Exception:  # noqa: BLE001
                    failed.append(candidate)
                    continue
                reason = (str(first).strip().splitlines() or [""])[0][:200]
                for broken in failed:
                    self.drop(op, device, dtype, broken, f"{type(first).__name__}: {reason}")
                return result
            raise first

    def table(self, device: torch.device, dtype=torch.float32) -> dict:
        """{op: (backend, reason)} on `device`, choosing (and self-checking) where not done yet."""
        out = {}
        for op in OPS:
            name, _ = self.choose(op, device, dtype)
            out[op] = (name, self.chosen[(op, device, dtype)][2])
        return out
