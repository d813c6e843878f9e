"""Faults and bad input (issue 13, defects 1-11): a run that diverges stops without saving a non-finite model, an
output never replaces an input, a run with no step or a bad argument stops before writing anything, odd output paths
work or are refused at start-up, every user error is one line. The contract every case checks:

    exit status 1; the last line of stderr starts with "error: " and says what was wrong; no "Traceback";
    nothing left behind: an OUTPUT_DIR that did not exist is not created, no OUTPUT_DIR.partial or .old is left
    (a run that diverges mid-training may leave OUTPUT_DIR.partial), and an OUTPUT_DIR that existed is byte-identical.

The models are tiny and untrained and the data the first rows of the toy world: these tests are about what the scripts
do with files, not about learning. The cases of a group run as concurrent subprocesses, a module-scoped fixture each."""

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
    report,
    run_all,
    sft_args,
    snapshot,
)

# ---- defect 1: a run that diverges stops, says so, and keeps the last good state; evaluate refuses NaN scores ----
DIVERGING = ["sft", "preference", "ppo", "ppo saving every rollout"]


@pytest.fixture(scope="module")
def diverged(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("diverged")
    # lr 1e6 without warm-up: SFT's weights are all NaN after step 2, the cost model's loss NaN at step 3, PPO's
    # losses NaN at rollout 3
    commands = {
        "sft": ("sft.py", sft_args(tiny) + ["--lr", 1e6, "--lr_warmup_ratio", 0, "--max_steps", 2]),
        "preference": (
            "preference_model.py",
            preference_args(tiny, objective="cost") + ["--lr", 1e6, "--lr_warmup_ratio", 0, "--max_steps", 3],
        ),
        "ppo": ("ppo_lagrangian.py", ppo_args(tiny) + ["--actor_lr", 1e6, "--critic_lr", 1e6, "--max_steps", 3]),
        "ppo saving every rollout": (
            "ppo_lagrangian.py",
            ppo_args(tiny)
            + ["--actor_lr", 1e6, "--critic_lr", 1e6, "--max_steps", 3, "--save_steps", 1, "--save_critics"],
        ),
    }
    outputs, before = {}, {}
    for name, (script, args) in commands.items():
        outputs[name] = root / name.replace(" ", "_") / "out"
        before[name] = existing_output(outputs[name], tiny.cost if name == "preference" else tiny.sft_model, script)
        args += ["--output_dir", outputs[name]]
    outputs["evaluate"], before["evaluate"] = root / "evaluate" / "out", None
    outputs["evaluate"].parent.mkdir()
    commands["evaluate"] = (
        "evaluate.py",
        evaluate_args(tiny, cost_model=tiny.nan_cost) + ["--output_dir", outputs["evaluate"]],
    )
    return {name: (result, outputs[name], before[name]) for name, result in run_all(commands).items()}


@pytest.mark.parametrize("name", DIVERGING)
def test_a_diverging_run_stops_with_one_line_and_saves_nothing_non_finite(diverged, name):
    result, output_dir, before = diverged[name]
    assert_nothing_left(output_dir, before, may_leave_partial=True)  # the earlier good output is byte-identical
    partial = output_dir.with_name(output_dir.name + ".partial")
    bad = non_finite_tensors(output_dir) + non_finite_tensors(partial)
    assert bad == [], f"{len(bad)} non-finite tensors saved: {bad[:4]}"
    assert_error_line(result, "NaN or infinite")


def test_evaluate_refuses_a_score_model_whose_scores_are_not_finite(diverged):
    result, output_dir, before = diverged["evaluate"]
    assert_error_line(result, "not finite")
    assert_nothing_left(output_dir, before)


# ---- defect 2: an output directory that is, lies inside or contains an input is refused ----
OVERLAPS = [
    "evaluate: output is the policy",
    "preference: output is the SFT model",
    "ppo: output is the cost model",
    "evaluate: output inside the policy",
    "ppo: output contains the score models",
    "sft: output contains the training data",
]


@pytest.fixture(scope="module")
def overlapping(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("overlap")
    cases = {}  # name: (command, output_dir, the input that must stay byte-identical)
    policy = root / "evaluate_same" / "policy"
    shutil.copytree(tiny.sft_model, policy)
    cases[OVERLAPS[0]] = (("evaluate.py", evaluate_args(tiny, policy=policy)), policy, policy)
    model = root / "preference_same" / "sft"
    shutil.copytree(tiny.sft_model, model)
    cases[OVERLAPS[1]] = (("preference_model.py", preference_args(tiny, model=model)), model, model)
    cost = root / "ppo_same" / "cost"
    shutil.copytree(tiny.cost, cost)
    cases[OVERLAPS[2]] = (("ppo_lagrangian.py", ppo_args(tiny, cost_model=cost)), cost, cost)
    inner_policy = root / "evaluate_inside" / "policy"
    shutil.copytree(tiny.sft_model, inner_policy)
    cases[OVERLAPS[3]] = (
        ("evaluate.py", evaluate_args(tiny, policy=inner_policy)),
        inner_policy / "eval",
        inner_policy,
    )
    scores = root / "ppo_containing" / "scores"
    for objective in ("reward", "cost"):
        shutil.copytree(getattr(tiny, objective), scores / objective)
    cases[OVERLAPS[4]] = (
        ("ppo_lagrangian.py", ppo_args(tiny, reward_model=scores / "reward", cost_model=scores / "cost")),
        scores,
        scores,
    )
    data_dir = root / "sft_containing" / "data"
    data_dir.mkdir(parents=True)
    shutil.copy(tiny.sft, data_dir / "sft.jsonl")
    cases[OVERLAPS[5]] = (
        ("sft.py", sft_args(tiny, train_data=data_dir / "sft.jsonl") + ["--max_steps", 1]),
        data_dir,
        data_dir,
    )
    before = {name: snapshot(kept) for name, (_, _, kept) in cases.items()}
    results = run_all(
        {name: (script, args + ["--output_dir", output_dir]) for name, ((script, args), output_dir, _) in cases.items()}
    )
    return {name: (results[name], output_dir, kept, before[name]) for name, (_, output_dir, kept) in cases.items()}


@pytest.mark.parametrize("name", OVERLAPS)
def test_an_output_that_overlaps_an_input_is_refused_and_the_input_kept(overlapping, name):
    result, output_dir, kept, before = overlapping[name]
    changed = changes(before, snapshot(kept))
    assert not changed, f"the input {kept} was touched: {', '.join(changed[:6])}"
    assert_nothing_left(output_dir, before if output_dir == kept else None)
    assert_error_line(result, "--output_dir")


# ---- defect 3: a run with no step is refused, and the good output it would have replaced is kept ----
ZERO_STEPS = {
    "sft --epochs 0": ("sft.py", "--epochs"),
    "sft --max_steps 0": ("sft.py", "--max_steps"),
    "ppo --max_steps 0": ("ppo_lagrangian.py", "--max_steps"),
    "ppo --epochs 0": ("ppo_lagrangian.py", "--epochs"),
    "preference --epochs 0": ("preference_model.py", "--epochs"),
}


@pytest.fixture(scope="module")
def zero_step_runs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("zero_steps")
    common = {
        "sft.py": sft_args(tiny),
        "ppo_lagrangian.py": ppo_args(tiny),
        "preference_model.py": preference_args(tiny),
    }
    commands, outputs, before = {}, {}, {}
    for name, (script, flag) in ZERO_STEPS.items():
        outputs[name] = root / name.replace(" ", "_") / "out"
        before[name] = existing_output(outputs[name], tiny.sft_model, script)
        commands[name] = (script, common[script] + [flag, 0, "--output_dir", outputs[name]])
    return {name: (result, outputs[name], before[name]) for name, result in run_all(commands).items()}


@pytest.mark.parametrize("name", list(ZERO_STEPS))
def test_a_run_with_no_step_is_refused_and_the_old_output_kept(zero_step_runs, name):
    result, output_dir, before = zero_step_runs[name]
    assert_nothing_left(output_dir, before)
    assert_error_line(result, ZERO_STEPS[name][1])


# ---- defect 4: a trailing slash on --output_dir ----
@pytest.fixture(scope="module")
def slashed(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("slash")
    existing_output(root / "sft_existing" / "out", tiny.sft_model, "sft.py")
    existing_output(root / "ppo_existing" / "out", tiny.sft_model, "ppo_lagrangian.py")
    (root / "sft_new").mkdir()
    commands = {
        "sft, new output": (
            "sft.py",
            sft_args(tiny) + ["--max_steps", 1, "--output_dir", f"{root / 'sft_new' / 'out'}/"],
        ),
        "sft, existing output": (
            "sft.py",
            sft_args(tiny) + ["--max_steps", 1, "--output_dir", f"{root / 'sft_existing' / 'out'}/"],
        ),
        # intermediate saves go through their own directory beside (not inside) the output
        "ppo --save_steps 1, existing output": (
            "ppo_lagrangian.py",
            ppo_args(tiny) + ["--max_steps", 2, "--save_steps", 1, "--output_dir", f"{root / 'ppo_existing' / 'out'}/"],
        ),
    }
    outputs = {
        "sft, new output": root / "sft_new" / "out",
        "sft, existing output": root / "sft_existing" / "out",
        "ppo --save_steps 1, existing output": root / "ppo_existing" / "out",
    }
    return {name: (result, outputs[name]) for name, result in run_all(commands).items()}


@pytest.mark.parametrize("name", ["sft, new output", "sft, existing output", "ppo --save_steps 1, existing output"])
def test_a_trailing_slash_on_the_output_dir_works(slashed, name):
    result, output_dir = slashed[name]
    assert result.returncode == 0, report(result)
    assert (output_dir / "model.safetensors").is_file() and not (output_dir / "MARKER.txt").exists()
    hidden = [p.name for p in output_dir.iterdir() if p.name.startswith(".")]
    assert hidden == [], hidden  # no DIR/.partial, DIR/.old, DIR/.saving
    assert sorted(p.name for p in output_dir.parent.iterdir()) == ["out"]  # no DIR.partial, DIR.old


# ---- defect 5: each model is checked to be the kind it was given as ----
WRONG_KINDS = {
    "ppo: SFT model as --reward_model": "objective",
    "ppo: SFT model as --cost_model": "objective",
    "evaluate: SFT model as --reward_model": "objective",
    "evaluate: SFT model as --cost_model": "objective",
    "ppo: reward model as --actor_model": "reward model",
    "ppo: cost model as --reference_model": "cost model",
    "evaluate: reward model as a --policy": "reward model",
}


@pytest.fixture(scope="module")
def wrong_kind_runs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    commands = {
        "ppo: SFT model as --reward_model": ("ppo_lagrangian.py", ppo_args(tiny, reward_model=tiny.sft_model)),
        "ppo: SFT model as --cost_model": ("ppo_lagrangian.py", ppo_args(tiny, cost_model=tiny.sft_model)),
        "evaluate: SFT model as --reward_model": ("evaluate.py", evaluate_args(tiny, reward_model=tiny.sft_model)),
        "evaluate: SFT model as --cost_model": ("evaluate.py", evaluate_args(tiny, cost_model=tiny.sft_model)),
        "ppo: reward model as --actor_model": ("ppo_lagrangian.py", ppo_args(tiny, actor_model=tiny.reward)),
        "ppo: cost model as --reference_model": ("ppo_lagrangian.py", ppo_args(tiny, reference_model=tiny.cost)),
        "evaluate: reward model as a --policy": ("evaluate.py", evaluate_args(tiny, policy=tiny.reward)),
    }
    outputs = {}
    for i, (name, (_, args)) in enumerate(commands.items()):
        outputs[name] = root / str(i) / "out"
        outputs[name].parent.mkdir()
        args += ["--output_dir", outputs[name]]
    return {name: (result, outputs[name]) for name, result in run_all(commands).items()}


@pytest.mark.parametrize("name", list(WRONG_KINDS))
def test_a_model_of_the_wrong_kind_is_refused(wrong_kind_runs, name):
    result, output_dir = wrong_kind_runs[name]
    assert_nothing_left(output_dir, None)
    assert_error_line(result, WRONG_KINDS[name])


# ---- defect 6: an output path that is an existing file is refused at start-up ----
@pytest.fixture(scope="module")
def file_as_output_runs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("file_output")
    commands = {
        "sft.py": sft_args(tiny) + ["--max_steps", 1],
        "evaluate.py": evaluate_args(tiny),
    }  # a trainer, and the script that writes last
    outputs, before = {}, {}
    for script, args in commands.items():
        outputs[script] = root / script.removesuffix(".py") / "notes.txt"
        outputs[script].parent.mkdir()
        outputs[script].write_text("my notes, not a model\n")
        before[script] = snapshot(outputs[script])
        args += ["--output_dir", outputs[script]]
    return {
        script: (result, outputs[script], before[script])
        for script, result in run_all({s: (s, a) for s, a in commands.items()}).items()
    }


@pytest.mark.parametrize("script", ["sft.py", "evaluate.py"])
def test_an_output_path_that_is_a_file_is_refused(file_as_output_runs, script):
    result, output_file, before = file_as_output_runs[script]
    assert_nothing_left(output_file, before)  # the file unchanged, no notes.txt.old / notes.txt.partial
    assert_error_line(result, str(output_file))


# ---- defect 8: every argument's range is checked right after parsing, with the flag named ----
# (script module, flag, value); the ranges: counts >= 1, --max_steps/--max_prompts -1 or >= 1, rates > 0, ...
BAD_VALUES = [
    *[(m, "per_device_train_batch_size", "0") for m in (sft, preference_model, ppo_lagrangian)],
    (sft, "per_device_eval_batch_size", "0"),
    (ppo_lagrangian, "per_device_prompt_batch_size", "0"),
    (evaluate, "per_device_batch_size", "-8"),
    *[(m, "gradient_accumulation_steps", "0") for m in (sft, preference_model)],
    *[(m, "epochs", "-1") for m in (sft, preference_model, ppo_lagrangian)],
    *[(m, "epochs", "0") for m in (sft, preference_model, ppo_lagrangian)],
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
    assert re.match(rf"--{flag}(?![A-Za-z0-9_])", str(error.value)), str(error.value)


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


@pytest.fixture(scope="module")
def bad_argument_runs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_arguments")
    commands = {
        "sft --per_device_train_batch_size 0": ("sft.py", sft_args(tiny) + ["--per_device_train_batch_size", 0]),
        "ppo --lambda_init 0": ("ppo_lagrangian.py", ppo_args(tiny) + ["--lambda_init", 0, "--max_steps", 1]),
        "evaluate --per_device_batch_size -8": ("evaluate.py", evaluate_args(tiny) + ["--per_device_batch_size", -8]),
    }
    outputs, before = {}, {}
    for i, (name, (_, args)) in enumerate(commands.items()):
        outputs[name] = root / str(i) / "out"
        before[name] = (
            existing_output(outputs[name], tiny.sft_model, "ppo_lagrangian.py") if name.startswith("ppo") else None
        )
        outputs[name].parent.mkdir(exist_ok=True)
        args += ["--output_dir", outputs[name]]
    return {name: (result, outputs[name], before[name]) for name, result in run_all(commands).items()}


@pytest.mark.parametrize(
    "name", ["sft --per_device_train_batch_size 0", "ppo --lambda_init 0", "evaluate --per_device_batch_size -8"]
)
def test_a_bad_argument_gives_one_line_and_writes_nothing(bad_argument_runs, name):
    result, output_dir, before = bad_argument_runs[name]
    assert_nothing_left(output_dir, before)
    line = assert_error_line(result)
    assert re.match(rf"error: {name.split()[1]}(?![A-Za-z0-9_])", line), line


# ---- defects 9 and 10: bad data files and empty strings, with the file, row and field named ----
def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def bad_data_runs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_data")
    good_pair = json.loads(tiny.preference.read_text().splitlines()[0])
    files = {
        "invalid_utf8.jsonl": None,
        "corrupt.parquet": None,
        "alpaca_number.jsonl": [{"instruction": 123, "input": "and 4", "output": "127"}],
        "empty_prompt.jsonl": [
            {"prompt": "How do I bake bread?", "response": "Mix, knead and bake."},
            {"prompt": "", "response": "Hello."},
        ],
        "empty_response.jsonl": [
            {"prompt": "How do I bake bread?", "response": "Mix, knead and bake."},
            {"prompt": "Hi", "response": ""},
        ],
        "empty_response_0.jsonl": [good_pair, {**good_pair, "response_0": ""}],
        "empty_ppo_prompt.jsonl": [
            {"prompt": "How do I bake bread?"},
            {"prompt": ""},
            {"prompt": "How do I fix a bike?"},
        ],
        "empty_eval_prompt.jsonl": [
            {"prompt": "How do I bake bread?", "harmful": False},
            {"prompt": "", "harmful": True},
        ],
        "harmful_string.jsonl": [
            {"prompt": "How do I bake bread?", "harmful": "no"},
            {"prompt": "How do I pick a lock?", "harmful": "yes"},
        ],
    }
    for name, rows in files.items():
        if rows is not None:
            write_jsonl(root / name, rows)
    (root / "invalid_utf8.jsonl").write_bytes(
        b'{"prompt": "How do I bake bread?", "response": "Mix \xff\xfe and bake."}\n'
    )
    (root / "corrupt.parquet").write_bytes(bytes(range(256)) * 8)  # no parquet magic, no footer
    commands = {
        "invalid_utf8.jsonl": ("sft.py", sft_args(tiny, train_data=root / "invalid_utf8.jsonl")),
        "corrupt.parquet": ("sft.py", sft_args(tiny, train_data=root / "corrupt.parquet")),
        "alpaca_number.jsonl": (
            "sft.py",
            sft_args(tiny, train_data=root / "alpaca_number.jsonl") + ["--per_device_train_batch_size", 1],
        ),
        "empty_prompt.jsonl": (
            "sft.py",
            sft_args(tiny, train_data=root / "empty_prompt.jsonl") + ["--per_device_train_batch_size", 1],
        ),
        "empty_response.jsonl": (
            "sft.py",
            sft_args(tiny, train_data=root / "empty_response.jsonl") + ["--per_device_train_batch_size", 1],
        ),
        "empty_response_0.jsonl": (
            "preference_model.py",
            preference_args(tiny)
            + ["--train_data", root / "empty_response_0.jsonl", "--per_device_train_batch_size", 1, "--max_steps", 1],
        ),
        "empty_ppo_prompt.jsonl": (
            "ppo_lagrangian.py",
            ppo_args(tiny)
            + [
                "--prompt_data",
                root / "empty_ppo_prompt.jsonl",
                "--max_steps",
                1,
                "--per_device_prompt_batch_size",
                1,
                "--per_device_train_batch_size",
                1,
            ],
        ),
        "empty_eval_prompt.jsonl": (
            "evaluate.py",
            evaluate_args(tiny) + ["--prompt_data", root / "empty_eval_prompt.jsonl"],
        ),
        "harmful_string.jsonl": ("evaluate.py", evaluate_args(tiny) + ["--prompt_data", root / "harmful_string.jsonl"]),
    }
    outputs = {}
    for name, (_, args) in commands.items():
        outputs[name] = root / f"out_{name.replace('.', '_')}"
        args += ["--output_dir", outputs[name]]
    return {name: (result, outputs[name]) for name, result in run_all(commands).items()}


BAD_DATA = {
    "invalid_utf8.jsonl": [],
    "corrupt.parquet": [],
    "alpaca_number.jsonl": ["row 1", "'instruction'"],
    "empty_prompt.jsonl": ["row 2", "'prompt'"],
    "empty_response.jsonl": ["row 2", "'response'"],
    "empty_response_0.jsonl": ["row 2", "'response_0'"],
    "empty_ppo_prompt.jsonl": ["row 2", "'prompt'"],
    "empty_eval_prompt.jsonl": ["row 2", "'prompt'"],
    "harmful_string.jsonl": ["row 1", "'harmful'"],
}


@pytest.mark.parametrize("file", list(BAD_DATA))
def test_a_bad_data_file_is_named_in_one_line(bad_data_runs, file):
    result, output_dir = bad_data_runs[file]
    assert_error_line(result, file, *BAD_DATA[file])
    assert_nothing_left(output_dir, None)


# ---- defect 11 ----
@pytest.fixture(scope="module")
def smaller_runs(tiny, tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("smaller")
    (root / "empty_model").mkdir()
    # an interrupted final swap: the earlier output was renamed to DIR.old, the new one never renamed into place
    existing_output(root / "swap" / "out.old", tiny.sft_model, "sft.py")
    # a tokenizer with a pad token of its own, one more token than the config's embedding matrix has rows
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    tokenizer.add_special_tokens({"pad_token": "<|extra_pad|>"})
    tokenizer.save_pretrained(root / "long_tokenizer")
    shutil.copy(TINY_LLAMA / "config.json", root / "long_tokenizer" / "config.json")
    commands = {
        "sft: empty model directory": (
            "sft.py",
            ["--model_name_or_path", root / "empty_model", "--train_data", tiny.sft, "--max_steps", 1, *SFT_FAST],
        ),
        "ppo: empty model directory": (
            "ppo_lagrangian.py",
            ppo_args(tiny, actor_model=root / "empty_model") + ["--max_steps", 1],
        ),
        "torchrun": ("sft.py", sft_args(tiny) + ["--per_device_train_batch_size", 0], 2),
        "swap": ("sft.py", sft_args(tiny) + ["--max_steps", 1, "--seed", 7]),
        "long tokenizer": (
            "sft.py",
            sft_args(tiny) + ["--model_name_or_path", root / "long_tokenizer", "--max_steps", 2],
        ),
    }
    outputs = {
        "sft: empty model directory": root / "empty_sft" / "out",
        "ppo: empty model directory": root / "empty_ppo" / "out",
        "torchrun": root / "torchrun" / "out",
        "swap": root / "swap" / "out",
        "long tokenizer": root / "long" / "out",
    }
    for name, command in commands.items():
        outputs[name].parent.mkdir(exist_ok=True)
        command[1].extend(["--output_dir", outputs[name]])
    return {name: (result, outputs[name], root) for name, result in run_all(commands).items()}


@pytest.mark.parametrize("name", ["sft: empty model directory", "ppo: empty model directory"])
def test_an_empty_model_directory_gives_one_line_naming_it(smaller_runs, name):
    result, output_dir, root = smaller_runs[name]
    assert_error_line(result, str(root / "empty_model"))
    assert_nothing_left(output_dir, None)


def test_under_torchrun_a_bad_argument_is_reported_once(smaller_runs):
    result, output_dir, _ = smaller_runs["torchrun"]
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and len(errors) == 1, report(result)
    assert errors[0].startswith("error: --per_device_train_batch_size"), errors
    assert_nothing_left(output_dir, None)


def test_a_run_after_an_interrupted_final_swap_completes(smaller_runs):
    # DIR.old (the earlier output) and no DIR: the run restores or replaces it, and never leaves DIR missing
    result, output_dir, _ = smaller_runs["swap"]
    assert result.returncode == 0, report(result)
    assert (output_dir / "model.safetensors").is_file() and json.loads((output_dir / "args.json").read_text())[
        "seed"
    ] == 7
    assert not (output_dir / "MARKER.txt").exists()
    assert sorted(p.name for p in output_dir.parent.iterdir()) == ["out"]  # no out.old, no out.partial


def test_a_tokenizer_longer_than_the_embedding_matrix_gets_its_rows(smaller_runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, output_dir, _ = smaller_runs["long tokenizer"]
    assert result.returncode == 0, report(result)
    rows = AutoModelForCausalLM.from_pretrained(output_dir).get_input_embeddings().weight.shape[0]
    assert rows == len(AutoTokenizer.from_pretrained(output_dir)) == 2049


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions, so a read-only parent cannot be made")
def test_an_unwritable_output_parent_is_refused_at_start_up(tiny, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        results = run_all(
            {
                "sft.py": ("sft.py", sft_args(tiny) + ["--max_steps", 1, "--output_dir", locked / "out"]),
                "evaluate.py": ("evaluate.py", evaluate_args(tiny) + ["--output_dir", locked / "out"]),
            }
        )
        for result in results.values():
            assert_error_line(result, str(locked))
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)
