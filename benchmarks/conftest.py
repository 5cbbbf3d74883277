"""Shared fixtures of the benchmark suites: sizes per device, providers, timing, and what each result records.

Every benchmark measures one op (or one training step) under one *provider*, and the providers of
the same point run side by side in one session, so `report.py` can divide by the reference of the
same run (DESIGN.md "Performance model"):

    reference      wid_kernels' `reference` backend: compactors applied to the activations, the authors' way
    torch          the `torch` backend (fold-first with torch matmuls)
    torch_compile  torch.compile of the torch backend's op
    triton, cuda   the compiled backends, where `wid_kernels.available_backends()` says they can run
    limit          the same shapes with no compactors: plain GEMM / LayerNorm / torch.optim.AdamW

Sizes come in *cases*, one per device, so the BERT-base sizes never run on a CPU:

    cpu-minilm, cuda-bert-base   the full sweep (`report.py` runs it)
    cpu-tiny,   cuda-tiny        the quick sweep: same code, tiny shapes (used by --benchmark-disable, i.e. CI)

Options: `--wid-sweep {auto,quick,full}` (auto: quick under --benchmark-disable, else full),
`--wid-device {all,cpu,cuda}` and `--wid-time-budget SECONDS`. CPU runs are timed with pytest-benchmark's
own clock; CUDA runs also with `triton.testing.do_bench`, reported through `benchmark.extra_info["time_ms"]`.

The full BERT-base sweep takes far longer than one GPU check may run, so benchmarks run most decisive
first (`PRIORITY`: the ceilings, the training step, fold, optimizer, LayerNorm, compacted_linear; bf16 and the
largest sizes first; torch.compile, which compiles for every point, last), the providers of one point next to
each other; once the time budget is spent, or less of it is left than a benchmark of that kind has taken, the
benchmark is skipped as "not measured", so the session still ends normally and its JSON (what `report.py` reads) holds everything measured so far.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

import wid_kernels
from wid.speed import device_name

# Denormals otherwise dominate optimizer time on the CPU. Switched on at import, before torch starts its
# worker threads (new threads inherit the caller's floating-point mode), and again before every test.
torch.set_flush_denormal(True)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OP_PROVIDERS = ("reference", "torch", "torch_compile", "triton", "cuda", "limit")
STEP_PROVIDERS = ("reference", "torch", "triton", "cuda", "plain")
ROUNDS, WARMUP_ROUNDS = 3, 1  # CPU: each op takes 10 ms to 10 s here, so a few rounds are enough
OPS = ("compacted_linear", "fold", "masked_layer_norm", "wid_adamw_multi_tensor")
SMALL_OP_MS = 0.1  # GPU forward-only ops below this are also timed as a CUDA graph (launch overhead hidden)


@dataclass(frozen=True)
class ModelShape:
    """A BERT encoder shape (random init is enough: only speed and memory are measured)."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int = 30522

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, out, in) of the compacted linears of one encoder layer."""
        h, f = self.hidden, self.intermediate
        return [("query", h, h), ("key", h, h), ("value", h, h), ("attention.output", h, h),
                ("intermediate", f, h), ("output", h, f)]


@dataclass(frozen=True)
class Case:
    """The sizes one device runs: per-op shapes and token counts, and the model of the step suite."""

    name: str
    device: str
    linears: tuple  # (out, in) weight shapes of the per-op suite
    tokens: tuple  # N of the per-op suite
    kept: tuple  # kept fractions (1.0: masks not active yet)
    dtypes: tuple
    model: ModelShape
    batches: tuple  # step suite: sequences per batch
    seq_len: int
    step_precision: str  # step suite: "fp32" or "bf16" (autocast)
    gemm_ceiling: int  # n of the n×n×n GEMM that measures the device's FLOP ceiling
    copy_ceiling_mib: int  # size of the copy that measures its memory bandwidth


MINILM = ModelShape(layers=6, hidden=384, heads=12, intermediate=1536)
BERT_BASE = ModelShape(layers=12, hidden=768, heads=12, intermediate=3072)
TINY = ModelShape(layers=1, hidden=64, heads=4, intermediate=256, vocab=1000)

FULL = {
    "cpu": Case("cpu-minilm", "cpu", ((384, 384), (1536, 384), (384, 1536)), (4096,), (1.0, 0.5, 0.25),
                ("fp32", "bf16"), MINILM, (32,), 128, "fp32", 2048, 512),
    "cuda": Case("cuda-bert-base", "cuda", ((768, 768), (3072, 768), (768, 3072)), (4096, 8192, 16384),
                 (1.0, 0.5, 0.25), ("fp32", "bf16"), BERT_BASE, (32, 128), 128, "bf16", 8192, 4096),
}
QUICK = {  # every code path once, small enough that CI's --benchmark-disable run stays well under 3 minutes
    "cpu": Case("cpu-tiny", "cpu", ((256, 64),), (512,), (1.0, 0.5), ("fp32", "bf16"), TINY, (4,), 32, "fp32", 256, 4),
    "cuda": Case("cuda-tiny", "cuda", ((256, 64),), (512,), (1.0, 0.5), ("fp32", "bf16"), TINY, (4,), 32, "bf16", 256, 4),
}


def pytest_addoption(parser):
    group = parser.getgroup("wid benchmarks")
    group.addoption("--wid-sweep", choices=("auto", "quick", "full"), default="auto",
                    help="benchmark sizes: quick (tiny shapes, every code path) or full; auto: quick under --benchmark-disable")
    group.addoption("--wid-device", choices=("all", "cpu", "cuda"), default="all",
                    help="run only the cases of this device (GPU cases are skipped where no GPU is visible)")
    group.addoption("--wid-time-budget", type=float, default=0.0, metavar="SECONDS",
                    help="skip the benchmarks still to run once the session has run this long (0: no limit); "
                         "the most decisive run first")


# ------------------------------------------------------------------------------------------ run order and budget
# Tests in the order a short session should measure them, one point of each per round.
PRIORITY = ("test_ceiling_gemm", "test_ceiling_copy", "test_training_step", "test_fold", "test_wid_adamw_step",
            "test_masked_layer_norm_forward_backward", "test_compacted_linear_forward_backward",
            "test_masked_layer_norm_forward", "test_compacted_linear_forward")
PROVIDER_ORDER = OP_PROVIDERS + tuple(p for p in STEP_PROVIDERS if p not in OP_PROVIDERS)
# The dtype an op runs in during bf16-autocast training, measured first: the matmul ops in bf16, LayerNorm in fp32
# (as torch's own under autocast), the optimizer on the fp32 master weights.
TRAINING_DTYPE = {"test_masked_layer_norm_forward_backward": "fp32", "test_masked_layer_norm_forward": "fp32",
                  "test_wid_adamw_step": "fp32"}
# A torch.compile benchmark compiles the whole point first: never started with less than this left.
COMPILE_ALLOWANCE_S = 90.0
_session = {"started": None, "budget": 0.0, "not_measured": [], "longest": {}, "running": {}}


def _params(item) -> dict:
    return dict(getattr(getattr(item, "callspec", None), "params", {}))


def _point(item) -> tuple:
    """Where a benchmark's point ranks within its test: the op's training dtype first, then the largest sizes and
    batches, fewest pruned channels first (the BERT-base step's shapes before the small ones)."""
    params = _params(item)
    shape = params.get("shape", (0, 0))
    first_dtype = TRAINING_DTYPE.get(item.originalname, "bf16")
    return (params.get("dtype", first_dtype) != first_dtype, -params.get("tokens", 0), -params.get("batch", 0),
            -(shape[0] * shape[1]), tuple(shape), -params.get("kept", 1.0))


def run_order(items) -> list:
    """`items` in measuring order: round r holds the r-th point of every test (in PRIORITY order), each point's
    providers together in PROVIDER_ORDER; torch.compile, which compiles anew for every point, after all the rest."""
    points: dict = {}
    for item in items:
        points.setdefault(item.originalname, set()).add(_point(item))
    ranks = {name: {point: rank for rank, point in enumerate(sorted(found))} for name, found in points.items()}

    def key(item):
        name, provider = item.originalname, _params(item).get("provider", "")
        return (provider == "torch_compile", ranks[name][_point(item)],
                PRIORITY.index(name) if name in PRIORITY else len(PRIORITY), name,
                PROVIDER_ORDER.index(provider) if provider in PROVIDER_ORDER else len(PROVIDER_ORDER))

    return sorted(items, key=key)


def pytest_collection_modifyitems(session, config, items):
    """Reorder this folder's benchmarks by `run_order` (other items keep their places); start the budget's clock."""
    here = os.path.dirname(os.path.abspath(__file__))
    slots = [i for i, item in enumerate(items) if os.path.abspath(str(item.fspath)).startswith(here + os.sep)]
    for slot, item in zip(slots, run_order([items[i] for i in slots])):
        items[slot] = item
    _session.update(started=time.monotonic(), budget=config.getoption("--wid-time-budget", 0.0) or 0.0,
                    not_measured=[], longest={}, running={})


def _kind(item) -> tuple[str, str]:
    return item.originalname, _params(item).get("provider", "")


def expected_seconds(kind: tuple[str, str], longest: dict) -> float:
    """What a benchmark of `kind` (test, provider) will take: the longest of that kind so far, else the longest of
    its test, else 0 (nothing known: start it); a torch.compile one at least COMPILE_ALLOWANCE_S."""
    name, provider = kind
    seen = longest.get(kind) or max((s for (n, _), s in longest.items() if n == name), default=0.0)
    return max(seen, COMPILE_ALLOWANCE_S) if provider == "torch_compile" else seen


def pytest_runtest_setup(item):
    """Past the time budget, or with less of it left than this benchmark is expected to take: skip, and note it as
    not measured (report.py says how many). A benchmark started near the end must not overrun the caller's limit
    (gpu_check.sh kills the step there, and with it the whole report)."""
    budget, started = _session["budget"], _session["started"]
    if budget > 0 and started is not None:
        left = budget - (time.monotonic() - started)
        expected = expected_seconds(_kind(item), _session["longest"])
        why = (f"the --wid-time-budget of {budget:g} s was spent" if left <= 0 else
               f"{left:.0f} s of the --wid-time-budget left, and such a benchmark takes {expected:.0f} s"
               if expected > left else None)
        if why:
            _session["not_measured"].append(item.nodeid)
            pytest.skip(f"not measured: {why}")
    _session["running"][item.nodeid] = (_kind(item), time.monotonic())


def pytest_runtest_logreport(report):
    """After a benchmark's teardown: remember how long it took (setup to teardown) for `expected_seconds`."""
    if report.when == "teardown" and report.nodeid in _session["running"]:
        kind, began = _session["running"].pop(report.nodeid)
        took = time.monotonic() - began
        _session["longest"][kind] = max(took, _session["longest"].get(kind, 0.0))


def selected_cases(config) -> list[Case]:
    sweep = config.getoption("--wid-sweep")
    if sweep == "auto":
        sweep = "quick" if config.getoption("benchmark_disable", False) else "full"
    cases = QUICK if sweep == "quick" else FULL
    wanted = config.getoption("--wid-device")
    return [case for device, case in cases.items() if wanted in ("all", device)]


def pytest_generate_tests(metafunc):
    """Parametrize `case` and the axes that live inside it (shape, tokens, kept, dtype, batch) together."""
    if "case" not in metafunc.fixturenames:
        return
    axes = [name for name in ("shape", "tokens", "kept", "dtype", "batch") if name in metafunc.fixturenames]
    points, ids = [], []
    for case in selected_cases(metafunc.config):
        values = {"shape": case.linears, "tokens": case.tokens, "kept": case.kept, "dtype": case.dtypes,
                  "batch": case.batches}
        combos = [()]
        for axis in axes:
            combos = [combo + (value,) for combo in combos for value in values[axis]]
        for combo in combos:
            points.append((case,) + combo)
            ids.append("-".join([case.name] + [_axis_id(axis, value) for axis, value in zip(axes, combo)]))
    metafunc.parametrize(["case"] + axes, points, ids=ids)


def _axis_id(axis, value) -> str:
    if axis == "shape":
        return f"{value[0]}x{value[1]}"
    if axis == "tokens":
        return f"N{value}"
    if axis == "kept":
        return f"kept{value:g}"
    if axis == "batch":
        return f"batch{value}"
    return str(value)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """A run stopped by SIGINT (gpu_check's time limit) in the middle of a benchmark leaves it without a timed round,
    on which pytest-benchmark's JSON writer fails (and so nothing is written): drop those before it saves."""
    benchmark_session = getattr(session.config, "_benchmarksession", None)
    if benchmark_session is not None:
        benchmark_session.benchmarks[:] = [bench for bench in benchmark_session.benchmarks if bench]
    yield


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Put the exact command, versions, devices and commit into the JSON, so a report can be rebuilt from it alone."""
    import shlex
    import subprocess
    import sys

    def version(name):
        try:
            return __import__(name).__version__
        except Exception:  # an optional package that is absent or broken
            return None

    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=False,
                                  cwd=os.path.dirname(__file__)).stdout.strip()
        except Exception:
            return ""

    output_json["wid"] = dict(
        command=shlex.join(getattr(sys, "orig_argv", sys.argv)),
        report_command=os.environ.get("WID_REPORT_COMMAND"),
        sweep=[case.name for case in selected_cases(config)],
        versions=dict(python=platform.python_version(), torch=torch.__version__, triton=version("triton"),
                      transformers=version("transformers"), pytest_benchmark=version("pytest_benchmark")),
        devices=dict(cpu=device_name(torch.device("cpu")),
                     cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None),
        backends={name: reason or "available" for name, reason in wid_kernels.available_backends().items()},
        commit=git("rev-parse", "--short", "HEAD") or os.environ.get("WID_COMMIT", ""),  # a copy without .git: the caller's
        dirty=bool(git("status", "--porcelain", "--untracked-files=no")),
        time_budget_s=_session["budget"] or None,
        not_measured=list(_session["not_measured"]),
    )


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def device(case) -> torch.device:
    """The case's device; CUDA cases are skipped where no GPU is visible (they would take hours on a CPU)."""
    if case.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device(case.device)


@pytest.fixture(autouse=True)
def _quiet_machine_state():
    """Flush denormals on the CPU (they otherwise dominate optimizer time); restore the backend afterwards."""
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    before = wid_kernels.get_backend()
    yield
    wid_kernels.set_backend(before)


def backend_module(name: str):
    """The module of a wid_kernels backend, or skip the benchmark with the reason it cannot run here."""
    reason = wid_kernels.available_backends().get(name, f"unknown backend {name}")
    if reason is not None:
        pytest.skip(f"backend {name} unavailable: {reason}")
    import importlib

    return importlib.import_module(wid_kernels.BACKENDS[name])


def backend_op(provider: str, op_name: str, device: torch.device):
    """The function `provider` runs for `op_name`, with the backends' positional signature (see reference.py).

    A backend's own op, the reference's, or torch.compile of the torch backend's. Skips a backend
    that has no op of its own here: it would only run the reference again under another name.
    """
    from wid_kernels import reference

    if provider == "reference":
        return getattr(reference, op_name)
    if provider == "torch_compile":
        module = backend_module("torch")
        fn = getattr(module, op_name, None) or getattr(reference, op_name)
        torch._dynamo.reset()  # a fresh cache per benchmark: no recompile limit, no silent fallback to eager
        torch._dynamo.utils.counters.clear()
        return torch.compile(fn, dynamic=False)
    if provider == "triton" and device.type != "cuda":
        pytest.skip("triton on a CPU is the interpreter: a correctness tool, not a performance path")
    fn = getattr(backend_module(provider), op_name, None)
    if not callable(fn):
        pytest.skip(f"backend {provider} has no {op_name} of its own (it falls back to the reference)")
    return fn


def assert_compiled(provider: str) -> None:
    """torch.compile must have produced a graph; otherwise the 'compiled' number would be eager's."""
    if provider == "torch_compile":
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert graphs >= 1, "torch.compile captured no graph"


def record(benchmark, *, op: str, provider: str, case: Case, device: torch.device, shape=None, dtype=None,
           kept=None, tokens=None, flops=None, bytes=None, **extra) -> None:
    """Write what `report.py` needs into extra_info and group the providers of one point together."""
    benchmark.extra_info.update(
        op=op, provider=provider, case=case.name, device=device.type, device_name=device_name(device),
        shape=None if shape is None else "x".join(str(s) for s in shape), dtype=dtype, kept=kept, tokens=tokens,
        flops=flops, bytes=bytes, threads=torch.get_num_threads(), **extra,
    )
    point = [op, extra.get("mode", ""), case.name]
    for label, value in (("shape", benchmark.extra_info["shape"]), ("N", tokens), ("dtype", dtype), ("kept", kept)):
        if value is not None:
            point.append(f"{label}={value}")
    point += [f"{k}={v}" for k, v in extra.items() if k == "batch"]
    benchmark.group = " ".join(point)


def measure(benchmark, fn, device: torch.device, graphable: bool = False, warmup_rounds: int = WARMUP_ROUNDS):
    """Time `fn` and return its result (the last call's), for the caller to check.

    CPU: pytest-benchmark's clock, a few rounds after warm-up. CUDA: `triton.testing.do_bench`
    (median) into extra_info, plus a synchronized pytest-benchmark run so the host clock sees whole
    kernels; `graphable` ops (no host sync inside: no boolean-mask indexing) below SMALL_OP_MS are
    also timed as a CUDA graph, which hides launch overhead. Under --benchmark-disable: one call.
    """
    if device.type != "cuda" or benchmark.disabled:
        return benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=warmup_rounds)
    import triton.testing

    ms = triton.testing.do_bench(fn, return_mode="median")
    benchmark.extra_info.update(time_ms=ms, timer="triton.testing.do_bench median")
    if graphable and ms < SMALL_OP_MS:
        try:
            benchmark.extra_info["cudagraph_ms"] = triton.testing.do_bench_cudagraph(fn, return_mode="median")
        except RuntimeError as exc:  # e.g. a host sync inside the op: say so in the report, keep the do_bench time
            benchmark.extra_info["cudagraph_ms"] = None
            benchmark.extra_info["cudagraph_error"] = f"{type(exc).__name__}: {exc}"[:300]
            torch.cuda.synchronize(device)

    def synchronized():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return benchmark.pedantic(synchronized, rounds=ROUNDS, warmup_rounds=warmup_rounds)


def assert_finite(*tensors) -> None:
    for tensor in tensors:
        assert tensor is not None, "expected a tensor, got None"
        assert torch.isfinite(tensor).all(), "non-finite values in a benchmark output"


def random_keep(size: int, kept: float, device, seed: int = 0) -> torch.Tensor | None:
    """A keep-mask with round(kept·size) channels kept at random places; None for kept = 1.0 (masks off)."""
    if kept >= 1.0:
        return None
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(size, generator=generator)
    keep = torch.zeros(size, dtype=torch.bool)
    keep[order[: max(1, round(kept * size))]] = True
    return keep.to(device)
