"""--save_steps and --resume: a trainer killed with SIGKILL after it saved its second state, then resumed, ends exactly
where the same run without the kill ends: the same weights (to the last bit), the same metrics after the resume point,
and for PPO-Lagrangian the same critics and λ. Also under torchrun with 2 ranks. The models are tiny, from a config."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import sft
from helpers import TINY_LLAMA, TOY, kill_after_second_state, refused, run


def metrics(path, key):
    return {
        row[key]: {k: v for k, v in row.items() if k != "train/elapsed_seconds"}
        for row in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
    }


def assert_same_run(resumed, uninterrupted, resumed_from, key):
    for model in [""] + [name for name in ("reward_critic", "cost_critic") if (uninterrupted / name).is_dir()]:
        a, b = load_file(resumed / model / "model.safetensors"), load_file(uninterrupted / model / "model.safetensors")
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) == 0.0, model or "model"
    after = lambda rows: {n: row for n, row in rows.items() if n > resumed_from}  # noqa: E731
    resumed_rows, uninterrupted_rows = after(metrics(resumed, key)), after(metrics(uninterrupted, key))
    assert resumed_rows.keys() == uninterrupted_rows.keys() and resumed_rows
    for n in resumed_rows:
        assert resumed_rows[n] == pytest.approx(uninterrupted_rows[n], rel=1e-6, abs=1e-7), n
    assert not resumed.with_name(resumed.name + ".partial").exists()  # the states are gone with the finished run


def kill_resume_and_run_uninterrupted(script, args, tmp_path, nproc=1):
    """kill -9 after the second state and --resume into tmp_path/resumed, and beside it (one thread a process, as in
    every run here) the same run uninterrupted into tmp_path/uninterrupted; returns the step the resume started from."""
    with ThreadPoolExecutor(1) as pool:
        uninterrupted = pool.submit(run, script, *args, "--output_dir", tmp_path / "uninterrupted", nproc=nproc)
        resumed_from = kill_after_second_state(script, args, tmp_path / "resumed", nproc)
        run(script, *args, "--resume", "--output_dir", tmp_path / "resumed", nproc=nproc)
        uninterrupted.result()
    return resumed_from


SFT = [
    "--model_name_or_path",
    TINY_LLAMA,
    "--from_scratch",
    "--train_data",
    TOY / "sft.jsonl",
    "--max_steps",
    30,
    "--save_steps",
    3,
    "--lr",
    1e-3,
    "--per_device_train_batch_size",
    4,
    "--gradient_accumulation_steps",
    2,
    "--max_length",
    96,
    "--no_gradient_checkpointing",
    "--no_bf16",
    "--seed",
    0,
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "nproc, extra", [(2, []), (2, ["--fsdp"])], ids=["2 ranks DDP", "2 ranks FSDP"]
)  # (one process runs the same code as each DDP rank; test_ownership.py resumes it in this process)
def test_sft_resumes_where_it_was_killed(tmp_path, nproc, extra):
    args = SFT + extra  # under FSDP each rank saves and loads its own shards of the model and of AdamW's moments
    resumed_from = kill_resume_and_run_uninterrupted("sft.py", args, tmp_path, nproc)
    assert 3 <= resumed_from < 30
    assert_same_run(tmp_path / "resumed", tmp_path / "uninterrupted", resumed_from, "step")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """An untrained SFT-like policy and reward and cost models, built from the tiny config (what is tested is the
    bookkeeping of a resume, not learning)."""
    root, tokenizer = tmp_path_factory.mktemp("tiny"), AutoTokenizer.from_pretrained(TINY_LLAMA)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(TINY_LLAMA)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "sft")
    for objective in ("reward", "cost"):
        score_config = AutoConfig.from_pretrained(TINY_LLAMA, num_labels=1)
        score_config.objective = objective
        AutoModelForSequenceClassification.from_config(score_config).save_pretrained(root / objective)
    for name in ("sft", "reward", "cost"):
        tokenizer.save_pretrained(root / name)
    return root


@pytest.mark.slow
def test_preference_model_resumes_where_it_was_killed(tiny_models, tmp_path):
    args = [
        "--objective",
        "cost",
        "--model_name_or_path",
        tiny_models / "sft",
        "--train_data",
        TOY / "preference_train.jsonl",
        "--eval_data",
        "",
        "--max_steps",
        24,
        "--save_steps",
        3,
        "--lr",
        5e-4,
        "--per_device_train_batch_size",
        4,
        "--max_length",
        96,
        "--no_gradient_checkpointing",
        "--no_bf16",
        "--seed",
        0,
    ]
    resumed_from = kill_resume_and_run_uninterrupted("preference_model.py", args, tmp_path)
    assert_same_run(tmp_path / "resumed", tmp_path / "uninterrupted", resumed_from, "step")


# PID λ (its integral and memory are restored) with PTX (its data position too): the most state a run carries; the
# paper's λ (log λ alone) is resumed, though not compared with an uninterrupted run, in test_ownership.py
PID_AND_PTX = ["--lambda_update", "pid", "--pid_kp", 0.2, "--pid_ki", 0.05, "--pid_kd", 0.2]
PID_AND_PTX += ["--ptx_data", TOY / "sft.jsonl", "--ptx_coeff", 2.0]


@pytest.mark.slow
def test_ppo_lagrangian_resumes_where_it_was_killed(tiny_models, tmp_path):
    args = [
        *("--actor_model", tiny_models / "sft", "--reward_model", tiny_models / "reward"),
        *("--cost_model", tiny_models / "cost", "--prompt_data", TOY / "prompts.jsonl"),
        *(
            "--max_steps",
            16,
            "--save_steps",
            2,
            "--per_device_prompt_batch_size",
            4,
            "--per_device_train_batch_size",
            2,
        ),
        *("--update_iters", 2, "--max_new_tokens", 8, "--max_length", 64, "--actor_lr", 1e-4, "--critic_lr", 1e-4),
        *("--cost_limit", -5.0, "--episode_cost_window_size", 12, "--save_critics", "--no_gradient_checkpointing"),
        *("--no_bf16", "--seed", 0, *PID_AND_PTX),
    ]
    resumed_from = kill_resume_and_run_uninterrupted("ppo_lagrangian.py", args, tmp_path)
    assert_same_run(tmp_path / "resumed", tmp_path / "uninterrupted", resumed_from, "rollout")
    lambdas = [
        json.loads((tmp_path / name / "training_state.json").read_text())["lambda"]
        for name in ("resumed", "uninterrupted")
    ]
    assert lambdas[0] == pytest.approx(lambdas[1], rel=1e-6) and lambdas[0] != 1.0
    assert all("loss/ptx" in row for row in metrics(tmp_path / "resumed", "rollout").values())


def test_resume_without_a_saved_state_is_an_error(tmp_path):
    assert "no saved state" in refused(sft, *SFT, "--resume", "--output_dir", tmp_path / "nothing")
    assert list(tmp_path.iterdir()) == []
