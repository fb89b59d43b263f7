#!/usr/bin/env bash
# The GPU checks in one run, for a machine with CUDA and a Python that has torch (and torchdeq for
# the solver benchmark): the CUDA tests, the solver and Hamburger benchmarks on the GPU, then the
# core and layer tests on the GPU (EQUILIBRIA_TEST_DEVICE=cuda, see tests/conftest.py).
#
#   bash benchmarks/gpu_checks.sh [OUT_DIR]     # default OUT_DIR: benchmarks/results/gpu
#
# Every step has its own time limit and runs even when an earlier one fails; the log and the
# *-cuda result files end up in OUT_DIR (the Hamburger sweep of batch B in OUT_DIR/hamburger-bB;
# HAM_BATCHES="1 8" by default; HAM_BATCHES= skips the sweep; SOLVER_ARGS adds options to the solver
# benchmark, e.g. SOLVER_ARGS=--no-tf32). Run from the repository root.
set -u
out=${1:-benchmarks/results/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
pytest_args=(-q -p no:cacheprovider -o addopts= -m "not slow" -rfE)

step() {  # step SECONDS NAME COMMAND...: SIGINT at the limit, so pytest still prints its summary
    local limit=$1 name=$2
    shift 2
    echo "=== $name (limit ${limit} s) ==="
    local start=$SECONDS
    timeout -s INT -k 10 "$limit" "$@"
    echo "=== $name: exit $? after $((SECONDS - start)) s ==="
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$py" -c "import sys, torch; print(sys.version.split()[0], torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name(), torch.backends.cuda.matmul.allow_tf32)"
    step 75 "CUDA tests" "$py" -m pytest "${pytest_args[@]}" tests/test_cuda.py
    step 60 "per-iteration profile" "$py" benchmarks/gpu_profile.py --device cuda --out "$out"
    # shellcheck disable=SC2086  # SOLVER_ARGS is a list of options
    step 140 "solver benchmark" "$py" benchmarks/solvers.py --device cuda --out "$out" ${SOLVER_ARGS:-}
    for batch in ${HAM_BATCHES-1 8}; do
        step 75 "Hamburger benchmark, batch $batch" "$py" benchmarks/hamburger.py --device cuda \
            --batch "$batch" --sides 16 32 48 64 128 --out "$out/hamburger-b$batch"
    done
    step 170 "suite on cuda" env EQUILIBRIA_TEST_DEVICE=cuda "$py" -m pytest "${pytest_args[@]}" \
        tests/test_gradients.py tests/test_solvers.py tests/test_deq.py \
        tests/test_warmstart_compaction.py tests/test_stabilisers.py tests/test_norms_dropout.py \
        tests/test_hamburger.py tests/test_sga.py tests/test_diagnostics.py tests/test_errors.py \
        tests/test_properties.py tests/test_precision_compile.py
} 2>&1 | tee "$out/gpu.log"
ls "$out"
