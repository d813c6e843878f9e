"""--fsdp (FSDP2 full sharding) in the trainers, on 2 gloo ranks: the same optimiser step as DDP and as one process with
the same global batch (with and without gradient accumulation), the same PPO-Lagrangian run as DDP, and checkpoints
that are ordinary Hugging Face checkpoints. The bf16 step on a GPU is skipped without CUDA."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed

from helpers import REPO, TINY_LLAMA, TOY, run_all, run_and_dump, run_script

pytestmark = pytest.mark.slow  # every test here runs torchrun with 2 ranks


def checkpoint(path):
    """The saved weights, as a Hugging Face model would load them: the tied LM head is the embedding."""
    weights = load_file(path / "model.safetensors")
    assert all(type(t) is torch.Tensor for t in weights.values())  # plain tensors, no DTensor
    assert not any(k.startswith(("module.", "_fsdp", "score_model.")) or "_checkpoint_wrapped" in k for k in weights), (
        sorted(weights)[:5]
    )
    weights.pop("lm_head.weight", None)
    return weights


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# lr 1e-4: Adam's first step is lr·g/(|g| + ε), which turns fp32 rounding of tiny gradients into 1e-5 differences
# at lr 1e-3
SFT = [
    "--model_name_or_path",
    TINY_LLAMA,
    "--from_scratch",
    "--train_data",
    TOY / "sft.jsonl",
    "--max_steps",
    1,
    "--lr",
    1e-4,
    "--lr_scheduler",
    "constant",
    "--lr_warmup_ratio",
    0,
    "--max_length",
    96,
    "--no_gradient_checkpointing",
    "--no_bf16",
    "--seed",
    0,
]


def test_sft_fsdp_step_equals_ddp_and_one_process(tmp_path):
    runs = {  # name: (processes, per-device batch, accumulation steps, extra flags); global batch 8 in every run
        "one process": (1, 8, 1, []),
        "ddp": (2, 2, 2, []),
        "fsdp": (2, 4, 1, ["--fsdp"]),
        "fsdp accumulating": (2, 2, 2, ["--fsdp"]),
    }
    run_all(  # two at a time, one thread a process
        {
            name: (
                "sft.py",
                [*SFT, "--per_device_train_batch_size", batch, "--gradient_accumulation_steps", steps]
                + [*extra, "--output_dir", tmp_path / name],
                nproc,
            )  # fmt: skip
            for name, (nproc, batch, steps, extra) in runs.items()
        },
        parallel=2,
        check=True,
    )
    reference = checkpoint(tmp_path / "one process")
    for name in ("ddp", "fsdp", "fsdp accumulating"):
        assert max_difference(reference, checkpoint(tmp_path / name)) < 1e-5, name
    # the one step moved every weight by about lr (Adam) from the seeded initialisation, so agreeing to 1e-5 means
    # something
    set_seed(0)
    initial = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_LLAMA)).state_dict()
    initial.pop("lm_head.weight")
    assert 5e-5 < max_difference(reference, initial) < 2e-4
    # and the FSDP checkpoint loads as an ordinary model whose outputs equal the one-process model's
    ids = torch.randint(3, 2000, (2, 12))
    with torch.no_grad():
        logits = [
            AutoModelForCausalLM.from_pretrained(tmp_path / name)(input_ids=ids).logits
            for name in ("one process", "fsdp")
        ]
    assert (logits[0] - logits[1]).abs().max() < 1e-4


def test_each_rank_holds_half_and_the_checkpoint_is_the_live_model(tmp_path):
    run_and_dump(
        "sft.py",
        tmp_path / "dump",
        *SFT,
        "--per_device_train_batch_size",
        4,
        "--fsdp",
        "--output_dir",
        tmp_path / "out",
        nproc=2,
    )
    shards = [torch.load(tmp_path / "dump" / f"rank{rank}.pt")["model"] for rank in (0, 1)]
    saved = load_file(tmp_path / "out" / "model.safetensors")
    total = sum(t.numel() for key, t in saved.items() if key != "lm_head.weight")  # the tied head is the embedding
    held = [sum(t.numel() for key, t in shard.items() if key != "lm_head.weight") for shard in shards]
    assert sum(held) == total and all(0.45 * total < n < 0.55 * total for n in held), (held, total)
    for key, weight in saved.items():  # FSDP2 cuts every parameter on dim 0: rank 0's rows, then rank 1's
        assert torch.equal(torch.cat([shard[key] for shard in shards]), weight), key


def test_cost_model_fsdp_step_equals_ddp_and_one_process(sft_checkpoint, tmp_path):
    common = [
        "--objective",
        "cost",
        "--model_name_or_path",
        sft_checkpoint,
        "--train_data",
        TOY / "preference_train.jsonl",
        "--eval_data",
        "",
        "--max_steps",
        1,
        "--lr",
        1e-4,
        "--lr_scheduler",
        "constant",
        "--lr_warmup_ratio",
        0,
        "--max_length",
        96,
        "--no_gradient_checkpointing",
        "--no_bf16",
        "--seed",
        0,
    ]
    runs = {"one process": (1, 8, 1, []), "ddp": (2, 4, 1, []), "fsdp accumulating": (2, 2, 2, ["--fsdp"])}
    run_all(  # two at a time, one thread a process
        {
            name: (
                "preference_model.py",
                [*common, "--per_device_train_batch_size", batch]
                + ["--gradient_accumulation_steps", steps, *extra, "--output_dir", tmp_path / name],
                nproc,
            )  # fmt: skip
            for name, (nproc, batch, steps, extra) in runs.items()
        },
        parallel=2,
        check=True,
    )
    reference = checkpoint(tmp_path / "one process")
    key = "model.layers.0.mlp.up_proj.weight"  # the backbone moved from the SFT weights by about lr
    assert (reference[key] - checkpoint(sft_checkpoint)[key]).abs().max() > 5e-5
    for name in ("ddp", "fsdp accumulating"):
        assert max_difference(reference, checkpoint(tmp_path / name)) < 1e-5, name
    config = json.loads((tmp_path / "fsdp accumulating" / "config.json").read_text())
    assert config["objective"] == "cost"
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "fsdp accumulating")  # loads without missing keys


def test_ppo_lagrangian_fsdp_equals_ddp(sft_checkpoint, preference_models, tmp_path):
    common = [
        "--actor_model",
        sft_checkpoint,
        "--reward_model",
        preference_models / "reward",
        "--cost_model",
        preference_models / "cost",
        "--prompt_data",
        TOY / "prompts.jsonl",
        "--max_steps",
        2,
        "--per_device_prompt_batch_size",
        4,
        "--per_device_train_batch_size",
        2,
        "--max_new_tokens",
        24,
        "--max_length",
        128,
        "--actor_lr",
        1e-4,
        "--critic_lr",
        1e-4,
        "--cost_limit",
        -5.0,
        "--no_gradient_checkpointing",
        "--no_bf16",
        "--save_critics",
        "--seed",
        0,
    ]
    runs = {name: ("ppo_lagrangian.py", [*common, *extra, "--output_dir", tmp_path / name], 2)
            for name, extra in (("ddp", []), ("fsdp", ["--fsdp"]))}  # fmt: skip
    run_all(runs, parallel=2, check=True)  # side by side, one thread a process
    for model in ("", "reward_critic", "cost_critic"):
        assert max_difference(checkpoint(tmp_path / "ddp" / model), checkpoint(tmp_path / "fsdp" / model)) < 1e-4, (
            model or "actor"
        )
    state = {name: json.loads((tmp_path / name / "training_state.json").read_text()) for name in ("ddp", "fsdp")}
    assert state["ddp"]["lambda"] == pytest.approx(state["fsdp"]["lambda"], abs=1e-4) and state["ddp"]["lambda"] != 1.0
    metrics = {
        name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("ddp", "fsdp")
    }
    assert [m["objective/answer_length"] for m in metrics["ddp"]] == [
        m["objective/answer_length"] for m in metrics["fsdp"]
    ]  # same samples


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fsdp_bf16_step_on_the_gpu(tmp_path):
    result = run_script(
        "sft.py",
        *[a for a in SFT if a != "--no_bf16"],
        "--bf16",
        "--fsdp",
        "--per_device_train_batch_size",
        4,
        "--output_dir",
        tmp_path / "gpu",
    )
    assert "bf16 True" in result.stdout and "peak GPU memory" in result.stdout
    assert all(torch.isfinite(t).all() for t in checkpoint(tmp_path / "gpu").values())


def fsdp_structure_worker(output_dir):
    """One of 2 gloo ranks: wrap the tiny actor as ppo_lagrangian.py wraps a trained model under --fsdp, and report its
    FSDP units and whether its parameters are sharded (DTensors) inside and after a gathered() rollout."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO))  # run as a script: the repository is not on the path yet
    import ppo_lagrangian as ppo

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    model = ppo.wrap_trained_model(
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_LLAMA)),
        torch.device("cpu"),
        fsdp=True,
        bf16=False,
    )
    sharded = lambda: all(isinstance(p, DTensor) for p in model.parameters())  # noqa: E731
    report = {
        "layers": len(model.model.layers),
        "layers_are_units": all(isinstance(layer, FSDPModule) for layer in model.model.layers),
        "units": sum(isinstance(module, FSDPModule) for module in model.modules()),
        "root_is_a_unit": isinstance(model, FSDPModule),
        "sharded_before": sharded(),
    }
    sampling = ppo.sampling_config(SimpleNamespace(temperature=1.0, top_p=1.0), tokenizer)
    with ppo.gathered(model), torch.no_grad():
        ppo.generate_answers(model, tokenizer, [[1, 40, 41, 42], [1, 50, 51]], 6, sampling)
        report["sharded_while_gathered"] = sharded()
    report["sharded_after"] = sharded()
    Path(output_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def test_each_decoder_layer_is_its_own_fsdp_unit_and_is_resharded_after_a_rollout(tmp_path):
    run_script(Path(__file__), tmp_path, nproc=2)
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["layers_are_units"] and report["root_is_a_unit"], report
        assert report["units"] == report["layers"] + 1, report  # the layers, then the root: nothing else, nothing less
        assert report["sharded_before"] and not report["sharded_while_gathered"] and report["sharded_after"], report


if __name__ == "__main__":  # the worker above, under torchrun
    torch.set_num_threads(1)
    fsdp_structure_worker(sys.argv[1])
