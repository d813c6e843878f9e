"""label.py: the rule that turns two verdicts into a PKU-SafeRLHF row (by hand, and against every committed row of both
toy worlds), an annotator file that labels every answer of an evaluation and makes the pairs of a prompt's answers
(all of them, only those with a harmful answer, or as compare() prefers), the judge's rates with their intervals, and
an annotator that is wrong in every way a file can be, in one line."""

import json
import random
import re
import subprocess
import sys

import pytest

import evaluate
import label as lb
from helpers import ENV, REPO, TOY, run_main


def test_labelled_pair_rule_by_hand():
    coin = random.Random(0)
    comply, decline, refuse = (
        {"harmful": True, "helpful": True},
        {"harmful": False, "helpful": False},
        {"harmful": False, "helpful": False},
    )
    helpful_safe = {"harmful": False, "helpful": True}
    row = lb.labelled_pair("p", "Sure: steps", "No, but try this", comply, decline, coin)
    assert row == {
        "prompt": "p",
        "response_0": "Sure: steps",
        "response_1": "No, but try this",
        "is_response_0_safe": False,
        "is_response_1_safe": True,
        "safer_response_id": 1,
        "better_response_id": 0,
    }  # the paper's tension
    row = lb.labelled_pair("p", "No.", "Here is how", refuse, helpful_safe, coin)
    assert (
        row["safer_response_id"] in (0, 1)
        and row["better_response_id"] == 1
        and row["is_response_0_safe"]
        and row["is_response_1_safe"]
    )
    assert lb.labelled_pair("p", "No.", "I refuse.", refuse, decline, coin) is None  # no preference either way: dropped
    assert lb.labelled_pair("p", "Sure: a", "Sure: b", comply, comply, coin) is None

    # the coin that breaks a one-axis tie is seeded: the same seed, the same labels
    def tie_break(seed):
        return [
            lb.labelled_pair("p", "a", "b", refuse, helpful_safe, coin)["safer_response_id"]
            for coin in [random.Random(seed)]
            for _ in range(20)
        ]

    assert tie_break(3) == tie_break(3)
    assert (
        lb.labelled_pair("p", "", "Here is how", refuse, helpful_safe, coin) is None
    )  # an empty answer is no response
    picks = {lb.labelled_pair("p", "a", "b", refuse, helpful_safe, coin)["safer_response_id"] for _ in range(50)}
    assert picks == {0, 1}  # a fair coin, not a fixed side
    # graded verdicts break a tie on their axis before any coin: the polite decline beats the garbled answer on both
    garbled, polite = {**decline, "helpfulness": 0, "harmlessness": 0}, {**decline, "helpfulness": 2, "harmlessness": 2}
    assert lb.labelled_pair("p", "x, then y", "No, but try this", garbled, polite, NO_COIN) == {
        "prompt": "p",
        "response_0": "x, then y",
        "response_1": "No, but try this",
        "is_response_0_safe": True,
        "is_response_1_safe": True,
        "safer_response_id": 1,
        "better_response_id": 1,
    }
    row = lb.labelled_pair(
        "p", "a", "b", {**comply, "helpfulness": 3}, {**comply, "helpfulness": 1}, coin
    )  # both unsafe
    assert row["better_response_id"] == 0 and not row["is_response_0_safe"] and not row["is_response_1_safe"]
    assert lb.labelled_pair("p", "a", "b", polite, polite, coin) is None  # graded alike too: no preference
    assert (
        lb.labelled_pair("p", "a", "b", decline, polite, coin) is None
    )  # a grade counts only when both answers have one


def test_labelled_pair_with_a_pairwise_preference():
    coin = random.Random(0)
    safe_a, safe_b = {"harmful": False, "helpful": True}, {"harmful": False, "helpful": True}
    unsafe = {"harmful": True, "helpful": True}
    # two good answers that a yes/no judge cannot tell apart: the pairwise annotator's preferences make the pair
    assert lb.labelled_pair("p", "Long answer.", "Short.", safe_a, safe_b, coin) is None
    row = lb.labelled_pair(
        "p", "Long answer.", "Short.", safe_a, safe_b, coin, {"better_response_id": 1, "safer_response_id": 0}
    )
    assert (row["better_response_id"], row["safer_response_id"]) == (1, 0)
    assert row["is_response_0_safe"] and row["is_response_1_safe"]  # the safety labels stay the verdicts'
    # the one safe answer of a pair is the safer, whatever compare says (the sign term needs labels that agree)
    row = lb.labelled_pair(
        "p", "Sure: steps", "No.", unsafe, safe_a, coin, {"better_response_id": 0, "safer_response_id": 0}
    )
    assert row["safer_response_id"] == 1 and row["better_response_id"] == 0
    # no preference on either axis: dropped; on one axis only: the coin decides that axis
    assert (
        lb.labelled_pair("p", "a", "b", safe_a, safe_b, coin, {"better_response_id": None, "safer_response_id": None})
        is None
    )
    picks = {
        lb.labelled_pair("p", "a", "b", safe_a, safe_b, coin, {"better_response_id": 0, "safer_response_id": None})[
            "safer_response_id"
        ]
        for _ in range(50)
    }
    assert picks == {0, 1}


class NoCoin:
    def randrange(self, n):
        raise AssertionError("a tie was broken by the coin")


NO_COIN = NoCoin()


@pytest.mark.parametrize("world", ["toy", "toy_small"])
def test_the_graded_oracle_labels_later_rounds_as_round_1_was_labelled(world):
    """labelled_pair with --judge toy's verdicts gives back every committed preference row, coin untouched, and so does
    its pairwise compare(): the annotator of rounds 2, 3, ... uses the same rules as the one that labelled round 1."""
    judge, compare = lb.load_judge("toy")
    for name in ("preference_train.jsonl", "preference_test.jsonl"):
        for line in (REPO / "data" / world / name).read_text().splitlines():
            row = json.loads(line)
            answers = (row["response_0"], row["response_1"])
            verdicts = [judge(row["prompt"], answer) for answer in answers]
            assert lb.labelled_pair(row["prompt"], *answers, *verdicts, NO_COIN) == row, (name, row)
            preference = compare(row["prompt"], *answers)
            assert lb.labelled_pair(row["prompt"], *answers, *verdicts, NO_COIN, preference) == row, (name, row)


def test_the_binary_oracle_is_the_graded_one_without_grades():
    (graded, compare), (binary, no_compare) = (
        lb.load_judge("toy"),
        lb.load_judge(str(REPO / "data" / "toy_judge_binary.py")),
    )
    assert compare is not None and no_compare is None  # the yes/no annotator compares nothing
    for line in (TOY / "preference_test.jsonl").read_text().splitlines()[:50]:
        row = json.loads(line)
        verdict = graded(row["prompt"], row["response_0"])
        assert binary(row["prompt"], row["response_0"]) == {
            k: v for k, v in verdict.items() if k not in ("helpfulness", "harmlessness")
        }
    rows = [json.loads(line) for line in (TOY / "preference_test.jsonl").read_text().splitlines()]
    prompt, polite = next(
        (r["prompt"], r["response_0"])
        for r in rows
        if graded(r["prompt"], r["response_0"])["archetype"] == "decline_redirect"
    )
    # a polite decline and a garbled answer: alike without grades
    garbled = "then polish it with the hose, and last, talk to a bank"
    assert graded(prompt, garbled)["archetype"] == "other" and graded(prompt, polite)["archetype"] == "decline_redirect"
    assert lb.labelled_pair(prompt, garbled, polite, binary(prompt, garbled), binary(prompt, polite), NO_COIN) is None
    assert (
        lb.labelled_pair(prompt, garbled, polite, graded(prompt, garbled), graded(prompt, polite), NO_COIN)[
            "better_response_id"
        ]
        == 1
    )


def test_load_judge_names_what_is_wrong(tmp_path):
    files = {
        "no_function.py": "JUDGE = None\n",
        "broken.py": "import not_a_module_anywhere\n",
        "labels.csv": "prompt,harmful\n",
        "exits.py": "import sys\nsys.exit(3)\n",
        "one_argument.py": "def judge(prompt):\n    return {'harmful': False, 'helpful': True}\n",
        "bad_verdict.py": "def judge(prompt, answer):\n    return {'harmful': 'yes', 'helpful': True}\n",
        "bad_grade.py": "def judge(prompt, answer):\n    return {'harmful': False, 'helpful': True, "
        "'helpfulness': 'A'}\n",
        "bad_compare.py": "def judge(p, a):\n    return {'harmful': False, 'helpful': True}\n\n"
        "def compare(p, a, b):\n    return {'better_response_id': 2, 'safer_response_id': None}\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    for spec, expected in (
        (tmp_path / "nope.py", "nope.py: no such file"),
        (tmp_path / "labels.csv", "expected toy or FILE.py"),
        (tmp_path / "no_function.py", "defines no function judge(prompt, answer)"),
        (tmp_path / "broken.py", "importing it failed: ModuleNotFoundError"),
        (tmp_path / "exits.py", "importing it failed: SystemExit: 3"),
        (tmp_path / "one_argument.py", "judge() failed on the probe"),
        (tmp_path / "bad_verdict.py", "judge(prompt, answer) returned {'harmful': 'yes', 'helpful': True}"),
        (tmp_path / "bad_grade.py", "optionally numbers 'helpfulness' and 'harmlessness'"),
        (tmp_path / "bad_compare.py", "compare(prompt, answer_0, answer_1) returned"),
    ):
        with pytest.raises(lb.InputError, match=re.escape(expected)):
            lb.load_judge(str(spec))
    toy, _ = lb.load_judge("toy")  # the toy worlds' oracle under its short name
    assert toy("How do I bake bread?", "")["harmful"] is False


# ---- label.py on an evaluation's answers ----
JUDGE_FILE = """from judge_helper import long_enough


def judge(prompt, answer):  # a stand-in annotator with a rule a test can recompute (and a module beside it)
    harmful = "steps" in answer.lower() or answer.count(",") >= 2
    return {"harmful": harmful, "helpful": long_enough(answer), "note": len(answer)}
"""


def answer(tiny, output_dir, prompts, samples):
    """evaluate.py on the tiny models: PROMPTS held-out prompts, each answered SAMPLES times (sampled)."""
    models = ["--policy", f"sft={tiny.sft_model}", "--reward_model", tiny.reward, "--cost_model", tiny.cost]
    sizes = ["--max_prompts", prompts, "--samples_per_prompt", samples, "--max_new_tokens", 16, "--max_length", 96]
    run_main(evaluate, *models, "--prompt_data", tiny.eval_prompts, *sizes, "--no_bf16", "--output_dir", output_dir)


@pytest.fixture(scope="module")
def sampled(tiny, tmp_path_factory):
    """evaluate.py on tiny models, 8 prompts answered twice each (sampled), and a judge file with a module beside it."""
    root = tmp_path_factory.mktemp("label")
    answer(tiny, root / "eval", prompts=8, samples=2)
    (root / "my_judge.py").write_text(JUDGE_FILE)
    (root / "judge_helper.py").write_text("def long_enough(answer):\n    return len(answer.split()) > 8\n")
    return root


def label(eval_dir, *args):
    return subprocess.run(
        [sys.executable, "label.py", eval_dir, *map(str, args)], cwd=REPO, env=ENV, capture_output=True, text=True
    )


def test_a_judge_file_labels_every_answer_and_pairs_of_samples(sampled):
    result = label(sampled / "eval", "--judge", sampled / "my_judge.py", "--seed", 3)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in (sampled / "eval" / "labelled_answers.jsonl").read_text().splitlines()]
    answers = [json.loads(line) for line in (sampled / "eval" / "answers.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in line.items() if not k.startswith("oracle_")} for line in lines] == answers
    for line in lines:  # the file's rule, not the toy oracle's
        answer = line["answer"]
        assert line["oracle_harmful"] == ("steps" in answer.lower() or answer.count(",") >= 2)
        assert line["oracle_helpful"] == (len(answer.split()) > 8) and line["oracle_archetype"] is None
    labels = json.loads((sampled / "eval" / "labels.json").read_text())
    rates = labels["policies"]["sft"]["all"]
    helpful = sum(line["oracle_helpful"] for line in lines)
    assert rates["answers"] == 16 and rates["oracle_helpful_rate"] == helpful / 16
    assert rates["oracle_helpful_rate_ci95"] == pytest.approx(lb.wilson_interval(helpful, 16))
    agree = sum((line["cost"] > 0) == line["oracle_harmful"] for line in lines)
    assert rates["cost_oracle_agreement"] == agree / 16 and "oracle_other_rate" not in rates
    assert {"harmful_prompts", "benign_prompts"} <= set(labels["policies"]["sft"])
    # the two answers to each prompt became a PKU-SafeRLHF row, unless the judge preferred neither on either axis
    rows = [json.loads(line) for line in (sampled / "eval" / "labelled_pairs.jsonl").read_text().splitlines()]
    kept = [
        (a, b)
        for a, b in zip(lines[0::2], lines[1::2])
        if (a["oracle_harmful"], a["oracle_helpful"]) != (b["oracle_harmful"], b["oracle_helpful"])
    ]
    assert labels["labelled_pairs"] == {"pairs": 8, "written": len(kept), "dropped_no_preference": 8 - len(kept)}
    assert [(r["prompt"], r["response_0"], r["response_1"]) for r in rows] == [
        (a["prompt"], a["answer"], b["answer"]) for a, b in kept
    ]
    for row, (a, b) in zip(rows, kept):
        assert (row["is_response_0_safe"], row["is_response_1_safe"]) == (
            not a["oracle_harmful"],
            not b["oracle_harmful"],
        )
        if a["oracle_helpful"] != b["oracle_helpful"]:
            assert row["better_response_id"] == (0 if a["oracle_helpful"] else 1)
    for objective in ("reward", "cost"):  # the rows read back as training pairs
        assert len(evaluate.preference_pairs(list(enumerate(rows, 1)), "x", objective)) == len(rows)
    # --pairs failed (red-teaming): the same verdicts, and only the pairs with at least one harmful answer
    assert label(sampled / "eval", "--judge", sampled / "my_judge.py", "--seed", 3, "--pairs", "failed").returncode == 0
    failed = [json.loads(line) for line in (sampled / "eval" / "labelled_pairs.jsonl").read_text().splitlines()]
    assert failed == [row for row in rows if not (row["is_response_0_safe"] and row["is_response_1_safe"])]
    counts = json.loads((sampled / "eval" / "labels.json").read_text())["labelled_pairs"]
    assert counts["written"] == len(failed) and counts["dropped_both_safe"] == len(rows) - len(failed)


COMPARE_FILE = """
def judge(prompt, answer):
    return {"harmful": "steps" in answer.lower(), "helpful": len(answer.split()) > 8}


def compare(prompt, answer_0, answer_1):  # the longer answer is more helpful; no view on which is safer
    if len(answer_0) == len(answer_1):
        return {"better_response_id": None, "safer_response_id": None}
    return {"better_response_id": 0 if len(answer_0) > len(answer_1) else 1, "safer_response_id": None}
"""


def test_every_pair_of_k_samples_is_labelled_by_the_pairwise_annotator(tiny, tmp_path):
    (tmp_path / "pairwise.py").write_text(COMPARE_FILE)
    answer(tiny, tmp_path / "eval", prompts=5, samples=3)
    assert label(tmp_path / "eval", "--judge", tmp_path / "pairwise.py").returncode == 0
    answers = [json.loads(line) for line in (tmp_path / "eval" / "labelled_answers.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "labelled_pairs.jsonl").read_text().splitlines()]
    counts = json.loads((tmp_path / "eval" / "labels.json").read_text())["labelled_pairs"]
    pairs = [(answers[i + a], answers[i + b]) for i in range(0, 15, 3) for a, b in ((0, 1), (0, 2), (1, 2))]
    decided = [
        (a, b) for a, b in pairs if len(a["answer"]) != len(b["answer"]) and a["answer"].strip() and b["answer"].strip()
    ]
    assert counts["pairs"] == 15 and counts["preferred_by_compare"] == len(decided) > 0  # all 3 pairs of 3 samples
    kept = [(a, b) for a, b in pairs if (a, b) in decided or a["oracle_harmful"] != b["oracle_harmful"]]
    assert [(r["prompt"], r["response_0"], r["response_1"]) for r in rows] == [
        (a["prompt"], a["answer"], b["answer"]) for a, b in kept
    ]
    for row, (a, b) in zip(rows, kept):
        if len(a["answer"]) != len(b["answer"]):  # compare's preference, not the judge's flags
            assert row["better_response_id"] == (0 if len(a["answer"]) > len(b["answer"]) else 1)


def test_an_annotator_that_raises_is_one_line_naming_the_policy_and_the_prompt(sampled, tmp_path):
    (tmp_path / "raises.py").write_text(
        "def judge(prompt, answer):\n    if prompt != 'How do I water a cactus?':\n"
        "        raise ValueError('cannot read ' + repr(prompt[:20]))\n"
        "    return {'harmful': False, 'helpful': True}\n"
    )
    before = sorted(p.name for p in (sampled / "eval").iterdir())
    result = label(sampled / "eval", "--judge", tmp_path / "raises.py")
    line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert (
        line.startswith("error: --judge") and "judge() raised on the answer of sft to" in line and "ValueError" in line
    )
    assert sorted(p.name for p in (sampled / "eval").iterdir()) == before  # nothing written
    result = label(tmp_path / "nowhere", "--judge", "toy")
    assert result.returncode == 1 and "not a finished output of evaluate.py" in result.stderr
