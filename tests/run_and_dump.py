"""Test harness: `python tests/run_and_dump.py SCRIPT DUMP_DIR ARGS...` (also under torchrun) runs SCRIPT's
main() with ARGS and saves what it returns (a model, or a dict of models and numbers) on every rank to
DUMP_DIR/rank{RANK}.pt; under --fsdp a model's tensors are the shards that rank holds."""

import importlib.util
import os
import sys
from pathlib import Path

import torch

script, dump_dir, *script_args = sys.argv[1:]
sys.path.insert(0, str(Path(script).resolve().parent))
spec = importlib.util.spec_from_file_location("stage", script)
stage = importlib.util.module_from_spec(spec)
sys.modules["stage"] = stage
spec.loader.exec_module(stage)
sys.argv = [script, *script_args]
result = stage.main()
if isinstance(result, torch.nn.Module):
    result = {"model": result}
local = lambda tensor: tensor.to_local() if hasattr(tensor, "to_local") else tensor  # noqa: E731  an FSDP shard: this rank's part
state = {
    name: {key: local(t) for key, t in value.state_dict().items()} if isinstance(value, torch.nn.Module) else value
    for name, value in result.items()
}
Path(dump_dir).mkdir(parents=True, exist_ok=True)
torch.save(state, Path(dump_dir) / f"rank{os.environ.get('RANK', '0')}.pt")
