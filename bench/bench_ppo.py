"""PPO-Lagrangian iteration breakdown: where one `ppo_lag` iteration of ppo_lagrangian.py spends its time, and its
peak memory against the size of the six models' parameters and optimiser states.

Runs ppo_lagrangian.py's own main() in-process (--algorithm ppo_lag, --max_steps warm-up + timed rollouts, no
gradient checkpointing, bf16 on CUDA as the script does: frozen models in bf16, trained ones fp32 under bf16
autocast) on checkpoints built from a Llama config (actor = reference = a random 'SFT' model; reward and cost
models = that backbone with a fresh scalar head, the critics initialised from them), and
data/toy/prompts.jsonl. Module functions are wrapped to read the clock (CUDA-synchronised on both ends):

  generation: generate_answers (step 1)
  scoring:    end_scores (reward, cost), answer_log_probs (actor's old and reference log-probs) and the critics'
              forward passes, when run without gradients (step 2)
  learning:   everything else in the iteration, from the end of scoring to the rollout's metrics line: per-token
              rewards, GAE, λ, the actor's and critics' forward/backward passes and AdamW steps, logging (steps 3-7)

Memory (CUDA only): torch.cuda.max_memory_allocated() over each timed iteration, against the sum of the six
models' parameter bytes plus AdamW's two states (exp_avg, exp_avg_sq, fp32) for the three trained models.
Gradients (one more fp32 copy of the trained parameters) and activations, the KV cache and logits come on top.

    python bench/bench_ppo.py --size 20m --batch_size 8 --max_new_tokens 32 --iterations 2
"""

import argparse
import time
from pathlib import Path

import torch
from common import (
    TOY,
    common_arguments,
    count_parameters,
    describe_device,
    free_memory,
    median,
    run_main,
    save_record,
    score_checkpoint,
    sft_checkpoint,
    sync,
)

import ppo_lagrangian as ppo


def main():
    parser = common_arguments(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter), "20m"
    )
    parser.add_argument(
        "--batch_size", type=int, default=8, help="prompts per rollout (and the PPO minibatch: one update per rollout)"
    )
    parser.add_argument("--train_batch_size", type=int, default=0, help="PPO minibatch (default: --batch_size)")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available())
    parser.add_argument(
        "--fsdp", action="store_true", help="run ppo_lagrangian.py with --fsdp (FSDP2, here in a world of one)"
    )
    args = parser.parse_args()
    actor_dir = sft_checkpoint(args.size, args.scratch)
    reward_dir, cost_dir = (
        score_checkpoint(args.size, args.scratch, "reward"),
        score_checkpoint(args.size, args.scratch, "cost"),
    )
    run_dir = Path(args.scratch) / "runs" / "ppo"
    cuda = torch.cuda.is_available()

    models = []  # the six models, as ppo_lagrangian.main() loads them
    phases = []  # one dict per iteration
    current = {}
    original = {
        name: getattr(ppo, name)
        for name in ("generate_answers", "end_scores", "answer_log_probs", "log_metrics", "load_pretrained")
    }
    original_values_forward = ppo.Critic.forward

    def load_pretrained(model_class, name_or_path, **kwargs):
        loaded = original["load_pretrained"](model_class, name_or_path, **kwargs)
        if isinstance(loaded, torch.nn.Module):
            models.append(loaded)
        return loaded

    def generate_answers(*a, **k):
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        current.clear()
        current.update(start=time.perf_counter(), generation=0.0, scoring=0.0)
        result = original["generate_answers"](*a, **k)
        sync()
        current["generation"] = time.perf_counter() - current["start"]
        current["answer_tokens"] = int(result[1][:, result[2] :].sum())
        return result

    def scoring(function):
        def wrapper(*a, **k):
            if torch.is_grad_enabled():  # a learning forward pass
                return function(*a, **k)
            sync()
            start = time.perf_counter()
            result = function(*a, **k)
            sync()
            current["scoring"] += time.perf_counter() - start
            return result

        return wrapper

    def log_metrics(run, step, record):
        if "rollout" in record:
            sync()
            current["total"] = time.perf_counter() - current["start"]
            current["learning"] = current["total"] - current["generation"] - current["scoring"]
            if cuda:
                current["peak_bytes"] = torch.cuda.max_memory_allocated()
            phases.append(dict(current))
        original["log_metrics"](run, step, record)

    argv = [
        "--algorithm",
        "ppo_lag",
        "--actor_model",
        actor_dir,
        "--reward_model",
        reward_dir,
        "--cost_model",
        cost_dir,
        "--prompt_data",
        TOY / "prompts.jsonl",
        "--output_dir",
        run_dir,
        "--epochs",
        100,
        "--max_steps",
        args.warmup + args.iterations,
        "--per_device_prompt_batch_size",
        args.batch_size,
        "--per_device_train_batch_size",
        args.train_batch_size or args.batch_size,
        "--max_new_tokens",
        args.max_new_tokens,
        "--max_length",
        args.max_length,
        "--actor_lr",
        1e-6,
        "--critic_lr",
        1e-6,
        "--no_gradient_checkpointing",
        "--logging_steps",
        1,
        "--bf16" if args.bf16 else "--no_bf16",
    ] + (["--fsdp"] if args.fsdp else [])
    for name, value in (
        ("generate_answers", generate_answers),
        ("end_scores", scoring(original["end_scores"])),
        ("answer_log_probs", scoring(original["answer_log_probs"])),
        ("log_metrics", log_metrics),
        ("load_pretrained", load_pretrained),
    ):
        setattr(ppo, name, value)
    ppo.Critic.forward = scoring(original_values_forward)
    try:
        run_main(ppo, argv)
    finally:
        for name, value in original.items():
            setattr(ppo, name, value)
        ppo.Critic.forward = original_values_forward

    timed = phases[args.warmup :]
    shares = {phase: median([p[phase] / p["total"] for p in timed]) for phase in ("generation", "scoring", "learning")}
    total = median([p["total"] for p in timed])
    print(f"\n== PPO-Lagrangian iteration breakdown ({describe_device()})")
    print(
        f"size {args.size}, {count_parameters(models[0]) / 1e6:.1f}M parameters per model, "
        f"{args.batch_size} prompts per rollout, "
        f"max_new_tokens {args.max_new_tokens}, bf16 {args.bf16}; {len(timed)} timed iterations"
    )
    per_iteration = ", ".join(f"{p['total']:.3f}" for p in timed)
    print(f"iteration: median {total:.3f} s ({per_iteration})")
    for phase, share in shares.items():
        print(f"{phase:>11}: {share:6.1%}  (median {median([p[phase] for p in timed]):.3f} s)")
    record = {
        "benchmark": "PPO-Lagrangian iteration breakdown",
        "device": describe_device(),
        "size": args.size,
        "parameters_per_model": count_parameters(models[0]),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "bf16": args.bf16,
        "iterations": timed,
        "median_iteration_s": total,
        "shares": shares,
    }
    # memory: the six models' parameters + AdamW's two states of the trained ones
    assert len(models) == 6, f"expected the six models, got {len(models)}"
    param_bytes = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    trained_bytes = sum(p.numel() * p.element_size() for m in models for p in m.parameters() if p.requires_grad)
    state_bytes = 2 * trained_bytes
    record.update(param_bytes=param_bytes, optimizer_state_bytes=state_bytes, gradient_bytes=trained_bytes)
    print(
        f"models: parameters {param_bytes / 2**30:.2f} GiB + AdamW states {state_bytes / 2**30:.2f} GiB = "
        f"{(param_bytes + state_bytes) / 2**30:.2f} GiB (gradients would add {trained_bytes / 2**30:.2f} GiB)"
    )
    if cuda:
        peak = max(p["peak_bytes"] for p in timed)
        record.update(peak_bytes=peak, peak_over_models_and_states=peak / (param_bytes + state_bytes))
        print(
            f"peak memory allocated: {peak / 2**30:.2f} GiB = {peak / (param_bytes + state_bytes):.2f}x parameters "
            "+ optimiser states"
        )
    save_record(record, args.json)
    del models[:]
    free_memory()


if __name__ == "__main__":
    main()
