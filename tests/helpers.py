"""Helpers shared by the tests: run a stage script as a user would (a subprocess, optionally under torchrun)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOY = REPO / "data" / "toy"
TINY_LLAMA = REPO / "data" / "tiny-llama"


def run_script(script, *args, nproc=1, check=True, timeout=900):
    """Run `python SCRIPT ARGS` (or `torchrun --nproc_per_node=NPROC ...`) from the repository root."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    result = subprocess.run(launcher + [str(script), *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} exited with {result.returncode}\n--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-6000:]}")
    return result


def run_and_dump(script, dump_dir, *args, nproc=1):
    """Run SCRIPT's main() (under torchrun when nproc > 1) and save what it returns on every rank to
    DUMP_DIR/rank{R}.pt, so a test can compare the ranks' parameters."""
    return run_script(REPO / "tests" / "run_and_dump.py", script, dump_dir, *args, nproc=nproc)
