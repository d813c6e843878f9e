"""The test harness's own guard against a hung run: the stacks of every process, one retry into a new output only."""

import sys

import pytest

from helpers import ENV, launch, launcher

HANGS_ONCE = """
import pathlib, sys, time
output = pathlib.Path(sys.argv[sys.argv.index("--output_dir") + 1])
output.mkdir()  # fails if the hung attempt's output was not removed
flag = output.parent / "hung once"
if not flag.exists():
    flag.touch()
    time.sleep(600)
print("finished")
"""

RANK_0_HANGS = """
import time
import torch.distributed as dist
dist.init_process_group("gloo")
if dist.get_rank() == 0:
    time.sleep(600)
dist.barrier()
"""


def test_a_run_that_hangs_once_into_a_new_output_is_retried_with_a_warning(tmp_path):
    command = [sys.executable, "-c", HANGS_ONCE, "--output_dir", "out"]  # relative to the run's directory
    with pytest.warns(
        UserWarning, match=r'hung for 3 s \(attempt 1\); its stacks:[\s\S]*File "<string>", line 8 in <module>'
    ):
        result = launch(command, tmp_path, ENV, timeout=3)
    assert result.returncode == 0 and result.stdout == "finished\n", result.stderr


@pytest.mark.slow
def test_a_hung_torchrun_fails_with_every_ranks_stack_and_is_not_retried_into_an_existing_output(tmp_path):
    script, output = tmp_path / "hang.py", tmp_path / "existing output"
    script.write_text(RANK_0_HANGS)
    output.mkdir()
    with pytest.raises(AssertionError, match="attempt 1") as error:
        launch(launcher(2) + [str(script), "--output_dir", str(output)], tmp_path, ENV, timeout=30)
    for line in (6, 7):  # rank 0 sleeping, rank 1 in the barrier
        assert f'hang.py", line {line} in <module>' in str(error.value), str(error.value)[-3000:]
    assert output.is_dir()  # an output it was given is never removed
