"""Stage 1 of Safe RLHF: supervised fine-tuning (SFT).

The SFT model is where everything after it starts: the reward and cost models are initialised from it, and it is
both the initial actor and the frozen reference policy of PPO-Lagrangian (paper §3, "Supervised fine-tuning";
docs/math.md §1). It minimises the next-token cross-entropy of the answer, with the prompt masked out:

    L_SFT(θ) = - Σ_{(x, y)} Σ_t log π_θ(y_t | x, y_<t)  /  (number of answer tokens)

x is the templated prompt `BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:` and y the answer followed by EOS.
The mean is over every answer token of the *global* batch (all ranks, all accumulation steps), so the update does
not depend on how a batch is split across GPUs.

One optimiser step, as in `main()` below:
    1. a global batch: this rank's micro-batches, and the answer tokens counted over all ranks
    2. forward and backward of each micro-batch, its loss sum divided by that global count
    3. clip the gradient norm, check that nothing is NaN, take the AdamW step
    4. log; every --save_steps steps a resumable state (--resume continues from it)

Tokenisation (docs/math.md §1): the prompt and the answer are tokenised as one text and the prompt's tokens are
masked by the prompt's own token count, so the answer gets exactly the tokens a model generates after `ASSISTANT:`.
Deliberate differences from the reference code (PKU-Alignment/safe-rlhf): the text is `template + " " + answer`
(the reference joins `template + answer` with no space; ours gives the answer's first word its usual word-initial
token); plain PyTorch DDP, or FSDP2 with --fsdp, instead of DeepSpeed.

Run (toy world, one process, from scratch):
    python sft.py --model_name_or_path data/tiny-llama --from_scratch --train_data data/toy/sft.jsonl \
        --output_dir runs/toy/sft --epochs 4 --lr 1e-3 --per_device_train_batch_size 32 \
        --gradient_accumulation_steps 1 --max_length 128 --no_gradient_checkpointing
Run (paper scale, 8 GPUs; the defaults are the reference's 7B settings):
    torchrun --standalone --nproc_per_node=8 sft.py --fsdp --model_name_or_path huggyllama/llama-7b \
        --train_data tatsu-lab/alpaca --output_dir output/sft
"""

import argparse
import dataclasses
import fcntl
import functools
import itertools
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, get_scheduler, set_seed

PROMPT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"


def arg(default, help, **metadata):  # a field of Args: its default, its --help line (and e.g. choices=[...])
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class Args:
    model_name_or_path: str = arg(
        "huggyllama/llama-7b", "hub id or local directory of the base model (of its config with --from_scratch)"
    )
    from_scratch: bool = arg(
        False,
        "initialise the weights from the config instead of loading them (the toy world's stand-in for pre-training)",
    )
    train_data: str = arg(
        "tatsu-lab/alpaca",
        "local .jsonl/.json/.parquet/.csv file or hub data set (NAME or "
        "NAME@REVISION); {prompt, response} or Alpaca {instruction, input, output} rows",
    )
    train_split: str = arg("train", "split of a hub training data set")
    eval_data: str = arg("", "optional evaluation data, same formats as train_data")
    eval_split: str = arg("test", "split of a hub evaluation data set")
    output_dir: str = arg("output/sft", "where the Hugging Face checkpoint, args.json and metrics.jsonl go")
    overwrite_output_dir: bool = arg(
        False,
        "replace OUTPUT_DIR even if it is not a finished output of sft.py, and "
        "start over even if a stopped run left saved states",
    )
    max_length: int = arg(512, "maximum tokens per sequence (prompt + answer); longer rows are truncated")
    epochs: int = arg(3, "passes over the training data")
    max_steps: int = arg(-1, "stop after this many optimiser steps (-1: run all epochs)")
    per_device_train_batch_size: int = arg(4, "sequences per device per micro-step")
    per_device_eval_batch_size: int = arg(16, "sequences per device per evaluation step")
    gradient_accumulation_steps: int = arg(8, "micro-steps per optimiser step")
    lr: float = arg(2e-5, "peak learning rate")
    lr_scheduler: str = arg("cosine", "learning-rate schedule after warm-up", choices=["cosine", "linear", "constant"])
    lr_warmup_ratio: float = arg(0.03, "fraction of the optimiser steps spent warming up")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    adam_beta1: float = arg(0.9, "AdamW β1")
    adam_beta2: float = arg(0.95, "AdamW β2")
    max_grad_norm: float = arg(1.0, "gradient clipping norm (0: no clipping)")
    seed: int = arg(42, "random seed")
    bf16: bool = arg(True, "bf16 autocast, used only where the device supports it (CUDA with bf16)")
    gradient_checkpointing: bool = arg(True, "recompute activations in the backward pass to save memory")
    fsdp: bool = arg(
        False,
        "FSDP2: shard the weights, gradients and optimiser states over the ranks (for models too "
        "large for DDP; docs/scale.md)",
    )
    logging_steps: int = arg(1, "log the training loss every N optimiser steps")
    save_steps: int = arg(0, "save a resumable state every N optimiser steps, to OUTPUT_DIR.partial (0: never)")
    resume: bool = arg(False, "continue the stopped run from the newest state in OUTPUT_DIR.partial")
    report_to: str = arg(
        "none", "tracker besides metrics.jsonl (TensorBoard: OUTPUT_DIR/runs)", choices=["none", "tensorboard", "wandb"]
    )
    # derived at run time, right after parsing
    world_size: int = field(default=1, init=False)
    global_batch_size: int = field(default=0, init=False)

    def __post_init__(self):  # every range, checked right after parsing: a bad value is one line naming the flag
        require_finite(self)
        require(
            self,
            "max_length epochs per_device_train_batch_size per_device_eval_batch_size "
            "gradient_accumulation_steps logging_steps",
            lambda v: v >= 1,
            "at least 1",
        )
        require(self, "max_steps", lambda v: v == -1 or v >= 1, "-1 (all epochs) or at least 1")
        require(self, "lr", lambda v: v > 0, "positive")
        require(self, "lr_warmup_ratio adam_beta1 adam_beta2", lambda v: 0 <= v <= 1, "in [0, 1]")
        require(self, "save_steps weight_decay max_grad_norm", lambda v: v >= 0, "at least 0 (0: none)")
        require(self, "seed", lambda v: 0 <= v < 2**31, "in [0, 2^31)")


# ---- Safe RLHF, stage 1: the SFT loss (paper §3; docs/math.md §1) ----
def sft_loss_sum(logits, labels):
    # Σ_t -log π(y_t | x, y_<t) over answer tokens (labels != -100); logits at t predict the token at t+1
    shift_logits = logits[:, :-1].flatten(0, 1).float()  # (B*(T-1), V)
    shift_labels = labels[:, 1:].flatten()  # (B*(T-1),)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")


def count_answer_tokens(labels):
    # the number of terms in the sum above
    return (labels[:, 1:] != -100).sum()


# ---- data to tensors ----
def tokenize_prompt_and_answer(tokenizer, prompt, answer, max_length):
    """Token ids of the templated prompt and of the answer + EOS, truncated to max_length in total. The answer is
    tokenised where the model meets it, after the prompt in one text, and the prompt part is cut off by the prompt's
    own token count: with SentencePiece-style tokenizers (Llama, Mistral) `" " + answer` tokenised alone gives other
    tokens than the ones a model generates after `ASSISTANT:` (docs/math.md §1)."""
    prompt_text = PROMPT_TEMPLATE.format(prompt=prompt)
    prompt_ids = tokenizer(prompt_text)["input_ids"]
    answer_ids = tokenizer(prompt_text + " " + answer.strip())["input_ids"][len(prompt_ids) :]
    answer_ids = answer_ids + [tokenizer.eos_token_id]
    prompt_ids = prompt_ids[:max_length]
    return prompt_ids, answer_ids[: max_length - len(prompt_ids)]


def sft_rows(rows, source):
    """(prompt, response) pairs from {prompt, response} rows or Alpaca {instruction, input, output} rows; as in the
    reference, an Alpaca prompt is `instruction + " " + input` (or the instruction alone when input is empty)."""
    pairs = []
    for row_number, row in enumerate(rows, start=1):
        if row.get("prompt") is not None and row.get("response") is not None:
            fields = {"prompt": row["prompt"], "response": row["response"]}
        elif row.get("instruction") is not None and row.get("output") is not None:
            fields = {"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"]}
        else:
            present = sorted(k for k, v in row.items() if v is not None)
            raise InputError(
                f"{where(source, row_number)}: needs the fields 'prompt' and 'response' (or Alpaca's "
                f"'instruction' and 'output'); it has {present}"
            )
        for name, value in fields.items():
            if not isinstance(value, str) or (not value.strip() and name != "input"):
                raise InputError(
                    f"{where(source, row_number)}, field '{name}': expected a non-empty string, got {value!r}"
                )
        if "prompt" in fields:
            pairs.append((fields["prompt"], fields["response"]))
        else:
            instruction, extra = fields["instruction"], fields["input"]
            pairs.append((f"{instruction} {extra}" if extra else instruction, fields["output"]))
    return pairs


def sft_examples(tokenizer, pairs, max_length):
    """Token ids and labels (-100 on the prompt), dropping rows truncated to nothing of their answer."""
    examples, dropped = [], 0
    for prompt, response in pairs:
        prompt_ids, answer_ids = tokenize_prompt_and_answer(tokenizer, prompt, response, max_length)
        if not answer_ids:
            dropped += 1
            continue
        examples.append({"input_ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids})
    return examples, dropped


def collate(examples, pad_token_id):
    """Right-pad to the longest sequence of the micro-batch."""
    length = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id)
    labels = torch.full((len(examples), length), -100)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = (
            torch.tensor(e["input_ids"]),
            torch.tensor(e["labels"]),
            1,
        )
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def main():
    args = parse_args(Args)
    inputs = {"model_name_or_path": args.model_name_or_path, "train_data": args.train_data, "eval_data": args.eval_data}
    check_output_dir(args.output_dir, args.overwrite_output_dir, "sft.py", inputs)
    saved_states = resumable_states(args.output_dir, args.resume, args.overwrite_output_dir)
    rank, args.world_size, device = setup_distributed()
    args.global_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    set_seed(args.seed)  # the same on every rank: new weights must agree, and FSDP does not broadcast them as DDP does
    use_bf16, autocast = mixed_precision(args.bf16, device)
    tokenizer = load_tokenizer(args.model_name_or_path)
    train_examples, eval_examples, dropped = load_examples(args, tokenizer)
    model = load_model(args, tokenizer, device, use_bf16)
    sampler, loader = data_loader(train_examples, args, lambda batch: collate(batch, tokenizer.pad_token_id))
    steps_per_epoch = len(loader) // args.gradient_accumulation_steps
    total_steps = (
        steps_per_epoch * args.epochs if args.max_steps < 0 else min(args.max_steps, steps_per_epoch * args.epochs)
    )
    optimizer, scheduler = adamw(model, args, total_steps)
    partial, lock, tracker, start_step = start_run(args, rank, saved_states, model, optimizer, scheduler)
    if rank == 0:
        print(
            f"sft: {len(train_examples)} training rows ({dropped} dropped: no answer token left), {len(eval_examples)} "
            f"eval rows, world size {args.world_size}, global batch {args.global_batch_size}, {total_steps} steps, "
            f"bf16 {use_bf16}, {describe_memory([model], args.fsdp)}"
        )

    # ---- the SFT loop (paper §3; docs/math.md §1) ----
    model.train()
    per_pass, skip = steps_per_epoch * args.gradient_accumulation_steps, start_step * args.gradient_accumulation_steps
    micro_batches = passes(loader, sampler, per_pass, skip)
    progress, start_time = progress_bar(total_steps, "sft", rank, initial=start_step), time.time()
    for step in range(start_step + 1, total_steps + 1):
        # 1. a global batch: this rank's micro-batches. The loss is a mean over every answer token of the global batch
        #    (all ranks, all micro-batches), so count them first
        epoch, batches = None, []
        for _ in range(args.gradient_accumulation_steps):
            epoch, batch = next(micro_batches)
            batches.append({k: v.to(device) for k, v in batch.items()})
        global_tokens = sum(count_answer_tokens(batch["labels"]) for batch in batches)
        dist.all_reduce(global_tokens)

        # 2. forward and backward: only the last micro-step all-reduces gradients; the others accumulate locally
        local_loss_sum = torch.zeros((), device=device)
        for i, batch in enumerate(batches):
            with nullcontext() if i == len(batches) - 1 else no_sync(model), autocast:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
                loss_sum = sft_loss_sum(logits, batch["labels"])
            # DDP averages gradients over ranks; × world_size turns that average into Σ / global_tokens
            (loss_sum * args.world_size / global_tokens).backward()
            local_loss_sum += loss_sum.detach()

        # 3. clip the gradient, check that nothing is NaN, take the step
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
        dist.all_reduce(local_loss_sum)
        train_loss = (local_loss_sum / global_tokens).item()
        check_finite({"the training loss": train_loss, "the gradient norm": grad_norm.item()}, f"at step {step}")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # 4. log; now and then a resumable state; at the end of a pass (and of the run) the evaluation loss
        progress.set_postfix(loss=f"{train_loss:.4f}", refresh=False)  # shown at the bar's next refresh, not each step
        progress.update(1)
        if rank == 0 and (step % args.logging_steps == 0 or step == total_steps):
            metrics = {
                "step": step,
                "epoch": epoch + 1,
                "train/loss": train_loss,
                "train/lr": scheduler.get_last_lr()[0],
            }
            metrics |= {"train/grad_norm": grad_norm.item(), "train/tokens": global_tokens.item()}
            log_metrics(partial, tracker, step, metrics | {"train/elapsed_seconds": round(time.time() - start_time, 2)})
        if args.save_steps and step % args.save_steps == 0 and step < total_steps:
            state = {"step": step, "scheduler": scheduler.state_dict()}
            save_state(args.output_dir, step, {"model": (model, optimizer)}, state, args, rank)
        if eval_examples and (step % steps_per_epoch == 0 or step == total_steps):
            eval_loss = evaluate_loss(model, eval_examples, args, tokenizer.pad_token_id, device, autocast, rank)
            if rank == 0:
                progress.write(f"epoch {epoch + 1}: eval/loss {eval_loss:.4f}")
                log_metrics(partial, tracker, step, {"step": step, "epoch": epoch + 1, "eval/loss": eval_loss})
    progress.close()
    save_sft(args, model, tokenizer, partial, lock, tracker, rank, device, start_time)
    return unwrap(model)  # for tests that compare ranks


# ---- setup for this stage (skip on a first reading) ----
def load_tokenizer(path):
    """The base model's tokenizer, with a pad token that is not EOS: the score models read a sequence's score at its
    EOS, found as the last non-pad token."""
    tokenizer = load_pretrained(AutoTokenizer, path)
    if tokenizer.eos_token_id is None:
        raise InputError(f"{path}: the tokenizer has no EOS token; every answer must end with one")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def load_examples(args, tokenizer):
    """The training and evaluation examples, checked row by row before anything is written."""
    rows = sft_rows(load_rows(args.train_data, args.train_split), args.train_data)
    train_examples, dropped = sft_examples(tokenizer, rows, args.max_length)
    eval_examples = []
    if args.eval_data:
        rows = sft_rows(load_rows(args.eval_data, args.eval_split), args.eval_data)
        eval_examples, _ = sft_examples(tokenizer, rows, args.max_length)
    if len(train_examples) < args.global_batch_size:
        raise InputError(
            f"{args.train_data}: {len(train_examples)} usable rows, fewer than one global batch "
            f"({args.global_batch_size})"
        )
    return train_examples, eval_examples, dropped


def load_model(args, tokenizer, device, use_bf16):
    """The base model (or a new one from its config), fp32 master weights, under DDP or FSDP2."""
    if args.from_scratch:
        model = AutoModelForCausalLM.from_config(load_pretrained(AutoConfig, args.model_name_or_path))
    else:
        model = load_pretrained(AutoModelForCausalLM, args.model_name_or_path, dtype=torch.float32)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # a pad token added here, or by its authors
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return wrap_trained_model(model, device, args.fsdp, use_bf16)


@torch.no_grad()
def evaluate_loss(model, examples, args, pad_token_id, device, autocast, rank):
    """Token-weighted mean loss over the whole evaluation set: each rank takes every world_size-th row, no padding."""
    model.eval()
    totals = torch.zeros(2, device=device)  # (loss sum, tokens)
    shard = examples[rank :: args.world_size]
    with autocast:
        for start in range(0, len(shard), args.per_device_eval_batch_size):
            batch = collate(shard[start : start + args.per_device_eval_batch_size], pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = unwrap(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            totals += torch.stack([sft_loss_sum(logits, batch["labels"]), count_answer_tokens(batch["labels"])])
    dist.all_reduce(totals)
    model.train()
    return (totals[0] / totals[1]).item()


def save_sft(args, model, tokenizer, partial, lock, tracker, rank, device, start_time):
    """A Hugging Face checkpoint, written to OUTPUT_DIR.partial and renamed into place when complete; every rank takes
    part (under FSDP the weights are gathered from the shards). Never a model with a NaN or infinite weight."""
    check_finite_weights([model], device)
    unwrap(model).config.use_cache = True
    save_model(unwrap(model), partial, rank)
    if rank == 0:
        stop_tracker(tracker)
        tokenizer.save_pretrained(partial)
        write_args(partial, args, "sft.py")
        finish_output_dir(partial, args.output_dir, lock)
        memory = (
            f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
        )
        print(f"saved {args.output_dir} ({time.time() - start_time:.0f} s{memory})")
    dist.barrier()
    dist.destroy_process_group()


# ---- plumbing shared by the four scripts (tests/test_shared_code.py: a name defined in several has the same code) ----
class InputError(Exception):
    """Bad input from the user: printed as a one-line error, exit status 1, nothing written."""


def parse_args(args_class):
    """The Args dataclass from the command line, Hugging Face style: `--name value`, `--flag` / `--no_flag`, the
    help of each flag from its field, the module docstring as the description of `--help`."""
    formatter = type("Formatter", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
    description = sys.modules[args_class.__module__].__doc__
    parser = HfArgumentParser(args_class, description=description, formatter_class=formatter)
    return parser.parse_args_into_dataclasses()[0]


def require(args, names, ok, allowed):
    """Arguments (space-separated names) checked right after parsing: a bad value is one line naming the flag."""
    for name in names.split():
        if not ok(getattr(args, name)):
            raise InputError(f"--{name} {getattr(args, name)}: must be {allowed}")


def require_finite(args):
    """Every float argument a number: NaN would pass every range check above unnoticed (NaN > 0 is False, so is
    NaN <= 0), and infinity is no learning rate, limit or coefficient."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"--{name} {value}: must be a finite number")


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python X.py` is a world of one (no ports needed)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device


def mixed_precision(enabled, device):
    """bf16 autocast where asked for and supported (CUDA with bf16), else fp32: (bf16 used?, the autocast context)."""
    use_bf16 = enabled and device.type == "cuda" and torch.cuda.is_bf16_supported()
    return use_bf16, torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def sibling(output_dir, suffix):
    """OUTPUT_DIR.partial (the run's working directory) or OUTPUT_DIR.old, beside OUTPUT_DIR. The path is resolved
    first, so that `.`, `..` or a trailing slash name the directory itself."""
    output = Path(output_dir).resolve()
    return output.with_name(output.name + suffix)


def finished_by(directory):
    """The script whose finished output DIRECTORY is (the "script" its args.json names), or None."""
    try:
        return json.loads((Path(directory) / "args.json").read_text()).get("script")
    except (OSError, ValueError, AttributeError):
        return None


def is_locked(lock_file):
    """Whether a live process holds the run lock on LOCK_FILE (a killed process's lock dies with it)."""
    with open(lock_file, "a") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(file, fcntl.LOCK_UN)
        return False


def check_output_dir(output_dir, overwrite, script, inputs):
    """Before any work, on every rank, reading only: OUTPUT_DIR must be a place this run may write and, at the end,
    replace. Refused: a file, a path under a file, an unwritable place, the current directory or one that holds it,
    a directory that is, holds or lies inside a local input (INPUTS: {flag: path}); an existing non-empty directory
    that is not a finished output of SCRIPT, unless --overwrite_output_dir; an OUTPUT_DIR.partial that another live
    run is writing, or one this code did not make (no .lock in it), unless --overwrite_output_dir."""
    output, flag = Path(output_dir).resolve(), f"--output_dir {output_dir}"
    existing = next(path for path in (output, *output.parents) if path.exists())
    if existing.is_file():
        raise InputError(f"{flag}: {existing} is a file" + ("; give a directory" if existing == output else ""))
    if not os.access(existing, os.W_OK):
        raise InputError(f"{flag}: {existing} is not writable")
    if output == Path.cwd().resolve() or output in Path.cwd().resolve().parents:
        raise InputError(f"{flag}: is the current directory or holds it; give a directory of its own")
    for name, value in inputs.items():
        source = Path(value).resolve() if value else None
        if source and source.exists() and (output == source or source in output.parents or output in source.parents):
            raise InputError(f"{flag}: is, holds or lies inside the input --{name} {value}; finishing would replace it")
    if output.is_dir() and any(output.iterdir()) and finished_by(output) != script and not overwrite:
        raise InputError(
            f"{flag}: exists and is not a finished output of {script} (its args.json would say so), so this run will "
            "not replace it; give a new directory, or --overwrite_output_dir to replace it and everything in it"
        )
    partial = sibling(output_dir, ".partial")
    if (partial / ".lock").is_file() and is_locked(partial / ".lock"):
        raise InputError(f"{flag}: another run is writing it (it holds the lock on {partial}); wait for it to end")
    if partial.exists() and not (partial / ".lock").is_file() and not overwrite:
        raise InputError(
            f"{flag}: {partial} exists but was not made by these scripts (no .lock in it); remove it, or give "
            "--overwrite_output_dir to let this run empty it"
        )


def resumable_states(output_dir, resume, overwrite):
    """The saved states OUTPUT_DIR.partial/checkpoint-N of a stopped run, newest first: what --resume continues from
    ([] without --resume). Saved states are never dropped silently: a run without --resume that finds some is refused,
    unless --overwrite_output_dir."""
    partial = sibling(output_dir, ".partial")
    states = sorted(partial.glob("checkpoint-*[0-9]"), key=lambda path: int(path.name.rsplit("-", 1)[1]), reverse=True)
    if resume and not states:
        raise InputError(f"--resume: no saved state (checkpoint-N) in {partial} to resume from")
    if states and not resume and not overwrite:
        raise InputError(
            f"{partial} holds the saved states {', '.join(path.name for path in states)} of a stopped run: pass "
            "--resume to continue it, or --overwrite_output_dir to start over"
        )
    return states if resume else []


def start_output_dir(output_dir, resume, rank):
    """Every rank calls it; rank 0 makes OUTPUT_DIR.partial, the run's working directory, and holds a lock on its
    .lock file until the run ends: a second run into the same output is refused, and a killed run's lock dies with
    it. Without --resume the directory is emptied of a stopped run's files. A final swap that a kill interrupted
    (OUTPUT_DIR.old left, OUTPUT_DIR gone) is undone. Returns (OUTPUT_DIR.partial, the lock) on rank 0, else Nones."""
    partial, old, output = sibling(output_dir, ".partial"), sibling(output_dir, ".old"), Path(output_dir).resolve()
    lock, message = None, [None]
    if rank == 0:
        partial.mkdir(parents=True, exist_ok=True)
        lock = open(partial / ".lock", "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            message[0] = f"--output_dir {output_dir}: another run is writing it (it holds the lock on {partial})"
    dist.broadcast_object_list(message, src=0)  # every rank stops alike, or none does
    if message[0]:
        raise InputError(message[0])
    if rank != 0:
        return None, None
    if old.exists() and not output.exists():
        old.rename(output)
    for path in [] if resume else [path for path in partial.iterdir() if path.name != ".lock"]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return partial, lock


def finish_output_dir(partial, output_dir, lock):
    """Rank 0: swap the finished directory in with renames, so OUTPUT_DIR is never half-written, then let go of the
    lock. The resumable states (checkpoint-N) are not part of the finished output."""
    for checkpoint in partial.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    output, old = Path(output_dir).resolve(), sibling(output_dir, ".old")
    if old.exists():
        shutil.rmtree(old)
    if output.exists():
        output.rename(old)
    partial.rename(output)
    (output / ".lock").unlink()
    lock.close()
    if old.exists():
        shutil.rmtree(old)


def write_args(directory, args, script):
    """args.json: every argument, and the script that wrote the directory (what makes it a finished output)."""
    (directory / "args.json").write_text(json.dumps({"script": script, **dataclasses.asdict(args)}, indent=2))


def check_finite(values, when):
    """Stop before a weight moves if a loss or gradient norm (the same all-reduced numbers on every rank) is NaN or
    infinite."""
    bad = {name: value for name, value in values.items() if not math.isfinite(value)}
    if bad:
        numbers = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
        raise InputError(
            f"{', '.join(bad)} became NaN or infinite {when} ({numbers}); stopped before the update, and OUTPUT_DIR "
            "was left as it was. Lower the learning rate, or check the data and the models"
        )


def check_finite_weights(models, device):
    """Every rank counts its (shards of) weights that hold a NaN or an infinity; a model is saved only if none does."""

    def local(parameter):  # an FSDP shard: this rank's part
        return parameter.to_local() if hasattr(parameter, "to_local") else parameter

    bad = torch.tensor(float(sum(not torch.isfinite(local(p)).all() for m in models for p in m.parameters())))
    bad = bad.to(device)
    dist.all_reduce(bad)
    if bad.item():
        raise InputError(
            f"{int(bad.item())} weight tensors hold NaN or infinite values; nothing was saved and OUTPUT_DIR was "
            "left as it was"
        )


def load_rows(source, split):
    """Rows (dicts) of a data set: a local .jsonl file, read here line by line so that an error names its line; a
    local .json/.parquet/.csv file or a hub data set NAME[@REVISION], read by `datasets.load_dataset`. A field that a
    row lacks is missing or None."""
    import datasets

    path = Path(source)
    builder = {".json": "json", ".jsonl": "jsonl", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix.lower())
    if builder and not path.is_file():
        raise InputError(f"{source}: no such file")
    if not builder and path.exists():
        raise InputError(f"{source}: unknown format; give a .jsonl, .json, .parquet or .csv file, or a hub data set")
    if builder and path.stat().st_size == 0:
        raise InputError(f"{source}: no rows (the file is empty)")
    if builder == "jsonl":
        rows = read_jsonl(path)
    else:
        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity(logging.CRITICAL)  # a malformed file is reported once, below, as one line
        name, _, revision = source.partition("@")
        try:
            if builder:
                dataset = datasets.load_dataset(builder, data_files=source, split="train")
            else:
                dataset = datasets.load_dataset(name, split=split, revision=revision or None)
            rows = list(dataset)  # (invalid UTF-8 shows only here, when the strings are decoded)
        except (
            Exception
        ) as error:  # a malformed file (the library's message says where), offline, unknown name or split
            cause = error.__cause__ or error
            raise InputError(
                f"{source}: cannot be read: {type(cause).__name__}: {' '.join(str(cause).split())}"
            ) from None
    if not rows:
        raise InputError(f"{source}: no rows")
    return rows


def read_jsonl(path):
    """The rows of a JSON Lines file: one JSON object per line, blank lines skipped, in one pass. An error names the
    line: two objects on one line, a trailing comma, text that is not UTF-8, a value that is not an object."""
    rows = []
    with open(path, "rb") as file:
        for number, line in enumerate(file, start=1):
            try:
                text = line.decode("utf-8")
                row = json.loads(text) if text.strip() else None
                if text.strip() and not isinstance(row, dict):
                    raise ValueError(f"a JSON {type(row).__name__}, not an object")
            except ValueError as error:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
                raise InputError(f"{path}, row {number}: not one JSON object: {error}") from None
            if row is not None:
                rows.append(row)
    return rows


def where(source, row_number):
    """How an error names a row: by its line in a .jsonl file (blank lines hold no row), else by its number."""
    if Path(source).suffix.lower() == ".jsonl":
        row_number = jsonl_line_numbers(source)[row_number - 1]
    return f"{source}, row {row_number}"


@functools.lru_cache(maxsize=4)
def jsonl_line_numbers(source):
    """The line of each row of a .jsonl file, read once however many rows an error check names."""
    with open(source, "rb") as file:
        return [number for number, line in enumerate(file, start=1) if line.strip()]


def passes(loader, sampler, per_pass, skip):
    """(epoch, micro-batch) of pass after pass over the data, each shuffled anew (the sampler's epoch, the same on
    every rank), PER_PASS micro-batches a pass; the first SKIP left out (a resumed run has trained on them)."""
    first_epoch, skip = divmod(skip, per_pass)
    for epoch in itertools.count(first_epoch):
        sampler.set_epoch(epoch)
        for i, batch in enumerate(itertools.islice(loader, per_pass)):
            if epoch > first_epoch or i >= skip:  # (a resumed run loads the batches it already trained on, unused)
                yield epoch, batch


def data_loader(examples, args, collate_fn):
    """Shuffled micro-batches of this rank's share; the loader has its own generator, so a resume's skipping of the
    batches already seen leaves the global one alone."""
    sampler = DistributedSampler(examples, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(
        examples,
        batch_size=args.per_device_train_batch_size,
        sampler=sampler,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
        collate_fn=collate_fn,
    )
    return sampler, loader


def adamw(model, args, total_steps):
    """AdamW (no decay on norms and biases) and the warm-up + schedule over TOTAL_STEPS."""
    groups = [
        {"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2))
    warmup = math.ceil(args.lr_warmup_ratio * total_steps)
    return optimizer, get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )


def load_pretrained(model_class, name_or_path, **kwargs):
    """from_pretrained with one clear line when it fails (an empty or foreign directory, a directory without a
    tokenizer, an unknown hub id, no network)."""
    path = Path(name_or_path)
    if path.is_dir() and not any(path.iterdir()):
        raise InputError(f"{name_or_path}: an empty directory, not a Hugging Face model")
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if model_class is AutoTokenizer and path.is_dir() and not any((path / name).is_file() for name in tokenizer_files):
        raise InputError(f"{name_or_path}: holds no tokenizer (none of {', '.join(tokenizer_files)})")
    try:
        return model_class.from_pretrained(name_or_path, **kwargs)
    except Exception as error:  # OSError, ValueError, a missing tokenizer backend, ...
        raise InputError(
            f"{name_or_path}: cannot load a model or tokenizer from it (not a local directory with one, and not on "
            f"the hub): {' '.join(str(error).split())}"
        ) from None


def enable_activation_checkpointing(model):
    """Recompute each layer's activations in the backward pass instead of keeping them (less memory, ~1/3 more
    compute). transformers 5 names it activation_checkpointing_enable (gradient_checkpointing_enable is its
    deprecated alias, gone in 6); transformers 4 has only the old name."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def start_tracker(report_to, partial, args):
    """The tracker asked for by --report_to: TensorBoard event files in OUTPUT_DIR/runs, a wandb run, or none."""
    if report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(partial / "runs")
    if report_to == "wandb":
        import wandb  # optional: pip install wandb

        return wandb.init(config=dataclasses.asdict(args), dir=partial)
    return None


def log_metrics(partial, tracker, step, metrics):
    """One line of OUTPUT_DIR/metrics.jsonl, and the same numbers to the tracker."""
    with open(partial / "metrics.jsonl", "a", encoding="utf-8") as file:
        file.write(json.dumps(metrics) + "\n")
    if hasattr(tracker, "add_scalar"):  # TensorBoard
        for name, value in metrics.items():
            tracker.add_scalar(name, value, step)
    elif tracker is not None:  # wandb
        tracker.log(metrics, step=step)


def stop_tracker(tracker):
    """Flush and close the tracker before OUTPUT_DIR.partial is renamed."""
    if tracker is not None:
        tracker.close() if hasattr(tracker, "add_scalar") else tracker.finish()


def progress_bar(total, desc, rank, initial=0):
    """A tqdm bar on rank 0: live in a terminal; in a log file one line every 30 s, not one per step."""
    return tqdm(
        total=total, initial=initial, desc=desc, disable=rank != 0, mininterval=0.1 if sys.stderr.isatty() else 30
    )


def start_run(args, rank, saved_states, model, optimizer, scheduler):
    """OUTPUT_DIR.partial (locked), the tracker, and with --resume the saved state put back (model, AdamW, schedule,
    generators; the data position is the step). Returns (partial, lock, tracker, step)."""
    partial, lock = start_output_dir(args.output_dir, args.resume, rank)
    tracker = start_tracker(args.report_to, partial, args) if rank == 0 else None
    if not saved_states:
        return partial, lock, tracker, 0
    _, saved = load_state(saved_states, args, {"model": (model, optimizer)}, rank)
    scheduler.load_state_dict(saved["scheduler"])
    if rank == 0:
        trim_metrics(partial, "step", saved["step"])
    return partial, lock, tracker, saved["step"]


def save_state(output_dir, step, modules, rank_state, args, rank):
    """OUTPUT_DIR.partial/checkpoint-N (N: optimiser steps, or rollouts): models and optimisers through
    torch.distributed.checkpoint (each rank writes its part, shards under FSDP), per rank its counters, schedules and
    random-number generators, and args.json (what a resume must match). Written as checkpoint-N.tmp, renamed when
    complete; the newest two are kept."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    partial = sibling(output_dir, ".partial")
    tmp, final = partial / f"checkpoint-{step}.tmp", partial / f"checkpoint-{step}"
    if rank == 0 and tmp.exists():  # a save that a kill cut short
        shutil.rmtree(tmp)
    dist.barrier()
    state = {name: dict(zip(("model", "optimizer"), get_state_dict(m, o))) for name, (m, o) in modules.items()}
    dcp.save(state, checkpoint_id=tmp)
    generators = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save({**rank_state, "generators": generators}, tmp / f"rank{rank}.pt")
    dist.barrier()  # every rank's part is written
    if rank == 0:
        (tmp / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
        if final.exists():  # a state that could not be loaded (a resume went back past it): this one replaces it
            shutil.rmtree(final)
        tmp.rename(final)
        for old in sorted(partial.glob("checkpoint-*[0-9]"), key=lambda path: int(path.name.rsplit("-", 1)[1]))[:-2]:
            shutil.rmtree(old)
    dist.barrier()


def load_state(states, args, modules, rank):
    """Put the newest saved state of STATES that loads back: models and optimisers in place, this rank's generators
    restored; returns its counters. A state saved with other training arguments is refused (a resume continues the
    same run); a state that cannot be read (cut short, a file missing) is named, and the older one is tried."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    failures = []
    for checkpoint in states:
        try:
            saved_args = json.loads((checkpoint / "args.json").read_text())
            check_same_run(saved_args, dataclasses.asdict(args), checkpoint)
            state = {name: dict(zip(("model", "optimizer"), get_state_dict(m, o))) for name, (m, o) in modules.items()}
            dcp.load(state, checkpoint_id=checkpoint)
            rank_state = torch.load(checkpoint / f"rank{rank}.pt", weights_only=False)
            failure = None
        except InputError:
            raise
        except (Exception, dcp.api.CheckpointException) as error:  # a file cut short or missing (first line of why)
            failure = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
        loaded = torch.tensor(float(failure is None))
        dist.all_reduce(loaded, op=dist.ReduceOp.MIN)  # every rank takes the same state, or none takes it
        if loaded.item():
            for name, (model, optimizer) in modules.items():
                set_state_dict(
                    model, optimizer, model_state_dict=state[name]["model"], optim_state_dict=state[name]["optimizer"]
                )
            generators = rank_state.pop("generators")
            random.setstate(generators["python"])
            np.random.set_state(generators["numpy"])
            torch.set_rng_state(generators["torch"])
            if generators["cuda"]:
                torch.cuda.set_rng_state_all(generators["cuda"])
            return checkpoint, rank_state
        failures.append(f"{checkpoint.name}: {failure or 'unreadable on another rank'}")
        if rank == 0:
            logging.warning(f"{checkpoint} cannot be loaded ({failures[-1]}); trying an older state")
    raise InputError(f"--resume: no saved state in {states[0].parent} can be loaded ({'; '.join(failures)})")


RESUME_MAY_CHANGE = (  # what a resume may change: none of it moves a number of the run
    "resume overwrite_output_dir output_dir save_steps logging_steps report_to gradient_checkpointing save_critics"
).split()


def check_same_run(saved, current, checkpoint):
    """A resume continues the run that was saved: every argument that shapes training (learning rates and schedules,
    batch sizes, the number of processes, data, seed, --max_steps and --epochs, which lay out the schedule) must be as
    it was. Only what leaves the numbers alone may change (RESUME_MAY_CHANGE)."""
    for name, value in current.items():
        if name in RESUME_MAY_CHANGE or saved.get(name) == value:
            continue
        if name == "world_size":
            raise InputError(
                f"--resume: {checkpoint} was saved by {saved[name]} processes and this run has {value}; resume with "
                f"torchrun --nproc_per_node={saved[name]}"
            )
        raise InputError(
            f"--resume: --{name} is {value!r} but was {saved.get(name)!r} in the saved run ({checkpoint}); a resume "
            "continues the same run: give the same value, or start over with --overwrite_output_dir"
        )


def trim_metrics(partial, key, last):
    """On --resume: metrics.jsonl keeps its rows up to the saved state (the later ones are written again); a last
    line that the kill cut short is dropped."""
    path, kept = partial / "metrics.jsonl", []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get(key, math.inf) <= last:
            kept.append(line + "\n")
    path.write_text("".join(kept))


def fsdp_shard(model, bf16, reshard_root):
    """FSDP2: one unit for each decoder layer (`_no_split_modules`; gathered just before its forward, freed after),
    then the root (the module whose forward is called: our Critic too); bf16 compute, fp32 masters and reductions on
    CUDA. RESHARD_ROOT: free the root's weights after its forward too (None: FSDP's default, keep them for the
    backward that comes next)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )
    layer_names = {name for module in model.modules() for name in getattr(module, "_no_split_modules", None) or ()}
    for layer in [module for module in model.modules() if type(module).__name__ in layer_names]:
        fully_shard(layer, mp_policy=policy)
    return fully_shard(model, mp_policy=policy, reshard_after_forward=reshard_root)


def wrap_trained_model(model, device, fsdp, bf16):
    """A model that is trained: sharded with --fsdp; otherwise under DDP (it broadcasts rank 0's weights and
    all-reduces the gradients), or bare in a world of one (DDP's gradient buckets would only cost time)."""
    if fsdp:
        return fsdp_shard(model, bf16, reshard_root=None)
    model = model.to(device)
    if dist.get_world_size() == 1:
        return model
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model):
    """The model inside DDP, or the model itself (bare, or FSDP2, which shards it in place)."""
    return model.module if isinstance(model, DDP) else model


@contextmanager
def no_sync(model):
    """Keep this backward's gradients local, to be reduced with the next one's: DDP's no_sync(), FSDP2's
    set_requires_gradient_sync(False); nothing in a world of one."""
    if isinstance(model, DDP):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def save_model(model, path, rank):
    """An ordinary Hugging Face checkpoint whatever the layout: every rank takes part (under FSDP the full state dict
    is gathered from the shards, to the CPU), rank 0 writes it with save_pretrained. A tied weight (the LM head that
    is the embedding) is saved once, under its first name, as save_pretrained does for an unsharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names_of = {}  # a parameter under two names (tied): gathered apart they are two tensors; make them one again
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(parameter), []).append(name)
    for first, *aliases in names_of.values():
        state_dict.update({alias: state_dict[first] for alias in aliases if alias in state_dict})
    if rank == 0:
        model.save_pretrained(path, state_dict=state_dict)


def describe_memory(models, fsdp):
    """The start-up line's memory: this rank's trained state, fp32 weights, gradients and AdamW's two moments, 16
    bytes a parameter (under FSDP its shard)."""
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for m in models for p in m.parameters())
    return f"{'FSDP' if fsdp else 'DDP'}: {16 * local / 2**30:.2f} GiB of weights, gradients and AdamW states per rank"


if __name__ == "__main__":
    try:
        main()
    except (InputError, KeyboardInterrupt) as error:  # one line, printed once: under torchrun every rank meets it
        for bar in list(tqdm._instances):  # closed now: a bar closed later would print after the line
            bar.close()
        if int(os.environ.get("RANK", 0)) == 0:
            interrupted = "interrupted: the output directory was left as it was"
            print(f"error: {error}" if isinstance(error, InputError) else interrupted, file=sys.stderr)
        sys.exit(1 if isinstance(error, InputError) else 130)
