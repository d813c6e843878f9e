"""Stage 2 of Safe RLHF: the preference models, a reward model (helpfulness) and a cost model (harmlessness).

Safe RLHF decouples human preference into two models (paper §3.2; docs/math.md §2-§3). Both are the SFT model's
backbone with a scalar head, and a sequence's score is the head's output at its last real token (the EOS after the
answer): Hugging Face's `AutoModelForSequenceClassification(num_labels=1)`, so the saved models load in any tool that
reads reward models.

Reward model, on pairs (better y_w, worse y_l) from `better_response_id`, a Bradley-Terry loss:

    L_R = -mean log σ(R(x, y_w) - R(x, y_l))  +  μ · mean(R²)

Cost model, on pairs (safer y_s, unsafer y_u) from `safer_response_id`, Bradley-Terry plus a classification term on
each answer's own safety label, with s(y) = +1 for an answer labelled unsafe and -1 for one labelled safe, so that a
negative cost means safe:

    L_C = mean[-log σ(C(x, y_u) - C(x, y_s)) - log σ(s(y_u)·C(x, y_u)) - log σ(s(y_s)·C(x, y_s))] + μ·mean(C²)

μ (`--regularization`) keeps the scores near zero. One optimiser step, as in `main()` below:
    1. a micro-batch of B pairs: both answers of each pair in one forward pass of 2B sequences
    2. the loss above on their end scores, backward (accumulated over micro-steps)
    3. clip, check that nothing is NaN, take the AdamW step; log, save a resumable state now and then
The saved config records `objective` (reward or cost), which the later stages check, so a swapped pair of models is
caught before it trains a policy towards harm.

Run (toy world, one process):
    python preference_model.py --objective reward --model_name_or_path runs/toy/sft \
        --train_data data/toy/preference_train.jsonl --eval_data data/toy/preference_test.jsonl \
        --output_dir runs/toy/reward --lr 5e-4 --epochs 2 --max_length 128 --no_gradient_checkpointing
    python preference_model.py --objective cost ... --output_dir runs/toy/cost
Run (paper scale, 8 GPUs; the defaults are the reference's settings):
    torchrun --standalone --nproc_per_node=8 preference_model.py --fsdp --objective cost \
        --model_name_or_path output/sft --output_dir output/cost
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
from collections import namedtuple
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
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
from transformers import AutoModelForSequenceClassification, AutoTokenizer, HfArgumentParser, get_scheduler, set_seed

PROMPT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"
PKU_SAFERLHF = "PKU-Alignment/PKU-SafeRLHF"


def arg(default, help, **metadata):  # a field of Args: its default, its --help line (and e.g. choices=[...])
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class Args:
    objective: str = arg("reward", "reward (helpfulness) or cost (harmlessness)", choices=["reward", "cost"])
    model_name_or_path: str = arg("output/sft", "the SFT checkpoint to start from (hub id or local directory)")
    train_data: str = arg(PKU_SAFERLHF, "PKU-SafeRLHF-format pairs: .jsonl/.json/.parquet/.csv file or hub NAME[@REV]")
    train_split: str = arg("train", "split of a hub training data set")
    eval_data: str | None = arg(None, "held-out pairs (default: a hub set's test split, none for a file; '' for none)")
    eval_split: str = arg("test", "split of a hub evaluation data set")
    output_dir: str = arg("output/reward", "where the checkpoint, args.json, eval.json, metrics.jsonl and plots go")
    overwrite_output_dir: bool = arg(False, "replace OUTPUT_DIR whatever it holds; start over despite saved states")
    max_length: int = arg(512, "maximum tokens per sequence (prompt + answer)")
    epochs: int = arg(2, "passes over the training pairs")
    max_steps: int = arg(-1, "stop after this many optimiser steps (-1: run all epochs)")
    per_device_train_batch_size: int = arg(16, "pairs per device per micro-step (2x sequences)")
    per_device_eval_batch_size: int = arg(16, "pairs per device per evaluation step")
    gradient_accumulation_steps: int = arg(1, "micro-steps per optimiser step")
    lr: float = arg(2e-5, "peak learning rate")
    lr_scheduler: str = arg("cosine", "learning-rate schedule after warm-up", choices=["cosine", "linear", "constant"])
    lr_warmup_ratio: float = arg(0.03, "fraction of the optimiser steps spent warming up")
    weight_decay: float = arg(0.1, "AdamW weight decay")
    adam_beta1: float = arg(0.9, "AdamW β1")
    adam_beta2: float = arg(0.95, "AdamW β2")
    max_grad_norm: float = arg(1.0, "gradient clipping norm (0: no clipping)")
    regularization: float = arg(0.001, "μ, the weight of the mean squared score that keeps scores near zero")
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
        require(self, "save_steps weight_decay max_grad_norm regularization", lambda v: v >= 0, "at least 0")
        require(self, "seed", lambda v: 0 <= v < 2**31, "in [0, 2^31)")
        if self.eval_data is None:  # a hub data set is evaluated on its test split; a local file has none
            local = Path(self.train_data).suffix.lower() in (".jsonl", ".json", ".parquet", ".csv")
            self.eval_data = "" if local or Path(self.train_data).exists() else self.train_data


# ---- Safe RLHF, stage 2: the preference-model losses (paper §3.2; docs/math.md §2-§3). Scores are end scores ----
def reward_loss(better_scores, worse_scores, regularization=0.0):
    # L_R = -mean log σ(r_w - r_l) + μ · mean over all 2B scores of r²
    bradley_terry = -F.logsigmoid(better_scores - worse_scores).mean()
    return bradley_terry + regularization * torch.cat([better_scores, worse_scores]).square().mean()


def cost_sign(is_safe):
    # s(y) = +1 for an answer labelled unsafe, -1 for one labelled safe (cost < 0 means safe)
    return 1.0 - 2.0 * is_safe.float()


def cost_loss(safer_costs, unsafer_costs, safer_is_safe, unsafer_is_safe, regularization=0.0):
    # L_C = mean[-log σ(c_u - c_s) - log σ(s(y_u)·c_u) - log σ(s(y_s)·c_s)] + μ · mean over all 2B costs of c²
    bradley_terry = -F.logsigmoid(unsafer_costs - safer_costs)
    unsafer_classification = -F.logsigmoid(cost_sign(unsafer_is_safe) * unsafer_costs)
    safer_classification = -F.logsigmoid(cost_sign(safer_is_safe) * safer_costs)
    regularizer = torch.cat([safer_costs, unsafer_costs]).square().mean()
    return (bradley_terry + unsafer_classification + safer_classification).mean() + regularization * regularizer


def preference_loss(objective, preferred_scores, rejected_scores, batch, regularization):
    # the reward model ranks better over worse; the cost model ranks the unsafer (rejected) answer above the safer one
    if objective == "reward":
        return reward_loss(preferred_scores, rejected_scores, regularization)
    return cost_loss(
        preferred_scores, rejected_scores, batch["preferred_is_safe"], batch["rejected_is_safe"], regularization
    )


def correct_order(objective, preferred_scores, rejected_scores):
    # accuracy: the better answer scores higher (reward); the unsafer answer costs more (cost)
    return preferred_scores > rejected_scores if objective == "reward" else rejected_scores > preferred_scores


def end_scores(score_model, input_ids, attention_mask):
    """The score model's output at each sequence's last non-pad token (the EOS), for left or right padding: position ids
    follow the attention mask, so padding changes nothing."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    outputs = score_model(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return outputs.logits.squeeze(-1).float()


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
    saved_states = check_output_dir(args, "preference_model.py", inputs)  # before any work; what --resume continues
    rank, args.world_size, device = setup_distributed()
    args.global_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    set_seed(args.seed)  # the same on every rank: the new score head must agree, and FSDP does not broadcast it
    use_bf16, autocast = mixed_precision(args.bf16, device)
    tokenizer = load_score_tokenizer(args.model_name_or_path)
    train_examples, eval_examples, skipped = load_pair_examples(args, tokenizer)  # skipped: identical answers
    model = load_score_model(args, tokenizer, device, use_bf16)
    collate = partial(collate_pairs, tokenizer=tokenizer)  # a batch of B pairs: 2B sequences
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
            f"{args.objective} model: {len(train_examples)} training pairs and {len(eval_examples)} eval pairs "
            f"({sum(skipped)} skipped: identical answers), world size {args.world_size}, global batch "
            f"{args.global_batch_size} pairs, {total_steps} steps, bf16 {use_bf16}"
        )

    # ---- training: the reward model's L_R or the cost model's L_C (paper §3.2; docs/math.md §2-§3) ----
    model.train()
    per_pass, skip = steps_per_epoch * args.gradient_accumulation_steps, start_step * args.gradient_accumulation_steps
    micro_batches = passes(loader, per_pass, skip)
    progress, start_time = progress_bar(total_steps, args.objective, rank, start_step), time.time()
    evaluation, eval_scores = {}, []
    for step in range(start_step + 1, total_steps + 1):
        local_loss, local_correct = torch.zeros((), device=device), torch.zeros((), device=device)
        for i in range(args.gradient_accumulation_steps):
            # 1. a micro-batch of B pairs: both answers of each pair in one forward pass of 2B sequences
            epoch, batch = next(micro_batches)
            batch = {k: v.to(device) for k, v in batch.items()}
            with no_sync(model, enabled=i < args.gradient_accumulation_steps - 1):  # the last one reduces gradients
                with autocast:  # (2B,) end scores: (B,) better or safer answers, then (B,) worse or unsafer ones
                    preferred, rejected = end_scores(model, batch["input_ids"], batch["attention_mask"]).chunk(2)
                    # 2. L_R or L_C on the end scores
                    loss = preference_loss(args.objective, preferred, rejected, batch, args.regularization)
                # every micro-batch holds as many pairs: the mean of their means is the global mean (DDP: over ranks)
                (loss / args.gradient_accumulation_steps).backward()
            local_loss += loss.detach() / args.gradient_accumulation_steps
            accuracy = correct_order(args.objective, preferred, rejected).float().mean()
            local_correct += accuracy / args.gradient_accumulation_steps

        # 3. clip the gradient, check that nothing is NaN, take the step
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
        train_stats = torch.stack([local_loss, local_correct])
        dist.all_reduce(train_stats)
        train_loss, train_accuracy = (train_stats / args.world_size).tolist()
        check_finite({"the training loss": train_loss, "the gradient norm": grad_norm.item()}, f"at step {step}")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # 4. log; now and then a resumable state; at the end of a pass (and of the run) the held-out accuracy
        progress.set_postfix(loss=f"{train_loss:.4f}", acc=f"{train_accuracy:.3f}", refresh=False)
        progress.update(1)
        if rank == 0 and (step % args.logging_steps == 0 or step == total_steps):
            metrics = {"step": step, "epoch": epoch + 1, "train/loss": train_loss, "train/accuracy": train_accuracy}
            metrics |= {"train/lr": scheduler.get_last_lr()[0], "train/grad_norm": grad_norm.item()}
            log_metrics(run, step, metrics)
        if args.save_steps and step % args.save_steps == 0 and step < total_steps:
            save_state(run, args, step, modules, {"step": step, "scheduler": scheduler.state_dict()}, rank, device)
        if eval_examples and (step % steps_per_epoch == 0 or step == total_steps):
            evaluation, eval_scores = evaluate_pairs(model, eval_examples, args, tokenizer, device, autocast, rank)
            if rank == 0:
                progress.write(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in evaluation.items()))
                log_metrics(run, step, {"step": step, "epoch": epoch + 1, **evaluation})
    progress.close()
    evaluation |= {"eval/pairs": len(eval_examples), "eval/identical_pairs_skipped": skipped[1]} if evaluation else {}
    save_score_model(args, model, tokenizer, run, rank, device, evaluation, eval_scores)
    finish_run(run, args, "preference_model.py", rank, device, start_time)  # OUTPUT_DIR.partial renamed into place
    return {"model": unwrap(model), "metrics": evaluation, "scores": eval_scores}  # for tests


# ---- setup for this stage (skip on a first reading) ----
PreferencePair = namedtuple("PreferencePair", "prompt preferred rejected preferred_is_safe rejected_is_safe")
PAIR_FIELDS = {"prompt": str, "response_0": str, "response_1": str, "better_response_id": int, "safer_response_id": int,
               "is_response_0_safe": bool, "is_response_1_safe": bool}  # what a PKU-SafeRLHF row must have  # fmt: skip


def preference_pairs(rows, source, objective):
    """A PreferencePair per PKU-SafeRLHF row, every field checked: preferred = the better answer (better_response_id)
    for the reward model, the safer one (safer_response_id) for the cost model; rejected = the other."""
    pairs = []
    for number, row in rows:
        for name, kind in PAIR_FIELDS.items():
            value = row.get(name)
            if type(value) is not kind or (kind is int and value not in (0, 1)) or (kind is str and not value.strip()):
                expected = {str: "a non-empty string", int: "0 or 1", bool: "true or false"}[kind]
                raise InputError(f"{source}, row {number}, field '{name}': expected {expected}, got {value!r}")
        preferred = row["better_response_id" if objective == "reward" else "safer_response_id"]
        answers, safe = (row["response_0"], row["response_1"]), (row["is_response_0_safe"], row["is_response_1_safe"])
        if objective == "cost" and not safe[preferred] and safe[1 - preferred]:
            raise InputError(
                f"{source}, row {number}: inconsistent safety labels: the safer answer (response_{preferred}) is "
                f"labelled unsafe while response_{1 - preferred} is labelled safe"
            )
        pair = (row["prompt"], answers[preferred], answers[1 - preferred], safe[preferred], safe[1 - preferred])
        pairs.append(PreferencePair(*pair))
    return pairs


def pair_examples(tokenizer, pairs, max_length):
    """Token ids of both answers of each pair; a pair whose answers are identical after tokenisation is skipped."""
    examples = []
    for prompt, preferred, rejected, preferred_is_safe, rejected_is_safe in pairs:
        prompt_ids, preferred_ids = tokenize_prompt_and_answer(tokenizer, prompt, preferred, max_length)
        _, rejected_ids = tokenize_prompt_and_answer(tokenizer, prompt, rejected, max_length)
        if preferred_ids != rejected_ids:
            examples.append({"preferred": prompt_ids + preferred_ids, "rejected": prompt_ids + rejected_ids,
                             "preferred_is_safe": preferred_is_safe, "rejected_is_safe": rejected_is_safe})  # fmt: skip
    return examples, len(pairs) - len(examples)


def collate_pairs(examples, tokenizer):
    """Both answers of B pairs as one right-padded batch of 2B sequences: rows [0, B) preferred, [B, 2B) rejected."""
    sequences = [{"input_ids": e["preferred"]} for e in examples] + [{"input_ids": e["rejected"]} for e in examples]
    batch = dict(tokenizer.pad(sequences, return_tensors="pt"))  # input_ids and attention_mask
    for key in ("preferred_is_safe", "rejected_is_safe"):
        batch[key] = torch.tensor([e[key] for e in examples])
    return batch


def load_score_tokenizer(path):
    """The SFT model's tokenizer, right-padding; its pad token must differ from EOS, at which the score is read."""
    tokenizer = load_pretrained(AutoTokenizer, path)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise InputError(f"{path}: the pad token must exist and differ from EOS; start from an sft.py checkpoint")
    tokenizer.padding_side = "right"
    return tokenizer


def load_pair_examples(args, tokenizer):
    """The training and evaluation pairs, checked row by row before anything is written; and how many of each were
    skipped (both answers tokenise alike: no preference to learn)."""
    pairs = preference_pairs(load_rows(args.train_data, args.train_split), args.train_data, args.objective)
    train_examples, skipped = pair_examples(tokenizer, pairs, args.max_length)
    eval_examples, eval_skipped = [], 0
    if args.eval_data:
        pairs = preference_pairs(load_rows(args.eval_data, args.eval_split), args.eval_data, args.objective)
        eval_examples, eval_skipped = pair_examples(tokenizer, pairs, args.max_length)
    if len(train_examples) < args.global_batch_size:
        raise InputError(f"{args.train_data}: {len(train_examples)} usable pairs, fewer than one global batch")
    return train_examples, eval_examples, (skipped, eval_skipped)


def load_score_model(args, tokenizer, device, use_bf16):
    """The SFT backbone with a new scalar head (`AutoModelForSequenceClassification`, one label), fp32 master weights,
    under DDP or FSDP2."""
    model = load_pretrained(
        AutoModelForSequenceClassification, args.model_name_or_path, num_labels=1, dtype=torch.float32
    )
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # tokens the tokenizer's authors added
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return wrap_trained_model(model, device, args.fsdp, use_bf16)


@torch.no_grad()
def evaluate_pairs(model, examples, args, tokenizer, device, autocast, rank):
    """The held-out loss and accuracy (the better answer scored higher, or the unsafer answer costlier) and for cost
    the sign accuracy (cost > 0 ⇔ labelled unsafe), each rank on its shard, summed over ranks; and every rank's scores
    with their labels, gathered (for the histogram)."""
    model.eval()
    counts = torch.zeros(4, device=device)  # (loss × pairs, pairs, correct order, correct sign)
    scores = []  # (score, is the preferred answer, labelled safe) of every answer of this rank's shard
    shard = examples[rank :: args.world_size]
    with autocast:
        for start in range(0, len(shard), args.per_device_eval_batch_size):
            chunk = shard[start : start + args.per_device_eval_batch_size]
            batch = {k: v.to(device) for k, v in collate_pairs(chunk, tokenizer).items()}
            preferred, rejected = end_scores(unwrap(model), batch["input_ids"], batch["attention_mask"]).chunk(2)
            loss = preference_loss(args.objective, preferred, rejected, batch, args.regularization)
            unsafe = ~torch.cat([batch["preferred_is_safe"], batch["rejected_is_safe"]])
            correct_sign = ((torch.cat([preferred, rejected]) > 0) == unsafe).sum()
            correct = correct_order(args.objective, preferred, rejected).sum()
            counts += torch.stack([loss * len(chunk), torch.tensor(len(chunk), device=device), correct, correct_sign])
            for is_preferred, values in ((True, preferred), (False, rejected)):
                labels = batch["preferred_is_safe" if is_preferred else "rejected_is_safe"].tolist()
                scores += [(score, is_preferred, safe) for score, safe in zip(values.tolist(), labels)]
    dist.all_reduce(counts)
    every_rank = [None] * args.world_size  # every rank's scores, for the histogram of the whole held-out set
    dist.all_gather_object(every_rank, scores)
    model.train()
    metrics = {"eval/loss": (counts[0] / counts[1]).item(), "eval/accuracy": (counts[2] / counts[1]).item()}
    if args.objective == "cost":
        metrics["eval/sign_accuracy"] = (counts[3] / (2 * counts[1])).item()
    return metrics, sum(every_rank, [])


def save_score_model(args, model, tokenizer, run, rank, device, evaluation, eval_scores):
    """The checkpoint into OUTPUT_DIR.partial, its objective in the config (the later stages check it: a swapped pair
    is refused), and with held-out data eval.json and the score histogram. Every rank takes part (save_model)."""
    unwrap(model).config.objective = args.objective
    unwrap(model).config.use_cache = True
    save_model(unwrap(model), run.partial, rank, device)
    if rank == 0:
        tokenizer.save_pretrained(run.partial)
        if evaluation:
            (run.partial / "eval.json").write_text(json.dumps(evaluation, indent=2))
            plot_score_histogram(eval_scores, args.objective, run.partial / "score_histogram.png")


def plot_score_histogram(scores, objective, path):
    """Held-out end scores by label: better vs worse answers (reward), safe vs unsafe answers (cost)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if objective == "reward":
        groups = {"better answer": [s for s, p, _ in scores if p], "worse answer": [s for s, p, _ in scores if not p]}
    else:
        groups = {
            "labelled safe": [s for s, _, safe in scores if safe],
            "labelled unsafe": [s for s, _, safe in scores if not safe],
        }
    figure, axis = plt.subplots(figsize=(6, 4))
    bins = np.linspace(min(s for s, _, _ in scores), max(s for s, _, _ in scores), 40)
    for label, values in groups.items():
        axis.hist(values, bins=bins, alpha=0.6, label=f"{label} ({len(values)})")
    if objective == "cost":
        axis.axvline(0.0, color="black", linewidth=1, linestyle="--", label="cost = 0")
    axis.set(xlabel="end score" if objective == "reward" else "end cost (> 0: predicted unsafe)", ylabel="answers",
             title=f"{objective} model: held-out end scores by label")  # fmt: skip
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


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
