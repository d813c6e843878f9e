import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the stage scripts are importable modules: `import sft`
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TRAINED = {"sft_checkpoint", "preference_models"}  # fixtures that train a model: a test that uses one is slow


def pytest_collection_modifyitems(items):
    """The fast tier (`-m "not slow"`) leaves out every test marked slow and every test that needs a trained model."""
    for item in items:
        if TRAINED & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def sft_checkpoint(tmp_path_factory):
    """A short SFT run from scratch on the toy world, shared by the tests of the later stages."""
    from helpers import TINY_LLAMA, TOY, run_script

    output_dir = tmp_path_factory.mktemp("sft") / "model"
    run_script(
        "sft.py",
        "--model_name_or_path",
        TINY_LLAMA,
        "--from_scratch",
        "--train_data",
        TOY / "sft.jsonl",
        "--output_dir",
        output_dir,
        "--epochs",
        8,
        "--lr",
        3e-3,
        "--lr_warmup_ratio",
        0.03,
        "--per_device_train_batch_size",
        32,
        "--gradient_accumulation_steps",
        1,
        "--max_length",
        128,
        "--no_gradient_checkpointing",
        "--seed",
        0,
        "--report_to",
        "tensorboard",
    )
    return output_dir


@pytest.fixture(scope="session")
def preference_models(sft_checkpoint, tmp_path_factory):
    """The reward model and the cost model trained from the shared SFT checkpoint (OUT/reward, OUT/cost). 120 steps,
    about half an epoch: both reach full training accuracy within 60 steps, and CI must stay under 12 minutes."""
    from helpers import TOY, run_script

    out = tmp_path_factory.mktemp("preference")
    common = [
        "--model_name_or_path",
        sft_checkpoint,
        "--train_data",
        TOY / "preference_train.jsonl",
        "--eval_data",
        TOY / "preference_test.jsonl",
        "--epochs",
        1,
        "--max_steps",
        120,
        "--lr",
        5e-4,
        "--per_device_train_batch_size",
        16,
        "--max_length",
        128,
        "--no_gradient_checkpointing",
        "--seed",
        0,
    ]
    for objective in ("reward", "cost"):
        run_script("preference_model.py", "--objective", objective, "--output_dir", out / objective, *common)
    return out


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """An SFT checkpoint (the tiny Llama from its config, untrained), a reward and a cost model on it (a new score head,
    `objective` in the config, as preference_model.py saves them), a cost model whose scores are all NaN, and the first
    rows of the toy world's data files."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from helpers import TINY_LLAMA, TOY

    root = tmp_path_factory.mktemp("tiny")
    data = {
        "sft": ("sft.jsonl", 64),
        "preference": ("preference_train.jsonl", 64),
        "preference_eval": ("preference_test.jsonl", 16),
        "prompts": ("prompts.jsonl", 32),
        "eval_prompts": ("eval_prompts.jsonl", 16),
    }
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
