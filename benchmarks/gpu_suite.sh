#!/usr/bin/env bash
# The GPU checks of issue 21 in one run on one CUDA GPU, in under 8 minutes on an H200:
#   1. the GPU-marked tests (pytest -m gpu: the Triton log-prob kernel against naive, values and
#      gradients; bf16 training with fp32 masters on CUDA);
#   2. bench_logprobs --device cuda: naive / chunked / Triton, side by side, plus a block sweep;
#   3. bench_learner --device cuda: torch vs DeepSpeed ZeRO 0/1/2, ~0.5B and ~1B Llamas, MFU, and
#      ZeRO-2 with the optimizer offloaded to the CPU (1B);
#   4. bench_shared_prefix --device cuda (~0.5B Llama);
#   5. bench_rollout --device cuda (HF engine, bf16);
#   6. bench_weight_sync --device cuda (export + sync vs a raw copy; object store through Ray);
#   7. bench_pipeline --device cuda (learner and rollout worker on GPU fractions; issue 19).
# Every benchmark prints JSON lines; they are collected into one file, $OUT/gpu_suite.jsonl when
# $OUT is set (the accelerator machine's result folder), else benchmarks/results/gpu_suite.jsonl,
# with the full output in gpu_suite.log beside it. Each step has its own time limit, so a hang or
# a failure costs only that step; a line {"bench": "suite_step", ...} records each step's exit
# status and seconds. Usage, from the repository root:  bash benchmarks/gpu_suite.sh
# SUITE_COMPILE=1 adds torch.compile of the naive log-prob (~1 min of compiling); SUITE_STEPS="a b"
# runs only the named steps (pytest_gpu logprobs learner learner_offload shared_prefix rollout
# weight_sync pipeline).
set -u
cd "$(dirname "$0")/.."
DIR=${OUT:-benchmarks/results}
mkdir -p "$DIR"
JSONL="$DIR/gpu_suite.jsonl"
LOG="$DIR/gpu_suite.log"
: >"$JSONL"
: >"$LOG"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD"
SUITE_START=$(date +%s)

step() {  # step NAME LIMIT_S COMMAND...: run with a limit; JSON lines of stdout go to $JSONL
  local name=$1 limit=$2 start rc
  shift 2
  if [ -n "${SUITE_STEPS:-}" ] && [[ " $SUITE_STEPS " != *" $name "* ]]; then return 0; fi
  start=$(date +%s)
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" 2>>"$LOG" | tee -a "$LOG" | grep --line-buffered '^{' >>"$JSONL"
  rc=${PIPESTATUS[0]}
  echo "{\"bench\": \"suite_step\", \"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start ))}" | tee -a "$JSONL"
}

"$PY" - <<'PY' | tee -a "$LOG" >>"$JSONL"
import datetime, json, torch
info = {"bench": "suite_device", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
print(json.dumps(info))
PY

step pytest_gpu 100 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_logprobs.py \
  tests/test_learner.py tests/test_shared_prefix.py
grep -E '(passed|failed|error|skipped|deselected).* in [0-9.]+s' "$LOG" | tail -1 | grep . |
  "$PY" -c 'import json,sys; print(json.dumps({"bench": "pytest_gpu", "summary": sys.stdin.read().strip()}))' |
  tee -a "$JSONL"
COMPILE=()
[ "${SUITE_COMPILE:-0}" = 1 ] && COMPILE=(--compile)
step logprobs 120 "$PY" benchmarks/bench_logprobs.py --device cuda --sweep ${COMPILE[@]+"${COMPILE[@]}"}
step learner 180 "$PY" benchmarks/bench_learner.py --device cuda --size 0.5b 1b --stages 0 1 2 --repeats 5 --profile
step learner_offload 100 "$PY" benchmarks/bench_learner.py --device cuda --size 1b --stages 2 --repeats 3 --offload cpu
step shared_prefix 50 "$PY" benchmarks/bench_shared_prefix.py --device cuda --repeats 3
step rollout 40 "$PY" benchmarks/bench_rollout.py --device cuda --sizes small --batches 1 64 --repeats 2
step weight_sync 90 "$PY" benchmarks/bench_weight_sync.py --device cuda --sizes small --no-vllm --ray-workers 1
step pipeline 150 "$PY" benchmarks/bench_pipeline.py --device cuda --size base --steps 12 --repeats 2
echo "{\"bench\": \"suite_done\", \"seconds\": $(( $(date +%s) - SUITE_START ))}" | tee -a "$JSONL"
