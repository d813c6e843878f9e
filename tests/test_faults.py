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
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import evaluate
import ppo_lagrangian
import preference_model
import sft
from helpers import REPO, TINY_LLAMA, TOY

# tiny models gain nothing from threads, and four concurrent runs on two cores must not fight over them
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
SFT_FAST = ["--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 1, "--max_length", 128,
            "--no_gradient_checkpointing", "--no_bf16"]
PREFERENCE_FAST = ["--per_device_train_batch_size", 4, "--max_length", 128, "--no_gradient_checkpointing", "--no_bf16"]
PPO_FAST = ["--per_device_prompt_batch_size", 4, "--per_device_train_batch_size", 4, "--max_new_tokens", 8,
            "--max_length", 64, "--no_gradient_checkpointing", "--no_bf16"]
EVALUATE_FAST = ["--max_prompts", 4, "--max_new_tokens", 8, "--max_length", 64, "--greedy", "--elo_rounds", 0, "--no_bf16"]


# ---- running the scripts ----
def run_all(commands, parallel=4):
    """{name: (script, args) or (script, args, nproc)} -> {name: CompletedProcess}, `parallel` at a time."""
    def run(command):
        script, args, nproc = (*command, 1)[:3]
        launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        return subprocess.run(launcher + [script, *map(str, args)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    with ThreadPoolExecutor(parallel) as pool:
        return dict(zip(commands, pool.map(run, commands.values())))


def report(result):
    last = (result.stderr.strip().splitlines() or [""])[-1]
    return (f"exit status {result.returncode}, last line of stderr {last[:300]!r}\n--- stdout (end) ---\n{result.stdout[-1500:]}\n"
            f"--- stderr (end) ---\n{result.stderr[-3000:]}")


def assert_error_line(result, *expected):
    """Exit status 1 and one line for the user, the last of stderr: 'error: ...' containing every EXPECTED text."""
    lines = result.stderr.strip().splitlines()  # (tqdm's \r-separated updates count as lines: the error must come last)
    assert result.returncode == 1, f"exit status {result.returncode}, not 1\n{report(result)}"
    if "Traceback" in result.stderr:
        raise AssertionError(f"a Traceback, ending {[line for line in lines if line.strip()][-1][:300]!r}\n{report(result)}")
    assert lines and lines[-1].startswith("error: "), f"the last line of stderr is {lines[-1][:300] if lines else ''!r}\n{report(result)}"
    for text in expected:
        assert text in lines[-1], f"{text!r} is not in the error line {lines[-1]!r}"
    return lines[-1]


def snapshot(path):
    """Every file's bytes (and every directory) under PATH, or a file's bytes; None when PATH does not exist."""
    path = Path(path)
    if path.is_file():
        return {".": path.read_bytes()}
    if not path.exists():
        return None
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else "<dir>" for p in sorted(path.rglob("*"))}


def changes(before, after):
    """What differs between two snapshots, as a short list (the bytes themselves would swamp the message)."""
    if before is None or after is None:
        return [] if before is after else [f"{'created' if before is None else 'removed'}"]
    return sorted([f"removed {k}" for k in before.keys() - after.keys()] + [f"added {k}" for k in after.keys() - before.keys()]
                  + [f"changed {k}" for k in before.keys() & after.keys() if before[k] != after[k]])


def assert_nothing_left(output_dir, before, may_leave_partial=False):
    """OUTPUT_DIR is as it was (absent, or byte-identical) and no OUTPUT_DIR.partial / .old / .saving sits beside it."""
    output_dir = Path(output_dir)
    changed = changes(before, snapshot(output_dir))
    assert not changed, f"{output_dir} was {'touched' if before else 'created'}: {', '.join(changed[:6])}"
    leftovers = {p.name for p in output_dir.parent.iterdir() if p.name.startswith(output_dir.name + ".")}
    assert leftovers <= ({output_dir.name + ".partial"} if may_leave_partial else set()), f"left behind: {sorted(leftovers)}"


def existing_output(path, source, marker="a good output of an earlier run"):
    """A finished output of an earlier run at PATH (a copy of SOURCE, with a marker file); returns its snapshot."""
    shutil.copytree(source, path)
    (Path(path) / "MARKER.txt").write_text(marker)
    return snapshot(path)


def non_finite_tensors(directory):
    """Names of the tensors holding NaN or inf in the model files under DIRECTORY: safetensors, torch.save files and
    torch.distributed.checkpoint states (a directory with a .metadata file). Optimiser moments are left out: a state's
    weights, critics and λ must be finite, Adam's second moment of a huge but finite gradient may overflow."""
    import tempfile
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    def tensors(tree, prefix):
        if isinstance(tree, torch.Tensor):
            yield prefix, tree
        elif isinstance(tree, dict):
            for key, value in tree.items():
                if "optim" not in str(key):
                    yield from tensors(value, f"{prefix}/{key}")
        elif isinstance(tree, (list, tuple)):
            for i, value in enumerate(tree):
                yield from tensors(value, f"{prefix}/{i}")

    bad, directory = [], Path(directory)
    if not directory.exists():
        return bad
    for path in sorted(directory.rglob("*")):
        if path.suffix == ".safetensors":
            contents = load_file(path)
        elif path.suffix in (".bin", ".pt", ".pth"):
            contents = torch.load(path, map_location="cpu", weights_only=False)
        elif path.name == ".metadata":  # a distributed checkpoint: read it back as one torch.save file
            with tempfile.TemporaryDirectory() as scratch:
                dcp_to_torch_save(path.parent, Path(scratch) / "state.pt")
                contents = torch.load(Path(scratch) / "state.pt", map_location="cpu", weights_only=False)
        else:
            continue
        bad += [f"{path.relative_to(directory)}:{name}" for name, t in tensors(contents, "") if t.is_floating_point() and not torch.isfinite(t).all()]
    return bad


# ---- tiny stand-ins for the earlier stages' outputs, built in this process (no training: seconds, not minutes) ----
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An SFT checkpoint (the tiny Llama from its config, untrained), a reward and a cost model on it (a new score head,
    `objective` in the config, as preference_model.py saves them), a cost model whose scores are all NaN, and the first
    rows of the toy world's data files."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    root = tmp_path_factory.mktemp("tiny")
    data = {"sft": ("sft.jsonl", 64), "preference": ("preference_train.jsonl", 64), "preference_eval": ("preference_test.jsonl", 16),
            "prompts": ("prompts.jsonl", 32), "eval_prompts": ("eval_prompts.jsonl", 16)}
    paths = {}
    for name, (file, rows) in data.items():
        paths[name] = root / file
        paths[name].write_text("".join((TOY / file).read_text().splitlines(keepends=True)[:rows]))
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    paths["sft_model"] = root / "sft"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_LLAMA)).save_pretrained(paths["sft_model"])
    tokenizer.save_pretrained(paths["sft_model"])
    for objective in ("reward", "cost", "nan_cost"):
        score_model = AutoModelForSequenceClassification.from_pretrained(paths["sft_model"], num_labels=1)
        score_model.config.objective = objective.removeprefix("nan_")
        if objective == "nan_cost":
            with torch.no_grad():
                score_model.score.weight.fill_(float("nan"))
        paths[objective] = root / objective
        score_model.save_pretrained(paths[objective])
        tokenizer.save_pretrained(paths[objective])
    return SimpleNamespace(**paths)


def ppo_args(tiny, **models):
    """ppo_lagrangian.py on the tiny models (MODELS overrides actor_model, reward_model, cost_model)."""
    chosen = {"actor_model": tiny.sft_model, "reward_model": tiny.reward, "cost_model": tiny.cost, **models}
    return [arg for name, path in chosen.items() for arg in (f"--{name}", path)] + ["--prompt_data", tiny.prompts, *PPO_FAST]


def evaluate_args(tiny, policy=None, **models):
    chosen = {"reward_model": tiny.reward, "cost_model": tiny.cost, **models}
    return (["--policy", f"sft={policy or tiny.sft_model}", "--prompt_data", tiny.eval_prompts, *EVALUATE_FAST]
            + [arg for name, path in chosen.items() for arg in (f"--{name}", path)])


def sft_args(tiny, train_data=None):
    return ["--model_name_or_path", TINY_LLAMA, "--from_scratch", "--train_data", train_data or tiny.sft, *SFT_FAST]


def preference_args(tiny, model=None, objective="reward"):
    return ["--objective", objective, "--model_name_or_path", model or tiny.sft_model, "--train_data", tiny.preference,
            "--eval_data", tiny.preference_eval, *PREFERENCE_FAST]


# ---- defect 1: a run that diverges stops, says so, and keeps the last good state; evaluate refuses NaN scores ----
DIVERGING = ["sft", "preference", "ppo", "ppo saving every rollout"]


@pytest.fixture(scope="module")
def diverged(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("diverged")
    # lr 1e6 without warm-up: SFT's weights are all NaN after step 2, the cost model's loss NaN at step 3, PPO's losses NaN at rollout 3
    commands = {
        "sft": ("sft.py", sft_args(tiny) + ["--lr", 1e6, "--lr_warmup_ratio", 0, "--max_steps", 2]),
        "preference": ("preference_model.py", preference_args(tiny, objective="cost") + ["--lr", 1e6, "--lr_warmup_ratio", 0, "--max_steps", 3]),
        "ppo": ("ppo_lagrangian.py", ppo_args(tiny) + ["--actor_lr", 1e6, "--critic_lr", 1e6, "--max_steps", 3]),
        "ppo saving every rollout": ("ppo_lagrangian.py", ppo_args(tiny) + ["--actor_lr", 1e6, "--critic_lr", 1e6, "--max_steps", 3,
                                                                             "--save_steps", 1, "--save_critics"]),
    }
    outputs, before = {}, {}
    for name, (script, args) in commands.items():
        outputs[name] = root / name.replace(" ", "_") / "out"
        before[name] = existing_output(outputs[name], tiny.cost if name == "preference" else tiny.sft_model)
        args += ["--output_dir", outputs[name]]
    outputs["evaluate"], before["evaluate"] = root / "evaluate" / "out", None
    outputs["evaluate"].parent.mkdir()
    commands["evaluate"] = ("evaluate.py", evaluate_args(tiny, cost_model=tiny.nan_cost) + ["--output_dir", outputs["evaluate"]])
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
OVERLAPS = ["evaluate: output is the policy", "preference: output is the SFT model", "ppo: output is the cost model",
            "evaluate: output inside the policy", "ppo: output contains the score models", "sft: output contains the training data"]


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
    cases[OVERLAPS[3]] = (("evaluate.py", evaluate_args(tiny, policy=inner_policy)), inner_policy / "eval", inner_policy)
    scores = root / "ppo_containing" / "scores"
    for objective in ("reward", "cost"):
        shutil.copytree(getattr(tiny, objective), scores / objective)
    cases[OVERLAPS[4]] = (("ppo_lagrangian.py", ppo_args(tiny, reward_model=scores / "reward", cost_model=scores / "cost")), scores, scores)
    data_dir = root / "sft_containing" / "data"
    data_dir.mkdir(parents=True)
    shutil.copy(tiny.sft, data_dir / "sft.jsonl")
    cases[OVERLAPS[5]] = (("sft.py", sft_args(tiny, train_data=data_dir / "sft.jsonl") + ["--max_steps", 1]), data_dir, data_dir)
    before = {name: snapshot(kept) for name, (_, _, kept) in cases.items()}
    results = run_all({name: (script, args + ["--output_dir", output_dir]) for name, ((script, args), output_dir, _) in cases.items()})
    return {name: (results[name], output_dir, kept, before[name]) for name, (_, output_dir, kept) in cases.items()}


@pytest.mark.parametrize("name", OVERLAPS)
def test_an_output_that_overlaps_an_input_is_refused_and_the_input_kept(overlapping, name):
    result, output_dir, kept, before = overlapping[name]
    changed = changes(before, snapshot(kept))
    assert not changed, f"the input {kept} was touched: {', '.join(changed[:6])}"
    assert_nothing_left(output_dir, before if output_dir == kept else None)
    assert_error_line(result, "--output_dir")


# ---- defect 3: a run with no step is refused, and the good output it would have replaced is kept ----
ZERO_STEPS = {"sft --epochs 0": ("sft.py", "--epochs"), "sft --max_steps 0": ("sft.py", "--max_steps"),
              "ppo --max_steps 0": ("ppo_lagrangian.py", "--max_steps"), "ppo --epochs 0": ("ppo_lagrangian.py", "--epochs"),
              "preference --epochs 0": ("preference_model.py", "--epochs")}


@pytest.fixture(scope="module")
def zero_step_runs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("zero_steps")
    common = {"sft.py": sft_args(tiny), "ppo_lagrangian.py": ppo_args(tiny), "preference_model.py": preference_args(tiny)}
    commands, outputs, before = {}, {}, {}
    for name, (script, flag) in ZERO_STEPS.items():
        outputs[name] = root / name.replace(" ", "_") / "out"
        before[name] = existing_output(outputs[name], tiny.sft_model)
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
    existing_output(root / "sft_existing" / "out", tiny.sft_model)
    existing_output(root / "ppo_existing" / "out", tiny.sft_model)
    (root / "sft_new").mkdir()
    commands = {
        "sft, new output": ("sft.py", sft_args(tiny) + ["--max_steps", 1, "--output_dir", f"{root / 'sft_new' / 'out'}/"]),
        "sft, existing output": ("sft.py", sft_args(tiny) + ["--max_steps", 1, "--output_dir", f"{root / 'sft_existing' / 'out'}/"]),
        # intermediate saves go through their own directory beside (not inside) the output
        "ppo --save_steps 1, existing output": ("ppo_lagrangian.py", ppo_args(tiny) + ["--max_steps", 2, "--save_steps", 1, "--output_dir",
                                                                                     f"{root / 'ppo_existing' / 'out'}/"]),
    }
    outputs = {"sft, new output": root / "sft_new" / "out", "sft, existing output": root / "sft_existing" / "out",
               "ppo --save_steps 1, existing output": root / "ppo_existing" / "out"}
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
WRONG_KINDS = {"ppo: SFT model as --reward_model": "objective", "ppo: SFT model as --cost_model": "objective",
               "evaluate: SFT model as --reward_model": "objective", "evaluate: SFT model as --cost_model": "objective",
               "ppo: reward model as --actor_model": "reward model", "evaluate: reward model as a --policy": "reward model"}


@pytest.fixture(scope="module")
def wrong_kind_runs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    commands = {
        "ppo: SFT model as --reward_model": ("ppo_lagrangian.py", ppo_args(tiny, reward_model=tiny.sft_model)),
        "ppo: SFT model as --cost_model": ("ppo_lagrangian.py", ppo_args(tiny, cost_model=tiny.sft_model)),
        "evaluate: SFT model as --reward_model": ("evaluate.py", evaluate_args(tiny, reward_model=tiny.sft_model)),
        "evaluate: SFT model as --cost_model": ("evaluate.py", evaluate_args(tiny, cost_model=tiny.sft_model)),
        "ppo: reward model as --actor_model": ("ppo_lagrangian.py", ppo_args(tiny, actor_model=tiny.reward)),
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
    commands = {"sft.py": sft_args(tiny) + ["--max_steps", 1], "evaluate.py": evaluate_args(tiny)}  # a trainer, and the script that writes last
    outputs, before = {}, {}
    for script, args in commands.items():
        outputs[script] = root / script.removesuffix(".py") / "notes.txt"
        outputs[script].parent.mkdir()
        outputs[script].write_text("my notes, not a model\n")
        before[script] = snapshot(outputs[script])
        args += ["--output_dir", outputs[script]]
    return {script: (result, outputs[script], before[script]) for script, result in run_all({s: (s, a) for s, a in commands.items()}).items()}


@pytest.mark.parametrize("script", ["sft.py", "evaluate.py"])
def test_an_output_path_that_is_a_file_is_refused(file_as_output_runs, script):
    result, output_file, before = file_as_output_runs[script]
    assert_nothing_left(output_file, before)  # the file unchanged, no notes.txt.old / notes.txt.partial
    assert_error_line(result, str(output_file))


# ---- defect 8: every argument's range is checked right after parsing, with the flag named ----
BAD_VALUES = [  # (script module, flag, value); the ranges: counts >= 1, --max_steps/--max_prompts -1 or >= 1, rates > 0, ...
    *[(m, "per_device_train_batch_size", "0") for m in (sft, preference_model, ppo_lagrangian)],
    (sft, "per_device_eval_batch_size", "0"), (ppo_lagrangian, "per_device_prompt_batch_size", "0"),
    (evaluate, "per_device_batch_size", "-8"),
    *[(m, "gradient_accumulation_steps", "0") for m in (sft, preference_model)],
    *[(m, "epochs", "-1") for m in (sft, preference_model, ppo_lagrangian)],
    *[(m, "epochs", "0") for m in (sft, preference_model, ppo_lagrangian)],
    *[(m, "max_steps", "0") for m in (sft, preference_model, ppo_lagrangian)], (sft, "max_steps", "-2"),
    *[(m, "lr", v) for m in (sft, preference_model) for v in ("-1", "0")],
    (ppo_lagrangian, "actor_lr", "0"), (ppo_lagrangian, "critic_lr", "-1"),
    (ppo_lagrangian, "lambda_init", "0"), (ppo_lagrangian, "lambda_lr", "-0.1"), (ppo_lagrangian, "lambda_max", "0"),
    (ppo_lagrangian, "episode_cost_window_size", "0"),
    *[(m, "temperature", "0") for m in (ppo_lagrangian, evaluate)],
    *[(m, "top_p", v) for m in (ppo_lagrangian, evaluate) for v in ("0", "1.5")],
    *[(m, "max_length", "0") for m in (sft, preference_model, ppo_lagrangian, evaluate)],
    *[(m, "max_new_tokens", "0") for m in (ppo_lagrangian, evaluate)],
    (ppo_lagrangian, "update_iters", "0"), (ppo_lagrangian, "clip_range_ratio", "0"), (ppo_lagrangian, "clip_range_value", "0"),
    (ppo_lagrangian, "kl_coeff", "-1"), (ppo_lagrangian, "gamma", "1.5"), (ppo_lagrangian, "gae_lambda", "-0.1"),
    (ppo_lagrangian, "ptx_coeff", "-1"),
    *[(m, "lr_warmup_ratio", "1.5") for m in (sft, preference_model)], (ppo_lagrangian, "actor_lr_warmup_ratio", "-0.5"),
    *[(m, "max_grad_norm", "-1") for m in (sft, preference_model, ppo_lagrangian)],
    *[(m, "weight_decay", "-1") for m in (sft, preference_model)], (ppo_lagrangian, "actor_weight_decay", "-1"),
    (preference_model, "regularization", "-1"),
    (evaluate, "max_prompts", "0"), (evaluate, "elo_rounds", "-1"), (evaluate, "elo_k", "0"),
]


# a complete command line otherwise (evaluate.py has nothing to do without a policy and its judges)
VALID = {sft: [], preference_model: [], ppo_lagrangian: [],
         evaluate: ["--policy", "sft=output/sft", "--reward_model", "output/reward", "--cost_model", "output/cost"]}


@pytest.mark.parametrize("module, flag, value", BAD_VALUES, ids=[f"{m.__name__} --{f} {v}" for m, f, v in BAD_VALUES])
def test_an_argument_out_of_range_is_refused_naming_the_flag(module, flag, value, monkeypatch):
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *VALID[module], f"--{flag}", value])
    with pytest.raises(module.InputError) as error:
        module.parse_args(module.Args)
    assert re.match(rf"--{flag}(?![A-Za-z0-9_])", str(error.value)), str(error.value)


EDGE_VALUES = {  # the ends of the ranges that are allowed
    sft: ["--max_steps", "-1", "--lr_warmup_ratio", "0", "--max_grad_norm", "0", "--weight_decay", "0", "--epochs", "1"],
    preference_model: ["--lr_warmup_ratio", "1", "--regularization", "0", "--max_steps", "1"],
    ppo_lagrangian: ["--lambda_lr", "0", "--gamma", "1", "--gae_lambda", "0", "--top_p", "1", "--kl_coeff", "0", "--ptx_coeff", "0",
                     "--max_steps", "1", "--actor_lr_warmup_ratio", "1", "--critic_lr_warmup_ratio", "0", "--max_grad_norm", "0"],
    evaluate: ["--max_prompts", "-1", "--elo_rounds", "0", "--top_p", "1", "--per_device_batch_size", "1"],
}


@pytest.mark.parametrize("module", list(EDGE_VALUES), ids=lambda m: m.__name__)
def test_the_ends_of_the_allowed_ranges_are_accepted(module, monkeypatch):
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *VALID[module], *EDGE_VALUES[module]])
    module.parse_args(module.Args)


@pytest.fixture(scope="module")
def bad_argument_runs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_arguments")
    commands = {"sft --per_device_train_batch_size 0": ("sft.py", sft_args(tiny) + ["--per_device_train_batch_size", 0]),
                "ppo --lambda_init 0": ("ppo_lagrangian.py", ppo_args(tiny) + ["--lambda_init", 0, "--max_steps", 1]),
                "evaluate --per_device_batch_size -8": ("evaluate.py", evaluate_args(tiny) + ["--per_device_batch_size", -8])}
    outputs, before = {}, {}
    for i, (name, (_, args)) in enumerate(commands.items()):
        outputs[name] = root / str(i) / "out"
        before[name] = existing_output(outputs[name], tiny.sft_model) if name.startswith("ppo") else None
        outputs[name].parent.mkdir(exist_ok=True)
        args += ["--output_dir", outputs[name]]
    return {name: (result, outputs[name], before[name]) for name, result in run_all(commands).items()}


@pytest.mark.parametrize("name", ["sft --per_device_train_batch_size 0", "ppo --lambda_init 0", "evaluate --per_device_batch_size -8"])
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
        "invalid_utf8.jsonl": None, "corrupt.parquet": None,
        "alpaca_number.jsonl": [{"instruction": 123, "input": "and 4", "output": "127"}],
        "empty_prompt.jsonl": [{"prompt": "How do I bake bread?", "response": "Mix, knead and bake."}, {"prompt": "", "response": "Hello."}],
        "empty_response.jsonl": [{"prompt": "How do I bake bread?", "response": "Mix, knead and bake."}, {"prompt": "Hi", "response": ""}],
        "empty_response_0.jsonl": [good_pair, {**good_pair, "response_0": ""}],
        "empty_ppo_prompt.jsonl": [{"prompt": "How do I bake bread?"}, {"prompt": ""}, {"prompt": "How do I fix a bike?"}],
        "empty_eval_prompt.jsonl": [{"prompt": "How do I bake bread?", "harmful": False}, {"prompt": "", "harmful": True}],
        "harmful_string.jsonl": [{"prompt": "How do I bake bread?", "harmful": "no"}, {"prompt": "How do I pick a lock?", "harmful": "yes"}],
    }
    for name, rows in files.items():
        if rows is not None:
            write_jsonl(root / name, rows)
    (root / "invalid_utf8.jsonl").write_bytes(b'{"prompt": "How do I bake bread?", "response": "Mix \xff\xfe and bake."}\n')
    (root / "corrupt.parquet").write_bytes(bytes(range(256)) * 8)  # no parquet magic, no footer
    commands = {
        "invalid_utf8.jsonl": ("sft.py", sft_args(tiny, train_data=root / "invalid_utf8.jsonl")),
        "corrupt.parquet": ("sft.py", sft_args(tiny, train_data=root / "corrupt.parquet")),
        "alpaca_number.jsonl": ("sft.py", sft_args(tiny, train_data=root / "alpaca_number.jsonl") + ["--per_device_train_batch_size", 1]),
        "empty_prompt.jsonl": ("sft.py", sft_args(tiny, train_data=root / "empty_prompt.jsonl") + ["--per_device_train_batch_size", 1]),
        "empty_response.jsonl": ("sft.py", sft_args(tiny, train_data=root / "empty_response.jsonl") + ["--per_device_train_batch_size", 1]),
        "empty_response_0.jsonl": ("preference_model.py", preference_args(tiny) + ["--train_data", root / "empty_response_0.jsonl",
                                                                                  "--per_device_train_batch_size", 1, "--max_steps", 1]),
        "empty_ppo_prompt.jsonl": ("ppo_lagrangian.py", ppo_args(tiny) + ["--prompt_data", root / "empty_ppo_prompt.jsonl", "--max_steps", 1,
                                                                          "--per_device_prompt_batch_size", 1, "--per_device_train_batch_size", 1]),
        "empty_eval_prompt.jsonl": ("evaluate.py", evaluate_args(tiny) + ["--prompt_data", root / "empty_eval_prompt.jsonl"]),
        "harmful_string.jsonl": ("evaluate.py", evaluate_args(tiny) + ["--prompt_data", root / "harmful_string.jsonl"]),
    }
    outputs = {}
    for name, (_, args) in commands.items():
        outputs[name] = root / f"out_{name.replace('.', '_')}"
        args += ["--output_dir", outputs[name]]
    return {name: (result, outputs[name]) for name, result in run_all(commands).items()}


BAD_DATA = {"invalid_utf8.jsonl": [], "corrupt.parquet": [], "alpaca_number.jsonl": ["row 1", "'instruction'"],
            "empty_prompt.jsonl": ["row 2", "'prompt'"], "empty_response.jsonl": ["row 2", "'response'"],
            "empty_response_0.jsonl": ["row 2", "'response_0'"], "empty_ppo_prompt.jsonl": ["row 2", "'prompt'"],
            "empty_eval_prompt.jsonl": ["row 2", "'prompt'"], "harmful_string.jsonl": ["row 1", "'harmful'"]}


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
    existing_output(root / "swap" / "out.old", tiny.sft_model)
    # a tokenizer with a pad token of its own, one more token than the config's embedding matrix has rows
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    tokenizer.add_special_tokens({"pad_token": "<|extra_pad|>"})
    tokenizer.save_pretrained(root / "long_tokenizer")
    shutil.copy(TINY_LLAMA / "config.json", root / "long_tokenizer" / "config.json")
    commands = {
        "sft: empty model directory": ("sft.py", ["--model_name_or_path", root / "empty_model", "--train_data", tiny.sft, "--max_steps", 1, *SFT_FAST]),
        "ppo: empty model directory": ("ppo_lagrangian.py", ppo_args(tiny, actor_model=root / "empty_model") + ["--max_steps", 1]),
        "torchrun": ("sft.py", sft_args(tiny) + ["--per_device_train_batch_size", 0], 2),
        "swap": ("sft.py", sft_args(tiny) + ["--max_steps", 1, "--seed", 7]),
        "long tokenizer": ("sft.py", sft_args(tiny) + ["--model_name_or_path", root / "long_tokenizer", "--max_steps", 2]),
    }
    outputs = {"sft: empty model directory": root / "empty_sft" / "out", "ppo: empty model directory": root / "empty_ppo" / "out",
               "torchrun": root / "torchrun" / "out", "swap": root / "swap" / "out", "long tokenizer": root / "long" / "out"}
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
    assert (output_dir / "model.safetensors").is_file() and json.loads((output_dir / "args.json").read_text())["seed"] == 7
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
        results = run_all({"sft.py": ("sft.py", sft_args(tiny) + ["--max_steps", 1, "--output_dir", locked / "out"]),
                           "evaluate.py": ("evaluate.py", evaluate_args(tiny) + ["--output_dir", locked / "out"])})
        for result in results.values():
            assert_error_line(result, str(locked))
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)
