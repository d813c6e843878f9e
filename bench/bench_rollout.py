"""PPO rollout throughput: ppo_lagrangian.generate_answers (the rollout of ppo_lagrangian.py, step 1) against a
bare `model.generate` call on the same prompts and settings: what our rollout machinery costs on top of
generation.

Model: a randomly initialised Llama (built from a config) loaded the way ppo_lagrangian.py loads the actor
(fp32 weights; the rollout runs outside autocast, as in main()). Prompts: data/toy/prompts.jsonl, templated and
tokenised as main() does, in batches of --batch_size (the same batches for both sides). Settings on both sides:
sampling at temperature 1, top_p 1, top_k 0 (the full policy), --max_new_tokens, KV cache, left padding, EOS
and pad ids from the tokenizer.

What is timed, per batch (after a CUDA synchronise on both ends):
  ours: generate_answers(model, tokenizer, prompt_ids, max_new_tokens) - from Python lists of prompt ids to the
        (sequences, attention_mask, P) that PPO uses: left-padding, the GenerationConfig (with suppress_tokens=[pad]),
        generate, and masking everything after the first EOS.
  bare: model.generate(input_ids, attention_mask, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
        max_new_tokens, pad/eos ids) on the same left-padded tensors, already on the device (built untimed).
Throughput = answer tokens (up to and including each answer's first EOS) / time. With random weights the
answers rarely end early, so both sides decode max_new_tokens steps. The first --warmup batches are untimed;
the sides alternate batch by batch; the median over batches of each side and the ratio are printed.

    python bench/bench_rollout.py --size 20m --batch_size 16 --max_new_tokens 32 --batches 5
"""

import argparse
import time
from types import SimpleNamespace

import torch
from common import TOY, common_arguments, device, free_memory, median, report, save_record, sft_checkpoint, sync

import ppo_lagrangian as ppo


def answer_tokens(answers, eos):
    """Tokens up to and including the first EOS of each row, summed."""
    is_eos = answers == eos
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return int((~after_eos).sum())


def main():
    parser = common_arguments(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter), "20m"
    )
    parser.add_argument("--batch_size", type=int, default=16, help="prompts per rollout")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, default=5, help="timed batches per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches per side")
    parser.add_argument(
        "--autocast_bf16",
        action="store_true",
        help="also time bare generate under bf16 autocast (CUDA; not what ppo_lagrangian.py does)",
    )
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = sft_checkpoint(args.size, args.scratch)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device())
    model.config.pad_token_id = tokenizer.pad_token_id
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id

    prompts = list(dict.fromkeys(row["prompt"] for _, row in ppo.load_rows(str(TOY / "prompts.jsonl"), "train")))
    prompt_ids = [tokenizer(ppo.PROMPT_TEMPLATE.format(prompt=p))["input_ids"] for p in prompts]
    n_batches = args.warmup + args.batches
    batches = [prompt_ids[i * args.batch_size : (i + 1) * args.batch_size] for i in range(n_batches)]
    assert all(len(b) == args.batch_size for b in batches), "not enough prompts for that many batches"

    def left_padded(batch):
        length = max(map(len, batch))
        input_ids = torch.full((len(batch), length), pad)
        mask = torch.zeros_like(input_ids)
        for i, ids in enumerate(batch):
            input_ids[i, length - len(ids) :], mask[i, length - len(ids) :] = torch.tensor(ids), 1
        return input_ids.to(device()), mask.to(device())

    sampling = ppo.sampling_config(SimpleNamespace(temperature=1.0, top_p=1.0), tokenizer)  # the rollout's

    def time_ours(batch):
        sync()
        start = time.perf_counter()
        sequences, attention_mask, P = ppo.generate_answers(model, tokenizer, batch, args.max_new_tokens, sampling)
        sync()
        return int(attention_mask[:, P:].sum()) / (time.perf_counter() - start)

    def time_bare(batch, autocast=False):
        input_ids, mask = left_padded(batch)
        sync()
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast(device().type, dtype=torch.bfloat16, enabled=autocast):
            sequences = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=args.max_new_tokens,
                pad_token_id=pad,
                eos_token_id=eos,
            )
        sync()
        return answer_tokens(sequences[:, input_ids.shape[1] :], eos) / (time.perf_counter() - start)

    model.eval()
    ours, bare, bare_bf16 = [], [], []
    for index, batch in enumerate(batches):
        torch.manual_seed(index)
        o = time_ours(batch)
        torch.manual_seed(index)
        b = time_bare(batch)
        a = time_bare(batch, autocast=True) if args.autocast_bf16 and torch.cuda.is_available() else None
        if index >= args.warmup:
            ours.append(o)
            bare.append(b)
            if a is not None:
                bare_bf16.append(a)
    extra = {
        "size": args.size,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "timed_batches": args.batches,
        "model_dtype": "float32 (as the PPO actor)",
    }
    if bare_bf16:
        extra["bare_generate_bf16_autocast_median"] = round(median(bare_bf16), 1)
    save_record(
        report(
            "PPO rollout throughput (answer tokens/s)", "tokens/s", ours, bare, 0.9, names=("ours", "bare"), extra=extra
        ),
        args.json,
    )
    model = None  # freed before the next side runs
    free_memory()


if __name__ == "__main__":
    main()
