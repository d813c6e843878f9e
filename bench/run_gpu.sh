#!/usr/bin/env bash
# All four benchmarks on one CUDA GPU, bf16, with a ~0.5B Llama built from a config (bench/common.py, SIZES).
# Run from the repository root:  bash bench/run_gpu.sh            (results: $OUT/gpu_results.jsonl and *.log)
# Wheels for packages the machine lacks (no internet there) may sit in bench/.wheels (always installed) and
# bench/.wheels-pyarrow (installed only when the machine's pyarrow is older than datasets needs).
set -u
OUT=${OUT:-/tmp/bench/out}
SIZE=${SIZE:-0.5b}
ONLY=${ONLY:-sft reward rollout ppo ppo_fsdp}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 BENCH_SCRATCH=${BENCH_SCRATCH:-/tmp/bench} TOKENIZERS_PARALLELISM=false
if ls bench/.wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site bench/.wheels/*.whl || exit 1
  if ! python3 -c "import pyarrow, sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" && ls bench/.wheels-pyarrow/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site bench/.wheels-pyarrow/*.whl || exit 1
  fi
  export PYTHONPATH=/tmp/site
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, transformers, trl, datasets, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__, 'accelerate', accelerate.__version__)"
} 2>&1 | tee "$OUT/env.txt"

noise='it/s\]|s/it\]|examples/s\]|^\{|Loading weights|MISSING|^Key |^-----|^Notes:|newly initialized|FutureWarning|warnings.warn|^$'
run() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  case " $ONLY " in *" $name "*) ;; *) return ;; esac
  echo "### $name"
  timeout "$limit" "$@" --json "$OUT/gpu_results.jsonl" > "$OUT/$name.log" 2>&1
  echo "exit status $?"
  grep -Ev "$noise" "$OUT/$name.log" | tail -n 25
}
run sft 260 python3 bench/bench_sft.py --size "$SIZE" --batch_size ${SFT_BATCH:-128} --warmup 5 --steps ${STEPS:-25} --repeats 3
run reward 260 python3 bench/bench_reward.py --size "$SIZE" --batch_size ${RM_BATCH:-64} --warmup 5 --steps ${STEPS:-25} --repeats 3
run rollout 120 python3 bench/bench_rollout.py --size "$SIZE" --batch_size 64 --max_new_tokens 64 --batches 5 --warmup 1 --autocast_bf16
run ppo 240 python3 bench/bench_ppo.py --size "$SIZE" --batch_size 64 --max_new_tokens 64 --iterations 3 --warmup 1
run ppo_fsdp 240 python3 bench/bench_ppo.py --size "$SIZE" --batch_size 64 --max_new_tokens 64 --iterations 3 --warmup 1 --fsdp
