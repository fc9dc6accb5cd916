#!/usr/bin/env bash
# One-shot GPU session: PRM's Triton kernels checked and timed on a lent
# H100/H200, in about 8 minutes, tables written under $OUT.
#
# Before (on the CPU machine, once per session): bash benchmarks/gpu_pack.sh
#   (the GPU kit, the golden vectors and pytest's wheels into .gpu-kit/,
#   which git ignores locally, so the run must carry it).
# Run (the device tool; carry [".gpu-kit"], timeout_s 600):
#   . .gpu-kit/install.sh && bash benchmarks/gpu_run.sh
#
# Steps, in this order: 1, 4, 6, 1b, 2, 3, 5 (each under its own time cap, all
# inside GPU_RUN_BUDGET_S seconds; a step that fails or runs out of time
# does not stop the next):
#   1. tests/test_cuda: the Triton kernels compiled on the GPU against the
#      reference (golden vectors, odd and detection-sized maps, fp64 / fp32 /
#      bf16 / fp16, BatchNorm train and eval, channels_last, NaN, no host
#      sync, a PRM-ResNet-50 in fp32 and bf16 autocast) and deterministic
#      (forward + backward twice at a detection stage map: the same bits);
#      the gate tails (SE, GE, GC, SGE, CBAM) against their modules, fp64 /
#      fp32, train and eval, bf16 autocast; the local relation op (LR-Net)
#      against its reference at LR-ResNet-50's detection stage sizes.
#   1b. kernel_bandwidth.py at 2x800x1216, fp32 and bf16: every kernel of a
#      block tail timed alone, its achieved bandwidth against the bytes
#      kernel_report.py counts and against the measured copy bandwidth.
#   2. bench_block_tail.py --device cuda at 2x800x1216 (stage-1 map
#      2x256x200x304): plain tail, PRM on triton and torch, the copy
#      bandwidth and the PRM tail's bandwidth limit; fp32, bf16, fp16.
#   3. bench_backbones.py --device cuda --no-detector, fp32 / bf16 / fp16
#      autocast, at 2x800x1216 and 32x224x224: every attention ResNet-50
#      (fused tails and modules) and LR-ResNet-50 against ResNet-50.
#   4. bench_compile.py: PRM-ResNet-50 and ResNet-50 training steps in
#      eager mode and captured in CUDA graphs (torch.compile's
#      reduce-overhead), the replay checked against eager first.
#   6. check_syncbn.py: two processes (sharing the GPU through gloo on a
#      one-GPU machine) train a SyncBN PRM-ResNet-50 step: PRM unfused, the
#      statistics and gradients the whole batch's.
#   5. tests/test_ops with TRITON_INTERPRET=1 (the CPU-tensor suite, as CI
#      runs it: without it the suite's Triton cases refuse CPU tensors on a
#      machine with CUDA), with what time is left.
# Outputs: $OUT/summary.md (every table, in order), one .md and one .log per
# step, env.txt.
#
# On a machine without a GPU, GPU_RUN_SMOKE=1 runs the same steps on CPU at
# tiny sizes and one repetition (the script's plumbing, not the numbers):
#   GPU_RUN_SMOKE=1 PYTHON=.venv/bin/python OUT=/tmp/gpu_out \
#       bash benchmarks/gpu_run.sh
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_run_out}
BUDGET=${GPU_RUN_BUDGET_S:-480}
SMOKE=${GPU_RUN_SMOKE:-0}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
START=$SECONDS

if [ "$SMOKE" = 1 ]; then
    DEVICE=cpu
    TAIL_ARGS=(--size 2x64x64 --reps 1 --precisions fp32
               --tasks 'train step' inference)
    BACKBONE_ARGS=(--sizes 2x64x64 --reps 1 --inference-reps 1
                   --precisions fp32 --only 'PRM-ResNet-50')
    CUDA_TESTS_ENV=(PRM_DET_CUDA_TESTS_ON_CPU=1)
    CUDA_TESTS_ARGS=(-k 'golden or no_host or inference_written or identical_bits')
    TEST_OPS_ARGS=(-k 'golden_vectors_match_official')
    COMPILE_ARGS=(--size 2x64x64 --reps 1 --modes eager default)
    CAPS=(300 300 300 300 0 300)
else
    DEVICE=cuda
    TAIL_ARGS=(--size 2x800x1216 --reps 15 --precisions fp32 bf16 fp16)
    BACKBONE_ARGS=(--sizes 2x800x1216 32x224x224 --reps 11
                   --inference-reps 30 --precisions fp32 bf16 fp16)
    CUDA_TESTS_ENV=()
    CUDA_TESTS_ARGS=()
    TEST_OPS_ARGS=()
    BANDWIDTH_ARGS=(--size 2x3x800x1216 --dtypes fp32 bf16 --reps 10)
    # eager against CUDA graphs (compile's reduce-overhead), checked first
    COMPILE_ARGS=(--size 2x800x1216 --reps 11 --modes eager reduce-overhead)
    # seconds: tests, tail, backbones, test_ops, kernel bandwidth, compile
    CAPS=(150 100 240 120 90 150)
fi

left() { echo $((BUDGET - (SECONDS - START))); }

cap() {  # the step's cap, or what is left of the budget if less
    local want=$1 rest
    rest=$(left)
    if [ "$rest" -lt "$want" ]; then want=$rest; fi
    echo $((want > 0 ? want : 0))
}

# run_step NAME CAP COMMAND...: log to $OUT/NAME.log, status to summary
run_step() {
    local name=$1 limit rc t0=$SECONDS
    limit=$(cap "$2")
    shift 2
    if [ "$limit" -lt 20 ]; then
        echo "- $name: skipped (budget spent)" >> "$OUT/status.txt"
        return 0
    fi
    echo "== $name (cap ${limit}s, $(left)s left): $*" | tee -a "$OUT/steps.log"
    timeout --signal=INT --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    local what=ok
    if [ $rc = 124 ] || [ $rc = 137 ]; then what="timed out after ${limit}s"
    elif [ $rc != 0 ]; then what="failed (exit $rc)"; fi
    echo "- $name: $what, $((SECONDS - t0)) s" >> "$OUT/status.txt"
    tail -n 3 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/steps.log"
    return 0
}

: > "$OUT/status.txt"
{
    echo "# prm_det GPU run ($(date -u +%Y-%m-%dT%H:%MZ))"
    echo
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
        "$(git status --porcelain 2>/dev/null | grep -q . && echo '(+ local changes)')"
} > "$SUMMARY"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
        --format=csv 2>&1 || echo 'no nvidia-smi'
    "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0],
"| torch", torch.__version__, "| cuda", torch.version.cuda,
"| device", torch.cuda.get_device_name() if torch.cuda.is_available()
else "none")' 2>&1
    "$PYTHON" -c 'import triton; print("triton", triton.__version__)' 2>&1
    nproc
} > "$OUT/env.txt"

# pytest: the machine's own, else the wheels gpu_pack.sh put in the kit
if ! "$PYTHON" -c 'import pytest' 2>/dev/null; then
    if ls .gpu-kit/extra/*.whl >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
            --target /tmp/gpu-kit-site .gpu-kit/extra/*.whl \
            >> "$OUT/env.txt" 2>&1
    else
        echo 'no pytest and no .gpu-kit/extra wheels (run' \
            'benchmarks/gpu_pack.sh first): tests skipped' >> "$OUT/env.txt"
    fi
fi
# the tests read the golden vectors from ../shared/golden (conftest); the kit
# brings them to $PRM_DET_GOLDEN
if [ ! -f ../shared/golden/prm_official.pt ] && \
        [ -f "${PRM_DET_GOLDEN:-.gpu-kit/golden}/prm_official.pt" ]; then
    golden=$(cd "${PRM_DET_GOLDEN:-.gpu-kit/golden}" && pwd)
    mkdir -p ../shared 2>/dev/null && ln -sfn "$golden" ../shared/golden \
        || echo "cannot place the golden vectors at ../shared/golden" \
            >> "$OUT/env.txt"
fi

if "$PYTHON" -c 'import pytest' 2>/dev/null; then
    run_step tests_cuda "${CAPS[0]}" env "${CUDA_TESTS_ENV[@]}" \
        "$PYTHON" -m pytest tests/test_cuda -q -p no:cacheprovider \
        --durations=5 "${CUDA_TESTS_ARGS[@]}"
fi

# second: issue 19's open point waits on it; the later steps take what is left
run_step compile "${CAPS[5]}" "$PYTHON" benchmarks/bench_compile.py \
    --device "$DEVICE" "${COMPILE_ARGS[@]}" --out "$OUT/compile.md"

# SyncBN with PRM across two processes (issue 28): unfused, synchronized
if [ "$DEVICE" = cuda ]; then
    run_step syncbn 90 "$PYTHON" -m torch.distributed.run \
        --nproc_per_node 2 --master_port 29517 benchmarks/check_syncbn.py \
        --out "$OUT/syncbn.md"
else
    echo "- syncbn: skipped (CUDA only)" >> "$OUT/status.txt"
fi

if [ "$DEVICE" = cuda ]; then
    run_step kernel_bandwidth "${CAPS[4]}" "$PYTHON" \
        benchmarks/kernel_bandwidth.py "${BANDWIDTH_ARGS[@]}" \
        --out "$OUT/kernel_bandwidth.md"
else
    echo "- kernel_bandwidth: skipped (CUDA only)" >> "$OUT/status.txt"
fi

run_step block_tail "${CAPS[1]}" "$PYTHON" benchmarks/bench_block_tail.py \
    --device "$DEVICE" "${TAIL_ARGS[@]}" --out "$OUT/block_tail.md"

run_step backbones "${CAPS[2]}" "$PYTHON" benchmarks/bench_backbones.py \
    --device "$DEVICE" --no-detector "${BACKBONE_ARGS[@]}" \
    --out "$OUT/backbones.md"

if "$PYTHON" -c 'import pytest' 2>/dev/null; then
    run_step test_ops_interpreted "${CAPS[3]}" env TRITON_INTERPRET=1 \
        "$PYTHON" -m pytest tests/test_ops -q -x -p no:cacheprovider \
        "${TEST_OPS_ARGS[@]}"
fi

{
    echo
    echo '## Machine'
    echo
    echo '```'
    cat "$OUT/env.txt"
    echo '```'
    echo
    echo "## Steps ($((SECONDS - START)) s of a ${BUDGET} s budget)"
    echo
    cat "$OUT/status.txt"
    for name in tests_cuda test_ops_interpreted; do
        if [ -f "$OUT/$name.log" ]; then
            echo
            echo "### $name: last lines"
            echo
            echo '```'
            grep -E '^(FAILED|ERROR)|passed|failed|error' "$OUT/$name.log" \
                | tail -n 25
            echo '```'
        fi
    done
    for name in syncbn kernel_bandwidth block_tail backbones compile; do
        echo
        echo "## $name"
        echo
        if [ -s "$OUT/$name.md" ]; then
            cat "$OUT/$name.md"
        elif [ -f "$OUT/$name.log" ]; then
            echo '(no complete table: the sections printed before it stopped)'
            echo
            grep -E '^(\||Block tails|Machine)' "$OUT/$name.log"
        else
            echo '(not run)'
        fi
    done
} >> "$SUMMARY"
echo "summary: $SUMMARY ($((SECONDS - START)) s)"
