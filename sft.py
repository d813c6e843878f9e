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
import itertools
import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.state_dict as state_dicts
import torch.nn.functional as F
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    get_scheduler,
    set_seed,
)

PROMPT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"


def arg(default, help, **metadata):  # a field of Args: its default, its --help line (and e.g. choices=[...])
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class Args:
    model_name_or_path: str = arg("huggyllama/llama-7b", "hub id or local directory of the base model")
    from_scratch: bool = arg(False, "new weights from the model's config (the toy world's stand-in for pre-training)")
    train_data: str = arg("tatsu-lab/alpaca", "{prompt, response} or Alpaca rows: a local file or hub NAME[@REV]")
    train_split: str = arg("train", "split of a hub training data set")
    eval_data: str = arg("", "optional evaluation data, same formats as train_data")
    eval_split: str = arg("test", "split of a hub evaluation data set")
    output_dir: str = arg("output/sft", "where the Hugging Face checkpoint, args.json and metrics.jsonl go")
    overwrite_output_dir: bool = arg(False, "replace OUTPUT_DIR whatever it holds; start over despite saved states")
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
    fsdp: bool = arg(False, "FSDP2: shard weights, gradients and optimiser states over the ranks (docs/scale.md)")
    logging_steps: int = arg(1, "log the training loss every N optimiser steps")
    save_steps: int = arg(0, "save a resumable state every N optimiser steps, to OUTPUT_DIR.partial (0: never)")
    resume: bool = arg(False, "continue the stopped run from the newest state in OUTPUT_DIR.partial")
    report_to: str = arg("none", "also log to TensorBoard (OUTPUT_DIR/runs)", choices=["none", "tensorboard"])
    # what a resume may change (not a flag): none of it moves a number of the run
    resume_may_change = (
        "resume overwrite_output_dir output_dir save_steps logging_steps report_to gradient_checkpointing"
    )
    # derived at run time, right after parsing
    world_size: int = field(default=1, init=False)
    global_batch_size: int = field(default=0, init=False)

    def __post_init__(self):  # every range, checked right after parsing: a bad value is one line naming the flag
        counts = "max_length epochs per_device_train_batch_size per_device_eval_batch_size gradient_accumulation_steps"
        require(self, counts + " logging_steps", lambda v: v >= 1, "at least 1")
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


def tokenize_prompt_and_answer(tokenizer, prompt, answer, max_length):
    """Token ids of the templated prompt and of the answer + EOS, max_length in all. The answer is tokenised where a
    model meets it, after the prompt in one text, then cut off by the prompt's own token count: with SentencePiece
    tokenizers `" " + answer` alone gives other tokens than a model generates after `ASSISTANT:` (docs/math.md §1)."""
    prompt_text = PROMPT_TEMPLATE.format(prompt=prompt)
    prompt_ids = tokenizer(prompt_text)["input_ids"][:max_length]
    answer_ids = tokenizer(prompt_text + " " + answer.strip())["input_ids"][len(prompt_ids) :]
    return prompt_ids, (answer_ids + [tokenizer.eos_token_id])[: max_length - len(prompt_ids)]


def main():
    args = parse_args(Args)
    inputs = {"model_name_or_path": args.model_name_or_path, "train_data": args.train_data, "eval_data": args.eval_data}
    saved_states = check_output_dir(args, "sft.py", inputs)  # before any work; what --resume continues from
    rank, args.world_size, device = setup_distributed()
    args.global_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    use_bf16, autocast = mixed_precision(args.bf16, device)
    tokenizer = load_tokenizer(args.model_name_or_path)
    train_examples, eval_examples, dropped = load_examples(args, tokenizer)
    set_seed(args.seed)  # the same on every rank: new weights must agree, and FSDP does not broadcast them as DDP does
    model = load_model(args, tokenizer, device, use_bf16)
    collate = DataCollatorForSeq2Seq(tokenizer)  # right-pads the input ids with pad, the labels with -100
    loader = data_loader(train_examples, args.per_device_train_batch_size, args.seed, collate)
    steps_per_epoch = len(loader) // args.gradient_accumulation_steps
    all_epochs = steps_per_epoch * args.epochs
    total_steps = all_epochs if args.max_steps < 0 else min(args.max_steps, all_epochs)
    optimizer, scheduler = adamw(model, args, total_steps)
    modules = {"model": (model, optimizer)}  # what a resumable state holds, besides the counters
    run = start_run(args, rank, saved_states, modules)
    start_step = run.state.get("step", 0)
    if run.state:
        scheduler.load_state_dict(run.state["scheduler"])
    if rank == 0:
        print(
            f"sft: {len(train_examples)} training rows ({dropped} dropped: no answer token left), {len(eval_examples)} "
            f"eval rows, world size {args.world_size}, global batch {args.global_batch_size}, {total_steps} steps, "
            f"bf16 {use_bf16}"
        )

    # ---- the SFT loop (paper §3; docs/math.md §1) ----
    model.train()
    per_pass, skip = steps_per_epoch * args.gradient_accumulation_steps, start_step * args.gradient_accumulation_steps
    micro_batches = passes(loader, per_pass, skip)
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

        # 2. forward and backward; the gradients stay on each rank until the last micro-step's backward reduces them
        local_loss_sum = torch.zeros((), device=device)
        for i, batch in enumerate(batches):
            with no_sync(model, enabled=i < len(batches) - 1):
                with autocast:
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    loss_sum = sft_loss_sum(logits, batch["labels"])  # logits (B, T, V)
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
            metrics = {"step": step, "epoch": epoch + 1, "train/loss": train_loss, "train/grad_norm": grad_norm.item()}
            metrics |= {"train/lr": scheduler.get_last_lr()[0], "train/tokens": global_tokens.item()}
            log_metrics(run, step, metrics | {"train/elapsed_seconds": round(time.time() - start_time, 2)})
        if args.save_steps and step % args.save_steps == 0 and step < total_steps:
            save_state(run, args, step, modules, {"step": step, "scheduler": scheduler.state_dict()}, rank, device)
        if eval_examples and (step % steps_per_epoch == 0 or step == total_steps):
            eval_loss = evaluate_loss(model, eval_examples, args, collate, device, autocast, rank)
            if rank == 0:
                progress.write(f"epoch {epoch + 1}: eval/loss {eval_loss:.4f}")
                log_metrics(run, step, {"step": step, "epoch": epoch + 1, "eval/loss": eval_loss})
    progress.close()
    unwrap(model).config.use_cache = True
    save_model(unwrap(model), run.partial, rank, device)  # every rank takes part: under FSDP the shards are gathered
    if rank == 0:
        tokenizer.save_pretrained(run.partial)
    finish_run(run, args, "sft.py", rank, device, start_time)  # OUTPUT_DIR.partial renamed into place
    return unwrap(model)  # for tests that compare ranks


# ---- setup for this stage (skip on a first reading) ----
def load_tokenizer(path):
    """The base model's tokenizer, right-padding, with a pad token that is not EOS: the score models read a
    sequence's score at its EOS, found as the last non-pad token."""
    tokenizer = load_pretrained(AutoTokenizer, path)
    if tokenizer.eos_token_id is None:
        raise InputError(f"{path}: the tokenizer has no EOS token; every answer must end with one")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = "right"
    return tokenizer


def sft_rows(rows, source):
    """(prompt, response) pairs from {prompt, response} rows or Alpaca {instruction, input, output} rows; as in the
    reference, an Alpaca prompt is `instruction + " " + input` (the instruction alone when input is empty)."""
    pairs = []
    for number, row in rows:
        alpaca = row.get("prompt") is None
        for name in ("instruction", "output") if alpaca else ("prompt", "response"):
            if not isinstance(row.get(name), str) or not row[name].strip():
                found = "missing" if row.get(name) is None else f"expected a non-empty string, got {row[name]!r}"
                raise InputError(f"{source}, row {number}, field '{name}': {found} (rows hold prompt and response)")
        if alpaca:
            instruction = f"{row['instruction']} {row['input']}" if row.get("input") else row["instruction"]
        pairs.append((instruction, row["output"]) if alpaca else (row["prompt"], row["response"]))
    return pairs


def sft_examples(tokenizer, pairs, max_length):
    """Token ids and labels (-100 on the prompt), dropping rows truncated to nothing of their answer."""
    tokenized = [tokenize_prompt_and_answer(tokenizer, prompt, response, max_length) for prompt, response in pairs]
    examples = [{"input_ids": p + a, "labels": [-100] * len(p) + a} for p, a in tokenized if a]
    return examples, len(pairs) - len(examples)


def load_examples(args, tokenizer):
    """The training and evaluation examples, checked row by row before anything is written."""
    pairs = sft_rows(load_rows(args.train_data, args.train_split), args.train_data)
    train_examples, dropped = sft_examples(tokenizer, pairs, args.max_length)
    eval_examples = []
    if args.eval_data:
        pairs = sft_rows(load_rows(args.eval_data, args.eval_split), args.eval_data)
        eval_examples, _ = sft_examples(tokenizer, pairs, args.max_length)
    if len(train_examples) < (batch := args.global_batch_size):
        raise InputError(f"{args.train_data}: {len(train_examples)} usable rows, fewer than one global batch ({batch})")
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
def evaluate_loss(model, examples, args, collate, device, autocast, rank):
    """Token-weighted mean loss over the whole evaluation set: each rank takes every world_size-th row, no padding."""
    model.eval()
    totals = torch.zeros(2, device=device)  # (loss sum, tokens)
    shard = examples[rank :: args.world_size]
    with autocast:
        for start in range(0, len(shard), args.per_device_eval_batch_size):
            batch = collate(shard[start : start + args.per_device_eval_batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = unwrap(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            totals += torch.stack([sft_loss_sum(logits, batch["labels"]), count_answer_tokens(batch["labels"])])
    dist.all_reduce(totals)
    model.train()
    return (totals[0] / totals[1]).item()


# ---- plumbing shared by the four scripts (tests/test_shared_code.py: a name defined in several has the same code) ----
class InputError(Exception):
    """Bad input: printed as one line (exit status 1), with nothing written."""


def parse_args(args_class):
    """Args the Hugging Face way (`--name value`, `--flag`/`--no_flag`, --help); every float a finite number."""
    formatter = type("Formatter", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
    doc = sys.modules[args_class.__module__].__doc__
    args = HfArgumentParser(args_class, description=doc, formatter_class=formatter).parse_args_into_dataclasses()[0]
    require(args, " ".join(k for k, v in vars(args).items() if isinstance(v, float)), math.isfinite, "a finite number")
    return args


def require(args, names, ok, allowed):
    """Arguments (space-separated names) checked right after parsing: a bad value is one line naming the flag."""
    for name in names.split():
        if not ok(getattr(args, name)):
            raise InputError(f"--{name} {getattr(args, name)}: must be {allowed}")


def setup_distributed():
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain `python X.py` is a world of one (no ports needed)."""
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # (a test may call main() again in the same process)
        alone = {} if "RANK" in os.environ else {"store": dist.HashStore(), "rank": 0, "world_size": 1}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **alone)
    return dist.get_rank(), dist.get_world_size(), device


def mixed_precision(enabled, device):
    """bf16 autocast where asked for and supported (CUDA with bf16), else fp32: (bf16 used?, the autocast context)."""
    use_bf16 = enabled and device.type == "cuda" and torch.cuda.is_bf16_supported()
    return use_bf16, torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def check_output_dir(args, script, inputs):
    """Before any work: refuse an OUTPUT_DIR this run may not replace (docs/robustness.md); the states to resume."""
    output, flag = Path(args.output_dir).resolve(), f"--output_dir {args.output_dir}"
    existing = next(path for path in (output, *output.parents) if path.exists())
    owner = json.loads((output / "args.json").read_text()) if (output / "args.json").is_file() else {}
    if existing.is_file() or not os.access(existing, os.W_OK):
        raise InputError(f"{flag}: {existing} is a file or is not writable")
    places = {f"the input --{k} {v}": Path(v).resolve() for k, v in inputs.items() if v}
    for name, place in {"the current directory": Path.cwd().resolve(), **places}.items():
        if place.exists() and (output in (place, *place.parents) or (place in output.parents and name in places)):
            raise InputError(f"{flag}: is, holds or lies inside {name}")
    if output.is_dir() and any(output.iterdir()) and owner.get("script") != script and not args.overwrite_output_dir:
        raise InputError(f"{flag}: exists and is not a finished output of {script}; give a new directory, or "
                         "--overwrite_output_dir to replace it and everything in it")  # fmt: skip
    partial, resume = output.with_name(output.name + ".partial"), getattr(args, "resume", False)
    states = sorted(partial.glob("checkpoint-*[0-9]"), key=lambda path: int(path.name[11:]), reverse=True)
    if resume and not states:
        raise InputError(f"--resume: no saved state (checkpoint-N) in {partial} to resume from")
    if states and not resume and not args.overwrite_output_dir:
        raise InputError(f"{partial} holds the saved states of a stopped run: pass --resume to continue it, or "
                         "--overwrite_output_dir to start over")  # fmt: skip
    return states if resume else []


def start_output_dir(output_dir, resume, rank):
    """Rank 0 makes OUTPUT_DIR.partial and locks it for the run (a second run is refused; a killed run's lock dies with
    it), after putting in place a finished output whose last rename a kill cut short; unless resuming, empties it."""
    output = Path(output_dir).resolve()
    partial, lock, error = output.with_name(output.name + ".partial"), None, [None]
    if rank == 0 and (partial / "args.json").is_file() and not output.exists():
        partial.rename(output)
    if rank == 0:
        partial.mkdir(parents=True, exist_ok=True)
        lock = open(partial / ".lock", "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error[0] = f"--output_dir {output_dir}: another run is writing it (it holds the lock on {partial})"
    dist.broadcast_object_list(error, src=0)  # every rank stops alike, or none does
    if error[0]:
        raise InputError(error[0])
    for path in [p for p in partial.iterdir() if p.name != ".lock"] if rank == 0 and not resume else []:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return partial, lock


def finish_output_dir(partial, args, script, lock):
    """Rank 0: args.json (naming SCRIPT: a finished output), then OUTPUT_DIR.partial renamed into place, so OUTPUT_DIR
    is never half-written (a kill between the two steps below leaves the finished .partial: put in place next run)."""
    (partial / "args.json").write_text(json.dumps({"script": script, **dataclasses.asdict(args)}, indent=2))
    for path in [*partial.glob("checkpoint-*"), partial / ".lock", Path(args.output_dir).resolve()]:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    partial.rename(Path(args.output_dir).resolve())
    lock.close()


def start_run(args, rank, saved_states, modules):
    """A trainer's run: OUTPUT_DIR.partial and its lock, TensorBoard (--report_to), with --resume the saved state."""
    partial, lock = start_output_dir(args.output_dir, args.resume, rank)
    state = load_state(saved_states, args, modules, rank) if saved_states else {}
    tracker = SummaryWriter(partial / "runs") if rank == 0 and args.report_to == "tensorboard" else None
    return SimpleNamespace(partial=partial, lock=lock, tracker=tracker, state=state)


def log_metrics(run, step, metrics):
    """Rank 0: one line of OUTPUT_DIR/metrics.jsonl, and the same numbers to TensorBoard."""
    with open(run.partial / "metrics.jsonl", "a", encoding="utf-8") as file:
        file.write(json.dumps(metrics) + "\n")
    for name, value in metrics.items() if run.tracker else []:
        run.tracker.add_scalar(name, value, step)


def finish_run(run, args, script, rank, device, start_time):
    """Rank 0 closes TensorBoard and renames OUTPUT_DIR.partial into place; then every rank leaves."""
    if rank == 0:
        if run.tracker:
            run.tracker.close()
        finish_output_dir(run.partial, args, script, run.lock)
        memory = (
            f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
        )
        print(f"saved {args.output_dir} ({time.time() - start_time:.0f} s{memory})")
    dist.barrier()
    dist.destroy_process_group()


def save_state(run, args, step, modules, counters, rank, device):
    """OUTPUT_DIR.partial/checkpoint-STEP: MODULES {name: (model, optimizer)} by torch.distributed.checkpoint (each rank
    its part), each rank's COUNTERS and random state, args.json, metrics.jsonl; renamed from .tmp when whole."""
    check_finite_weights([model for model, _ in modules.values()], device)
    tmp, final = run.partial / f"checkpoint-{step}.tmp", run.partial / f"checkpoint-{step}"
    state = {
        name: dict(zip(("model", "optimizer"), state_dicts.get_state_dict(*pair))) for name, pair in modules.items()
    }
    dcp.save(state, checkpoint_id=tmp)
    random_states = {"cpu_random_state": torch.get_rng_state(), "cuda_random_states": torch.cuda.get_rng_state_all()}
    torch.save(counters | random_states, tmp / f"rank{rank}.pt")
    dist.barrier()  # every rank's part is written
    if rank == 0:
        (tmp / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
        shutil.copy(run.partial / "metrics.jsonl", tmp)
        shutil.rmtree(final, ignore_errors=True)  # (a state that did not load, which this one replaces)
        tmp.rename(final)
        for older in sorted(run.partial.glob("checkpoint-*[0-9]"), key=lambda path: int(path.name[11:]))[:-2]:
            shutil.rmtree(older)  # the newest two are kept
    dist.barrier()


def load_state(states, args, modules, rank):
    """The newest of STATES that loads, put back; returns its counters. A resume continues the same run: only the flags
    in args.resume_may_change may differ. A state that cannot be read (cut short) is named, and an older one tried."""
    for checkpoint in states:
        saved = json.loads((checkpoint / "args.json").read_text()) if (checkpoint / "args.json").is_file() else {}
        may_change = args.resume_may_change.split()
        for key in [k for k, v in vars(args).items() if k not in may_change and saved.get(k, v) != v][:1]:
            what = "the number of processes" if key == "world_size" else f"--{key}"
            raise InputError(f"--resume: {what} is {getattr(args, key)!r} but was {saved[key]!r} in {checkpoint}; a "
                             "resume continues the same run (or start over: --overwrite_output_dir)")  # fmt: skip
        try:
            state = {
                name: dict(zip(("model", "optimizer"), state_dicts.get_state_dict(*pair)))
                for name, pair in modules.items()
            }
            dcp.load(state, checkpoint_id=checkpoint)
            counters, failure = torch.load(checkpoint / f"rank{rank}.pt", weights_only=False), None
        except (Exception, dcp.api.CheckpointException) as error:  # cut short or missing: the first line of why
            failure = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
        loaded = torch.tensor(float(failure is None))
        dist.all_reduce(loaded, op=dist.ReduceOp.MIN)  # every rank takes the same state, or none takes it
        if loaded.item():
            for name, (model, optimizer) in modules.items():
                state_dicts.set_state_dict(model, optimizer, model_state_dict=state[name]["model"],
                                           optim_state_dict=state[name]["optimizer"])  # fmt: skip
            torch.set_rng_state(counters["cpu_random_state"])
            torch.cuda.set_rng_state_all(counters["cuda_random_states"])
            if rank == 0:  # the metrics after the state are written again
                shutil.copy(checkpoint / "metrics.jsonl", checkpoint.parent)
            return counters
        if rank == 0:
            print(
                f"{checkpoint} cannot be loaded ({failure or 'not on every rank'}); trying an older state",
                file=sys.stderr,
            )
    raise InputError(f"--resume: no saved state in {states[0].parent} can be loaded (each is named above)")


def check_finite_weights(models, device):
    """Every rank counts its weights (under FSDP its shards) holding NaN or inf: nothing is saved unless none do."""
    local = [p.to_local() if hasattr(p, "to_local") else p for model in models for p in model.parameters()]
    bad = torch.tensor(float(sum(not torch.isfinite(p).all() for p in local)), device=device)
    dist.all_reduce(bad)
    if bad.item():
        raise InputError(f"{int(bad.item())} weight tensors hold NaN or infinite values: nothing was saved")


def check_finite(values, when):
    """Stop before a weight moves if a loss or gradient norm (all-reduced: the same on every rank) is NaN or inf."""
    if not all(math.isfinite(value) for value in values.values()):
        numbers = ", ".join(f"{name} {value:.4g}" for name, value in values.items())
        raise InputError(f"NaN or infinite {when} ({numbers}): stopped before the update, OUTPUT_DIR left as it was")


def load_rows(source, split):
    """[(row number, row dict)]: a local .jsonl file read here, so that an error names its line (blank lines hold no
    row); a local .json/.parquet/.csv file or a hub data set NAME[@REVISION] read by datasets.load_dataset."""
    suffix, (name, _, revision) = Path(source).suffix.lower(), source.partition("@")
    builder = {".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(suffix)
    local = builder is not None or suffix == ".jsonl"
    if local != Path(source).is_file() and (local or Path(source).exists()):  # missing, or a file of no known format
        raise InputError(f"{source}: {'no such file' if local else 'unknown format (.jsonl, .json, .parquet, .csv)'}")
    lines, rows = [], []
    try:
        if suffix == ".jsonl":
            lines = Path(source).read_bytes().splitlines()
        else:
            import datasets  # (imported here: a second of start-up that a run on .jsonl files does without)

            datasets.disable_progress_bars()
            datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a bad file is one line below, not a log
            where = {"path": builder, "data_files": source} if builder else {"path": name, "revision": revision or None}
            rows = list(enumerate(datasets.load_dataset(**where, split="train" if builder else split), 1))
    except Exception as error:  # a malformed file (the library's message says where), offline, no such split, ...
        cause = error.__cause__ or error
        raise InputError(f"{source}: cannot be read: {type(cause).__name__}: {' '.join(str(cause).split())}") from None
    for number, line in [(n, line) for n, line in enumerate(lines, 1) if line.strip()]:
        try:
            rows.append((number, json.loads(line.decode("utf-8"))))  # (text that is not UTF-8: a ValueError too)
        except ValueError as error:
            raise InputError(f"{source}, row {number}: not one JSON object: {error}") from None
        if not isinstance(rows[-1][1], dict):
            raise InputError(f"{source}, row {number}: not one JSON object but a {type(rows[-1][1]).__name__}")
    if not rows:
        raise InputError(f"{source}: no rows")
    return rows


def data_loader(examples, batch_size, seed, collate_fn):
    """Shuffled batches of this rank's share; the loader's own generator: skipping batches leaves the global one."""
    sampler, generator = DistributedSampler(examples, seed=seed, drop_last=True), torch.Generator().manual_seed(seed)
    return DataLoader(examples, batch_size, sampler=sampler, drop_last=True, collate_fn=collate_fn, generator=generator)


def passes(loader, per_pass, skip):
    """(epoch, batch) of pass after pass, each shuffled anew, PER_PASS a pass; the first SKIP (trained on) left out."""
    first_epoch, skip = divmod(skip, per_pass)
    for epoch in itertools.count(first_epoch):
        loader.sampler.set_epoch(epoch)
        for i, batch in enumerate(itertools.islice(loader, per_pass)):
            if epoch > first_epoch or i >= skip:
                yield epoch, batch


def adamw(model, args, total_steps, role=""):
    """AdamW (no decay on norms and biases) and its warm-up and schedule over TOTAL_STEPS, from the flags ROLE_lr,
    ROLE_weight_decay, ROLE_lr_scheduler and ROLE_lr_warmup_ratio (ROLE: actor_ or critic_ in PPO)."""
    lr, decay, schedule, warmup = (
        getattr(args, role + key) for key in ("lr", "weight_decay", "lr_scheduler", "lr_warmup_ratio")
    )
    groups = [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": decay},
              {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(args.adam_beta1, args.adam_beta2))
    warmup = math.ceil(warmup * total_steps)
    return optimizer, get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def load_pretrained(model_class, name_or_path, **kwargs):
    """from_pretrained, or one line naming the path (an empty or foreign directory, an unknown hub id, no network)."""
    try:
        return model_class.from_pretrained(name_or_path, **kwargs)
    except Exception as error:  # OSError, ValueError, a missing tokenizer backend, ...
        reason = " ".join(str(error).split())
        raise InputError(f"{name_or_path}: cannot load a model or tokenizer from it: {reason}") from None


def enable_activation_checkpointing(model):
    """Recompute each layer's activations in the backward pass: less memory, ~1/3 more compute."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def progress_bar(total, desc, rank, initial=0):
    """A tqdm bar on rank 0: live in a terminal, a line every 30 s in a log file."""
    interval = 0.1 if sys.stderr.isatty() else 30
    return tqdm(total=total, initial=initial, desc=desc, disable=rank != 0, mininterval=interval)


def fsdp_shard(model, bf16, reshard_root):
    """FSDP2: a unit per decoder layer (gathered for its forward, then freed), then the root; bf16 compute, fp32 masters
    and reductions. RESHARD_ROOT: free the root's weights after its forward too (None: keep them for the backward)."""
    policy = MixedPrecisionPolicy(**(dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else {}))
    layer_names = {name for module in model.modules() for name in getattr(module, "_no_split_modules", None) or ()}
    for layer in [module for module in model.modules() if type(module).__name__ in layer_names]:
        fully_shard(layer, mp_policy=policy)
    return fully_shard(model, mp_policy=policy, reshard_after_forward=reshard_root)


def wrap_trained_model(model, device, fsdp, bf16):
    """A trained model: sharded with --fsdp, else under DDP (rank 0's weights broadcast, the gradients all-reduced);
    bare in a world of one."""
    if fsdp:
        return fsdp_shard(model, bf16, reshard_root=None)
    model = model.to(device)
    return DDP(model) if dist.get_world_size() > 1 else model  # (DDP finds the device of a one-device model)


def unwrap(model):
    """The model inside DDP, or the model itself (bare, or FSDP2, which shards it in place)."""
    return model.module if isinstance(model, DDP) else model


@contextmanager
def no_sync(model, enabled=True):
    """While ENABLED, the gradients of the forward and backward inside stay on this rank, to be reduced by a later
    backward (gradient accumulation). DDP decides at the forward (no_sync), FSDP2 at the backward: both go inside."""
    fsdp = enabled and hasattr(model, "set_requires_gradient_sync")
    if fsdp:
        model.set_requires_gradient_sync(False)
    with model.no_sync() if enabled and isinstance(model, DDP) else nullcontext():
        yield
    if fsdp:
        model.set_requires_gradient_sync(True)


def save_model(model, path, rank, device):
    """A Hugging Face checkpoint whatever the layout, never with a NaN or infinite weight: the full state dict gathered
    to the CPU (every rank takes part), rank 0 writes it; a tied weight once, as unsharded (gathered, it is two)."""
    check_finite_weights([model], device)
    options = state_dicts.StateDictOptions(full_state_dict=True, cpu_offload=True)
    state_dict = state_dicts.get_model_state_dict(model, options=options)
    names_of = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(parameter), []).append(name)
    for first, *aliases in names_of.values():
        state_dict.update({alias: state_dict[first] for alias in aliases if alias in state_dict})
    if rank == 0:
        model.save_pretrained(path, state_dict=state_dict)


if __name__ == "__main__":
    status = 0
    try:
        main()
    except (InputError, KeyboardInterrupt) as error:  # one line, printed once: under torchrun every rank meets it
        for bar in list(tqdm._instances):  # closed now: a bar closed later would print after the line
            bar.close()
        if int(os.environ.get("RANK", 0)) == 0:
            interrupted = "interrupted: the output directory was left as it was"
            print(f"error: {error}" if isinstance(error, InputError) else interrupted, file=sys.stderr)
        else:
            time.sleep(1)  # torchrun stops every rank once one has failed: rank 0 first says why
        if dist.is_initialized() and (isinstance(error, InputError) or dist.get_backend() == "gloo"):
            dist.destroy_process_group()  # (not NCCL's on Ctrl-C: a rank may be inside a collective)
        status = 1 if isinstance(error, InputError) else 130
    sys.stdout.flush()
    sys.stderr.flush()
    # Exit without the interpreter's teardown: DDP and fully_shard keep gloo's threads alive past destroy_process_group,
    # and one still releasing a collective's tensors then aborts a finalizing Python (docs/robustness.md).
    os._exit(status)
