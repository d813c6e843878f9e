"""The command line of the four scripts: Hugging Face conventions (HfArgumentParser), the module docstring as --help,
choices enforced, and defaults that are the reference implementation's settings (PKU-Alignment/safe-rlhf, the
scripts/*.sh of the paper's runs), written out here as a table so that a changed default fails."""

import sys

import pytest

import evaluate
import ppo_lagrangian
import preference_model
import sft

REFERENCE_DEFAULTS = {  # reference note §1-§3 (7B settings), scripts/sft.sh, reward-model.sh, cost-model.sh, ppo-lag.sh
    sft: dict(
        epochs=3,
        lr=2e-5,
        lr_scheduler="cosine",
        lr_warmup_ratio=0.03,
        weight_decay=0.0,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=8,
        max_length=512,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        seed=42,
        bf16=True,
        gradient_checkpointing=True,
    ),
    preference_model: dict(
        epochs=2,
        lr=2e-5,
        lr_scheduler="cosine",
        lr_warmup_ratio=0.03,
        weight_decay=0.1,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=1,
        max_length=512,
        regularization=0.001,
        seed=42,
        bf16=True,
        gradient_checkpointing=True,
    ),
    ppo_lagrangian: dict(
        epochs=1,
        update_iters=1,
        per_device_prompt_batch_size=16,
        per_device_train_batch_size=16,
        actor_lr=1e-5,
        actor_lr_scheduler="cosine",
        actor_lr_warmup_ratio=0.03,
        actor_weight_decay=0.01,
        critic_lr=5e-6,
        critic_lr_scheduler="constant",
        critic_lr_warmup_ratio=0.0,
        critic_weight_decay=0.0,
        clip_range_ratio=0.2,
        clip_range_score=50.0,
        clip_range_value=5.0,
        gamma=1.0,
        gae_lambda=0.95,
        cost_limit=0.0,
        lambda_init=1.0,
        lambda_lr=0.1,
        lambda_max=5.0,
        lambda_update_delay_steps=0,
        episode_cost_window_size=128,
        ptx_coeff=16.0,
        temperature=1.0,
        top_p=1.0,
        max_length=512,
        algorithm="ppo_lag",
        bf16=True,
        gradient_checkpointing=True,
    ),
}
REFERENCE_KL_COEFF = {"ppo_lag": 0.01, "ppo": 0.02, "reward_shaping": 0.02}  # ppo-lag.sh, ppo.sh, ppo-reward-shaping.sh


def parse(module, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [module.__name__ + ".py", *argv])
    return module.parse_args(module.Args)


@pytest.mark.parametrize("module", list(REFERENCE_DEFAULTS), ids=lambda m: m.__name__)
def test_defaults_are_the_reference_settings(module, monkeypatch):
    args = parse(module, [], monkeypatch)
    assert {name: getattr(args, name) for name in REFERENCE_DEFAULTS[module]} == REFERENCE_DEFAULTS[module]


def test_each_algorithm_defaults_to_the_reference_kl_coefficient(monkeypatch):
    assert ppo_lagrangian.REFERENCE_KL_COEFF == REFERENCE_KL_COEFF
    for algorithm, kl_coeff in REFERENCE_KL_COEFF.items():  # filled in from the algorithm right after parsing
        assert parse(ppo_lagrangian, ["--algorithm", algorithm], monkeypatch).kl_coeff == kl_coeff
    assert parse(ppo_lagrangian, ["--algorithm", "ppo", "--kl_coeff", "0.05"], monkeypatch).kl_coeff == 0.05


@pytest.mark.parametrize("module", [sft, preference_model, ppo_lagrangian, evaluate], ids=lambda m: m.__name__)
def test_help_shows_the_docstring_and_hugging_face_flags(module, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(module, ["--help"], monkeypatch)
    help_text = capsys.readouterr().out
    assert exit_info.value.code == 0 and module.__doc__.splitlines()[0] in help_text
    assert "--no_bf16" in help_text and "(default:" in help_text
    if module is not evaluate:
        assert "--no_gradient_checkpointing" in help_text and "--report_to {none,tensorboard}" in help_text


def test_booleans_lists_and_choices_parse_the_hugging_face_way(monkeypatch, capsys):
    args = parse(sft, ["--no_gradient_checkpointing", "--from_scratch", "--adam_beta2", "0.999"], monkeypatch)
    assert (args.gradient_checkpointing, args.from_scratch, args.adam_beta2) == (False, True, 0.999)
    args = parse(evaluate, ["--policy", "a=x", "b=y", "--policy", "c=z"], monkeypatch)
    assert args.policy == ["a=x", "b=y", "c=z"]  # listed after one flag, or one flag per policy
    for module, argv in ((preference_model, ["--objective", "helpfulness"]), (ppo_lagrangian, ["--algorithm", "dpo"])):
        with pytest.raises(SystemExit) as exit_info:
            parse(module, argv, monkeypatch)
        assert exit_info.value.code == 2 and f"invalid choice: '{argv[1]}'" in capsys.readouterr().err


@pytest.mark.parametrize("module", [sft, preference_model, ppo_lagrangian], ids=lambda m: m.__name__)
def test_what_a_resume_may_change_are_flags_of_the_script_that_move_no_number(module, monkeypatch):
    args = parse(module, [], monkeypatch)
    may_change = set(args.resume_may_change.split())
    assert may_change <= set(vars(args))  # each one a flag of this script (sft.py has no --save_critics)
    # what moves no number of the run: where it writes, when it saves and logs, and how (not what) it computes
    assert may_change == {
        "resume",
        "overwrite_output_dir",
        "output_dir",
        "save_steps",
        "logging_steps",
        "report_to",
        "gradient_checkpointing",
    } | ({"save_critics"} if module is ppo_lagrangian else set())
