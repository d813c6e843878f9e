"""Reward-model training throughput: preference_model.py --objective reward against TRL's RewardTrainer.

Both sides start from the same checkpoint (a randomly initialised Llama built from a config, saved once under
the scratch directory, loaded as AutoModelForSequenceClassification with num_labels=1) and train on the same
token ids: data/toy/preference_train.jsonl tokenised once by preference_model.pair_examples (better answer first),
each pair as two sequences (prompt + answer + EOS) in one right-padded forward pass of 2B sequences, the same
batch size, max length, AdamW settings (lr, betas (0.9, 0.95), eps 1e-8, no weight decay, clip 1.0, cosine with
3% warm-up, torch's non-fused AdamW), precision (fp32 on CPU; bf16 autocast over fp32 weights on CUDA), no
gradient checkpointing, and the same score regulariser weight (our μ·mean(r²) = 0.001; TRL's
center_rewards_coefficient = 0.001).

What is timed: ours is preference_model.py's main() (in-process, --max_steps, no eval); TRL is
RewardTrainer.train(). The first --warmup optimiser steps are skipped; the clock runs from the end of the last
warm-up step to the end of the last step (after a CUDA synchronise). Throughput = pairs of the timed steps / time.

    python bench/bench_reward.py --size 20m --batch_size 8 --steps 8 --repeats 3
"""

import argparse
import shutil
import time
from pathlib import Path

import torch
from common import (
    TOY,
    common_arguments,
    free_memory,
    median,
    optimiser_flags,
    patched,
    report,
    run_main,
    save_record,
    sft_checkpoint,
    sync,
    trainer_optimiser,
)
from torch.utils.data import DistributedSampler

import preference_model as pm

REGULARIZATION = 0.001


def run_ours(args, model_dir, run_dir):
    stamps, tokens = [], []
    original_log, original_collate = pm.log_metrics, pm.collate_pairs

    def log_metrics(run, step, record):
        if "train/loss" in record:
            sync()
            stamps.append(time.perf_counter())
        original_log(run, step, record)

    def collate_pairs(examples, tokenizer):
        batch = original_collate(examples, tokenizer)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    argv = [
        "--objective",
        "reward",
        "--model_name_or_path",
        model_dir,
        "--train_data",
        TOY / "preference_train.jsonl",
        "--eval_data",
        "",
        "--output_dir",
        run_dir,
        "--epochs",
        1000,
        "--max_steps",
        args.warmup + args.steps,
        "--per_device_train_batch_size",
        args.batch_size,
        "--gradient_accumulation_steps",
        1,
        "--max_length",
        args.max_length,
        *optimiser_flags(args.lr),
        "--regularization",
        REGULARIZATION,
        "--no_gradient_checkpointing",
        "--logging_steps",
        1,
        "--bf16" if args.bf16 else "--no_bf16",
    ]
    with patched(pm, log_metrics=log_metrics, collate_pairs=collate_pairs):
        result = run_main(pm, argv)
    del result
    shutil.rmtree(run_dir, ignore_errors=True)
    w, n = args.warmup, args.warmup + args.steps
    seconds = stamps[n - 1] - stamps[w - 1]
    return args.steps * args.batch_size / seconds, sum(tokens[w:n]) / seconds


def run_trl(args, model_dir, run_dir, examples, tokenizer):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    dataset = Dataset.from_list([{"chosen_ids": e["preferred"], "rejected_ids": e["rejected"]} for e in examples])
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    total = args.warmup + args.steps
    config = RewardConfig(
        output_dir=str(run_dir),
        max_steps=total,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        **trainer_optimiser(args.lr, total),
        bf16=args.bf16,
        fp16=False,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,
        max_length=args.max_length,
        center_rewards_coefficient=REGULARIZATION,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            sync()
            stamps.append((time.perf_counter(), trainer._total_train_tokens))

    trainer.add_callback(Clock())
    # the same batches in the same order as ours: the sampler of our scripts (torch.randperm seeded with seed + epoch)
    trainer._get_train_sampler = lambda *_, **__: DistributedSampler(
        trainer.train_dataset, num_replicas=1, rank=0, shuffle=True, seed=args.seed, drop_last=True
    )
    trainer.train()
    trainer = model = None  # (freed before the next side runs)
    shutil.rmtree(run_dir, ignore_errors=True)
    (t0, k0), (t1, k1) = stamps[args.warmup - 1], stamps[total - 1]
    return args.steps * args.batch_size / (t1 - t0), (k1 - k0) / (t1 - t0)


def main():
    parser = common_arguments(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter), "20m"
    )
    parser.add_argument("--batch_size", type=int, default=8, help="pairs per step (2x sequences)")
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available())
    args = parser.parse_args()
    if args.bf16 and not torch.cuda.is_available():
        parser.error("--bf16 needs CUDA here: preference_model.py uses bf16 autocast only on CUDA")
    model_dir = sft_checkpoint(args.size, args.scratch)
    run_dir = Path(args.scratch) / "runs" / "reward"

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = pm.load_rows(str(TOY / "preference_train.jsonl"), "train")
    examples, _ = pm.pair_examples(
        tokenizer, pm.preference_pairs(rows, "preference_train.jsonl", "reward"), args.max_length
    )

    ours, theirs, ours_tokens, theirs_tokens = [], [], [], []
    for repeat in range(args.repeats):
        pairs, tokens = run_ours(args, model_dir, run_dir)
        ours.append(pairs)
        ours_tokens.append(tokens)
        free_memory()
        pairs, tokens = run_trl(args, model_dir, run_dir, examples, tokenizer)
        theirs.append(pairs)
        theirs_tokens.append(tokens)
        free_memory()
        print(
            f"repeat {repeat + 1}/{args.repeats}: ours {ours[-1]:,.1f} pairs/s, TRL {theirs[-1]:,.1f} pairs/s "
            f"(timed tokens/s: ours {ours_tokens[-1]:,.0f}, TRL {theirs_tokens[-1]:,.0f})",
            flush=True,
        )

    extra = {
        "size": args.size,
        "batch_size_pairs": args.batch_size,
        "max_length": args.max_length,
        "timed_steps": args.steps,
        "warmup_steps": args.warmup,
        "bf16": args.bf16,
        "ours_tokens_per_s": round(median(ours_tokens)),
        "trl_tokens_per_s": round(median(theirs_tokens)),
    }
    save_record(
        report("Reward-model training throughput (preference pairs/s)", "pairs/s", ours, theirs, 1.2, extra=extra),
        args.json,
    )


if __name__ == "__main__":
    main()
