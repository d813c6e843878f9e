"""A run touches only what is its own (issue 19): an output directory it did not make is refused (or replaced only
with --overwrite_output_dir), a bad output path is refused at start, a second run into the same output is refused by
the first run's lock (a killed run's lock dies with it), Ctrl-C ends with one line and leaves the output as it was, and
a resume continues the same run or refuses: changed training arguments, a rerun over saved states without --resume,
and cut-short states are all named in one line (the older state is used when the newest cannot be read).

The models are tiny and untrained; the runs of a group start as concurrent subprocesses."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import (
    ENV,
    REPO,
    assert_error_line,
    evaluate_args,
    existing_output,
    kill_after_second_state,
    ppo_args,
    preference_args,
    report,
    run_all,
    sft_args,
    snapshot,
)


def foreign_directory(path):
    """A directory a user made: notes and a folder of their own. Returns its snapshot."""
    (path / "old").mkdir(parents=True)
    (path / "NOTES.txt").write_text("my notes\n")
    (path / "old" / "result.txt").write_text("an earlier result\n")
    return snapshot(path)


# ---- an output directory is the script's only if the script made it ----
@pytest.fixture(scope="module")
def ownership_runs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("ownership")
    commands, outputs, before = {}, {}, {}
    one_step = {"sft.py": sft_args(tiny) + ["--max_steps", 1],
                "preference_model.py": preference_args(tiny) + ["--max_steps", 1],
                "ppo_lagrangian.py": ppo_args(tiny) + ["--max_steps", 1],
                "evaluate.py": evaluate_args(tiny)}  # fmt: skip
    for script, args in one_step.items():  # a directory of the user's, for each script
        outputs[script] = root / script / "D"
        before[script] = foreign_directory(outputs[script])
        commands[script] = (script, args + ["--output_dir", outputs[script]])
    cases = {  # name: (script, output dir, its content before, extra flags)
        "sft --overwrite_output_dir": ("sft.py", root / "overwrite" / "D", foreign_directory(root / "overwrite" / "D")),
        "preference over an sft output": (
            "preference_model.py",
            root / "other" / "D",
            existing_output(root / "other" / "D", tiny.sft_model, "sft.py"),
        ),
        "sft into an empty directory": ("sft.py", root / "empty" / "D", None),
        "sft over its own finished output": (
            "sft.py",
            root / "own" / "D",
            existing_output(root / "own" / "D", tiny.sft_model, "sft.py"),
        ),
    }
    (root / "empty" / "D").mkdir(parents=True)
    for name, (script, output, content) in cases.items():
        extra = ["--overwrite_output_dir"] if "overwrite" in name else []
        commands[name], outputs[name], before[name] = (
            (script, one_step[script] + extra + ["--output_dir", output]),
            output,
            content,
        )
    # bad output paths, refused at start by evaluate.py (which used to find out at the very end): under a file, the
    # current directory and its parent (run from a scratch directory, so that nothing of ours is near)
    (root / "afile").write_text("a file\n")
    (root / "scratch" / "cwd").mkdir(parents=True)
    for name, path in (
        ("parent is a file", root / "afile" / "sub"),
        ("the current directory", "."),
        ("its parent", ".."),
    ):
        commands[name] = ("evaluate.py", evaluate_args(tiny) + ["--output_dir", path], 1, root / "scratch" / "cwd")
        outputs[name], before[name] = path, None
    return root, {name: (result, outputs[name], before[name]) for name, result in run_all(commands).items()}


@pytest.mark.parametrize("script", ["sft.py", "preference_model.py", "ppo_lagrangian.py", "evaluate.py"])
def test_a_directory_the_script_did_not_make_is_refused_and_kept(ownership_runs, script):
    _, runs = ownership_runs
    result, output, before = runs[script]
    assert_error_line(result, f"--output_dir {output}", f"not a finished output of {script}", "--overwrite_output_dir")
    assert snapshot(output) == before  # NOTES.txt and old/ are still there, untouched
    assert sorted(p.name for p in output.parent.iterdir()) == ["D"]  # no D.partial, no D.old


def test_overwrite_output_dir_replaces_the_directory(ownership_runs):
    result, output, _ = ownership_runs[1]["sft --overwrite_output_dir"]
    assert result.returncode == 0, report(result)
    assert (output / "model.safetensors").is_file() and not (output / "NOTES.txt").exists()
    assert json.loads((output / "args.json").read_text())["script"] == "sft.py"  # now a finished output of sft.py


def test_a_finished_output_of_another_script_is_refused(ownership_runs):
    result, output, before = ownership_runs[1]["preference over an sft output"]
    assert_error_line(result, "not a finished output of preference_model.py")
    assert snapshot(output) == before


@pytest.mark.parametrize("name", ["sft into an empty directory", "sft over its own finished output"])
def test_an_empty_directory_or_the_scripts_own_output_is_written(ownership_runs, name):
    result, output, _ = ownership_runs[1][name]
    assert result.returncode == 0, report(result)
    assert (output / "model.safetensors").is_file() and not (output / "MARKER.txt").exists()
    assert sorted(p.name for p in output.parent.iterdir()) == ["D"]


@pytest.mark.parametrize("name, expected", [("parent is a file", "is a file"), ("the current directory", "current"),
                                            ("its parent", "current")])  # fmt: skip
def test_a_bad_output_path_is_refused_before_any_work(ownership_runs, name, expected):
    root, runs = ownership_runs
    result, _, _ = runs[name]
    assert_error_line(result, "--output_dir", expected)
    assert "evaluate: " not in result.stdout  # refused before a prompt was read, let alone answered
    assert sorted(p.name for p in (root / "scratch").iterdir()) == ["cwd"] and not list(
        (root / "scratch" / "cwd").iterdir()
    )


# ---- one run per output: a lock; Ctrl-C ----
def start(script, args, output_dir):
    return subprocess.Popen(
        [sys.executable, script, *map(str, args), "--output_dir", str(output_dir)],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(path, process, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)


def test_a_second_run_into_the_same_output_is_refused_and_the_first_ends_intact(tiny, tmp_path):
    output = tmp_path / "out"
    first = start("sft.py", sft_args(tiny) + ["--max_steps", 240, "--epochs", 20, "--lr", 1e-4], output)
    wait_for(output.with_name("out.partial") / "metrics.jsonl", first)  # the first run is training
    second = run_all({"second": ("sft.py", sft_args(tiny) + ["--max_steps", 2, "--output_dir", output])})["second"]
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    assert_error_line(second, "another run is writing it")
    steps = [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 241))  # the first run's metrics, whole and alone
    assert json.loads((output / "args.json").read_text())["max_steps"] == 240


def test_ctrl_c_ends_with_one_line_and_leaves_the_output_as_it_was(tiny, tmp_path):
    output = tmp_path / "out"
    before = existing_output(output, tiny.sft_model, "sft.py")
    process = start("sft.py", sft_args(tiny) + ["--max_steps", 2000, "--epochs", 200], output)
    wait_for(output.with_name("out.partial") / "metrics.jsonl", process)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    lines = stderr.strip().splitlines()
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert lines[-1].startswith("interrupted: ") and "left as it was" in lines[-1]
    assert snapshot(output) == before


# ---- a resume continues the same run, or refuses ----
SFT_SAVING = ["--max_steps", 8, "--save_steps", 2, "--epochs", 2, "--lr", 1e-4]
PPO_SAVING = ["--max_steps", 8, "--save_steps", 2, "--cost_limit", -1.0]


@pytest.fixture(scope="module")
def stopped_runs(tiny, tmp_path_factory):
    """An sft.py run and a ppo_lag run killed after their second saved state: {script: (args, OUTPUT_DIR.partial)}."""
    root = tmp_path_factory.mktemp("stopped")
    stopped = {}
    for script, args in (("sft.py", sft_args(tiny) + SFT_SAVING), ("ppo_lagrangian.py", ppo_args(tiny) + PPO_SAVING)):
        output = root / script / "out"
        output.parent.mkdir()
        kill_after_second_state(script, args, output)
        stopped[script] = args, output.with_name("out.partial")
    return stopped


def states_of(partial):
    return sorted((path.name for path in partial.glob("checkpoint-*[0-9]")), key=lambda name: int(name.split("-")[1]))


def corrupt(partial, how):
    """Damage the newest state (or both) the way a full disk or a kill during a copy would."""
    states = [partial / name for name in states_of(partial)]
    newest = states[-1]
    if how == "rank0.pt cut short":
        (newest / "rank0.pt").write_bytes((newest / "rank0.pt").read_bytes()[:100])
    elif how == ".metadata deleted":
        (newest / ".metadata").unlink()
    elif how == ".distcp cut short":
        for shard in newest.glob("*.distcp"):
            shard.write_bytes(shard.read_bytes()[:1000])
    elif how == "emptied":
        shutil.rmtree(newest)
        newest.mkdir()
    elif how == "both cut short":
        for state in states:
            (state / "rank0.pt").write_bytes(b"")
    elif how == "metrics.jsonl cut short":
        metrics = partial / "metrics.jsonl"
        metrics.write_text(metrics.read_text() + '{"step": 99, "train/lo')


RESUMES = {  # name: (script, extra flags, the damage done first, what the error line must say, or None: it resumes)
    "sft --resume --lr changed": ("sft.py", ["--resume", "--lr", 0.5], None, ["--lr is 0.5", "was 0.0001"]),
    "sft --resume, another batch size": (
        "sft.py",
        ["--resume", "--per_device_train_batch_size", 2],
        None,
        ["--per_device_train_batch_size is 2", "was 4"],
    ),
    "sft --resume, fewer steps": ("sft.py", ["--resume", "--max_steps", 3], None, ["--max_steps is 3", "was 8"]),
    "sft --resume, another number of processes": (
        "sft.py",
        ["--resume"],
        "saved by 2 processes",
        ["saved by 2 processes and this run has 1"],
    ),
    "sft without --resume": ("sft.py", [], None, ["holds the saved states", "pass --resume", "--overwrite_output_dir"]),
    "ppo --resume as another algorithm": (
        "ppo_lagrangian.py",
        ["--resume", "--algorithm", "ppo"],
        None,
        ["--algorithm is 'ppo' but was 'ppo_lag'"],
    ),
    "ppo --resume, fewer rollouts": ("ppo_lagrangian.py", ["--resume", "--max_steps", 2], None, ["--max_steps is 2"]),
    "sft --resume, both states cut short": (
        "sft.py",
        ["--resume"],
        "both cut short",
        ["no saved state", "can be loaded"],
    ),
    **{
        f"sft --resume, newest {how}": ("sft.py", ["--resume"], how, None)
        for how in ("rank0.pt cut short", ".metadata deleted", ".distcp cut short", "emptied")
    },
    "sft --resume, metrics.jsonl cut short": ("sft.py", ["--resume"], "metrics.jsonl cut short", None),
    "ppo --resume, newest rank0.pt cut short": ("ppo_lagrangian.py", ["--resume"], "rank0.pt cut short", None),
}


@pytest.fixture(scope="module")
def resumes(stopped_runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("resumes")
    commands, outputs, before = {}, {}, {}
    for i, (name, (script, extra, damage, _)) in enumerate(RESUMES.items()):
        args, stopped = stopped_runs[script]
        output = root / str(i) / "out"
        shutil.copytree(stopped, output.with_name("out.partial"))
        if damage == "saved by 2 processes":  # as a torchrun --nproc_per_node=2 run records itself in its states
            for state in output.with_name("out.partial").glob("checkpoint-*[0-9]"):
                saved = json.loads((state / "args.json").read_text())
                (state / "args.json").write_text(json.dumps(saved | {"world_size": 2, "global_batch_size": 8}))
        elif damage:
            corrupt(output.with_name("out.partial"), damage)
        before[name] = snapshot(output.with_name("out.partial"))
        commands[name], outputs[name] = (script, args + extra + ["--output_dir", output]), output
    return {name: (result, outputs[name], before[name]) for name, result in run_all(commands).items()}


@pytest.mark.parametrize("name", [name for name, case in RESUMES.items() if case[3]])
def test_a_resume_that_is_not_the_same_run_is_refused_and_the_states_kept(resumes, name):
    result, output, before = resumes[name]
    assert_error_line(result, *RESUMES[name][3])
    assert not output.exists() and snapshot(output.with_name("out.partial")) == before  # every saved state still there


@pytest.mark.parametrize("name", [name for name, case in RESUMES.items() if not case[3]])
def test_a_cut_short_state_is_named_and_the_run_resumes_from_the_older_one(resumes, name):
    result, output, _ = resumes[name]
    assert result.returncode == 0, report(result)
    key = "rollout" if RESUMES[name][0] == "ppo_lagrangian.py" else "step"
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [row[key] for row in rows if "eval/loss" not in row] == list(range(1, 9))  # every step once, in order
    if "newest" in name:  # named, and the older state used
        assert "cannot be loaded" in result.stderr and "trying an older state" in result.stderr
