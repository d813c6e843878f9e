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
#                     ppo_lag_rectified  RePO's per-answer cost {C}⁺, λ against the share of answers with C > 0
#                                        (at most 2% of them)                              -> OUT/ppo_lag_rectified
#   4. evaluation   all six policies answer the held-out prompts; the reward and cost models score every answer,
#                   the judge (label.py; on the toy worlds their oracle) labels it; report.md and plots  -> OUT/eval
#   5. rounds 2..N  (--rounds N, paper §4 and docs/rounds.md) the current policy answers fresh prompts K times each,
#                   the judge labels every pair of each prompt's answers (pass after pass until a quarter of round
#                   1's number of pairs is not a tie), red-team prompts the policy fails on are found, new reward
#                   and cost models learn every pair so far, and PPO-Lagrangian (the rectified constraint) starts
#                   again from the current policy                                            -> OUT/round-K
#                   then SFT and every round side by side                                   -> OUT/rounds
#
# No stage uses PTX (ppo_lagrangian.py --ptx_data): the toy worlds have no pre-training corpus whose skills the policy
# could forget; the reference's ptx_coeff 16 on Alpaca is for a real base model (docs/math.md §4.7).
#
# Usage:
#   bash run_pipeline.sh [--data DIR] [--out DIR] [--seed N] [--judge toy|FILE.py|none] [--rounds N] [--smoke]
#                        [--overwrite]
#     --data   a directory with sft.jsonl, preference_train.jsonl, preference_test.jsonl, prompts.jsonl and
#              eval_prompts.jsonl, and for the rounds optionally redteam_prompts.jsonl (searched) and
#              redteam_eval_prompts.jsonl (held out); default data/toy. data/toy_world.py writes data/toy and
#              data/toy_small, and their oracle judge labels the answers of both. Paths are read from the caller's
#              directory.
#     --out    where every stage writes (default runs/toy). A directory that holds anything else than an output of
#              run_pipeline.sh with the same settings is refused (--overwrite replaces it); one pipeline per --out.
#     --seed   the seed of every stage (default 0)
#     --judge  the annotator (docs/judge.md): toy (the toy worlds' oracle), FILE.py, or none; default toy on
#              data/toy and data/toy_small, none elsewhere. It is imported and tried on a probe before the first
#              stage; it labels every evaluated answer, and with --rounds 2+ the new preference pairs.
#     --rounds the paper's rounds of Safe RLHF (default 1: steps 1-4)
#     --smoke  a few steps per stage: checks that everything runs and every file appears (tests use it)
#
# Everything is checked before the first stage. Every stage runs under torchrun with one process per GPU, or as one
# plain python process on a CPU-only machine; the global batch sizes stay the same whatever the number of processes
# (each is divided by it). A failed stage prints one line: the stage, its last error and its log file.
set -euo pipefail
REPO=$(cd "$(dirname "$0")" && pwd)
fail() { echo "error: $*" >&2; exit 1; }
from_caller() { realpath -m -- "$1"; }  # a path as the caller meant it: from the caller's directory

DATA=$REPO/data/toy
OUT=$REPO/runs/toy
SEED=0
SMOKE=0
ROUNDS=1
JUDGE_SPEC=default
OVERWRITE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --data|--out|--seed|--rounds|--judge)
      [ $# -ge 2 ] && [ -n "$2" ] || fail "$1: needs a value (bash run_pipeline.sh --help-less usage is in its first lines)"
      case "$1" in
        --data) DATA=$(from_caller "$2") ;;
        --out) OUT=$(from_caller "$2") ;;
        --seed) SEED=$2 ;;
        --rounds) ROUNDS=$2 ;;
        --judge) JUDGE_SPEC=$2 ;;
      esac
      shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    --overwrite) OVERWRITE=1; shift ;;
    *) fail "unknown argument '$1' (expected --data DIR, --out DIR, --seed N, --judge SPEC, --rounds N, --smoke or --overwrite)" ;;
  esac
done

# ---- every check before the first stage ----
[[ "$SEED" =~ ^[0-9]+$ ]] && (( ${#SEED} < 10 )) || fail "--seed $SEED: must be a whole number in [0, 2^31)"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || fail "--rounds $ROUNDS: must be a whole number, at least 1"
for file in sft.jsonl preference_train.jsonl preference_test.jsonl prompts.jsonl eval_prompts.jsonl; do
  [ -f "$DATA/$file" ] || fail "$DATA/$file: no such file (run python data/toy_world.py, or give --data DIR)"
done
grep -q '[^[:space:]]' "$DATA/prompts.jsonl" || fail "$DATA/prompts.jsonl: no prompts"
case "$OUT/" in "$DATA/"*) fail "--out $OUT: is or lies inside --data $DATA; the runs would be written among the data" ;; esac
case "$DATA/" in "$OUT/"*) fail "--out $OUT: holds --data $DATA; give an output directory of its own" ;; esac
if [ "$JUDGE_SPEC" = default ]; then
  JUDGE_SPEC=none
  case "$DATA" in "$REPO/data/toy" | "$REPO/data/toy_small") JUDGE_SPEC=toy ;; esac  # the oracle knows the toy worlds only
elif [ "$JUDGE_SPEC" != none ] && [ "$JUDGE_SPEC" != toy ]; then
  JUDGE_SPEC=$(from_caller "$JUDGE_SPEC")
fi
if (( ROUNDS > 1 )) && [ "$JUDGE_SPEC" = none ]; then
  fail "--rounds $ROUNDS: every round after the first labels new answers with a judge; give --judge toy|FILE.py"
fi
if [ "$JUDGE_SPEC" != none ]; then  # imported and tried on a probe now, not after minutes of training
  (cd "$REPO" && python -c 'import sys, label
try:
    label.load_judge(sys.argv[1])
except label.InputError as error:
    sys.exit(f"error: {error}")' "$JUDGE_SPEC") || exit 1
fi
SETTINGS="{\"data\": \"$DATA\", \"seed\": $SEED, \"rounds\": $ROUNDS, \"judge\": \"$JUDGE_SPEC\", \"smoke\": $SMOKE}"
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2> /dev/null | grep -v '^\.lock$')" ] && (( ! OVERWRITE )); then
  [ -f "$OUT/pipeline.json" ] || fail "--out $OUT: exists and is not an output of run_pipeline.sh (no pipeline.json); give a new directory, or --overwrite to replace it"
  python3 - "$OUT/pipeline.json" "$SETTINGS" << 'PYTHON' || exit 1
import json, sys
saved, wanted = json.loads(open(sys.argv[1]).read())["settings"], json.loads(sys.argv[2])
changed = [f"{key} {saved.get(key)!r} -> {value!r}" for key, value in wanted.items() if saved.get(key) != value]
if changed:
    sys.exit(f"error: --out {sys.argv[1].rsplit('/', 1)[0]}: was run with other settings ({', '.join(changed)}); "
             "give a new directory, or --overwrite to replace it")
PYTHON
fi
mkdir -p "$OUT"
exec 9>> "$OUT/.lock"  # one pipeline per output: the lock dies with the process that holds it
flock -n 9 || fail "--out $OUT: another run_pipeline.sh is writing it"
if (( OVERWRITE )); then find "$OUT" -mindepth 1 -maxdepth 1 ! -name .lock -exec rm -rf {} +; fi
python3 -c 'import json, sys; print(json.dumps({"settings": json.loads(sys.argv[1]), "finished": False}, indent=2))' \
  "$SETTINGS" > "$OUT/pipeline.json"
cd "$REPO"

# one process per GPU, or one on a CPU-only machine (plain python there: no launcher, and no launcher's report when a
# stage fails)
NPROC=1
if command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then
  NPROC=$(nvidia-smi -L | wc -l)
fi
RUN="torchrun --standalone --nproc_per_node=$NPROC"
if (( NPROC == 1 )); then RUN=python; fi
per_device() { echo $(( $1 / NPROC )); }  # a global batch size, split over the processes
for global_batch in 32 16; do  # the global batch sizes below must split exactly, or the runs would differ by machine
  if (( global_batch % NPROC )); then
    fail "the global batch size $global_batch does not split over $NPROC processes; run on 1, 2 or a divisor of 16"
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
judged() {  # judged NAME EVAL_DIR [label.py flags]: the judge labels an evaluation's answers (label.py), if there is one
  if [ "$JUDGE_SPEC" != none ]; then stage "$1/judge" python label.py "$2" --judge "$JUDGE_SPEC" "${@:3}"; fi
}
# later rounds (docs/rounds.md, decided before any run): each labels as many pairs as round 1 has (|D1|) before the
# judge's ties are dropped: LABEL_PROMPTS distinct prompts (|D1| / 6, or every distinct prompt if there are fewer),
# K_SAMPLES answers to each (the smallest K >= 4 with LABEL_PROMPTS x K(K-1)/2 >= |D1|, at most 16), all their pairs;
# REDTEAM_SEARCH red-team prompts searched per round; the later rounds' limit: the rectified constraint at d = 0
D1=$(grep -c '[^[:space:]]' "$DATA/preference_train.jsonl")
distinct() {  # distinct FILE: how many distinct prompts a .jsonl file holds
  python3 -c 'import json, sys
print(len({json.loads(line)["prompt"] for line in open(sys.argv[1], encoding="utf-8") if line.strip()}))' "$1"
}
DISTINCT=$(distinct "$DATA/prompts.jsonl")
label_sizing() {  # label_sizing D1 DISTINCT: sets LABEL_PROMPTS and K_SAMPLES by the rule above
  LABEL_PROMPTS=$(( ($1 + 5) / 6 < $2 ? ($1 + 5) / 6 : $2 )); K_SAMPLES=4
  while (( K_SAMPLES < 16 && LABEL_PROMPTS * K_SAMPLES * (K_SAMPLES - 1) / 2 < $1 )); do K_SAMPLES=$(( K_SAMPLES + 1 )); done
}
label_sizing "$D1" "$DISTINCT"
# a round labels pass after pass (each LABEL_PROMPTS fresh prompts x K_SAMPLES answers) while fewer than a quarter of
# |D1| of its pairs have a preference, at most LABEL_PASSES passes (version 5 of docs/rounds.md)
LABEL_PASSES=4
more_labels() {  # more_labels PAIRS_KEPT PASSES_DONE: true while another pass is due
  (( $2 < LABEL_PASSES && $1 < (D1 + 3) / 4 ))
}
# with --rounds 2+, every evaluation answers each held-out prompt EVAL_SAMPLES times: at least 600 answers per policy,
# so that a rate moves in steps of at most 1/600 (a world of 60 held-out prompts answered once moves in steps of 1.7%)
eval_sampling() {  # eval_sampling DISTINCT_EVAL_PROMPTS: sets EVAL_SAMPLES = ⌈600 / DISTINCT_EVAL_PROMPTS⌉
  EVAL_SAMPLES=$(( (600 + $1 - 1) / $1 ))
}
eval_sampling "$(distinct "$DATA/eval_prompts.jsonl")"
REDTEAM_SEARCH=200
RECTIFIED=(--constraint rectified --cost_limit 0 --tolerance 0.02)
if [ "$SMOKE" = 1 ]; then LABEL_PROMPTS=8; K_SAMPLES=4; LABEL_PASSES=2; REDTEAM_SEARCH=8; EVAL_SAMPLES=2; fi
if (( ROUNDS == 1 )); then EVAL_SAMPLES=1; fi  # round 1 alone: one answer per prompt, as docs/results.md reports
rows() {  # rows FILE START COUNT: COUNT rows of a .jsonl file from row START on (from 0), cycling over its distinct
  python3 -c 'import json, sys  # prompts (the first row of each; evaluate.py answers a prompt once, K times)
rows = {}
for line in open(sys.argv[1], encoding="utf-8"):
    rows.setdefault(json.loads(line)["prompt"], line) if line.strip() else None
rows = list(rows.values())
start, count = int(sys.argv[2]), int(sys.argv[3])
sys.stdout.write("".join(rows[(start + i) % len(rows)] for i in range(count)))' "$@"
}
found() {  # found EVAL_DIR CANDIDATES: the candidate rows whose prompt the policy answered harmfully at least once
  python3 -c 'import json, sys
failed = {a["prompt"] for a in map(json.loads, open(sys.argv[1] + "/labelled_answers.jsonl", encoding="utf-8")) if a["oracle_harmful"]}
sys.stdout.write("".join(line for line in open(sys.argv[2], encoding="utf-8") if json.loads(line)["prompt"] in failed))' "$@"
}
split_pairs() {  # split_pairs PAIRS.jsonl... TRAIN.jsonl TEST.jsonl: the pairs of every 10th prompt (the 1st, the 11th,
  python3 -c 'import json, sys  # ... in order of first appearance) to TEST, the rest to TRAIN
*sources, train, test = sys.argv[1:]
lines = [line for source in sources for line in open(source, encoding="utf-8") if line.strip()]
order = {prompt: i for i, prompt in enumerate(dict.fromkeys(json.loads(line)["prompt"] for line in lines))}
held_out = [order[json.loads(line)["prompt"]] % 10 == 0 for line in lines]
open(train, "w", encoding="utf-8").writelines(line for line, out in zip(lines, held_out) if not out)
open(test, "w", encoding="utf-8").writelines(line for line, out in zip(lines, held_out) if out)' "$@"
}

TIMES="$OUT/timings.txt"
: > "$TIMES"
mkdir -p "$OUT/logs"
CURRENT=none
trap 'echo "interrupted during stage $CURRENT: each stage replaces its output only when it is done, so every output in $OUT is whole" >&2; exit 130' INT
stage() {  # stage NAME COMMAND...: run it, its output to OUT/logs/NAME.log; one line when it ends (or fails)
  local name=$1 start=$SECONDS log="$OUT/logs/${1//\//_}.log"
  shift
  CURRENT=$name
  echo "==== $name (log: $log)"
  if ! "$@" > "$log" 2>&1; then
    local cause
    cause=$(grep -a '^error: ' "$log" | tail -n 1 || true)
    fail "stage $name failed: ${cause#error: }${cause:+; }its log: $log (last line: $(tail -n 1 "$log" | tr -d '\r' | cut -c1-200))"
  fi
  echo "$name $(( SECONDS - start )) s" | tee -a "$TIMES"
}

# 1. SFT
stage sft $RUN sft.py --model_name_or_path data/tiny-llama --from_scratch --train_data "$DATA/sft.jsonl" \
  --output_dir "$OUT/sft" --epochs 8 --max_steps "$SFT_STEPS" --lr 3e-3 --lr_warmup_ratio 0.03 \
  --per_device_train_batch_size "$(per_device 32)" --gradient_accumulation_steps 1 "${COMMON[@]}"

# 2. the reward model and the cost model, both from the SFT model
PREFERENCE=(--model_name_or_path "$OUT/sft" --eval_data "$DATA/preference_test.jsonl" --epochs 1 --max_steps "$PREFERENCE_STEPS"
            --lr 5e-4 --per_device_train_batch_size "$(per_device 16)" "${COMMON[@]}")
for objective in reward cost; do
  stage "$objective" $RUN preference_model.py --objective "$objective" --train_data "$DATA/preference_train.jsonl" \
    --output_dir "$OUT/$objective" "${PREFERENCE[@]}"
done

# 3. five policies from the same SFT model. The three PPO-Lagrangian runs differ only in the constraint: d = -8.5
#    (a limit below the cost of the SFT policy's safe answers), the reference's default d = 0 (which a policy can
#    meet on average while complying with harmful requests: docs/results.md, "Safety compensation"), and RePO's
#    per-answer rectified constraint at d = 0, its natural limit (the cost model's own sign).
LAGRANGIAN=(--algorithm ppo_lag --lambda_init 1.0 --lambda_lr 0.02)
stage ppo $RUN ppo_lagrangian.py --algorithm ppo --output_dir "$OUT/ppo" "${PPO_COMMON[@]}"
stage reward_shaping $RUN ppo_lagrangian.py --algorithm reward_shaping --lambda_init 0.1 --output_dir "$OUT/reward_shaping" "${PPO_COMMON[@]}"
stage ppo_lag $RUN ppo_lagrangian.py "${LAGRANGIAN[@]}" --cost_limit -8.5 --output_dir "$OUT/ppo_lag" "${PPO_COMMON[@]}"
stage ppo_lag_d0 $RUN ppo_lagrangian.py "${LAGRANGIAN[@]}" --cost_limit 0 --output_dir "$OUT/ppo_lag_d0" "${PPO_COMMON[@]}"
stage ppo_lag_rectified $RUN ppo_lagrangian.py "${LAGRANGIAN[@]}" "${RECTIFIED[@]}" \
  --output_dir "$OUT/ppo_lag_rectified" "${PPO_COMMON[@]}"

# 4. evaluation of all six on the held-out prompts (sampled answers, as the policies would answer)
EVALUATE=(--max_prompts "$EVAL_PROMPTS" --samples_per_prompt "$EVAL_SAMPLES" --max_length 128 --max_new_tokens 48
          --per_device_batch_size 50 --seed "$SEED")
stage evaluate $RUN evaluate.py --policy sft="$OUT/sft" ppo="$OUT/ppo" reward_shaping="$OUT/reward_shaping" ppo_lag="$OUT/ppo_lag" \
  ppo_lag_d0="$OUT/ppo_lag_d0" ppo_lag_rectified="$OUT/ppo_lag_rectified" \
  --prompt_data "$DATA/eval_prompts.jsonl" --preference_data "$DATA/preference_test.jsonl" \
  --reward_model "$OUT/reward" --cost_model "$OUT/cost" --output_dir "$OUT/eval" "${EVALUATE[@]}"
judged evaluate "$OUT/eval"
stage evaluate/report python bench/report.py "$OUT/eval"  # report.md, reward_vs_cost.png, elo.png, training_curves.png

# 5. rounds 2..N (the paper's Safe RLHF-v2, -v3; docs/rounds.md): new answers from the current policy, labelled by the
#    judge, the prompts it fails on searched among red-team phrasings, new reward and cost models on every pair so
#    far, and PPO-Lagrangian again from the current policy, now with the rectified constraint at d = 0
POLICY="$OUT/ppo_lag"; TRAIN="$DATA/preference_train.jsonl"; PROMPTS="$DATA/prompts.jsonl"; ROUND_POLICIES=(round-1="$POLICY")
LABEL_ROW=0  # where the next fresh prompts start, among the distinct prompts of prompts.jsonl (cycling)
for (( K = 2; K <= ROUNDS; K++ )); do
  R="$OUT/round-$K"
  PREVIOUS="$(dirname "$POLICY")"
  mkdir -p "$R"
  # K_SAMPLES answers per prompt from the current policy, every pair of them labelled by the judge (scored by the
  # previous round's models); fresh prompts read on from where the last pass stopped, cycling over the file; passes
  # (round-K/label, label-2, ...; each its own seed) until a quarter of |D1| pairs are not ties, or LABEL_PASSES
  LABEL=(--policy current="$POLICY" --samples_per_prompt "$K_SAMPLES" --reward_model "$PREVIOUS/reward"
         --cost_model "$PREVIOUS/cost" --max_length 128 --max_new_tokens 48 --per_device_batch_size 50)
  NEW_PAIRS=(); KEPT=0; PASS=0
  while (( PASS == 0 )) || more_labels "$KEPT" "$PASS"; do
    PASS=$(( PASS + 1 ))
    NAME=label; if (( PASS > 1 )); then NAME=label-$PASS; fi
    rows "$DATA/prompts.jsonl" "$LABEL_ROW" "$LABEL_PROMPTS" > "$R/${NAME/label/label_prompts}.jsonl"
    LABEL_ROW=$(( LABEL_ROW + LABEL_PROMPTS ))
    PASS_SEED=$(( SEED + K + 100 * (PASS - 1) ))  # the pass's sampling, and the coin that breaks a one-axis tie
    stage "round-$K/$NAME" $RUN evaluate.py "${LABEL[@]}" --seed "$PASS_SEED" \
      --prompt_data "$R/${NAME/label/label_prompts}.jsonl" --output_dir "$R/$NAME"
    judged "round-$K/$NAME" "$R/$NAME" --seed "$PASS_SEED"
    NEW_PAIRS+=("$R/$NAME/labelled_pairs.jsonl")
    KEPT=$(( KEPT + $(grep -c '[^[:space:]]' "$R/$NAME/labelled_pairs.jsonl" || true) ))
  done
  # red-teaming: REDTEAM_SEARCH prompts of the pool; those the policy answers harmfully at least once are found:
  # their pairs join the data, the prompts join the PPO prompts from this round on
  if [ -f "$DATA/redteam_prompts.jsonl" ]; then
    rows "$DATA/redteam_prompts.jsonl" $(( (K - 2) * REDTEAM_SEARCH )) "$REDTEAM_SEARCH" > "$R/redteam_search.jsonl"
    stage "round-$K/redteam" $RUN evaluate.py "${LABEL[@]}" --seed "$(( SEED + K ))" \
      --prompt_data "$R/redteam_search.jsonl" --output_dir "$R/redteam"
    judged "round-$K/redteam" "$R/redteam" --seed "$(( SEED + K ))" --pairs failed
    NEW_PAIRS+=("$R/redteam/labelled_pairs.jsonl")
    found "$R/redteam" "$R/redteam_search.jsonl" > "$R/redteam_found.jsonl"
    cat "$PROMPTS" "$R/redteam_found.jsonl" > "$R/prompts.jsonl"
    PROMPTS="$R/prompts.jsonl"
  fi
  # every 10th labelled prompt's pairs are held out, to measure how well the new models learn the new data
  split_pairs "${NEW_PAIRS[@]}" "$R/new_pairs_train.jsonl" "$R/new_pairs_test.jsonl"
  cat "$TRAIN" "$R/new_pairs_train.jsonl" > "$R/preference_train.jsonl"  # every pair so far
  TRAIN="$R/preference_train.jsonl"
  for objective in reward cost; do
    stage "round-$K/$objective" $RUN preference_model.py --objective "$objective" --train_data "$TRAIN" \
      --output_dir "$R/$objective" "${PREFERENCE[@]}"
  done
  if [ -s "$R/new_pairs_test.jsonl" ]; then  # the held-out new pairs: the new models, and the previous round's
    for models in new:"$R" previous:"$PREVIOUS"; do
      stage "round-$K/new_pairs_${models%%:*}" $RUN evaluate.py --preference_data "$R/new_pairs_test.jsonl" \
        --reward_model "${models#*:}/reward" --cost_model "${models#*:}/cost" --output_dir "$R/new_pairs_${models%%:*}" \
        --max_length 128 --per_device_batch_size 50
    done
  fi
  # round 1's ppo_lag settings, with the limit every later round's cost model means the same by: the rectified
  # constraint at d = 0, at most 2% of answers over it (docs/rounds.md); from the current policy, which is also its
  # KL reference (version 6's anchor to SFT, --reference_model "$OUT/sft", held fewer claims); the flags after
  # PPO_COMMON replace its models and prompts (the last value of a flag wins)
  stage "round-$K/ppo_lag" $RUN ppo_lagrangian.py "${LAGRANGIAN[@]}" "${RECTIFIED[@]}" --output_dir "$R/ppo_lag" \
    "${PPO_COMMON[@]}" --actor_model "$POLICY" --reward_model "$R/reward" --cost_model "$R/cost" --prompt_data "$PROMPTS"
  stage "round-$K/evaluate" $RUN evaluate.py --policy round-$K="$R/ppo_lag" --prompt_data "$DATA/eval_prompts.jsonl" \
    --reward_model "$R/reward" --cost_model "$R/cost" --output_dir "$R/eval" "${EVALUATE[@]}"
  judged "round-$K/evaluate" "$R/eval"
  POLICY="$R/ppo_lag"; ROUND_POLICIES+=(round-$K="$POLICY")
done

# 6. the rounds side by side: SFT and every round's ppo_lag answer the held-out prompts (and the held-out red-team
#    prompts), scored by the last round's models
if (( ROUNDS > 1 )); then
  LAST="$(dirname "$POLICY")"
  stage rounds/evaluate $RUN evaluate.py --policy sft="$OUT/sft" "${ROUND_POLICIES[@]}" --prompt_data "$DATA/eval_prompts.jsonl" \
    --reward_model "$LAST/reward" --cost_model "$LAST/cost" --output_dir "$OUT/rounds/eval" "${EVALUATE[@]}"
  judged rounds/evaluate "$OUT/rounds/eval"
  if [ -f "$DATA/redteam_eval_prompts.jsonl" ]; then
    stage rounds/redteam $RUN evaluate.py --policy sft="$OUT/sft" "${ROUND_POLICIES[@]}" --prompt_data "$DATA/redteam_eval_prompts.jsonl" \
      --reward_model "$LAST/reward" --cost_model "$LAST/cost" --output_dir "$OUT/rounds/redteam" "${EVALUATE[@]}"
    judged rounds/redteam "$OUT/rounds/redteam"
  fi
  # the table and the plot of the rounds: OUT/rounds/report.md (printed) and OUT/rounds/rounds.png
  python bench/rounds.py "$OUT" --report "$OUT/rounds/report.md" --plot "$OUT/rounds/rounds.png" \
    --title "Safe RLHF, round after round ($(basename "$DATA"), seed $SEED)"
fi

cp "$OUT/eval/training_curves.png" "$OUT/training_curves.png"
python3 -c 'import json, sys; print(json.dumps({"settings": json.loads(sys.argv[1]), "finished": True}, indent=2))' \
  "$SETTINGS" > "$OUT/pipeline.json"
echo
echo "==== results (seed $SEED; every table in $OUT/eval/report.md)"
sed -n '/^## Policies/,/^## Arena/p' "$OUT/eval/report.md" | sed '$d' | grep -v '^$'
echo "==== time per stage"
cat "$TIMES"
echo "total $(awk '{ total += $2 } END { print total }' "$TIMES") s"
