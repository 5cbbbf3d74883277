"""The benchmark run's order and time budget (benchmarks/conftest.py) and the GPU targets of benchmarks/report.py.

The first GPU run has one command of at most 10 minutes, far less than the full BERT-base sweep needs: the
decisive numbers must come first, a spent budget must still leave a report, and the report must say which
targets the measured numbers meet.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import report  # noqa: E402
from benchmarks.conftest import COMPILE_ALLOWANCE_S, PRIORITY, expected_seconds  # noqa: E402


def _pytest_benchmarks(*args, plugin_dir=None, timeout=600):
    path = [str(REPO_ROOT), str(plugin_dir or ""), os.environ.get("PYTHONPATH")]
    # a child of an xdist worker must not look like one: pytest-benchmark disables itself under PYTEST_XDIST_WORKER
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, path))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _collected(*args):
    done = _pytest_benchmarks("benchmarks", "--collect-only", "-q", *args)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return [line for line in done.stdout.splitlines() if "::" in line]


def _test_and_point(node_id):
    """('test_fold', 'cuda-bert-base-768x3072-kept1-bf16') and the provider, from a node id."""
    name, params = node_id.split("::")[1].rstrip("]").split("[")
    point, _, provider = params.rpartition("-")
    return name, point, provider


def test_the_full_gpu_sweep_runs_the_decisive_benchmarks_first():
    ids = _collected("--wid-sweep", "full", "--wid-device", "cuda")
    parsed = [_test_and_point(i) for i in ids]
    # the bf16 GEMM and copy ceilings, then the BERT-base step at 128 x 128 tokens, every provider
    assert parsed[0][:2] == ("test_ceiling_gemm", "cuda-bert-base") and ids[0].endswith("-bf16]")
    assert parsed[1][0] == "test_ceiling_copy"
    assert [p for _, _, p in parsed[2:7]] == ["reference", "torch", "triton", "cuda", "plain"]
    assert all(name == "test_training_step" and "batch128" in point for name, point, _ in parsed[2:7])
    # round 0: one point of every test, in PRIORITY order, before any test's second point
    first_seen = []
    for name, _, _ in parsed:
        if name not in first_seen:
            first_seen.append(name)
    assert first_seen == list(PRIORITY)
    second_point_of_any = min(i for i, (name, point, _) in enumerate(parsed)
                              if point != next(q for n, q, _ in parsed if n == name))
    assert set(name for name, _, _ in parsed[:second_point_of_any]) == set(PRIORITY)
    # the matmul ops' first points are bf16 (the training dtype), LayerNorm's and the optimizer's fp32
    first_point = {name: point for name, point, _ in reversed(parsed)}
    assert first_point["test_fold"].endswith("-bf16") and first_point["test_compacted_linear_forward_backward"].endswith("-bf16")
    assert first_point["test_wid_adamw_step"].endswith("-fp32")
    assert first_point["test_masked_layer_norm_forward_backward"].endswith("-fp32")
    # a point's providers are adjacent; torch.compile comes after everything else
    seen, previous = set(), None
    for name, point, _ in parsed:
        if (name, point) != previous:
            assert (name, point) not in seen or parsed[-1][2] == "torch_compile", f"{name}[{point}] is split"
            previous = (name, point)
            seen.add(previous)
    providers = [p for _, _, p in parsed]
    first_compiled = providers.index("torch_compile")
    assert all(p == "torch_compile" for p in providers[first_compiled:])
    assert len(ids) == len(set(ids))


CLOCK_JUMP = """
import sys


def pytest_runtest_teardown(item):  # after the first benchmark, the session has "run" for 11 days
    session = sys.modules["benchmarks.conftest"]._session
    if not session.get("jumped"):
        session["started"] -= 1e6
        session["jumped"] = True
"""


def _ceilings_under_a_budget(tmp_path, plugin: str, source: str):
    """The three CPU ceiling benchmarks with a 600 s budget and `source` as plugin `plugin`: (pytest stdout, JSON)."""
    (tmp_path / f"{plugin}.py").write_text(source)
    json_path = tmp_path / "run.json"
    done = _pytest_benchmarks("benchmarks/test_bench_ops.py", "-q", "-rs", "-p", plugin, "-k", "ceiling",
                              "--wid-device", "cpu", "--wid-sweep", "quick", "--wid-time-budget", "600",
                              f"--benchmark-json={json_path}", plugin_dir=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    data = json.loads(json_path.read_text())
    return done.stdout, sorted(b["name"] for b in data["benchmarks"]), data["wid"]


def test_a_spent_time_budget_skips_the_rest_and_still_writes_the_json(tmp_path):
    stdout, measured, wid = _ceilings_under_a_budget(tmp_path, "clock_jump", CLOCK_JUMP)
    assert "1 passed, 2 skipped" in stdout and "not measured: the --wid-time-budget of 600 s was spent" in stdout
    assert measured == ["test_ceiling_gemm[cpu-tiny-bf16]"]  # the decisive one first
    assert wid["time_budget_s"] == 600
    assert sorted(Path(n).name for n in wid["not_measured"]) == [
        "test_bench_ops.py::test_ceiling_copy[cpu-tiny]", "test_bench_ops.py::test_ceiling_gemm[cpu-tiny-fp32]"]


LONG_GEMM = """
import sys


def pytest_runtest_teardown(item):  # the first GEMM ceiling "took" 1000 s: the next one cannot fit in 600
    conftest = sys.modules["benchmarks.conftest"]
    conftest._session["longest"][conftest._kind(item)] = 1000.0
"""


def test_a_benchmark_expected_to_outlast_the_budget_is_not_started(tmp_path):
    stdout, measured, wid = _ceilings_under_a_budget(tmp_path, "long_gemm", LONG_GEMM)
    assert "2 passed, 1 skipped" in stdout and "and such a benchmark takes 1000 s" in stdout
    assert measured == ["test_ceiling_copy[cpu-tiny]", "test_ceiling_gemm[cpu-tiny-bf16]"]
    assert [Path(n).name for n in wid["not_measured"]] == ["test_bench_ops.py::test_ceiling_gemm[cpu-tiny-fp32]"]


def test_the_expected_time_of_a_benchmark():
    longest = {("test_fold", "triton"): 4.0, ("test_fold", "reference"): 9.0, ("test_training_step", "plain"): 2.0}
    assert expected_seconds(("test_fold", "triton"), longest) == 4.0  # its own kind
    assert expected_seconds(("test_fold", "cuda"), longest) == 9.0  # unseen provider: the longest of its test
    assert expected_seconds(("test_wid_adamw_step", "torch"), longest) == 0.0  # nothing known: start it
    assert expected_seconds(("test_fold", "torch_compile"), longest) == COMPILE_ALLOWANCE_S


def test_a_budget_spent_before_the_first_benchmark_is_one_clear_error(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/report.py", "--cpu", "--quick", "--time-budget", "1e-9", "--",
                           "-k", "ceiling"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("report.py: no benchmark ran")


def _row(op, mode, provider, time_ms, **extra):
    return dict(op=op, mode=mode, provider=provider, time_ms=time_ms, case="cuda-bert-base", device="cuda", **extra)


def _gpu_rows(triton_step_ms=90.0, fold_ms=0.05):
    step = dict(model="12x768 (heads 12, FFN 3072)", batch=128, tokens=16384, dtype="bf16")
    gib = 1024.0
    rows = [
        _row("ceiling", "gemm", "ceiling", 1.0, dtype="bf16", flops=10 ** 9),  # 1e12 FLOP/s
        _row("ceiling", "copy", "ceiling", 1.0, dtype=None, bytes=4 * 10 ** 9),  # 4e12 B/s
        _row("training_step", "bf16", "reference", 300.0, peak_memory_mib=20 * gib, **step),
        _row("training_step", "bf16", "triton", triton_step_ms, peak_memory_mib=10 * gib, **step),
        _row("training_step", "bf16", "cuda", 120.0, peak_memory_mib=11 * gib, **step),
        _row("training_step", "bf16", "plain", 80.0, peak_memory_mib=8 * gib, **step),
    ]
    fold_flops = int(0.6 * 1e12 * 0.05e-3)  # 60 % of the GEMM rate at 0.05 ms
    rows += [_row("fold", "forward", p, t, shape="768x3072", dtype="bf16", kept=1.0, flops=fold_flops)
             for p, t in (("reference", 0.2), ("triton", fold_ms), ("limit", 0.04))]
    ln_bytes = int(0.9 * 4e12 * 1e-3)  # 90 % of copy at 1 ms
    rows += [_row("masked_layer_norm", "forward+backward", p, t, shape="16384x768", tokens=16384, dtype="fp32",
                  kept=k, bytes=ln_bytes) for p, t, k in (("cuda", 1.0, 1.0), ("triton", 1.2, 1.0), ("cuda", 1.0, 0.5))]
    return rows


def _verdicts(rows, meta=None):
    """The lines of the report's Target section."""
    text = report.render({"wid": meta or {}}, rows, "gpu")
    section = text.split("### Target\n", 1)[1].split("\n###", 1)[0]
    return [line for line in section.splitlines() if line.startswith("- ")]


def test_the_gpu_report_says_which_targets_the_measured_numbers_meet():
    lines = _verdicts(_gpu_rows())
    joined = "\n".join(lines)
    assert "3.33× the reference's 300 ms (target ≥ 3×: **met**)" in joined
    assert "0.50× the reference's 20.00 GiB (target ≤ 0.6×: **met**)" in joined
    assert "1.12× the plain BERT step's 80 ms (target ≤ 1.3×: **met**)" in joined
    assert "fastest backend `triton` 90 ms" in joined
    fold = next(line for line in lines if line.startswith("- fold"))
    assert "60% of the measured bf16 GEMM rate" in fold and "**NOT met**" in fold
    norm = next(line for line in lines if line.startswith("- masked_layer_norm"))
    assert "worst of 2 points: 90% of the measured copy bandwidth" in norm and "**met**" in norm
    optimizer = next(line for line in lines if line.startswith("- wid_adamw"))
    assert "not measured" in optimizer

    slow = "\n".join(_verdicts(_gpu_rows(triton_step_ms=200.0, fold_ms=0.02)))
    assert "fastest backend `cuda` 120 ms: 2.50× the reference's 300 ms (target ≥ 3×: **NOT met**)" in slow
    assert "1.50× the plain BERT step's 80 ms (target ≤ 1.3×: **NOT met**)" in slow
    assert "150% of the measured bf16 GEMM rate" in slow and "target ≥ 70%: **met**" in slow


def test_the_report_counts_what_the_budget_left_unmeasured():
    meta = {"time_budget_s": 300.0, "not_measured": ["a", "b", "c"]}
    text = report.render({"wid": meta}, _gpu_rows(), "gpu")
    assert "- Not measured: 3 benchmarks, skipped when what was left of the session's time budget (300 s) could not hold them" in text
    assert "Not measured" not in report.render({"wid": {"not_measured": []}}, _gpu_rows(), "gpu")


def test_a_benchmark_stopped_before_its_first_round_is_dropped_before_saving():
    """gpu_check stops a step at its limit with SIGINT; a benchmark caught before any timed round has empty stats,
    on which pytest-benchmark's JSON writer fails: the session-finish hook drops it first, so the rest is saved."""
    from types import SimpleNamespace

    from benchmarks import conftest as bench_conftest

    class Timed:  # as pytest-benchmark's Metadata: true when it has timed rounds
        def __init__(self, rounds):
            self.rounds = rounds

        def __bool__(self):
            return bool(self.rounds)

    benchmarks = [Timed([1.0]), Timed([]), Timed([2.0, 3.0])]
    session = SimpleNamespace(config=SimpleNamespace(_benchmarksession=SimpleNamespace(benchmarks=benchmarks)))
    finishing = bench_conftest.pytest_sessionfinish(session, 2)
    next(finishing)  # the part before pytest-benchmark's own session finish (which saves)
    assert [bench.rounds for bench in benchmarks] == [[1.0], [2.0, 3.0]]
