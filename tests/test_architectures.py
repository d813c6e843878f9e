"""The four stages on models that are not Llama: GPT-2 (learned positions, Conv1D layers, `transformer.` weights, a
tokenizer with no pad token) and Qwen2 (grouped-query attention, pad token = EOS, as its base models ship). Each stage
runs a few steps on a tiny model built from a config; what it saves must reload in transformers as the model it trained,
with a pad token of its own that is not EOS (the score models read a sequence's score at its EOS)."""

import json
import math

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    Qwen2Config,
)

import evaluate
import ppo_lagrangian
import preference_model
import sft
from helpers import EVALUATE_FAST, PPO_FAST, PREFERENCE_FAST, SFT_FAST, TINY_LLAMA, run_main


def gpt2(tokenizer, directory):
    """A tiny GPT-2 whose tokenizer has no pad token, not even in its vocabulary: sft.py must add one."""
    tokenizer.pad_token = None
    tokenizer.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # '<pad>' renamed: a token like any other
        (directory / name).write_text((directory / name).read_text().replace('"<pad>"', '"<unused0>"'))
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    config.save_pretrained(directory)
    return len(AutoTokenizer.from_pretrained(directory)) + 1  # the vocabulary once sft.py has added a pad token


def qwen2(tokenizer, directory):
    """A tiny Qwen2 whose tokenizer pads with its EOS, as Qwen2's base models ship: sft.py must give it another."""
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(directory)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    config.save_pretrained(directory)
    return len(AutoTokenizer.from_pretrained(directory))  # '<pad>' is in the vocabulary already: sft.py reuses it


@pytest.mark.parametrize("make_base", [gpt2, qwen2], ids=["gpt2", "qwen2"])
def test_every_stage_runs_on_another_architecture_and_saves_what_it_trained(make_base, tiny, tmp_path):
    base, out = tmp_path / "base", {name: tmp_path / name for name in ("sft", "reward", "cost", "ppo", "eval")}
    vocabulary = make_base(AutoTokenizer.from_pretrained(TINY_LLAMA), base)

    # SFT from scratch: a pad token that is not EOS, an embedding for every token, the checkpoint the trained model
    args = ["--model_name_or_path", base, "--from_scratch", "--train_data", tiny.sft, *SFT_FAST, "--max_steps", 2]
    trained = run_main(sft, *args, "--output_dir", out["sft"]).eval()
    saved_tokenizer = AutoTokenizer.from_pretrained(out["sft"])
    assert saved_tokenizer.pad_token_id is not None and saved_tokenizer.pad_token_id != saved_tokenizer.eos_token_id
    policy = AutoModelForCausalLM.from_pretrained(out["sft"]).eval()
    assert len(saved_tokenizer) == vocabulary <= policy.get_input_embeddings().num_embeddings
    ids = torch.tensor([saved_tokenizer("USER: hello ASSISTANT: hi")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(policy(ids).logits, trained(ids).logits)

    # the reward and cost models on it, each saved as the model it trained
    for objective in ("reward", "cost"):
        args = ["--objective", objective, "--model_name_or_path", out["sft"], "--train_data", tiny.preference]
        score = run_main(preference_model, *args, *PREFERENCE_FAST, "--max_steps", 2, "--output_dir", out[objective])
        with torch.no_grad():
            saved_score = AutoModelForSequenceClassification.from_pretrained(out[objective]).eval()(ids).logits
            torch.testing.assert_close(saved_score, score["model"].eval()(ids).logits)

    # one PPO-Lagrangian rollout (both critics read the score head at every answer position), the critics saved
    models = ["--actor_model", out["sft"], "--reward_model", out["reward"], "--cost_model", out["cost"]]
    args = [*models, "--prompt_data", tiny.prompts, *PPO_FAST, "--max_steps", 1, "--actor_lr_warmup_ratio", 0]
    args += ["--save_critics"]
    ppo = run_main(ppo_lagrangian, *args, "--output_dir", out["ppo"])
    actor = AutoModelForCausalLM.from_pretrained(out["ppo"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(actor(ids).logits, ppo["actor"].eval()(ids).logits)
        assert not torch.equal(actor(ids).logits, policy(ids).logits)  # the update moved the policy
    for critic in ("reward_critic", "cost_critic"):
        assert AutoModelForSequenceClassification.from_pretrained(out["ppo"] / critic).config.num_labels == 1

    # evaluation: every prompt answered by both policies, every answer scored by both models
    policies = ["--policy", f"sft={out['sft']}", f"ppo_lag={out['ppo']}", *models[2:]]
    results = run_main(
        evaluate, *policies, "--prompt_data", tiny.eval_prompts, *EVALUATE_FAST, "--output_dir", out["eval"]
    )
    answers = [json.loads(line) for line in (out["eval"] / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 2 * 4 and all(math.isfinite(a["reward"]) and math.isfinite(a["cost"]) for a in answers)
    assert set(results["policies"]) == {"sft", "ppo_lag"}
