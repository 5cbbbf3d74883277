"""NaN-filled allocations inside the Triton launcher modules, so an element a kernel does not write shows up."""
import torch


class PoisoningTorch:
    """Stands in for `torch` inside the launcher modules: empty/empty_like return NaN-filled floats."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty(self, *args, **kwargs):
        return self._poison(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._poison(torch.empty_like(*args, **kwargs))


def poison_allocations(monkeypatch, modules) -> None:
    for module in modules:
        monkeypatch.setattr(module, "torch", PoisoningTorch())
