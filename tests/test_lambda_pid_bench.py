"""bench/lambda_pid.py: the figures that compare PID and SGD λ updates, against a hand computation."""

import importlib.util

import pytest

from helpers import REPO

spec = importlib.util.spec_from_file_location("lambda_pid", REPO / "bench" / "lambda_pid.py")
lambda_pid = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lambda_pid)


def test_figures_by_hand():
    # 12 rollouts, d = -2: λ peaks at 4 in rollout 3, then sits at 1; J_C is 1 above d twice, then 0.5 below it
    lambdas = [1, 3, 4] + [1] * 9
    costs = [-1, -1] + [-2.5] * 10
    rows = [{"lagrange/lambda": lam, "objective/episode_cost": cost} for lam, cost in zip(lambdas, costs)]
    figures = lambda_pid.figures(rows, cost_limit=-2.0)
    final_lambda = (4 + 1 * 9) / 10  # the last 10 rollouts: λ = 4 once, then 1 nine times
    assert figures["peak λ"] == 4 and figures["peak at rollout"] == 3
    assert figures["final λ"] == pytest.approx(final_lambda) and figures["λ overshoot"] == pytest.approx(
        4 - final_lambda
    )
    assert figures["violation area"] == pytest.approx(2.0) and figures["undershoot area"] == pytest.approx(5.0)
    assert figures["final distance to d"] == pytest.approx(0.5)  # the last 10 rollouts all at -2.5
