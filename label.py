"""Label an evaluation's answers with an annotator: a verdict on every answer, the rates it gives each policy (with
95% intervals), and PKU-SafeRLHF preference pairs from each prompt's answers.

In the paper's later rounds people compare two answers of the current policy on helpfulness and on harmlessness, and
mark each answer safe or unsafe (paper §4, Safe RLHF iterations); those rows train the next reward and cost models.
Here an annotator file plays their part (docs/judge.md): `judge(prompt, answer)` returns booleans "harmful" and
"helpful" (and optionally numbers "helpfulness" and "harmlessness", higher is better), and an optional
`compare(prompt, answer_0, answer_1)` gives pairwise preferences. `--judge toy` is the toy worlds' oracle
(data/toy_world.py). The rule that turns two verdicts into a row is `labelled_pair` (docs/math.md §6).

Reads OUTPUT_DIR/answers.jsonl of an evaluate.py run and writes beside it: labelled_answers.jsonl (each answer with the
verdict, as oracle_harmful, oracle_helpful, ...), labels.json (per policy and prompt kind, the judge's harmful, helpful
and garbled rates and how often the cost model's sign agrees with the judge, each with its 95% Wilson interval), and,
when evaluate.py answered each prompt K ≥ 2 times (--samples_per_prompt), labelled_pairs.jsonl: every pair of a
prompt's K answers that the annotator prefers one way on some axis (--pairs failed: only pairs with a harmful answer,
as red-teaming keeps the prompts a policy fails on).

    python label.py runs/toy/eval --judge toy
    python label.py runs/toy/round-2/label --judge my_judge.py --seed 2
"""

import argparse
import importlib.util
import itertools
import json
import math
import os
import random
import sys
from pathlib import Path

PROBE = ("How do I water a cactus?", "Sure! Water it rarely, and only a little.")  # what a judge is tried on at start


class InputError(Exception):
    """Bad input: printed as one line (exit status 1), with nothing written."""


# ---- the labelling rule and the rates (docs/math.md §6) ----
def labelled_pair(prompt, answer_0, answer_1, verdict_0, verdict_1, coin, preference=None):
    """A PKU-SafeRLHF row from two answers to one prompt and the annotator's verdicts, or None when the annotator
    prefers neither answer on either axis. The rule:
        is_response_i_safe  = not harmful_i
        safer_response_id   = the safe answer, if exactly one is safe; else the more harmless one, if graded apart
        better_response_id  = the helpful answer, if exactly one is helpful; else the more helpful one, if graded apart
    A pairwise annotator's PREFERENCE (compare(): each id 0, 1 or None) replaces the last two lines, except that the one
    safe answer of a pair is always the safer (the cost model's sign term needs labels that agree). A tie on one axis
    only is broken by a seeded COIN, so that the pair still teaches the other axis; a tie on both carries no
    preference (None), as does a pair with an empty answer."""

    def preferred(flags, grades):  # the answer preferred on one axis, or None for a tie
        if flags[0] != flags[1]:
            return flags.index(True)
        if None not in grades and grades[0] != grades[1]:
            return 0 if grades[0] > grades[1] else 1
        return None

    safe = (not verdict_0["harmful"], not verdict_1["harmful"])
    if preference is None:
        safer = preferred(safe, (verdict_0.get("harmlessness"), verdict_1.get("harmlessness")))
        helpful = (verdict_0["helpful"], verdict_1["helpful"])
        better = preferred(helpful, (verdict_0.get("helpfulness"), verdict_1.get("helpfulness")))
    else:
        safer = safe.index(True) if safe[0] != safe[1] else preference["safer_response_id"]
        better = preference["better_response_id"]
    if (safer is None and better is None) or not (answer_0.strip() and answer_1.strip()):
        return None
    safer = coin.randrange(2) if safer is None else safer
    better = coin.randrange(2) if better is None else better
    return {"prompt": prompt, "response_0": answer_0, "response_1": answer_1, "is_response_0_safe": safe[0],
            "is_response_1_safe": safe[1], "safer_response_id": safer, "better_response_id": better}  # fmt: skip


def wilson_interval(successes, n, z=1.96):
    # the 95% score interval of a proportion k/n (Wilson 1927):
    #     (k + z²/2)/(n + z²) ± z·√(k(n-k)/n + z²/4)/(n + z²)
    # Unlike k/n ± z·√(p(1-p)/n) it stays inside [0, 1] and is not empty at 0 or n successes
    if n == 0:
        return [float("nan"), float("nan")]
    centre = (successes + z * z / 2) / (n + z * z)
    half = z * math.sqrt(successes * (n - successes) / n + z * z / 4) / (n + z * z)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def judged_rates(records):
    """The judge's numbers for one policy's labelled answers: harmful, helpful and (with archetypes) garbled rates, and
    how often the cost model's verdict (C > 0) agrees with the judge's, each with its 95% interval."""
    flags = {
        "oracle_harmful_rate": [r["oracle_harmful"] for r in records],
        "oracle_helpful_rate": [r["oracle_helpful"] for r in records],
        "cost_oracle_agreement": [(r["cost"] > 0) == r["oracle_harmful"] for r in records],
    }
    if records and records[0].get("oracle_archetype") is not None:  # an annotator that names archetypes: garbled
        flags["oracle_other_rate"] = [r["oracle_archetype"] == "other" for r in records]
    rates = {"answers": len(records)}
    for name, values in flags.items():
        rates |= {name: sum(values) / len(values), f"{name}_ci95": wilson_interval(sum(values), len(values))}
    return rates


def main():
    args = parse()
    eval_dir = Path(args.eval_dir)
    judge, compare = load_judge(args.judge)  # tried on a probe first
    answers = read_answers(eval_dir)
    samples = json.loads((eval_dir / "args.json").read_text()).get("samples_per_prompt", 1)

    # 1. the verdict on every answer
    for record in answers:
        verdict = call_annotator(judge, args.judge, record, record["answer"])
        check_verdict(verdict, args.judge)
        record |= {f"oracle_{key}": verdict.get(key) for key in ("harmful", "helpful", "archetype")}
        record |= {f"oracle_{key}": verdict.get(key) for key in ("helpfulness", "harmlessness")}

    # 2. the rates, per policy and (when the prompts say) per prompt kind
    labels = {"judge": args.judge, "policies": {}}
    for name in dict.fromkeys(r["policy"] for r in answers):
        mine = [r for r in answers if r["policy"] == name]
        labels["policies"][name] = {"all": judged_rates(mine)}
        if "harmful_prompt" in mine[0]:
            for subset, harmful in (("harmful_prompts", True), ("benign_prompts", False)):
                labels["policies"][name][subset] = judged_rates([r for r in mine if r["harmful_prompt"] == harmful])

    # 3. with K answers to a prompt (side by side in answers.jsonl), every pair of them becomes a row, unless tied
    rows = None
    if samples >= 2:
        coin, rows, decided, pairs = random.Random(args.seed), [], 0, 0
        for i in range(0, len(answers), samples):
            for a, b in itertools.combinations(answers[i : i + samples], 2):
                preference = call_annotator(compare, args.judge, a, a["answer"], b["answer"]) if compare else None
                if compare:
                    check_preference(preference, args.judge)
                verdicts = [{key: r[f"oracle_{key}"] for key in ("harmful", "helpful", "helpfulness", "harmlessness")}
                            for r in (a, b)]  # fmt: skip
                row = labelled_pair(a["prompt"], a["answer"], b["answer"], *verdicts, coin, preference)
                pairs += 1
                decided += bool(
                    row
                    and preference
                    and {preference[k] for k in ("better_response_id", "safer_response_id")} != {None}
                )
                rows += [row] if row else []
        counts = {"pairs": pairs, "written": len(rows), "dropped_no_preference": pairs - len(rows)}
        counts |= {"preferred_by_compare": decided} if compare else {}
        if args.pairs == "failed":  # red-teaming: only the prompts the policy answered harmfully add data
            failed = [row for row in rows if not (row["is_response_0_safe"] and row["is_response_1_safe"])]
            counts |= {"written": len(failed), "dropped_both_safe": len(rows) - len(failed)}
            rows = failed
        labels["labelled_pairs"] = counts

    # 4. write, each file whole or not at all
    write(eval_dir / "labelled_answers.jsonl", "".join(json.dumps(r) + "\n" for r in answers))
    write(eval_dir / "labels.json", json.dumps(labels, indent=2))
    if rows is not None:
        write(eval_dir / "labelled_pairs.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    print(report(labels))


# ---- setup (skip on a first reading) ----
def parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("eval_dir", help="a finished output of evaluate.py (answers.jsonl, args.json)")
    parser.add_argument("--judge", required=True, help="FILE.py defining judge(prompt, answer), or 'toy'")
    parser.add_argument("--pairs", default="all", choices=["all", "failed"], help="which pairs to keep (K >= 2)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of the coin that breaks a one-axis tie")
    return parser.parse_args()


def read_answers(eval_dir):
    """The answers and scores of an evaluate.py run, in its order (a prompt's K answers side by side)."""
    if not (eval_dir / "answers.jsonl").is_file() or not (eval_dir / "args.json").is_file():
        raise InputError(
            f"{eval_dir}: not a finished output of evaluate.py with answers (no answers.jsonl and args.json)"
        )
    return [json.loads(line) for line in (eval_dir / "answers.jsonl").read_text().splitlines() if line.strip()]


def load_judge(spec):
    """The annotator of FILE.py ('toy': data/toy_world.py beside this script): judge(prompt, answer) and, if defined,
    compare(prompt, answer_0, answer_1). The file's folder goes on the import path (it may import a module beside
    it), and both are tried on a probe, so that a broken annotator is one line now. Returns (judge, compare or None)."""
    path = Path(__file__).resolve().parent / "data" / "toy_world.py" if spec == "toy" else Path(spec)
    name = f"toy ({path})" if spec == "toy" else spec
    if path.suffix != ".py" or not path.is_file():
        raise InputError(f"--judge {name}: {'no such file' if path.suffix == '.py' else 'expected toy or FILE.py'}")
    sys.path.insert(0, str(path.resolve().parent))
    module_spec = importlib.util.spec_from_file_location(f"judge_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as error:  # (a judge that calls sys.exit() at import, too)
        raise InputError(f"--judge {name}: importing it failed: {type(error).__name__}: {error}") from None
    if not callable(getattr(module, "judge", None)):
        raise InputError(f"--judge {name}: defines no function judge(prompt, answer)")
    compare = module.compare if callable(getattr(module, "compare", None)) else None
    for function, arguments, check in (
        (module.judge, PROBE, check_verdict),
        (compare, (*PROBE, PROBE[1]), check_preference),
    ):
        if function:
            try:
                returned = function(*arguments)
            except Exception as error:  # a wrong signature, a missing resource, ...
                raise InputError(f"--judge {name}: {function.__name__}() failed on the probe {arguments}: "
                                 f"{type(error).__name__}: {error}") from None  # fmt: skip
            check(returned, name)
    return module.judge, compare


def check_verdict(verdict, name):
    """A dict with booleans "harmful" and "helpful", and optional finite numbers "helpfulness" and "harmlessness"."""

    def grade_ok(value):
        return value is None or (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )

    booleans = isinstance(verdict, dict) and all(isinstance(verdict.get(key), bool) for key in ("harmful", "helpful"))
    if not booleans or not all(grade_ok(verdict.get(key)) for key in ("helpfulness", "harmlessness")):
        raise InputError(
            f"--judge {name}: judge(prompt, answer) returned {verdict!r:.200}; expected a dict with booleans "
            "'harmful' and 'helpful' (and optionally numbers 'helpfulness' and 'harmlessness')"
        )


def check_preference(preference, name):
    """A dict with "better_response_id" and "safer_response_id", each 0, 1 or None."""
    keys = ("better_response_id", "safer_response_id")
    ok = isinstance(preference, dict) and all(k in preference for k in keys)
    if not ok or not all(
        preference[k] is None or (type(preference[k]) is int and preference[k] in (0, 1)) for k in keys
    ):
        raise InputError(
            f"--judge {name}: compare(prompt, answer_0, answer_1) returned {preference!r:.200}; expected a dict "
            "with 'better_response_id' and 'safer_response_id', each 0, 1 or None"
        )


def call_annotator(function, spec, record, *answers):
    """judge() or compare() on a record's prompt; an exception is one line naming the file, the policy, the prompt."""
    try:
        return function(record["prompt"], *answers)
    except Exception as error:  # the annotator's own failure
        raise InputError(f"--judge {spec}: {function.__name__}() raised on the answer of {record['policy']} to "
                         f"{record['prompt'][:60]!r}: {type(error).__name__}: {error}") from None  # fmt: skip


def write(path, text):
    """PATH whole or not at all: written beside it, then renamed over it."""
    Path(f"{path}.tmp").write_text(text, encoding="utf-8")
    os.replace(f"{path}.tmp", path)


def report(labels):
    """The judge's rates, short, for the terminal."""
    lines = [
        f"judge {labels['judge']}:",
        "| policy | prompts | answers | harmful [95% interval] | helpful [95% interval] |",
    ]
    for name, subsets in labels["policies"].items():
        for subset, r in subsets.items():
            cells = [f"{100 * r[k]:.1f}% [{100 * r[k + '_ci95'][0]:.1f}, {100 * r[k + '_ci95'][1]:.1f}]"
                     for k in ("oracle_harmful_rate", "oracle_helpful_rate")]  # fmt: skip
            lines.append(f"| {name} | {subset.replace('_prompts', '')} | {r['answers']} | {cells[0]} | {cells[1]} |")
    if "labelled_pairs" in labels:
        lines.append(f"pairs: {labels['labelled_pairs']}")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except InputError as error:
        sys.exit(f"error: {error}")
