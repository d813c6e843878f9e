#!/usr/bin/env bash
# The whole Safe RLHF pipeline on the toy world, one stage after another (paper Fig. 1):
#
#   1. SFT          a tiny Llama from scratch on {prompt, response} rows           -> OUT/sft
#   2. preference   the reward model (helpfulness) and the cost model (harmlessness) -> OUT/reward, OUT/cost
#   3. RL           five policies from the same SFT model, each for the same number of rollouts:
#                     ppo                reward only                                       -> OUT/ppo
#                     reward_shaping     end reward R - λ0·C with a fixed λ0                 -> OUT/reward_shaping
#                     ppo_lag            PPO-Lagrangian: max R  s.t.  E[C] <= d, d = -8.5    -> OUT/ppo_lag
#                     ppo_lag_d0         the same with the reference's default d = 0         -> OUT/ppo_lag_d0
#                     ppo_lag_rectified  RePO's per-answer constraint {C}⁺, d = 0             -> OUT/ppo_lag_rectified
#   4. evaluation   all six policies answer the held-out prompts; the reward and cost models (and, on the toy
#                   worlds, their oracle judge) judge every answer                            -> OUT/eval
#
# Usage:
#   bash run_pipeline.sh [--data DIR] [--out DIR] [--seed N] [--smoke]
#     --data   a directory with sft.jsonl, preference_train.jsonl, preference_test.jsonl, prompts.jsonl and
#              eval_prompts.jsonl (default data/toy; data/toy_world.py writes data/toy and data/toy_small, and
#              the oracle judge labels the answers of both)
#     --out    where every stage writes (default runs/toy)
#     --seed   the seed of every stage (default 0)
#     --smoke  a few steps per stage: checks that everything runs and every file appears (tests use it)
#
# Every stage runs under torchrun with one process per GPU, or one process on a CPU-only machine. The global
# batch sizes stay the same whatever the number of processes (each is divided by it).
set -euo pipefail
cd "$(dirname "$0")"

DATA=data/toy
OUT=runs/toy
SEED=0
SMOKE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --data) DATA=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    *) echo "error: unknown argument '$1' (expected --data DIR, --out DIR, --seed N or --smoke)" >&2; exit 1 ;;
  esac
done
for file in sft.jsonl preference_train.jsonl preference_test.jsonl prompts.jsonl eval_prompts.jsonl; do
  [ -f "$DATA/$file" ] || { echo "error: $DATA/$file: no such file (run python data/toy_world.py, or give --data DIR)" >&2; exit 1; }
done

# one process per GPU, or one on a CPU-only machine
NPROC=1
if command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then
  NPROC=$(nvidia-smi -L | wc -l)
fi
RUN="torchrun --standalone --nproc_per_node=$NPROC"
per_device() { echo $(( $1 / NPROC )); }  # a global batch size, split over the processes
for global_batch in 32 16; do  # the global batch sizes below must split exactly, or the runs would differ by machine
  if (( global_batch % NPROC )); then
    echo "error: the global batch size $global_batch does not split over $NPROC processes; run on 1, 2 or a divisor of 16" >&2
    exit 1
  fi
done

# the stage settings of the toy world (see README.md, "Results"); --smoke cuts every stage to a few steps
# The PPO budget is counted in rollouts (prompt batches of 32), not in passes over the prompts: a data set with
# few distinct prompts gets as many policy updates as one with many.
SFT_STEPS=-1; PREFERENCE_STEPS=-1; PPO_ROLLOUTS=60; EVAL_PROMPTS=-1
if [ "$SMOKE" = 1 ]; then SFT_STEPS=3; PREFERENCE_STEPS=3; PPO_ROLLOUTS=2; EVAL_PROMPTS=8; fi
COMMON=(--max_length 128 --no_gradient_checkpointing --seed "$SEED")
PPO_COMMON=(--actor_model "$OUT/sft" --reward_model "$OUT/reward" --cost_model "$OUT/cost" --prompt_data "$DATA/prompts.jsonl"
            --max_steps "$PPO_ROLLOUTS" --max_new_tokens 48 --per_device_prompt_batch_size "$(per_device 32)"
            --per_device_train_batch_size "$(per_device 16)" --update_iters 2 --actor_lr 1e-4 --critic_lr 1e-4
            --kl_coeff 0.05 --episode_cost_window_size 64 "${COMMON[@]}")
JUDGE=()
case "$(realpath "$DATA")" in  # the oracle knows the toy worlds only
  "$(realpath data/toy)" | "$(realpath data/toy_small)") JUDGE=(--judge toy) ;;
esac

mkdir -p "$OUT"
TIMES="$OUT/timings.txt"
: > "$TIMES"
stage() {  # stage NAME COMMAND...: run it, and record how long it took
  local name=$1 start=$SECONDS
  shift
  echo "==== $name: $*"
  "$@"
  echo "$name $(( SECONDS - start )) s" | tee -a "$TIMES"
}

# 1. SFT
stage sft $RUN sft.py --model_name_or_path data/tiny-llama --from_scratch --train_data "$DATA/sft.jsonl" \
  --output_dir "$OUT/sft" --epochs 8 --max_steps "$SFT_STEPS" --lr 3e-3 --lr_warmup_ratio 0.03 \
  --per_device_train_batch_size "$(per_device 32)" --gradient_accumulation_steps 1 "${COMMON[@]}"

# 2. the reward model and the cost model, both from the SFT model
for objective in reward cost; do
  stage "$objective" $RUN preference_model.py --objective "$objective" --model_name_or_path "$OUT/sft" \
    --train_data "$DATA/preference_train.jsonl" --eval_data "$DATA/preference_test.jsonl" --output_dir "$OUT/$objective" \
    --epochs 1 --max_steps "$PREFERENCE_STEPS" --lr 5e-4 --per_device_train_batch_size "$(per_device 16)" "${COMMON[@]}"
done

# 3. five policies from the same SFT model. The three PPO-Lagrangian runs differ only in the constraint: d = -8.5
#    (a limit below the cost of the SFT policy's safe answers), the reference's default d = 0 (which a policy can
#    meet on average while complying with harmful requests: README, "Safety compensation"), and RePO's
#    per-answer rectified constraint at d = 0, its natural limit (the cost model's own sign).
LAGRANGIAN=(--algorithm ppo_lag --lambda_init 1.0 --lambda_lr 0.02)
stage ppo $RUN ppo_lagrangian.py --algorithm ppo --output_dir "$OUT/ppo" "${PPO_COMMON[@]}"
stage reward_shaping $RUN ppo_lagrangian.py --algorithm reward_shaping --lambda_init 0.1 --output_dir "$OUT/reward_shaping" "${PPO_COMMON[@]}"
stage ppo_lag $RUN ppo_lagrangian.py "${LAGRANGIAN[@]}" --cost_limit -8.5 --output_dir "$OUT/ppo_lag" "${PPO_COMMON[@]}"
stage ppo_lag_d0 $RUN ppo_lagrangian.py "${LAGRANGIAN[@]}" --cost_limit 0 --output_dir "$OUT/ppo_lag_d0" "${PPO_COMMON[@]}"
stage ppo_lag_rectified $RUN ppo_lagrangian.py "${LAGRANGIAN[@]}" --constraint rectified --cost_limit 0 \
  --output_dir "$OUT/ppo_lag_rectified" "${PPO_COMMON[@]}"

# 4. evaluation of all six on the held-out prompts (sampled answers, as the policies would answer)
stage evaluate $RUN evaluate.py --policy sft="$OUT/sft" ppo="$OUT/ppo" reward_shaping="$OUT/reward_shaping" ppo_lag="$OUT/ppo_lag" \
  ppo_lag_d0="$OUT/ppo_lag_d0" ppo_lag_rectified="$OUT/ppo_lag_rectified" \
  --prompt_data "$DATA/eval_prompts.jsonl" --max_prompts "$EVAL_PROMPTS" --preference_data "$DATA/preference_test.jsonl" \
  --reward_model "$OUT/reward" --cost_model "$OUT/cost" "${JUDGE[@]}" --max_length 128 --max_new_tokens 48 \
  --per_device_batch_size 50 --seed "$SEED" --output_dir "$OUT/eval"

cp "$OUT/eval/training_curves.png" "$OUT/training_curves.png"
echo
echo "==== results (seed $SEED; every table in $OUT/eval/report.md)"
sed -n '/^## Policies/,/^## Arena/p' "$OUT/eval/report.md" | sed '$d'
echo "==== time per stage"
cat "$TIMES"
echo "total $(awk '{ total += $2 } END { print total }' "$TIMES") s"
