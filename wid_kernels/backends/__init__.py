"""Kernel backends. Each module exposes any subset of the op functions of `wid_kernels.reference`;
what a backend does not implement falls back to the fold-first `torch` backend, then the reference
(the bitsandbytes "default" idea)."""
