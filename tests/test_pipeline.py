"""run_pipeline.sh --smoke: every stage runs, in order, on both toy worlds, with the same settings, and every output
appears; and everything it checks before the first stage, its output marker, its lock, its one line per failure."""

import fcntl
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from helpers import REPO

spec = importlib.util.spec_from_file_location("toy_world", REPO / "data" / "toy_world.py")
tw = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tw)

POLICIES = ["ppo", "reward_shaping", "ppo_lag", "ppo_lag_d0", "ppo_lag_rectified"]
PATH_ARGS = {
    "actor_model",
    "reward_model",
    "cost_model",
    "prompt_data",
    "output_dir",
    "model_name_or_path",
    "train_data",
    "eval_data",
    "policy",
    "judge",
}


def pipeline(*args, cwd=REPO, timeout=900):
    return subprocess.run(
        ["bash", str(REPO / "run_pipeline.sh"), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def pipelines_side_by_side(runs, timeout=900):
    """{name: (args, cwd)} run at the same time, one thread each (a core each on 2 cores): {name: CompletedProcess}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = {
        name: subprocess.Popen(
            ["bash", str(REPO / "run_pipeline.sh"), *map(str, args)],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (args, cwd) in runs.items()
    }
    finished = {}
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=timeout)
        finished[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return finished


HAND_BUILT_JUDGE = """from toy_world import REDTEAM_OPENERS, judge as oracle


def judge(prompt, answer):  # the oracle, except that a red-team prompt fails whenever the answer's length is odd
    verdict = oracle(prompt, answer)
    return verdict | {"harmful": verdict["harmful"] or (prompt.startswith(REDTEAM_OPENERS) and len(answer) % 2 == 1)}


def compare(prompt, answer_0, answer_1):  # the longer answer is the more helpful; no view on which is safer
    longer = None if len(answer_0) == len(answer_1) else int(len(answer_1) > len(answer_0))
    return {"better_response_id": longer, "safer_response_id": None}
"""


def hand_built_harmful(prompt, answer):
    return tw.judge(prompt, answer)["harmful"] or (prompt.startswith(tw.REDTEAM_OPENERS) and len(answer) % 2 == 1)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):  # (the tests that use it are marked slow: two pipelines, about 3 minutes)
    """--smoke on both toy worlds: {world: (OUT, the completed process)}. The toy world runs round 1 only (the default
    judge, toy; --rounds 1 keeps CI short); the small world two rounds, run from another directory with relative paths,
    as a user's own data and annotator would be: a copy of the world in "my data", a hand-built judge file ok.py that
    imports the oracle from beside it, --out myrun."""
    out = tmp_path_factory.mktemp("toy") / "runs"
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    shutil.copytree(REPO / "data" / "toy_small", elsewhere / "my data")
    shutil.copy(REPO / "data" / "toy_world.py", elsewhere / "toy_world.py")  # a module beside the judge file
    (elsewhere / "ok.py").write_text(HAND_BUILT_JUDGE)
    small = ("--smoke", "--data", "my data", "--judge", "ok.py", "--out", "myrun", "--seed", 1, "--rounds", 2)
    results = pipelines_side_by_side(
        {
            "toy": (("--smoke", "--data", "data/toy", "--out", out, "--seed", 1, "--rounds", 1), REPO),
            "toy_small": (small, elsewhere),
        }
    )
    runs = {"toy": (out, results["toy"]), "toy_small": (elsewhere / "myrun", results["toy_small"])}
    for world, (_, result) in runs.items():
        assert result.returncode == 0, world + "\n" + result.stdout[-3000:] + result.stderr[-6000:]
    assert not (REPO / "myrun").exists()  # written where the caller meant, not into the repository
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("world", ["toy", "toy_small"])
def test_smoke_pipeline_runs_every_stage_and_writes_every_file(smoke_runs, world):
    out, result = smoke_runs[world]
    stages = [line.split()[0] for line in (out / "timings.txt").read_text().splitlines()]
    assert stages[:9] == ["sft", "reward", "cost", *POLICIES, "evaluate"]
    for model in ["sft", "reward", "cost", *POLICIES]:
        assert (out / model / "model.safetensors").is_file() and (out / model / "args.json").is_file(), model
    assert json.loads((out / "cost" / "config.json").read_text())["objective"] == "cost"
    assert stages[9:11] == ["evaluate/judge", "evaluate/report"]  # label.py's verdicts, bench/report.py's tables
    for name in (
        "answers.jsonl",
        "results.json",
        "labelled_answers.jsonl",
        "labels.json",
        "report.md",
        "reward_vs_cost.png",
        "elo.png",
        "training_curves.png",
    ):
        assert (out / "eval" / name).is_file(), name
    assert (out / "training_curves.png").is_file()
    results = json.loads((out / "eval" / "results.json").read_text())
    assert list(results["policies"]) == ["sft", *POLICIES]
    assert {json.loads(line)["policy"] for line in (out / "eval" / "answers.jsonl").read_text().splitlines()} == {
        "sft",
        *POLICIES,
    }
    labels = json.loads((out / "eval" / "labels.json").read_text())["policies"]
    assert "oracle_harmful_rate" in labels["sft"]["harmful_prompts"]  # the oracle judges both toy worlds
    assert (out / "cost" / "score_histogram.png").is_file()
    # the seed reached every stage, and the printed table is the evaluation's
    for model in ("sft", "reward", "ppo_lag"):
        assert json.loads((out / model / "args.json").read_text())["seed"] == 1
    assert "| ppo_lag_rectified |" in result.stdout and "total" in result.stdout.splitlines()[-1]
    # the three Lagrangian runs differ in their constraint only
    lagrangian = {
        name: json.loads((out / name / "args.json").read_text())
        for name in ("ppo_lag", "ppo_lag_d0", "ppo_lag_rectified")
    }
    assert [(a["constraint"], a["cost_limit"]) for a in lagrangian.values()] == [
        ("expected", -8.5),
        ("expected", 0.0),
        ("rectified", 0.0),
    ]
    differing = {key for a in lagrangian.values() for key in a if a[key] != lagrangian["ppo_lag"][key]}
    assert differing == {"constraint", "cost_limit", "output_dir"}
    assert lagrangian["ppo_lag"]["max_steps"] == 2  # the budget is in rollouts (smoke: 2)


ROUND_2 = [
    "round-2/label",
    "round-2/label/judge",
    "round-2/label-2",
    "round-2/label-2/judge",
    "round-2/redteam",
    "round-2/redteam/judge",
    "round-2/reward",
    "round-2/cost",
    "round-2/new_pairs_new",
    "round-2/new_pairs_previous",
    "round-2/ppo_lag",
    "round-2/evaluate",
    "round-2/evaluate/judge",
    "rounds/evaluate",
    "rounds/evaluate/judge",
    "rounds/redteam",
    "rounds/redteam/judge",
]


@pytest.mark.slow
def test_a_second_round_labels_searches_retrains_and_runs_ppo_again(smoke_runs):
    out, result = smoke_runs["toy_small"]
    data, harmful = out.parent / "my data", hand_built_harmful
    stages = [line.split()[0] for line in (out / "timings.txt").read_text().splitlines()]
    round_2 = out / "round-2"
    scored = (round_2 / "new_pairs_test.jsonl").read_text().strip()  # no held-out new pairs: nothing to score them on
    assert stages[11:] == [stage for stage in ROUND_2 if scored or "new_pairs" not in stage]
    # 1. fresh prompts: the next distinct prompts of prompts.jsonl (the first row of each); 4 answers of round 1's
    #    policy to each (--smoke; the rule is tested below), all 6 pairs labelled; far fewer than a quarter of round
    #    1's 4,000 pairs, so a second pass (--smoke: the last) labels the next 8 prompts with a seed of its own
    prompts = (data / "prompts.jsonl").read_text().splitlines()
    first_rows = {}
    for line in prompts:
        first_rows.setdefault(json.loads(line)["prompt"], line)
    fresh, answers = [], {}
    for n, name in enumerate(["label", "label-2"]):
        prompts_file = round_2 / f"{name.replace('label', 'label_prompts')}.jsonl"
        assert prompts_file.read_text().splitlines() == list(first_rows.values())[8 * n : 8 * n + 8]
        label_args = json.loads((round_2 / name / "args.json").read_text())
        assert label_args["policy"] == [f"current={out / 'ppo_lag'}"] and label_args["samples_per_prompt"] == 4
        assert label_args["seed"] == 1 + 2 + 100 * n
        labelled = json.loads((round_2 / name / "labels.json").read_text())["labelled_pairs"]
        rows = [json.loads(line) for line in (round_2 / name / "labelled_pairs.jsonl").read_text().splitlines()]
        assert labelled["pairs"] == 8 * 6 and labelled["written"] == len(rows)
        fresh += rows
        for answer in map(json.loads, (round_2 / name / "answers.jsonl").read_text().splitlines()):
            answers.setdefault(answer["prompt"], []).append(answer["answer"])
    assert not (round_2 / "label-3").exists()
    # the untrained smoke policy's answers are all garbled, which the toy oracle would rightly call ties (no pair);
    # the hand-built judge prefers the longer answer, so this round makes new pairs
    assert len(fresh) > 0
    for row in fresh:  # every new row: two answers of the policy to its prompt, with the judge's safety labels
        assert {row["response_0"], row["response_1"]} <= set(answers[row["prompt"]])
        for i in (0, 1):
            assert row[f"is_response_{i}_safe"] == (not harmful(row["prompt"], row[f"response_{i}"]))
    # 2. red-teaming: 8 prompts of the pool searched; exactly those answered harmfully at least once are found,
    #    their pairs kept, and they join the PPO prompts
    searched = (round_2 / "redteam_search.jsonl").read_text().splitlines()
    assert searched == (data / "redteam_prompts.jsonl").read_text().splitlines()[:8]
    tried = [json.loads(line) for line in (round_2 / "redteam" / "answers.jsonl").read_text().splitlines()]
    failing = {a["prompt"] for a in tried if harmful(a["prompt"], a["answer"])}
    found = (round_2 / "redteam_found.jsonl").read_text().splitlines()
    assert found == [line for line in searched if json.loads(line)["prompt"] in failing]
    assert found  # the hand-built judge fails about half of these answers: the search finds prompts
    redteam = [json.loads(line) for line in (round_2 / "redteam" / "labelled_pairs.jsonl").read_text().splitlines()]
    assert all(not (r["is_response_0_safe"] and r["is_response_1_safe"]) for r in redteam)
    assert {r["prompt"] for r in redteam} <= failing
    assert (round_2 / "prompts.jsonl").read_text().splitlines() == prompts + found
    # 3. every pair so far: round 1's and the new ones, less the held-out tenth (every 10th prompt's pairs)
    new_lines = [json.dumps(row) for row in fresh + redteam]
    held_out = (round_2 / "new_pairs_test.jsonl").read_text().splitlines()
    kept = (round_2 / "new_pairs_train.jsonl").read_text().splitlines()
    assert sorted(held_out + kept) == sorted(new_lines) and held_out and kept
    order = list(dict.fromkeys(row["prompt"] for row in fresh + redteam))  # the 1st, 11th, ... prompt's pairs
    assert {json.loads(line)["prompt"] for line in held_out} == set(order[::10])
    original = (data / "preference_train.jsonl").read_text().splitlines()
    assert (round_2 / "preference_train.jsonl").read_text().splitlines() == original + kept
    for objective in ("reward", "cost"):
        args = json.loads((round_2 / objective / "args.json").read_text())
        assert args["model_name_or_path"] == str(out / "sft")
        assert args["train_data"] == str(round_2 / "preference_train.jsonl")
    for models, source in (("new", round_2), ("previous", out)) if scored else ():  # held-out new pairs, both models
        args = json.loads((round_2 / f"new_pairs_{models}" / "args.json").read_text())
        assert args["preference_data"] == str(round_2 / "new_pairs_test.jsonl")
        assert args["reward_model"] == str(source / "reward") and args["cost_model"] == str(source / "cost")
    # 4. PPO-Lagrangian from round 1's policy, with the new models, the new prompts and the rectified limit d = 0
    ppo = json.loads((round_2 / "ppo_lag" / "args.json").read_text())
    expected = {"actor_model": out / "ppo_lag", "reward_model": round_2 / "reward", "cost_model": round_2 / "cost"}
    assert {key: ppo[key] for key in expected} == {key: str(path) for key, path in expected.items()}
    assert ppo["prompt_data"] == str(round_2 / "prompts.jsonl")
    assert ppo["reference_model"] == ""  # the KL reference is round 1's policy, where the actor starts (version 5)
    assert (ppo["constraint"], ppo["cost_limit"], ppo["tolerance"]) == ("rectified", 0.0, 0.02)
    assert (round_2 / "ppo_lag" / "model.safetensors").is_file()
    # 5. the rounds side by side, each held-out prompt answered EVAL_SAMPLES times (--smoke: 2), and the report
    policies = json.loads((out / "rounds" / "eval" / "labels.json").read_text())["policies"]
    assert list(policies) == ["sft", "round-1", "round-2"] and "oracle_other_rate" in policies["round-2"]["all"]
    for evaluation in (out / "eval", round_2 / "eval", out / "rounds" / "eval", out / "rounds" / "redteam"):
        assert json.loads((evaluation / "args.json").read_text())["samples_per_prompt"] == 2
    evaluated = [json.loads(line) for line in (out / "rounds" / "eval" / "answers.jsonl").read_text().splitlines()]
    assert len(evaluated) == 3 * 8 * 2 and {a["policy"] for a in evaluated} == set(policies)
    assert (out / "rounds" / "rounds.png").is_file()
    report = (out / "rounds" / "report.md").read_text()
    assert "| red-team prompts found (answered harmfully) |" in report and "### The claims, run by run" in report
    assert report.splitlines()[2] in result.stdout


def bash_function(name):
    """A function of run_pipeline.sh, as it stands there."""
    script = (REPO / "run_pipeline.sh").read_text()
    start = script.index(f"{name}() {{")
    return script[start : script.index("\n}\n", start) + 3]


@pytest.mark.parametrize(
    "pairs_in_round_1, distinct_prompts, label_prompts, samples",
    [
        (4000, 1000, 667, 4),  # toy: |D1| / 6 prompts, 4 answers each, 667 x 6 = 4,002 pairs >= 4,000
        (4000, 60, 60, 13),  # toy_small: all 60 prompts; 60 x 12·13/2 = 4,680 >= 4,000 > 60 x 11·12/2 = 3,960
        (100, 10, 10, 5),  # 10 x 10 = 100 >= 100 > 10 x 6
        (4000, 2, 2, 16),  # too few prompts: K stops at 16 (2 x 120 pairs)
    ],
)
def test_a_later_round_labels_as_many_pairs_as_round_1_has(pairs_in_round_1, distinct_prompts, label_prompts, samples):
    """The rule of docs/rounds.md, run from run_pipeline.sh itself: LABEL_PROMPTS = min(⌈|D1| / 6⌉, distinct prompts),
    K_SAMPLES = the smallest K ≥ 4 with LABEL_PROMPTS · K(K-1)/2 ≥ |D1|, at most 16."""
    call = f'label_sizing {pairs_in_round_1} {distinct_prompts}; echo "$LABEL_PROMPTS $K_SAMPLES"'
    result = subprocess.run(
        ["bash", "-c", bash_function("label_sizing") + call],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split() == [str(label_prompts), str(samples)]


@pytest.mark.parametrize(
    "pairs_kept, passes_done, another",
    [
        (0, 0, True),
        (999, 1, True),  # under a quarter of |D1| = 4,000
        (1000, 1, False),  # a quarter: enough
        (999, 3, True),
        (999, 4, False),  # LABEL_PASSES = 4: the round goes on with what it has
    ],
)
def test_a_round_labels_pass_after_pass_until_a_quarter_of_round_1s_pairs(pairs_kept, passes_done, another):
    """docs/rounds.md, version 5: another pass while fewer than ⌈|D1| / 4⌉ pairs have a preference, at most 4."""
    call = f"D1=4000; LABEL_PASSES=4; more_labels {pairs_kept} {passes_done} && echo yes || echo no"
    result = subprocess.run(["bash", "-c", bash_function("more_labels") + call], capture_output=True, text=True)
    assert result.stdout.split() == ["yes" if another else "no"]


@pytest.mark.parametrize("distinct_eval_prompts, samples", [(200, 3), (60, 10), (600, 1), (1000, 1), (7, 86)])
def test_the_rounds_are_measured_on_at_least_600_answers_per_policy(distinct_eval_prompts, samples):
    call = f'eval_sampling {distinct_eval_prompts}; echo "$EVAL_SAMPLES"'
    result = subprocess.run(["bash", "-c", bash_function("eval_sampling") + call], capture_output=True, text=True)
    assert result.stdout.split() == [str(samples)]
    assert distinct_eval_prompts * samples >= 600 > distinct_eval_prompts * (samples - 1) or samples == 1


@pytest.mark.slow
def test_the_pipeline_has_no_setting_that_differs_between_the_worlds(smoke_runs):
    def settings(out):  # every round-1 stage's args.json, paths (and the judge file) aside
        return {
            name: {k: v for k, v in json.loads((out / name / "args.json").read_text()).items() if k not in PATH_ARGS}
            for name in ["sft", "reward", "cost", *POLICIES]
        }

    assert settings(smoke_runs["toy"][0]) == settings(smoke_runs["toy_small"][0])
    # with --rounds 1 (the toy world here) one answer per held-out prompt, as docs/results.md reports; with --rounds 2+
    # EVAL_SAMPLES (--smoke: 2)
    samples = {
        world: json.loads((out / "eval" / "args.json").read_text())["samples_per_prompt"]
        for world, (out, _) in smoke_runs.items()
    }
    assert samples == {"toy": 1, "toy_small": 2}
    assert not (smoke_runs["toy"][0] / "round-2").exists() and not (smoke_runs["toy"][0] / "rounds").exists()


def test_bad_arguments_fail_before_any_stage(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(REPO / "data" / "toy_small", data)
    (tmp_path / "syntax.py").write_text("def judge(prompt, answer)\n    return {}\n")
    (tmp_path / "no_prompts").mkdir()
    for name in ("sft.jsonl", "preference_train.jsonl", "preference_test.jsonl", "eval_prompts.jsonl"):
        shutil.copy(data / name, tmp_path / "no_prompts" / name)
    (tmp_path / "no_prompts" / "prompts.jsonl").write_text("\n")
    out = tmp_path / "out"
    cases = {  # arguments: what the one error line must say
        ("--seed", "abc"): "--seed abc: must be a whole number",
        ("--seed", "-1"): "--seed -1: must be a whole number",
        ("--out",): "--out: needs a value",
        ("--rounds", "0"): "--rounds 0: must be a whole number, at least 1",
        ("--rounds", "2", "--judge", "none"): "every round after the first labels new answers with a judge",
        ("--judge", tmp_path / "nope.py"): "nope.py: no such file",
        ("--judge", tmp_path / "syntax.py"): "syntax.py: importing it failed: SyntaxError",
        ("--data", tmp_path): "sft.jsonl: no such file",
        ("--data", tmp_path / "no_prompts"): "prompts.jsonl: no prompts",
        ("--data", data, "--out", data / "runs"): "is or lies inside --data",
        ("--data", data, "--out", data): "is or lies inside --data",
        ("--epochs", "3"): "unknown argument '--epochs'",
    }
    for args, expected in cases.items():
        result = pipeline(*(["--out", out] if "--out" not in args else []), *args, timeout=120)
        errors = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 1 and len(errors) == 1 and expected in errors[0], (args, result.stderr[-2000:])
        assert not out.exists() and "====" not in result.stdout, args  # no stage ran, nothing was written
    assert sorted(p.name for p in data.iterdir()) == sorted(p.name for p in (REPO / "data" / "toy_small").iterdir())


@pytest.mark.slow
def test_an_output_of_other_settings_or_of_someone_else_is_refused(smoke_runs, tmp_path):
    out, _ = smoke_runs["toy_small"]
    before = (out / "pipeline.json").read_text()
    result = pipeline(
        "--smoke",
        "--data",
        REPO / "data" / "toy_small",
        "--judge",
        REPO / "data" / "toy_world.py",
        "--out",
        out,
        "--seed",
        2,
        timeout=120,
    )
    assert result.returncode == 1 and "was run with other settings" in result.stderr and "seed 1 -> 2" in result.stderr
    assert (out / "pipeline.json").read_text() == before and json.loads(before)["finished"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine\n")
    result = pipeline("--smoke", "--out", tmp_path / "mine", timeout=120)
    assert (
        result.returncode == 1
        and "not an output of run_pipeline.sh" in result.stderr
        and "--overwrite" in result.stderr
    )
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_a_second_pipeline_into_the_same_output_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    with open(tmp_path / "out" / ".lock", "a") as lock:  # as a running pipeline holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = pipeline("--smoke", "--out", tmp_path / "out", timeout=120)
    assert result.returncode == 1 and "another run_pipeline.sh is writing it" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".lock"]


@pytest.mark.slow
def test_a_failed_stage_is_one_line_naming_its_log(tmp_path):
    shutil.copytree(REPO / "data" / "toy_small", tmp_path / "data")
    with open(tmp_path / "data" / "sft.jsonl", "a") as file:
        file.write('{"prompt": "How do I knit?", "response": 7}\n')
    rows = len((tmp_path / "data" / "sft.jsonl").read_text().splitlines())
    result = pipeline("--smoke", "--data", tmp_path / "data", "--out", tmp_path / "out", timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("error: stage sft failed: ") and f"sft.jsonl, row {rows}, field 'response'" in errors[0]
    assert str(tmp_path / "out" / "logs" / "sft.log") in errors[0]
    assert "Traceback" not in result.stdout + result.stderr and "ChildFailedError" not in result.stdout + result.stderr


def test_ctrl_c_ends_the_pipeline_with_one_line(tmp_path):
    process = subprocess.Popen(
        ["bash", str(REPO / "run_pipeline.sh"), "--smoke", "--out", str(tmp_path / "out")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not (tmp_path / "out" / "sft.partial" / "metrics.jsonl").exists():  # SFT is training
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert process.returncode == 130 and lines[-1].startswith("interrupted during stage sft"), stderr[-2000:]
    assert not (tmp_path / "out" / "sft").exists() and "Traceback" not in stderr
