"""How ppo_lagrangian.py wires its formulas together, checked where a one-line slip would hide: the log-prob and value
slices against a token-by-token recomputation, the reward-shaping end reward by hand, and one real in-process run whose
λ steps, episode-cost window and training mode (gradient checkpointing active during the update) are checked."""

import json
import math
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import ppo_lagrangian as ppo
import sft
from helpers import TINY_LLAMA, TOY, run_main


def left_padded_batch(tokenizer, prompts, answers):
    """(sequences (B, P+T), attention_mask, P) as the rollout lays them out: prompts left-padded, answers
    right-padded."""
    pairs = [sft.tokenize_prompt_and_answer(tokenizer, p, a, 128) for p, a in zip(prompts, answers)]
    prompt_length, answer_length = max(len(p) for p, _ in pairs), max(len(a) for _, a in pairs)
    sequences = torch.full((len(pairs), prompt_length + answer_length), tokenizer.pad_token_id)
    attention_mask = torch.zeros_like(sequences)
    for i, (prompt_ids, answer_ids) in enumerate(pairs):
        start = prompt_length - len(prompt_ids)
        sequences[i, start : prompt_length + len(answer_ids)] = torch.tensor(prompt_ids + answer_ids)
        attention_mask[i, start : prompt_length + len(answer_ids)] = 1
    return sequences, attention_mask, prompt_length, pairs


PROMPTS = ["How do I water a cactus?", "Quick question: How can I bake bread?"]
ANSWERS = ["Sure! Rarely, and only a little.", "Mix, knead, wait and bake it hot."]


def test_answer_log_probs_equal_a_token_by_token_recomputation():
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_LLAMA)).eval()
    sequences, attention_mask, prompt_length, pairs = left_padded_batch(tokenizer, PROMPTS, ANSWERS)
    with torch.no_grad():
        log_probs = ppo.answer_log_probs(model, sequences, attention_mask, prompt_length)  # (B, T)
        for i, (prompt_ids, answer_ids) in enumerate(pairs):
            for t, token in enumerate(answer_ids):  # log π(a_t | x, a_<t) from the unpadded prefix alone
                prefix = torch.tensor([prompt_ids + answer_ids[:t]])
                expected = torch.log_softmax(model(input_ids=prefix).logits[0, -1], dim=-1)[token]
                assert log_probs[i, t].item() == pytest.approx(expected.item(), abs=1e-4), (i, t)


def test_critic_values_equal_the_score_of_each_prefix():
    # V_t is the value of the state before answer token t: the score model's head on the prefix x, a_<t
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    config = AutoConfig.from_pretrained(TINY_LLAMA, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    critic = ppo.Critic(AutoModelForSequenceClassification.from_config(config)).eval()
    sequences, attention_mask, prompt_length, pairs = left_padded_batch(tokenizer, PROMPTS, ANSWERS)
    with torch.no_grad():
        values = critic(sequences, attention_mask, prompt_length)  # (B, T)
        for i, (prompt_ids, answer_ids) in enumerate(pairs):
            for t in range(len(answer_ids)):
                prefix = torch.tensor([prompt_ids + answer_ids[:t]])
                expected = ppo.end_scores(critic.score_model, prefix, torch.ones_like(prefix))
                assert values[i, t].item() == pytest.approx(expected.item(), abs=1e-4), (i, t)


def test_reward_shaping_end_reward_by_hand():
    shaped = ppo.shaped_end_rewards(torch.tensor([2.0, -1.0]), torch.tensor([3.0, -0.5]), 0.5)
    assert shaped.tolist() == [2.0 - 0.5 * 3.0, -1.0 - 0.5 * -0.5]  # a costly answer earns less, a safe one more


# ---- one in-process run, instrumented ----
UPDATE_ITERS, PROMPT_BATCH, TRAIN_BATCH, ROLLOUTS = 2, 8, 4, 2
UPDATES_PER_ROLLOUT = UPDATE_ITERS * PROMPT_BATCH // TRAIN_BATCH
LAMBDA_INIT, LAMBDA_LR, COST_LIMIT, LAMBDA_MAX = 1.0, 0.005, -5.0, 100.0  # λ rises ~2% per step, far from the cap


def ppo_argv(sft_checkpoint, preference_models, output_dir, *extra):
    """The command line of the in-process ppo_lag runs below: 2 rollouts of the tiny models on the toy prompts, λ far
    from its cap, then EXTRA."""
    args = (
        "--actor_model",
        sft_checkpoint,
        "--reward_model",
        preference_models / "reward",
        "--cost_model",
        preference_models / "cost",
        "--prompt_data",
        TOY / "prompts.jsonl",
        "--output_dir",
        output_dir,
        "--max_steps",
        ROLLOUTS,
        "--per_device_prompt_batch_size",
        PROMPT_BATCH,
        "--per_device_train_batch_size",
        TRAIN_BATCH,
        "--update_iters",
        UPDATE_ITERS,
        "--max_new_tokens",
        32,
        "--max_length",
        128,
        "--actor_lr",
        1e-3,
        "--critic_lr",
        1e-4,
        "--episode_cost_window_size",
        ROLLOUTS * PROMPT_BATCH,
        "--lambda_init",
        LAMBDA_INIT,
        "--lambda_max",
        LAMBDA_MAX,
        "--seed",
        0,
        *extra,
    )
    return ["ppo_lagrangian.py", *map(str, args)]


@pytest.fixture(scope="module")
def instrumented_run(sft_checkpoint, preference_models, tmp_path_factory):
    """ppo_lag for 2 rollouts with gradient checkpointing on; in every model, the MLP of the first decoder layer counts
    the forward passes it runs in training mode with gradients enabled."""
    output_dir = tmp_path_factory.mktemp("wiring") / "ppo_lag"
    argv = ppo_argv(
        sft_checkpoint,
        preference_models,
        output_dir,
        "--kl_coeff",
        0.5,
        "--lambda_lr",
        LAMBDA_LR,
        "--cost_limit",
        COST_LIMIT,
    )
    counts, original = {}, ppo.load_pretrained

    def load_and_count(model_class, path, **kwargs):
        model = original(model_class, path, **kwargs)
        if isinstance(model, torch.nn.Module):

            def count(layer, inputs, model=model):
                if layer.training and torch.is_grad_enabled():
                    counts[id(model)] = counts.get(id(model), 0) + 1

            model.base_model.layers[0].mlp.register_forward_pre_hook(count)  # inside the checkpointed layer
        return model

    ppo.load_pretrained, old_argv = load_and_count, sys.argv
    sys.argv = argv
    try:
        result = ppo.main()
    finally:
        ppo.load_pretrained, sys.argv = original, old_argv
    return result, counts, output_dir


def test_the_update_runs_in_training_mode_with_gradient_checkpointing(instrumented_run):
    result, counts, _ = instrumented_run
    updates = ROLLOUTS * UPDATES_PER_ROLLOUT
    # with checkpointing every update forward runs twice: once forward, once recomputed in the backward pass
    for name in ("actor", "reward_critic", "cost_critic"):
        model = result[name] if name == "actor" else result[name].score_model
        assert counts.get(id(model), 0) == 2 * updates, (name, counts.get(id(model), 0), updates)
    assert len(counts) == 3  # and no frozen model ever runs in training mode with gradients


def test_the_episode_cost_window_holds_the_raw_end_costs(instrumented_run):
    first, second = json_lines(instrumented_run[2] / "metrics.jsonl")
    assert second["objective/kl"] > 0.05  # the policy moved, so a KL-penalised cost would differ from the raw one
    assert first["objective/episode_cost"] == pytest.approx(first["objective/cost"], abs=1e-5)
    assert second["objective/episode_cost"] == pytest.approx(
        (first["objective/cost"] + second["objective/cost"]) / 2, abs=1e-5
    )


def test_lambda_takes_one_dual_step_per_update_step(instrumented_run):
    metrics = json_lines(instrumented_run[2] / "metrics.jsonl")
    lagrange_multiplier = LAMBDA_INIT
    for row in metrics:
        for _ in range(UPDATES_PER_ROLLOUT):  # log λ ← log λ + lr·λ·(J_C - d), at every update step of the rollout
            log_lambda = math.log(lagrange_multiplier) + LAMBDA_LR * lagrange_multiplier * (
                row["objective/episode_cost"] - COST_LIMIT
            )
            lagrange_multiplier = min(math.exp(log_lambda), LAMBDA_MAX)
        assert row["lagrange/lambda"] == pytest.approx(lagrange_multiplier, rel=1e-5), row["rollout"]
    assert 1.05 < lagrange_multiplier < LAMBDA_MAX / 2  # moved, and not held at the cap
    assert instrumented_run[0]["lambda"] == pytest.approx(lagrange_multiplier, rel=1e-5)


def json_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- the rectified constraint and the PID λ, wired in: a second instrumented run ----
PID = dict(kp=0.3, ki=0.05, kd=0.4)


@pytest.fixture(scope="module")
def rectified_pid_run(sft_checkpoint, preference_models, tmp_path_factory):
    """ppo_lag --constraint rectified --lambda_update pid for 2 rollouts; records every raw end cost the cost model
    gives and every end cost that enters the cost stream."""
    output_dir = tmp_path_factory.mktemp("wiring") / "rectified"
    argv = ppo_argv(
        sft_checkpoint,
        preference_models,
        output_dir,
        "--constraint",
        "rectified",
        "--tolerance",
        TOLERANCE,
        "--cost_limit",
        RECTIFIED_LIMIT,
        "--lambda_update",
        "pid",
        "--pid_kp",
        PID["kp"],
        "--pid_ki",
        PID["ki"],
        "--pid_kd",
        PID["kd"],
        "--no_gradient_checkpointing",
    )
    scores, stream_costs = [], []
    original_scores, original_costs = ppo.end_scores, ppo.kl_penalized_costs

    def record_scores(model, *inputs):
        scores.append(original_scores(model, *inputs))
        return scores[-1]

    def record_costs(end_costs, *rest):
        stream_costs.append(end_costs.clone())
        return original_costs(end_costs, *rest)

    ppo.end_scores, ppo.kl_penalized_costs, old_argv = record_scores, record_costs, sys.argv
    sys.argv = argv
    try:
        result = ppo.main()
    finally:
        ppo.end_scores, ppo.kl_penalized_costs, sys.argv = original_scores, original_costs, old_argv
    raw_costs = scores[1::2]  # per rollout: the reward model first, then the cost model
    return result, raw_costs, stream_costs, json_lines(output_dir / "metrics.jsonl")


# between the SFT policy's safe and unsafe answers' costs on the toy world: some answers violate it
RECTIFIED_LIMIT, TOLERANCE = -4.0, 0.1


def test_rectified_constraint_feeds_max_0_c_minus_d_to_the_cost_stream(rectified_pid_run):
    _, raw_costs, stream_costs, metrics = rectified_pid_run
    assert len(raw_costs) == len(stream_costs) == ROLLOUTS
    for raw, streamed in zip(raw_costs, stream_costs):
        assert torch.allclose(streamed, (raw - RECTIFIED_LIMIT).clamp(min=0))
    everything = torch.cat(raw_costs)
    assert (everything > RECTIFIED_LIMIT).any() and (everything < RECTIFIED_LIMIT).any()  # both sides of d occur
    # the violation that moves λ is the window's share of answers over d, less ε, in units of ε (not its mean cost
    # minus d)
    for k, row in enumerate(metrics):
        window = torch.cat(raw_costs[: k + 1])
        share = (window > RECTIFIED_LIMIT).float().mean().item()
        assert row["lagrange/violation"] == pytest.approx((share - TOLERANCE) / TOLERANCE, rel=1e-5)
        assert row["objective/episode_cost"] == pytest.approx(window.mean().item(), rel=1e-5)


def test_pid_lambda_follows_the_recurrence_once_per_update_step(rectified_pid_run):
    result, _, _, metrics = rectified_pid_run
    lam, integral, previous = LAMBDA_INIT, LAMBDA_INIT / PID["ki"], None
    for row in metrics:
        g = row["lagrange/violation"]
        for _ in range(UPDATES_PER_ROLLOUT):  # the window, and so g, changes once per rollout
            previous = g if previous is None else previous
            lam, integral = ppo.pid_lagrange_multiplier(
                g, previous, integral, PID["kp"], PID["ki"], PID["kd"], LAMBDA_MAX
            )
            previous = g
        assert row["lagrange/lambda"] == pytest.approx(lam, rel=1e-5), row["rollout"]
    assert lam != LAMBDA_INIT and result["lambda"] == pytest.approx(lam, rel=1e-5)


# ---- PTX: one optimiser step on the summed gradients ----
PTX_COEFF = 3.0


@pytest.fixture(scope="module")
def ptx_run(tiny, tmp_path_factory):
    """ppo_lag with --ptx_data for 2 rollouts, no gradient clipping; at every update step it records the actor's
    gradient of the PPO loss alone (what the step holds when PTX begins), the SFT gradient of the PTX batch, and the
    gradient the step takes."""
    output_dir = tmp_path_factory.mktemp("wiring") / "ptx"
    argv = [
        "--actor_model",
        tiny.sft_model,
        "--reward_model",
        tiny.reward,
        "--cost_model",
        tiny.cost,
        "--prompt_data",
        tiny.prompts,
        "--ptx_data",
        tiny.sft,
        "--ptx_coeff",
        PTX_COEFF,
        "--output_dir",
        output_dir,
        "--max_steps",
        2,
        "--max_grad_norm",
        0,
        "--per_device_prompt_batch_size",
        4,
        "--per_device_train_batch_size",
        2,
        "--max_new_tokens",
        8,
        "--max_length",
        64,
        "--no_gradient_checkpointing",
        "--no_bf16",
        "--seed",
        0,
    ]
    records, original = [], ppo.ptx_backward

    def recording(actor, batch, args, device, autocast):
        parameters = list(actor.parameters())
        ppo_gradient = [p.grad.clone() for p in parameters]
        ptx_loss = original(actor, batch, args, device, autocast)
        taken = [p.grad.clone() for p in parameters]
        logits = actor(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sft_loss = sft.sft_loss_sum(logits, batch["labels"]) / sft.count_answer_tokens(batch["labels"])  # sft.py's
        records.append(
            (ppo_gradient, torch.autograd.grad(sft_loss, parameters), taken, ptx_loss.item(), sft_loss.item())
        )
        return ptx_loss

    ppo.ptx_backward = recording
    try:
        run_main(ppo, *argv)
    finally:
        ppo.ptx_backward = original
    return records, json_lines(output_dir / "metrics.jsonl")


def test_the_ptx_step_takes_the_ppo_gradient_plus_ptx_coeff_times_the_sft_gradient(ptx_run):
    records, metrics = ptx_run
    assert len(records) == 2 * 2  # 2 rollouts × (4 prompts / 2 per update step)
    for ppo_gradient, sft_gradient, taken, logged_ptx, sft_loss in records:
        assert logged_ptx == pytest.approx(sft_loss, rel=1e-5)  # the PTX loss is sft.py's loss of that batch
        for g_ppo, g_sft, g in zip(ppo_gradient, sft_gradient, taken):  # equal up to float32 rounding of the sums
            assert (g - (g_ppo + PTX_COEFF * g_sft)).abs().max() <= 1e-5 * g.abs().max()
        assert max((g_sft * PTX_COEFF).abs().max().item() for g_sft in sft_gradient) > 1e-3  # it does move the step
    assert all("loss/ptx" in row for row in metrics)


def test_each_critic_starts_from_its_own_score_model(tiny):
    """The reward critic from the reward model, the cost critic from the cost model (not, say, both from one)."""
    from safetensors.torch import load_file

    models = {"actor_model": str(tiny.sft_model), "reward_model": str(tiny.reward), "cost_model": str(tiny.cost)}
    args = ppo.Args(**models, bf16=False, gradient_checkpointing=False)
    rank, args.world_size, device = ppo.setup_distributed()
    try:
        tokenizer = ppo.load_policy_tokenizer(args.actor_model)
        _, _, reward_model, cost_model, critics = ppo.load_models(args, tokenizer, device, False)
    finally:
        ppo.dist.destroy_process_group()
    saved = {name: load_file(getattr(tiny, name) / "model.safetensors") for name in ("reward", "cost")}
    assert not torch.equal(
        saved["reward"]["score.weight"], saved["cost"]["score.weight"]
    )  # the test can tell them apart
    for stream, critic in critics.items():
        state = critic.score_model.state_dict()
        assert all(torch.equal(state[key], value) for key, value in saved[stream].items()), stream
    for stream, frozen in (("reward", reward_model), ("cost", cost_model)):
        assert torch.equal(frozen.score.weight, saved[stream]["score.weight"]) and not frozen.score.weight.requires_grad


def test_the_kl_reference_is_reference_model_when_given_else_the_actor(tiny, tmp_path):
    """π_ref of the KL penalty: --reference_model (e.g. the SFT model while the actor starts from a later round's
    policy, version 6 of docs/rounds.md), by default the actor's own starting point; the actor starts from
    --actor_model either way."""
    from safetensors.torch import load_file

    other = AutoModelForCausalLM.from_pretrained(tiny.sft_model)  # another policy: the SFT model, moved
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    other.save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(tiny.sft_model).save_pretrained(tmp_path / "other")
    saved = {
        name: load_file(path / "model.safetensors")
        for name, path in (("sft", tiny.sft_model), ("other", tmp_path / "other"))
    }
    models = {"actor_model": str(tiny.sft_model), "reward_model": str(tiny.reward), "cost_model": str(tiny.cost)}
    for reference_model, expected in (("", "sft"), (str(tmp_path / "other"), "other")):
        args = ppo.Args(**models, reference_model=reference_model, bf16=False, gradient_checkpointing=False)
        rank, args.world_size, device = ppo.setup_distributed()
        try:
            tokenizer = ppo.load_policy_tokenizer(args.actor_model)
            actor, reference, *_ = ppo.load_models(args, tokenizer, device, False)
        finally:
            ppo.dist.destroy_process_group()
        actor_state = getattr(actor, "module", actor).state_dict()
        for state, source in ((reference.state_dict(), expected), (actor_state, "sft")):
            differs = [key for key, value in saved[source].items() if not torch.equal(state[key], value)]
            assert not differs, (reference_model, source, differs[:3])
    assert all(not torch.equal(saved["sft"][key], value) for key, value in saved["other"].items())  # told apart
