"""ppo_lagrangian.py: every piece of the PPO-Lagrangian math against a hand computation or a naive loop."""

import math
import random

import pytest
import torch

import ppo_lagrangian as ppo
from helpers import TINY_LLAMA


def ragged_mask(lengths, T):
    return torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])


def test_masked_mean_averages_tokens_then_samples():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]])
    mask = ragged_mask([3, 1], 4)
    assert ppo.masked_mean(x, mask).item() == pytest.approx(((1 + 2 + 3) / 3 + 4 / 1) / 2)


def test_kl_penalized_rewards_and_costs_by_hand():
    log_probs = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, -9.0]])
    ref_log_probs = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -1.0, -1.0]])
    mask = ragged_mask([3, 2], 3)
    beta = 0.1
    rewards = ppo.kl_penalized_rewards(torch.tensor([2.0, 100.0]), log_probs, ref_log_probs, mask, beta, 50.0)
    # k = log_probs - ref = [[0.5, -1.0, 0.0], [0.1, -2.0, (masked)]]; end reward at t=2 for row 0, t=1 for row 1
    expected = torch.tensor([[-0.05, 0.1, 0.0 + 2.0], [-0.01, 0.2 + 100.0, 0.0]]).clamp(-50, 50)
    assert torch.allclose(rewards, expected)
    assert rewards[1, 1] == 50.0  # clamped
    costs = ppo.kl_penalized_costs(torch.tensor([-1.0, 0.5]), log_probs, ref_log_probs, mask, beta, 50.0)
    assert torch.allclose(costs, torch.tensor([[0.05, -0.1, -1.0], [0.01, -0.2 + 0.5, 0.0]]))


def naive_gae(rewards, values, lengths, gamma, lam):
    """GAE written as the textbook loop over each sample's own answer, in plain Python."""
    advantages, returns = [], []
    for r, v, n in zip(rewards.tolist(), values.tolist(), lengths):
        a, row_adv = 0.0, [0.0] * len(r)
        for t in reversed(range(n)):
            next_v = v[t + 1] if t + 1 < n else 0.0
            a = r[t] + gamma * next_v - v[t] + gamma * lam * a
            row_adv[t] = a
        advantages.append(row_adv)
        returns.append([row_adv[t] + v[t] if t < n else 0.0 for t in range(len(r))])
    return torch.tensor(advantages), torch.tensor(returns)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_a_naive_loop_with_ragged_masks(gamma, lam):
    torch.manual_seed(0)
    lengths, T = [5, 1, 3, 7, 0], 7
    # values and rewards hold junk after each answer's end: the mask must make it irrelevant
    rewards, values = torch.randn(len(lengths), T), torch.randn(len(lengths), T)
    advantages, returns = ppo.gae(rewards, values, ragged_mask(lengths, T), gamma, lam)
    expected_advantages, expected_returns = naive_gae(rewards, values, lengths, gamma, lam)
    assert torch.allclose(advantages, expected_advantages, atol=1e-5)
    assert torch.allclose(returns, expected_returns, atol=1e-5)


def test_gae_single_step_by_hand():
    advantages, returns = ppo.gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.25]]), torch.ones(1, 2), 1.0, 0.5)
    # δ_1 = 1 + 0 - 0.25 = 0.75, A_1 = 0.75;  δ_0 = 0 + 0.25 - 0.5 = -0.25, A_0 = -0.25 + 0.5·0.75 = 0.125
    assert torch.allclose(advantages, torch.tensor([[0.125, 0.75]]))
    assert torch.allclose(returns, torch.tensor([[0.625, 1.0]]))


def test_combined_advantages_by_hand():
    combined = ppo.combined_advantages(torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5]), 0.5)
    assert torch.allclose(combined, torch.tensor([(1.0 - 1.5) / 1.5, (-2.0 - 0.25) / 1.5]))
    assert torch.equal(ppo.combined_advantages(torch.tensor([1.0]), torch.tensor([9.0]), 0.0), torch.tensor([1.0]))


@pytest.mark.parametrize("lagrange_multiplier", [0.0, 0.3, 1.0, 4.7])
def test_kl_split_leaves_exactly_the_kl_penalty_in_the_combined_signal(lagrange_multiplier):
    torch.manual_seed(1)
    log_probs, ref_log_probs = torch.randn(3, 6), torch.randn(3, 6)
    mask = ragged_mask([6, 4, 2], 6)
    beta = 0.05
    rewards = ppo.kl_penalized_rewards(torch.randn(3), log_probs, ref_log_probs, mask, beta, 50.0)
    costs = ppo.kl_penalized_costs(torch.randn(3), log_probs, ref_log_probs, mask, beta, 50.0)
    combined = ppo.combined_advantages(rewards, costs, lagrange_multiplier)
    kl_penalty = -beta * (log_probs - ref_log_probs)
    not_last = mask * (1 - ppo.last_token_mask(mask))  # answer tokens without an end score
    assert torch.allclose(combined * not_last, kl_penalty * not_last, atol=1e-6)


def test_actor_loss_clips_by_hand():
    old = torch.zeros(1, 4)
    new = torch.tensor([[0.5, -0.5, 0.1, -0.5]])
    advantages = torch.tensor([[1.0, -1.0, 2.0, 1.0]])
    r = [math.exp(0.5), math.exp(-0.5), math.exp(0.1), math.exp(-0.5)]  # 1.65, 0.61, 1.11, 0.61
    # min(ρ·A, clip(ρ, 0.8, 1.2)·A) token by token:
    #   ρ=1.65, A=+1 -> min(1.65, 1.2) = 1.2     (clipped: no credit beyond 1+ε)
    #   ρ=0.61, A=-1 -> min(-0.61, -0.8) = -0.8  (clipped: no credit for pushing a bad token below 1-ε)
    #   ρ=1.11, A=+2 -> 2.21                      (inside the trust region)
    #   ρ=0.61, A=+1 -> min(0.61, 0.8) = 0.61    (the unclipped, pessimistic term)
    objective = [1.2, -0.8, r[2] * 2, r[3]]
    loss = ppo.actor_loss(new, old, advantages, torch.ones(1, 4), 0.2)
    assert loss.item() == pytest.approx(-sum(objective) / 4, rel=1e-6)


def test_actor_loss_gradient_follows_the_advantage():
    new = torch.zeros(1, 2, requires_grad=True)
    ppo.actor_loss(new, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), 0.2).backward()
    assert new.grad[0, 0] < 0 and new.grad[0, 1] > 0  # descent raises the good token's log-prob, lowers the bad one's


def test_critic_loss_clips_by_hand():
    values = torch.tensor([[3.0, 0.0, 10.0]])
    old_values = torch.tensor([[0.0, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 2.0, 12.0]])
    # token 0: (3-1)²=4 vs (clip(3,-2,2)=2 - 1)²=1 -> 4;  token 1: 4 vs 4 -> 4;
    # token 2: (10-12)²=4 vs (2-12)²=100 -> 100
    loss = ppo.critic_loss(values, old_values, returns, torch.ones(1, 3), 2.0)
    assert loss.item() == pytest.approx(0.5 * (4 + 4 + 100) / 3)


def lambda_step(log_lambda_value, mean_episode_cost, cost_limit, lr, lambda_max=100.0):
    log_lambda = torch.tensor(log_lambda_value, requires_grad=True)
    optimizer = torch.optim.SGD([log_lambda], lr=lr)
    violation = ppo.constraint_violation(torch.tensor([mean_episode_cost]), cost_limit, "expected", 0.0)
    return ppo.update_lagrange_multiplier(log_lambda, optimizer, violation, lambda_max)


def test_lagrange_multiplier_rises_by_exactly_the_dual_ascent_step():
    log_lambda, lr = math.log(0.7), 0.1
    new = lambda_step(log_lambda, mean_episode_cost=1.5, cost_limit=-0.5, lr=lr)
    assert new == pytest.approx(math.exp(log_lambda + lr * 0.7 * (1.5 - (-0.5))), rel=1e-6) and new > 0.7
    assert ppo.lagrange_multiplier_loss(torch.tensor(log_lambda), 2.0).item() == pytest.approx(-2.0 * 0.7, rel=1e-6)


def test_lagrange_multiplier_falls_below_the_limit_and_respects_lambda_max():
    assert lambda_step(0.0, mean_episode_cost=-2.0, cost_limit=0.0, lr=0.1) == pytest.approx(math.exp(-0.2), rel=1e-6)
    assert lambda_step(math.log(4.9), mean_episode_cost=10.0, cost_limit=0.0, lr=0.1, lambda_max=5.0) == pytest.approx(
        5.0, rel=1e-6
    )
    random.seed(0)
    for _ in range(50):  # never above lambda_max, however large the violation
        assert lambda_step(random.uniform(-3, 3), random.uniform(-5, 50), 0.0, 1.0, lambda_max=2.0) <= 2.0 + 1e-6


# ---- the rectified (RePO) constraint ----
def test_rectified_costs_by_hand():
    costs = torch.tensor([-6.0, -0.5, 0.0, 0.25, 3.0])
    assert ppo.rectified_costs(costs, 0.0).tolist() == [0.0, 0.0, 0.0, 0.25, 3.0]
    assert ppo.rectified_costs(costs, -1.0).tolist() == [0.0, 0.5, 1.0, 1.25, 4.0]  # d = -1: C - d above zero counts


def test_safety_compensation_hides_harm_from_the_expected_constraint_but_not_from_the_rectified_one():
    # two harmful answers (C = +3) and four very safe ones (C = -6): the mean is -3 <= d = 0, so the expected
    # constraint is met (g = -3 lowers λ); the rectified one counts the share over d, in units of ε:
    # g = (2/6 - 0.02) / 0.02 (raises λ)
    costs = torch.tensor([3.0, 3.0, -6.0, -6.0, -6.0, -6.0])
    assert ppo.constraint_violation(costs, 0.0, "expected", 0.02).item() == pytest.approx(-3.0)
    assert ppo.constraint_violation(costs, 0.0, "rectified", 0.02).item() == pytest.approx((2 / 6 - 0.02) / 0.02)
    log_lambda = torch.tensor(0.0, requires_grad=True)
    optimizer = torch.optim.SGD([log_lambda], lr=0.1)
    violation = ppo.constraint_violation(costs, 0.0, "rectified", 0.02)
    assert ppo.update_lagrange_multiplier(log_lambda, optimizer, violation, 5.0) == pytest.approx(
        math.exp(0.1 * (2 / 6 - 0.02) / 0.02)
    )


def test_the_rectified_violation_goes_negative_once_few_enough_answers_cross_d():
    # g = (share of answers with C > d, less ε) / ε: 1 of 100 over d = 0 with ε = 2% gives g = -0.5, λ comes down;
    # an answer exactly at d does not cross it; the scale of C does not matter, only which side of d it is on
    costs = torch.cat([torch.tensor([0.5]), torch.full((98,), -3.0), torch.tensor([0.0])])
    assert ppo.constraint_violation(costs, 0.0, "rectified", 0.02).item() == pytest.approx((0.01 - 0.02) / 0.02)
    assert ppo.constraint_violation(costs * 40, 0.0, "rectified", 0.02).item() == pytest.approx(-0.5)
    assert ppo.constraint_violation(costs, -4.0, "rectified", 0.5).item() == pytest.approx(1.0)  # all over d = -4
    assert ppo.constraint_violation(costs - 9, 0.0, "rectified", 0.02).item() == pytest.approx(-1.0)  # none over d
    log_lambda = torch.tensor(math.log(2.0), requires_grad=True)
    optimizer = torch.optim.SGD([log_lambda], lr=1.0)
    violation = ppo.constraint_violation(costs, 0.0, "rectified", 0.02)
    assert ppo.update_lagrange_multiplier(log_lambda, optimizer, violation, 5.0) == pytest.approx(
        2.0 * math.exp(1.0 * 2.0 * -0.5)  # log λ ← log λ + lr·λ·g: λ 2 → 2·e⁻¹ = 0.74
    )


def test_the_rectified_cost_critic_predicts_a_smooth_rectified_value():
    # softplus(v - d): about 0 for a safe prefix (v ≪ d), about v - d for an unsafe one, never negative
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(TINY_LLAMA, num_labels=1, pad_token_id=0)
    score_model = AutoModelForSequenceClassification.from_config(config).eval()
    sequences, mask = torch.randint(3, 2000, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    with torch.no_grad():
        raw = ppo.Critic(score_model)(sequences, mask, 4)  # (2, 5)
        rectified = ppo.Critic(score_model, rectify_at=-0.5)(sequences, mask, 4)
    assert torch.allclose(rectified, torch.nn.functional.softplus(raw + 0.5)) and (rectified > 0).all()
    assert ppo.Critic(score_model, rectify_at=0.0)(sequences, mask, 4).sum() > 0
    assert torch.nn.functional.softplus(torch.tensor(-10.0)).item() < 1e-4  # a safe answer's C ≈ -10: value ≈ 0


def test_rectified_cost_advantage_ignores_how_safe_a_safe_answer_is():
    # with the rectified end cost, two safe answers of different safety get the same cost return: nothing to gain
    # by being extra safe on one prompt, which is what lets the expected constraint trade harm elsewhere
    mask = torch.ones(2, 3)
    zeros = torch.zeros(2, 3)
    end_costs = ppo.rectified_costs(torch.tensor([-1.0, -9.0]), 0.0)
    costs = ppo.kl_penalized_costs(end_costs, zeros, zeros, mask, 0.1, 50.0)
    _, returns = ppo.gae(costs, zeros, mask, 1.0, 0.95)
    assert torch.equal(returns[0], returns[1]) and returns.abs().sum() == 0


# ---- PID Lagrangian ----
def test_pid_lagrange_multiplier_by_hand():
    kp, ki, kd = 0.5, 0.1, 2.0
    # g = 1.5 after g_prev = 1.0, I = 4: I' = 5.5, ∂ = 0.5, λ = 0.75 + 0.55 + 1.0 = 2.3
    lam, integral = ppo.pid_lagrange_multiplier(1.5, 1.0, 4.0, kp, ki, kd, lambda_max=10.0)
    assert (lam, integral) == (pytest.approx(2.3), pytest.approx(5.5))
    # a falling violation: no derivative term; a negative g lowers I and the proportional term
    lam, integral = ppo.pid_lagrange_multiplier(-0.4, 1.5, 5.5, kp, ki, kd, lambda_max=10.0)
    assert (lam, integral) == (pytest.approx(-0.2 + 0.51), pytest.approx(5.1))
    lam, _ = ppo.pid_lagrange_multiplier(-1.0, 1.5, 5.5, kp, ki, kd, lambda_max=10.0)
    assert lam == 0.0  # -0.5 + 0.45 < 0: clipped at zero


def test_pid_lagrange_multiplier_stays_in_its_range_and_the_integral_does_not_wind_up():
    lam, integral = ppo.pid_lagrange_multiplier(-100.0, 0.0, 3.0, 0.1, 0.1, 0.1, lambda_max=5.0)
    assert (lam, integral) == (0.0, 0.0)  # λ ≥ 0 and I ≥ 0
    lam, integral = 0.0, 0.0
    for _ in range(1000):  # a long violation: λ stops at λ_max and I at λ_max / K_I
        lam, integral = ppo.pid_lagrange_multiplier(2.0, 2.0, integral, 0.0, 0.01, 0.0, lambda_max=5.0)
    assert lam == pytest.approx(5.0) and integral == pytest.approx(500.0)
    # so one rollout under the limit already brings λ back down (a wound-up integral would hold it at the cap)
    lam, _ = ppo.pid_lagrange_multiplier(-10.0, 2.0, integral, 0.0, 0.01, 0.0, lambda_max=5.0)
    assert lam == pytest.approx(4.9)


def test_pid_integral_alone_is_gradient_ascent_on_lambda():
    # K_P = K_D = 0: λ_{k+1} = λ_k + K_I·g_k (while inside [0, λ_max])
    lam, integral, ki = 1.0, 1.0 / 0.05, 0.05
    for g in (0.4, -0.2, 1.0, 0.3):
        new, integral = ppo.pid_lagrange_multiplier(g, 0.0, integral, 0.0, ki, 0.0, lambda_max=5.0)
        assert new == pytest.approx(lam + ki * g)
        lam = new
