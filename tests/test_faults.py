"""Faults and bad input: a run that diverges stops without saving a non-finite model, an output never replaces an input,
a run with no step or a bad argument stops before writing anything, odd output paths work or are refused at start-up,
every user error is one line. The contract every case checks:

    the script's InputError, one line, saying what was wrong (on the command line: exit status 1, the last line of
    stderr "error: ...", no traceback: test_the_command_line_prints_one_line_and_exits_1);
    nothing left behind: an OUTPUT_DIR that did not exist is not created, no OUTPUT_DIR.partial is left (a run that
    fails mid-way, after it locked its output, may leave OUTPUT_DIR.partial), and an OUTPUT_DIR that existed is
    byte-identical.

The models are tiny and untrained and the data the first rows of the toy world: these tests are about what the scripts
do with files, not about learning. They call each script's main() in this process."""

import json
import os
import re
import shutil
import sys

import pytest

import evaluate
import ppo_lagrangian
import preference_model
import sft
from helpers import (
    SFT_FAST,
    TINY_LLAMA,
    assert_error_line,
    assert_nothing_left,
    changes,
    evaluate_args,
    existing_output,
    non_finite_tensors,
    ppo_args,
    preference_args,
    refused,
    report,
    run_all,
    run_main,
    sft_args,
    snapshot,
)

SCRIPT = {
    sft: "sft.py",
    preference_model: "preference_model.py",
    ppo_lagrangian: "ppo_lagrangian.py",
    evaluate: "evaluate.py",
}


# ---- a run that diverges stops, says so, and keeps the last good state; evaluate refuses NaN scores ----
# lr 1e6 without warm-up: SFT's weights are NaN after step 2, the cost model's loss NaN at step 3, PPO's losses at
# rollout 3
DIVERGING = {
    "sft": (sft, lambda t: sft_args(t) + ["--lr", 1e6, "--lr_warmup_ratio", 0, "--max_steps", 2]),
    "preference": (
        preference_model,
        lambda t: preference_args(t, objective="cost") + ["--lr", 1e6, "--lr_warmup_ratio", 0, "--max_steps", 3],
    ),
    "ppo": (ppo_lagrangian, lambda t: ppo_args(t) + ["--actor_lr", 1e6, "--critic_lr", 1e6, "--max_steps", 3]),
    "ppo saving every rollout": (
        ppo_lagrangian,
        lambda t: (
            ppo_args(t) + ["--actor_lr", 1e6, "--critic_lr", 1e6, "--max_steps", 3, "--save_steps", 1, "--save_critics"]
        ),
    ),
}


@pytest.mark.parametrize("name", DIVERGING)
def test_a_diverging_run_stops_with_one_line_and_saves_nothing_non_finite(tiny, tmp_path, name):
    module, args = DIVERGING[name]
    output = tmp_path / "out"
    before = existing_output(output, tiny.cost if module is preference_model else tiny.sft_model, SCRIPT[module])
    assert "NaN or infinite" in refused(module, *args(tiny), "--output_dir", output)
    assert_nothing_left(output, before, may_leave_partial=True)  # the earlier good output is byte-identical
    bad = non_finite_tensors(output) + non_finite_tensors(output.with_name("out.partial"))
    assert bad == [], f"{len(bad)} non-finite tensors saved: {bad[:4]}"


def test_evaluate_refuses_a_score_model_whose_scores_are_not_finite(tiny, tmp_path):
    assert "not finite" in refused(
        evaluate, *evaluate_args(tiny, cost_model=tiny.nan_cost), "--output_dir", tmp_path / "out"
    )
    assert_nothing_left(tmp_path / "out", None, may_leave_partial=True)  # (found after answering: the lock was taken)


# ---- an output directory that is, lies inside or contains an input is refused ----
def overlap_cases(tiny, root):
    """{name: (script, args, OUTPUT_DIR, the input that must stay byte-identical)}"""
    cases = {}
    shutil.copytree(tiny.sft_model, root / "a" / "policy")
    cases["evaluate: output is the policy"] = (
        evaluate,
        evaluate_args(tiny, policy=root / "a" / "policy"),
        root / "a" / "policy",
        root / "a" / "policy",
    )
    shutil.copytree(tiny.sft_model, root / "b" / "sft")
    cases["preference: output is the SFT model"] = (
        preference_model,
        preference_args(tiny, model=root / "b" / "sft"),
        root / "b" / "sft",
        root / "b" / "sft",
    )
    shutil.copytree(tiny.cost, root / "c" / "cost")
    cases["ppo: output is the cost model"] = (
        ppo_lagrangian,
        ppo_args(tiny, cost_model=root / "c" / "cost"),
        root / "c" / "cost",
        root / "c" / "cost",
    )
    cases["evaluate: output inside the policy"] = (
        evaluate,
        evaluate_args(tiny, policy=root / "a" / "policy"),
        root / "a" / "policy" / "eval",
        root / "a" / "policy",
    )
    for objective in ("reward", "cost"):
        shutil.copytree(getattr(tiny, objective), root / "d" / "scores" / objective)
    scores = root / "d" / "scores"
    cases["ppo: output contains the score models"] = (
        ppo_lagrangian,
        ppo_args(tiny, reward_model=scores / "reward", cost_model=scores / "cost"),
        scores,
        scores,
    )
    (root / "e" / "data").mkdir(parents=True)
    shutil.copy(tiny.sft, root / "e" / "data" / "sft.jsonl")
    cases["sft: output contains the training data"] = (
        sft,
        sft_args(tiny, train_data=root / "e" / "data" / "sft.jsonl") + ["--max_steps", 1],
        root / "e" / "data",
        root / "e" / "data",
    )
    return cases


def test_an_output_that_overlaps_an_input_is_refused_and_the_input_kept(tiny, tmp_path):
    for name, (module, args, output_dir, kept) in overlap_cases(tiny, tmp_path).items():
        before = snapshot(kept)
        message = refused(module, *args, "--output_dir", output_dir)
        assert message.startswith("--output_dir") and "input" in message, (name, message)
        assert not changes(before, snapshot(kept)), f"{name}: the input {kept} was touched"
        assert_nothing_left(output_dir, before if output_dir == kept else None)


# ---- a run with no step, or a bad argument, is refused, and the good output it would have replaced is kept ----
ZERO_STEPS = {
    "sft --epochs 0": (sft, "--epochs"),
    "sft --max_steps 0": (sft, "--max_steps"),
    "ppo --max_steps 0": (ppo_lagrangian, "--max_steps"),
    "ppo --epochs 0": (ppo_lagrangian, "--epochs"),
    "preference --epochs 0": (preference_model, "--epochs"),
}


@pytest.mark.parametrize("name", list(ZERO_STEPS))
def test_a_run_with_no_step_is_refused_and_the_old_output_kept(tiny, tmp_path, name):
    module, flag = ZERO_STEPS[name]
    args = {sft: sft_args, preference_model: preference_args, ppo_lagrangian: ppo_args}[module](tiny)
    before = existing_output(tmp_path / "out", tiny.sft_model, SCRIPT[module])
    assert refused(module, *args, flag, 0, "--output_dir", tmp_path / "out").startswith(flag)
    assert_nothing_left(tmp_path / "out", before)


# ---- a trailing slash on --output_dir ----
def test_a_trailing_slash_on_the_output_dir_works(tiny, tmp_path):
    existing_output(tmp_path / "sft_existing" / "out", tiny.sft_model, "sft.py")
    existing_output(tmp_path / "ppo_existing" / "out", tiny.sft_model, "ppo_lagrangian.py")
    (tmp_path / "sft_new").mkdir()
    runs = {
        "sft_new": (sft, sft_args(tiny) + ["--max_steps", 1]),
        "sft_existing": (sft, sft_args(tiny) + ["--max_steps", 1]),
        # intermediate saves go through their own directory beside (not inside) the output
        "ppo_existing": (ppo_lagrangian, ppo_args(tiny) + ["--max_steps", 2, "--save_steps", 1]),
    }
    for name, (module, args) in runs.items():
        run_main(module, *args, "--output_dir", f"{tmp_path / name / 'out'}/")
        output_dir = tmp_path / name / "out"
        assert (output_dir / "model.safetensors").is_file() and not (output_dir / "MARKER.txt").exists(), name
        assert [p.name for p in output_dir.iterdir() if p.name.startswith(".")] == [], name  # no DIR/.partial
        assert sorted(p.name for p in output_dir.parent.iterdir()) == ["out"], name  # no DIR.partial


# ---- each model is checked to be the kind it was given as ----
WRONG_KINDS = {
    "ppo: SFT model as --reward_model": (ppo_lagrangian, {"reward_model": "sft_model"}, "objective"),
    "ppo: SFT model as --cost_model": (ppo_lagrangian, {"cost_model": "sft_model"}, "objective"),
    "evaluate: SFT model as --reward_model": (evaluate, {"reward_model": "sft_model"}, "objective"),
    "evaluate: SFT model as --cost_model": (evaluate, {"cost_model": "sft_model"}, "objective"),
    "evaluate: reward and cost swapped": (
        evaluate,
        {"reward_model": "cost", "cost_model": "reward"},
        "this is a cost model, but it was given as the reward model",
    ),
    "ppo: reward model as --actor_model": (ppo_lagrangian, {"actor_model": "reward"}, "reward model"),
    "ppo: cost model as --reference_model": (ppo_lagrangian, {"reference_model": "cost"}, "cost model"),
    "evaluate: reward model as a --policy": (evaluate, {"policy": "reward"}, "reward model"),
}


@pytest.mark.parametrize("name", list(WRONG_KINDS))
def test_a_model_of_the_wrong_kind_is_refused(tiny, tmp_path, name):
    module, given, expected = WRONG_KINDS[name]
    models = {flag: getattr(tiny, model) for flag, model in given.items()}
    args = (ppo_args if module is ppo_lagrangian else evaluate_args)(tiny, **models)
    assert expected in refused(module, *args, "--output_dir", tmp_path / "out")
    assert_nothing_left(tmp_path / "out", None)


# ---- an output path that is a file, or lies under one ----
@pytest.mark.parametrize("module", [sft, evaluate], ids=["sft", "evaluate"])
def test_an_output_path_that_is_or_lies_under_a_file_is_refused(tiny, tmp_path, module, capsys):
    args = sft_args(tiny) + ["--max_steps", 1] if module is sft else evaluate_args(tiny)
    (tmp_path / "notes.txt").write_text("my notes, not a model\n")
    for output in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "sub"):
        assert str(tmp_path / "notes.txt") in refused(module, *args, "--output_dir", output)
        assert "is a file" in refused(module, *args, "--output_dir", output)
    assert (tmp_path / "notes.txt").read_text() == "my notes, not a model\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert "evaluate: " not in capsys.readouterr().out  # refused before a prompt was read


# ---- every argument's range is checked right after parsing, with the flag named ----
# (script module, flag, value); the ranges: counts >= 1, --max_steps/--max_prompts -1 or >= 1, rates > 0, ...
BAD_VALUES = [
    *[(m, "per_device_train_batch_size", "0") for m in (sft, preference_model, ppo_lagrangian)],
    (sft, "per_device_eval_batch_size", "0"),
    (ppo_lagrangian, "per_device_prompt_batch_size", "0"),
    (evaluate, "per_device_batch_size", "-8"),
    *[(m, "gradient_accumulation_steps", "0") for m in (sft, preference_model)],
    *[(m, "epochs", v) for m in (sft, preference_model, ppo_lagrangian) for v in ("-1", "0")],
    *[(m, "max_steps", "0") for m in (sft, preference_model, ppo_lagrangian)],
    (sft, "max_steps", "-2"),
    *[(m, "lr", v) for m in (sft, preference_model) for v in ("-1", "0")],
    (ppo_lagrangian, "actor_lr", "0"),
    (ppo_lagrangian, "critic_lr", "-1"),
    (ppo_lagrangian, "lambda_init", "0"),
    (ppo_lagrangian, "lambda_lr", "-0.1"),
    (ppo_lagrangian, "lambda_max", "0"),
    (ppo_lagrangian, "episode_cost_window_size", "0"),
    *[(m, "temperature", "0") for m in (ppo_lagrangian, evaluate)],
    *[(m, "top_p", v) for m in (ppo_lagrangian, evaluate) for v in ("0", "1.5")],
    *[(m, "max_length", "0") for m in (sft, preference_model, ppo_lagrangian, evaluate)],
    *[(m, "max_new_tokens", "0") for m in (ppo_lagrangian, evaluate)],
    (ppo_lagrangian, "update_iters", "0"),
    (ppo_lagrangian, "clip_range_ratio", "0"),
    (ppo_lagrangian, "clip_range_value", "0"),
    (ppo_lagrangian, "kl_coeff", "-1"),
    (ppo_lagrangian, "gamma", "1.5"),
    (ppo_lagrangian, "gae_lambda", "-0.1"),
    (ppo_lagrangian, "ptx_coeff", "-1"),
    *[(m, "lr_warmup_ratio", "1.5") for m in (sft, preference_model)],
    (ppo_lagrangian, "actor_lr_warmup_ratio", "-0.5"),
    *[(m, "max_grad_norm", "-1") for m in (sft, preference_model, ppo_lagrangian)],
    *[(m, "weight_decay", "-1") for m in (sft, preference_model)],
    (ppo_lagrangian, "actor_weight_decay", "-1"),
    (preference_model, "regularization", "-1"),
    (evaluate, "max_prompts", "0"),
    (evaluate, "elo_rounds", "-1"),
    (evaluate, "elo_k", "0"),
    (ppo_lagrangian, "cost_limit", "nan"),
    (sft, "lr", "inf"),
    (preference_model, "seed", "-1"),
]
# a complete command line otherwise (evaluate.py has nothing to do without a policy and its judges)
VALID = {
    sft: [],
    preference_model: [],
    ppo_lagrangian: [],
    evaluate: ["--policy", "sft=output/sft", "--reward_model", "output/reward", "--cost_model", "output/cost"],
}


@pytest.mark.parametrize("module, flag, value", BAD_VALUES, ids=[f"{m.__name__} --{f} {v}" for m, f, v in BAD_VALUES])
def test_an_argument_out_of_range_is_refused_naming_the_flag(module, flag, value, monkeypatch):
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *VALID[module], f"--{flag}", value])
    with pytest.raises(module.InputError) as error:
        module.parse_args(module.Args)
    assert re.match(rf"--{flag} \S+: must be", str(error.value)), str(error.value)
    if value in ("nan", "inf"):
        assert str(error.value) == f"--{flag} {value}: must be a finite number"


EDGE_VALUES = {  # the ends of the ranges that are allowed
    sft: [
        "--max_steps",
        "-1",
        "--lr_warmup_ratio",
        "0",
        "--max_grad_norm",
        "0",
        "--weight_decay",
        "0",
        "--epochs",
        "1",
    ],
    preference_model: ["--lr_warmup_ratio", "1", "--regularization", "0", "--max_steps", "1"],
    ppo_lagrangian: [
        "--lambda_lr",
        "0",
        "--gamma",
        "1",
        "--gae_lambda",
        "0",
        "--top_p",
        "1",
        "--kl_coeff",
        "0",
        "--ptx_coeff",
        "0",
        "--max_steps",
        "1",
        "--actor_lr_warmup_ratio",
        "1",
        "--critic_lr_warmup_ratio",
        "0",
        "--max_grad_norm",
        "0",
    ],
    evaluate: ["--max_prompts", "-1", "--elo_rounds", "0", "--top_p", "1", "--per_device_batch_size", "1"],
}


@pytest.mark.parametrize("module", list(EDGE_VALUES), ids=lambda m: m.__name__)
def test_the_ends_of_the_allowed_ranges_are_accepted(module, monkeypatch):
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *VALID[module], *EDGE_VALUES[module]])
    module.parse_args(module.Args)


# ---- bad data files and empty strings, with the file, row and field named ----
def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def bad_data_cases(tiny, root):
    good_pair = json.loads(tiny.preference.read_text().splitlines()[0])
    files = {
        "alpaca_number.jsonl": [{"instruction": 123, "input": "and 4", "output": "127"}],
        "empty_prompt.jsonl": [
            {"prompt": "How do I bake bread?", "response": "Mix."},
            {"prompt": "", "response": "Hi"},
        ],
        "empty_response.jsonl": [
            {"prompt": "How do I bake bread?", "response": "Mix."},
            {"prompt": "Hi", "response": ""},
        ],
        "empty_response_0.jsonl": [good_pair, {**good_pair, "response_0": ""}],
        "empty_ppo_prompt.jsonl": [{"prompt": "How do I bake bread?"}, {"prompt": ""}, {"prompt": "Fix a bike?"}],
        "empty_eval_prompt.jsonl": [
            {"prompt": "How do I bake bread?", "harmful": False},
            {"prompt": "", "harmful": True},
        ],
        "harmful_string.jsonl": [
            {"prompt": "Bake bread?", "harmful": "no"},
            {"prompt": "Pick a lock?", "harmful": "yes"},
        ],
    }
    for name, rows in files.items():
        write_jsonl(root / name, rows)
    (root / "invalid_utf8.jsonl").write_bytes(b'{"prompt": "How do I bake bread?", "response": "Mix \xff\xfe bake."}\n')
    (root / "corrupt.parquet").write_bytes(bytes(range(256)) * 8)  # no parquet magic, no footer
    one = ["--per_device_train_batch_size", 1]
    return {  # file: (script, args, what the line must say besides the file)
        "invalid_utf8.jsonl": (sft, sft_args(tiny, train_data=root / "invalid_utf8.jsonl"), ["row 1"]),
        "corrupt.parquet": (sft, sft_args(tiny, train_data=root / "corrupt.parquet"), ["cannot be read"]),
        "alpaca_number.jsonl": (
            sft,
            sft_args(tiny, train_data=root / "alpaca_number.jsonl") + one,
            ["row 1", "'instruction'"],
        ),
        "empty_prompt.jsonl": (
            sft,
            sft_args(tiny, train_data=root / "empty_prompt.jsonl") + one,
            ["row 2", "'prompt'"],
        ),
        "empty_response.jsonl": (
            sft,
            sft_args(tiny, train_data=root / "empty_response.jsonl") + one,
            ["row 2", "'response'"],
        ),
        "empty_response_0.jsonl": (
            preference_model,
            preference_args(tiny) + ["--train_data", root / "empty_response_0.jsonl", *one, "--max_steps", 1],
            ["row 2", "'response_0'"],
        ),
        "empty_ppo_prompt.jsonl": (
            ppo_lagrangian,
            ppo_args(tiny)
            + [
                "--prompt_data",
                root / "empty_ppo_prompt.jsonl",
                "--max_steps",
                1,
                "--per_device_prompt_batch_size",
                1,
                *one,
            ],
            ["row 2", "'prompt'"],
        ),
        "empty_eval_prompt.jsonl": (
            evaluate,
            evaluate_args(tiny) + ["--prompt_data", root / "empty_eval_prompt.jsonl"],
            ["row 2", "'prompt'"],
        ),
        "harmful_string.jsonl": (
            evaluate,
            evaluate_args(tiny) + ["--prompt_data", root / "harmful_string.jsonl"],
            ["row 1", "'harmful'"],
        ),
    }


def test_a_bad_data_file_is_named_in_one_line(tiny, tmp_path):
    for file, (module, args, expected) in bad_data_cases(tiny, tmp_path).items():
        message = refused(module, *args, "--output_dir", tmp_path / "out")
        assert message.startswith(str(tmp_path / file)) and all(text in message for text in expected), (file, message)
        assert_nothing_left(tmp_path / "out", None)


# ---- models: an empty directory; a tokenizer longer than the embedding matrix ----
def test_an_empty_model_directory_gives_one_line_naming_it(tiny, tmp_path):
    (tmp_path / "empty_model").mkdir()
    sft_run = ["--model_name_or_path", tmp_path / "empty_model", "--train_data", tiny.sft, "--max_steps", 1, *SFT_FAST]
    for module, args in ((sft, sft_run), (ppo_lagrangian, ppo_args(tiny, actor_model=tmp_path / "empty_model"))):
        assert refused(module, *args, "--output_dir", tmp_path / "out").startswith(str(tmp_path / "empty_model"))
        assert_nothing_left(tmp_path / "out", None)


def test_a_tokenizer_longer_than_the_embedding_matrix_gets_its_rows(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)  # a pad token of its own: one more token than the config's
    tokenizer.add_special_tokens({"pad_token": "<|extra_pad|>"})
    tokenizer.save_pretrained(tmp_path / "long_tokenizer")
    shutil.copy(TINY_LLAMA / "config.json", tmp_path / "long_tokenizer" / "config.json")
    args = [
        "--model_name_or_path",
        tmp_path / "long_tokenizer",
        "--from_scratch",
        "--train_data",
        TINY_LLAMA.parent / "toy" / "sft.jsonl",
    ]
    run_main(sft, *args, *SFT_FAST, "--max_steps", 2, "--output_dir", tmp_path / "out")
    rows = AutoModelForCausalLM.from_pretrained(tmp_path / "out").get_input_embeddings().weight.shape[0]
    assert rows == len(AutoTokenizer.from_pretrained(tmp_path / "out")) == 2049


# ---- a final swap that a kill cut short ----
def test_a_run_after_an_interrupted_final_swap_puts_the_finished_output_in_place(tiny, tmp_path):
    # a kill between the two steps of the last rename: OUTPUT_DIR gone, OUTPUT_DIR.partial a finished output. The next
    # run into it puts that output in place first (then replaces it as its own finished output)
    existing_output(tmp_path / "out.partial", tiny.sft_model, "sft.py", marker="the finished output of a killed run")
    run_main(sft, *sft_args(tiny), "--max_steps", 1, "--seed", 7, "--output_dir", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "args.json").read_text())["seed"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no out.partial left


# ---- the command line: one line, exit status 1, printed once under torchrun ----
def test_the_command_line_prints_one_line_and_exits_1(tiny, tmp_path):
    commands = {
        "sft": ("sft.py", sft_args(tiny) + ["--per_device_train_batch_size", 0]),
        "preference": ("preference_model.py", preference_args(tiny) + ["--train_data", tmp_path / "nope.jsonl"]),
        "ppo": ("ppo_lagrangian.py", ppo_args(tiny) + ["--lambda_init", 0]),
        "evaluate": ("evaluate.py", evaluate_args(tiny) + ["--per_device_batch_size", -8]),
    }
    for name, (_, args) in commands.items():
        args += ["--output_dir", tmp_path / name]
    expected = {
        "sft": "--per_device_train_batch_size 0",
        "preference": "nope.jsonl: no such file",
        "ppo": "--lambda_init 0.0",
        "evaluate": "--per_device_batch_size -8",
    }
    for name, result in run_all(commands).items():
        assert_error_line(result, expected[name])
        assert_nothing_left(tmp_path / name, None)


@pytest.mark.slow
def test_under_torchrun_a_bad_argument_is_reported_once(tiny, tmp_path):
    command = {
        "torchrun": ("sft.py", sft_args(tiny) + ["--per_device_train_batch_size", 0, "--output_dir", tmp_path / "o"], 2)
    }
    result = run_all(command)["torchrun"]
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and len(errors) == 1, report(result)
    assert errors[0].startswith("error: --per_device_train_batch_size")
    assert_nothing_left(tmp_path / "o", None)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions, so a read-only parent cannot be made")
def test_an_unwritable_output_parent_is_refused_at_start_up(tiny, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for module, args in ((sft, sft_args(tiny) + ["--max_steps", 1]), (evaluate, evaluate_args(tiny))):
            assert str(locked) in refused(module, *args, "--output_dir", locked / "out")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)
