"""Helpers shared by the tests: run a stage script as a user would (a subprocess, optionally under torchrun), several
at once, and check what a failed run must leave: one error line, and every file as it was."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TOY = REPO / "data" / "toy"
TINY_LLAMA = REPO / "data" / "tiny-llama"


def run_script(script, *args, nproc=1, check=True, timeout=900):
    """Run `python SCRIPT ARGS` (or `torchrun --nproc_per_node=NPROC ...`) from the repository root."""
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    result = launch(launcher(nproc) + [str(script), *map(str, args)], REPO, env, timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{script} exited with {result.returncode}\n--- stdout ---\n{result.stdout[-3000:]}\n"
            f"--- stderr ---\n{result.stderr[-6000:]}"
        )
    return result


def launch(command, cwd, env, timeout):
    """subprocess.run(COMMAND) with its output captured. A run that hangs past TIMEOUT seconds gets SIGABRT, it and
    every process under it (torchrun starts each worker in a session of its own), so that Python's faulthandler
    (PYTHONFAULTHANDLER=1) prints where each one hung; then it is run once more, with the stacks as a warning, if it
    was writing a new --output_dir (removed first). A run that hangs again, or that was given an existing output,
    fails with the stacks. (Why: in CI a 2-rank gloo run once hung after saving, where is unknown; another aborted in
    Python's teardown, which the scripts now skip: docs/robustness.md.)"""
    output = Path(cwd, command[command.index("--output_dir") + 1]) if "--output_dir" in command else None
    new_output = output is not None and not any(Path(f"{output}{end}").exists() for end in ("", ".partial"))
    for attempt in (1, 2):
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
            return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
        except subprocess.TimeoutExpired:
            pids = process_tree(process.pid)[::-1]  # the workers first: their stacks are the ones wanted
            send(pids, signal.SIGSTOP)  # all stopped, then each in turn prints its stack and ends (before a peer
            send(pids, signal.SIGABRT, signal.SIGCONT, pause=1)  # could see it gone and end another way)
            send(pids, signal.SIGKILL)
            stdout, stderr = process.communicate()
        hang = f"{command[1:]} hung for {timeout} s (attempt {attempt}); its stacks:\n{stderr[-12000:]}"
        if attempt == 2 or not new_output:
            raise AssertionError(hang)
        warnings.warn(hang, stacklevel=2)
        for path in (output, Path(f"{output}.partial")):
            shutil.rmtree(path, ignore_errors=True)


def send(pids, *signums, pause=0):
    """Each signal to each process that still lives, PAUSE seconds after each process."""
    for pid in pids:
        for signum in signums:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        time.sleep(pause)


def run_and_dump(script, dump_dir, *args, nproc=1):
    """Run SCRIPT's main() (under torchrun when nproc > 1) and save what it returns on every rank to
    DUMP_DIR/rank{R}.pt, so a test can compare the ranks' parameters."""
    return run_script(REPO / "tests" / "run_and_dump.py", script, dump_dir, *args, nproc=nproc)


# tiny models gain nothing from threads, and four concurrent runs on two cores must not fight over them
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYTHONFAULTHANDLER": "1",
}
SFT_FAST = [
    "--per_device_train_batch_size",
    4,
    "--gradient_accumulation_steps",
    1,
    "--max_length",
    128,
    "--no_gradient_checkpointing",
    "--no_bf16",
]
PREFERENCE_FAST = ["--per_device_train_batch_size", 4, "--max_length", 128, "--no_gradient_checkpointing", "--no_bf16"]
PPO_FAST = [
    "--per_device_prompt_batch_size",
    4,
    "--per_device_train_batch_size",
    4,
    "--max_new_tokens",
    8,
    "--max_length",
    64,
    "--no_gradient_checkpointing",
    "--no_bf16",
]
EVALUATE_FAST = [
    "--max_prompts",
    4,
    "--max_new_tokens",
    8,
    "--max_length",
    64,
    "--greedy",
    "--elo_rounds",
    0,
    "--no_bf16",
]


# ---- running the scripts ----
def run_main(module, *args):
    """A stage script's main() in this process, with ARGS as its command line; returns what main() returns."""
    saved, sys.argv = sys.argv, [f"{module.__name__}.py", *map(str, args)]
    try:
        return module.main()
    finally:
        sys.argv = saved


def refused(module, *args):
    """main() must refuse ARGS with the script's InputError, in one line; returns the line."""
    with pytest.raises(module.InputError) as error:
        run_main(module, *args)
    assert "\n" not in str(error.value), str(error.value)
    return str(error.value)


def run_all(commands, parallel=4, check=False):
    """{name: (script, args), (script, args, nproc) or (script, args, nproc, cwd)} -> {name: CompletedProcess},
    `parallel` at a time, one thread a process; the script is the repository's, run from CWD (default: the
    repository). CHECK: every run must succeed."""

    def run(command):
        script, args, nproc, cwd = (*command, 1, REPO)[:4] if len(command) == 2 else (*command, REPO)[:4]
        # (the slowest of these runs takes ~40 s on 2 cores: 300 s is a hang)
        return launch(launcher(nproc) + [str(REPO / script), *map(str, args)], cwd, ENV, timeout=300)

    with ThreadPoolExecutor(parallel) as pool:
        results = dict(zip(commands, pool.map(run, commands.values())))
    for name, result in results.items() if check else {}.items():
        assert result.returncode == 0, f"{name} exited with {result.returncode}:\n{result.stderr[-6000:]}"
    return results


def report(result):
    last = (result.stderr.strip().splitlines() or [""])[-1]
    return (
        f"exit status {result.returncode}, last line of stderr {last[:300]!r}\n"
        f"--- stdout (end) ---\n{result.stdout[-1500:]}\n"
        f"--- stderr (end) ---\n{result.stderr[-3000:]}"
    )


def assert_error_line(result, *expected):
    """Exit status 1 and one line for the user, the last of stderr: 'error: ...' containing every EXPECTED text."""
    lines = result.stderr.strip().splitlines()  # (tqdm's \r-separated updates count as lines: the error must come last)
    assert result.returncode == 1, f"exit status {result.returncode}, not 1\n{report(result)}"
    if "Traceback" in result.stderr:
        raise AssertionError(
            f"a Traceback, ending {[line for line in lines if line.strip()][-1][:300]!r}\n{report(result)}"
        )
    assert lines and lines[-1].startswith("error: "), (
        f"the last line of stderr is {lines[-1][:300] if lines else ''!r}\n{report(result)}"
    )
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
    return sorted(
        [f"removed {k}" for k in before.keys() - after.keys()]
        + [f"added {k}" for k in after.keys() - before.keys()]
        + [f"changed {k}" for k in before.keys() & after.keys() if before[k] != after[k]]
    )


def assert_nothing_left(output_dir, before, may_leave_partial=False):
    """OUTPUT_DIR is as it was (absent, or byte-identical) and no OUTPUT_DIR.partial / .old / .saving sits beside it."""
    output_dir = Path(output_dir)
    changed = changes(before, snapshot(output_dir))
    assert not changed, f"{output_dir} was {'touched' if before else 'created'}: {', '.join(changed[:6])}"
    leftovers = {p.name for p in output_dir.parent.iterdir() if p.name.startswith(output_dir.name + ".")}
    assert leftovers <= ({output_dir.name + ".partial"} if may_leave_partial else set()), (
        f"left behind: {sorted(leftovers)}"
    )


def existing_output(path, source, script, marker="a good output of an earlier run"):
    """A finished output of SCRIPT from an earlier run at PATH (a copy of SOURCE, with SCRIPT's args.json and a marker
    file); returns its snapshot."""
    shutil.copytree(source, path)
    (Path(path) / "args.json").write_text(json.dumps({"script": script, "seed": 0}))
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
        bad += [
            f"{path.relative_to(directory)}:{name}"
            for name, t in tensors(contents, "")
            if t.is_floating_point() and not torch.isfinite(t).all()
        ]
    return bad


def ppo_args(tiny, **models):
    """ppo_lagrangian.py on the tiny models (MODELS overrides actor_model, reward_model, cost_model)."""
    chosen = {"actor_model": tiny.sft_model, "reward_model": tiny.reward, "cost_model": tiny.cost, **models}
    return [arg for name, path in chosen.items() for arg in (f"--{name}", path)] + [
        "--prompt_data",
        tiny.prompts,
        *PPO_FAST,
    ]


def evaluate_args(tiny, policy=None, **models):
    chosen = {"reward_model": tiny.reward, "cost_model": tiny.cost, **models}
    return ["--policy", f"sft={policy or tiny.sft_model}", "--prompt_data", tiny.eval_prompts, *EVALUATE_FAST] + [
        arg for name, path in chosen.items() for arg in (f"--{name}", path)
    ]


def sft_args(tiny, train_data=None):
    return ["--model_name_or_path", TINY_LLAMA, "--from_scratch", "--train_data", train_data or tiny.sft, *SFT_FAST]


def preference_args(tiny, model=None, objective="reward"):
    return [
        "--objective",
        objective,
        "--model_name_or_path",
        model or tiny.sft_model,
        "--train_data",
        tiny.preference,
        "--eval_data",
        tiny.preference_eval,
        *PREFERENCE_FAST,
    ]


def launcher(nproc):
    return (
        [sys.executable]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    )


def run(script, *args, nproc=1):
    """Run to the end, as a user would; one thread per process in every run of a comparison (the same float sums)."""
    result = launch(launcher(nproc) + [script, *map(str, args)], REPO, ENV, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def process_tree(pid):
    """PID and every process it started, and theirs (read from /proc: torchrun's workers need not share its group)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # the process ended while we read
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def kill_all(process):
    """SIGKILL a run and every process it started, and wait until all are gone (their locks with them)."""
    tree = process_tree(process.pid)
    send(tree, signal.SIGKILL)
    process.wait()
    deadline = time.time() + 60
    for pid in tree[1:]:  # a zombie holds no lock: only a live one counts
        while Path(f"/proc/{pid}").exists() and "State:\tZ" not in read_or_empty(Path(f"/proc/{pid}/status")):
            assert time.time() < deadline, f"process {pid} outlived SIGKILL"
            time.sleep(0.02)


def read_or_empty(path):
    try:
        return path.read_text()
    except OSError:
        return ""


def kill_after_second_state(script, args, output_dir, nproc=1):
    """Start the run, wait until it has written two states, SIGKILL it (every process), return the newest state's N."""
    process = subprocess.Popen(
        launcher(nproc) + [script, *map(str, args), "--output_dir", str(output_dir)],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    partial = output_dir.with_name(output_dir.name + ".partial")
    deadline = time.time() + 600
    while len(list(partial.glob("checkpoint-*[0-9]"))) < 2:
        assert process.poll() is None, f"the run ended before its second state: {process.stderr.read()[-3000:]}"
        assert time.time() < deadline
        time.sleep(0.02)
    kill_all(process)
    assert not output_dir.exists()  # a killed run leaves no output, only its working directory
    return max(int(path.name.rsplit("-", 1)[1]) for path in partial.glob("checkpoint-*[0-9]"))
