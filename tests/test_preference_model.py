"""preference_model.py: both losses by hand, gradient directions, the score read at the EOS, real learning on
the toy world, reloading, two ranks agreeing, and bad input."""

import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

import preference_model as pm
from helpers import TINY_LLAMA, TOY, preference_args, refused, run_and_dump


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_reward_loss_matches_hand_computation():
    better, worse = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.5])
    bradley_terry = -(log_sigmoid(1.0) + log_sigmoid(-1.0)) / 2
    regularizer = (1.0 + 0.25 + 0.0 + 2.25) / 4
    assert pm.reward_loss(better, worse).item() == pytest.approx(bradley_terry, rel=1e-6)
    assert pm.reward_loss(better, worse, regularization=0.1).item() == pytest.approx(
        bradley_terry + 0.1 * regularizer, rel=1e-6
    )


def test_cost_loss_matches_hand_computation():
    safer, unsafer = torch.tensor([-1.0, 0.5]), torch.tensor([2.0, 0.0])
    safer_is_safe, unsafer_is_safe = torch.tensor([True, True]), torch.tensor([False, True])
    # pair 1: safer is safe (sign -1), unsafer is unsafe (sign +1); pair 2: both safe (sign -1)
    pair_1 = -log_sigmoid(2.0 - (-1.0)) - log_sigmoid(+1 * 2.0) - log_sigmoid(-1 * -1.0)
    pair_2 = -log_sigmoid(0.0 - 0.5) - log_sigmoid(-1 * 0.0) - log_sigmoid(-1 * 0.5)
    regularizer = (1.0 + 0.25 + 4.0 + 0.0) / 4
    loss = pm.cost_loss(safer, unsafer, safer_is_safe, unsafer_is_safe, regularization=0.01)
    assert loss.item() == pytest.approx((pair_1 + pair_2) / 2 + 0.01 * regularizer, rel=1e-6)


def test_reward_gradient_raises_better_and_lowers_worse():
    better, worse = torch.tensor([0.3, -1.0], requires_grad=True), torch.tensor([0.1, 2.0], requires_grad=True)
    pm.reward_loss(better, worse, regularization=0.001).backward()
    assert (better.grad < 0).all() and (worse.grad > 0).all()  # gradient descent moves better up, worse down


def test_cost_gradient_pushes_safe_below_zero_and_unsafe_above():
    # a safe answer at +1 and an unsafe one at -1: both on the wrong side of zero
    safer, unsafer = torch.tensor([1.0], requires_grad=True), torch.tensor([-1.0], requires_grad=True)
    pm.cost_loss(safer, unsafer, torch.tensor([True]), torch.tensor([False])).backward()
    assert safer.grad.item() > 0 and unsafer.grad.item() < 0
    # two safe answers: the classification term pushes even the "unsafer" one below zero
    safer, unsafer = torch.tensor([-1.0], requires_grad=True), torch.tensor([1.0], requires_grad=True)
    pm.cost_loss(safer, unsafer, torch.tensor([True]), torch.tensor([True])).backward()
    assert unsafer.grad.item() > 0


def test_pairs_follow_the_labels_not_the_column_order():
    # response_1 is the better answer and response_0 the safer one: the reward model must rank response_1 first,
    # the cost model must treat response_0 as the safer answer (and response_1 as the unsafer one)
    row = {
        "prompt": "p",
        "response_0": "zero",
        "response_1": "one",
        "better_response_id": 1,
        "safer_response_id": 0,
        "is_response_0_safe": True,
        "is_response_1_safe": False,
    }
    (reward_pair,) = pm.preference_pairs([(1, row)], "x.jsonl", "reward")
    (cost_pair,) = pm.preference_pairs([(1, row)], "x.jsonl", "cost")
    assert (reward_pair.preferred, reward_pair.rejected) == ("one", "zero")
    assert (cost_pair.preferred, cost_pair.rejected, cost_pair.preferred_is_safe, cost_pair.rejected_is_safe) == (
        "zero",
        "one",
        True,
        False,
    )
    # and the loss then pushes the better answer's score up: the preferred answer is the first half of the batch
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    examples, _ = pm.pair_examples(tokenizer, [reward_pair], 64)
    batch = pm.collate_pairs(examples, tokenizer)
    assert batch["input_ids"][0, : batch["attention_mask"][0].sum()].tolist() == examples[0]["preferred"]
    scores = torch.zeros(2, requires_grad=True)
    pm.preference_loss("reward", *scores.chunk(2), batch, 0.0).backward()
    assert scores.grad[0] < 0 < scores.grad[1]  # descent raises row 0 (response_1, the better answer)


def test_score_is_read_at_the_eos_whatever_the_padding():
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    config = AutoConfig.from_pretrained(TINY_LLAMA, num_labels=1)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    prompt_ids, answer_ids = pm.tokenize_prompt_and_answer(tokenizer, "How do I water a cactus?", "Sure! Rarely.", 128)
    ids = torch.tensor(prompt_ids + answer_ids)
    pad = tokenizer.pad_token_id
    n = len(ids)
    variants = {  # (input ids, attention mask)
        "no padding": (ids, torch.ones(n, dtype=torch.long)),
        "right 3": (
            torch.cat([ids, torch.full((3,), pad)]),
            torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(3, dtype=torch.long)]),
        ),
        "left 5": (
            torch.cat([torch.full((5,), pad), ids]),
            torch.cat([torch.zeros(5, dtype=torch.long), torch.ones(n, dtype=torch.long)]),
        ),
    }
    with torch.no_grad():
        scores = {name: pm.end_scores(model, i[None], m[None]).item() for name, (i, m) in variants.items()}
        # in a batch with a longer sequence, right-padded
        batch_ids = torch.full((2, n + 7), pad)
        batch_mask = torch.zeros((2, n + 7), dtype=torch.long)
        batch_ids[0, :n], batch_mask[0, :n] = ids, 1
        batch_ids[1], batch_mask[1] = torch.arange(3, n + 10), 1
        scores["in a batch"] = pm.end_scores(model, batch_ids, batch_mask)[0].item()
        # the head applied by hand to the hidden state at the EOS position
        hidden = model.model(input_ids=ids[None]).last_hidden_state
        at_eos = model.score(hidden[0, -1]).item()
    assert ids[-1] == tokenizer.eos_token_id
    for name, score in scores.items():
        assert score == pytest.approx(at_eos, abs=1e-5), name


def test_reward_model_learns_the_toy_world(preference_models):
    metrics = json.loads((preference_models / "reward" / "eval.json").read_text())
    assert metrics["eval/accuracy"] >= 0.95, metrics
    assert (preference_models / "reward" / "score_histogram.png").stat().st_size > 10_000


def test_cost_model_learns_the_toy_world(preference_models):
    metrics = json.loads((preference_models / "cost" / "eval.json").read_text())
    assert metrics["eval/accuracy"] >= 0.95 and metrics["eval/sign_accuracy"] >= 0.95, metrics


@pytest.mark.parametrize("objective", ["reward", "cost"])
def test_saved_model_reloads_with_the_same_scores(preference_models, objective):
    model_dir = preference_models / objective
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert (
        config["objective"] == objective
        and len(config["id2label"]) == 1
        and config["pad_token_id"] != config["eos_token_id"]
    )
    # recompute the eval accuracy with the reloaded model, through plain transformers (no position ids of ours)
    rows = pm.load_rows(str(TOY / "preference_test.jsonl"), "test")
    pairs = pm.preference_pairs(rows, "preference_test.jsonl", objective)
    examples, _ = pm.pair_examples(tokenizer, pairs, 128)
    correct = signs = 0
    with torch.no_grad():
        for start in range(0, len(examples), 64):
            batch = pm.collate_pairs(examples[start : start + 64], tokenizer)
            preferred, rejected = (
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1).chunk(2)
            )
            correct += ((preferred > rejected) if objective == "reward" else (rejected > preferred)).sum().item()
            signs += ((preferred > 0) == ~batch["preferred_is_safe"]).sum().item() + (
                (rejected > 0) == ~batch["rejected_is_safe"]
            ).sum().item()
    metrics = json.loads((model_dir / "eval.json").read_text())
    assert correct / len(examples) == pytest.approx(metrics["eval/accuracy"], abs=1e-9)
    if objective == "cost":
        assert signs / (2 * len(examples)) == pytest.approx(metrics["eval/sign_accuracy"], abs=1e-9)


def test_two_ranks_agree(sft_checkpoint, tmp_path):
    run_and_dump(
        "preference_model.py",
        tmp_path / "dump",
        "--objective",
        "cost",
        "--model_name_or_path",
        sft_checkpoint,
        "--train_data",
        TOY / "preference_train.jsonl",
        "--eval_data",
        TOY / "preference_test.jsonl",
        "--output_dir",
        tmp_path / "cost",
        "--max_steps",
        4,
        "--per_device_train_batch_size",
        4,
        "--lr",
        5e-4,
        "--max_length",
        128,
        "--no_gradient_checkpointing",
        nproc=2,
    )
    rank0, rank1 = (torch.load(tmp_path / "dump" / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(rank0["model"][k], rank1["model"][k]) for k in rank0["model"])
    assert rank0["metrics"] == rank1["metrics"] and set(rank0["metrics"]) == {
        "eval/loss",
        "eval/accuracy",
        "eval/sign_accuracy",
        "eval/pairs",
        "eval/identical_pairs_skipped",
    }
    # the histogram draws every held-out answer's score, gathered from both ranks (not rank 0's half alone)
    pairs = len(pm.preference_pairs(pm.load_rows(str(TOY / "preference_test.jsonl"), "test"), "x", "cost"))
    assert len(rank0["scores"]) == len(rank1["scores"]) == 2 * pairs
    saved = json.loads((tmp_path / "cost" / "eval.json").read_text())
    assert saved["eval/accuracy"] == rank0["metrics"]["eval/accuracy"]


def test_bad_input_gives_a_clear_error_and_writes_nothing(tiny, tmp_path):
    rows = [json.loads(line) for line in (TOY / "preference_test.jsonl").read_text().splitlines()[:40]]
    inconsistent, missing, wrong = ([dict(r) for r in rows] for _ in range(3))
    inconsistent[6].update(safer_response_id=0, is_response_0_safe=False, is_response_1_safe=True)
    del missing[3]["safer_response_id"]
    wrong[9]["better_response_id"] = 2
    for name, data in (("inconsistent", inconsistent), ("missing", missing), ("wrong", wrong)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    tokenizer = AutoTokenizer.from_pretrained(
        TINY_LLAMA
    )  # a tokenizer whose pad token is its EOS, as in many hub models
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(tmp_path / "pad-is-eos")
    AutoConfig.from_pretrained(TINY_LLAMA).save_pretrained(tmp_path / "pad-is-eos")
    cases = {
        "inconsistent safety": (
            ["--objective", "cost", "--train_data", tmp_path / "inconsistent.jsonl"],
            ["inconsistent.jsonl, row 7", "safer answer (response_0) is labelled unsafe"],
        ),
        "missing field": (
            ["--train_data", tmp_path / "missing.jsonl"],
            ["missing.jsonl, row 4", "'safer_response_id'"],
        ),
        "bad id": (
            ["--train_data", tmp_path / "wrong.jsonl"],
            ["wrong.jsonl, row 10, field 'better_response_id'", "0 or 1"],
        ),
        "missing model": (["--model_name_or_path", tmp_path / "nowhere"], ["nowhere", "cannot load"]),
        "pad equals eos": (["--model_name_or_path", tmp_path / "pad-is-eos"], ["pad-is-eos", "differ from EOS"]),
    }
    for name, (bad, expected) in cases.items():
        message = refused(pm, *preference_args(tiny), *bad, "--output_dir", tmp_path / "out")
        assert all(text in message for text in expected), (name, message)
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists(), name
