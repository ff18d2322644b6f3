#!/usr/bin/env bash
# The one GPU script: build the extension, run the new checks first, then the GPU tests and
# benchmarks, and print the measured figures beside the modelled ones last. Run from the
# repository root on a machine with a CUDA GPU:
#
#     bash benchmarks/gpu_check.sh
#
# The stages, their order and their time are the STAGES table below, the one stage budget of the
# script (the CUDA and Triton checks share it): a stage runs for at most its cap, is skipped when
# the global deadline (GPU_CHECK_BUDGET_S, default 300 s, build included) leaves it less than it
# needs, and says so; RESERVE_S are kept for the closing tables.
#   build        pip install --no-build-isolation --no-deps -e . (UDAT_CUDA_ARCHS, default 9.0),
#                plus Liger-Kernel / cut-cross-entropy from ./wheels when that folder exists
#   selfcheck    python -m udat_kernels.info: the build, the device, every backend checked against
#                the float64 reference
#   new-tests    the tests this round added that need a GPU: the float32 precision policy under
#                every global switch, non-finite inputs on every backend
#   correctness  pytest tests/test_cuda.py and tests/test_shard_mode_cuda.py, and
#                tests/test_triton.py (compiled Triton, no interpreter, its GPU subset) beside
#                them; then the backends' own checks (compute-sanitizer for CUDA)
#   paper        paper heads (64, 1024, C) and bandwidth heads (65536, 1024, C)
#   large        face-recognition heads (8192, 512, 10^4..10^6), bf16
#   end-to-end   the full VGG16 at 224 with bf16 autocast, fused heads against eager heads
# and, last, the summary, the targets, and every CUDA target measured against modelled
# (benchmarks/gpu_cuda.py compare, from benchmarks/model_cuda.py).
#
# Every Triton specialization a GPU test launches is a JIT compilation: the GPU subset of
# tests/test_triton.py and test_triton_precision.py launches 150 distinct ones, 112 s of
# compilation on one CPU core (counted without a GPU: UDAT_TRITON_FULL_MATRIX=0 and
# UDAT_TRITON_LAUNCHES under the interpreter, then triton_backend.aot --no-targets --json),
# new-tests 18 more. Those tests run as one process per CPU (at most 16), each a contiguous
# slice of the run (UDAT_TEST_SHARD, tests/conftest.py), so that the compilations spread over
# the CPUs (112 s / 16 = 7 s of compilation each if evenly spread; not timed on a GPU
# machine) and fill Triton's compile cache in parallel.
#
# Each backend adds its own checks to stages correctness, paper and large:
# benchmarks/gpu_triton.py (its stages correctness; paper,bandwidth; largec) and
# benchmarks/gpu_cuda.py (correctness, paper, large), each given the seconds left in the stage
# (--budget-s), the stage's deadline (GPU_CHECK_DEADLINE, epoch seconds) and a folder for its
# files (GPU_CHECK_OUT). A script that is absent is reported as such.
#
# GPU_CHECK_SKIP_BUILD=1 uses the extension already built in place instead of rebuilding it.
# Without a GPU every stage still runs as far as it can and says what it could not do (exit
# status 3 of a stage: nothing measured).
#
# Everything printed is kept in GPU_CHECK_DOCS (default docs/gpu: gpu_check.log and one folder
# per benchmark stage) and, when $OUT is set, copied there too.

set -u
cd "$(dirname "$0")/.."

BUDGET_S=${GPU_CHECK_BUDGET_S:-300}
GPU_CHECK_SKIP_BUILD=${GPU_CHECK_SKIP_BUILD:-0}
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
RESERVE_S=10                      # kept for the closing tables
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export UDAT_CUDA_ARCHS=${UDAT_CUDA_ARCHS:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
unset TRITON_INTERPRET

# The stage budget: name, seconds it needs to start, seconds it may take, command.
# (Sum of the caps + RESERVE_S <= 300: the whole check fits five minutes on an H200.)
# The caps are estimates until an H200 runs the script; correctness holds the Triton compile
# cache's warm-up (at most 25 s) before its tests, which run beside the CUDA tests.
STAGES="
build          30  110  stage_build
selfcheck      10   15  stage_selfcheck
new-tests      10   20  stage_new_tests
correctness    30   45  stage_correctness
paper          30   40  stage_bench gpu-paper paper
large          30   40  stage_bench gpu-large large
end-to-end     10   15  stage_e2e
"

DOCS=${GPU_CHECK_DOCS:-docs/gpu}
mkdir -p "$DOCS"
# The files of an earlier run are replaced as the stages write them; of what is left over, only
# files git does not track are removed (never a committed result; outside a git checkout,
# nothing is removed).
if git -C "$DOCS" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
    git -C "$DOCS" clean -fdq -- paper large triton cuda pytest end_to_end.md 2> /dev/null || true
fi
LOG=$DOCS/gpu_check.log
: > "$LOG"
STATUS_FILE=$(mktemp)
trap 'rm -f "$STATUS_FILE"' EXIT

say() { echo "$@" | tee -a "$LOG"; }

# sharded_pytest NAME FILES...: the tests of FILES as one pytest process per CPU (at most 16),
# each a contiguous slice of the run; the logs go to $DOCS/pytest/NAME-i.log and their last lines
# are printed. Fails if any slice fails.
sharded_pytest() {
    local name=$1 n i rc=0 pids=()
    shift
    n=$(nproc)
    [ "$n" -gt 16 ] && n=16
    mkdir -p "$DOCS/pytest"
    for ((i = 0; i < n; i++)); do
        UDAT_TEST_SHARD="$i/$n" "$PY" -m pytest -q -ra -p no:cacheprovider "$@" \
            > "$DOCS/pytest/$name-$i.log" 2>&1 &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i" || rc=1; done
    echo "$name: $n processes"
    for ((i = 0; i < n; i++)); do tail -n 1 "$DOCS/pytest/$name-$i.log"; done
    [ $rc = 0 ] || grep -h -E '^(FAILED|ERROR)' "$DOCS"/pytest/"$name"-*.log
    return $rc
}

# run_stage NAME NEED CAP COMMAND...: run COMMAND for at most CAP seconds (and never past the
# deadline), unless fewer than NEED seconds are left. The stage sees its limit as STAGE_LIMIT_S.
run_stage() {
    local name=$1 need=$2 cap=$3
    shift 3
    local now left t0 rc status
    now=$(date +%s)
    left=$((DEADLINE - RESERVE_S - now))
    say ""
    say "=== stage: $name ($(( now - START )) s elapsed, $left s left) ==="
    if [ "$left" -lt "$need" ]; then
        say "skipped: needs about $need s, $left s left before the deadline"
        echo "$name|skipped (deadline)|0" >> "$STATUS_FILE"
        return 0
    fi
    [ "$cap" -lt "$left" ] && left=$cap
    t0=$(date +%s)
    # `timeout` runs programs, not shell functions: the stage runs in a child bash
    STAGE_LIMIT_S=$left GPU_CHECK_DEADLINE=$((t0 + left)) timeout --kill-after=5 "$left" bash -c '"$@"' stage "$@" 2>&1 \
        | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        3) status="nothing measured (no CUDA device)" ;;
        124|137) status="cut off after $left s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    say "--- $name: $status in $(( $(date +%s) - t0 )) s"
    echo "$name|$status|$(( $(date +%s) - t0 ))" >> "$STATUS_FILE"
    return 0
}

# gpu_or_skip WHAT: exit status 3 (nothing measured) and a line saying so, without a CUDA device.
gpu_or_skip() {
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "no CUDA device: $1 not run"
        return 3
    fi
}

# backend_scripts STAGE: the backends' own checks of this stage, within the stage's deadline.
backend_scripts() {
    local stage=$1 name left rc=0 args
    for name in triton cuda; do
        left=$((GPU_CHECK_DEADLINE - $(date +%s)))
        if [ ! -f "benchmarks/gpu_$name.py" ]; then
            echo "benchmarks/gpu_$name.py: not present, no $name-specific $stage checks"
            continue
        elif [ "$left" -lt 5 ]; then
            echo "benchmarks/gpu_$name.py: skipped, the stage's deadline leaves $left s"
            continue
        fi
        if [ "$name" = triton ]; then
            case $stage in
                correctness) args=(--stages correctness) ;;
                paper) args=(--stages paper,bandwidth) ;;
                large) args=(--stages largec) ;;
            esac
        else
            args=("$stage")
        fi
        GPU_CHECK_OUT=$DOCS/$name "$PY" -m "benchmarks.gpu_$name" "${args[@]}" --budget-s "$left" \
            || rc=$?
    done
    return $rc
}

stage_build() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
        || echo "nvidia-smi: not available"
    "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
    if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
        echo "GPU_CHECK_SKIP_BUILD=1: using the extension built in place"
    else
        "$PY" -m pip install --no-build-isolation --no-deps -e . || return 1
    fi
    local pkg
    for pkg in liger-kernel cut-cross-entropy; do
        if [ -d wheels ] && "$PY" -m pip install --quiet --no-index --find-links wheels "$pkg"; then
            echo "$pkg: installed from wheels/"
        else
            echo "$pkg: not installed (no wheel for it in wheels/)"
        fi
    done
    "$PY" -c "import udat_kernels; print('build_info:', udat_kernels.build_info())" || return 1
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" \
        || echo "no CUDA device visible: the stages below will say what they could not do"
}

stage_selfcheck() {
    gpu_or_skip "the GPU self-check (on the CPU: python -m udat_kernels.info --device cpu)" \
        || return $?
    "$PY" -m udat_kernels.info --device cuda
}

stage_new_tests() {
    gpu_or_skip "the new GPU tests" || return $?
    sharded_pytest new-tests tests/test_precision_fp32.py tests/test_non_finite.py
}

stage_correctness() {
    gpu_or_skip "the GPU tests" || return $?
    local tests=() rc=0 t pid=
    for t in tests/test_cuda.py tests/test_shard_mode_cuda.py; do
        if [ -f "$t" ]; then tests+=("$t"); else echo "$t: not present"; fi
    done
    # Triton: the benchmark stages' specializations compiled first (a few seconds on every
    # CPU), then the Triton tests in slices beside the CUDA tests.
    if [ -f tests/test_triton.py ]; then
        [ -f benchmarks/gpu_triton.py ] && GPU_CHECK_OUT=$DOCS/triton "$PY" -m benchmarks.gpu_triton \
            --stages warm --budget-s 15
        mkdir -p "$DOCS/pytest"
        sharded_pytest triton tests/test_triton.py tests/test_triton_precision.py \
            > "$DOCS/pytest/triton.txt" 2>&1 &
        pid=$!
    else
        echo "tests/test_triton.py: not present"
    fi
    if [ ${#tests[@]} -gt 0 ]; then
        "$PY" -m pytest -q -ra "${tests[@]}" || rc=$?
    fi
    if [ -n "$pid" ]; then
        wait "$pid" || rc=1
        cat "$DOCS/pytest/triton.txt"
    fi
    backend_scripts correctness || rc=$?
    return $rc
}

stage_bench() {
    local set=$1 stage=$2 rc=0
    gpu_or_skip "the $stage benchmarks" || return $?
    # the side-by-side comparison gets half of the stage, the backends' own checks the rest
    "$PY" -m benchmarks.report --device cuda --set "$set" --out "$DOCS/$stage" \
        --time-limit $((STAGE_LIMIT_S / 2)) || rc=$?
    backend_scripts "$stage" || rc=$?
    return $rc
}

stage_e2e() {
    gpu_or_skip "the end-to-end run" || return $?
    "$PY" -m benchmarks.end_to_end --device cuda --preset vgg16 --amp bf16 --steps 5 \
        > "$DOCS/end_to_end.md"
    local rc=$?
    cat "$DOCS/end_to_end.md"
    return $rc
}

export PY DOCS DEADLINE RESERVE_S GPU_CHECK_SKIP_BUILD
export -f sharded_pytest gpu_or_skip backend_scripts stage_build stage_selfcheck stage_new_tests \
    stage_correctness stage_bench stage_e2e

say "udat-kernels GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), budget ${BUDGET_S} s"
built=1
while read -r name need cap cmd; do
    [ -z "$name" ] && continue
    if [ "$built" = 0 ]; then
        echo "$name|skipped (no build)|0" >> "$STATUS_FILE"
        continue
    fi
    # shellcheck disable=SC2086  # the command's words are split on purpose
    run_stage "$name" "$need" "$cap" $cmd
    if [ "$name" = build ] && ! grep -q '^build|ok|' "$STATUS_FILE"; then
        say "the build did not succeed: the GPU stages are skipped"
        built=0
    fi
done <<< "$STAGES"

say ""
say "=== summary ($(( $(date +%s) - START )) s of ${BUDGET_S} s) ==="
say "| stage | status | seconds |"
say "|---|---|---:|"
while IFS='|' read -r name status secs; do say "| $name | $status | $secs |"; done < "$STATUS_FILE"
for stage in paper large; do
    if [ -f "$DOCS/$stage/report.md" ]; then
        say ""
        say "targets, side-by-side comparison ($stage):"
        sed -n '/^## Targets/,$p' "$DOCS/$stage/report.md" | grep '^- ' | tee -a "$LOG"
    fi
done
BACKEND_TARGETS=$(grep -E '^\[(triton|cuda)\].*target' "$LOG")
if [ -n "$BACKEND_TARGETS" ]; then
    say ""
    say "targets, the backends' own checks:"
    say "$BACKEND_TARGETS"
fi
# Last: every CUDA target, measured (by the stages above) against modelled.
say ""
GPU_CHECK_OUT=$DOCS/cuda timeout 20 "$PY" -m benchmarks.gpu_cuda compare 2>&1 | tee -a "$LOG"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT" && cp -r "$DOCS"/. "$OUT"/ && say "(copied $DOCS to \$OUT)"
fi
