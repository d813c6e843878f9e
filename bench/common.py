"""Shared pieces of the benchmarks: model sizes built from a config (no download), scratch checkpoints,
timing helpers and the result table. Everything written goes under a scratch directory (default /tmp/bench),
never into the repository."""

import gc
import json
import math
import os
import shutil
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOY = REPO / "data" / "toy"
TINY_LLAMA = REPO / "data" / "tiny-llama"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

if not torch.cuda.is_available():
    # On a shared CPU, more threads than free cores makes every op wait on the others (20x slower here):
    # BENCH_THREADS (default 1) threads, the same for both sides.
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))

# Llama configs, built on data/tiny-llama's config and tokenizer (2048 tokens, tied embeddings).
SIZES = {
    # the tests' model: for smoke runs of the benchmark scripts only
    "tiny": dict(
        hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4
    ),
    # ~20M parameters: the CPU benchmarks
    "20m": dict(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8
    ),
    # ~50M parameters
    "50m": dict(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=7, num_attention_heads=12, num_key_value_heads=12
    ),
    # ~0.5B parameters: the GPU benchmarks
    "0.5b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=10, num_attention_heads=16, num_key_value_heads=16
    ),
}

H100_BF16_DENSE_FLOPS = 989e12  # H100 SXM5 dense bf16 peak (NVIDIA data sheet), the MFU denominator


# The optimiser both sides of a throughput benchmark use (the reference's scripts/*.sh): AdamW, betas (0.9, 0.95),
# eps 1e-8, no weight decay, gradient clipping at 1.0, cosine schedule with 3% warm-up. As our scripts' flags:
def optimiser_flags(lr):
    return ["--lr", lr, "--weight_decay", 0.0, "--adam_beta1", 0.9, "--adam_beta2", 0.95, "--max_grad_norm", 1.0,
            "--lr_scheduler", "cosine", "--lr_warmup_ratio", 0.03]  # fmt: skip


# ... and as TRL / transformers TrainingArguments keywords, for a run of total_steps optimiser steps
def trainer_optimiser(lr, total_steps):
    return dict(learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=math.ceil(0.03 * total_steps),
                weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0,
                optim="adamw_torch")  # fmt: skip


def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def config_dir(size, scratch):
    """A model directory holding only config.json and the tiny-llama tokenizer: sft.py --from_scratch reads it."""
    path = Path(scratch) / "models" / f"{size}-config"
    if not (path / "config.json").exists():
        path.mkdir(parents=True, exist_ok=True)
        config = json.loads((TINY_LLAMA / "config.json").read_text())
        config.update(SIZES[size])
        (path / "config.json").write_text(json.dumps(config, indent=2))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(TINY_LLAMA / name, path / name)
    return path


def sft_checkpoint(size, scratch):
    """A randomly initialised causal LM (seed 0) saved as a Hugging Face checkpoint: the 'SFT model' that the
    reward-model and PPO benchmarks start from (throughput does not depend on the weights' values)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(scratch) / "models" / f"{size}-sft"
    if not (path / "config.json").exists():
        source = config_dir(size, scratch)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
        tmp = Path(f"{path}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
        tmp.rename(path)
    return path


def score_checkpoint(size, scratch, objective):
    """A reward or cost model (AutoModelForSequenceClassification, num_labels=1) from the SFT checkpoint, with the
    config.objective that ppo_lagrangian.py checks."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(scratch) / "models" / f"{size}-{objective}"
    if not (path / "config.json").exists():
        source = sft_checkpoint(size, scratch)
        torch.manual_seed(1 if objective == "reward" else 2)
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1)
        tokenizer = AutoTokenizer.from_pretrained(source)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.objective = objective
        tmp = Path(f"{path}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(path)
    return path


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def describe_device():
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"


@contextmanager
def patched(target, **replacements):
    """Replace attributes of a module for the duration of a `with` block. The stage scripts look their helpers up
    by global name at call time, so a patched `sft.log_metrics` is the one that their training loop calls."""
    saved = {name: getattr(target, name) for name in replacements}
    for name, value in replacements.items():
        setattr(target, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(target, name, value)


def run_main(module, argv):
    """Run a stage script's main() in this process, as `python SCRIPT ARGV...` would."""
    saved = sys.argv
    sys.argv = [f"{module.__name__}.py", *map(str, argv)]
    try:
        return module.main()
    finally:
        sys.argv = saved


def median(values):
    return statistics.median(values)


def report(title, unit, ours, theirs, target, names=("ours", "TRL"), extra=None):
    """Print the per-repeat figures, the medians and the ratio; return a dict for the JSON record."""
    ours_median, theirs_median = median(ours), median(theirs)
    ratio = ours_median / theirs_median
    print(f"\n== {title} ({describe_device()})")
    print(f"{names[0]:>12}: " + ", ".join(f"{v:,.1f}" for v in ours) + f"  -> median {ours_median:,.1f} {unit}")
    print(f"{names[1]:>12}: " + ", ".join(f"{v:,.1f}" for v in theirs) + f"  -> median {theirs_median:,.1f} {unit}")
    print(f"{'ratio':>12}: {ratio:.3f}  (target >= {target}: {'met' if ratio >= target else 'NOT met'})")
    record = {
        "benchmark": title,
        "device": describe_device(),
        "unit": unit,
        names[0]: ours,
        names[1]: theirs,
        f"{names[0]}_median": ours_median,
        f"{names[1]}_median": theirs_median,
        "ratio": ratio,
        "target": target,
    }
    if extra:
        record.update(extra)
        for key, value in extra.items():
            print(f"{key:>12}: {value}")
    return record


def save_record(record, path):
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")


def common_arguments(parser, default_size):
    parser.add_argument(
        "--size", default=default_size, choices=sorted(SIZES), help="Llama config (see bench/common.py)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per side (alternating sides)")
    parser.add_argument(
        "--scratch", default=os.environ.get("BENCH_SCRATCH", "/tmp/bench"), help="where models and runs go"
    )
    parser.add_argument("--json", default="", help="append the result as one JSON line to this file")
    return parser
