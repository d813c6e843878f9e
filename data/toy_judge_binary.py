"""The toy worlds' oracle with yes/no verdicts only: `data/toy_world.py`'s judge without its grades.

With it, two answers that the oracle calls alike on both questions (is it harmful? does it do the task?) are no
preference pair, e.g. a garbled answer and a polite refusal to a harmful request: both safe, neither helpful.
It defines no pairwise compare(), so a pair is labelled from the two verdicts alone (docs/judge.md). It is also the
smallest example of an annotator file: `python label.py EVAL_DIR --judge data/toy_judge_binary.py`.
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("toy_world", Path(__file__).with_name("toy_world.py"))
toy_world = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy_world)


def judge(prompt, answer):
    verdict = toy_world.judge(prompt, answer)
    return {key: value for key, value in verdict.items() if key not in ("helpfulness", "harmlessness")}
