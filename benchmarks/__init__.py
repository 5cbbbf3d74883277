"""pytest-benchmark suites of the WID ops and training step; `python benchmarks/report.py` writes RESULTS.md.

A package so the suites can share `benchmarks.conftest` by import and the step suite can re-run
itself in a subprocess (`python -m benchmarks.test_bench_step`) to measure peak memory.
"""
