"""Stage 2 of Safe RLHF: the preference models, a reward model (helpfulness) and a cost model (harmlessness).

Safe RLHF decouples human preference into two models (paper §3.2; reference note §2). Both are the SFT model's
backbone with a scalar head, and a sequence's score is the head's output at its last real token (the EOS after
the answer): Hugging Face's `AutoModelForSequenceClassification(num_labels=1)`, so the saved models load in any
tool that reads reward models.

Reward model, on pairs (better y_w, worse y_l) from `better_response_id`, a Bradley-Terry loss:

    L_R = -mean log σ(R(x, y_w) - R(x, y_l))  +  μ · mean(R²)

Cost model, on pairs (safer y_s, unsafer y_u) from `safer_response_id`, Bradley-Terry plus a classification
term on each answer's own safety label, with s(y) = +1 for an answer labelled unsafe and -1 for one labelled
safe, so that a negative cost means safe:

    L_C = mean[ -log σ(C(x, y_u) - C(x, y_s)) - log σ(s(y_u) · C(x, y_u)) - log σ(s(y_s) · C(x, y_s)) ]  +  μ · mean(C²)

μ (`--regularization`) keeps the scores near zero. Both answers of a pair go through the model in one
concatenated forward pass of 2B sequences. The saved config records `objective` (reward or cost), which the
later stages check, so a swapped pair of models is caught before it trains a policy towards harm.

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
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections import namedtuple
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
from transformers import AutoModelForSequenceClassification, AutoTokenizer, HfArgumentParser, get_scheduler, set_seed

PROMPT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"
PKU_SAFERLHF = "PKU-Alignment/PKU-SafeRLHF"


@dataclass
class Args:
    objective: str = field(default="reward", metadata={"help": "which model to train: reward (helpfulness) or cost (harmlessness)", "choices": ["reward", "cost"]})
    model_name_or_path: str = field(default="output/sft", metadata={"help": "the SFT checkpoint to start from (hub id or local directory)"})
    train_data: str = field(default=PKU_SAFERLHF, metadata={"help": "PKU-SafeRLHF-format preference pairs: local .json/.jsonl/.parquet/.csv or hub NAME[@REVISION]"})
    train_split: str = field(default="train", metadata={"help": "split of a hub training data set"})
    eval_data: str = field(default=PKU_SAFERLHF, metadata={"help": "held-out preference pairs, same formats ('' to skip evaluation)"})
    eval_split: str = field(default="test", metadata={"help": "split of a hub evaluation data set"})
    output_dir: str = field(default="output/reward", metadata={"help": "where the checkpoint, args.json, eval.json, metrics.jsonl and the score histogram go"})
    max_length: int = field(default=512, metadata={"help": "maximum tokens per sequence (prompt + answer)"})
    epochs: int = field(default=2, metadata={"help": "passes over the training pairs"})
    max_steps: int = field(default=-1, metadata={"help": "stop after this many optimiser steps (-1: run all epochs)"})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "pairs per device per micro-step (2x sequences)"})
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "pairs per device per evaluation step"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-steps per optimiser step"})
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate"})
    lr_scheduler: str = field(default="cosine", metadata={"help": "learning-rate schedule after warm-up", "choices": ["cosine", "linear", "constant"]})
    lr_warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of the optimiser steps spent warming up"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW β1"})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW β2"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: no clipping)"})
    regularization: float = field(default=0.001, metadata={"help": "μ, the weight of the mean squared score that keeps scores near zero"})
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
        require(self, "save_steps weight_decay max_grad_norm regularization", lambda v: v >= 0, "at least 0")


# ---- Safe RLHF, stage 2: the preference-model losses (paper §3.2). Scores are end scores, one per answer ----
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
    return cost_loss(preferred_scores, rejected_scores, batch["preferred_is_safe"], batch["rejected_is_safe"], regularization)


def correct_order(objective, preferred_scores, rejected_scores):
    # accuracy: the better answer scores higher (reward); the unsafer answer costs more (cost)
    return preferred_scores > rejected_scores if objective == "reward" else rejected_scores > preferred_scores


# ---- data to tensors ----
PreferencePair = namedtuple("PreferencePair", "prompt preferred rejected preferred_is_safe rejected_is_safe")


def preference_pairs(rows, source, objective):
    """A PreferencePair per PKU-SafeRLHF row: preferred = the better answer (better_response_id) for the reward model,
    the safer one (safer_response_id) for the cost model; rejected = the other. Checks every field a row needs."""
    pairs = []
    for row_number, row in enumerate(rows, start=1):
        row_name = where(source, row_number)
        for name, kind in (("prompt", str), ("response_0", str), ("response_1", str), ("better_response_id", int),
                           ("safer_response_id", int), ("is_response_0_safe", bool), ("is_response_1_safe", bool)):
            if row.get(name) is None:
                raise InputError(f"{row_name}: missing field '{name}' (PKU-SafeRLHF rows have prompt, response_0, response_1, "
                                 f"better_response_id, safer_response_id, is_response_0_safe, is_response_1_safe)")
            if not isinstance(row[name], kind) or (kind is int and (isinstance(row[name], bool) or row[name] not in (0, 1))) or (kind is str and not row[name].strip()):
                raise InputError(f"{row_name}, field '{name}': expected {'0 or 1' if kind is int else 'a non-empty string' if kind is str else kind.__name__}, got {row[name]!r}")
        responses, is_safe = (row["response_0"], row["response_1"]), (row["is_response_0_safe"], row["is_response_1_safe"])
        preferred = row["better_response_id"] if objective == "reward" else row["safer_response_id"]
        rejected = 1 - preferred
        if objective == "cost" and not is_safe[preferred] and is_safe[rejected]:
            raise InputError(f"{row_name}: inconsistent safety labels: the safer answer (response_{preferred}) is labelled unsafe "
                             f"while response_{rejected} is labelled safe")
        pairs.append(PreferencePair(row["prompt"], responses[preferred], responses[rejected], is_safe[preferred], is_safe[rejected]))
    return pairs


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


def pair_examples(tokenizer, pairs, max_length):
    """Token ids of both answers of each pair; a pair whose answers are identical after tokenisation is skipped."""
    examples, identical = [], 0
    for pair in pairs:
        prompt_ids, preferred_ids = tokenize_prompt_and_answer(tokenizer, pair.prompt, pair.preferred, max_length)
        _, rejected_ids = tokenize_prompt_and_answer(tokenizer, pair.prompt, pair.rejected, max_length)
        if preferred_ids == rejected_ids:
            identical += 1
            continue
        examples.append({"preferred": prompt_ids + preferred_ids, "rejected": prompt_ids + rejected_ids,
                         "preferred_is_safe": pair.preferred_is_safe, "rejected_is_safe": pair.rejected_is_safe})
    return examples, identical


def collate_pairs(examples, pad_token_id):
    """Both answers of B pairs as one right-padded batch of 2B sequences: rows [0, B) preferred, [B, 2B) rejected."""
    sequences = [e["preferred"] for e in examples] + [e["rejected"] for e in examples]
    length = max(map(len, sequences))
    input_ids = torch.full((len(sequences), length), pad_token_id)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, ids in enumerate(sequences):
        input_ids[i, : len(ids)], attention_mask[i, : len(ids)] = torch.tensor(ids), 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "preferred_is_safe": torch.tensor([e["preferred_is_safe"] for e in examples]),
            "rejected_is_safe": torch.tensor([e["rejected_is_safe"] for e in examples])}


def end_scores(score_model, input_ids, attention_mask):
    """The score model's output at each sequence's last non-pad token (the EOS), for left or right padding.
    Position ids follow the attention mask, so padding changes nothing."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return score_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits.squeeze(-1).float()


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
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise InputError(f"{args.model_name_or_path}: the tokenizer's pad token must exist and differ from EOS, or the score "
                         "would not be read at the EOS; sft.py adds one, so start from an sft.py checkpoint")
    train_pairs = preference_pairs(load_rows(args.train_data, args.train_split), args.train_data, args.objective)
    train_examples, train_identical = pair_examples(tokenizer, train_pairs, args.max_length)
    eval_examples, eval_identical = [], 0
    if args.eval_data:
        eval_pairs = preference_pairs(load_rows(args.eval_data, args.eval_split), args.eval_data, args.objective)
        eval_examples, eval_identical = pair_examples(tokenizer, eval_pairs, args.max_length)
    if len(train_examples) < args.global_batch_size:
        raise InputError(f"{args.train_data}: {len(train_examples)} usable pairs, fewer than one global batch ({args.global_batch_size})")

    # ---- model: the SFT backbone with a new scalar head ----
    model = load_pretrained(AutoModelForSequenceClassification, args.model_name_or_path, num_labels=1, dtype=torch.float32)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # tokens the tokenizer's authors added (a pad token, say)
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = wrap_model(model, device, args.fsdp, use_bf16)

    sampler = DistributedSampler(train_examples, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(train_examples, batch_size=args.per_device_train_batch_size, sampler=sampler, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed),  # its own generator: a resume's skipping leaves the global one alone
                        collate_fn=lambda batch: collate_pairs(batch, tokenizer.pad_token_id))
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
        print(f"{args.objective} model: {len(train_examples)} training pairs ({train_identical} skipped: identical answers), "
              f"{len(eval_examples)} eval pairs ({eval_identical} skipped), world size {args.world_size}, "
              f"global batch {args.global_batch_size} pairs, {total_steps} optimiser steps, bf16 {use_bf16}, "
              f"{'FSDP' if args.fsdp else 'DDP'}: {trained_state_bytes([model]) / 2**30:.2f} GiB of weights, gradients and AdamW states per rank")

    def evaluate():
        """Accuracy (better answer scored higher, or unsafer answer costlier), and for cost the sign accuracy
        (cost > 0 ⇔ labelled unsafe), counted on each rank's shard and summed over ranks."""
        model.eval()
        counts = torch.zeros(4, device=device)  # (pairs, correct order, answers, correct sign)
        loss_sum = torch.zeros((), device=device)
        scores = {"preferred": [], "rejected": [], "preferred_is_safe": [], "rejected_is_safe": []}
        shard = eval_examples[rank :: args.world_size]
        with torch.no_grad(), autocast:
            for start in range(0, len(shard), args.per_device_eval_batch_size):
                chunk = shard[start : start + args.per_device_eval_batch_size]
                batch = {k: v.to(device) for k, v in collate_pairs(chunk, tokenizer.pad_token_id).items()}
                preferred_scores, rejected_scores = end_scores(unwrap(model), batch["input_ids"], batch["attention_mask"]).chunk(2)
                loss_sum += preference_loss(args.objective, preferred_scores, rejected_scores, batch, args.regularization) * len(chunk)
                correct_sign = ((preferred_scores > 0) == ~batch["preferred_is_safe"]).sum() + ((rejected_scores > 0) == ~batch["rejected_is_safe"]).sum()
                counts += torch.stack([torch.tensor(len(chunk), device=device), correct_order(args.objective, preferred_scores, rejected_scores).sum(),
                                       torch.tensor(2 * len(chunk), device=device), correct_sign]).float()
                for key, value in (("preferred", preferred_scores), ("rejected", rejected_scores),
                                   ("preferred_is_safe", batch["preferred_is_safe"]), ("rejected_is_safe", batch["rejected_is_safe"])):
                    scores[key] += value.tolist()
        dist.all_reduce(counts)
        dist.all_reduce(loss_sum)
        model.train()
        metrics = {"eval/loss": (loss_sum / counts[0]).item(), "eval/accuracy": (counts[1] / counts[0]).item()}
        if args.objective == "cost":
            metrics["eval/sign_accuracy"] = (counts[3] / counts[2]).item()
        return metrics, scores

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
    progress = tqdm(total=total_steps, initial=step, desc=args.objective, disable=rank != 0)
    start_time, eval_metrics, (first_epoch, steps_done) = time.time(), {}, divmod(step, steps_per_epoch)
    for epoch in range(first_epoch, args.epochs):
        sampler.set_epoch(epoch)
        micro_batches = iter(loader)
        for _ in range(steps_done * args.gradient_accumulation_steps if epoch == first_epoch else 0):
            next(micro_batches)  # a resumed run skips the batches it already trained on
        for _ in range(steps_per_epoch - (steps_done if epoch == first_epoch else 0)):
            if step == total_steps:
                break
            local_loss = torch.zeros((), device=device)
            local_correct = torch.zeros((), device=device)
            for i in range(args.gradient_accumulation_steps):
                batch = {k: v.to(device) for k, v in next(micro_batches).items()}
                # Only the last micro-step all-reduces gradients; the others accumulate locally (no_sync).
                last = i == args.gradient_accumulation_steps - 1
                with (nullcontext() if last else no_sync(model)), autocast:
                    scores = end_scores(model, batch["input_ids"], batch["attention_mask"])  # (2B,)
                    preferred_scores, rejected_scores = scores.chunk(2)  # (B,), (B,)
                    loss = preference_loss(args.objective, preferred_scores, rejected_scores, batch, args.regularization)
                # every micro-batch holds the same number of pairs, so the mean of micro-batch means is the
                # global mean (DDP averages over ranks)
                (loss / args.gradient_accumulation_steps).backward()
                local_loss += loss.detach() / args.gradient_accumulation_steps
                local_correct += correct_order(args.objective, preferred_scores, rejected_scores).float().mean().detach() / args.gradient_accumulation_steps
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm if args.max_grad_norm > 0 else float("inf"))
            train_stats = torch.stack([local_loss, local_correct])
            dist.all_reduce(train_stats)
            train_loss, train_accuracy = (train_stats / args.world_size).tolist()
            check_finite({"the training loss": train_loss, "the gradient norm": grad_norm.item()}, f"at step {step + 1}")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{train_loss:.4f}", acc=f"{train_accuracy:.3f}")
            if rank == 0 and (step % args.logging_steps == 0 or step == total_steps):
                log_metrics(partial, tracker, step, {"step": step, "epoch": epoch + 1, "train/loss": train_loss, "train/accuracy": train_accuracy,
                                                     "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": grad_norm.item()})
            if args.save_steps and step % args.save_steps == 0 and step < total_steps:
                save_state(args.output_dir, step, {"model": (model, optimizer)}, {"step": step, "scheduler": scheduler.state_dict()}, rank)
        if eval_examples:
            eval_metrics, eval_scores = evaluate()
            if rank == 0:
                progress.write(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
                log_metrics(partial, tracker, step, {"step": step, "epoch": epoch + 1, **eval_metrics})
        if step == total_steps:
            break
    progress.close()

    # ---- save: the checkpoint, with its objective in the config so that later stages can check it ----
    check_finite_weights([model], device)
    unwrapped = unwrap(model)
    unwrapped.config.objective = args.objective
    unwrapped.config.use_cache = True
    save_model(unwrapped, partial, rank)  # every rank takes part: under FSDP the weights are gathered from the shards
    if rank == 0:
        stop_tracker(tracker)
        tokenizer.save_pretrained(partial)
        (partial / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
        if eval_examples:
            (partial / "eval.json").write_text(json.dumps({**eval_metrics, "eval/pairs": len(eval_examples), "eval/identical_pairs_skipped": eval_identical}, indent=2))
            plot_score_histogram(eval_scores, args.objective, partial / "score_histogram.png")
        finish_output_dir(partial, args.output_dir)
        print(f"saved {args.output_dir} ({time.time() - start_time:.0f} s" + (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)" if device.type == "cuda" else ")"))
    dist.barrier()
    dist.destroy_process_group()
    return {"model": unwrapped, "metrics": eval_metrics}  # for tests that compare ranks


# ---- outputs ----
def plot_score_histogram(scores, objective, path):
    """Eval end scores split by label: better vs worse answers (reward), safe vs unsafe answers (cost)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(6, 4))
    if objective == "reward":
        groups = {"better answer": scores["preferred"], "worse answer": scores["rejected"]}
    else:
        answers = list(zip(scores["preferred"] + scores["rejected"], scores["preferred_is_safe"] + scores["rejected_is_safe"]))
        groups = {"labelled safe": [s for s, safe in answers if safe], "labelled unsafe": [s for s, safe in answers if not safe]}
    bins = np.linspace(min(min(v) for v in groups.values() if v), max(max(v) for v in groups.values() if v), 40)
    for label, values in groups.items():
        axis.hist(values, bins=bins, alpha=0.6, label=f"{label} ({len(values)})")
    if objective == "cost":
        axis.axvline(0.0, color="black", linewidth=1, linestyle="--", label="cost = 0")
    axis.set_xlabel("end score" if objective == "reward" else "end cost (> 0: predicted unsafe)")
    axis.set_ylabel("answers")
    axis.set_title(f"{objective} model: eval end scores by label")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


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
