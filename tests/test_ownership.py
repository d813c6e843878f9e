"""A run touches only what is its own: an output directory it did not make is refused (or replaced only with
--overwrite_output_dir), a bad output path is refused at start, a second run into the same output is refused by the
first run's lock (a killed run's lock dies with it), Ctrl-C ends with one line and leaves the output as it was, and a
resume continues the same run or refuses: changed training arguments, a rerun over saved states without --resume, and
cut-short states are all named in one line (an older state is used when the newest cannot be read); a refused run
leaves its process group before it exits, and a run ends with its own exit status while gloo's threads are at work.

The models are tiny and untrained; each script's main() runs in this process, except where a second process is the
point (a lock held by another run, Ctrl-C, a kill)."""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import evaluate
import ppo_lagrangian
import preference_model
import sft
from helpers import (
    ENV,
    REPO,
    evaluate_args,
    existing_output,
    launch,
    launcher,
    ppo_args,
    preference_args,
    refused,
    run_main,
    sft_args,
    snapshot,
)

SCRIPTS = {
    "sft.py": sft,
    "preference_model.py": preference_model,
    "ppo_lagrangian.py": ppo_lagrangian,
    "evaluate.py": evaluate,
}


def one_step(tiny, script):
    return {
        "sft.py": sft_args(tiny) + ["--max_steps", 1],
        "preference_model.py": preference_args(tiny) + ["--max_steps", 1],
        "ppo_lagrangian.py": ppo_args(tiny) + ["--max_steps", 1],
        "evaluate.py": evaluate_args(tiny),
    }[script]


def foreign_directory(path):
    """A directory a user made: notes and a folder of their own. Returns its snapshot."""
    (path / "old").mkdir(parents=True)
    (path / "NOTES.txt").write_text("my notes\n")
    (path / "old" / "result.txt").write_text("an earlier result\n")
    return snapshot(path)


# ---- an output directory is the script's only if the script made it ----
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_a_directory_the_script_did_not_make_is_refused_and_kept(tiny, tmp_path, script):
    output = tmp_path / "D"
    before = foreign_directory(output)
    message = refused(SCRIPTS[script], *one_step(tiny, script), "--output_dir", output)
    assert all(
        text in message
        for text in (f"--output_dir {output}", f"not a finished output of {script}", "--overwrite_output_dir")
    ), message
    assert snapshot(output) == before and sorted(p.name for p in tmp_path.iterdir()) == ["D"]  # no D.partial


def test_overwrite_output_dir_replaces_the_directory(tiny, tmp_path):
    foreign_directory(tmp_path / "D")
    run_main(sft, *one_step(tiny, "sft.py"), "--overwrite_output_dir", "--output_dir", tmp_path / "D")
    assert (tmp_path / "D" / "model.safetensors").is_file() and not (tmp_path / "D" / "NOTES.txt").exists()
    assert json.loads((tmp_path / "D" / "args.json").read_text())["script"] == "sft.py"  # now a finished sft.py output


def test_a_finished_output_of_another_script_is_refused(tiny, tmp_path):
    before = existing_output(tmp_path / "D", tiny.sft_model, "sft.py")
    assert "not a finished output of preference_model.py" in refused(
        preference_model, *one_step(tiny, "preference_model.py"), "--output_dir", tmp_path / "D"
    )
    assert snapshot(tmp_path / "D") == before


@pytest.mark.parametrize("kind", ["an empty directory", "its own finished output"])
def test_an_empty_directory_or_the_scripts_own_output_is_written(tiny, tmp_path, kind):
    if kind == "an empty directory":
        (tmp_path / "D").mkdir()
    else:
        existing_output(tmp_path / "D", tiny.sft_model, "sft.py")
    run_main(sft, *one_step(tiny, "sft.py"), "--output_dir", tmp_path / "D")
    assert (tmp_path / "D" / "model.safetensors").is_file() and not (tmp_path / "D" / "MARKER.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["D"]


@pytest.mark.parametrize("path", [".", ".."])
def test_the_current_directory_and_one_above_it_are_refused_before_any_work(tiny, tmp_path, monkeypatch, capsys, path):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # an empty directory: only the rule protects it
    assert "the current directory" in refused(evaluate, *evaluate_args(tiny), "--output_dir", path)
    assert "evaluate: " not in capsys.readouterr().out  # refused before a prompt was read, let alone answered
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd"] and not list((tmp_path / "cwd").iterdir())


# ---- one run per output: a lock ----
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_an_output_another_run_is_writing_is_refused_before_any_work(tiny, tmp_path, script, monkeypatch):
    """A run's lock is an fcntl lock on OUTPUT_DIR.partial/.lock, held while it lives: taken here as another run holds
    it. evaluate.py takes it at start, before answering (it used to take it at the end)."""
    (tmp_path / "D.partial").mkdir()
    monkeypatch.setattr(evaluate, "answer_batch", lambda *args: pytest.fail("answered while another run writes"))
    with open(tmp_path / "D.partial" / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert "another run is writing it" in refused(
            SCRIPTS[script], *one_step(tiny, script), "--output_dir", tmp_path / "D"
        )
    assert not (tmp_path / "D").exists()


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


@pytest.mark.slow
def test_a_second_run_into_the_same_output_is_refused_and_the_first_ends_intact(tiny, tmp_path):
    output = tmp_path / "out"
    first = start("sft.py", sft_args(tiny) + ["--max_steps", 240, "--epochs", 20, "--lr", 1e-4], output)
    wait_for(output.with_name("out.partial") / "metrics.jsonl", first)  # the first run is training
    second = start("sft.py", sft_args(tiny) + ["--max_steps", 2], output)
    _, second_err = second.communicate(timeout=600)
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    assert second.returncode == 1 and "another run is writing it" in second_err.strip().splitlines()[-1], second_err
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


def test_a_run_refused_after_the_process_group_is_up_leaves_it_before_exiting(tiny, tmp_path):
    """A refused run leaves its process group before it exits (under NCCL, a group never left is a warning at best),
    and what it printed is not lost to its os._exit. The __main__ block is the same in every script
    (test_shared_code.py)."""
    (tmp_path / "out.partial").mkdir()
    wrapper = f"""
import fcntl, os, runpy, sys
import torch.distributed as dist
lock = open({str(tmp_path / "out.partial" / ".lock")!r}, "a")
fcntl.flock(lock, fcntl.LOCK_EX)  # another run's lock: sft.py is refused after it has joined its process group
exit = os._exit  # (the run ends with os._exit: no atexit handler runs)
os._exit = lambda code: (os.write(1, b"process group " + (b"up" if dist.is_initialized() else b"left")), exit(code))
sys.argv = sys.argv[1:]
print("started")  # block-buffered (PYTHONUNBUFFERED unset): lost unless the script flushes before its os._exit
runpy.run_path(sys.argv[0], run_name="__main__")
"""
    args = [*map(str, one_step(tiny, "sft.py")), "--output_dir", tmp_path / "out"]
    command = [sys.executable, "-c", wrapper, "sft.py", *args]
    env = {name: value for name, value in ENV.items() if name != "PYTHONUNBUFFERED"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "another run is writing it" in result.stderr, result.stderr[-3000:]
    assert result.stdout.split() == ["started", "process", "group", "left"]


GLOO_STILL_AT_WORK = """
import ast, runpy, sys, time, torch
import torch.distributed as dist
script = runpy.run_path(sys.argv[1])  # its definitions; its __main__ block is run below, with this main()
(block,) = [node for node in ast.parse(open(sys.argv[1]).read()).body if ast.unparse(node).startswith("if __name__")]
kept = []

class SlowToGo:  # Python's teardown lasts 3 s: rank 0's collectives end during it
    def __del__(self):
        time.sleep(3)

slow_to_go = SlowToGo()

def main():  # as a stage's end looks to gloo: DDP and fully_shard keep the group (and its threads) past its destroy
    dist.init_process_group("gloo")
    kept.append(dist.group.WORLD)
    time.sleep(dist.get_rank())  # rank 1 joins the collectives a second late
    for _ in range(20):
        dist.all_reduce(torch.ones(10), async_op=True)  # not waited for: gloo's threads still hold the tensors
    if sys.argv[2] == "refused":
        raise script["InputError"]("refused")
    print("saved", dist.get_rank())
    dist.destroy_process_group()

exec(compile(ast.Module([block], []), sys.argv[1], "exec"), {**script, "main": main, "__name__": "__main__"})
"""


@pytest.mark.parametrize("end", ["finished", "refused"])
def test_a_run_ends_with_its_own_status_while_gloo_threads_are_still_at_work(tmp_path, end):
    """Python's teardown under a gloo thread that still holds tensors aborts ("terminate called without an active
    exception"): 16 of 18 runs of this driver did with the previous __main__ block, which left the exit to Python.
    The block now ends the run before that teardown."""
    driver = tmp_path / "driver.py"
    driver.write_text(GLOO_STILL_AT_WORK)
    result = launch([*launcher(2), str(driver), "sft.py", end], REPO, ENV, timeout=300)
    assert result.returncode == (0 if end == "finished" else 1), result.stderr[-3000:]
    assert "terminate called" not in result.stderr
    assert result.stderr.count("error: refused") == (end == "refused")
    assert sorted(result.stdout.split("\n")) == ([""] if end == "refused" else ["", "saved 0", "saved 1"])


# ---- a resume continues the same run, or refuses ----
SFT_SAVING = ["--max_steps", 8, "--save_steps", 2, "--epochs", 2, "--lr", 1e-4]
PPO_SAVING = ["--max_steps", 8, "--save_steps", 2, "--cost_limit", -1.0]


@pytest.fixture(scope="module")
def stopped_runs(tiny, tmp_path_factory):
    """An sft.py run and a ppo_lag run stopped right after their second saved state, as a kill would leave them:
    {script: (args, OUTPUT_DIR.partial)}."""
    root, stopped = tmp_path_factory.mktemp("stopped"), {}
    for module, args in ((sft, sft_args(tiny) + SFT_SAVING), (ppo_lagrangian, ppo_args(tiny) + PPO_SAVING)):
        saves, save_state = [], module.save_state

        def stop_after_two(*state_args, saves=saves, save_state=save_state):
            save_state(*state_args)
            saves.append(1)
            if len(saves) == 2:
                raise KeyboardInterrupt  # killed here: OUTPUT_DIR.partial holds checkpoint-2 and checkpoint-4

        module.save_state = stop_after_two
        try:
            with pytest.raises(KeyboardInterrupt):
                run_main(module, *args, "--output_dir", root / module.__name__ / "out")
        finally:
            module.save_state = save_state
        stopped[f"{module.__name__}.py"] = args, root / module.__name__ / "out.partial"
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
    elif how == "saved by 2 processes":  # as a torchrun --nproc_per_node=2 run records itself in its states
        for state in states:
            saved = json.loads((state / "args.json").read_text())
            (state / "args.json").write_text(json.dumps(saved | {"world_size": 2, "global_batch_size": 8}))


RESUMES = {  # name: (script, extra flags, the damage done first, what the error must say, or None: it resumes)
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
        ["the number of processes is 1 but was 2"],
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


@pytest.mark.parametrize("name", list(RESUMES))
def test_a_resume_continues_the_same_run_from_a_state_that_loads_or_refuses(stopped_runs, tmp_path, name, capsys):
    script, extra, damage, expected = RESUMES[name]
    args, stopped = stopped_runs[script]
    output = tmp_path / "out"
    shutil.copytree(stopped, output.with_name("out.partial"))
    if damage:
        corrupt(output.with_name("out.partial"), damage)
    before = snapshot(output.with_name("out.partial"))
    if expected:  # refused, every saved state kept
        message = refused(SCRIPTS[script], *args, *extra, "--output_dir", output)
        assert all(text in message for text in expected), message
        assert not output.exists() and snapshot(output.with_name("out.partial")) == before
        return
    run_main(SCRIPTS[script], *args, *extra, "--output_dir", output)
    key = "rollout" if script == "ppo_lagrangian.py" else "step"
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [row[key] for row in rows if "eval/loss" not in row] == list(range(1, 9))  # every step once, in order
    if "newest" in name:  # named, and the older state used
        assert "cannot be loaded" in capsys.readouterr().err
