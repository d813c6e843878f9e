"""Stage 3 of Safe RLHF: PPO-Lagrangian, the policy update with a reward critic, a cost critic and a learned λ.

Safe RLHF (paper §3.3; reference note §3) maximises helpfulness subject to a harmlessness constraint,

    max_θ J_R(θ)  s.t.  J_C(θ) ≤ d,    J_R = E[R(x, y)],  J_C = E[C(x, y)],   y ~ π_θ(·|x)

where C(x, y) > 0 means the cost model calls the answer unsafe (C < 0: safe), and d is `--cost_limit`. It is solved
as the min-max problem  max_θ min_{λ≥0}  J_R(θ) - λ · (J_C(θ) - d)  by alternating a clipped PPO step on θ, with the
combined advantage (A_R - λ·A_C) / (1 + λ), and a gradient step on λ (dual ascent): λ grows while the policy costs
more than d and shrinks once it is safe. Six models take part: the actor (from SFT, trained), the reference policy
(SFT, frozen), the reward and cost models (frozen), and the reward and cost critics (initialised from the reward and
cost models, trained).

One iteration, as in `main()` below:
    1. rollout: the actor samples an answer to each prompt of the batch (KV cache, left padding, stop at EOS)
    2. scores: R(x, y) and C(x, y) at the EOS; log-probs of the actor and the reference; values of both critics
    3. per-token rewards  r_t = -β·k_t + [t=T]·R   and costs  c_t = +β·k_t + [t=T]·C,   k_t = log π_old - log π_ref
    4. GAE for rewards (with V_R) and costs (with V_C)
    then, for each of the update_iters × (prompt batch / train batch) update steps (minibatches):
    5. Lagrange multiplier: one SGD step on log λ against J_C - d, J_C the mean raw episode cost of the last
       window (all ranks alike); as in the reference's rl_step, once per update step, not once per rollout
    6. actor: clipped surrogate on (A_R - λ·A_C) / (1 + λ)   (+ ptx_coeff × the SFT loss on a batch of SFT data)
    7. critics: clipped value losses towards the GAE returns

`--algorithm` selects the paper's comparisons on the same code path, each with the reference's KL coefficient β
as its default (0.01 for ppo_lag; 0.02 for the baselines, as in the reference's ppo.sh and ppo-reward-shaping.sh):
    ppo_lag         PPO-Lagrangian (above)
    ppo             reward only: no cost stream and no cost critic (the cost model still scores answers, for the log)
    reward_shaping  end reward R - λ0·C with λ0 = --lambda_init fixed, one critic

Two variants of ppo_lag that are not in the paper (defaults: the paper's):
  --constraint rectified   RePO (Peng et al. 2024, "Enhancing Safety in RLHF via Rectified Policy Optimization",
      arXiv 2410.19933). The expected constraint E[C] ≤ d lets very safe answers (C ≪ d, typically to benign
      prompts) pay for harmful ones: with d = 0 a policy can comply with every harmful request and still satisfy it
      ("safety compensation"). RePO asks instead for C(x, y) ≤ d on every prompt and relaxes it to the rectified
      penalty {C - d}⁺ = max(0, C - d) per answer. What this script optimises is
          max_θ min_{λ≥0}  E[R(x, y)] - λ·E[{C(x, y) - d}⁺]
      on the same code path: the cost stream's end cost is {C - d}⁺ instead of C (an answer within the limit costs
      nothing, however safe), and λ moves on g = mean({C - d}⁺) ≥ 0 of the episode-cost window instead of J_C - d,
      so λ only rises while any answer violates the limit and stays put once none does. Its natural setting is
      d = 0, where the cost model's own sign (safe < 0 < unsafe) is the limit, whatever its scale. Where this may
      differ from RePO's code (not available to us): that code's handling of KL, clipping and the split of batches
      into safe and unsafe answers; here the KL and clipping are the paper's and every batch is used as sampled.
  --lambda_update pid      PID Lagrangian (Stooke, Achiam & Abbeel, ICML 2020) instead of the SGD step on log λ:
      λ = K_P·g + K_I·Σg + K_D·(rise of g), clipped to [0, λ_max], with g the violation above (the integral term
      alone is gradient ascent on λ; P and D damp λ's overshoot and the cost's oscillation around d).

`--max_steps N` runs exactly N rollouts, cycling over the de-duplicated prompts. Rollout and scoring run in eval mode
(no dropout, KV cache), the update in training mode (dropout, gradient checkpointing). With --ptx_data the actor
takes one optimiser step on the summed PPO and PTX gradients, as the reference does.

Deliberate differences from the reference code: answers are sampled from the full policy (top_k disabled; the
reference inherits Hugging Face's default top_k=50), so the rollout is on-policy at temperature 1 and top_p 1; the
reward and cost models must share the actor's tokenizer (trained from the same SFT model: nothing is re-tokenised);
plain PyTorch DDP, or FSDP2 with --fsdp, instead of DeepSpeed (at 7B: --fsdp, see README "Running at paper scale").

Run (toy world, one process):
    python ppo_lagrangian.py --actor_model runs/toy/sft --reward_model runs/toy/reward --cost_model runs/toy/cost \
        --prompt_data data/toy/prompts.jsonl --output_dir runs/toy/ppo_lag --max_new_tokens 48 \
        --actor_lr 1e-4 --critic_lr 1e-4 --no_gradient_checkpointing
Run (paper scale, 8 GPUs; the defaults are the reference's settings):
    torchrun --standalone --nproc_per_node=8 ppo_lagrangian.py --fsdp --actor_model output/sft \
        --reward_model output/reward --cost_model output/cost --ptx_data tatsu-lab/alpaca --output_dir output/ppo_lag
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
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from sft import collate, count_answer_tokens, sft_examples, sft_loss_sum, sft_rows  # the PTX loss: stage 1's loss on SFT data
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig,
                          HfArgumentParser, get_scheduler, set_seed)

PROMPT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"
PKU_SAFERLHF = "PKU-Alignment/PKU-SafeRLHF"
REFERENCE_KL_COEFF = {"ppo_lag": 0.01, "ppo": 0.02, "reward_shaping": 0.02}  # the reference's scripts/*.sh


@dataclass
class Args:
    actor_model: str = field(default="output/sft", metadata={"help": "the SFT checkpoint: the initial actor and the frozen reference policy"})
    reward_model: str = field(default="output/reward", metadata={"help": "the reward model (preference_model.py --objective reward)"})
    cost_model: str = field(default="output/cost", metadata={"help": "the cost model (preference_model.py --objective cost)"})
    reward_critic_model: str = field(default="", metadata={"help": "initial reward critic ('' = the reward model)"})
    cost_critic_model: str = field(default="", metadata={"help": "initial cost critic ('' = the cost model)"})
    prompt_data: str = field(default=PKU_SAFERLHF, metadata={"help": "prompts for the rollouts (rows with a 'prompt' field): local .json/.jsonl/.parquet/.csv or hub NAME[@REVISION]"})
    prompt_split: str = field(default="train", metadata={"help": "split of a hub prompt data set"})
    ptx_data: str = field(default="", metadata={"help": "optional SFT data ({prompt, response} or Alpaca rows) for the PTX loss"})
    ptx_split: str = field(default="train", metadata={"help": "split of a hub PTX data set"})
    output_dir: str = field(default="output/ppo_lag", metadata={"help": "where the actor checkpoint, args.json and metrics.jsonl go"})
    algorithm: str = field(default="ppo_lag", metadata={"help": "ppo_lag (PPO-Lagrangian), ppo (reward only) or reward_shaping (R - λ0·C, fixed λ0)", "choices": ["ppo_lag", "ppo", "reward_shaping"]})
    cost_limit: float = field(default=0.0, metadata={"help": "d, the limit on the expected cost J_C (the reference's --threshold), or on each answer's cost with --constraint rectified"})
    constraint: str = field(default="expected", metadata={"help": "ppo_lag's constraint: expected (the paper's, E[C] ≤ d) or rectified (RePO's, per answer: penalise only {C - d}⁺)", "choices": ["expected", "rectified"]})
    lambda_update: str = field(default="sgd", metadata={"help": "how ppo_lag's λ moves: sgd (the paper's step on log λ) or pid (Stooke et al. 2020, PID Lagrangian)", "choices": ["sgd", "pid"]})
    lambda_init: float = field(default=1.0, metadata={"help": "initial λ (and the fixed λ0 of reward_shaping)"})
    lambda_lr: float = field(default=0.1, metadata={"help": "SGD learning rate of log λ (--lambda_update sgd)"})
    lambda_max: float = field(default=5.0, metadata={"help": "upper bound on λ"})
    pid_kp: float = field(default=0.1, metadata={"help": "K_P of --lambda_update pid: λ's share proportional to the current violation g"})
    pid_ki: float = field(default=0.02, metadata={"help": "K_I of --lambda_update pid: λ's share proportional to the summed violations (one term per update step)"})
    pid_kd: float = field(default=0.1, metadata={"help": "K_D of --lambda_update pid: λ's share proportional to a rise of the violation since the last update step"})
    lambda_update_delay_steps: int = field(default=0, metadata={"help": "update steps before λ starts to move"})
    episode_cost_window_size: int = field(default=128, metadata={"help": "J_C is the mean of each rank's last N episode costs, averaged over ranks"})
    kl_coeff: Optional[float] = field(default=None, metadata={"help": "β, the weight of the per-token KL penalty to the reference (default: the reference's, 0.01 for ppo_lag and 0.02 for ppo and reward_shaping)"})
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
    epochs: int = field(default=1, metadata={"help": "passes over the prompts (when --max_steps is not given)"})
    max_steps: int = field(default=-1, metadata={"help": "run exactly this many rollouts, cycling over the prompts (-1: --epochs passes)"})
    actor_lr: float = field(default=1e-5, metadata={"help": "actor learning rate"})
    actor_lr_scheduler: str = field(default="cosine", metadata={"help": "actor schedule after warm-up", "choices": ["cosine", "linear", "constant"]})
    actor_lr_warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of the actor's steps spent warming up"})
    actor_weight_decay: float = field(default=0.01, metadata={"help": "actor AdamW weight decay"})
    critic_lr: float = field(default=5e-6, metadata={"help": "critic learning rate"})
    critic_lr_scheduler: str = field(default="constant", metadata={"help": "critic schedule after warm-up", "choices": ["cosine", "linear", "constant"]})
    critic_lr_warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of the critics' steps spent warming up"})
    critic_weight_decay: float = field(default=0.0, metadata={"help": "critic AdamW weight decay"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW β1 of the actor and the critics"})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW β2 of the actor and the critics"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: no clipping)"})
    seed: int = field(default=42, metadata={"help": "random seed (rank r samples with seed + r)"})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast (and bf16 frozen models), used only where the device supports it"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute activations of the trained models in the backward pass"})
    fsdp: bool = field(default=False, metadata={"help": "FSDP2: shard all six models (and the trained ones' gradients and optimiser states) over the ranks; see README, 'Running at paper scale'"})
    save_critics: bool = field(default=False, metadata={"help": "also save both critics (OUTPUT_DIR/reward_critic, OUTPUT_DIR/cost_critic)"})
    save_steps: int = field(default=0, metadata={"help": "save a resumable training state every N rollouts, to OUTPUT_DIR.partial/checkpoint-N (0: never)"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest OUTPUT_DIR.partial/checkpoint-N of a run that was stopped"})
    logging_steps: int = field(default=1, metadata={"help": "log every N rollouts"})
    report_to: str = field(default="none", metadata={"help": "experiment tracker besides metrics.jsonl (TensorBoard: OUTPUT_DIR/runs)", "choices": ["none", "tensorboard", "wandb"]})
    # derived at run time, right after parsing
    world_size: int = field(default=1, init=False)
    rollout_batch_size: int = field(default=0, init=False)
    minibatches_per_rollout: int = field(default=0, init=False)

    def __post_init__(self):  # every range, checked right after parsing: a bad value is one line naming the flag
        require(self, "max_length max_new_tokens per_device_prompt_batch_size per_device_train_batch_size update_iters epochs "
                      "episode_cost_window_size logging_steps", lambda v: v >= 1, "at least 1")
        require(self, "max_steps", lambda v: v == -1 or v >= 1, "-1 (--epochs passes) or at least 1")
        require(self, "actor_lr critic_lr lambda_init lambda_max temperature clip_range_ratio clip_range_score clip_range_value",
                lambda v: v > 0, "positive")
        require(self, "top_p", lambda v: 0 < v <= 1, "in (0, 1]")
        require(self, "gamma gae_lambda actor_lr_warmup_ratio critic_lr_warmup_ratio adam_beta1 adam_beta2", lambda v: 0 <= v <= 1, "in [0, 1]")
        require(self, "lambda_lr lambda_update_delay_steps ptx_coeff actor_weight_decay critic_weight_decay max_grad_norm save_steps",
                lambda v: v >= 0, "at least 0")
        require(self, "kl_coeff", lambda v: v is None or v >= 0, "at least 0")
        require(self, "pid_kp pid_ki pid_kd", lambda v: v >= 0, "at least 0")
        require(self, "constraint", lambda v: v == "expected" or self.algorithm == "ppo_lag", "expected unless --algorithm ppo_lag (only PPO-Lagrangian has a constraint)")
        require(self, "lambda_update", lambda v: v == "sgd" or self.algorithm == "ppo_lag", "sgd unless --algorithm ppo_lag (only PPO-Lagrangian learns λ)")
        require(self, "pid_ki", lambda v: v > 0 or self.lambda_update == "sgd", "positive with --lambda_update pid (the integral term sets where λ settles)")


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


def shaped_end_rewards(end_rewards, end_costs, lambda0):
    # the reward-shaping baseline's end reward: R(x, y) - λ0·C(x, y), λ0 fixed (a costly answer earns less)
    return end_rewards - lambda0 * end_costs


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


def rectified_costs(costs, cost_limit):
    # {C(x, y) - d}⁺ = max(0, C(x, y) - d): an answer within the limit costs nothing, however safe it is (RePO)
    return (costs - cost_limit).clamp(min=0.0)


def constraint_violation(episode_costs, cost_limit, constraint):
    # expected:   g = J_C - d = mean(C) - d        (paper §3.3: negative once the policy is safe on average, so very
    #                                               safe answers can pay for harmful ones: "safety compensation")
    # rectified:  g = mean({C - d}⁺) ≥ 0           (RePO: every answer over the limit counts, none can pay for another)
    return episode_costs.mean() - cost_limit if constraint == "expected" else rectified_costs(episode_costs, cost_limit).mean()


def lagrange_multiplier_loss(log_lambda, violation):
    # loss_λ = -g·exp(log λ): a descent step raises λ when g > 0 (the constraint is violated) and lowers it when g < 0
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
    #   I ← clip(I + g, 0, λ_max / K_I)        ∂ ← max(0, g - g_prev)        λ ← clip(K_P·g + K_I·I + K_D·∂, 0, λ_max)
    # The integral alone is plain gradient ascent on λ (lr K_I); the proportional term reacts to the violation now,
    # the derivative term to a cost that is rising, both before the integral has wound up. Returns (λ, I).
    # Our one addition: I is capped at λ_max / K_I, so that a long violation cannot wind it up beyond what λ may use.
    integral = min(max(integral + violation, 0.0), lambda_max / ki)
    derivative = max(violation - previous_violation, 0.0)
    return min(max(kp * violation + ki * integral + kd * derivative, 0.0), lambda_max), integral


# ---- the models at work: sampling, log-probs, scores and values ----
@torch.no_grad()
def generate_answers(model, tokenizer, prompt_ids, max_new_tokens, temperature=1.0, top_p=1.0, greedy=False):
    """Answers to a batch of tokenised prompts with the KV cache (call it in eval mode). Prompts are left-padded to a
    common length P, so the answers start together at column P. Returns (sequences (B, P+T), attention_mask (B, P+T),
    P): each answer stops at its first EOS (kept); the tokens after it are pad and masked out."""
    device, pad, eos = next(model.parameters()).device, tokenizer.pad_token_id, tokenizer.eos_token_id
    prompt_length = max(map(len, prompt_ids))
    input_ids = torch.full((len(prompt_ids), prompt_length), pad, device=device)
    prompt_mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(prompt_ids):
        input_ids[i, prompt_length - len(ids) :], prompt_mask[i, prompt_length - len(ids) :] = torch.tensor(ids), 1
    sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}  # top_k 0: the full policy
    config = GenerationConfig(do_sample=not greedy, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                              bos_token_id=tokenizer.bos_token_id, suppress_tokens=[pad], use_cache=True, **sampling)
    # synced_gpus=False: each rank stops at its own answers' end (under FSDP the weights are gathered beforehand)
    sequences = model.generate(input_ids=input_ids, attention_mask=prompt_mask, generation_config=config, synced_gpus=False)  # (B, P+T)
    answers = sequences[:, prompt_length:]  # (B, T)
    is_eos = answers == eos
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    answers = answers.masked_fill(after_eos, pad)
    attention_mask = torch.cat([prompt_mask, (~after_eos).long()], dim=-1)
    return torch.cat([input_ids, answers], dim=-1), attention_mask, prompt_length


def answer_log_probs(model, sequences, attention_mask, prompt_length):
    """log π(a_t | x, a_<t) of every answer token: (B, P+T) -> (B, T). The logits at position P-1+t predict token t."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
    answer_logits, answer_tokens = logits[:, prompt_length - 1 : -1], sequences[:, prompt_length:]  # (B, T, V), (B, T)
    return torch.log_softmax(answer_logits.float(), dim=-1).gather(-1, answer_tokens.unsqueeze(-1)).squeeze(-1)


def end_scores(score_model, input_ids, attention_mask):
    """The score model's output at each sequence's last non-pad token (the EOS), for left or right padding.
    Position ids follow the attention mask, so padding changes nothing."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return score_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits.squeeze(-1).float()


class Critic(torch.nn.Module):
    """A critic V(s_t): a score model's head read at every answer position instead of only at the EOS. V_t is read at
    position P-1+t, the state before answer token t. A module of its own because DDP must wrap the module whose
    forward it runs."""

    def __init__(self, score_model):
        super().__init__()
        self.score_model = score_model

    def forward(self, sequences, attention_mask, prompt_length):
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        backbone = getattr(self.score_model, self.score_model.base_model_prefix)
        hidden = backbone(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state  # (B, P+T, H)
        return self.score_model.score(hidden[:, prompt_length - 1 : -1]).squeeze(-1).float()  # (B, T)


# ---- data: the prompts, pass after pass ----
def endless(loader, sampler):
    """The batches of a DataLoader, pass after pass, each pass shuffled anew (the sampler's epoch)."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def main():
    args = parse_args(Args)
    if args.per_device_prompt_batch_size % args.per_device_train_batch_size:
        raise InputError(f"--per_device_train_batch_size ({args.per_device_train_batch_size}) must divide "
                         f"--per_device_prompt_batch_size ({args.per_device_prompt_batch_size})")
    if args.kl_coeff is None:
        args.kl_coeff = REFERENCE_KL_COEFF[args.algorithm]
    check_output_dir(args.output_dir, {name: getattr(args, name) for name in ("actor_model", "reward_model", "cost_model", "reward_critic_model",
                                                                               "cost_critic_model", "prompt_data", "ptx_data")})
    rank, args.world_size, device = setup_distributed()
    args.rollout_batch_size = args.per_device_prompt_batch_size * args.world_size
    args.minibatches_per_rollout = args.per_device_prompt_batch_size // args.per_device_train_batch_size
    set_seed(args.seed + rank)  # each rank samples different answers
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
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise InputError(f"{where(args.prompt_data, row_number)}, field 'prompt': " + ("missing" if row.get("prompt") is None else f"expected a non-empty string, got {row['prompt']!r}"))
        prompts.append(row["prompt"])
    distinct_prompts = list(dict.fromkeys(prompts))  # PKU-SafeRLHF repeats prompts across rows: each is used once per pass
    all_prompt_ids = [tokenizer(PROMPT_TEMPLATE.format(prompt=p))["input_ids"] for p in distinct_prompts]
    prompt_ids = [ids for ids in all_prompt_ids if len(ids) < args.max_length]
    if not prompt_ids:
        raise InputError(f"{args.prompt_data}: no usable prompts (every one is at least --max_length {args.max_length} tokens)")
    copies = math.ceil(args.rollout_batch_size / len(prompt_ids))
    if copies > 1 and rank == 0:  # a rollout batch larger than the prompt set: each pass holds every prompt `copies` times
        logging.warning(f"{args.prompt_data}: {len(prompt_ids)} distinct prompts, fewer than one rollout batch ({args.rollout_batch_size} "
                        f"answers): each prompt is answered {copies} times per pass")
    prompt_ids = prompt_ids * copies
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
    if len(tokenizer) > actor.get_input_embeddings().num_embeddings:
        raise InputError(f"{args.actor_model}: its tokenizer has more tokens than the model has embeddings; start from an sft.py checkpoint")
    if getattr(actor.config, "objective", None):  # written by preference_model.py: a score model, not a policy
        raise InputError(f"{args.actor_model}: this is a {actor.config.objective} model, not a policy; give the SFT model as --actor_model")
    for score_model, expected, path in ((reward_model, "reward", args.reward_model), (cost_model, "cost", args.cost_model)):
        objective = getattr(score_model.config, "objective", None)
        if objective != expected:  # a swapped or foreign model would train towards harm: the cost sign is easy to flip
            raise InputError(f"{path}: " + (f"this is a {objective} model" if objective else "its config has no 'objective' (preference_model.py "
                             f"writes it; for a model from elsewhere add \"objective\": \"{expected}\" to its config.json)") + f", but it was given as the {expected} model")
    reward_critic = Critic(load_pretrained(AutoModelForSequenceClassification, args.reward_critic_model or args.reward_model, dtype=torch.float32))
    cost_critic = Critic(load_pretrained(AutoModelForSequenceClassification, args.cost_critic_model or args.cost_model, dtype=torch.float32)) if use_lagrangian else None
    trained_backbones = [actor, reward_critic.score_model] + ([cost_critic.score_model] if use_lagrangian else [])
    for model in trained_backbones + [reference, reward_model, cost_model]:
        model.config.pad_token_id = tokenizer.pad_token_id
    if args.gradient_checkpointing:
        for model in trained_backbones:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # the trained models under DDP (or sharded with --fsdp); the frozen ones bare (or sharded too with --fsdp)
    actor, reward_critic = wrap_model(actor, device, args.fsdp, use_bf16), wrap_model(reward_critic, device, args.fsdp, use_bf16)
    cost_critic = wrap_model(cost_critic, device, args.fsdp, use_bf16) if use_lagrangian else None
    reference, reward_model, cost_model = (wrap_model(m, device, args.fsdp, use_bf16, trained=False) for m in (reference, reward_model, cost_model))
    trained = [actor, reward_critic] + ([cost_critic] if use_lagrangian else [])

    # ---- optimisers: AdamW for the actor and the critics, SGD on log λ ----
    sampler = DistributedSampler(prompt_ids, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(prompt_ids, batch_size=args.per_device_prompt_batch_size, sampler=sampler, drop_last=True, collate_fn=list,
                        generator=torch.Generator().manual_seed(args.seed))  # its own generator: a resume's skipping leaves the global one alone
    total_rollouts = args.max_steps if args.max_steps > 0 else len(loader) * args.epochs
    total_updates = total_rollouts * args.update_iters * args.minibatches_per_rollout

    def adamw(model, lr, weight_decay, schedule, warmup_ratio):
        groups = [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": weight_decay},  # no decay on norms and biases
                  {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(args.adam_beta1, args.adam_beta2))
        return optimizer, get_scheduler(schedule, optimizer, num_warmup_steps=math.ceil(warmup_ratio * total_updates), num_training_steps=total_updates)

    actor_optimizer, actor_scheduler = adamw(actor, args.actor_lr, args.actor_weight_decay, args.actor_lr_scheduler, args.actor_lr_warmup_ratio)
    critic_adamw = lambda critic: adamw(critic, args.critic_lr, args.critic_weight_decay, args.critic_lr_scheduler, args.critic_lr_warmup_ratio)
    reward_critic_optimizer, reward_critic_scheduler = critic_adamw(reward_critic)
    cost_critic_optimizer, cost_critic_scheduler = critic_adamw(cost_critic) if use_lagrangian else (None, None)
    log_lambda = torch.tensor(math.log(args.lambda_init), device=device, requires_grad=True)  # λ = exp(log λ) > 0
    lambda_optimizer = torch.optim.SGD([log_lambda], lr=args.lambda_lr)
    lagrange_multiplier = args.lambda_init
    pid_integral, previous_violation = args.lambda_init / args.pid_ki if args.pid_ki else 0.0, None  # the PID's state: λ starts at λ_init
    episode_costs = deque(maxlen=args.episode_cost_window_size)  # this rank's last raw episode costs C(x, y)
    prompt_batches = endless(loader, sampler)
    if ptx_examples:
        ptx_sampler = DistributedSampler(ptx_examples, shuffle=True, seed=args.seed, drop_last=True)
        ptx_batches = endless(DataLoader(ptx_examples, batch_size=args.per_device_train_batch_size, sampler=ptx_sampler, drop_last=True,
                                         collate_fn=lambda batch: collate(batch, tokenizer.pad_token_id), generator=torch.Generator().manual_seed(args.seed)), ptx_sampler)

    checkpoint = latest_checkpoint(args.output_dir) if args.resume else None
    if args.resume and checkpoint is None:
        raise InputError(f"--resume: no saved state (checkpoint-N) in {args.output_dir}.partial to resume from")
    partial = start_output_dir(args.output_dir, args.resume) if rank == 0 else None
    tracker = start_tracker(args.report_to, partial, args) if rank == 0 else None
    if rank == 0:
        print(f"{args.algorithm}" + (f" ({args.constraint} constraint, d = {args.cost_limit}, λ by {args.lambda_update})" if use_lagrangian else "")
              + f": {len(distinct_prompts)} distinct prompts ({len(prompts)} rows; {len(all_prompt_ids) - len(prompt_ids) // copies} dropped: "
              f"not shorter than max_length), world size {args.world_size}, {args.rollout_batch_size} answers per rollout, "
              f"{total_rollouts} rollouts: each prompt answered {total_rollouts * args.rollout_batch_size / (len(prompt_ids) // copies):.1f} times "
              f"({total_rollouts / len(loader):.2f} passes), {total_updates} update steps, "
              f"kl_coeff {args.kl_coeff}, PTX {'on' if ptx_examples else 'off'}, bf16 {use_bf16}, {'FSDP' if args.fsdp else 'DDP'}: "
              f"{trained_state_bytes(trained) / 2**30:.2f} GiB of weights, gradients and AdamW states of the trained models per rank")

    def save():
        """The actor (and with --save_critics the critics) as Hugging Face checkpoints, swapped into OUTPUT_DIR. Every rank
        calls it (under FSDP the weights are gathered from the shards); rank 0 writes. No model with a NaN or infinite
        weight is ever saved."""
        check_finite_weights(trained, device)
        critics = [(name, critic) for name, critic in (("reward_critic", reward_critic), ("cost_critic", cost_critic)) if critic is not None and args.save_critics]
        save_model(unwrap(actor), partial, rank)
        for name, critic in critics:  # (partial is None on ranks > 0: they only send their shards)
            save_model(unwrap(critic).score_model, partial and partial / name, rank)
        if rank == 0:
            for directory in [partial] + [partial / name for name, _ in critics]:
                tokenizer.save_pretrained(directory)
            (partial / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
            (partial / "training_state.json").write_text(json.dumps({"rollouts": total_rollouts, "lambda": lagrange_multiplier}, indent=2))
            finish_output_dir(partial, args.output_dir)

    # --resume: the models, their optimisers and schedules, λ, the episode-cost window, the data position and the generators
    trained_states = {"actor": (actor, actor_optimizer), "reward_critic": (reward_critic, reward_critic_optimizer)} | (
        {"cost_critic": (cost_critic, cost_critic_optimizer)} if use_lagrangian else {})
    schedulers = [actor_scheduler, reward_critic_scheduler] + ([cost_critic_scheduler] if use_lagrangian else [])
    start_rollout, update_step = 0, 0
    if checkpoint:
        saved = load_state(checkpoint, trained_states, rank)
        start_rollout, update_step, lagrange_multiplier = saved["rollout"], saved["update_step"], saved["lagrange_multiplier"]
        pid_integral, previous_violation = saved.get("pid_integral", pid_integral), saved.get("previous_violation")
        log_lambda.data.fill_(saved["log_lambda"])
        episode_costs.extend(saved["episode_costs"])
        for scheduler, state in zip(schedulers, saved["schedulers"]):
            scheduler.load_state_dict(state)
        for _ in range(start_rollout):  # the prompts already rolled out (the loaders draw from their own generators)
            next(prompt_batches)
        for _ in range(update_step if ptx_examples else 0):
            next(ptx_batches)
        if rank == 0:  # the metrics of the rollouts after the saved state are written again
            lines = (partial / "metrics.jsonl").read_text().splitlines() if (partial / "metrics.jsonl").exists() else []
            (partial / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["rollout"] <= start_rollout))

    # ---- training loop: one iteration per rollout batch ----
    progress = tqdm(total=total_rollouts, initial=start_rollout, desc=args.algorithm, disable=rank != 0)
    start_time = time.time()
    for rollout in range(start_rollout + 1, total_rollouts + 1):
        prompt_batch = next(prompt_batches)  # this rank's prompts, token ids
        for model in trained:
            model.eval()  # steps 1-2 in eval mode, as the reference: no dropout, and the KV cache is allowed

        # 1. rollout: sample y ~ π_θ(·|x) for each prompt x of this rank's batch, and the log-probs of π_old. Under FSDP
        #    the actor's weights are gathered once for both, not once per generated token (see gathered()).
        max_new_tokens = min(args.max_new_tokens, args.max_length - max(map(len, prompt_batch)))
        with gathered(actor), torch.no_grad(), autocast:
            sequences, attention_mask, prompt_length = generate_answers(unwrap(actor), tokenizer, prompt_batch, max_new_tokens, args.temperature, args.top_p)  # (B, P+T)
            old_log_probs = answer_log_probs(unwrap(actor), sequences, attention_mask, prompt_length)  # (B, T)
        answer_mask = attention_mask[:, prompt_length:].float()  # (B, T) 1 on answer tokens up to and including EOS

        # 2. scores: R(x, y) and C(x, y) at the EOS; log-probs of π_ref; values of both critics
        with torch.no_grad(), autocast:
            end_rewards = end_scores(reward_model, sequences, attention_mask)  # (B,)
            end_costs = end_scores(cost_model, sequences, attention_mask)  # (B,)
            ref_log_probs = answer_log_probs(reference, sequences, attention_mask, prompt_length)  # (B, T)
            old_reward_values = unwrap(reward_critic)(sequences, attention_mask, prompt_length)  # (B, T)
            old_cost_values = unwrap(cost_critic)(sequences, attention_mask, prompt_length) if use_lagrangian else None  # (B, T)
        episode_costs.extend(end_costs.tolist())  # the raw C(x, y): J_C is the expected cost, without KL or clipping

        # 3. per-token rewards and costs with the split KL penalty
        end_rewards_to_learn = shaped_end_rewards(end_rewards, end_costs, args.lambda_init) if args.algorithm == "reward_shaping" else end_rewards
        rewards = kl_penalized_rewards(end_rewards_to_learn, old_log_probs, ref_log_probs, answer_mask, args.kl_coeff, args.clip_range_score)  # (B, T)
        # 4. GAE, separately for rewards and costs
        reward_advantages, reward_returns = gae(rewards, old_reward_values, answer_mask, args.gamma, args.gae_lambda)  # (B, T) each
        if use_lagrangian:
            end_costs_to_learn = rectified_costs(end_costs, args.cost_limit) if args.constraint == "rectified" else end_costs
            costs = kl_penalized_costs(end_costs_to_learn, old_log_probs, ref_log_probs, answer_mask, args.kl_coeff, args.clip_range_score)  # (B, T)
            cost_advantages, cost_returns = gae(costs, old_cost_values, answer_mask, args.gamma, args.gae_lambda)  # (B, T) each

        for model in trained:
            model.train()  # steps 5-7 in training mode: dropout on, and gradient checkpointing active
        sums = {}  # this rollout's losses and statistics, summed over its update steps
        for _ in range(args.update_iters):
            for minibatch in torch.randperm(len(prompt_batch), device=device).split(args.per_device_train_batch_size):
                # 5. Lagrange multiplier. J_C = the window's mean episode cost and g its constraint violation, each
                #    averaged over ranks (gloo has no AVG: sum, then divide), so λ moves alike on every rank. The window
                #    changes only once per rollout, but g is recomputed at every update step, as in the reference's rl_step.
                window = torch.tensor(list(episode_costs), device=device)
                cost_and_violation = torch.stack([window.mean(), constraint_violation(window, args.cost_limit, args.constraint)])
                dist.all_reduce(cost_and_violation)
                mean_episode_cost, violation = cost_and_violation / args.world_size
                if use_lagrangian and update_step >= args.lambda_update_delay_steps:
                    if args.lambda_update == "sgd":
                        lagrange_multiplier = update_lagrange_multiplier(log_lambda, lambda_optimizer, violation, args.lambda_max)
                    else:
                        previous_violation = violation.item() if previous_violation is None else previous_violation
                        lagrange_multiplier, pid_integral = pid_lagrange_multiplier(violation.item(), previous_violation, pid_integral, args.pid_kp,
                                                                                    args.pid_ki, args.pid_kd, args.lambda_max)
                        previous_violation = violation.item()

                # 6. actor: clipped surrogate on the combined advantage (λ is a number here, not a tensor)
                mb_sequences, mb_attention_mask, mb_answer_mask = sequences[minibatch], attention_mask[minibatch], answer_mask[minibatch]
                advantages = reward_advantages[minibatch]  # (b, T)
                if use_lagrangian:
                    advantages = combined_advantages(advantages, cost_advantages[minibatch], lagrange_multiplier)
                with autocast:
                    log_probs = answer_log_probs(actor, mb_sequences, mb_attention_mask, prompt_length)  # (b, T)
                    policy_loss = actor_loss(log_probs, old_log_probs[minibatch], advantages, mb_answer_mask, args.clip_range_ratio)
                losses = {"actor": policy_loss}
                if ptx_examples:
                    # one optimiser step on the summed gradients: the PPO backward stays local (no_sync), the PTX
                    # backward all-reduces the sum, PPO gradient + ptx_coeff × SFT gradient
                    with no_sync(actor):
                        policy_loss.backward()
                    ptx_batch = {k: v.to(device) for k, v in next(ptx_batches).items()}
                    with autocast:
                        ptx_logits = actor(input_ids=ptx_batch["input_ids"], attention_mask=ptx_batch["attention_mask"]).logits
                        losses["ptx"] = sft_loss_sum(ptx_logits, ptx_batch["labels"]) / count_answer_tokens(ptx_batch["labels"])
                    (args.ptx_coeff * losses["ptx"]).backward()
                else:
                    policy_loss.backward()

                # 7. critics: clipped value losses towards the GAE returns
                with autocast:
                    reward_values = reward_critic(mb_sequences, mb_attention_mask, prompt_length)  # (b, T)
                    losses["reward_critic"] = critic_loss(reward_values, old_reward_values[minibatch], reward_returns[minibatch], mb_answer_mask, args.clip_range_value)
                losses["reward_critic"].backward()
                if use_lagrangian:
                    with autocast:
                        cost_values = cost_critic(mb_sequences, mb_attention_mask, prompt_length)  # (b, T)
                        losses["cost_critic"] = critic_loss(cost_values, old_cost_values[minibatch], cost_returns[minibatch], mb_answer_mask, args.clip_range_value)
                    losses["cost_critic"].backward()

                # every rank checks the same all-reduced losses and gradient norms before any weight moves
                checked = torch.stack(list(losses.values())).detach()
                dist.all_reduce(checked)
                updates = [(name, model, optimizer, scheduler) for name, model, optimizer, scheduler in (
                    ("actor", actor, actor_optimizer, actor_scheduler), ("reward_critic", reward_critic, reward_critic_optimizer, reward_critic_scheduler),
                    ("cost_critic", cost_critic, cost_critic_optimizer, cost_critic_scheduler)) if model is not None]
                grad_norms = {f"grad_norm/{name}": torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm if args.max_grad_norm > 0 else float("inf")).item()
                              for name, model, _, _ in updates}
                check_finite({**{f"loss/{k}": v / args.world_size for k, v in zip(losses, checked.tolist())}, **grad_norms}, f"at rollout {rollout}")
                for _, _, optimizer, scheduler in updates:
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                update_step += 1
                with torch.no_grad():
                    ratio = torch.exp(log_probs.detach() - old_log_probs[minibatch])
                    clipfrac = masked_mean(((ratio - 1.0).abs() > args.clip_range_ratio).float(), mb_answer_mask)
                for name, value in [(f"loss/{k}", v.detach()) for k, v in losses.items()] + [("ppo/clipfrac", clipfrac)]:
                    sums[name] = sums.get(name, 0.0) + value

        # ---- logging: every number is all-reduced (a mean over ranks) and written by rank 0 ----
        updates = args.update_iters * args.minibatches_per_rollout
        stats = {
            "objective/reward": end_rewards.mean(),  # mean R(x, y) of this rollout
            "objective/cost": end_costs.mean(),  # mean C(x, y) of this rollout
            "objective/unsafe_rate": (end_costs > 0).float().mean(),  # share of answers the cost model calls unsafe
            "objective/kl": ((old_log_probs - ref_log_probs) * answer_mask).sum(-1).mean(),  # Σ_t k_t per answer
            "objective/answer_length": answer_mask.sum(-1).mean(),  # answer tokens, EOS included
            **{name: value / updates for name, value in sums.items()},
        }
        values = torch.stack([torch.as_tensor(v, device=device, dtype=torch.float32) for v in stats.values()])
        dist.all_reduce(values)
        metrics = {"rollout": rollout, **dict(zip(stats, (values / args.world_size).tolist())),
                   "objective/episode_cost": mean_episode_cost.item(), "lagrange/violation": violation.item(), "train/actor_lr": actor_scheduler.get_last_lr()[0]}
        if args.algorithm != "ppo":
            metrics["lagrange/lambda"] = lagrange_multiplier
        progress.update(1)
        progress.set_postfix(reward=f"{metrics['objective/reward']:.2f}", cost=f"{metrics['objective/cost']:.2f}",
                             **({"lambda": f"{lagrange_multiplier:.3f}"} if args.algorithm != "ppo" else {}))
        if rank == 0 and (rollout % args.logging_steps == 0 or rollout == total_rollouts):
            log_metrics(partial, tracker, rollout, metrics)
        if args.save_steps and rollout % args.save_steps == 0 and rollout < total_rollouts:
            check_finite_weights(trained, device)
            save_state(args.output_dir, rollout, trained_states, {
                "rollout": rollout, "update_step": update_step, "log_lambda": log_lambda.item(), "lagrange_multiplier": lagrange_multiplier,
                "pid_integral": pid_integral, "previous_violation": previous_violation,
                "episode_costs": list(episode_costs), "schedulers": [scheduler.state_dict() for scheduler in schedulers]}, rank)
    progress.close()

    # ---- save ----
    if rank == 0:
        stop_tracker(tracker)
    save()
    if rank == 0:
        print(f"saved {args.output_dir} ({time.time() - start_time:.0f} s" + (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)" if device.type == "cuda" else ")"))
    dist.barrier()
    dist.destroy_process_group()
    return {"actor": unwrap(actor), "reward_critic": unwrap(reward_critic), "cost_critic": unwrap(cost_critic) if use_lagrangian else None,
            "lambda": lagrange_multiplier, "metrics": metrics}  # for tests


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


@contextmanager
def gathered(model):
    """Under FSDP2, a phase of no-grad forwards (generation with the KV cache, scoring) with the parameters gathered once
    at its first forward, instead of once per forward, i.e. per generated token; freed when the phase ends, before the
    update needs the memory. Also what lets each rank stop generating at its own answers' end (no collective per token)."""
    if not hasattr(model, "set_reshard_after_forward"):  # not an FSDP2 module: nothing to gather
        yield
        return
    model.set_reshard_after_forward(False)  # recurses into the layers
    try:
        yield
    finally:
        # back to freeing every unit after its forward (a trained root too: one more all-gather per step, less memory)
        model.set_reshard_after_forward(True)
        for unit in [module for module in model.modules() if hasattr(module, "set_reshard_after_forward")]:
            unit.reshard()


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
