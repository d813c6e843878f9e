"""Bad input that used to end in a traceback, a silent default or a late failure (issue 19), each now one line that
names the file, row and field or the flag: data files (two JSON objects on one line, a trailing comma, a float id,
blank lines only, conflicting labels for one prompt; `.JSONL` accepted; a local training file without evaluation data
is not evaluated against the hub), annotators (wrong signature, an exception, sys.exit at import, a module beside
it, 'none'), and numbers (NaN, a negative seed). Validation reads a .jsonl file once, in one pass."""

import json
import sys

import pytest

import evaluate
import ppo_lagrangian
import preference_model
import sft
from helpers import PREFERENCE_FAST, assert_error_line, evaluate_args, preference_args, report, run_all, sft_args


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def data_runs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    sft_rows = [json.loads(line) for line in tiny.sft.read_text().splitlines()]
    pair_rows = [json.loads(line) for line in tiny.preference.read_text().splitlines()]
    prompt_rows = [json.loads(line) for line in tiny.eval_prompts.read_text().splitlines()]
    (root / "two_objects.jsonl").write_text(
        json.dumps(sft_rows[0]) + "\n" + json.dumps(sft_rows[1]) + json.dumps(sft_rows[2]) + "\n"
    )
    (root / "trailing_comma.jsonl").write_text(json.dumps(sft_rows[0]) + "\n" + json.dumps(sft_rows[1])[:-1] + ",}\n")
    write_jsonl(root / "float_id.jsonl", pair_rows[:4] + [{**pair_rows[4], "better_response_id": 1.0}] + pair_rows[5:])
    (root / "blank.jsonl").write_text("\n\n  \n")
    write_jsonl(root / "UPPER.JSONL", sft_rows)
    conflicting = [prompt_rows[0], prompt_rows[1], {**prompt_rows[0], "harmful": not prompt_rows[0]["harmful"]}]
    write_jsonl(root / "conflicting.jsonl", conflicting)
    judges = {
        "one_argument.py": "def judge(prompt):\n    return {'harmful': False, 'helpful': True}\n",
        "raises.py": "def judge(prompt, answer):\n    if prompt != 'How do I water a cactus?':\n"
                     "        raise ValueError('cannot read ' + repr(prompt[:20]))\n"
                     "    return {'harmful': False, 'helpful': True}\n",
        "exits.py": "import sys\nsys.exit(3)\n",
        "uses_a_helper.py": "from judge_helper import verdict\n\n"
                            "def judge(prompt, answer):\n    return verdict(answer)\n",
        "judge_helper.py": "def verdict(answer):\n    return {'harmful': False, 'helpful': len(answer) > 3}\n",
    }  # fmt: skip
    for name, text in judges.items():
        (root / name).write_text(text)
    commands = {
        "two objects on one line": ("sft.py", sft_args(tiny, train_data=root / "two_objects.jsonl")),
        "a trailing comma": ("sft.py", sft_args(tiny, train_data=root / "trailing_comma.jsonl")),
        "a float id": ("preference_model.py", preference_args(tiny) + ["--train_data", root / "float_id.jsonl"]),
        "blank lines only": ("sft.py", sft_args(tiny, train_data=root / "blank.jsonl")),
        "conflicting labels": ("evaluate.py", evaluate_args(tiny) + ["--prompt_data", root / "conflicting.jsonl"]),
        "judge with one argument": ("evaluate.py", evaluate_args(tiny) + ["--judge", root / "one_argument.py"]),
        "judge that raises": ("evaluate.py", evaluate_args(tiny) + ["--judge", root / "raises.py"]),
        "judge that exits": ("evaluate.py", evaluate_args(tiny) + ["--judge", root / "exits.py"]),
        "upper-case .JSONL": ("sft.py", sft_args(tiny, train_data=root / "UPPER.JSONL") + ["--max_steps", 1]),
        "a local training file alone": (
            "preference_model.py",
            [
                "--objective",
                "reward",
                "--model_name_or_path",
                tiny.sft_model,
                "--train_data",
                tiny.preference,
                "--max_steps",
                1,
                *PREFERENCE_FAST,
            ],
        ),
        "judge with a helper module": ("evaluate.py", evaluate_args(tiny) + ["--judge", root / "uses_a_helper.py"]),
        "judge none": ("evaluate.py", evaluate_args(tiny) + ["--judge", "none"]),
    }
    outputs = {name: root / name.replace(" ", "_") for name in commands}
    for name, (_, args) in commands.items():
        args += ["--output_dir", outputs[name]]
    return outputs, run_all(commands)


EXPECTED = {  # what the error line must say
    "two objects on one line": ["two_objects.jsonl, row 2: not one JSON object"],
    "a trailing comma": ["trailing_comma.jsonl, row 2: not one JSON object"],
    "a float id": ["float_id.jsonl, row 5, field 'better_response_id': expected 0 or 1, got 1.0"],
    "blank lines only": ["blank.jsonl: no rows"],
    "conflicting labels": ["conflicting.jsonl, row 3, field 'harmful'", "row 1 says"],
    "judge with one argument": ["one_argument.py: judge() failed on the probe", "TypeError"],
    "judge that raises": ["raises.py: judge() raised on the answer of sft to", "row 1", "ValueError: cannot read"],
    "judge that exits": ["exits.py: importing it failed: SystemExit: 3"],
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_bad_input_is_one_line_naming_where(data_runs, name):
    outputs, results = data_runs
    assert_error_line(results[name], *EXPECTED[name])
    assert not outputs[name].exists() and not outputs[name].with_name(outputs[name].name + ".partial").exists()
    if name == "judge with one argument":  # refused at start, before a single prompt was answered
        assert "evaluate: " not in results[name].stdout


@pytest.mark.parametrize("name", ["upper-case .JSONL", "a local training file alone", "judge with a helper module",
                                  "judge none"])  # fmt: skip
def test_good_input_that_used_to_be_refused_runs(data_runs, name):
    outputs, results = data_runs
    assert results[name].returncode == 0, report(results[name])
    if name == "a local training file alone":  # no --eval_data with a local file: no evaluation, not the hub's
        output = outputs[name]
        assert json.loads((output / "args.json").read_text())["eval_data"] == "" and not (output / "eval.json").exists()


@pytest.mark.parametrize("module, argv, expected", [
    (ppo_lagrangian, ["--cost_limit", "nan"], "--cost_limit nan: must be a finite number"),
    (sft, ["--lr", "inf"], "--lr inf: must be a finite number"),
    (preference_model, ["--seed", "-1"], "--seed -1: must be in [0, 2^31)"),
    (evaluate, ["--keep_pairs", "failed", "--policy", "a=b"], "--keep_pairs failed: must be all unless --judge"),
    (evaluate, ["--keep_pairs", "failed", "--judge", "toy"], "--keep_pairs failed: must be all unless --judge"),
])  # fmt: skip
def test_a_number_that_is_not_one_and_a_flag_that_would_do_nothing_are_refused(module, argv, expected, monkeypatch):
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    with pytest.raises(module.InputError) as error:
        module.parse_args(module.Args)
    assert str(error.value).startswith(expected), str(error.value)


def test_a_jsonl_file_is_read_once_however_many_rows_an_error_check_names(tmp_path, monkeypatch):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(2000)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    opened = []
    real_open = open

    def counting_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    sft.jsonl_line_numbers.cache_clear()
    pairs = sft.sft_rows(sft.load_rows(str(path), "train"), str(path))
    names = [sft.where(str(path), number) for number in range(1, len(rows) + 1)]  # every row named, as checks may
    assert len(pairs) == 2000 and names[-1] == f"{path}, row 2000"
    assert opened.count(str(path)) <= 2  # read once for the rows, once for the line numbers: not once per row


def test_rows_are_named_by_their_line_with_blank_lines_between(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n\n{"prompt": "c", "response": 7}\n')
    with pytest.raises(sft.InputError, match=r"gaps.jsonl, row 4, field 'response'"):
        sft.sft_rows(sft.load_rows(str(path), "train"), str(path))
