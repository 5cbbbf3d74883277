"""`python -m wid_kernels.compile_report --arch 90`: every kernel lowered for the H100/H200 without a GPU, and
what its machine code says: bf16/fp16 GEMMs on tensor cores, no kernel spilling registers."""
import json
import re
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"kernel", "op", "dtype", "registers", "spills", "shared_bytes", "tensor_cores"}
OPS = {"compacted_linear", "fold", "masked_layer_norm", "wid_adamw_multi_tensor"}
GEMM_OPS = {"compacted_linear", "fold"}


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # interpreted kernels cannot be compiled
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "wid_kernels.compile_report", *args], env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def report():
    out = _run("--arch", "90")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_the_report_lists_every_triton_kernel_for_every_dtype(report):
    assert report and all(KEYS <= set(row) for row in report)
    assert {row["op"] for row in report} == OPS
    assert {row["dtype"] for row in report} == {"bf16", "fp16", "fp32"}
    # every @triton.jit function of the backend (read from the sources: here the kernels are interpreted objects)
    folder = os.path.join(ROOT, "wid_kernels", "backends", "triton_ops")
    sources = "".join(open(os.path.join(folder, name)).read() for name in os.listdir(folder) if name.endswith(".py"))
    kernels = set(re.findall(r"@triton\.jit[^\n]*\ndef (\w+)\(", sources))
    assert len(kernels) >= 4
    for dtype in ("bf16", "fp16", "fp32"):
        assert {row["kernel"] for row in report if row["source"] == "triton" and row["dtype"] == dtype} == kernels
    assert all(isinstance(row["registers"], int) and 0 < row["registers"] <= 255 for row in report)


def test_half_precision_gemms_use_tensor_cores(report):
    gemms = [row for row in report if row["op"] in GEMM_OPS and row["dtype"] in ("bf16", "fp16")]
    assert gemms and all(row["tensor_cores"] for row in gemms), [row["variant"] for row in gemms if not row["tensor_cores"]]
    # the detector tells them apart: fp32 GEMMs at torch's default (no TF32) run on the CUDA cores
    assert not any(row["tensor_cores"] for row in report if row["op"] in GEMM_OPS and row["dtype"] == "fp32")
    assert not any(row["tensor_cores"] for row in report if row["op"] not in GEMM_OPS)


def test_no_kernel_spills(report):
    assert [row for row in report if row["spills"]] == []


def test_the_extensions_cuda_kernels_are_listed_when_it_has_them(report):
    from wid_kernels import _C

    cuda_rows = [row for row in report if row["source"] == "cuda"]
    if getattr(_C, "cuda_built", False):  # built with CUDA here (CI builds for 8.0;9.0)
        assert {row["op"] for row in cuda_rows} == {"masked_layer_norm", "wid_adamw_multi_tensor"}
        assert {row["dtype"] for row in cuda_rows} == {"bf16", "fp16", "fp32"}
        # autocast's LayerNorm: a half-precision x beside the fp32 residual stream, added inside the kernels
        mixed = {(row["kernel"], row["dtype"]) for row in cuda_rows if "fp32 residual" in row["variant"]}
        assert mixed == {(k, d) for k in ("mln_fwd_kernel", "mln_bwd_kernel") for d in ("bf16", "fp16")}
    else:
        assert cuda_rows == []


def test_bad_arguments_are_one_line():
    out = _run("--arch", "52")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "--arch 52" in out.stderr
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "wid_kernels.compile_report"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "TRITON_INTERPRET" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_the_optimizer_kernel_is_light_enough_for_high_occupancy(report):
    """A bandwidth-bound kernel needs many warps in flight: the Triton AdamW took 238–252 registers with 64-bit
    offsets and divisions; with int32 indexing and 4 elements per thread it must stay at 64 or below."""
    adamw = [row for row in report if row["op"] == "wid_adamw_multi_tensor" and row["source"] == "triton"]
    assert adamw and max(row["registers"] for row in adamw) <= 64


# Threads per block and resident blocks each kernel is compiled for (csrc/wid_ops_cuda.cu's __launch_bounds__).
RESIDENT_THREADS = {"mln_fwd_kernel": (512, 2), "mln_bwd_kernel": (512, 2), "adamw_kernel": (256, 3)}


def test_the_extensions_memory_bound_kernels_keep_enough_threads_resident(report):
    """LayerNorm and AdamW move bytes, not FLOPs: they need many loads in flight, so at least 768 threads per SM
    (of 2048) must fit the 65536 registers; and no variant may buy that with spills (each a DRAM round trip). At 2048
    (32 registers) the 16-byte-vector variants spilled 72-200 bytes per thread."""
    from wid_kernels import _C

    if not getattr(_C, "cuda_built", False):
        assert [row for row in report if row["source"] == "cuda"] == []
        return
    cuda_rows = [row for row in report if row["source"] == "cuda"]
    assert len({row["variant"] for row in cuda_rows}) >= 2  # scalar and vectorised variants were both read
    assert {row["kernel"] for row in cuda_rows} == set(RESIDENT_THREADS)
    too_big = []
    for row in cuda_rows:
        threads, blocks = RESIDENT_THREADS[row["kernel"]]
        allocated = -(-row["registers"] // 8) * 8  # registers are allocated per thread in units of 8
        if threads * blocks < 768 or allocated * threads * blocks > 65536 or row["spills"]:
            too_big.append((row["kernel"], row["dtype"], row["variant"], row["registers"], row["spills"]))
    assert too_big == []
