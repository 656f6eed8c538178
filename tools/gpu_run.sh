#!/usr/bin/env bash
# The GPU session in one command, for a machine that has torch, Triton and timm but no network:
#
#     bash tools/gpu_run.sh OUTDIR                 # on the GPU machine
#     GPU_RUN_DRY=1 bash tools/gpu_run.sh OUTDIR   # dry run on any machine (see below)
#
# Steps, in order (GPU_RUN_STEPS, comma list; default install,machine,tests,sweep,e2e):
#   install   pip install -e . (builds the compiled extension, CPU and CUDA; about 100 s with 16 cores)
#   machine   nvidia-smi, versions, python -m crossvit_kernels.info -> machine.txt
#   tests     the GPU tests in parallel (pytest-xdist), each stopped after TEST_TIMEOUT_S; every
#             failure lands in OUTDIR/test_failures.txt as it happens. GPU_TESTS=gpu (default:
#             the tests marked gpu, the fusion stage's at CrossViT-18 among them), files (the
#             GPU-relevant test files in full, the fusion stage's tests/test_triton_fusion.py and
#             tests/test_triton_budgets.py included: more than 4 minutes, raise TESTS_LIMIT_S)
#   sweep     benchmarks/run.py on the GPU: bf16, B = 1, 64, 256, every variant's fusion and
#             patch-embedding shapes and CrossViT-18's fusion stage (both directions: timm's
#             MultiScaleBlock fusion against every backend and the triton knob variants, with
#             the errors against a float64 oracle), fwd and fwd+bwd, timm against every variant
#             of ours, eager and CUDA-graph device time, % of the measured bytes-once floor (the
#             stage: of its byte model's floor) and of the roofline (SWEEP_ARGS replaces these
#             arguments; the sections stay)
#   profile   only when named: tools/profile_op.py on the CrossViT-18 shapes (kernels per call)
#   e2e       python -m crossvit_kernels.benchmark for E2E_MODELS (crossvit_small_240,
#             crossvit_18_dagger_240) at batch E2E_BATCH (256), for each of E2E_CONFIGS
#             (bf16:inference bf16:train amp_bf16:train): first timm and ours eager for every
#             config (fast), then, while the budget lasts, the same with timm + torch.compile and
#             ours + torch.compile (E2E_COMPILE=0 skips that phase; each compile takes a minute or
#             more); each CLI call bounded by E2E_LIMIT_S (eager) or E2E_COMPILE_LIMIT_S
#
# Every step is bounded (*_LIMIT_S, below) and the whole run by GPU_RUN_BUDGET_S (default 540 s,
# for a 10-minute call); a step that would start with too little budget left is skipped and
# reported. Expected on an H100/H200 with 16 cores (from the H100 run; not yet measured for this
# script): install 100 s, tests 60-150 s, sweep 180-240 s (Triton autotunes each new shape
# once; the sweep writes its results after every shape and measures CrossViT-18's and -S's
# shapes first, so a sweep cut by its limit still reports them; the fusion stage comes last,
# one geometry), e2e eager 30-60 s per config: the budget runs out inside the e2e step when
# the others take their upper estimates, and the compile phase gets what is left (a second
# call with GPU_RUN_STEPS=install,e2e E2E_CONFIGS=... completes it). A failing step is reported
# and the next one runs; the exit status is non-zero if any step failed or was skipped.
#
# Results: benchmarks/results/<gpu-tag>/ (results.json in the compact format of
# benchmarks/harness.py, summary.md and plots, rendered by benchmarks/report.py; the end-to-end
# rows are merged into the same results.json). OUTDIR receives at most six files, refreshed after
# every step, so that a run cut short still returns what it did:
#   gpu_run.log               everything printed, with a timestamp per step
#   status.txt                steps run, failed, skipped; seconds each
#   test_failures.txt         the failed tests with their tracebacks (when any failed)
#   summary.md                the rendered tables
#   results-<gpu-tag>.tar.gz  the results folder: tar -xzf it -C benchmarks/results
#   logs.tar.gz               every step's log, machine.txt, the raw end-to-end rows and the raw
#                             per-call samples of the sweep (not for committing)
#
# Dry run (GPU_RUN_DRY=1): every step runs its CPU-side part with tiny shapes on the CPU, so that
# the script and its arguments are checked without a GPU: install = pip's --dry-run, tests = the
# selected tests (skipped without a GPU; GPU_TESTS=files only collects them), sweep = run.py
# --quick on the CPU with the GPU's variants (Triton under TRITON_INTERPRET=1), e2e = the CLI on
# crossvit_tiny_240 at batch 1 without torch.compile (E2E_COMPILE=1 adds it). Results go to a
# temporary folder, never to benchmarks/results/. About 2-4 minutes.
#
# Environment: PYTHON (default python3), GPU_RUN_STEPS, GPU_RUN_BUDGET_S, GPU_RUN_DRY, GPU_TESTS,
# PYTEST_WORKERS (8), TEST_TIMEOUT_S (150), PYTEST_ARGS, SWEEP_ARGS, E2E_MODELS, E2E_BATCH,
# E2E_CONFIGS, E2E_COMPILE (1), E2E_ITERS (warm-up:timed rounds, 3:10), INSTALL_LIMIT_S (240),
# TESTS_LIMIT_S (150), SWEEP_LIMIT_S (240), E2E_LIMIT_S (150) and E2E_COMPILE_LIMIT_S (300) per CLI
# call, PROFILE_LIMIT_S (120), MAX_JOBS (16), CROSSVIT_KERNELS_NO_EXT=1 / CROSSVIT_KERNELS_NO_CUDA=1
# (build less).
set -u -o pipefail

if [ $# -lt 1 ]; then
    echo "usage: [GPU_RUN_DRY=1] [GPU_RUN_STEPS=...] $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_RUN_BUDGET_S:-540}
DRY=${GPU_RUN_DRY:-0}
START=$(date +%s)
RESERVE=20                      # seconds kept back for the final report and packing
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_run.XXXXXX")
STATUS=()
FAILED=0
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_INDEX=1                           # never reach for the network
export MAX_JOBS=${MAX_JOBS:-16}
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
else
    unset TRITON_INTERPRET
fi
: > "$OUT/gpu_run.log"
rm -f "$OUT/test_failures.txt"

STEPS=",${GPU_RUN_STEPS:-install,machine,tests,sweep,e2e},"
want() { case "$STEPS" in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
left() { echo $(( BUDGET - ( $(date +%s) - START ) )); }
log() { echo "[gpu_run $(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/gpu_run.log"; }

# step NAME LIMIT_S CMD...: run CMD bounded by LIMIT_S and by what is left of the budget, its
# output into WORK/NAME.log and OUT/gpu_run.log; a failure is recorded, never fatal.
step() {
    local name=$1 limit=$2
    shift 2
    local avail=$(( $(left) - RESERVE ))
    if [ "$avail" -lt 15 ]; then
        log "SKIP  $name: the ${BUDGET}s budget is spent"
        STATUS+=("$name: skipped (budget spent)")
        FAILED=1
        return 1
    fi
    [ "$limit" -gt "$avail" ] && limit=$avail
    log "START $name (limit ${limit}s): $*"
    local t0 rc
    t0=$(date +%s)
    timeout --signal=TERM --kill-after=15 "$limit" "$@" 2>&1 | tee "$WORK/$name.log" | tee -a "$OUT/gpu_run.log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
        log "OK    $name ($(( $(date +%s) - t0 ))s)"
        STATUS+=("$name: ok ($(( $(date +%s) - t0 ))s)")
    else
        [ "$rc" -eq 124 ] && log "TIMEOUT $name after ${limit}s"
        log "FAIL  $name (exit $rc, $(( $(date +%s) - t0 ))s; its log: logs.tar.gz/$name.log)"
        STATUS+=("$name: FAILED (exit $rc, $(( $(date +%s) - t0 ))s)")
        FAILED=1
    fi
    return "$rc"
}

# the results folder, its tag, and what OUT receives
tag() {
    "$PY" -c "from crossvit_kernels.info import device_tag; print(device_tag('$1'))" 2>/dev/null
}
pack() {
    if [ -n "${RESULTS:-}" ] && [ -f "$RESULTS/results.json" ]; then
        "$PY" benchmarks/report.py "$RESULTS" >> "$WORK/report.log" 2>&1 || log "report.py failed: see report.log"
        tar -czf "$OUT/results-$TAG.tar.gz" -C "$(dirname "$RESULTS")" "$TAG"
        cp "$RESULTS/summary.md" "$OUT/summary.md"
    fi
    {
        echo "elapsed: $(( $(date +%s) - START ))s of a ${BUDGET}s budget; dry run: $DRY; steps: $STEPS"
        for s in "${STATUS[@]+"${STATUS[@]}"}"; do echo "  $s"; done
    } > "$OUT/status.txt"
    tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude=./results --exclude="*.png" . 2>/dev/null
}
trap 'log "interrupted"; pack; exit 130' INT TERM

log "repo $REPO, python $PY, budget ${BUDGET}s, steps $STEPS, dry run $DRY, work folder $WORK"

# -- install -------------------------------------------------------------------------------------
if want install; then
    if [ "$DRY" = 1 ]; then
        step install 60 "$PY" -m pip install --no-deps --no-build-isolation --dry-run -e .
    elif ! step install "${INSTALL_LIMIT_S:-240}" "$PY" -m pip install --no-deps --no-build-isolation -e .; then
        log "the install with the extension failed: trying the pure-Python package"
        CROSSVIT_KERNELS_NO_EXT=1 step install-python-only 120 "$PY" -m pip install --no-deps --no-build-isolation -e . \
            || export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
if ! "$PY" -c "import crossvit_kernels" 2>/dev/null; then
    log "crossvit_kernels does not import: using PYTHONPATH=$REPO"
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    TAG=$(tag cpu)
    RESULTS=$WORK/results/$TAG
else
    DEVICE=cuda
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        log "no CUDA device visible: the GPU steps will fail (GPU_RUN_DRY=1 checks the script without one)"
    fi
    TAG=$(tag cuda)
    RESULTS=$REPO/benchmarks/results/$TAG
fi
[ -n "$TAG" ] || { log "cannot read the device tag (crossvit_kernels.info.device_tag failed)"; TAG=unknown; RESULTS=$WORK/results/unknown; }
log "device $DEVICE, results in $RESULTS"

# -- machine -------------------------------------------------------------------------------------
machine() {
    echo "date: $(date -u)"
    echo "git: $(git rev-parse HEAD 2>/dev/null) ($(git status --porcelain --untracked-files=no 2>/dev/null | wc -l) modified files)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm,power.limit --format=csv \
        || echo "nvidia-smi: not available"
    echo "cpus: $(nproc); $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null)"
    "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|triton|timm|numpy|matplotlib|pytest|pytest-xdist|pytest-timeout|pytest-benchmark) '
    "$PY" -m crossvit_kernels.info
}
if want machine; then
    export PY
    export -f machine
    step machine 60 bash -c machine
    cp "$WORK/machine.log" "$WORK/machine.txt" 2>/dev/null
fi

# -- tests ---------------------------------------------------------------------------------------
if want tests; then
    PYTEST_OPTS=(-v --tb=short -ra -p no:cacheprovider)
    if "$PY" -c "import xdist" 2>/dev/null; then
        PYTEST_OPTS+=(-n "${PYTEST_WORKERS:-8}")
    else
        log "pytest-xdist missing: the tests run one at a time"
    fi
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then
        PYTEST_OPTS+=(--timeout "${TEST_TIMEOUT_S:-150}")
    else
        log "pytest-timeout missing: a hanging test ends only at the step's limit"
    fi
    case "${GPU_TESTS:-gpu}" in
        gpu) SELECT=(tests -m gpu) ;;
        files) SELECT=(tests/test_triton_cross_attention.py tests/test_triton_patch_embed.py tests/test_triton_projections.py
                       tests/test_triton_fusion.py tests/test_triton_budgets.py tests/test_ext.py tests/test_timm_patch.py
                       tests/test_backends.py tests/test_ops.py)
               [ "$DRY" = 1 ] && SELECT+=(--collect-only -q) ;;
        *) read -r -a SELECT <<< "$GPU_TESTS" ;;
    esac
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=2 CROSSVIT_KERNELS_TEST_FAIL_LOG="$OUT/test_failures.txt" \
        step tests "${TESTS_LIMIT_S:-150}" "$PY" -m pytest "${SELECT[@]}" "${PYTEST_OPTS[@]}" ${PYTEST_ARGS:-}
    pack
fi

# -- sweep ---------------------------------------------------------------------------------------
if want sweep; then
    if [ "$DRY" = 1 ]; then
        DEFAULT_SWEEP="--device cpu --quick --dtypes bf16 --batches 1 --allow-interpreter --threads 2
            --impls timm,reference,triton,cuda,torch,sdpa,triton-unfused,triton-core,triton-hilo0,triton-seqc"
    else
        DEFAULT_SWEEP="--device cuda --dtypes bf16 --batches 1,64,256 --stage-models crossvit_18_240"
    fi
    # shellcheck disable=SC2086
    step sweep "${SWEEP_LIMIT_S:-240}" "$PY" benchmarks/run.py ${SWEEP_ARGS:-$DEFAULT_SWEEP} \
        --sections cross_attention,patch_embed,fusion_stage --out "$WORK/sweep" --results --results-dir "$RESULTS" \
        --note "tools/gpu_run.sh sweep"
    pack
fi

# -- profile (only when named) -------------------------------------------------------------------
if want profile; then
    PROFILE_CMD='set -e
for mode in fwd fwd+bwd; do for f in 0 1; do
    "$0" tools/profile_op.py --op cross_attention --model crossvit_18_240 --fusion $f --batch $1 --mode $mode \
        --device $2 --iters $3
done; done
"$0" tools/profile_op.py --op patch_embed --model crossvit_18_240 --branch 0 --batch $1 --mode fwd --device $2 --iters $3'
    if [ "$DRY" = 1 ]; then P_ARGS=(1 cpu 1); else P_ARGS=(256 cuda 20); fi
    step profile "${PROFILE_LIMIT_S:-120}" bash -c "$PROFILE_CMD" "$PY" "${P_ARGS[@]}"
    pack
fi

# -- e2e -----------------------------------------------------------------------------------------
if want e2e; then
    if [ "$DRY" = 1 ]; then
        E_MODELS=${E2E_MODELS:-crossvit_tiny_240}
        E_BATCH=${E2E_BATCH:-1}
        E_ITERS=${E2E_ITERS:-0:1}
        E_COMPILE=${E2E_COMPILE:-0}
        E_DEVICE=(--device cpu --threads 2)
    else
        E_MODELS=${E2E_MODELS:-crossvit_small_240 crossvit_18_dagger_240}
        E_BATCH=${E2E_BATCH:-256}
        E_ITERS=${E2E_ITERS:-3:10}
        E_COMPILE=${E2E_COMPILE:-1}
        E_DEVICE=(--device cuda)
    fi
    read -r -a E_MODEL_LIST <<< "$E_MODELS"
    PHASES="eager"
    [ "$E_COMPILE" = 1 ] && PHASES="eager compile"
    for phase in $PHASES; do
        for cfg in ${E2E_CONFIGS:-bf16:inference bf16:train amp_bf16:train}; do
            prec=${cfg%%:*}
            bench=${cfg#*:}
            name="e2e_${phase}_${prec}_${bench}"
            if [ "$phase" = eager ]; then
                VARIANTS=(--variants timm,ours --no-compile)
                LIMIT=${E2E_LIMIT_S:-150}
            else
                VARIANTS=(--variants timm,timm+compile,ours,ours+compile --compile)
                LIMIT=${E2E_COMPILE_LIMIT_S:-300}
            fi
            # a failed output check still writes the rows (check_ok false): merge whatever was written
            step "$name" "$LIMIT" "$PY" -m crossvit_kernels.benchmark --model "${E_MODEL_LIST[@]}" \
                --bench "$bench" --precision "$prec" --batch-size "$E_BATCH" "${E_DEVICE[@]}" "${VARIANTS[@]}" \
                --no-yardstick --num-warm-iter "${E_ITERS%%:*}" --num-bench-iter "${E_ITERS#*:}" \
                --results-file "$WORK/$name.json"
            if [ -s "$WORK/$name.json" ]; then
                mkdir -p "$RESULTS"
                "$PY" benchmarks/report.py "$RESULTS" --add-e2e "$WORK/$name.json" --no-plots >> "$WORK/report.log" 2>&1 \
                    || log "merging $name.json failed: see report.log"
            fi
            pack
        done
    done
fi

# -- the end ----------------------------------------------------------------------------------------
[ -f "$WORK/sweep/samples.json" ] && gzip -f "$WORK/sweep/samples.json"
pack
log "done in $(( $(date +%s) - START ))s; $(grep -c FAILED "$OUT/status.txt") step(s) failed; OUT: $(ls "$OUT" | tr '\n' ' ')"
cat "$OUT/status.txt"
[ -f "$OUT/summary.md" ] && cat "$OUT/summary.md"
rm -rf "$WORK"
[ "$FAILED" = 0 ]
