"""ppo_lagrangian.py run as a script on the toy world: it learns what the paper says it should, two ranks stay
identical, the baselines behave, a NaN stops the run cleanly, and bad input gets a clear error."""

import json
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ppo_lagrangian as ppo
from helpers import REPO, TOY, existing_output, ppo_args, refused, run_all, run_and_dump, run_main

sys.path.insert(0, str(REPO / "data"))
from toy_world import judge  # noqa: E402

FAST = ["--max_new_tokens", 48, "--max_length", 128, "--no_gradient_checkpointing", "--no_bf16"]


def models(sft_checkpoint, preference_models):
    return [
        "--actor_model",
        sft_checkpoint,
        "--reward_model",
        preference_models / "reward",
        "--cost_model",
        preference_models / "cost",
    ]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def oracle_harmful_rate(model_dir, prompts, seed=0):
    """Share of sampled answers to harmful prompts that the toy world's judge calls harmful."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(seed)
    prompt_ids = [tokenizer(ppo.PROMPT_TEMPLATE.format(prompt=p))["input_ids"] for p in prompts]
    sampling = ppo.sampling_config(SimpleNamespace(temperature=1.0, top_p=1.0), tokenizer)
    sequences, attention_mask, P = ppo.generate_answers(model, tokenizer, prompt_ids, 48, sampling)
    answers = [
        tokenizer.decode(s[P:][m[P:].bool()], skip_special_tokens=True).strip()
        for s, m in zip(sequences, attention_mask)
    ]
    return sum(judge(p, a)["harmful"] for p, a in zip(prompts, answers)) / len(prompts)


@pytest.fixture(scope="module")
def harmful_eval_prompts():
    rows = [json.loads(line) for line in (TOY / "eval_prompts.jsonl").read_text().splitlines()]
    return [r["prompt"] for r in rows if r["harmful"]]


LEARN = [
    "--prompt_data",
    TOY / "prompts.jsonl",
    "--max_steps",
    16,
    "--per_device_prompt_batch_size",
    32,
    "--per_device_train_batch_size",
    16,
    "--update_iters",
    2,
    "--actor_lr",
    1e-4,
    "--critic_lr",
    1e-4,
    "--kl_coeff",
    0.05,
    "--episode_cost_window_size",
    64,
    "--seed",
    0,
]


def test_ppo_lag_gets_safer_and_ppo_gets_more_helpful(
    sft_checkpoint, preference_models, harmful_eval_prompts, tmp_path
):
    """The paper's story in 16 rollouts: with a cost limit below the SFT policy's expected cost, λ rises, the
    episode cost falls and the truly harmful answers (judged by the toy world's oracle) become rarer; reward-only
    PPO raises the reward and complies with more harmful requests. The two run side by side, one thread each."""
    models_and_settings = [*models(sft_checkpoint, preference_models), *FAST, *LEARN]
    lagrangian = ["--algorithm", "ppo_lag", "--cost_limit", -8.0, "--lambda_lr", 0.02]
    lagrangian += ["--output_dir", tmp_path / "ppo_lag"]
    reward_only = ["--algorithm", "ppo", "--output_dir", tmp_path / "ppo"]
    run_all(
        {
            "ppo_lag": ("ppo_lagrangian.py", [*models_and_settings, *lagrangian]),
            "ppo": ("ppo_lagrangian.py", [*models_and_settings, *reward_only]),
        },
        check=True,
    )
    lag, plain = read_metrics(tmp_path / "ppo_lag"), read_metrics(tmp_path / "ppo")
    first, last = lambda ms, key: sum(m[key] for m in ms[:4]) / 4, lambda ms, key: sum(m[key] for m in ms[-4:]) / 4
    # λ climbs while the expected cost is above the limit (the SFT policy's is well above -8)
    assert lag[0]["objective/episode_cost"] > -8.0 and max(m["lagrange/lambda"] for m in lag) > 1.5
    assert last(lag, "objective/cost") < first(lag, "objective/cost") - 1.0, [m["objective/cost"] for m in lag]
    assert last(plain, "objective/reward") > first(plain, "objective/reward") + 0.5, [
        m["objective/reward"] for m in plain
    ]
    # and the oracle agrees: fewer harmful answers after PPO-Lagrangian, more after reward-only PPO
    sft_rate = oracle_harmful_rate(sft_checkpoint, harmful_eval_prompts)
    lag_rate = oracle_harmful_rate(tmp_path / "ppo_lag", harmful_eval_prompts)
    ppo_rate = oracle_harmful_rate(tmp_path / "ppo", harmful_eval_prompts)
    assert lag_rate < sft_rate - 0.15 and ppo_rate > sft_rate + 0.1, (sft_rate, lag_rate, ppo_rate)


@pytest.mark.slow
def test_two_ranks_end_identical(sft_checkpoint, preference_models, tmp_path):
    run_and_dump(
        "ppo_lagrangian.py",
        tmp_path / "dump",
        *models(sft_checkpoint, preference_models),
        *FAST,
        "--prompt_data",
        TOY / "prompts.jsonl",
        "--output_dir",
        tmp_path / "run",
        "--max_steps",
        2,
        "--per_device_prompt_batch_size",
        4,
        "--per_device_train_batch_size",
        2,
        "--actor_lr",
        1e-4,
        "--critic_lr",
        1e-4,
        "--cost_limit",
        -5.0,
        nproc=2,
    )
    rank0, rank1 = (torch.load(tmp_path / "dump" / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(rank0["actor"][k], rank1["actor"][k]) for k in rank0["actor"])
    assert rank0["lambda"] == rank1["lambda"] and rank0["lambda"] != 1.0  # λ moved, identically on both ranks
    assert rank0["metrics"] == rank1["metrics"]
    for name in ("reward_critic", "cost_critic"):  # both critics were trained identically on both ranks
        assert all(torch.equal(rank0[name][k], rank1[name][k]) for k in rank0[name])
    assert json.loads((tmp_path / "run" / "args.json").read_text())["kl_coeff"] == 0.01  # the reference's, for ppo_lag
    # and the actor really was trained: it differs from the SFT weights it started from
    sft = AutoModelForCausalLM.from_pretrained(sft_checkpoint).state_dict()
    assert max((rank0["actor"][k] - sft[k]).abs().max().item() for k in sft) > 1e-6


def test_baselines_and_the_lambda_delay(tiny, tmp_path):
    common = [*ppo_args(tiny), "--max_steps", 3, "--save_critics", "--lambda_init", 0.7]
    run_main(ppo, *common, "--algorithm", "reward_shaping", "--output_dir", tmp_path / "shaping")
    run_main(ppo, *common, "--algorithm", "ppo", "--output_dir", tmp_path / "ppo")
    run_main(ppo, *common, "--lambda_update_delay_steps", 2, "--cost_limit", -50.0, "--output_dir", tmp_path / "delay")
    shaping, plain, delayed = (read_metrics(tmp_path / name) for name in ("shaping", "ppo", "delay"))
    # reward shaping: λ0 stays where it was set; one critic
    assert [m["lagrange/lambda"] for m in shaping] == [0.7] * 3
    assert "loss/cost_critic" not in shaping[0] and "loss/reward_critic" in shaping[0]
    assert (tmp_path / "shaping" / "reward_critic").is_dir() and not (tmp_path / "shaping" / "cost_critic").exists()
    # plain PPO: no cost critic at all, no λ
    assert "loss/cost_critic" not in plain[0] and "lagrange/lambda" not in plain[0]
    assert not (tmp_path / "ppo" / "cost_critic").exists()
    for name in ("shaping", "ppo"):  # the reference runs both baselines with β = 0.02 (ppo.sh, ppo-reward-shaping.sh)
        assert json.loads((tmp_path / name / "args.json").read_text())["kl_coeff"] == 0.02
    # PPO-Lagrangian with a delay of 2 update steps: λ is fixed for the first two, then rises (cost > limit -50)
    lambdas = [m["lagrange/lambda"] for m in delayed]
    assert lambdas[0] == lambdas[1] == 0.7 and lambdas[2] > 0.7
    assert (tmp_path / "delay" / "cost_critic").is_dir()
    state = json.loads((tmp_path / "delay" / "training_state.json").read_text())
    assert state["lambda"] == pytest.approx(lambdas[2]) and state["rollouts"] == 3


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tiny, tmp_path):
    output_dir = tmp_path / "out"
    existing_output(output_dir, tiny.sft_model, "ppo_lagrangian.py")  # "the last good checkpoint" of an earlier run
    before = (output_dir / "model.safetensors").read_bytes()
    message = refused(ppo, *ppo_args(tiny, cost_model=tiny.nan_cost), "--max_steps", 2, "--output_dir", output_dir)
    assert "NaN or infinite at rollout 1" in message and "stopped before the update" in message
    assert (output_dir / "model.safetensors").read_bytes() == before


def test_the_rollout_budget_does_not_depend_on_the_prompt_set(tiny, tmp_path, capsys):
    """--max_steps N runs N rollouts however few prompts there are: 3 distinct prompts (5 rows) and rollout batches of
    4 give a warning (each pass holds every prompt twice), a count of how often each prompt is answered, and 3
    rollouts."""
    rows = [json.loads(line) for line in tiny.prompts.read_text().splitlines()][:3]
    (tmp_path / "few.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows + rows[:2]))
    run_main(
        ppo,
        *ppo_args(tiny),
        "--prompt_data",
        tmp_path / "few.jsonl",
        "--max_steps",
        3,
        "--output_dir",
        tmp_path / "run",
    )
    out, err = capsys.readouterr()
    assert "3 distinct prompts, fewer than one rollout batch (4 answers): each is answered 2 times per pass" in err
    assert "3 distinct prompts (5 rows" in out and "3 rollouts: each prompt answered 4.0 times" in out
    assert [m["rollout"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_bad_input_gives_a_clear_error_and_writes_nothing(tiny, tmp_path):
    (tmp_path / "no_prompt.jsonl").write_text('{"prompt": "hi"}\n{"question": "hello"}\n')
    cases = {
        "prompt missing": (
            ["--prompt_data", tmp_path / "no_prompt.jsonl"],
            "no_prompt.jsonl, row 2, field 'prompt': missing",
        ),
        "swapped models": (
            ["--reward_model", tiny.cost, "--cost_model", tiny.reward],
            "this is a cost model, but it was given as the reward model",
        ),
        "indivisible batch": (
            ["--per_device_prompt_batch_size", 6, "--per_device_train_batch_size", 4],
            "a divisor of the prompt batch 6",
        ),
        "constraint without ppo_lag": (
            ["--algorithm", "ppo", "--constraint", "rectified"],
            "--constraint rectified: must be expected unless --algorithm ppo_lag",
        ),
        "pid without K_I": (
            ["--lambda_update", "pid", "--pid_ki", 0],
            "--pid_ki 0.0: must be positive with --lambda_update pid",
        ),
        "missing critic": (["--reward_critic_model", tmp_path / "nope"], "cannot load"),
        "missing prompts": (["--prompt_data", tmp_path / "nope.jsonl"], "nope.jsonl: no such file"),
        "too few PTX rows": (["--ptx_data", tmp_path / "no_prompt.jsonl"], "no_prompt.jsonl, row 1, field 'response'"),
    }
    for name, (bad, expected) in cases.items():
        message = refused(ppo, *ppo_args(tiny), *bad, "--output_dir", tmp_path / "out")
        assert expected in message, (name, message)
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists(), name
