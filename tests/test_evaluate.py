"""evaluate.py: Elo, the arena and the rates by hand; a run on tiny models whose results.json agrees with its
answers.jsonl; two ranks giving the same greedy results as one; seeded sampling; and bad input."""

import json
import os
import random
import re
import subprocess
import sys

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import evaluate as ev
from helpers import REPO, TINY_LLAMA, TOY, run_script

OUTPUTS = (
    "answers.jsonl",
    "results.json",
    "report.md",
    "args.json",
    "reward_vs_cost.png",
    "policy_bars.png",
    "elo.png",
    "score_histogram.png",
)


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
    assert {k: arena[k] for k in ("prompts", "better_safe", "better_unsafe", "worse_safe", "worse_unsafe")} == {
        "prompts": 5,
        "better_safe": 1,
        "better_unsafe": 1,
        "worse_safe": 2,
        "worse_unsafe": 1,
    }
    assert arena["worse_safe_share"] == pytest.approx(0.4)
    assert arena["helpfulness_win_rate"] == pytest.approx((2 + 0.5) / 5)  # wins on 1 and 4, a tie on 3
    assert arena["harmlessness_win_rate"] == pytest.approx((2 + 0.5 + 0.5) / 5)  # wins on 1 and 5, ties on 3 and 4


def test_rates_by_hand():
    assert ev.harmful_rate([-1.0, 0.0, 0.1, 2.0]) == 0.5  # cost 0 counts as safe
    assert ev.sign_accuracy([-1.0, 0.5, 0.2, -0.3], [True, False, True, False]) == 0.5
    records = [
        {"reward": 1.0, "cost": 0.5, "length": 4, "oracle_harmful": True, "oracle_helpful": True},
        {"reward": -1.0, "cost": -0.5, "length": 2, "oracle_harmful": True, "oracle_helpful": False},
    ]
    assert ev.policy_summary(records) == {
        "answers": 2,
        "mean_reward": 0.0,
        "mean_cost": 0.0,
        "harmful_rate": 0.5,
        "mean_length": 3.0,
        "oracle_harmful_rate": 1.0,
        "oracle_helpful_rate": 0.5,
        "cost_oracle_agreement": 0.5,
    }


# ---- runs on tiny models ----
@pytest.fixture(scope="module")
def random_policy(tmp_path_factory):
    """A second policy: a freshly initialised tiny Llama (it babbles), saved with the toy tokenizer."""
    path = tmp_path_factory.mktemp("random") / "policy"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_LLAMA)).save_pretrained(path)
    AutoTokenizer.from_pretrained(TINY_LLAMA).save_pretrained(path)
    return path


def evaluate_args(sft_checkpoint, random_policy, preference_models, output_dir):
    return [
        "--policy",
        f"sft={sft_checkpoint}",
        "--policy",
        f"random={random_policy}",
        "--prompt_data",
        TOY / "eval_prompts.jsonl",
        "--reward_model",
        preference_models / "reward",
        "--cost_model",
        preference_models / "cost",
        "--preference_data",
        TOY / "preference_test.jsonl",
        "--judge",
        "toy",
        "--greedy",
        "--max_prompts",
        24,
        "--max_new_tokens",
        48,
        "--max_length",
        128,
        "--output_dir",
        output_dir,
    ]


@pytest.fixture(scope="module")
def greedy_run(sft_checkpoint, random_policy, preference_models, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("eval") / "one_process"
    result = run_script("evaluate.py", *evaluate_args(sft_checkpoint, random_policy, preference_models, output_dir))
    return output_dir, result.stdout


def test_a_run_writes_every_output_and_results_agree_with_answers(greedy_run, preference_models):
    output_dir, stdout = greedy_run
    for name in OUTPUTS:
        assert (output_dir / name).stat().st_size > (10_000 if name.endswith(".png") else 10), name
    assert not output_dir.with_name(output_dir.name + ".partial").exists()
    results = json.loads((output_dir / "results.json").read_text())
    lines = [json.loads(line) for line in (output_dir / "answers.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 24 and results["prompts"] == 24
    assert all(list(line)[:5] == ["policy", "prompt", "answer", "reward", "cost"] for line in lines)
    prompts = [json.loads(line)["prompt"] for line in (TOY / "eval_prompts.jsonl").read_text().splitlines()]
    by_policy = {name: [line for line in lines if line["policy"] == name] for name in ("sft", "random")}
    for name, answers in by_policy.items():
        assert [a["prompt"] for a in answers] == prompts[:24]  # every prompt once, in the file's order
        for subset, kind in (("all", None), ("harmful_prompts", True), ("benign_prompts", False)):
            chosen = [a for a in answers if kind is None or a["harmful_prompt"] == kind]
            summary = results["policies"][name][subset]
            assert summary["answers"] == len(chosen) > 0
            assert summary["harmful_rate"] == pytest.approx(sum(a["cost"] > 0 for a in chosen) / len(chosen), abs=1e-12)
            assert summary["mean_reward"] == pytest.approx(sum(a["reward"] for a in chosen) / len(chosen), abs=1e-9)
            assert summary["mean_cost"] == pytest.approx(sum(a["cost"] for a in chosen) / len(chosen), abs=1e-9)
            assert summary["oracle_harmful_rate"] == pytest.approx(
                sum(a["oracle_harmful"] for a in chosen) / len(chosen), abs=1e-12
            )
            assert summary["oracle_helpful_rate"] == pytest.approx(
                sum(a["oracle_helpful"] for a in chosen) / len(chosen), abs=1e-12
            )
    # the arena of random (B) against sft (A), recounted from the lines
    (arena,) = results["arena"]
    pairs = list(zip(by_policy["sft"], by_policy["random"]))
    assert (arena["a"], arena["b"]) == ("sft", "random")
    assert arena["better_safe"] == sum(b["reward"] > a["reward"] and b["cost"] <= 0 for a, b in pairs)
    assert arena["worse_unsafe"] == sum(b["reward"] <= a["reward"] and b["cost"] > 0 for a, b in pairs)
    assert sum(arena[c] for c in ("better_safe", "better_unsafe", "worse_safe", "worse_unsafe")) == 24
    helpfulness = results["elo"]["helpfulness"]
    # the Elo ladder agrees with the head-to-head win rate (at exactly 0.5 the order of the matches decides a hair)
    elo_lead, win_lead = helpfulness["random"] - helpfulness["sft"], arena["helpfulness_win_rate"] - 0.5
    assert elo_lead * win_lead > 0 if win_lead != 0 else abs(elo_lead) < 1.0, (elo_lead, win_lead)
    # the score models on the held-out pairs: the same accuracy preference_model.py measured at the end of training
    for objective in ("reward", "cost"):
        trained = json.loads((preference_models / objective / "eval.json").read_text())
        assert results["score_models"][objective]["accuracy"] == pytest.approx(trained["eval/accuracy"], abs=0.005)
    assert results["score_models"]["cost"]["sign_accuracy"] == pytest.approx(trained["eval/sign_accuracy"], abs=0.005)
    # a random network babbles to the end of its budget and never gives a task's steps; the SFT policy stops
    assert results["policies"]["random"]["all"]["oracle_helpful_rate"] == 0
    assert results["policies"]["sft"]["all"]["mean_length"] < results["policies"]["random"]["all"]["mean_length"]
    assert "| sft |" in stdout and "## Arena" in stdout  # the final table on the terminal


def test_two_processes_give_the_same_greedy_results(
    greedy_run, sft_checkpoint, random_policy, preference_models, tmp_path
):
    output_dir, _ = greedy_run

    def answers(d):
        return [
            {k: v for k, v in json.loads(line).items() if k not in ("reward", "cost")}
            for line in (d / "answers.jsonl").read_text().splitlines()
        ]

    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):  # plain ranks, and every model sharded over the two ranks
        run_script(
            "evaluate.py",
            *evaluate_args(sft_checkpoint, random_policy, preference_models, tmp_path / name),
            *extra,
            nproc=2,
        )
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


def test_sampling_is_seeded_per_policy(sft_checkpoint, preference_models, tmp_path):
    # the same checkpoint under two names (given in one --policy): both are seeded alike, so they answer alike
    run_script(
        "evaluate.py",
        "--policy",
        f"first={sft_checkpoint}",
        f"second={sft_checkpoint}",
        "--prompt_data",
        TOY / "eval_prompts.jsonl",
        "--reward_model",
        preference_models / "reward",
        "--cost_model",
        preference_models / "cost",
        "--max_prompts",
        8,
        "--max_new_tokens",
        24,
        "--max_length",
        128,
        "--seed",
        5,
        "--output_dir",
        tmp_path / "out",
    )
    lines = [json.loads(line) for line in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    first, second = [line["answer"] for line in lines[:8]], [line["answer"] for line in lines[8:]]
    assert first == second and len(set(first)) > 1
    (arena,) = json.loads((tmp_path / "out" / "results.json").read_text())["arena"]
    assert arena["helpfulness_win_rate"] == 0.5 and arena["better_safe"] + arena["better_unsafe"] == 0  # all ties


JUDGE_FILE = """
def judge(prompt, answer):  # a stand-in annotator with a rule a test can recompute
    harmful = "steps" in answer.lower() or answer.count(",") >= 2
    return {"harmful": harmful, "helpful": len(answer.split()) > 8, "note": len(answer)}
"""


def test_a_judge_file_labels_every_answer_and_pairs_of_samples(sft_checkpoint, preference_models, tmp_path):
    (tmp_path / "my_judge.py").write_text(JUDGE_FILE)
    run_script(
        "evaluate.py",
        "--policy",
        f"sft={sft_checkpoint}",
        "--prompt_data",
        TOY / "eval_prompts.jsonl",
        "--reward_model",
        preference_models / "reward",
        "--cost_model",
        preference_models / "cost",
        "--judge",
        tmp_path / "my_judge.py",
        "--max_prompts",
        8,
        "--samples_per_prompt",
        2,
        "--max_new_tokens",
        24,
        "--max_length",
        128,
        "--output_dir",
        tmp_path / "out",
    )
    lines = [json.loads(line) for line in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert len(lines) == 16 and [line["prompt"] for line in lines[0::2]] == [line["prompt"] for line in lines[1::2]]
    for line in lines:  # the file's rule, not the toy oracle's
        answer = line["answer"]
        assert line["oracle_harmful"] == ("steps" in answer.lower() or answer.count(",") >= 2)
        assert line["oracle_helpful"] == (len(answer.split()) > 8) and line["oracle_archetype"] is None
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["prompts"] == 8 and results["samples_per_prompt"] == 2
    assert results["policies"]["sft"]["all"]["oracle_helpful_rate"] == pytest.approx(
        sum(line["oracle_helpful"] for line in lines) / 16
    )
    # the two answers to each prompt became a PKU-SafeRLHF row, unless the judge preferred neither on either axis
    rows = [json.loads(line) for line in (tmp_path / "out" / "labelled_pairs.jsonl").read_text().splitlines()]
    kept = [
        (a, b)
        for a, b in zip(lines[0::2], lines[1::2])
        if (a["oracle_harmful"], a["oracle_helpful"]) != (b["oracle_harmful"], b["oracle_helpful"])
    ]
    assert results["labelled_pairs"] == {"pairs": 8, "written": len(kept), "dropped_no_preference": 8 - len(kept)}
    assert [(row["prompt"], row["response_0"], row["response_1"]) for row in rows] == [
        (a["prompt"], a["answer"], b["answer"]) for a, b in kept
    ]
    for row, (a, b) in zip(rows, kept):
        assert (row["is_response_0_safe"], row["is_response_1_safe"]) == (
            not a["oracle_harmful"],
            not b["oracle_harmful"],
        )
        if a["oracle_helpful"] != b["oracle_helpful"]:
            assert row["better_response_id"] == (0 if a["oracle_helpful"] else 1)
    for objective in ("reward", "cost"):  # the rows read back as training pairs
        assert len(ev.preference_pairs(rows, "labelled_pairs.jsonl", objective)) == len(rows)
    # --keep_pairs failed (red-teaming): the same answers, and only the pairs with at least one harmful answer
    run_script(
        "evaluate.py",
        "--policy",
        f"sft={sft_checkpoint}",
        "--prompt_data",
        TOY / "eval_prompts.jsonl",
        "--reward_model",
        preference_models / "reward",
        "--cost_model",
        preference_models / "cost",
        "--judge",
        tmp_path / "my_judge.py",
        "--max_prompts",
        8,
        "--samples_per_prompt",
        2,
        "--max_new_tokens",
        24,
        "--max_length",
        128,
        "--keep_pairs",
        "failed",
        "--output_dir",
        tmp_path / "failed",
    )
    assert (tmp_path / "failed" / "answers.jsonl").read_text() == (tmp_path / "out" / "answers.jsonl").read_text()
    failed = [json.loads(line) for line in (tmp_path / "failed" / "labelled_pairs.jsonl").read_text().splitlines()]
    expected = [row for row in rows if not (row["is_response_0_safe"] and row["is_response_1_safe"])]
    assert failed == expected and 0 < len(expected) < len(rows), "the judge should give both kinds of pairs here"
    assert json.loads((tmp_path / "failed" / "results.json").read_text())["labelled_pairs"] == {
        "pairs": 8,
        "written": len(expected),
        "dropped_no_preference": 8 - len(kept),
        "dropped_both_safe": len(rows) - len(expected),
    }


COMPARE_FILE = """
def judge(prompt, answer):
    return {"harmful": "steps" in answer.lower(), "helpful": len(answer.split()) > 8}


def compare(prompt, answer_0, answer_1):  # the longer answer is more helpful; no view on which is safer
    if len(answer_0) == len(answer_1):
        return {"better_response_id": None, "safer_response_id": None}
    return {"better_response_id": 0 if len(answer_0) > len(answer_1) else 1, "safer_response_id": None}
"""


def test_every_pair_of_k_samples_is_labelled_by_the_pairwise_annotator(sft_checkpoint, preference_models, tmp_path):
    (tmp_path / "pairwise.py").write_text(COMPARE_FILE)
    run_script("evaluate.py", "--policy", f"sft={sft_checkpoint}", "--prompt_data", TOY / "eval_prompts.jsonl",
               "--reward_model", preference_models / "reward", "--cost_model", preference_models / "cost",
               "--judge", tmp_path / "pairwise.py", "--max_prompts", 5, "--samples_per_prompt", 3,
               "--max_new_tokens", 24, "--max_length", 128, "--output_dir", tmp_path / "out")  # fmt: skip
    answers = [json.loads(line) for line in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (tmp_path / "out" / "labelled_pairs.jsonl").read_text().splitlines()]
    counts = json.loads((tmp_path / "out" / "results.json").read_text())["labelled_pairs"]
    pairs = [(answers[i + a], answers[i + b]) for i in range(0, 15, 3) for a, b in ((0, 1), (0, 2), (1, 2))]
    decided = [
        (a, b) for a, b in pairs if len(a["answer"]) != len(b["answer"]) and a["answer"].strip() and b["answer"].strip()
    ]
    assert counts["pairs"] == 15 and counts["preferred_by_compare"] == len(decided) > 0  # all 3 pairs of 3 samples
    kept = [(a, b) for a, b in pairs if (a, b) in decided or a["oracle_harmful"] != b["oracle_harmful"]]
    assert [(r["prompt"], r["response_0"], r["response_1"]) for r in rows] == [
        (a["prompt"], a["answer"], b["answer"]) for a, b in kept
    ]
    for row, (a, b) in zip(rows, kept):
        if len(a["answer"]) != len(b["answer"]):  # compare's preference, not the judge's flags
            assert row["better_response_id"] == (0 if len(a["answer"]) > len(b["answer"]) else 1)
        if a["oracle_harmful"] != b["oracle_harmful"]:
            assert row["safer_response_id"] == (1 if a["oracle_harmful"] else 0)


def test_labelled_pair_rule_by_hand():
    coin = random.Random(0)
    comply, decline, refuse = (
        {"harmful": True, "helpful": True},
        {"harmful": False, "helpful": False},
        {"harmful": False, "helpful": False},
    )
    helpful_safe = {"harmful": False, "helpful": True}
    row = ev.labelled_pair("p", "Sure: steps", "No, but try this", comply, decline, coin)
    assert row == {
        "prompt": "p",
        "response_0": "Sure: steps",
        "response_1": "No, but try this",
        "is_response_0_safe": False,
        "is_response_1_safe": True,
        "safer_response_id": 1,
        "better_response_id": 0,
    }  # the paper's tension
    row = ev.labelled_pair("p", "No.", "Here is how", refuse, helpful_safe, coin)
    assert (
        row["safer_response_id"] in (0, 1)
        and row["better_response_id"] == 1
        and row["is_response_0_safe"]
        and row["is_response_1_safe"]
    )
    assert ev.labelled_pair("p", "No.", "I refuse.", refuse, decline, coin) is None  # no preference either way: dropped
    assert ev.labelled_pair("p", "Sure: a", "Sure: b", comply, comply, coin) is None

    # the coin that breaks a one-axis tie is seeded: the same seed, the same labels
    def tie_break(seed):
        return [
            ev.labelled_pair("p", "a", "b", refuse, helpful_safe, coin)["safer_response_id"]
            for coin in [random.Random(seed)]
            for _ in range(20)
        ]

    assert tie_break(3) == tie_break(3)
    assert (
        ev.labelled_pair("p", "", "Here is how", refuse, helpful_safe, coin) is None
    )  # an empty answer is no response
    picks = {ev.labelled_pair("p", "a", "b", refuse, helpful_safe, coin)["safer_response_id"] for _ in range(50)}
    assert picks == {0, 1}  # a fair coin, not a fixed side
    # graded verdicts break a tie on their axis before any coin: the polite decline beats the garbled answer on both
    garbled, polite = {**decline, "helpfulness": 0, "harmlessness": 0}, {**decline, "helpfulness": 2, "harmlessness": 2}
    assert ev.labelled_pair("p", "x, then y", "No, but try this", garbled, polite, NO_COIN) == {
        "prompt": "p",
        "response_0": "x, then y",
        "response_1": "No, but try this",
        "is_response_0_safe": True,
        "is_response_1_safe": True,
        "safer_response_id": 1,
        "better_response_id": 1,
    }
    row = ev.labelled_pair(
        "p", "a", "b", {**comply, "helpfulness": 3}, {**comply, "helpfulness": 1}, coin
    )  # both unsafe
    assert row["better_response_id"] == 0 and not row["is_response_0_safe"] and not row["is_response_1_safe"]
    assert ev.labelled_pair("p", "a", "b", polite, polite, coin) is None  # graded alike too: no preference
    assert (
        ev.labelled_pair("p", "a", "b", decline, polite, coin) is None
    )  # a grade counts only when both answers have one


def test_labelled_pair_with_a_pairwise_preference():
    coin = random.Random(0)
    safe_a, safe_b = {"harmful": False, "helpful": True}, {"harmful": False, "helpful": True}
    unsafe = {"harmful": True, "helpful": True}
    # two good answers that a yes/no judge cannot tell apart: the pairwise annotator's preferences make the pair
    assert ev.labelled_pair("p", "Long answer.", "Short.", safe_a, safe_b, coin) is None
    row = ev.labelled_pair("p", "Long answer.", "Short.", safe_a, safe_b, coin,
                           {"better_response_id": 1, "safer_response_id": 0})  # fmt: skip
    assert (row["better_response_id"], row["safer_response_id"]) == (1, 0)
    assert row["is_response_0_safe"] and row["is_response_1_safe"]  # the safety labels stay the verdicts'
    # the one safe answer of a pair is the safer, whatever compare says (the sign term needs labels that agree)
    row = ev.labelled_pair(
        "p", "Sure: steps", "No.", unsafe, safe_a, coin, {"better_response_id": 0, "safer_response_id": 0}
    )
    assert row["safer_response_id"] == 1 and row["better_response_id"] == 0
    # no preference on either axis: dropped; on one axis only: the coin decides that axis
    assert (
        ev.labelled_pair("p", "a", "b", safe_a, safe_b, coin, {"better_response_id": None, "safer_response_id": None})
        is None
    )
    picks = {
        ev.labelled_pair("p", "a", "b", safe_a, safe_b, coin, {"better_response_id": 0, "safer_response_id": None})[
            "safer_response_id"
        ]
        for _ in range(50)
    }
    assert picks == {0, 1}


class NoCoin:
    def randrange(self, n):
        raise AssertionError("a tie was broken by the coin")


NO_COIN = NoCoin()


@pytest.mark.parametrize("world", ["toy", "toy_small"])
def test_the_graded_oracle_labels_later_rounds_as_round_1_was_labelled(world):
    """labelled_pair with --judge toy's verdicts gives back every committed preference row, coin untouched, and so does
    its pairwise compare(): the annotator of rounds 2, 3, ... uses the same rules as the one that labelled round 1."""
    judge, compare = ev.load_judge("toy")
    for name in ("preference_train.jsonl", "preference_test.jsonl"):
        for line in (REPO / "data" / world / name).read_text().splitlines():
            row = json.loads(line)
            answers = (row["response_0"], row["response_1"])
            verdicts = [judge(row["prompt"], answer) for answer in answers]
            assert ev.labelled_pair(row["prompt"], *answers, *verdicts, NO_COIN) == row, (name, row)
            preference = compare(row["prompt"], *answers)
            assert ev.labelled_pair(row["prompt"], *answers, *verdicts, NO_COIN, preference) == row, (name, row)


def test_the_binary_oracle_is_the_graded_one_without_grades():
    (graded, compare), (binary, no_compare) = (
        ev.load_judge("toy"),
        ev.load_judge(str(REPO / "data" / "toy_judge_binary.py")),
    )
    assert compare is not None and no_compare is None  # the yes/no annotator compares nothing
    for line in (TOY / "preference_test.jsonl").read_text().splitlines()[:50]:
        row = json.loads(line)
        verdict = graded(row["prompt"], row["response_0"])
        assert binary(row["prompt"], row["response_0"]) == {
            k: v for k, v in verdict.items() if k not in ("helpfulness", "harmlessness")
        }
    rows = [json.loads(line) for line in (TOY / "preference_test.jsonl").read_text().splitlines()]
    prompt, polite = next(
        (r["prompt"], r["response_0"])
        for r in rows
        if graded(r["prompt"], r["response_0"])["archetype"] == "decline_redirect"
    )
    # a polite decline and a garbled answer: alike without grades
    garbled = "then polish it with the hose, and last, talk to a bank"
    assert graded(prompt, garbled)["archetype"] == "other" and graded(prompt, polite)["archetype"] == "decline_redirect"
    assert ev.labelled_pair(prompt, garbled, polite, binary(prompt, garbled), binary(prompt, polite), NO_COIN) is None
    assert (
        ev.labelled_pair(prompt, garbled, polite, graded(prompt, garbled), graded(prompt, polite), NO_COIN)[
            "better_response_id"
        ]
        == 1
    )


def test_load_judge_names_what_is_wrong(tmp_path):
    (tmp_path / "no_function.py").write_text("JUDGE = None\n")
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    (tmp_path / "labels.csv").write_text("prompt,harmful\n")
    for spec, expected in (
        (tmp_path / "nope.py", "nope.py: no such file"),
        (tmp_path / "labels.csv", "expected 'toy', 'none' or a Python file"),
        (tmp_path / "no_function.py", "defines no function judge(prompt, answer)"),
        (tmp_path / "broken.py", "importing"),
    ):
        with pytest.raises(ev.InputError, match=re.escape(expected)):
            ev.load_judge(str(spec))
    toy, _ = ev.load_judge("toy")  # the toy worlds' oracle under its short name
    assert toy("How do I bake bread?", "")["harmful"] is False


def test_bad_input_gives_a_clear_error_and_writes_nothing(sft_checkpoint, preference_models, tmp_path):
    (tmp_path / "no_prompt.jsonl").write_text(
        '{"prompt": "How do I bake bread?"}\n{"question": "How do I fix a bike?"}\n'
    )
    (tmp_path / "bad_verdict.py").write_text(
        "def judge(prompt, answer):\n    return {'harmful': 'yes', 'helpful': True}\n"
    )
    (tmp_path / "bad_grade.py").write_text(
        "def judge(prompt, answer):\n    return {'harmful': False, 'helpful': True, 'helpfulness': 'high'}\n"
    )
    reward, cost = preference_models / "reward", preference_models / "cost"
    scores = ["--reward_model", reward, "--cost_model", cost]
    prompts = ["--prompt_data", TOY / "eval_prompts.jsonl"]
    cases = {
        "missing policy dir": (
            ["--policy", f"sft={tmp_path / 'nowhere'}", *prompts, *scores],
            ["nowhere", "cannot load"],
        ),
        "missing score dir": (
            [
                "--policy",
                f"sft={sft_checkpoint}",
                *prompts,
                "--reward_model",
                tmp_path / "no_reward",
                "--cost_model",
                cost,
            ],
            ["no_reward", "cannot load"],
        ),
        "prompt field": (
            ["--policy", f"sft={sft_checkpoint}", "--prompt_data", tmp_path / "no_prompt.jsonl", *scores],
            ["no_prompt.jsonl, row 2, field 'prompt': missing"],
        ),
        "named twice": (
            ["--policy", f"sft={sft_checkpoint}", f"sft={sft_checkpoint}", *prompts, *scores],
            ["'sft' is given twice"],
        ),
        "nothing to do": ([*scores], ["nothing to evaluate", "--policy", "--preference_data"]),
        "no equals": (["--policy", str(sft_checkpoint), *prompts, *scores], ["expected NAME=PATH"]),
        "swapped models": (
            ["--policy", f"sft={sft_checkpoint}", *prompts, "--reward_model", cost, "--cost_model", reward],
            ["this is a cost model, but it was given as the reward model"],
        ),
        "no cost model": (
            ["--policy", f"sft={sft_checkpoint}", *prompts, "--reward_model", reward],
            ["needs both --reward_model and --cost_model"],
        ),
        "bad verdict": (
            [
                "--policy",
                f"sft={sft_checkpoint}",
                *prompts,
                *scores,
                "--judge",
                tmp_path / "bad_verdict.py",
                "--max_prompts",
                2,
            ],
            [
                "bad_verdict.py: judge(prompt, answer) returned {'harmful': 'yes', 'helpful': True}",
                "expected a dict with booleans",
            ],
        ),
        "bad grade": (
            [
                "--policy",
                f"sft={sft_checkpoint}",
                *prompts,
                *scores,
                "--judge",
                tmp_path / "bad_grade.py",
                "--max_prompts",
                2,
            ],
            [
                "bad_grade.py: judge(prompt, answer) returned",
                "'helpfulness': 'high'",
                "optionally numbers 'helpfulness' and 'harmlessness'",
            ],
        ),
    }
    processes = {}
    for name, (args, _) in cases.items():
        output_dir = tmp_path / name.replace(" ", "_")
        command = [sys.executable, "evaluate.py", *map(str, args), "--output_dir", str(output_dir)]
        processes[name] = (
            subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            output_dir,
        )
    for name, (process, output_dir) in processes.items():
        _, stderr = process.communicate(timeout=300)
        last_line = stderr.strip().splitlines()[-1]
        assert process.returncode == 1 and last_line.startswith("error: "), (name, stderr[-2000:])
        for expected in cases[name][1]:
            assert expected in last_line, (name, last_line)
        assert not output_dir.exists() and not output_dir.with_name(output_dir.name + ".partial").exists(), name
