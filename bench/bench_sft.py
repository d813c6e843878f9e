"""SFT training throughput: sft.py against TRL's SFTTrainer, in the same process on the same machine.

Both sides train the same randomly initialised Llama (built from a config, no download) on the same token ids:
data/toy/sft.jsonl tokenised once by sft.sft_examples (templated prompt + answer + EOS, prompt masked out of
the loss), right-padded to the longest sequence of each batch, the same batch size, max length, AdamW settings
(lr, betas (0.9, 0.95), eps 1e-8, no weight decay, clip 1.0, cosine schedule with 3% warm-up, torch's
non-fused AdamW on both sides), precision (fp32 on CPU; bf16 autocast over fp32 weights on CUDA) and no
gradient checkpointing. TRL gets the ids as a pre-tokenised data set with a completion_mask and
completion_only_loss=True (prompt-masked loss), packing and padding-free off.

What is timed: ours is sft.py's own main() (run in-process with --max_steps); TRL is SFTTrainer.train(). On each
side the first --warmup optimiser steps are skipped, and the clock runs from the end of the last warm-up step to
the end of the last step (wall clock, after a CUDA synchronise). Throughput = non-pad tokens of the timed
steps / that time. The sides alternate, --repeats times each; the median of each side and their ratio are printed.

    python bench/bench_sft.py --size 20m --batch_size 16 --steps 8 --repeats 3      # CPU
    python bench/bench_sft.py --size 0.5b --batch_size 64 --steps 30 --repeats 3    # GPU (bf16), also prints MFU
"""

import argparse
import shutil
import time
from pathlib import Path

import torch
from common import (
    H100_BF16_DENSE_FLOPS,
    SIZES,
    TOY,
    common_arguments,
    config_dir,
    count_parameters,
    device,
    free_memory,
    median,
    optimiser_flags,
    patched,
    report,
    run_main,
    save_record,
    sync,
    trainer_optimiser,
)
from torch.utils.data import DistributedSampler

import sft


def run_ours(args, model_dir, run_dir):
    stamps, batches = [], []  # wall-clock time at the end of each step; (non-pad, padded) tokens of each batch
    original_log, original_collator = sft.log_metrics, sft.DataCollatorForSeq2Seq

    def log_metrics(run, step, record):
        if "train/loss" in record:  # written once per optimiser step, after the step's .item() calls
            sync()
            stamps.append(time.perf_counter())
        original_log(run, step, record)

    def collator(*a, **k):  # the collator sft.py builds, counting the tokens of each batch it makes
        collate = original_collator(*a, **k)

        def counted(examples):
            batch = collate(examples)
            batches.append((int(batch["attention_mask"].sum()), batch["input_ids"].numel()))
            return batch

        return counted

    argv = [
        "--model_name_or_path",
        model_dir,
        "--from_scratch",
        "--train_data",
        TOY / "sft.jsonl",
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
        "--no_gradient_checkpointing",
        "--logging_steps",
        1,
        "--bf16" if args.bf16 else "--no_bf16",
    ]
    with patched(sft, log_metrics=log_metrics, DataCollatorForSeq2Seq=collator):
        model = run_main(sft, argv)
    n_params = count_parameters(model)
    model = None  # freed before the next side runs
    shutil.rmtree(run_dir, ignore_errors=True)  # the saved checkpoint: not kept
    w, n = args.warmup, args.warmup + args.steps
    seconds = stamps[n - 1] - stamps[w - 1]
    tokens = sum(real for real, _ in batches[w:n])
    padded = sum(total for _, total in batches[w:n])
    return tokens / seconds, padded / seconds, n_params, padded / args.steps / args.batch_size, tokens


def run_trl(args, model_dir, run_dir, examples, tokenizer):
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    dataset = Dataset.from_list(
        [
            {"input_ids": e["input_ids"], "completion_mask": [int(label != -100) for label in e["labels"]]}
            for e in examples
        ]
    )
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    total = args.warmup + args.steps
    config = SFTConfig(
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
        packing=False,
        padding_free=False,
        completion_only_loss=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    stamps = []  # (time, non-pad tokens so far) at the end of each optimiser step

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
    return (k1 - k0) / (t1 - t0), k1 - k0


def main():
    parser = common_arguments(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter), "20m"
    )
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimiser steps at the start of each run")
    parser.add_argument("--steps", type=int, default=8, help="timed optimiser steps per run")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available())
    args = parser.parse_args()
    if args.bf16 and not torch.cuda.is_available():
        parser.error("--bf16 needs CUDA here: sft.py uses bf16 autocast only on CUDA")
    model_dir = config_dir(args.size, args.scratch)
    run_dir = Path(args.scratch) / "runs" / "sft"

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # has a pad token distinct from EOS: no resize on either side
    examples, _ = sft.sft_examples(
        tokenizer, sft.sft_rows(sft.load_rows(str(TOY / "sft.jsonl"), "train"), "sft.jsonl"), args.max_length
    )

    ours, ours_padded, theirs, n_params = [], [], [], 0
    for repeat in range(args.repeats):
        tokens_per_second, padded_per_second, n_params, mean_length, our_tokens = run_ours(args, model_dir, run_dir)
        ours.append(tokens_per_second)
        ours_padded.append(padded_per_second)
        free_memory()
        tokens_per_second, their_tokens = run_trl(args, model_dir, run_dir, examples, tokenizer)
        theirs.append(tokens_per_second)
        free_memory()
        print(
            f"repeat {repeat + 1}/{args.repeats}: ours {ours[-1]:,.0f} tokens/s, TRL {theirs[-1]:,.0f} tokens/s "
            f"(timed tokens: ours {our_tokens}, TRL {their_tokens})",
            flush=True,
        )

    extra = {
        "size": args.size,
        "parameters": n_params,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "timed_steps": args.steps,
        "warmup_steps": args.warmup,
        "bf16": args.bf16,
        "device_type": device().type,
        "pad_share": round(1 - median(ours) / median(ours_padded), 3),
    }
    if torch.cuda.is_available():
        # MFU = 6·N·(tokens/s) / peak, N = all parameters (the tied embedding counted once, as the LM head's matmul).
        # Attention score FLOPs (12·L·d·T per token, PaLM's formula, T = mean padded batch length) are left out of
        # the MFU; their share of 6·N is printed.
        config = SIZES[args.size]
        attention = 12 * config["num_hidden_layers"] * config["hidden_size"] * mean_length
        extra["mfu_ours"] = round(6 * n_params * median(ours) / H100_BF16_DENSE_FLOPS, 4)
        extra["mfu_trl"] = round(6 * n_params * median(theirs) / H100_BF16_DENSE_FLOPS, 4)
        extra["attention_flops_share_estimate"] = round(attention / (6 * n_params), 4)
    save_record(
        report("SFT training throughput (non-pad tokens/s)", "tokens/s", ours, theirs, 1.2, extra=extra), args.json
    )


if __name__ == "__main__":
    main()
