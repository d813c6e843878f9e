"""Stage 1 of Safe RLHF: supervised fine-tuning (SFT).

The SFT model is the starting point of everything after it: the reward and cost models are initialised
from it, and it is both the initial actor and the frozen reference policy of PPO-Lagrangian (paper §3,
"Supervised fine-tuning"; reference note §1). It minimises the next-token cross-entropy of the answer,
with the prompt masked out:

    L_SFT(θ) = - Σ_{(x, y)} Σ_t log π_θ(y_t | x, y_<t)  /  (number of answer tokens)

where x is the templated prompt `BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:` and y is the answer
followed by EOS. The mean is over every answer token of the *global* batch (all ranks, all accumulation
steps), so the update does not depend on how a batch is split across GPUs.

As in the reference code, the prompt and the answer are tokenised as one text (`template + " " + answer`) and the
prompt's tokens are masked by the prompt's own token count, so the answer gets exactly the tokens a model
generates after `ASSISTANT:`. Alpaca rows become `instruction + " " + input`, as in the reference.
Deliberate difference from the reference code: plain PyTorch DDP, or FSDP2 with --fsdp, instead of DeepSpeed.

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


@dataclass
class Args:
    model_name_or_path: str = field(default="huggyllama/llama-7b", metadata={"help": "hub id or local directory of the base model (or of its config with --from_scratch)"})
    from_scratch: bool = field(default=False, metadata={"help": "initialise the weights from the config instead of loading them (the toy world's stand-in for pre-training)"})
    train_data: str = field(default="tatsu-lab/alpaca", metadata={"help": "local .json/.jsonl/.parquet/.csv file or hub data set (NAME or NAME@REVISION); {prompt, response} or Alpaca {instruction, input, output} rows"})
    train_split: str = field(default="train", metadata={"help": "split of a hub training data set"})
    eval_data: str = field(default="", metadata={"help": "optional evaluation data, same formats as train_data"})
    eval_split: str = field(default="test", metadata={"help": "split of a hub evaluation data set"})
    output_dir: str = field(default="output/sft", metadata={"help": "where the Hugging Face checkpoint, args.json and metrics.jsonl go"})
    max_length: int = field(default=512, metadata={"help": "maximum tokens per sequence (prompt + answer); longer rows are truncated"})
    epochs: int = field(default=3, metadata={"help": "passes over the training data"})
    max_steps: int = field(default=-1, metadata={"help": "stop after this many optimiser steps (-1: run all epochs)"})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "sequences per device per micro-step"})
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "sequences per device per evaluation step"})
    gradient_accumulation_steps: int = field(default=8, metadata={"help": "micro-steps per optimiser step"})
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate"})
    lr_scheduler: str = field(default="cosine", metadata={"help": "learning-rate schedule after warm-up", "choices": ["cosine", "linear", "constant"]})
    lr_warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of the optimiser steps spent warming up"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW β1"})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW β2"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: no clipping)"})
    seed: int = field(default=42, metadata={"help": "random seed"})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast, used only where the device supports it (CUDA with bf16)"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute activations in the backward pass to save memory"})
    fsdp: bool = field(default=False, metadata={"help": "FSDP2: shard the weights, gradients and optimiser states over the ranks (for models too large for DDP; see README, 'Running at paper scale')"})
    logging_steps: int = field(default=1, metadata={"help": "log the training loss every N optimiser steps"})
    save_steps: int = field(default=0, metadata={"help": "save a resumable training state every N optimiser steps, to OUTPUT_DIR.partial/checkpoint-N (0: never)"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest OUTPUT_DIR.partial/checkpoint-N of a run that was stopped"})
    report_to: str = field(default="none", metadata={"help": "experiment tracker besides metrics.jsonl (TensorBoard: OUTPUT_DIR/runs)", "choices": ["none", "tensorboard", "wandb"]})
    # derived at run time, right after parsing
    world_size: int = field(default=1, init=False)
    global_batch_size: int = field(default=0, init=False)

    def __post_init__(self):  # every range, checked right after parsing: a bad value is one line naming the flag
        require(self, "max_length epochs per_device_train_batch_size per_device_eval_batch_size gradient_accumulation_steps logging_steps", lambda v: v >= 1, "at least 1")
        require(self, "max_steps", lambda v: v == -1 or v >= 1, "-1 (all epochs) or at least 1")
        require(self, "lr", lambda v: v > 0, "positive")
        require(self, "lr_warmup_ratio adam_beta1 adam_beta2", lambda v: 0 <= v <= 1, "in [0, 1]")
        require(self, "save_steps weight_decay max_grad_norm", lambda v: v >= 0, "at least 0 (0: none)")


# ---- Safe RLHF, stage 1: the SFT loss (paper §3; reference note §1) ----
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
    """Token ids of the templated prompt and of the answer + EOS, truncated to max_length in total. As in the reference,
    the answer is tokenised where the model meets it, after the prompt in one text, and the prompt part is cut off by
    the prompt's own token count: with SentencePiece-style tokenizers (Llama, Mistral) `" " + answer` tokenised alone
    gives other tokens than the ones a model generates after `ASSISTANT:`."""
    prompt_text = PROMPT_TEMPLATE.format(prompt=prompt)
    prompt_ids = tokenizer(prompt_text)["input_ids"]
    answer_ids = tokenizer(prompt_text + " " + answer.strip())["input_ids"][len(prompt_ids) :] + [tokenizer.eos_token_id]
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
            raise InputError(f"{where(source, row_number)}: needs the fields 'prompt' and 'response' (or Alpaca's "
                             f"'instruction' and 'output'); it has {sorted(k for k, v in row.items() if v is not None)}")
        for name, value in fields.items():
            if not isinstance(value, str) or (not value.strip() and name != "input"):
                raise InputError(f"{where(source, row_number)}, field '{name}': expected a non-empty string, got {value!r}")
        if "prompt" in fields:
            pairs.append((fields["prompt"], fields["response"]))
        else:
            pairs.append((f"{fields['instruction']} {fields['input']}" if fields["input"] else fields["instruction"], fields["output"]))
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
        input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def main():
    args = parse_args(Args)
    check_output_dir(args.output_dir, {"model_name_or_path": args.model_name_or_path, "train_data": args.train_data, "eval_data": args.eval_data})
    rank, args.world_size, device = setup_distributed()
    args.global_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    set_seed(args.seed)  # the same on every rank: new weights (--from_scratch, a new score head) must agree, and FSDP does not broadcast them as DDP does
    use_bf16 = args.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    # ---- data: everything is checked before anything is written ----
    tokenizer = load_pretrained(AutoTokenizer, args.model_name_or_path)
    if tokenizer.eos_token_id is None:
        raise InputError(f"{args.model_name_or_path}: the tokenizer has no EOS token; every answer must end with one")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:  # score models find the EOS as the last non-pad token, so pad must differ from EOS
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    train_examples, dropped = sft_examples(tokenizer, sft_rows(load_rows(args.train_data, args.train_split), args.train_data), args.max_length)
    eval_examples = []
    if args.eval_data:
        eval_examples, _ = sft_examples(tokenizer, sft_rows(load_rows(args.eval_data, args.eval_split), args.eval_data), args.max_length)
    if len(train_examples) < args.global_batch_size:
        raise InputError(f"{args.train_data}: {len(train_examples)} usable rows, fewer than one global batch ({args.global_batch_size})")

    # ---- model ----
    if args.from_scratch:
        model = AutoModelForCausalLM.from_config(load_pretrained(AutoConfig, args.model_name_or_path))
    else:
        model = load_pretrained(AutoModelForCausalLM, args.model_name_or_path, dtype=torch.float32)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # a pad token added here, or by the tokenizer's authors
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = wrap_model(model, device, args.fsdp, use_bf16)

    sampler = DistributedSampler(train_examples, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(train_examples, batch_size=args.per_device_train_batch_size, sampler=sampler, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed),  # its own generator: a resume's skipping leaves the global one alone
                        collate_fn=lambda batch: collate(batch, tokenizer.pad_token_id))
    steps_per_epoch = len(loader) // args.gradient_accumulation_steps
    total_steps = steps_per_epoch * args.epochs if args.max_steps < 0 else min(args.max_steps, steps_per_epoch * args.epochs)
    decay = [p for p in model.parameters() if p.ndim >= 2]  # no decay on norms and biases
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(args.adam_beta1, args.adam_beta2))
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=math.ceil(args.lr_warmup_ratio * total_steps),
                              num_training_steps=total_steps)

    checkpoint = latest_checkpoint(args.output_dir) if args.resume else None
    if args.resume and checkpoint is None:
        raise InputError(f"--resume: no saved state (checkpoint-N) in {args.output_dir}.partial to resume from")
    partial = start_output_dir(args.output_dir, args.resume) if rank == 0 else None
    tracker = start_tracker(args.report_to, partial, args) if rank == 0 else None
    if rank == 0:
        print(f"sft: {len(train_examples)} training rows ({dropped} dropped: truncated to no answer token), "
              f"{len(eval_examples)} eval rows, world size {args.world_size}, global batch {args.global_batch_size}, "
              f"{total_steps} optimiser steps, {sum(p.numel() for p in unwrap(model).parameters()) / 1e6:.1f}M parameters, bf16 {use_bf16}, "
              f"{'FSDP' if args.fsdp else 'DDP'}: {trained_state_bytes([model]) / 2**30:.2f} GiB of weights, gradients and AdamW states per rank")

    def evaluate():
        # token-weighted mean loss over the whole eval set: each rank takes every world_size-th row, no padding
        model.eval()
        totals = torch.zeros(2, device=device)  # (loss sum, tokens)
        shard = eval_examples[rank :: args.world_size]
        with torch.no_grad(), autocast:
            for start in range(0, len(shard), args.per_device_eval_batch_size):
                batch = {k: v.to(device) for k, v in collate(shard[start : start + args.per_device_eval_batch_size], tokenizer.pad_token_id).items()}
                logits = unwrap(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                totals += torch.stack([sft_loss_sum(logits, batch["labels"]), count_answer_tokens(batch["labels"])])
        dist.all_reduce(totals)
        model.train()
        return (totals[0] / totals[1]).item()

    # ---- training loop ----
    model.train()
    step = 0
    if checkpoint:  # --resume: the model, AdamW, the schedule, the data position and the generators as they were
        saved = load_state(checkpoint, {"model": (model, optimizer)}, rank)
        step = saved["step"]
        scheduler.load_state_dict(saved["scheduler"])
        if rank == 0:  # the metrics of the steps after the saved state are written again
            lines = (partial / "metrics.jsonl").read_text().splitlines() if (partial / "metrics.jsonl").exists() else []
            (partial / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= step))
    progress = tqdm(total=total_steps, initial=step, desc="sft", disable=rank != 0)
    start_time, (first_epoch, steps_done) = time.time(), divmod(step, steps_per_epoch)
    for epoch in range(first_epoch, args.epochs):
        sampler.set_epoch(epoch)  # a different shuffle every epoch, the same on every rank
        micro_batches = iter(loader)
        for _ in range(steps_done * args.gradient_accumulation_steps if epoch == first_epoch else 0):
            next(micro_batches)  # a resumed run skips the batches it already trained on
        for _ in range(steps_per_epoch - (steps_done if epoch == first_epoch else 0)):
            if step == total_steps:
                break
            batches = [{k: v.to(device) for k, v in next(micro_batches).items()} for _ in range(args.gradient_accumulation_steps)]
            # The loss is a mean over every answer token of the global batch, so count them first.
            global_tokens = sum(count_answer_tokens(b["labels"]) for b in batches)
            dist.all_reduce(global_tokens)
            local_loss_sum = torch.zeros((), device=device)
            for i, batch in enumerate(batches):
                # Only the last micro-step all-reduces gradients; the others accumulate locally (no_sync).
                last = i == len(batches) - 1
                with nullcontext() if last else no_sync(model), autocast:
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    loss_sum = sft_loss_sum(logits, batch["labels"])
                # DDP averages gradients over ranks; × world_size turns that average into Σ / global_tokens.
                (loss_sum * args.world_size / global_tokens).backward()
                local_loss_sum += loss_sum.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm if args.max_grad_norm > 0 else float("inf"))
            dist.all_reduce(local_loss_sum)
            train_loss = (local_loss_sum / global_tokens).item()
            check_finite({"the training loss": train_loss, "the gradient norm": grad_norm.item()}, f"at step {step + 1}")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{train_loss:.4f}")
            if rank == 0 and (step % args.logging_steps == 0 or step == total_steps):
                log_metrics(partial, tracker, step, {
                    "step": step, "epoch": epoch + 1, "train/loss": train_loss, "train/lr": scheduler.get_last_lr()[0],
                    "train/grad_norm": grad_norm.item(), "train/tokens": global_tokens.item(),
                    "train/elapsed_seconds": round(time.time() - start_time, 2)})
            if args.save_steps and step % args.save_steps == 0 and step < total_steps:
                save_state(args.output_dir, step, {"model": (model, optimizer)}, {"step": step, "scheduler": scheduler.state_dict()}, rank)
        if eval_examples:
            eval_loss = evaluate()
            if rank == 0:
                progress.write(f"epoch {epoch + 1}: eval/loss {eval_loss:.4f}")
                log_metrics(partial, tracker, step, {"step": step, "epoch": epoch + 1, "eval/loss": eval_loss})
        if step == total_steps:
            break
    progress.close()

    # ---- save: a Hugging Face checkpoint, written to OUTPUT_DIR.partial and renamed when complete ----
    check_finite_weights([model], device)
    unwrap(model).config.use_cache = True
    save_model(unwrap(model), partial, rank)  # every rank takes part: under FSDP the weights are gathered from the shards
    if rank == 0:
        stop_tracker(tracker)
        tokenizer.save_pretrained(partial)
        (partial / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
        finish_output_dir(partial, args.output_dir)
        print(f"saved {args.output_dir} ({time.time() - start_time:.0f} s" + (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)" if device.type == "cuda" else ")"))
    dist.barrier()
    dist.destroy_process_group()
    return unwrap(model)  # for tests that compare ranks


# ---- plumbing shared by the four scripts (tests/test_shared_code.py: a name defined in several has the same code) ----
class InputError(Exception):
    """Bad input from the user: printed as a one-line error, exit status 1, nothing written."""


def parse_args(args_class):
    """The Args dataclass from the command line, Hugging Face style: `--name value`, `--flag` / `--no_flag`, the
    help of each flag from its field, the module docstring as the description of `--help`."""
    formatter = type("Formatter", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
    parser = HfArgumentParser(args_class, description=sys.modules[args_class.__module__].__doc__, formatter_class=formatter)
    return parser.parse_args_into_dataclasses()[0]


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


def require(args, names, ok, allowed):
    """Arguments (space-separated names) checked right after parsing: a bad value is one line naming the flag and its range."""
    for name in names.split():
        if not ok(getattr(args, name)):
            raise InputError(f"--{name} {getattr(args, name)}: must be {allowed}")


def check_output_dir(output_dir, inputs):
    """Before any work: refuse an output directory that is a file, lies in an unwritable place, or is, contains or lies
    inside one of the local inputs (finishing the run would replace that input)."""
    output = Path(output_dir).resolve()
    if output.is_file():
        raise InputError(f"--output_dir {output_dir}: an existing file; give a directory")
    for name, value in inputs.items():
        source = Path(value).resolve() if value else None
        if source and source.exists() and (output == source or source in output.parents or output in source.parents):
            raise InputError(f"--output_dir {output_dir}: is, contains or lies inside the input --{name} {value}; finishing would replace it")
    existing = next(path for path in (output, *output.parents) if path.exists())
    if not os.access(existing, os.W_OK):
        raise InputError(f"--output_dir {output_dir}: {existing} is not writable")


def check_finite(values, when):
    """Stop before a weight moves if a loss or gradient norm (the same all-reduced numbers on every rank) is NaN or infinite."""
    bad = {name: value for name, value in values.items() if not math.isfinite(value)}
    if bad:
        raise InputError(f"{', '.join(bad)} became NaN or infinite {when} ({', '.join(f'{k} {v:.4g}' for k, v in values.items())}); stopped before the update, and OUTPUT_DIR was "
                         "left as it was. Lower the learning rate, or check the data and the models")


def check_finite_weights(models, device):
    """Every rank counts its (shards of) weights that hold a NaN or an infinity; a model is saved only if none does."""
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p  # noqa: E731  an FSDP shard: this rank's part
    bad = torch.tensor(float(sum(not torch.isfinite(local(p)).all() for m in models for p in m.parameters())), device=device)
    dist.all_reduce(bad)
    if bad.item():
        raise InputError(f"{int(bad.item())} weight tensors hold NaN or infinite values; nothing was saved and OUTPUT_DIR was left as it was")


def load_rows(source, split):
    """Rows (dicts) of a data set, read by `datasets.load_dataset`: a local .json/.jsonl/.parquet/.csv file, or a hub
    data set NAME or NAME@REVISION. A field that a row lacks comes back as None."""
    import datasets
    builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(Path(source).suffix)
    if builder and not Path(source).is_file():
        raise InputError(f"{source}: no such file")
    if not builder and Path(source).exists():
        raise InputError(f"{source}: unknown format; give a .json, .jsonl, .parquet or .csv file, or a hub data set NAME[@REVISION]")
    if builder and Path(source).stat().st_size == 0:
        raise InputError(f"{source}: no rows (the file is empty)")
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(logging.CRITICAL)  # a malformed file is reported once, below, as one line
    name, _, revision = source.partition("@")
    try:
        if builder:
            dataset = datasets.load_dataset(builder, data_files=source, split="train")
        else:
            dataset = datasets.load_dataset(name, split=split, revision=revision or None)
        rows = list(dataset)  # (invalid UTF-8 shows only here, when the strings are decoded)
    except Exception as error:  # a malformed file (the library's message says where), offline, unknown name or split
        cause = error.__cause__ or error
        raise InputError(f"{source}: cannot be read: {type(cause).__name__}: {' '.join(str(cause).split())}") from None
    if not rows:
        raise InputError(f"{source}: no rows")
    return rows


def where(source, row_number):
    """How an error names a row of a data file: by its line in a .jsonl file (reading skips blank lines), else its number."""
    if Path(source).suffix == ".jsonl" and Path(source).is_file():
        with open(source, encoding="utf-8", errors="replace") as file:
            row_number = [number for number, line in enumerate(file, start=1) if line.strip()][row_number - 1]
    return f"{source}, row {row_number}"


def load_pretrained(model_class, name_or_path, **kwargs):
    """from_pretrained with one clear line when it fails (an empty or foreign directory, an unknown hub id, no network)."""
    if Path(name_or_path).is_dir() and not any(Path(name_or_path).iterdir()):
        raise InputError(f"{name_or_path}: an empty directory, not a Hugging Face model")
    try:
        return model_class.from_pretrained(name_or_path, **kwargs)
    except Exception as error:  # OSError, ValueError, a missing tokenizer backend, ...
        raise InputError(f"{name_or_path}: cannot load a model or tokenizer from it (not a local directory with one, and not on "
                         f"the hub): {' '.join(str(error).split())}") from None


def start_tracker(report_to, partial, args):
    """The experiment tracker asked for by --report_to: TensorBoard event files in OUTPUT_DIR/runs, a wandb run, or none."""
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


def latest_checkpoint(output_dir):
    """The newest resumable state, OUTPUT_DIR.partial/checkpoint-N (one that exists is complete), or None."""
    partial = Path(output_dir).with_name(Path(output_dir).name + ".partial")
    checkpoints = sorted(partial.glob("checkpoint-*[0-9]"), key=lambda path: int(path.name.rsplit("-", 1)[1]))
    return checkpoints[-1] if checkpoints else None


def save_state(output_dir, step, modules, rank_state, rank):
    """OUTPUT_DIR.partial/checkpoint-N (N: optimiser steps, or rollouts): models and optimisers through
    torch.distributed.checkpoint (each rank writes its part, shards under FSDP), and per rank its counters, schedules
    and random-number generators. Written as checkpoint-N.tmp, renamed when complete; the newest two are kept."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    partial = Path(output_dir).with_name(Path(output_dir).name + ".partial")
    tmp = partial / f"checkpoint-{step}.tmp"
    dcp.save({name: dict(zip(("model", "optimizer"), get_state_dict(model, optimizer))) for name, (model, optimizer) in modules.items()},
             checkpoint_id=tmp)
    generators = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                  "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save({**rank_state, "generators": generators}, tmp / f"rank{rank}.pt")
    dist.barrier()  # every rank's part is written
    if rank == 0:
        tmp.rename(partial / f"checkpoint-{step}")
        for old in sorted(partial.glob("checkpoint-*[0-9]"), key=lambda path: int(path.name.rsplit("-", 1)[1]))[:-2]:
            shutil.rmtree(old)
    dist.barrier()


def load_state(checkpoint, modules, rank):
    """Put a saved state back: models and optimisers in place, this rank's generators restored; returns its counters."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    if not (checkpoint / f"rank{rank}.pt").is_file():
        raise InputError(f"{checkpoint}: saved by fewer processes than this run has; resume with the same number of processes")
    state = {name: dict(zip(("model", "optimizer"), get_state_dict(model, optimizer))) for name, (model, optimizer) in modules.items()}
    dcp.load(state, checkpoint_id=checkpoint)
    for name, (model, optimizer) in modules.items():
        set_state_dict(model, optimizer, model_state_dict=state[name]["model"], optim_state_dict=state[name]["optimizer"])
    rank_state = torch.load(checkpoint / f"rank{rank}.pt", weights_only=False)
    generators = rank_state.pop("generators")
    random.setstate(generators["python"])
    np.random.set_state(generators["numpy"])
    torch.set_rng_state(generators["torch"])
    if generators["cuda"]:
        torch.cuda.set_rng_state_all(generators["cuda"])
    return rank_state


def start_output_dir(output_dir, resume=False):
    """Work in OUTPUT_DIR.partial (kept with --resume), renamed into place by finish_output_dir. A final swap that a
    kill interrupted (OUTPUT_DIR.old left, OUTPUT_DIR gone) is undone first: the previous output comes back."""
    output_dir = Path(output_dir)  # Path() drops a trailing slash
    partial, old = (output_dir.with_name(output_dir.name + suffix) for suffix in (".partial", ".old"))
    if old.exists() and not output_dir.exists():
        old.rename(output_dir)
    if partial.exists() and not resume:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    return partial


def finish_output_dir(partial, output_dir):
    """Swap the finished directory in with renames, so OUTPUT_DIR is never half-written; the resumable states
    (checkpoint-N) are not part of the finished output."""
    for checkpoint in partial.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    output_dir = Path(output_dir)
    old = output_dir.with_name(output_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if output_dir.exists():
        output_dir.rename(old)
    partial.rename(output_dir)
    if old.exists():
        shutil.rmtree(old)


def wrap_model(model, device, fsdp, bf16, trained=True):
    """--fsdp: FSDP2 units for each decoder layer (`_no_split_modules`; gathered just before its forward, freed after),
    then the root (the module whose forward is called: our Critic); bf16 compute, fp32 masters and reductions on CUDA.
    Otherwise DDP around a trained model (it broadcasts rank 0's weights, all-reduces gradients); frozen models and a
    world of one stay bare (DDP's gradient buckets would only cost time, ~8% of a CPU step)."""
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        layer_names = {name for module in model.modules() for name in getattr(module, "_no_split_modules", None) or ()}
        for layer in [module for module in model.modules() if type(module).__name__ in layer_names]:
            fully_shard(layer, mp_policy=policy)
        # a trained root stays gathered after its forward (the backward needs it next); a frozen one has no backward
        return fully_shard(model, mp_policy=policy, reshard_after_forward=True if not trained else None)
    model = model.to(device)
    if not trained or dist.get_world_size() == 1:
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
    """An ordinary Hugging Face checkpoint whatever the layout: every rank takes part (under FSDP the full state dict is
    gathered from the shards, to the CPU), rank 0 writes it with save_pretrained."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(path, state_dict=state_dict)


def trained_state_bytes(models):
    """This rank's trained state: fp32 weights, gradients and AdamW's two moments, 16 bytes a parameter (FSDP: its shard)."""
    return 16 * sum((p.to_local() if hasattr(p, "to_local") else p).numel() for model in models for p in model.parameters())


if __name__ == "__main__":
    try:
        main()
    except InputError as error:  # one line, printed once: under torchrun every rank meets the same error
        for progress_bar in list(tqdm._instances):  # closed now: a bar closed later would print after the error line
            progress_bar.close()
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
