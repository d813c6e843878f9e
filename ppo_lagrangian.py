"""Stage 3 of Safe RLHF: PPO-Lagrangian, the policy update with a reward critic, a cost critic and a learned λ.

Safe RLHF (paper §3.3; reference note §3) maximises helpfulness subject to a harmlessness constraint,

    max_θ J_R(θ)  s.t.  J_C(θ) ≤ d,    J_R = E[R(x, y)],  J_C = E[C(x, y)],   y ~ π_θ(·|x)

and solves it as the min-max problem  max_θ min_{λ≥0}  J_R(θ) - λ · (J_C(θ) - d)  by alternating a clipped PPO
step on θ, with the combined advantage (A_R - λ·A_C) / (1 + λ), and a gradient step on λ (dual ascent):
λ grows while the policy costs more than d and shrinks once it is safe. Six models take part: the actor (from
SFT, trained), the reference policy (SFT, frozen), the reward and cost models (frozen), and the reward and cost
critics (initialised from the reward and cost models, trained).

One iteration, as in `main()` below:
    1. rollout: the actor samples an answer to each prompt of the batch (KV cache, left padding, stop at EOS)
    2. scores: R(x, y) and C(x, y) at the EOS; log-probs of the actor and the reference; values of both critics
    3. per-token rewards  r_t = -β·k_t + [t=T]·R   and costs  c_t = +β·k_t + [t=T]·C,   k_t = log π_old - log π_ref
    4. GAE for rewards (with V_R) and costs (with V_C)
    5. Lagrange multiplier: one SGD step on log λ against the mean episode cost of the last window, all ranks alike
    6. actor: clipped surrogate on (A_R - λ·A_C) / (1 + λ)   (+ ptx_coeff × the SFT loss on a batch of SFT data)
    7. critics: clipped value losses towards the GAE returns

`--algorithm` selects the paper's comparisons on the same code path:
    ppo_lag         PPO-Lagrangian (above)
    ppo             reward only: no cost stream and no cost critic (the cost model still scores answers, for the log)
    reward_shaping  end reward R - λ0·C with λ0 = --lambda_init fixed, one critic

Deliberate differences from the reference code: answers are sampled from the full policy (top_k disabled; the
reference inherits Hugging Face's default top_k=50), so the rollout is on-policy for PPO at temperature 1 and
top_p 1; the reward and cost models must share the actor's tokenizer (they are trained from the same SFT model,
so nothing is re-tokenised); the PTX gradient is added to the actor's PPO step rather than taken as a second step;
plain PyTorch DDP instead of DeepSpeed (so at 7B the six models need large GPUs or smaller models: see README).

Run (toy world, one process):
    python ppo_lagrangian.py --actor_model runs/toy/sft --reward_model runs/toy/reward --cost_model runs/toy/cost \
        --prompt_data data/toy/prompts.jsonl --output_dir runs/toy/ppo_lag --max_new_tokens 48 \
        --actor_lr 1e-4 --critic_lr 1e-4 --no-gradient_checkpointing
Run (paper scale, 8 GPUs; the defaults are the reference's settings):
    torchrun --standalone --nproc_per_node=8 ppo_lagrangian.py --actor_model output/sft \
        --reward_model output/reward --cost_model output/cost --ptx_data tatsu-lab/alpaca --output_dir output/ppo_lag
"""

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig, get_scheduler

PKU_SAFERLHF = "PKU-Alignment/PKU-SafeRLHF"


@dataclass
class Args:
    actor_model: str = field(default="output/sft", metadata={"help": "the SFT checkpoint: the initial actor and the frozen reference policy"})
    reward_model: str = field(default="output/reward", metadata={"help": "the reward model (preference_model.py --objective reward)"})
    cost_model: str = field(default="output/cost", metadata={"help": "the cost model (preference_model.py --objective cost)"})
    reward_critic_model: str = field(default="", metadata={"help": "initial reward critic ('' = the reward model)"})
    cost_critic_model: str = field(default="", metadata={"help": "initial cost critic ('' = the cost model)"})
    prompt_data: str = field(default=PKU_SAFERLHF, metadata={"help": "prompts for the rollouts (rows with a 'prompt' field): local .json/.jsonl/.parquet or hub NAME[@REVISION]"})
    prompt_split: str = field(default="train", metadata={"help": "split of a hub prompt data set"})
    ptx_data: str = field(default="", metadata={"help": "optional SFT data ({prompt, response} or Alpaca rows) for the PTX loss"})
    ptx_split: str = field(default="train", metadata={"help": "split of a hub PTX data set"})
    output_dir: str = field(default="output/ppo_lag", metadata={"help": "where the actor checkpoint, args.json and metrics.jsonl go"})
    algorithm: str = field(default="ppo_lag", metadata={"help": "ppo_lag (PPO-Lagrangian), ppo (reward only) or reward_shaping (R - λ0·C, fixed λ0)"})
    cost_limit: float = field(default=0.0, metadata={"help": "d, the limit on the expected cost J_C (the reference's --threshold)"})
    lambda_init: float = field(default=1.0, metadata={"help": "initial λ (and the fixed λ0 of reward_shaping)"})
    lambda_lr: float = field(default=0.1, metadata={"help": "SGD learning rate of log λ"})
    lambda_max: float = field(default=5.0, metadata={"help": "upper bound on λ"})
    lambda_update_delay_steps: int = field(default=0, metadata={"help": "update steps before λ starts to move"})
    episode_cost_window_size: int = field(default=128, metadata={"help": "J_C is the mean of each rank's last N episode costs, averaged over ranks"})
    kl_coeff: float = field(default=0.01, metadata={"help": "β, the weight of the per-token KL penalty to the reference (the reference uses 0.02 for plain PPO)"})
    clip_range_ratio: float = field(default=0.2, metadata={"help": "ε of the clipped surrogate"})
    clip_range_score: float = field(default=50.0, metadata={"help": "per-token rewards and costs are clamped to ±this"})
    clip_range_value: float = field(default=5.0, metadata={"help": "how far a critic's value may move from its old value before the loss is clipped"})
    gamma: float = field(default=1.0, metadata={"help": "discount γ of GAE"})
    gae_lambda: float = field(default=0.95, metadata={"help": "λ_GAE of GAE"})
    ptx_coeff: float = field(default=16.0, metadata={"help": "weight of the SFT loss on --ptx_data (used only when ptx_data is given)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rollout (PPO assumes 1.0)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling of the rollout (PPO assumes 1.0)"})
    max_length: int = field(default=512, metadata={"help": "maximum tokens of prompt + answer"})
    max_new_tokens: int = field(default=512, metadata={"help": "maximum answer tokens (also bounded by max_length)"})
    per_device_prompt_batch_size: int = field(default=16, metadata={"help": "prompts per device per rollout"})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "rollout samples per device per update step (divides the prompt batch)"})
    update_iters: int = field(default=1, metadata={"help": "passes over each rollout batch"})
    epochs: int = field(default=1, metadata={"help": "passes over the prompts"})
    max_steps: int = field(default=-1, metadata={"help": "stop after this many rollouts (-1: run all epochs)"})
    actor_lr: float = field(default=1e-5, metadata={"help": "actor learning rate"})
    actor_lr_scheduler: str = field(default="cosine", metadata={"help": "actor schedule after warm-up: cosine, linear or constant"})
    actor_lr_warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of the actor's steps spent warming up"})
    actor_weight_decay: float = field(default=0.01, metadata={"help": "actor AdamW weight decay"})
    critic_lr: float = field(default=5e-6, metadata={"help": "critic learning rate"})
    critic_lr_scheduler: str = field(default="constant", metadata={"help": "critic schedule after warm-up"})
    critic_lr_warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of the critics' steps spent warming up"})
    critic_weight_decay: float = field(default=0.0, metadata={"help": "critic AdamW weight decay"})
    adam_betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "AdamW betas of the actor and the critics"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: no clipping)"})
    seed: int = field(default=42, metadata={"help": "random seed (rank r samples with seed + r)"})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast (and bf16 frozen models), used only where the device supports it"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute activations of the trained models in the backward pass"})
    save_critics: bool = field(default=False, metadata={"help": "also save both critics (OUTPUT_DIR/reward_critic, OUTPUT_DIR/cost_critic)"})
    save_steps: int = field(default=0, metadata={"help": "also save a checkpoint every N rollouts (0: only at the end)"})
    logging_steps: int = field(default=1, metadata={"help": "log every N rollouts"})
    # derived at run time, right after parsing
    world_size: int = field(default=1, init=False)
    rollout_batch_size: int = field(default=0, init=False)
    minibatches_per_rollout: int = field(default=0, init=False)


# ---- shared setup: the same lines in sft.py, preference_model.py, ppo_lagrangian.py and evaluate.py ----
# (tests/test_shared_code.py fails if the copies drift apart)
PROMPT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"


class InputError(Exception):
    """Bad input from the user: printed as a one-line error, exit status 1, nothing written."""


def parse_args(args_class, argv=None):
    """One --flag per dataclass field, its help from the field's metadata; --flag/--no-flag for booleans."""
    parser = argparse.ArgumentParser(description=sys.modules[args_class.__module__].__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(args_class):
        if not f.init:  # derived at run time
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kwargs = {"default": default, "help": f.metadata.get("help", "") + " (default: %(default)s)"}
        if f.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif getattr(f.type, "__origin__", None) is tuple:
            kwargs.update(type=f.type.__args__[0], nargs=len(f.type.__args__))
        elif getattr(f.type, "__origin__", None) is list:  # --name a b, or --name a --name b
            kwargs.update(type=f.type.__args__[0], nargs="+", action="extend")
        else:
            kwargs["type"] = f.type
        parser.add_argument(f"--{f.name}", **kwargs)
    values = vars(parser.parse_args(argv))
    for f in dataclasses.fields(args_class):
        if getattr(f.type, "__origin__", None) is tuple and f.init:
            values[f.name] = tuple(values[f.name])
    return args_class(**values)


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


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def load_rows(source, split):
    """Rows (dicts) of a local .json/.jsonl/.parquet file, or of a hub data set given as NAME or NAME@REVISION."""
    path = Path(source)
    if path.suffix in (".json", ".jsonl", ".parquet"):
        if not path.is_file():
            raise InputError(f"{source}: no such file")
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq
            rows = pq.read_table(path).to_pylist()
        elif path.suffix == ".json":
            try:
                rows = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                raise InputError(f"{source}: not valid JSON ({error})") from None
            if not isinstance(rows, list):
                raise InputError(f"{source}: a .json file must hold a list of rows")
        else:
            rows = []
            for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise InputError(f"{source}, line {line_number}: not valid JSON ({error})") from None
    elif path.exists():
        raise InputError(f"{source}: unknown format '{path.suffix}'; use .json, .jsonl or .parquet, or a hub data-set name")
    else:
        import datasets
        name, _, revision = source.partition("@")
        try:
            rows = list(datasets.load_dataset(name, split=split, revision=revision or None))
        except Exception as error:  # offline, unknown name, unknown split, ...
            raise InputError(f"{source}: not a local file, and loading it from the hub failed: {error}") from None
    for row_number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise InputError(f"{source}, row {row_number}: expected a JSON object, got {type(row).__name__}")
    if not rows:
        raise InputError(f"{source}: no rows")
    return rows


def load_pretrained(model_class, name_or_path, **kwargs):
    """from_pretrained with a clear error when the path is neither a local directory nor a reachable hub id."""
    try:
        return model_class.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as error:
        raise InputError(f"{name_or_path}: cannot load a model or tokenizer from it (not a local directory with one, and not on the hub): {error}") from None


def tokenize_prompt_and_answer(tokenizer, prompt, answer, max_length):
    """Token ids of the templated prompt (with BOS if the tokenizer adds one) and of ' answer' + EOS, truncated
    to max_length in total. They are tokenised apart so that every stage sees the same boundary."""
    prompt_ids = tokenizer(PROMPT_TEMPLATE.format(prompt=prompt))["input_ids"][:max_length]
    answer_ids = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids, answer_ids[: max_length - len(prompt_ids)]


def write_jsonl(path, record):
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")


def start_output_dir(output_dir):
    """Work in OUTPUT_DIR.partial; finish_output_dir renames it into place once everything is written."""
    partial = Path(f"{output_dir}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def finish_output_dir(partial, output_dir):
    """Swap the finished directory in with renames, so OUTPUT_DIR is never half-written."""
    output_dir, old = Path(output_dir), Path(f"{output_dir}.old")
    shutil.rmtree(old, ignore_errors=True)
    if output_dir.exists():
        output_dir.rename(old)
    partial.rename(output_dir)
    shutil.rmtree(old, ignore_errors=True)


def wrap_ddp(model, device):
    """DDP around a trained model (broadcasts rank 0's weights, all-reduces gradients). In a world of one
    process the model is left bare: DDP's gradient buckets would only cost time (~8% of a CPU step)."""
    if dist.get_world_size() == 1:
        return model
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model):
    """The model inside DDP, or the model itself in a world of one."""
    return model.module if isinstance(model, DDP) else model


def no_sync(model):
    """DDP's no_sync() (keep this backward's gradients local, no all-reduce), or nothing in a world of one."""
    return model.no_sync() if isinstance(model, DDP) else nullcontext()
# ---- end of shared setup ----


def sft_rows(rows, source):
    """(prompt, response) pairs from {prompt, response} rows or Alpaca {instruction, input, output} rows."""
    pairs = []
    for row_number, row in enumerate(rows, start=1):
        if "prompt" in row and "response" in row:
            prompt, response = row["prompt"], row["response"]
        elif "instruction" in row and "output" in row:
            prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
            response = row["output"]
        else:
            raise InputError(f"{source}, row {row_number}: needs the fields 'prompt' and 'response' (or Alpaca's "
                             f"'instruction' and 'output'); it has {sorted(row)}")
        for name, value in (("prompt", prompt), ("response", response)):
            if not isinstance(value, str):
                raise InputError(f"{source}, row {row_number}, field '{name}': expected a string, got {type(value).__name__}")
        pairs.append((prompt, response))
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


def sft_loss_sum(logits, labels):
    # Σ_t -log π(y_t | x, y_<t) over answer tokens (labels != -100); logits at t predict the token at t+1
    shift_logits = logits[:, :-1].flatten(0, 1).float()  # (B*(T-1), V)
    shift_labels = labels[:, 1:].flatten()  # (B*(T-1),)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")


def count_answer_tokens(labels):
    return (labels[:, 1:] != -100).sum()


def end_scores(score_model, input_ids, attention_mask):
    """The score model's output at each sequence's last non-pad token (the EOS), for left or right padding.
    Position ids follow the attention mask, so padding changes nothing."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return score_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits.squeeze(-1).float()


@torch.no_grad()
def generate_answers(model, tokenizer, prompt_ids, max_new_tokens, temperature=1.0, top_p=1.0, greedy=False):
    """Answers to a batch of tokenised prompts with the KV cache. Prompts are left-padded to a common length P, so
    the answers start together at column P. Returns (sequences (B, P+T), attention_mask (B, P+T), P): each answer
    stops at its first EOS (kept); the tokens after it are pad and masked out."""
    device, pad, eos = next(model.parameters()).device, tokenizer.pad_token_id, tokenizer.eos_token_id
    prompt_length = max(map(len, prompt_ids))
    input_ids = torch.full((len(prompt_ids), prompt_length), pad, device=device)
    prompt_mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(prompt_ids):
        input_ids[i, prompt_length - len(ids) :], prompt_mask[i, prompt_length - len(ids) :] = torch.tensor(ids), 1
    sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}  # top_k 0: the full policy
    config = GenerationConfig(do_sample=not greedy, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                              bos_token_id=tokenizer.bos_token_id, suppress_tokens=[pad], use_cache=True, **sampling)
    was_training = model.training
    model.eval()
    sequences = model.generate(input_ids=input_ids, attention_mask=prompt_mask, generation_config=config)  # (B, P+T)
    model.train(was_training)
    answers = sequences[:, prompt_length:]  # (B, T)
    is_eos = answers == eos
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    answers = answers.masked_fill(after_eos, pad)
    attention_mask = torch.cat([prompt_mask, (~after_eos).long()], dim=-1)
    return torch.cat([input_ids, answers], dim=-1), attention_mask, prompt_length


def gather_log_probs(logits, tokens):
    # log π(a_t | s_t) of the tokens taken: (B, T, V), (B, T) -> (B, T)
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def answer_log_probs(model, sequences, attention_mask, prompt_length):
    """log π(a_t | x, a_<t) of every answer token: (B, P+T) -> (B, T). The logits at position P-1+t predict token t."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids).logits
    return gather_log_probs(logits[:, prompt_length - 1 : -1], sequences[:, prompt_length:])


class TokenValues(torch.nn.Module):
    """A critic: a score model's head read at every token, V_t at position P-1+t (the state before answer token t).
    DDP must wrap the module whose forward it sees, hence this thin wrapper around the Hugging Face model."""

    def __init__(self, score_model):
        super().__init__()
        self.score_model = score_model

    def forward(self, sequences, attention_mask, prompt_length):
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        backbone = getattr(self.score_model, self.score_model.base_model_prefix)
        hidden = backbone(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        return self.score_model.score(hidden[:, prompt_length - 1 : -1]).squeeze(-1).float()  # (B, T)


# ---- Safe RLHF, stage 3: the PPO-Lagrangian math (paper §3.3; reference note §3). Tensors (B, T) over answer tokens ----
def masked_mean(x, mask):
    # mean over each sample's answer tokens, then over samples
    return ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def last_token_mask(mask):
    # 1 at each sample's last answer token T (mask is ones, then zeros)
    return F.one_hot(mask.sum(-1).long().clamp(min=1) - 1, num_classes=mask.shape[-1]).to(mask.dtype)


def kl_penalized_rewards(end_rewards, log_probs, ref_log_probs, mask, kl_coeff, clip_range_score):
    # r_t = -β·(log π_old(a_t) - log π_ref(a_t)) + [t = T]·R(x, y),  zero after T, clamped to ±clip_range_score
    rewards = -kl_coeff * (log_probs - ref_log_probs) + last_token_mask(mask) * end_rewards.unsqueeze(-1)
    return (rewards * mask).clamp(-clip_range_score, clip_range_score)


def kl_penalized_costs(end_costs, log_probs, ref_log_probs, mask, kl_coeff, clip_range_score):
    # c_t = +β·(log π_old(a_t) - log π_ref(a_t)) + [t = T]·C(x, y),  zero after T, clamped to ±clip_range_score
    costs = kl_coeff * (log_probs - ref_log_probs) + last_token_mask(mask) * end_costs.unsqueeze(-1)
    return (costs * mask).clamp(-clip_range_score, clip_range_score)


def gae(rewards, values, mask, gamma, gae_lambda):
    # δ_t = r_t + γ·V_{t+1} - V_t  (V = 0 after T);  A_t = δ_t + γ·λ_GAE·A_{t+1};  G_t = A_t + V_t;  zero after T
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_value = next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[-1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * gae_lambda * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def combined_advantages(reward_advantages, cost_advantages, lagrange_multiplier):
    # Â_t = (A^R_t - λ·A^C_t) / (1 + λ), λ a float (no gradient flows into it)
    return (reward_advantages - lagrange_multiplier * cost_advantages) / (1.0 + lagrange_multiplier)


def actor_loss(log_probs, old_log_probs, advantages, mask, clip_range_ratio):
    # L = -masked_mean(min(ρ·Â, clip(ρ, 1-ε, 1+ε)·Â)),  ρ = exp(log π_θ - log π_old)
    ratio = torch.exp(log_probs - old_log_probs)
    clipped_ratio = ratio.clamp(1.0 - clip_range_ratio, 1.0 + clip_range_ratio)
    return -masked_mean(torch.minimum(ratio * advantages, clipped_ratio * advantages), mask)


def critic_loss(values, old_values, returns, mask, clip_range_value):
    # L_V = 0.5 · masked_mean(max((V - G)², (clip(V, V_old - c, V_old + c) - G)²))
    clipped_values = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    return 0.5 * masked_mean(torch.maximum((values - returns).square(), (clipped_values - returns).square()), mask)


def lagrange_multiplier_loss(log_lambda, mean_episode_cost, cost_limit):
    # loss_λ = -(J_C - d)·exp(log λ): a descent step raises λ when J_C > d and lowers it when J_C < d
    return -(mean_episode_cost - cost_limit) * log_lambda.exp()


def update_lagrange_multiplier(log_lambda, optimizer, mean_episode_cost, cost_limit, lambda_max):
    # log λ ← log λ + lr·λ·(J_C - d)  (one SGD step on loss_λ), then log λ ≤ log λ_max
    optimizer.zero_grad()
    lagrange_multiplier_loss(log_lambda, mean_episode_cost, cost_limit).backward()
    optimizer.step()
    with torch.no_grad():
        log_lambda.clamp_(max=math.log(lambda_max))
    return log_lambda.exp().item()


def main():
    args = parse_args(Args)
    if args.algorithm not in ("ppo_lag", "ppo", "reward_shaping"):
        raise InputError(f"--algorithm must be ppo_lag, ppo or reward_shaping, not '{args.algorithm}'")
    if args.per_device_prompt_batch_size % args.per_device_train_batch_size:
        raise InputError(f"--per_device_train_batch_size ({args.per_device_train_batch_size}) must divide "
                         f"--per_device_prompt_batch_size ({args.per_device_prompt_batch_size})")
    rank, args.world_size, device = setup_distributed()
    args.rollout_batch_size = args.per_device_prompt_batch_size * args.world_size
    args.minibatches_per_rollout = args.per_device_prompt_batch_size // args.per_device_train_batch_size
    seed_everything(args.seed + rank)  # each rank samples different answers
    use_bf16 = args.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    frozen_dtype = torch.bfloat16 if use_bf16 else torch.float32
    use_lagrangian = args.algorithm == "ppo_lag"  # the cost critic, the cost advantages and a learned λ

    # ---- data: everything is checked before anything is written ----
    tokenizer = load_pretrained(AutoTokenizer, args.actor_model)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise InputError(f"{args.actor_model}: the tokenizer's pad token must exist and differ from EOS; start from an sft.py checkpoint")
    prompts = []
    for row_number, row in enumerate(load_rows(args.prompt_data, args.prompt_split), start=1):
        if not isinstance(row.get("prompt"), str):
            raise InputError(f"{args.prompt_data}, row {row_number}, field 'prompt': " + ("missing" if "prompt" not in row else f"expected a string, got {type(row['prompt']).__name__}"))
        prompts.append(row["prompt"])
    prompts = list(dict.fromkeys(prompts))  # PKU-SafeRLHF repeats prompts across rows
    all_prompt_ids = [tokenizer(PROMPT_TEMPLATE.format(prompt=p))["input_ids"] for p in prompts]
    prompt_ids = [ids for ids in all_prompt_ids if len(ids) < args.max_length]
    if len(prompt_ids) < args.rollout_batch_size:
        raise InputError(f"{args.prompt_data}: {len(prompt_ids)} usable prompts, fewer than one rollout batch ({args.rollout_batch_size})")
    ptx_examples = []
    if args.ptx_data:
        ptx_examples, _ = sft_examples(tokenizer, sft_rows(load_rows(args.ptx_data, args.ptx_split), args.ptx_data), args.max_length)
        if len(ptx_examples) < args.per_device_train_batch_size * args.world_size:
            raise InputError(f"{args.ptx_data}: too few usable rows for one PTX batch")

    # ---- the six models ----
    for name in ("reward_model", "cost_model", "reward_critic_model", "cost_critic_model"):
        path = getattr(args, name) or None
        if path and load_pretrained(AutoTokenizer, path).get_vocab() != tokenizer.get_vocab():
            raise InputError(f"{path}: its tokenizer differs from the actor's ({args.actor_model}); train the score models from the same SFT model")
    actor = load_pretrained(AutoModelForCausalLM, args.actor_model, dtype=torch.float32)
    reference = load_pretrained(AutoModelForCausalLM, args.actor_model, dtype=frozen_dtype).requires_grad_(False).eval()
    reward_model = load_pretrained(AutoModelForSequenceClassification, args.reward_model, dtype=frozen_dtype).requires_grad_(False).eval()
    cost_model = load_pretrained(AutoModelForSequenceClassification, args.cost_model, dtype=frozen_dtype).requires_grad_(False).eval()
    for score_model, expected, path in ((reward_model, "reward", args.reward_model), (cost_model, "cost", args.cost_model)):
        objective = getattr(score_model.config, "objective", expected)  # written by preference_model.py
        if objective != expected:  # a swapped pair would train towards harm: the cost sign is easy to flip
            raise InputError(f"{path}: this is a {objective} model, but it was given as the {expected} model")
    reward_critic = TokenValues(load_pretrained(AutoModelForSequenceClassification, args.reward_critic_model or args.reward_model, dtype=torch.float32))
    cost_critic = TokenValues(load_pretrained(AutoModelForSequenceClassification, args.cost_critic_model or args.cost_model, dtype=torch.float32)) if use_lagrangian else None
    trained = [actor, reward_critic.score_model] + ([cost_critic.score_model] if use_lagrangian else [])
    for model in trained + [reference, reward_model, cost_model]:
        model.config.pad_token_id = tokenizer.pad_token_id
    if args.gradient_checkpointing:
        for model in trained:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for model in (reference, reward_model, cost_model):
        model.to(device)
    # the trained models are wrapped in DDP (which broadcasts rank 0's weights); the frozen ones are not
    actor, reward_critic = wrap_ddp(actor.to(device), device), wrap_ddp(reward_critic.to(device), device)
    cost_critic = wrap_ddp(cost_critic.to(device), device) if use_lagrangian else None
    critics = {"reward_critic": reward_critic} | ({"cost_critic": cost_critic} if use_lagrangian else {})

    # ---- optimisers: AdamW for the actor and the critics, SGD on log λ ----
    sampler = DistributedSampler(prompt_ids, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(prompt_ids, batch_size=args.per_device_prompt_batch_size, sampler=sampler, drop_last=True, collate_fn=list)
    total_rollouts = len(loader) * args.epochs if args.max_steps < 0 else min(args.max_steps, len(loader) * args.epochs)
    total_updates = total_rollouts * args.update_iters * args.minibatches_per_rollout

    def adamw(model, lr, weight_decay, schedule, warmup_ratio):
        groups = [{"params": [p for p in model.parameters() if p.requires_grad and p.ndim >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in model.parameters() if p.requires_grad and p.ndim < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=args.adam_betas)
        return optimizer, get_scheduler(schedule, optimizer, num_warmup_steps=math.ceil(warmup_ratio * total_updates), num_training_steps=total_updates)

    actor_optimizer, actor_scheduler = adamw(actor, args.actor_lr, args.actor_weight_decay, args.actor_lr_scheduler, args.actor_lr_warmup_ratio)
    critic_optimizers = {name: adamw(critic, args.critic_lr, args.critic_weight_decay, args.critic_lr_scheduler, args.critic_lr_warmup_ratio) for name, critic in critics.items()}
    log_lambda = torch.tensor(math.log(args.lambda_init), device=device, requires_grad=True)  # λ = exp(log λ) > 0
    lambda_optimizer = torch.optim.SGD([log_lambda], lr=args.lambda_lr)
    episode_costs = deque(maxlen=args.episode_cost_window_size)  # this rank's last raw episode costs C(x, y)
    if ptx_examples:
        ptx_sampler = DistributedSampler(ptx_examples, shuffle=True, seed=args.seed, drop_last=True)
        ptx_loader = DataLoader(ptx_examples, batch_size=args.per_device_train_batch_size, sampler=ptx_sampler, drop_last=True,
                                collate_fn=lambda batch: collate(batch, tokenizer.pad_token_id))
        ptx_batches = (batch for epoch in range(10**9) if ptx_sampler.set_epoch(epoch) is None for batch in ptx_loader)

    partial = start_output_dir(args.output_dir) if rank == 0 else None
    if rank == 0:
        print(f"{args.algorithm}: {len(prompt_ids)} prompts ({len(all_prompt_ids) - len(prompt_ids)} dropped: not shorter than max_length), "
              f"world size {args.world_size}, {args.rollout_batch_size} answers per rollout, {total_rollouts} rollouts, "
              f"{total_updates} update steps, PTX {'on' if ptx_examples else 'off'}, bf16 {use_bf16}")

    def save(final, rollout):
        """The actor (and the critics) as Hugging Face checkpoints, swapped into OUTPUT_DIR in one rename."""
        target = partial if final else Path(f"{args.output_dir}.saving")
        if not final:
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            if (partial / "metrics.jsonl").exists():
                shutil.copy(partial / "metrics.jsonl", target / "metrics.jsonl")
        unwrap(actor).save_pretrained(target)
        tokenizer.save_pretrained(target)
        (target / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
        (target / "training_state.json").write_text(json.dumps({"rollouts": rollout, "lambda": log_lambda.exp().item()}, indent=2))
        if args.save_critics:
            for name, critic in critics.items():
                unwrap(critic).score_model.save_pretrained(target / name)
                tokenizer.save_pretrained(target / name)
        finish_output_dir(target, args.output_dir)

    # ---- training loop ----
    progress = tqdm(total=total_rollouts, desc=args.algorithm, disable=rank != 0)
    rollout, update_step, start_time, saved_rollout = 0, 0, time.time(), None
    lagrange_multiplier = args.lambda_init
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for prompt_batch in loader:
            if rollout == total_rollouts:
                break
            # 1. rollout: sample y ~ π_θ(·|x) for each prompt x of this rank's batch
            max_new_tokens = min(args.max_new_tokens, args.max_length - max(map(len, prompt_batch)))
            sequences, attention_mask, P = generate_answers(unwrap(actor), tokenizer, prompt_batch, max_new_tokens, args.temperature, args.top_p)  # (B, P+T)
            mask = attention_mask[:, P:].float()  # (B, T) 1 on answer tokens up to and including EOS

            # 2. scores: R(x, y) and C(x, y) at the EOS; log-probs of π_old and π_ref; values of both critics
            with torch.no_grad(), autocast:
                end_rewards = end_scores(reward_model, sequences, attention_mask)  # (B,)
                end_costs = end_scores(cost_model, sequences, attention_mask)  # (B,)
                old_log_probs = answer_log_probs(unwrap(actor), sequences, attention_mask, P)  # (B, T)
                ref_log_probs = answer_log_probs(reference, sequences, attention_mask, P)  # (B, T)
                old_values = {name: unwrap(critic)(sequences, attention_mask, P) for name, critic in critics.items()}  # (B, T) each
            episode_costs.extend(end_costs.tolist())

            # 3. per-token rewards and costs with the split KL penalty
            end_rewards_used = end_rewards - args.lambda_init * end_costs if args.algorithm == "reward_shaping" else end_rewards
            rewards = kl_penalized_rewards(end_rewards_used, old_log_probs, ref_log_probs, mask, args.kl_coeff, args.clip_range_score)  # (B, T)
            # 4. GAE, separately for rewards and costs
            reward_advantages, reward_returns = gae(rewards, old_values["reward_critic"], mask, args.gamma, args.gae_lambda)  # (B, T)
            returns = {"reward_critic": reward_returns}
            if use_lagrangian:
                costs = kl_penalized_costs(end_costs, old_log_probs, ref_log_probs, mask, args.kl_coeff, args.clip_range_score)  # (B, T)
                cost_advantages, returns["cost_critic"] = gae(costs, old_values["cost_critic"], mask, args.gamma, args.gae_lambda)

            sums = {}  # this rollout's losses and statistics, summed over update steps
            for _ in range(args.update_iters):
                for minibatch in torch.randperm(len(prompt_batch), device=device).split(args.per_device_train_batch_size):
                    # 5. Lagrange multiplier: J_C = the window's mean episode cost, averaged over ranks (gloo has no
                    #    AVG: sum, then divide), so the SGD step on log λ is the same on every rank
                    mean_episode_cost = torch.tensor(sum(episode_costs) / len(episode_costs), device=device)
                    dist.all_reduce(mean_episode_cost)
                    mean_episode_cost /= args.world_size
                    if use_lagrangian and update_step >= args.lambda_update_delay_steps:
                        lagrange_multiplier = update_lagrange_multiplier(log_lambda, lambda_optimizer, mean_episode_cost, args.cost_limit, args.lambda_max)

                    # 6. actor: clipped surrogate on the combined advantage (λ is a number here, not a tensor)
                    mb_sequences, mb_attention, mb_mask = sequences[minibatch], attention_mask[minibatch], mask[minibatch]
                    advantages = reward_advantages[minibatch]
                    if use_lagrangian:
                        advantages = combined_advantages(advantages, cost_advantages[minibatch], lagrange_multiplier)
                    with autocast:
                        log_probs = answer_log_probs(actor, mb_sequences, mb_attention, P)  # (b, T)
                        loss = {"actor": actor_loss(log_probs, old_log_probs[minibatch], advantages, mb_mask, args.clip_range_ratio)}
                    if ptx_examples:
                        # two backward passes into the same gradients: the first without DDP's all-reduce (no_sync),
                        # the second all-reduces the sum, PPO gradient + ptx_coeff × SFT gradient
                        with no_sync(actor):
                            loss["actor"].backward()
                        ptx_batch = {k: v.to(device) for k, v in next(ptx_batches).items()}
                        with autocast:
                            ptx_logits = actor(input_ids=ptx_batch["input_ids"], attention_mask=ptx_batch["attention_mask"]).logits
                            loss["ptx"] = sft_loss_sum(ptx_logits, ptx_batch["labels"]) / count_answer_tokens(ptx_batch["labels"])
                        (args.ptx_coeff * loss["ptx"]).backward()
                    else:
                        loss["actor"].backward()

                    # 7. critics: clipped value loss towards the GAE returns
                    for name, critic in critics.items():
                        with autocast:
                            values = critic(mb_sequences, mb_attention, P)  # (b, T)
                            loss[name] = critic_loss(values, old_values[name][minibatch], returns[name][minibatch], mb_mask, args.clip_range_value)
                        loss[name].backward()

                    # every rank checks the same all-reduced losses before any weight moves
                    checked = torch.stack(list(loss.values())).detach()
                    dist.all_reduce(checked)
                    if not torch.isfinite(checked).all():
                        kept = f"{args.output_dir} holds the last good checkpoint (rollout {saved_rollout})" if saved_rollout else f"nothing was saved to {args.output_dir}"
                        raise SystemExit(f"error: a loss became NaN or infinite at rollout {rollout + 1} ({dict(zip(loss, checked.tolist()))}); "
                                         f"stopping before the update; {kept}. Lower the learning rates, or check the reward and cost models.")
                    for model, (optimizer, scheduler) in [(actor, (actor_optimizer, actor_scheduler))] + [(critics[n], critic_optimizers[n]) for n in critics]:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm if args.max_grad_norm > 0 else float("inf"))
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    update_step += 1
                    with torch.no_grad():
                        ratio = torch.exp(log_probs.detach() - old_log_probs[minibatch])
                        clipfrac = masked_mean(((ratio - 1.0).abs() > args.clip_range_ratio).float(), mb_mask)
                    for name, value in [(f"loss/{k}", v.detach()) for k, v in loss.items()] + [("ppo/clipfrac", clipfrac)]:
                        sums[name] = sums.get(name, 0.0) + value
            rollout += 1

            # ---- logging: every number is all-reduced (a mean over ranks) and written by rank 0 ----
            updates = args.update_iters * args.minibatches_per_rollout
            stats = {
                "objective/reward": end_rewards.mean(),  # mean R(x, y) of this rollout
                "objective/cost": end_costs.mean(),  # mean C(x, y) of this rollout
                "objective/unsafe_rate": (end_costs > 0).float().mean(),  # share of answers the cost model calls unsafe
                "objective/kl": ((old_log_probs - ref_log_probs) * mask).sum(-1).mean(),  # Σ_t k_t per answer
                "objective/answer_length": mask.sum(-1).mean(),  # answer tokens, EOS included
                **{name: value / updates for name, value in sums.items()},
            }
            values = torch.stack([torch.as_tensor(v, device=device, dtype=torch.float32) for v in stats.values()])
            dist.all_reduce(values)
            metrics = {"rollout": rollout, **dict(zip(stats, (values / args.world_size).tolist())),
                       "objective/episode_cost": mean_episode_cost.item(), "train/actor_lr": actor_scheduler.get_last_lr()[0]}
            if args.algorithm != "ppo":
                metrics["lagrange/lambda"] = lagrange_multiplier
            progress.update(1)
            progress.set_postfix(reward=f"{metrics['objective/reward']:.2f}", cost=f"{metrics['objective/cost']:.2f}",
                                 **({"lambda": f"{lagrange_multiplier:.3f}"} if args.algorithm != "ppo" else {}))
            if rank == 0 and (rollout % args.logging_steps == 0 or rollout == total_rollouts):
                write_jsonl(partial / "metrics.jsonl", metrics)
            if args.save_steps and rollout % args.save_steps == 0 and rollout < total_rollouts:
                if rank == 0:
                    save(final=False, rollout=rollout)
                saved_rollout = rollout
    progress.close()

    # ---- save ----
    if rank == 0:
        save(final=True, rollout=rollout)
        print(f"saved {args.output_dir} ({time.time() - start_time:.0f} s)")
    dist.barrier()
    dist.destroy_process_group()
    return {"actor": unwrap(actor), "lambda": log_lambda.exp().item(), "metrics": metrics, "critics": sorted(critics)}  # for tests


if __name__ == "__main__":
    try:
        main()
    except InputError as error:
        sys.exit(f"error: {error}")
