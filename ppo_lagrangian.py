"""Stage 3 of Safe RLHF: PPO-Lagrangian, the policy update with a reward critic, a cost critic and a learned λ.

Safe RLHF (paper §3.3; docs/math.md §4) maximises helpfulness subject to a harmlessness constraint,

    max_θ J_R(θ)  s.t.  J_C(θ) ≤ d,    J_R = E[R(x, y)],  J_C = E[C(x, y)],   y ~ π_θ(·|x)

where C(x, y) > 0 means the cost model calls the answer unsafe, and d is `--cost_limit`. It is solved as the min-max
problem max_θ min_{λ≥0} J_R(θ) - λ·(J_C(θ) - d) by alternating a clipped PPO step on θ with the combined
advantage (A_R - λ·A_C) / (1 + λ), and a gradient step on λ (dual ascent): λ grows while the policy costs more
than d and shrinks once it is safe. Six models take part: the actor (from SFT, trained), the reference policy (SFT,
frozen; `--reference_model`), the reward and cost models (frozen), and the reward and cost critics (from the reward and
cost models, trained).

One iteration, as in `main()` below:
    1. rollout: the actor samples an answer to each prompt of the batch (KV cache, left padding, stop at EOS)
    2. scores: R(x, y) and C(x, y) at the EOS; log-probs of the actor and the reference; values of both critics
    3. per-token rewards r_t = -β·k_t + [t=T]·R and costs c_t = +β·k_t + [t=T]·C, k_t = log π_old - log π_ref
    4. GAE for rewards (with V_R) and costs (with V_C)
    then, for each of the update_iters × (prompt batch / train batch) update steps:
    5. λ: one update against J_C - d, J_C the mean raw cost of the episode-cost window (all ranks alike)
    6. actor: clipped surrogate on (A_R - λ·A_C) / (1 + λ)   (+ ptx_coeff × the SFT loss on --ptx_data)
    7. critics: clipped value losses towards the GAE returns

`--algorithm` picks the paper's comparisons on the same code path, each with the reference's KL coefficient β as its
default: ppo_lag (above; β 0.01), ppo (reward only, one critic; β 0.02), reward_shaping (end reward R - λ0·C with a
fixed λ0 = --lambda_init, one critic; β 0.02). Two variants of ppo_lag that are not in the paper (docs/math.md §5):
--constraint rectified (after RePO, arXiv 2410.19933: each answer's cost over the limit, {C - d}⁺, instead of C, and
λ against the share of answers over d, at most --tolerance) and --lambda_update pid (Stooke, Achiam & Abbeel 2020: λ
by a PID controller on the violation).

Deliberate differences from the reference code: answers are sampled from the full policy (top_k disabled; the reference
inherits top_k=50), so the rollout is on-policy; the reward and cost models must share the actor's tokenizer; plain
PyTorch DDP, or FSDP2 with --fsdp, instead of DeepSpeed. `--max_steps N` runs exactly N rollouts, cycling over the
prompts.

Run (toy world, one process):
    python ppo_lagrangian.py --actor_model runs/toy/sft --reward_model runs/toy/reward --cost_model runs/toy/cost \
        --prompt_data data/toy/prompts.jsonl --output_dir runs/toy/ppo_lag --max_new_tokens 48 \
        --actor_lr 1e-4 --critic_lr 1e-4 --no_gradient_checkpointing
Run (paper scale, 8 GPUs; the defaults are the reference's settings):
    torchrun --standalone --nproc_per_node=8 ppo_lagrangian.py --fsdp --actor_model output/sft \
        --reward_model output/reward --cost_model output/cost --ptx_data tatsu-lab/alpaca --output_dir output/ppo_lag
"""

import argparse
import copy
import dataclasses
import fcntl
import itertools
import json
import math
import os
import shutil
import sys
import time
from collections import deque
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
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    GenerationConfig,
    HfArgumentParser,
    get_scheduler,
    set_seed,
)

PROMPT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"
PKU_SAFERLHF = "PKU-Alignment/PKU-SafeRLHF"
REFERENCE_KL_COEFF = {"ppo_lag": 0.01, "ppo": 0.02, "reward_shaping": 0.02}  # the reference's scripts/*.sh
ALGORITHMS, CONSTRAINTS = list(REFERENCE_KL_COEFF), ["expected", "rectified"]
SCHEDULES = ["cosine", "linear", "constant"]


def arg(default, help, **metadata):  # a field of Args: its default, its --help line (and e.g. choices=[...])
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class Args:
    actor_model: str = arg("output/sft", "the SFT checkpoint: the initial actor (and the reference policy, by default)")
    reference_model: str = arg("", "the frozen reference policy π_ref of the KL penalty ('' = --actor_model)")
    reward_model: str = arg("output/reward", "the reward model (preference_model.py --objective reward)")
    cost_model: str = arg("output/cost", "the cost model (preference_model.py --objective cost)")
    reward_critic_model: str = arg("", "initial reward critic ('' = the reward model)")
    cost_critic_model: str = arg("", "initial cost critic ('' = the cost model)")
    prompt_data: str = arg(PKU_SAFERLHF, "prompts ('prompt' field): .jsonl/.json/.parquet/.csv or hub NAME[@REV]")
    prompt_split: str = arg("train", "split of a hub prompt data set")
    ptx_data: str = arg("", "optional SFT data ({prompt, response} or Alpaca rows) for the PTX loss")
    ptx_split: str = arg("train", "split of a hub PTX data set")
    output_dir: str = arg("output/ppo_lag", "where the actor checkpoint, args.json and metrics.jsonl go")
    overwrite_output_dir: bool = arg(False, "replace OUTPUT_DIR whatever it holds; start over despite saved states")
    algorithm: str = arg("ppo_lag", "ppo_lag, ppo (reward only) or reward_shaping (R - λ0·C)", choices=ALGORITHMS)
    cost_limit: float = arg(0.0, "d: the limit on E[C] (the reference's --threshold), or on each C if rectified")
    constraint: str = arg("expected", "constraint: E[C] <= d (the paper) or rectified (RePO)", choices=CONSTRAINTS)
    tolerance: float = arg(0.02, "ε of --constraint rectified: the share of answers that may cost more than d")
    lambda_update: str = arg("sgd", "ppo_lag's λ: sgd (the paper's step on log λ) or pid", choices=["sgd", "pid"])
    lambda_init: float = arg(1.0, "initial λ (and the fixed λ0 of reward_shaping)")
    lambda_lr: float = arg(0.1, "SGD learning rate of log λ (--lambda_update sgd)")
    lambda_max: float = arg(5.0, "upper bound on λ")
    pid_kp: float = arg(0.1, "K_P of --lambda_update pid: λ's share proportional to the violation g")
    pid_ki: float = arg(0.02, "K_I of --lambda_update pid: λ's share proportional to the summed violations")
    pid_kd: float = arg(0.1, "K_D of --lambda_update pid: λ's share proportional to a rise of the violation")
    lambda_update_delay_steps: int = arg(0, "update steps before λ starts to move")
    episode_cost_window_size: int = arg(128, "J_C is the mean of each rank's last N episode costs, over ranks")
    kl_coeff: float | None = arg(None, "β of the per-token KL penalty (default: the reference's for the algorithm)")
    clip_range_ratio: float = arg(0.2, "ε of the clipped surrogate")
    clip_range_score: float = arg(50.0, "per-token rewards and costs are clamped to ±this")
    clip_range_value: float = arg(5.0, "how far a value may move from its old value before its loss is clipped")
    gamma: float = arg(1.0, "discount γ of GAE")
    gae_lambda: float = arg(0.95, "λ_GAE of GAE")
    ptx_coeff: float = arg(16.0, "weight of the SFT loss on --ptx_data")
    temperature: float = arg(1.0, "sampling temperature of the rollout (PPO assumes 1.0)")
    top_p: float = arg(1.0, "nucleus sampling of the rollout (PPO assumes 1.0)")
    max_length: int = arg(512, "maximum tokens of prompt + answer")
    max_new_tokens: int = arg(512, "maximum answer tokens (also bounded by max_length)")
    per_device_prompt_batch_size: int = arg(16, "prompts per device per rollout")
    per_device_train_batch_size: int = arg(16, "rollout samples per device per update step")
    update_iters: int = arg(1, "passes over each rollout batch")
    epochs: int = arg(1, "passes over the prompts (when --max_steps is not given)")
    max_steps: int = arg(-1, "run exactly this many rollouts, cycling over the prompts (-1: --epochs passes)")
    actor_lr: float = arg(1e-5, "actor learning rate")
    actor_lr_scheduler: str = arg("cosine", "actor schedule after warm-up", choices=SCHEDULES)
    actor_lr_warmup_ratio: float = arg(0.03, "fraction of the actor's steps spent warming up")
    actor_weight_decay: float = arg(0.01, "actor AdamW weight decay")
    critic_lr: float = arg(5e-6, "critic learning rate")
    critic_lr_scheduler: str = arg("constant", "critic schedule after warm-up", choices=SCHEDULES)
    critic_lr_warmup_ratio: float = arg(0.0, "fraction of the critics' steps spent warming up")
    critic_weight_decay: float = arg(0.0, "critic AdamW weight decay")
    adam_beta1: float = arg(0.9, "AdamW β1 of the actor and the critics")
    adam_beta2: float = arg(0.95, "AdamW β2 of the actor and the critics")
    max_grad_norm: float = arg(1.0, "gradient clipping norm (0: no clipping)")
    seed: int = arg(42, "random seed (rank r samples with seed + r)")
    bf16: bool = arg(True, "bf16 autocast and bf16 frozen models, used only where the device supports it")
    gradient_checkpointing: bool = arg(True, "recompute activations of the trained models in the backward pass")
    fsdp: bool = arg(False, "FSDP2: shard all six models (and the trained ones' states) over the ranks")
    save_critics: bool = arg(False, "also save both critics (OUTPUT_DIR/reward_critic, OUTPUT_DIR/cost_critic)")
    save_steps: int = arg(0, "save a resumable state every N rollouts, to OUTPUT_DIR.partial (0: never)")
    resume: bool = arg(False, "continue the stopped run from the newest state in OUTPUT_DIR.partial")
    logging_steps: int = arg(1, "log every N rollouts")
    report_to: str = arg("none", "also log to TensorBoard (OUTPUT_DIR/runs)", choices=["none", "tensorboard"])
    # what a resume may change (not a flag): none of it moves a number of the run
    resume_may_change = (
        "resume overwrite_output_dir output_dir save_steps logging_steps report_to gradient_checkpointing save_critics"
    )
    # derived at run time, right after parsing
    world_size: int = field(default=1, init=False)
    rollout_batch_size: int = field(default=0, init=False)
    minibatches_per_rollout: int = field(default=0, init=False)

    def __post_init__(self):  # every range, checked right after parsing: a bad value is one line naming the flag
        counts = "max_length max_new_tokens per_device_prompt_batch_size per_device_train_batch_size update_iters"
        require(self, counts + " epochs episode_cost_window_size logging_steps", lambda v: v >= 1, "at least 1")
        require(self, "max_steps", lambda v: v == -1 or v >= 1, "-1 (--epochs passes) or at least 1")
        rates = "actor_lr critic_lr lambda_init lambda_max temperature clip_range_ratio clip_range_score"
        require(self, rates + " clip_range_value", lambda v: v > 0, "positive")
        require(self, "top_p", lambda v: 0 < v <= 1, "in (0, 1]")
        shares = "gamma gae_lambda actor_lr_warmup_ratio critic_lr_warmup_ratio adam_beta1 adam_beta2"
        require(self, shares, lambda v: 0 <= v <= 1, "in [0, 1]")
        others = "lambda_lr lambda_update_delay_steps ptx_coeff actor_weight_decay critic_weight_decay max_grad_norm"
        require(self, others + " save_steps pid_kp pid_ki pid_kd", lambda v: v >= 0, "at least 0")
        require(self, "kl_coeff", lambda v: v is None or v >= 0, "at least 0")
        require(self, "seed", lambda v: 0 <= v < 2**31, "in [0, 2^31)")
        lagrangian = self.algorithm == "ppo_lag"  # only PPO-Lagrangian has a constraint and learns λ
        require(self, "constraint", lambda v: v == "expected" or lagrangian, "expected unless --algorithm ppo_lag")
        require(self, "tolerance", lambda v: 0 < v < 1, "in (0, 1) (a share of answers)")
        require(self, "lambda_update", lambda v: v == "sgd" or lagrangian, "sgd unless --algorithm ppo_lag")
        require(self, "pid_ki", lambda v: v > 0 or self.lambda_update == "sgd", "positive with --lambda_update pid")
        batch = self.per_device_prompt_batch_size
        require(self, "per_device_train_batch_size", lambda v: batch % v == 0, f"a divisor of the prompt batch {batch}")
        if self.kl_coeff is None:  # the reference's β for the algorithm (scripts/ppo-lag.sh, ppo.sh, ...)
            self.kl_coeff = REFERENCE_KL_COEFF[self.algorithm]


# ---- Safe RLHF, stage 3: the PPO-Lagrangian math (paper §3.3; docs/math.md §4-5). Tensors (B, T): answer tokens ----
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


def shaped_end_rewards(end_rewards, end_costs, lambda0):
    # the reward-shaping baseline's end reward: R(x, y) - λ0·C(x, y), λ0 fixed (a costly answer earns less)
    return end_rewards - lambda0 * end_costs


def gae(rewards, values, mask, gamma, gae_lambda):
    # δ_t = r_t + γ·V_{t+1} - V_t (V = 0 after T); A_t = δ_t + γ·λ_GAE·A_{t+1}; G_t = A_t + V_t; zero after T
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


def rectified_costs(costs, cost_limit):
    # {C(x, y) - d}⁺ = max(0, C(x, y) - d): an answer within the limit costs nothing, however safe it is (RePO)
    return (costs - cost_limit).clamp(min=0.0)


def constraint_violation(episode_costs, cost_limit, constraint, tolerance):
    # expected:   g = J_C - d = mean(C) - d      (paper §3.3: negative once the policy is safe on average, so very safe
    #                                             answers can pay for harmful ones: "safety compensation")
    # rectified:  g = (mean(1[C > d]) - ε) / ε   (the share of answers over the limit, less the share ε allowed,
    #                                             in units of ε: -1 when none crosses d, whatever C's scale; §5.1)
    if constraint == "expected":
        return episode_costs.mean() - cost_limit
    return ((episode_costs > cost_limit).float().mean() - tolerance) / tolerance


def lagrange_multiplier_loss(log_lambda, violation):
    # loss_λ = -g·exp(log λ): a descent step raises λ when g > 0 (constraint violated) and lowers it when g < 0
    return -violation * log_lambda.exp()


def update_lagrange_multiplier(log_lambda, optimizer, violation, lambda_max):
    # log λ ← log λ + lr·λ·g  (one SGD step on loss_λ), then log λ ≤ log λ_max
    optimizer.zero_grad()
    lagrange_multiplier_loss(log_lambda, violation).backward()
    optimizer.step()
    with torch.no_grad():
        log_lambda.clamp_(max=math.log(lambda_max))
    return log_lambda.exp().item()


def pid_lagrange_multiplier(violation, previous_violation, integral, kp, ki, kd, lambda_max):
    # PID Lagrangian (Stooke, Achiam & Abbeel 2020, Algorithm 2), g = the constraint violation above:
    #   I ← clip(I + g, 0, λ_max/K_I)  ∂ ← max(0, g - g_prev)  λ ← clip(K_P·g + K_I·I + K_D·∂, 0, λ_max)
    # The integral alone is plain gradient ascent on λ (lr K_I); the proportional term reacts to the violation now,
    # the derivative term to a cost that is rising, both before the integral has wound up. Returns (λ, I).
    # Our one addition: I is capped at λ_max / K_I, so that a long violation cannot wind it up beyond what λ may use.
    integral = min(max(integral + violation, 0.0), lambda_max / ki)
    derivative = max(violation - previous_violation, 0.0)
    return min(max(kp * violation + ki * integral + kd * derivative, 0.0), lambda_max), integral


class LagrangeMultiplier:
    """λ and its update rule, in one place (docs/math.md §4.4, §5.2), with its state for --resume. ppo_lag moves λ
    by the paper's SGD step on log λ or by PID; ppo and reward_shaping learn no λ (update() leaves it alone: None for
    ppo, and reward_shaping's fixed λ0 lives in its end reward)."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.rule = args.lambda_update if args.algorithm == "ppo_lag" else None
        self.value = None if args.algorithm == "ppo" else args.lambda_init
        self.log_lambda = torch.tensor(math.log(args.lambda_init), device=device, requires_grad=True)  # λ = exp(·)
        self.optimizer = torch.optim.SGD([self.log_lambda], lr=args.lambda_lr)
        self.pid_integral = args.lambda_init / args.pid_ki if args.pid_ki else 0.0  # the PID starts at λ_init
        self.previous_violation, self.violation, self.updates = None, None, 0

    def update(self, episode_costs):
        """One update from this rank's episode-cost window: the violation g (J_C - d, or the rectified one), averaged
        over ranks (gloo has no AVG: sum, then divide) so that λ moves alike on every rank. Returns λ."""
        if self.rule is None:
            return self.value
        window = torch.tensor(list(episode_costs), device=self.device)
        violation = constraint_violation(window, self.args.cost_limit, self.args.constraint, self.args.tolerance)
        dist.all_reduce(violation)
        violation = violation / self.args.world_size
        self.violation = violation.item()
        if self.updates >= self.args.lambda_update_delay_steps and self.rule == "sgd":
            self.value = update_lagrange_multiplier(self.log_lambda, self.optimizer, violation, self.args.lambda_max)
        elif self.updates >= self.args.lambda_update_delay_steps:  # pid
            previous = self.violation if self.previous_violation is None else self.previous_violation
            gains = (self.args.pid_kp, self.args.pid_ki, self.args.pid_kd, self.args.lambda_max)
            self.value, self.pid_integral = pid_lagrange_multiplier(self.violation, previous, self.pid_integral, *gains)
            self.previous_violation = self.violation
        self.updates += 1
        return self.value

    def metrics(self):
        # λ is logged where it means something (reward_shaping: its fixed λ0); the violation where λ learns from it
        if self.rule is None:
            return {} if self.args.algorithm == "ppo" else {"lagrange/lambda": self.value}
        return {"lagrange/lambda": self.value, "lagrange/violation": self.violation}

    def state_dict(self):
        keys = ("value", "pid_integral", "previous_violation", "violation", "updates")
        return {"log_lambda": self.log_lambda.item(), **{key: getattr(self, key) for key in keys}}

    def load_state_dict(self, state):
        self.log_lambda.data.fill_(state.pop("log_lambda"))
        for key, value in state.items():
            setattr(self, key, value)


# ---- the models at work: sampling, log-probs, scores and values ----
@torch.no_grad()
def generate_answers(model, tokenizer, prompt_ids, max_new_tokens, generation_config):
    """Answers to a batch of tokenised prompts with the KV cache (call it in eval mode). Prompts are left-padded to a
    common length P, so the answers start together at column P. Returns (sequences (B, P+T), attention_mask (B, P+T),
    P): each answer stops at its first EOS (kept); the tokens after it are pad and masked out."""
    device, pad, eos = next(model.parameters()).device, tokenizer.pad_token_id, tokenizer.eos_token_id
    prompt_length = max(map(len, prompt_ids))
    input_ids = torch.full((len(prompt_ids), prompt_length), pad, device=device)
    prompt_mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(prompt_ids):
        input_ids[i, prompt_length - len(ids) :], prompt_mask[i, prompt_length - len(ids) :] = torch.tensor(ids), 1
    config = copy.copy(generation_config)  # the caller's settings, with this batch's answer length
    config.max_new_tokens = max_new_tokens
    # (B, P+T); synced_gpus=False: each rank stops at its own answers' end (under FSDP the weights are gathered before)
    sequences = model.generate(input_ids, attention_mask=prompt_mask, generation_config=config, synced_gpus=False)
    answers = sequences[:, prompt_length:]  # (B, T)
    is_eos = answers == eos
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    answers = answers.masked_fill(after_eos, pad)
    attention_mask = torch.cat([prompt_mask, (~after_eos).long()], dim=-1)
    return torch.cat([input_ids, answers], dim=-1), attention_mask, prompt_length


def answer_log_probs(model, sequences, attention_mask, prompt_length):
    """log π(a_t | x, a_<t) of every answer token: (B, P+T) -> (B, T). The logits at position P-1+t predict token t."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(sequences, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
    answer_logits, answer_tokens = logits[:, prompt_length - 1 : -1], sequences[:, prompt_length:]  # (B, T, V), (B, T)
    return torch.log_softmax(answer_logits.float(), dim=-1).gather(-1, answer_tokens.unsqueeze(-1)).squeeze(-1)


def end_scores(score_model, input_ids, attention_mask):
    """The score model's output at each sequence's last non-pad token (the EOS), for left or right padding: position ids
    follow the attention mask, so padding changes nothing."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    outputs = score_model(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return outputs.logits.squeeze(-1).float()


class Critic(torch.nn.Module):
    """A critic V(s_t): a score model's head read at every answer position instead of only at the EOS. V_t is read at
    position P-1+t, the state before answer token t. A module of its own because DDP must wrap the module whose
    forward it runs. The cost critic of the rectified constraint (RECTIFY_AT = d) predicts the rectified cost-to-go:
    its head's value v passes through softplus(v - d), a smooth {v - d}⁺, so that a critic that starts from the cost
    model starts near {C - d}⁺ of its estimate (about 0 for a safe prefix), not at the raw C (docs/math.md §5.1)."""

    def __init__(self, score_model, rectify_at=None):
        super().__init__()
        self.score_model, self.rectify_at = score_model, rectify_at

    def forward(self, sequences, attention_mask, prompt_length):
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        backbone = getattr(self.score_model, self.score_model.base_model_prefix)
        hidden = backbone(
            input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (B, P+T, H)
        values = self.score_model.score(hidden[:, prompt_length - 1 : -1]).squeeze(-1).float()  # (B, T)
        return values if self.rectify_at is None else F.softplus(values - self.rectify_at)


def main():
    args = parse_args(Args)
    inputs = {name: value for name, value in vars(args).items() if name.endswith(("_model", "_data"))}
    saved_states = check_output_dir(args, "ppo_lagrangian.py", inputs)  # before any work; what --resume continues from
    rank, args.world_size, device = setup_distributed()
    args.rollout_batch_size = args.per_device_prompt_batch_size * args.world_size
    args.minibatches_per_rollout = args.per_device_prompt_batch_size // args.per_device_train_batch_size
    set_seed(args.seed + rank)  # each rank samples different answers
    use_bf16, autocast = mixed_precision(args.bf16, device)
    tokenizer = load_policy_tokenizer(args.actor_model)
    prompt_loader, total_rollouts, prompts_line = load_prompts(args, tokenizer, rank)
    ptx_loader = load_ptx_data(args, tokenizer)  # None without --ptx_data
    actor, reference, reward_model, cost_model, critics = load_models(args, tokenizer, device, use_bf16)
    trained = {"actor": actor, **{f"{stream}_critic": critic for stream, critic in critics.items()}}
    updates = total_rollouts * args.update_iters * args.minibatches_per_rollout  # AdamW: the actor_*, critic_* flags
    optimizers = {n: adamw(m, args, updates, "actor_" if n == "actor" else "critic_") for n, m in trained.items()}
    multiplier = LagrangeMultiplier(args, device)  # λ, its update rule and its state
    episode_costs = deque(maxlen=args.episode_cost_window_size)  # this rank's last raw episode costs C(x, y)
    run = start_ppo_run(args, rank, saved_states, trained, optimizers, multiplier, episode_costs)
    prompt_batches = (batch for _, batch in passes(prompt_loader, len(prompt_loader), run.rollout))  # this rank's
    ptx_batches = (batch for _, batch in passes(ptx_loader, len(ptx_loader), run.update_step)) if ptx_loader else None
    # the variant, resolved once: what the reward stream learns at the answer's end (R, or R - λ0·C for
    # reward_shaping) and what the cost stream learns (C, or {C - d}⁺ with the rectified constraint)
    lambda0 = args.lambda_init if args.algorithm == "reward_shaping" else 0.0
    cost_to_learn = (lambda c: rectified_costs(c, args.cost_limit)) if args.constraint == "rectified" else (lambda c: c)
    sampling, gae_settings = sampling_config(args, tokenizer), (args.gamma, args.gae_lambda)
    if rank == 0:
        print(describe_run(args, prompts_line, ptx_loader, use_bf16))

    # ---- the PPO-Lagrangian loop (paper §3.3; docs/math.md §4) ----
    progress, start_time = progress_bar(total_rollouts, args.algorithm, rank, initial=run.rollout), time.time()
    for rollout in range(run.rollout + 1, total_rollouts + 1):
        prompts = next(prompt_batches)
        set_mode(trained, training=False)  # steps 1-4 in eval mode, as the reference: no dropout, the KV cache allowed

        # 1. rollout: sample y ~ π_θ(·|x) for each prompt x of this rank's batch, and the log-probs of π_old. Under
        #    FSDP the actor's weights are gathered once for both, not once per generated token (see gathered())
        max_new_tokens = min(args.max_new_tokens, args.max_length - max(map(len, prompts)))
        with gathered(actor), torch.no_grad(), autocast:
            sequences, attention_mask, P = generate_answers(unwrap(actor), tokenizer, prompts, max_new_tokens, sampling)
            old_log_probs = answer_log_probs(unwrap(actor), sequences, attention_mask, P)  # (B, T); sequences (B, P+T)
        answer_mask = attention_mask[:, P:].float()  # (B, T): 1 on the answer's tokens up to and including its EOS

        # 2. scores: R(x, y) and C(x, y) at the EOS; log-probs of π_ref; values of the critics, V_R (and V_C)
        with torch.no_grad(), autocast:
            end_rewards = end_scores(reward_model, sequences, attention_mask)  # (B,)
            end_costs = end_scores(cost_model, sequences, attention_mask)  # (B,)
            ref_log_probs = answer_log_probs(reference, sequences, attention_mask, P)  # (B, T)
            old_values = {stream: unwrap(critic)(sequences, attention_mask, P) for stream, critic in critics.items()}
        episode_costs.extend(end_costs.tolist())  # the raw C(x, y): J_C is the expected cost, without KL or clipping

        # 3. per-token rewards and costs with the split KL penalty: r_t = -β·k_t + [t=T]·R, c_t = +β·k_t + [t=T]·C
        penalty = (old_log_probs, ref_log_probs, answer_mask, args.kl_coeff, args.clip_range_score)
        rewards = kl_penalized_rewards(shaped_end_rewards(end_rewards, end_costs, lambda0), *penalty)  # (B, T)
        costs = kl_penalized_costs(cost_to_learn(end_costs), *penalty)  # (B, T)
        # 4. GAE, separately for each stream with a critic: rewards (with V_R) and, for ppo_lag, costs (with V_C)
        advantages, returns = {}, {}
        for stream, per_token in list({"reward": rewards, "cost": costs}.items())[: len(critics)]:
            advantages[stream], returns[stream] = gae(per_token, old_values[stream], answer_mask, *gae_settings)

        set_mode(trained, training=True)  # steps 5-7 in training mode: dropout on, gradient checkpointing active
        sums = {}  # this rollout's losses and statistics, summed over its update steps
        for mb in minibatches(len(prompts), args, device):  # update_iters passes over the rollout, shuffled
            # 5. λ: one update against the constraint's violation over the episode-cost window. The window changes
            #    once per rollout, but λ moves at every update step, as in the reference's rl_step
            lagrange_multiplier = multiplier.update(episode_costs)

            # 6. actor: the clipped surrogate on the combined advantage (λ is a number here, not a tensor). With PTX
            #    its gradient stays on each rank (no_sync) and the PTX backward reduces the sum: one step on both
            advantage, mask = actor_advantages(advantages, mb, lagrange_multiplier), answer_mask[mb]  # (b, T)
            with no_sync(actor, enabled=ptx_batches is not None):
                with autocast:
                    log_probs = answer_log_probs(actor, sequences[mb], attention_mask[mb], P)  # (b, T)
                loss = actor_loss(log_probs, old_log_probs[mb], advantage, mask, args.clip_range_ratio)
                loss.backward()
            losses = {"actor": loss}
            if ptx_batches:  # + ptx_coeff × the SFT loss on a batch of SFT data
                losses["ptx"] = ptx_backward(actor, next(ptx_batches), args, device, autocast)

            # 7. critics: the clipped value loss towards the GAE returns, for each stream
            for stream, critic in critics.items():
                with autocast:
                    values = critic(sequences[mb], attention_mask[mb], P)  # (b, T)
                loss = critic_loss(values, old_values[stream][mb], returns[stream][mb], mask, args.clip_range_value)
                loss.backward()
                losses[f"{stream}_critic"] = loss

            # every rank checks the same all-reduced losses and gradient norms, then every trained model steps
            step_trained_models(trained, optimizers, losses, args, f"at rollout {rollout}")
            run.update_step += 1
            with torch.no_grad():
                ratio = torch.exp(log_probs.detach() - old_log_probs[mb])
                clipfrac = masked_mean(((ratio - 1.0).abs() > args.clip_range_ratio).float(), mask)
            stats = {f"loss/{name}": loss.detach() for name, loss in losses.items()} | {"ppo/clipfrac": clipfrac}
            sums = {name: sums.get(name, 0.0) + value for name, value in stats.items()}

        # ---- log (every number a mean over ranks, written by rank 0); now and then a resumable state ----
        kl_per_token = old_log_probs - ref_log_probs  # (B, T)
        metrics = rollout_metrics(rollout, end_rewards, end_costs, kl_per_token, answer_mask, sums, episode_costs, args)
        metrics |= multiplier.metrics() | {"train/actor_lr": optimizers["actor"][1].get_last_lr()[0]}
        reward, cost = metrics["objective/reward"], metrics["objective/cost"]
        progress.set_postfix(reward=f"{reward:.2f}", cost=f"{cost:.2f}", refresh=False)  # shown at the next refresh
        progress.update(1)
        if rank == 0 and (rollout % args.logging_steps == 0 or rollout == total_rollouts):
            log_metrics(run, rollout, metrics)
        if args.save_steps and rollout % args.save_steps == 0 and rollout < total_rollouts:
            save_ppo_state(args, rollout, run, trained, optimizers, multiplier, episode_costs, rank, device)
    progress.close()
    save_policy(args, trained, tokenizer, multiplier, total_rollouts, run, rank, device, start_time)
    return {name: unwrap(model) for name, model in trained.items()} | {"lambda": multiplier.value, "metrics": metrics}


# ---- the loop's helpers ----
def set_mode(trained, training):
    """Every trained model in training mode (dropout, gradient checkpointing) or in eval mode."""
    for model in trained.values():
        model.train(training)


def minibatches(n, args, device):
    """The update steps of a rollout: update_iters passes over its n samples, each shuffled and cut into minibatches
    of per_device_train_batch_size."""
    for _ in range(args.update_iters):
        yield from torch.randperm(n, device=device).split(args.per_device_train_batch_size)


def actor_advantages(advantages, minibatch, lagrange_multiplier):
    # the actor's advantage on a minibatch: (A^R - λ·A^C) / (1 + λ) with a cost stream (ppo_lag), A^R without one
    if "cost" not in advantages:
        return advantages["reward"][minibatch]
    return combined_advantages(advantages["reward"][minibatch], advantages["cost"][minibatch], lagrange_multiplier)


def ptx_backward(actor, batch, args, device, autocast):
    """PTX (docs/math.md §4.7): ptx_coeff × the SFT loss of sft.py on a batch of SFT data (the mean over its answer
    tokens, as transformers computes it from the labels) is added to the actor's gradient. Returns that loss."""
    with autocast:
        ptx_loss = actor(**{k: v.to(device) for k, v in batch.items()}).loss
    (args.ptx_coeff * ptx_loss).backward()
    return ptx_loss


def step_trained_models(trained, optimizers, losses, args, when):
    """Clip each trained model's gradient norm and take its optimiser step, after every rank has checked the same
    all-reduced losses and gradient norms: nothing moves if one of them is NaN or infinite."""
    checked = torch.stack(list(losses.values())).detach()
    dist.all_reduce(checked)
    max_norm, clip = args.max_grad_norm or float("inf"), torch.nn.utils.clip_grad_norm_
    grad_norms = {f"grad_norm/{n}": clip(m.parameters(), max_norm).item() for n, m in trained.items()}
    check_finite({**{f"loss/{k}": v / args.world_size for k, v in zip(losses, checked.tolist())}, **grad_norms}, when)
    for optimizer, scheduler in optimizers.values():
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def rollout_metrics(rollout, end_rewards, end_costs, kl, answer_mask, sums, episode_costs, args):
    """The rollout's numbers, each a mean over ranks (gloo has no AVG: sum, then divide)."""
    updates = args.update_iters * args.minibatches_per_rollout
    stats = {
        "objective/reward": end_rewards.mean(),  # mean R(x, y) of this rollout
        "objective/cost": end_costs.mean(),  # mean C(x, y) of this rollout
        "objective/unsafe_rate": (end_costs > 0).float().mean(),  # share of answers the cost model calls unsafe
        "objective/kl": (kl * answer_mask).sum(-1).mean(),  # Σ_t k_t per answer, k_t = log π_old - log π_ref
        "objective/answer_length": answer_mask.sum(-1).mean(),  # answer tokens, EOS included
        **{name: value / updates for name, value in sums.items()},
        "objective/episode_cost": torch.tensor(list(episode_costs)).mean(),  # J_C, the window's mean raw cost
    }
    values = torch.stack([torch.as_tensor(v, device=end_costs.device, dtype=torch.float32) for v in stats.values()])
    dist.all_reduce(values)
    return {"rollout": rollout, **dict(zip(stats, (values / args.world_size).tolist()))}


# ---- setup for this stage (skip on a first reading) ----
def sampling_config(args, tokenizer):
    """The rollout's sampling: the full policy at --temperature and --top_p (top_k 0: no cut), the KV cache, and the
    pad token never sampled (it marks the end of an answer)."""
    return GenerationConfig(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0, use_cache=True,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, suppress_tokens=[tokenizer.pad_token_id])  # fmt: skip


def describe_run(args, prompts_line, ptx_loader, use_bf16):
    """The start-up line: the variant, the prompts and the rollout budget."""
    share = f", at most {args.tolerance:.0%} of answers over it" if args.constraint == "rectified" else ""
    variant = f" ({args.constraint} constraint, d = {args.cost_limit}{share}, λ by {args.lambda_update})"
    variant = variant if args.algorithm == "ppo_lag" else ""
    variant += f", π_ref {args.reference_model}" if args.reference_model else ""
    ptx = "on" if ptx_loader else "off"
    return f"{args.algorithm}{variant}: {prompts_line}, kl_coeff {args.kl_coeff}, PTX {ptx}, bf16 {use_bf16}"


def load_policy_tokenizer(path):
    """The SFT model's tokenizer; its pad token must differ from EOS (answers stop at EOS, pad fills after it)."""
    tokenizer = load_pretrained(AutoTokenizer, path)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise InputError(f"{path}: the pad token must exist and differ from EOS; start from an sft.py checkpoint")
    tokenizer.padding_side = "right"  # for the PTX batches (the rollout left-pads its prompts itself)
    return tokenizer


def load_prompts(args, tokenizer, rank):
    """The distinct prompts, tokenised with the template (PKU-SafeRLHF repeats prompts across rows: each is used once
    per pass), and a loader of this rank's prompt batches. A rollout batch larger than the prompt set repeats the
    prompts within a pass. Returns (the loader, rollouts to run, the start-up line's words on them)."""
    prompts = []
    for number, row in load_rows(args.prompt_data, args.prompt_split):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            found = "missing" if row.get("prompt") is None else f"expected a non-empty string, got {row['prompt']!r}"
            raise InputError(f"{args.prompt_data}, row {number}, field 'prompt': {found}")
        prompts.append(row["prompt"])
    distinct = list(dict.fromkeys(prompts))
    all_prompt_ids = [tokenizer(PROMPT_TEMPLATE.format(prompt=p))["input_ids"] for p in distinct]
    prompt_ids = [ids for ids in all_prompt_ids if len(ids) < args.max_length]
    if not prompt_ids:
        raise InputError(f"{args.prompt_data}: no prompt is shorter than --max_length ({args.max_length} tokens)")
    copies = math.ceil(args.rollout_batch_size / len(prompt_ids))  # a rollout batch larger than the prompt set
    if copies > 1 and rank == 0:
        few = f"{len(prompt_ids)} distinct prompts, fewer than one rollout batch ({args.rollout_batch_size} answers)"
        print(f"warning: {args.prompt_data}: {few}: each is answered {copies} times per pass", file=sys.stderr)
    loader = data_loader(prompt_ids * copies, args.per_device_prompt_batch_size, args.seed, list)
    total_rollouts = args.max_steps if args.max_steps > 0 else len(loader) * args.epochs
    updates = total_rollouts * args.update_iters * args.minibatches_per_rollout
    line = (
        f"{len(distinct)} distinct prompts ({len(prompts)} rows; {len(all_prompt_ids) - len(prompt_ids)} dropped: "
        f"not shorter than max_length), world size {args.world_size}, {args.rollout_batch_size} answers per "
        f"rollout, {total_rollouts} rollouts: each prompt answered "
        f"{total_rollouts * args.rollout_batch_size / len(prompt_ids):.1f} "
        f"times ({total_rollouts / len(loader):.2f} passes), {updates} update steps"
    )
    return loader, total_rollouts, line


def load_ptx_data(args, tokenizer):
    """The PTX loader of SFT examples (--ptx_data), one batch per update step; None without it."""
    if not args.ptx_data:
        return None
    pairs = sft_rows(load_rows(args.ptx_data, args.ptx_split), args.ptx_data)
    examples, _ = sft_examples(tokenizer, pairs, args.max_length)
    if len(examples) < args.per_device_train_batch_size * args.world_size:
        raise InputError(f"{args.ptx_data}: too few usable rows for one PTX batch")
    return data_loader(examples, args.per_device_train_batch_size, args.seed, DataCollatorForSeq2Seq(tokenizer))


def load_models(args, tokenizer, device, use_bf16):
    """The six models, each checked to be what it is given as: the actor (trained) and π_ref (frozen) from the SFT
    model (π_ref from --reference_model if given), the reward and cost models (frozen: a swapped or foreign pair is
    refused), and the critics (trained) from them: V_R, and V_C for ppo_lag. Trained ones in fp32 under DDP or FSDP2,
    frozen ones in bf16 where bf16 is used."""
    given = [args.reference_model, args.reward_model, args.cost_model, args.reward_critic_model, args.cost_critic_model]
    for path in [path for path in given if path]:
        if load_pretrained(AutoTokenizer, path).get_vocab() != tokenizer.get_vocab():
            raise InputError(f"{path}: its tokenizer differs from the actor's; all models must come from one SFT model")

    def frozen(model_class, path):  # sharded with --fsdp, every unit freed after its forward
        model = load_pretrained(model_class, path, dtype=torch.bfloat16 if use_bf16 else torch.float32).eval()
        model.requires_grad_(False)
        return fsdp_shard(model, use_bf16, True) if args.fsdp else model.to(device)

    actor = load_pretrained(AutoModelForCausalLM, args.actor_model, dtype=torch.float32)
    reference = frozen(AutoModelForCausalLM, args.reference_model or args.actor_model)
    reward_model = frozen(AutoModelForSequenceClassification, args.reward_model)
    cost_model = frozen(AutoModelForSequenceClassification, args.cost_model)
    if len(tokenizer) > actor.get_input_embeddings().num_embeddings:
        raise InputError(f"{args.actor_model}: its tokenizer has more tokens than the model has embeddings")
    for model, flag in ((actor, "actor_model"), (reference, "reference_model")):
        if getattr(model.config, "objective", None):  # written by preference_model.py: a score model, not a policy
            kind = model.config.objective
            raise InputError(f"{getattr(args, flag)}: a {kind} model, not a policy; give the SFT model as --{flag}")
    check_objective(getattr(reward_model.config, "objective", None), "reward", args.reward_model)
    check_objective(getattr(cost_model.config, "objective", None), "cost", args.cost_model)
    paths = {"reward": args.reward_critic_model or args.reward_model, "cost": args.cost_critic_model or args.cost_model}
    rectify_at = {"cost": args.cost_limit} if args.constraint == "rectified" else {}  # the cost critic's {V - d}⁺
    streams = ["reward", "cost"] if args.algorithm == "ppo_lag" else ["reward"]
    critics = {
        s: Critic(load_pretrained(AutoModelForSequenceClassification, paths[s], dtype=torch.float32), rectify_at.get(s))
        for s in streams
    }
    for model in [actor, reference, reward_model, cost_model, *(critic.score_model for critic in critics.values())]:
        model.config.pad_token_id = tokenizer.pad_token_id
    for model in [actor, *(critic.score_model for critic in critics.values())] if args.gradient_checkpointing else []:
        enable_activation_checkpointing(model)
    actor = wrap_trained_model(actor, device, args.fsdp, use_bf16)
    critics = {stream: wrap_trained_model(critic, device, args.fsdp, use_bf16) for stream, critic in critics.items()}
    return actor, reference, reward_model, cost_model, critics


def check_objective(objective, expected, path):
    """A score model must be the kind it is given as (config.objective, written by preference_model.py): a swapped or
    foreign model would train towards harm, or call harmful answers safe (the cost sign is easy to flip)."""
    if objective != expected:
        found = f"this is a {objective} model" if objective else (
            f"its config has no 'objective' (preference_model.py writes it; for a model from elsewhere add "
            f'"objective": "{expected}" to its config.json)')  # fmt: skip
        raise InputError(f"{path}: {found}, but it was given as the {expected} model")


def start_ppo_run(args, rank, saved_states, trained, optimizers, multiplier, episode_costs):
    """The run (start_run), and what a resume puts back besides the models and optimisers: the schedules, λ's state,
    the episode-cost window, and the rollouts and update steps done (the prompts and PTX batches used)."""
    modules = {name: (model, optimizers[name][0]) for name, model in trained.items()}
    run = start_run(args, rank, saved_states, modules)
    run.rollout, run.update_step = run.state.get("rollout", 0), run.state.get("update_step", 0)
    if run.state:
        multiplier.load_state_dict(run.state["multiplier"])
        episode_costs.extend(run.state["episode_costs"])
        for (_, scheduler), state in zip(optimizers.values(), run.state["schedulers"]):
            scheduler.load_state_dict(state)
    return run


def save_ppo_state(args, rollout, run, trained, optimizers, multiplier, episode_costs, rank, device):
    """A resumable state (save_state): the trained models and optimisers, and per rank the counters, schedules, λ's
    state and the episode-cost window. Never a non-finite model."""
    counters = {"rollout": rollout, "update_step": run.update_step, "multiplier": multiplier.state_dict()}
    counters |= {"episode_costs": list(episode_costs), "schedulers": [s.state_dict() for _, s in optimizers.values()]}
    modules = {name: (model, optimizers[name][0]) for name, model in trained.items()}
    save_state(run, args, rollout, modules, counters, rank, device)


def save_policy(args, trained, tokenizer, multiplier, rollouts, run, rank, device, start_time):
    """The actor (and with --save_critics the critics) as Hugging Face checkpoints, renamed into OUTPUT_DIR. Every rank
    takes part (under FSDP the weights are gathered from the shards); rank 0 writes. Never a non-finite model."""
    critics = {name: model for name, model in trained.items() if name != "actor" and args.save_critics}
    save_model(unwrap(trained["actor"]), run.partial, rank, device)
    for name, critic in critics.items():
        save_model(unwrap(critic).score_model, run.partial / name, rank, device)
    if rank == 0:
        for directory in [run.partial] + [run.partial / name for name in critics]:
            tokenizer.save_pretrained(directory)
        training_state = {"rollouts": rollouts, "lambda": multiplier.value}
        (run.partial / "training_state.json").write_text(json.dumps(training_state, indent=2))
    finish_run(run, args, "ppo_lagrangian.py", rank, device, start_time)


def tokenize_prompt_and_answer(tokenizer, prompt, answer, max_length):
    """Token ids of the templated prompt and of the answer + EOS, max_length in all. The answer is tokenised where a
    model meets it, after the prompt in one text, then cut off by the prompt's own token count: with SentencePiece
    tokenizers `" " + answer` alone gives other tokens than a model generates after `ASSISTANT:` (docs/math.md §1)."""
    prompt_text = PROMPT_TEMPLATE.format(prompt=prompt)
    prompt_ids = tokenizer(prompt_text)["input_ids"][:max_length]
    answer_ids = tokenizer(prompt_text + " " + answer.strip())["input_ids"][len(prompt_ids) :]
    return prompt_ids, (answer_ids + [tokenizer.eos_token_id])[: max_length - len(prompt_ids)]


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


@contextmanager
def gathered(model):
    """Under FSDP2, a phase of no-grad forwards (generating, scoring) gathers the weights once, not at every forward
    (every token), and frees them at its end; each rank then stops at its own answers' end."""
    fsdp = hasattr(model, "set_reshard_after_forward")
    if fsdp:
        model.set_reshard_after_forward(False)  # (it recurses into the layers)
    yield
    if fsdp:
        model.set_reshard_after_forward(True)  # back to freeing every unit after its forward
        for unit in [module for module in model.modules() if hasattr(module, "set_reshard_after_forward")]:
            unit.reshard()


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
