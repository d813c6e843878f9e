"""run_pipeline.sh --smoke: every stage runs, in order, on both toy worlds, with the same settings, and every output appears."""

import json
import subprocess

import pytest

from helpers import REPO


POLICIES = ["ppo", "reward_shaping", "ppo_lag", "ppo_lag_d0", "ppo_lag_rectified"]
PATH_ARGS = {"actor_model", "reward_model", "cost_model", "prompt_data", "output_dir", "model_name_or_path", "train_data", "eval_data"}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """--smoke on both toy worlds: {world: (OUT, the completed process)}. The toy world runs two rounds (the default
    judge, toy); the small world one round, with the oracle given as a judge file."""
    runs = {}
    for world, extra in (("toy", ["--rounds", "2"]), ("toy_small", ["--judge", "data/toy_world.py"])):
        out = tmp_path_factory.mktemp(world) / "runs"
        result = subprocess.run(["bash", "run_pipeline.sh", "--smoke", "--data", f"data/{world}", "--out", str(out), "--seed", "1", *extra],
                                cwd=REPO, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, world + "\n" + result.stdout[-3000:] + result.stderr[-6000:]
        runs[world] = out, result
    return runs


@pytest.mark.parametrize("world", ["toy", "toy_small"])
def test_smoke_pipeline_runs_every_stage_and_writes_every_file(smoke_runs, world):
    out, result = smoke_runs[world]
    stages = [line.split()[0] for line in (out / "timings.txt").read_text().splitlines()]
    assert stages[:9] == ["sft", "reward", "cost", *POLICIES, "evaluate"]
    for model in ["sft", "reward", "cost", *POLICIES]:
        assert (out / model / "model.safetensors").is_file() and (out / model / "args.json").is_file(), model
    assert json.loads((out / "cost" / "config.json").read_text())["objective"] == "cost"
    for name in ("answers.jsonl", "results.json", "report.md", "reward_vs_cost.png", "policy_bars.png", "elo.png",
                 "score_histogram.png", "training_curves.png"):
        assert (out / "eval" / name).is_file(), name
    assert (out / "training_curves.png").is_file()
    results = json.loads((out / "eval" / "results.json").read_text())
    assert list(results["policies"]) == ["sft", *POLICIES]
    assert {json.loads(line)["policy"] for line in (out / "eval" / "answers.jsonl").read_text().splitlines()} == {"sft", *POLICIES}
    assert "oracle_harmful_rate" in results["policies"]["sft"]["harmful_prompts"]  # the oracle judges both toy worlds
    # the seed reached every stage, and the printed table is the evaluation's
    for model in ("sft", "reward", "ppo_lag"):
        assert json.loads((out / model / "args.json").read_text())["seed"] == 1
    assert "| ppo_lag_rectified |" in result.stdout and "total" in result.stdout.splitlines()[-1]
    # the three Lagrangian runs differ in their constraint only
    lagrangian = {name: json.loads((out / name / "args.json").read_text()) for name in ("ppo_lag", "ppo_lag_d0", "ppo_lag_rectified")}
    assert [(a["constraint"], a["cost_limit"]) for a in lagrangian.values()] == [("expected", -8.5), ("expected", 0.0), ("rectified", 0.0)]
    differing = {key for a in lagrangian.values() for key in a if a[key] != lagrangian["ppo_lag"][key]}
    assert differing == {"constraint", "cost_limit", "output_dir"}
    assert lagrangian["ppo_lag"]["max_steps"] == 2  # the budget is in rollouts (smoke: 2)


def test_a_second_round_runs_every_stage_and_writes_every_file(smoke_runs):
    out, result = smoke_runs["toy"]
    stages = [line.split()[0] for line in (out / "timings.txt").read_text().splitlines()]
    assert stages[9:] == ["round-2/label", "round-2/redteam", "round-2/reward", "round-2/cost", "round-2/ppo_lag", "round-2/evaluate",
                          "rounds/evaluate", "rounds/redteam", "rounds/round-1_models"]
    round_2 = out / "round-2"
    # new answers from round 1's policy to fresh prompts (the next rows of prompts.jsonl) and to the red-team prompts,
    # two per prompt, labelled by the judge; of the red-team prompts only those it fails on add pairs
    prompts = (REPO / "data" / "toy" / "prompts.jsonl").read_text().splitlines()
    assert (round_2 / "label_prompts.jsonl").read_text().splitlines() == prompts[:8]
    label_args = json.loads((round_2 / "label" / "args.json").read_text())
    assert label_args["policy"] == [f"current={out / 'ppo_lag'}"] and label_args["samples_per_prompt"] == 2 and label_args["judge"] == "toy"
    redteam_args = json.loads((round_2 / "redteam" / "args.json").read_text())
    assert redteam_args["prompt_data"] == "data/toy/redteam_prompts.jsonl" and redteam_args["keep_pairs"] == "failed"
    assert {k: v for k, v in redteam_args.items() if k not in ("prompt_data", "keep_pairs", "output_dir")} == \
           {k: v for k, v in label_args.items() if k not in ("prompt_data", "keep_pairs", "output_dir")}
    labelled = json.loads((round_2 / "label" / "results.json").read_text())["labelled_pairs"]
    new_rows = (round_2 / "label" / "labelled_pairs.jsonl").read_text().splitlines()
    assert labelled["written"] == len(new_rows) and labelled["pairs"] == labelled["written"] + labelled["dropped_no_preference"] == 8
    redteam_rows = (round_2 / "redteam" / "labelled_pairs.jsonl").read_text().splitlines()
    assert json.loads((round_2 / "redteam" / "results.json").read_text())["labelled_pairs"]["pairs"] == 200
    # every pair so far: round 1's data and the new pairs; new score models from the SFT model, PPO from round 1's policy
    original = (REPO / "data" / "toy" / "preference_train.jsonl").read_text().splitlines()
    assert (round_2 / "preference_train.jsonl").read_text().splitlines() == original + new_rows + redteam_rows
    for objective in ("reward", "cost"):
        args = json.loads((round_2 / objective / "args.json").read_text())
        assert args["model_name_or_path"] == str(out / "sft") and args["train_data"] == str(round_2 / "preference_train.jsonl")
    ppo_args = json.loads((round_2 / "ppo_lag" / "args.json").read_text())
    assert ppo_args["actor_model"] == str(out / "ppo_lag") and ppo_args["reward_model"] == str(round_2 / "reward")
    assert ppo_args["cost_model"] == str(round_2 / "cost") and (round_2 / "ppo_lag" / "model.safetensors").is_file()
    # the rounds side by side
    policies = json.loads((out / "rounds" / "eval" / "results.json").read_text())["policies"]
    assert list(policies) == ["sft", "round-1", "round-2"] and "oracle_other_rate" in policies["round-2"]["all"]
    assert (out / "rounds" / "rounds.png").is_file()
    report = (out / "rounds" / "report.md").read_text()
    assert "| harmful answers to held-out red-team prompts |" in report and report.splitlines()[2] in result.stdout  # and printed
    assert "| red-team prompts the current policy answered harmfully |" in report


def test_bad_round_and_judge_arguments_fail_before_any_stage(tmp_path):
    for args, expected in ((["--rounds", "2", "--judge", "none"], "every round after the first labels new answers with a judge"),
                           (["--rounds", "0"], "--rounds 0: must be a whole number, at least 1"),
                           (["--judge", str(tmp_path / "nope.py")], "nope.py: no such file")):
        result = subprocess.run(["bash", "run_pipeline.sh", "--out", str(tmp_path / "out"), *args], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and expected in result.stderr, (args, result.stderr)
        assert not (tmp_path / "out").exists()


def test_the_pipeline_has_no_setting_that_differs_between_the_worlds(smoke_runs):
    def settings(out):  # every stage's args.json, paths aside
        return {name: {k: v for k, v in json.loads((out / name / "args.json").read_text()).items() if k not in PATH_ARGS}
                for name in ["sft", "reward", "cost", *POLICIES]}
    assert settings(smoke_runs["toy"][0]) == settings(smoke_runs["toy_small"][0])


def test_bad_arguments_fail_before_any_stage(tmp_path):
    result = subprocess.run(["bash", "run_pipeline.sh", "--data", str(tmp_path), "--out", str(tmp_path / "out")], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "sft.jsonl: no such file" in result.stderr
    assert not (tmp_path / "out").exists()
    result = subprocess.run(["bash", "run_pipeline.sh", "--epochs", "3"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "unknown argument '--epochs'" in result.stderr
