"""evaluate.py: Elo, the arena, the rates and their 95% intervals by hand; a run on tiny models whose results.json
agrees with its answers.jsonl and whose score-model accuracy is preference_model.py's; seeded sampling; two ranks
giving the same greedy results as one; and bad input."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import evaluate as ev
import preference_model
from helpers import EVALUATE_FAST, REPO, TINY_LLAMA, TOY, preference_args, refused, run_main, run_script


# ---- the pure functions ----
def test_elo_ratings_match_hand_computation():
    # one pass in the given order, K = 32: a beats b, then b and a draw
    ratings = ev.elo_ratings([("a", "b", 1.0), ("b", "a", 0.5)], k=32, initial=1000, rounds=0)
    a, b = 1000 + 32 * (1 - 0.5), 1000 - 32 * (1 - 0.5)  # equal ratings: expected score 0.5
    expected_b = 1 / (1 + 10 ** ((a - b) / 400))  # 1016 vs 984
    a, b = a - 32 * (0.5 - expected_b), b + 32 * (0.5 - expected_b)
    assert ratings == pytest.approx({"a": a, "b": b}, abs=1e-9)
    assert b == pytest.approx(985.4697, abs=1e-3)
    # averaged over shuffled orders: both orders of these two matches, each weighted by how often it was drawn
    draw_first = ev.elo_ratings([("b", "a", 0.5), ("a", "b", 1.0)], k=32, initial=1000, rounds=0)
    assert draw_first == {"a": 1016, "b": 984}  # a draw at equal ratings moves nothing
    shuffled = ev.elo_ratings([("a", "b", 1.0), ("b", "a", 0.5)], k=32, initial=1000, rounds=50, seed=3)
    assert a < shuffled["a"] < 1016  # a mean of the two orders' results
    assert shuffled["a"] + shuffled["b"] == pytest.approx(2000)  # Elo moves points between players, it makes none


def test_elo_a_player_that_wins_every_match_ranks_first():
    matches = [("b", "c", 1.0), ("b", "c", 0.0), ("b", "c", 0.5)] * 5
    for opponent in ("b", "c"):  # a wins every match, whichever side of the pair it sits on
        matches += [("a", opponent, 1.0)] * 10 + [(opponent, "a", 0.0)] * 10
    ratings = ev.elo_ratings(matches, k=4, initial=1000, rounds=20, seed=0)
    assert max(ratings, key=ratings.get) == "a" and ratings["a"] > 1000 > ratings["b"]
    assert sum(ratings.values()) == pytest.approx(3000)


def test_elo_ratings_are_the_same_across_runs():
    scores = {
        "sft": [0.3, -1.0, 2.0, 0.5, 0.1, 0.0],
        "ppo": [0.9, -0.5, 1.0, 0.5, 0.2, 1.0],
        "rs": [0.1, 0.0, 3.0, -2.0, 0.3, 0.0],
    }
    matches = ev.pairwise_matches(scores)
    first = ev.elo_ratings(matches, k=16, rounds=30, seed=7)
    assert ev.elo_ratings(matches, k=16, rounds=30, seed=7) == first
    # and in another interpreter, with another hash seed (no set or hash order may leak into the result)
    code = (
        "import json, evaluate as ev; s = json.loads(input()); "
        "print(json.dumps(ev.elo_ratings(ev.pairwise_matches(s), k=16, rounds=30, seed=7)))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(scores),
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
        check=True,
    )
    assert json.loads(other.stdout.strip().splitlines()[-1]) == first


def test_pairwise_matches_one_per_prompt_per_pair():
    matches = ev.pairwise_matches({"x": [1.0, 2.0, 0.0], "y": [0.0, 2.0, 1.0]})
    assert matches == [("x", "y", 1.0), ("x", "y", 0.5), ("x", "y", 0.0)]
    matches = ev.pairwise_matches({"x": [1.0, 2.0, 0.0], "y": [0.0, 2.0, 1.0]}, higher_wins=False)  # costs: lower wins
    assert matches == [("x", "y", 0.0), ("x", "y", 0.5), ("x", "y", 1.0)]


def test_arena_counts_by_hand():
    rewards_a, costs_a = [1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 1.0, 0.0, 0.5, -1.0]
    rewards_b, costs_b = [2.0, 1.0, 3.0, 6.0, 0.0], [-1.0, 2.0, 0.0, 0.5, -2.0]
    # prompt 1: better, safe | 2: worse, unsafe | 3: reward tie (not better), cost 0 (safe) | 4: better, unsafe
    # 5: worse, safe
    arena = ev.arena_counts(rewards_a, costs_a, rewards_b, costs_b)
    cells = ("prompts", "better_safe", "better_unsafe", "worse_safe", "worse_unsafe")
    assert {k: arena[k] for k in cells} == dict(zip(cells, (5, 1, 1, 2, 1)))
    assert arena["worse_safe_share"] == pytest.approx(0.4)
    assert arena["worse_safe_share_ci95"] == pytest.approx(ev.wilson_interval(2, 5))
    assert arena["helpfulness_win_rate"] == pytest.approx((2 + 0.5) / 5)  # wins on 1 and 4, a tie on 3
    assert arena["harmlessness_win_rate"] == pytest.approx((2 + 0.5 + 0.5) / 5)  # wins on 1 and 5, ties on 3 and 4


def test_wilson_interval_by_hand():
    # k = 3 of n = 10, z = 1.96: centre (3 + 1.9208) / 13.8416, half 1.96·√(2.1 + 0.9604) / 13.8416
    low, high = ev.wilson_interval(3, 10)
    centre, half = 4.9208 / 13.8416, 1.96 * math.sqrt(2.1 + 0.9604) / 13.8416
    assert (low, high) == pytest.approx((centre - half, centre + half), abs=1e-4)
    assert (low, high) == pytest.approx((0.1078, 0.6032), abs=1e-4)  # the textbook's figures for 3/10
    # at 0 or n successes the interval is not empty (k/n ± z·√(p(1-p)/n) would be [0, 0]): 0 of 300 is up to 1.3%
    assert ev.wilson_interval(0, 300) == pytest.approx([0.0, 0.01264], abs=1e-5)
    assert ev.wilson_interval(300, 300)[0] == pytest.approx(1 - 0.01264, abs=1e-5)
    # one answer in 300 more moves the rate by 0.33 points and the interval barely: no verdict rests on it
    assert ev.wilson_interval(3, 300)[1] - ev.wilson_interval(2, 300)[1] < 0.01
    assert all(math.isnan(x) for x in ev.wilson_interval(0, 0))


def test_rates_by_hand():
    records = [
        {"reward": 1.0, "cost": 0.5, "length": 4},
        {"reward": -1.0, "cost": 0.0, "length": 2},
        {"reward": 3.0, "cost": -2.0, "length": 3},
        {"reward": 1.0, "cost": 0.1, "length": 3},
    ]
    summary = ev.policy_summary(records)
    assert summary == {
        "answers": 4,
        "mean_reward": 1.0,
        "mean_cost": -0.35,
        "harmful_rate": 0.5,  # cost 0 is safe
        "harmful_rate_ci95": ev.wilson_interval(2, 4),
        "mean_length": 3.0,
    }


# ---- runs on tiny models, in this process ----
@pytest.fixture(scope="module")
def random_policy(tmp_path_factory):
    """A second policy: a freshly initialised tiny Llama (other weights than tiny's SFT model), saved with the toy
    tokenizer."""
    path = tmp_path_factory.mktemp("random") / "policy"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_LLAMA)).save_pretrained(path)
    AutoTokenizer.from_pretrained(TINY_LLAMA).save_pretrained(path)
    return path


def two_policies(tiny, random_policy, output_dir, *extra):
    return [
        "--policy",
        f"sft={tiny.sft_model}",
        "--policy",
        f"random={random_policy}",
        "--prompt_data",
        tiny.eval_prompts,
        "--reward_model",
        tiny.reward,
        "--cost_model",
        tiny.cost,
        "--preference_data",
        tiny.preference_eval,
        "--greedy",
        "--max_prompts",
        12,
        "--max_new_tokens",
        12,
        "--max_length",
        96,
        "--elo_rounds",
        5,
        "--no_bf16",
        "--output_dir",
        output_dir,
        *extra,
    ]


@pytest.fixture(scope="module")
def greedy_run(tiny, random_policy, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("eval") / "one_process"
    return output_dir, run_main(ev, *two_policies(tiny, random_policy, output_dir))


def test_a_run_writes_answers_and_results_that_agree(greedy_run, tiny):
    output_dir, returned = greedy_run
    assert sorted(p.name for p in output_dir.iterdir()) == ["answers.jsonl", "args.json", "results.json"]
    assert not output_dir.with_name(output_dir.name + ".partial").exists()
    results = json.loads((output_dir / "results.json").read_text())
    assert results == json.loads(json.dumps(returned))
    lines = [json.loads(line) for line in (output_dir / "answers.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 12 and results["prompts"] == 12
    prompts = [json.loads(line)["prompt"] for line in tiny.eval_prompts.read_text().splitlines()]
    by_policy = {name: [line for line in lines if line["policy"] == name] for name in ("sft", "random")}
    for name, answers in by_policy.items():
        assert [a["prompt"] for a in answers] == prompts[:12]  # every prompt once, in the file's order
        for subset, kind in (("all", None), ("harmful_prompts", True), ("benign_prompts", False)):
            chosen = [a for a in answers if kind is None or a["harmful_prompt"] == kind]
            harmful, summary = sum(a["cost"] > 0 for a in chosen), dict(results["policies"][name][subset])
            assert summary.pop("harmful_rate_ci95") == pytest.approx(ev.wilson_interval(harmful, len(chosen)))
            assert summary == pytest.approx(
                {
                    "answers": len(chosen),
                    "mean_reward": sum(a["reward"] for a in chosen) / len(chosen),
                    "mean_cost": sum(a["cost"] for a in chosen) / len(chosen),
                    "harmful_rate": harmful / len(chosen),
                    "mean_length": sum(a["length"] for a in chosen) / len(chosen),
                }
            )
    # the arena of random (B) against sft (A), recounted from the lines
    (arena,) = results["arena"]
    pairs = list(zip(by_policy["sft"], by_policy["random"]))
    assert (arena["a"], arena["b"]) == ("sft", "random")
    assert arena["better_safe"] == sum(b["reward"] > a["reward"] and b["cost"] <= 0 for a, b in pairs)
    assert arena["worse_unsafe"] == sum(b["reward"] <= a["reward"] and b["cost"] > 0 for a, b in pairs)
    assert sum(arena[c] for c in ("better_safe", "better_unsafe", "worse_safe", "worse_unsafe")) == 12
    elo = results["elo"]
    matches = ev.pairwise_matches({n: [a["reward"] for a in by_policy[n]] for n in ("sft", "random")})
    assert elo["helpfulness"] == pytest.approx(ev.elo_ratings(matches, 4.0, 1000.0, 5, 42))


def test_an_answer_is_scored_as_its_text_rereads(greedy_run, tiny):
    """A score in answers.jsonl is the score model's on the decoded answer re-tokenised as preference_model.py
    tokenises a training answer: recomputed here from the line alone."""
    from transformers import AutoModelForSequenceClassification

    output_dir, _ = greedy_run
    lines = [json.loads(line) for line in (output_dir / "answers.jsonl").read_text().splitlines()][:6]
    tokenizer = AutoTokenizer.from_pretrained(tiny.cost)
    model = AutoModelForSequenceClassification.from_pretrained(tiny.cost).eval()
    for line in lines:
        ids = torch.tensor([sum(ev.tokenize_prompt_and_answer(tokenizer, line["prompt"], line["answer"], 96), [])])
        with torch.no_grad():
            assert preference_model.end_scores(model, ids, torch.ones_like(ids)).item() == pytest.approx(
                line["cost"], abs=1e-4
            )


def test_score_model_accuracy_is_the_one_preference_model_measured(tiny, tmp_path):
    run_main(
        preference_model,
        *preference_args(tiny, objective="cost"),
        "--max_steps",
        2,
        "--no_bf16",
        "--output_dir",
        tmp_path / "cost",
    )
    args = ["--preference_data", tiny.preference_eval, "--cost_model", tmp_path / "cost", "--max_length", 128]
    results = run_main(ev, *args, "--no_bf16", "--output_dir", tmp_path / "eval")
    trained = json.loads((tmp_path / "cost" / "eval.json").read_text())
    assert results["score_models"]["cost"]["accuracy"] == pytest.approx(trained["eval/accuracy"], abs=1e-6)
    assert results["score_models"]["cost"]["sign_accuracy"] == pytest.approx(trained["eval/sign_accuracy"], abs=1e-6)
    pairs = results["score_models"]["cost"]["pairs"]
    assert results["score_models"]["cost"]["accuracy_ci95"] == pytest.approx(
        ev.wilson_interval(round(trained["eval/accuracy"] * pairs), pairs)
    )


def test_sampling_is_seeded_per_policy(tiny, tmp_path):
    # the same checkpoint under two names (given in one --policy): both are seeded alike, so they answer alike
    args = [
        "--policy",
        f"first={tiny.sft_model}",
        f"second={tiny.sft_model}",
        "--prompt_data",
        tiny.eval_prompts,
        "--reward_model",
        tiny.reward,
        "--cost_model",
        tiny.cost,
        "--max_prompts",
        8,
        "--max_new_tokens",
        12,
        "--max_length",
        96,
        "--seed",
        5,
        "--no_bf16",
        "--output_dir",
        tmp_path / "out",
    ]
    results = run_main(ev, *args)
    lines = [json.loads(line) for line in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    first, second = [line["answer"] for line in lines[:8]], [line["answer"] for line in lines[8:]]
    assert first == second and len(set(first)) > 1
    (arena,) = results["arena"]
    assert arena["helpfulness_win_rate"] == 0.5 and arena["better_safe"] + arena["better_unsafe"] == 0  # all ties
    # K samples per prompt lie side by side, and differ (sampled, not greedy)
    run_main(
        ev,
        *args[:1],
        f"first={tiny.sft_model}",
        *args[3:-2],
        "--samples_per_prompt",
        3,
        "--output_dir",
        tmp_path / "k3",
    )
    lines = [json.loads(line) for line in (tmp_path / "k3" / "answers.jsonl").read_text().splitlines()]
    assert len(lines) == 24 and [line["prompt"] for line in lines[::3]] == [line["prompt"] for line in lines[1::3]]


@pytest.mark.slow
def test_two_processes_give_the_same_greedy_results(greedy_run, tiny, random_policy, tmp_path):
    output_dir, _ = greedy_run

    def answers(d):
        return [
            {k: v for k, v in json.loads(line).items() if k not in ("reward", "cost")}
            for line in (d / "answers.jsonl").read_text().splitlines()
        ]

    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):  # plain ranks, and every model sharded over the two ranks
        run_script("evaluate.py", *two_policies(tiny, random_policy, tmp_path / name, *extra), nproc=2)
        one, two = (json.loads((d / "results.json").read_text()) for d in (output_dir, tmp_path / name))
        assert (one.pop("world_size"), two.pop("world_size")) == (1, 2)
        assert _approx_equal(one, two)
        assert answers(tmp_path / name) == answers(output_dir), name  # the same answers, in the same order


def _approx_equal(one, two, path="results"):
    """Nested equality, floats to 1e-4 (a sequence's score moves in the last bits with the other rows of its batch)."""
    if isinstance(one, dict):
        assert isinstance(two, dict) and one.keys() == two.keys(), path
        return all(_approx_equal(one[k], two[k], f"{path}.{k}") for k in one)
    if isinstance(one, list):
        assert isinstance(two, list) and len(one) == len(two), path
        return all(_approx_equal(a, b, f"{path}[{i}]") for i, (a, b) in enumerate(zip(one, two)))
    if isinstance(one, float):
        assert two == pytest.approx(one, abs=1e-4), path
        return True
    assert one == two, path
    return True


def test_bad_input_gives_a_clear_error_and_writes_nothing(tiny, tmp_path):
    (tmp_path / "no_prompt.jsonl").write_text(
        '{"prompt": "How do I bake bread?"}\n{"question": "How do I fix a bike?"}\n'
    )
    scores, prompts = ["--reward_model", tiny.reward, "--cost_model", tiny.cost], ["--prompt_data", tiny.eval_prompts]
    policy = ["--policy", f"sft={tiny.sft_model}"]
    cases = {
        "missing policy dir": (["--policy", f"sft={tmp_path / 'nowhere'}", *prompts, *scores], "cannot load"),
        "missing score dir": (
            [*policy, *prompts, "--reward_model", tmp_path / "no_reward", "--cost_model", tiny.cost],
            "cannot load",
        ),
        "prompt field": (
            [*policy, "--prompt_data", tmp_path / "no_prompt.jsonl", *scores],
            "no_prompt.jsonl, row 2, field 'prompt': missing",
        ),
        "named twice": ([*policy, f"sft={tiny.sft_model}", *prompts, *scores], "'sft' is given twice"),
        "nothing to do": ([*scores], "nothing to evaluate: give --policy NAME=PATH"),
        "no equals": (["--policy", str(tiny.sft_model), *prompts, *scores], "expected NAME=PATH"),
        "no cost model": (
            [*policy, *prompts, "--reward_model", tiny.reward],
            "needs both --reward_model and --cost_model",
        ),
        "score models, no data": (["--preference_data", "", *scores], "nothing to evaluate"),
    }
    for name, (args, expected) in cases.items():
        message = refused(ev, *args, *EVALUATE_FAST, "--output_dir", tmp_path / "out")
        assert expected in message, (name, message)
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists(), name


@pytest.mark.slow
def test_the_trained_sft_policy_answers_the_toy_world_and_a_random_one_babbles(
    sft_checkpoint, preference_models, random_policy, tmp_path
):
    """With trained models and the toy world's judge (label.py): a random network babbles to the end of its budget
    and never gives a task's steps; the SFT policy stops and mostly answers."""
    args = [
        "--policy",
        f"sft={sft_checkpoint}",
        f"random={random_policy}",
        "--prompt_data",
        TOY / "eval_prompts.jsonl",
        "--reward_model",
        preference_models / "reward",
        "--cost_model",
        preference_models / "cost",
        "--greedy",
        "--max_prompts",
        24,
        "--max_new_tokens",
        48,
        "--max_length",
        128,
        "--output_dir",
        tmp_path / "eval",
    ]
    results = run_main(ev, *args)
    subprocess.run(
        [sys.executable, "label.py", tmp_path / "eval", "--judge", "toy"],
        cwd=REPO,
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    labels = json.loads((tmp_path / "eval" / "labels.json").read_text())["policies"]
    assert labels["random"]["all"]["oracle_helpful_rate"] == 0 and labels["sft"]["all"]["oracle_helpful_rate"] > 0.5
    assert results["policies"]["sft"]["all"]["mean_length"] < results["policies"]["random"]["all"]["mean_length"]
