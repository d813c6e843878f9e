"""Gradient accumulation reduces the gradients once per optimiser step, not once per micro-step: on 2 gloo ranks, sft.py
with 2 micro-steps of 2 sequences makes as many all-reduces (DDP, counted by a communication hook) and as many
reduce-scatters (FSDP2, counted where it issues them) as with 1 micro-step of 4. DDP decides whether a backward
reduces at the forward, FSDP2 at the backward, so no_sync() must hold both: the worker also shows that a forward alone
inside it (the FSDP2 bug of an earlier version) or a backward alone (DDP's) still reduces."""

import json
import sys
from pathlib import Path

import pytest

from helpers import REPO, TOY, run_script

pytestmark = pytest.mark.slow  # torchrun, 2 ranks


def worker(output_dir):
    import torch
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as fsdp_param_group
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(REPO))
    import sft

    counts = {"ddp": 0, "fsdp": 0}

    class CountingDDP(sft.DDP):  # DDP, counting the buckets it all-reduces
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)

            def hook(state, bucket):
                counts["ddp"] += 1
                return allreduce_hook(None, bucket)

            self.register_comm_hook(None, hook)

    reduce = fsdp_param_group.foreach_reduce

    def counting_reduce(*args, **kwargs):  # FSDP2's reduce-scatter of a unit's gradients
        counts["fsdp"] += 1
        return reduce(*args, **kwargs)

    sft.DDP, fsdp_param_group.foreach_reduce = CountingDDP, counting_reduce
    sft.dist.destroy_process_group = lambda: None  # one process group for every run below (gloo would not rejoin)
    report = {}
    for layout in ("ddp", "fsdp"):
        for accumulation, batch in ((1, 4), (2, 2)):
            counts[layout] = 0
            sys.argv = [
                "sft.py",
                "--model_name_or_path",
                str(REPO / "data" / "tiny-llama"),
                "--from_scratch",
                "--train_data",
                str(TOY / "sft.jsonl"),
                "--max_steps",
                "2",
                "--per_device_train_batch_size",
                str(batch),
                "--gradient_accumulation_steps",
                str(accumulation),
                "--max_length",
                "64",
                "--no_gradient_checkpointing",
                "--no_bf16",
                "--output_dir",
                f"{output_dir}/{layout}-{accumulation}",
            ] + (["--fsdp"] if layout == "fsdp" else [])
            sft.main()
            report[f"{layout}, {accumulation} micro-steps"] = counts[layout]
    # the helper itself, and why it must hold both the forward and the backward
    rank, _, device = sft.setup_distributed()
    inputs = torch.randint(3, 100, (2, 8))
    for layout in ("ddp", "fsdp"):
        torch.manual_seed(0)
        model = sft.wrap_trained_model(
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(REPO / "data" / "tiny-llama")),
            device,
            layout == "fsdp",
            False,
        )
        for placement in ("both", "forward only", "backward only"):
            counts[layout] = 0
            with sft.no_sync(model, enabled=placement != "backward only"):
                loss = model(input_ids=inputs, labels=inputs).loss
                if placement == "both":
                    loss.backward()
            if placement != "both":
                with sft.no_sync(model, enabled=placement == "backward only"):
                    loss.backward()
            report[f"{layout}, no_sync around the {placement}"] = counts[layout]
            model.zero_grad()
    Path(output_dir, f"rank{rank}.json").write_text(json.dumps(report))


def test_accumulation_reduces_the_gradients_once_per_step(tmp_path):
    run_script(Path(__file__), tmp_path, nproc=2)
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for layout in ("ddp", "fsdp"):
            once = report[f"{layout}, 1 micro-steps"]
            assert once > 0 and report[f"{layout}, 2 micro-steps"] == once, report  # not twice as many
            assert report[f"{layout}, no_sync around the both"] == 0, report
        assert report["ddp, no_sync around the forward only"] == 0 < report["ddp, no_sync around the backward only"]
        assert report["fsdp, no_sync around the forward only"] > 0 == report["fsdp, no_sync around the backward only"]


if __name__ == "__main__":  # the worker above, under torchrun
    worker(sys.argv[1])
