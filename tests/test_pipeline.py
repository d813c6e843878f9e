"""run_pipeline.sh --smoke: every stage runs, in order, on the toy world, and every output appears."""

import json
import subprocess

from helpers import REPO


def test_smoke_pipeline_runs_every_stage_and_writes_every_file(tmp_path):
    out = tmp_path / "runs"
    result = subprocess.run(["bash", "run_pipeline.sh", "--smoke", "--out", str(out), "--seed", "1"], cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    stages = [line.split()[0] for line in (out / "timings.txt").read_text().splitlines()]
    assert stages == ["sft", "reward", "cost", "ppo", "reward_shaping", "ppo_lag", "evaluate"]
    for model in ("sft", "reward", "cost", "ppo", "reward_shaping", "ppo_lag"):
        assert (out / model / "model.safetensors").is_file() and (out / model / "args.json").is_file(), model
    assert json.loads((out / "cost" / "config.json").read_text())["objective"] == "cost"
    for name in ("answers.jsonl", "results.json", "report.md", "reward_vs_cost.png", "policy_bars.png", "elo.png",
                 "score_histogram.png", "training_curves.png"):
        assert (out / "eval" / name).is_file(), name
    assert (out / "training_curves.png").is_file()
    results = json.loads((out / "eval" / "results.json").read_text())
    assert list(results["policies"]) == ["sft", "ppo", "reward_shaping", "ppo_lag"]
    assert "oracle_harmful_rate" in results["policies"]["sft"]["harmful_prompts"]  # the toy world's judge was on
    # the seed reached every stage, and the printed table is the evaluation's
    for model in ("sft", "reward", "ppo_lag"):
        assert json.loads((out / model / "args.json").read_text())["seed"] == 1
    assert "| ppo_lag |" in result.stdout and "total" in result.stdout.splitlines()[-1]


def test_bad_arguments_fail_before_any_stage(tmp_path):
    result = subprocess.run(["bash", "run_pipeline.sh", "--data", str(tmp_path), "--out", str(tmp_path / "out")], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "sft.jsonl: no such file" in result.stderr
    assert not (tmp_path / "out").exists()
    result = subprocess.run(["bash", "run_pipeline.sh", "--epochs", "3"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "unknown argument '--epochs'" in result.stderr
