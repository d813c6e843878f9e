"""run_pipeline.sh --smoke: every stage runs, in order, on both toy worlds, with the same settings, and every output appears."""

import json
import subprocess

import pytest

from helpers import REPO


POLICIES = ["ppo", "reward_shaping", "ppo_lag", "ppo_lag_d0", "ppo_lag_rectified"]
PATH_ARGS = {"actor_model", "reward_model", "cost_model", "prompt_data", "output_dir", "model_name_or_path", "train_data", "eval_data"}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """--smoke on both toy worlds: {world: (OUT, the completed process)}."""
    runs = {}
    for world in ("toy", "toy_small"):
        out = tmp_path_factory.mktemp(world) / "runs"
        result = subprocess.run(["bash", "run_pipeline.sh", "--smoke", "--data", f"data/{world}", "--out", str(out), "--seed", "1"],
                                cwd=REPO, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, world + "\n" + result.stdout[-3000:] + result.stderr[-6000:]
        runs[world] = out, result
    return runs


@pytest.mark.parametrize("world", ["toy", "toy_small"])
def test_smoke_pipeline_runs_every_stage_and_writes_every_file(smoke_runs, world):
    out, result = smoke_runs[world]
    stages = [line.split()[0] for line in (out / "timings.txt").read_text().splitlines()]
    assert stages == ["sft", "reward", "cost", *POLICIES, "evaluate"]
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
