#!/usr/bin/env bash
# One command for a GPU machine that already has torch, triton and timm (no network needed):
#
#     bash benchmarks/gpu_run.sh OUTDIR
#
# Installs the package in place (building the extension when nvcc is there), records the machine,
# runs the test suite (GPU-only tests included), the microbenchmark suite in bf16 and fp32, and the
# kernel-specific and end-to-end benchmark scripts where they exist, writing every log and result
# under OUTDIR. A failing step is reported and the next one runs; the exit status is non-zero if
# any step failed. Every step has a time limit; the whole run is capped at GPU_RUN_BUDGET_S
# seconds (default 1500, i.e. 25 minutes).
#
# Environment: PYTHON (default python3), GPU_RUN_BUDGET_S, GPU_RUN_STEPS (comma list of install,
# machine, tests, kernels, suite, e2e; default all), BENCH_ARGS (extra arguments of run.py),
# PYTEST_ARGS, CA_ARGS / PE_ARGS (extra arguments of bench_triton_cross_attention.py /
# bench_triton_patch_embed.py), E2E_ARGS (replaces the end-to-end CLI's model/bench arguments),
# TESTS_LIMIT_S, SUITE_LIMIT_S, E2E_LIMIT_S, CA_LIMIT_S, PE_LIMIT_S,
# CROSSVIT_KERNELS_NO_EXT=1 (skip the extension build),
# GPU_RUN_SKIP_INSTALL=1 (use the package as already installed; install is also skipped when the
# package and its extension's operators already load, e.g. on a machine kept warm between runs).
#
# Steps (GPU_RUN_STEPS):
#   install   pip install -e . (builds the extension)
#   machine   OUT/machine.txt: GPU, driver, versions
#   tests     the test suite, GPU-only tests included
#   kernels   the kernel-specific benchmark scripts and profile_op.py
#   suite     benchmarks/run.py in bf16 and fp32
#   e2e       the end-to-end CLI
set -u

if [ $# -lt 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_RUN_BUDGET_S:-1500}
START=$(date +%s)
FAILED=()
SKIPPED=()
export PYTHONUNBUFFERED=1
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_INDEX=1             # never reach for the network
export MAX_JOBS=${MAX_JOBS:-16}
unset TRITON_INTERPRET

STEPS=",${GPU_RUN_STEPS:-install,machine,tests,kernels,suite,e2e},"
want() { case "$STEPS" in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

log() { echo "[gpu_run $(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }

# step NAME LIMIT_S LOGFILE CMD...: run CMD with a time limit (capped by what is left of the
# budget), tee its output to OUT/LOGFILE, record a failure without stopping.
step() {
    local name=$1 limit=$2 logf=$3
    shift 3
    local left=$(( BUDGET - ( $(date +%s) - START ) ))
    if [ "$left" -le 10 ]; then
        log "SKIP $name: the ${BUDGET}s budget is spent"
        SKIPPED+=("$name (budget spent)")
        FAILED+=("$name (not run: budget spent)")
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    log "START $name (limit ${limit}s) -> $OUT/$logf"
    local t0=$(date +%s)
    timeout --signal=TERM --kill-after=30 "$limit" "$@" 2>&1 | tee "$OUT/$logf"
    local rc=${PIPESTATUS[0]}
    if [ $rc -eq 0 ]; then
        log "OK    $name ($(( $(date +%s) - t0 ))s)"
    else
        [ $rc -eq 124 ] && log "TIMEOUT $name after ${limit}s"
        log "FAIL  $name (exit $rc, $(( $(date +%s) - t0 ))s; see $OUT/$logf)"
        FAILED+=("$name (exit $rc)")
    fi
}

# On a machine lent for at most 10 minutes per command, split the work across calls with
# GPU_RUN_STEPS (install takes about 100 s there: the CUDA extension build).

# -- 1. install --------------------------------------------------------------------------------
install_pkg() {
    if timeout 600 "$PY" -m pip install --no-deps --no-build-isolation -e . ; then
        return 0
    fi
    echo "editable install with the extension failed; trying the pure-Python install"
    if CROSSVIT_KERNELS_NO_EXT=1 timeout 300 "$PY" -m pip install --no-deps --no-build-isolation -e . ; then
        return 0
    fi
    return 1
}
log "install (pip -e, no deps, no network)"
if ! want install; then
    log "install not in GPU_RUN_STEPS: using the package as installed"
elif [ "${GPU_RUN_SKIP_INSTALL:-0}" = 1 ]; then
    log "GPU_RUN_SKIP_INSTALL=1: using the package as installed"
elif "$PY" -c "from crossvit_kernels.backends import extension as e; assert all(e.status(k).ops for k in e.MODULES)" \
        2>/dev/null \
        && [ "$("$PY" -c 'import os, crossvit_kernels as c; print(os.path.dirname(os.path.dirname(c.__file__)))')" = "$REPO" ]; then
    log "the package and its extension already import from $REPO: install skipped"
elif install_pkg > "$OUT/install.log" 2>&1; then
    log "installed (log: $OUT/install.log)"
else
    log "pip install failed (log: $OUT/install.log): using PYTHONPATH=$REPO"
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    SKIPPED+=("pip install (fell back to PYTHONPATH)")
fi

# -- 2. the machine ----------------------------------------------------------------------------
want machine && {
    echo "date: $(date -u)"
    echo "host: $(hostname)"
    echo "git: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain --untracked-files=no 2>/dev/null | wc -l) modified files"
    nvidia-smi || echo "nvidia-smi failed"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv || true
    nproc
    grep -m1 "model name" /proc/cpuinfo || true
    "$PY" - <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
for name in ("triton", "timm", "numpy", "matplotlib", "pytest", "pytest_benchmark"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as exc:
        print(name, "MISSING", exc)
EOF
    "$PY" -m crossvit_kernels.info || echo "crossvit_kernels.info failed"
} > "$OUT/machine.txt" 2>&1
want machine && cat "$OUT/machine.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "WARNING: no CUDA device visible; the GPU benchmarks will fail"
fi

# -- 3. tests (GPU-only tests run here) --------------------------------------------------------
# several workers when pytest-xdist is there (the GPU is shared; this is a correctness run), two
# CPU threads each (more oversubscribes the host); -v names every test as it ends and
# CROSSVIT_KERNELS_TEST_FAIL_LOG records each failure with its traceback as it happens, so a run
# cut short by its time limit still says what failed; a test that hangs is stopped after 150 s.
XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n ${PYTEST_WORKERS:-12}"
"$PY" -c "import pytest_timeout" 2>/dev/null && XDIST="$XDIST --timeout=150"
# shellcheck disable=SC2086
want tests && OMP_NUM_THREADS=2 CROSSVIT_KERNELS_TEST_FAIL_LOG="$OUT/test_failures.txt" \
    step "tests" "${TESTS_LIMIT_S:-600}" tests.log "$PY" -m pytest tests -v --tb=short -ra -p no:cacheprovider \
    $XDIST ${PYTEST_ARGS:-}

# -- 4. the microbenchmark suite ---------------------------------------------------------------
# shellcheck disable=SC2086
want suite && step "benchmarks/run.py" "${SUITE_LIMIT_S:-840}" run.log "$PY" benchmarks/run.py --device cuda --dtypes bf16,fp32 \
    --out "$OUT/run" ${BENCH_ARGS:-}

# -- 5. kernel-specific scripts and the end-to-end CLI, where present -------------------------
for script in bench_triton_cross_attention bench_triton_patch_embed; do
    want kernels || continue
    extra=${CA_ARGS:-}
    [ "$script" = bench_triton_patch_embed ] && extra=${PE_ARGS:-}
    if [ -f "benchmarks/$script.py" ]; then
        # shellcheck disable=SC2086
        limit=${CA_LIMIT_S:-300}
        [ "$script" = bench_triton_patch_embed ] && limit=${PE_LIMIT_S:-300}
        step "$script" "$limit" "$script.log" "$PY" "benchmarks/$script.py" --out "$OUT/$script.json" $extra
    else
        log "SKIP $script: benchmarks/$script.py does not exist"
        SKIPPED+=("$script (absent)")
    fi
done
# where the cross-attention op's device time goes (kernels per call, each kernel's share)
PROFILE_CMD='set -e
for mode in fwd fwd+bwd; do for shape in 0 1; do
    "$0" benchmarks/profile_op.py --op cross_attention --model 18 --shape $shape --batch 256 --mode $mode
done; done
"$0" benchmarks/profile_op.py --op patch_embed --image 240 --patch 12 --width 224 --batch 256 --mode fwd'
want kernels && step "profile_op" "${PROFILE_LIMIT_S:-120}" profile_op.log bash -c "$PROFILE_CMD" "$PY"

if ! want e2e; then
    :
elif "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('crossvit_kernels.benchmark') else 1)" 2>/dev/null; then
    HELP=$("$PY" -m crossvit_kernels.benchmark --help 2>/dev/null)
    if echo "$HELP" | grep -q -- "--results-file"; then
        # the paper's model and the largest 240-px one, bf16, inference and training, timm alongside
        # shellcheck disable=SC2086
        step "crossvit_kernels.benchmark" "${E2E_LIMIT_S:-420}" e2e.log "$PY" -m crossvit_kernels.benchmark \
            ${E2E_ARGS:---model crossvit_small_240 crossvit_18_240 --bench both --precision bf16 --batch-size 256} \
            --results-file "$OUT/e2e.csv"
    elif echo "$HELP" | grep -q -- "--out"; then
        step "crossvit_kernels.benchmark" 420 e2e.log "$PY" -m crossvit_kernels.benchmark --out "$OUT/e2e"
    else
        step "crossvit_kernels.benchmark" 420 e2e.log "$PY" -m crossvit_kernels.benchmark
    fi
else
    log "SKIP crossvit_kernels.benchmark: the module does not exist"
    SKIPPED+=("crossvit_kernels.benchmark (absent)")
fi

# -- summary -----------------------------------------------------------------------------------
TOTAL=$(( $(date +%s) - START ))
{
    echo "total: ${TOTAL}s"
    echo "skipped: ${#SKIPPED[@]}"
    for s in "${SKIPPED[@]+"${SKIPPED[@]}"}"; do echo "  - $s"; done
    echo "failed: ${#FAILED[@]}"
    for f in "${FAILED[@]+"${FAILED[@]}"}"; do echo "  - $f"; done
} | tee "$OUT/status.txt"
log "done in ${TOTAL}s; results in $OUT"
[ ${#FAILED[@]} -eq 0 ]
