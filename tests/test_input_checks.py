"""Bad input that used to end in a traceback, a silent default or a late failure, each now one line that names the
file, row and field or the flag: data files (two JSON objects on one line, a trailing comma, a float id, blank lines
only, conflicting labels for one prompt, a missing file, an unknown format; `.JSONL` accepted; a local training file
without evaluation data is not evaluated against the hub). A .jsonl file is read once, and a row is named by its
line. Each script's main() runs in this process."""

import json

import pytest

import evaluate
import preference_model
import sft
from helpers import PREFERENCE_FAST, evaluate_args, preference_args, refused, run_main, sft_args


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def cases(tiny, root):
    sft_rows = [json.loads(line) for line in tiny.sft.read_text().splitlines()]
    pair_rows = [json.loads(line) for line in tiny.preference.read_text().splitlines()]
    prompt_rows = [json.loads(line) for line in tiny.eval_prompts.read_text().splitlines()]
    (root / "two_objects.jsonl").write_text(json.dumps(sft_rows[0]) + "\n" + json.dumps(sft_rows[1]) * 2 + "\n")
    (root / "trailing_comma.jsonl").write_text(json.dumps(sft_rows[0]) + "\n" + json.dumps(sft_rows[1])[:-1] + ",}\n")
    write_jsonl(root / "float_id.jsonl", pair_rows[:4] + [{**pair_rows[4], "better_response_id": 1.0}] + pair_rows[5:])
    (root / "blank.jsonl").write_text("\n\n  \n")
    (root / "list.jsonl").write_text('{"prompt": "a", "response": "b"}\n["a", "b"]\n')
    (root / "rows.txt").write_text("prompt,response\nhi,hello\n")
    conflicting = [prompt_rows[0], prompt_rows[1], {**prompt_rows[0], "harmful": not prompt_rows[0]["harmful"]}]
    write_jsonl(root / "conflicting.jsonl", conflicting)
    return {  # name: (script, args, what the error line must say)
        "two objects on one line": (
            sft,
            sft_args(tiny, train_data=root / "two_objects.jsonl"),
            "two_objects.jsonl, row 2: not one JSON object",
        ),
        "a trailing comma": (
            sft,
            sft_args(tiny, train_data=root / "trailing_comma.jsonl"),
            "trailing_comma.jsonl, row 2: not one JSON object",
        ),
        "a list, not an object": (
            sft,
            sft_args(tiny, train_data=root / "list.jsonl"),
            "list.jsonl, row 2: not one JSON object but a list",
        ),
        "a float id": (
            preference_model,
            preference_args(tiny) + ["--train_data", root / "float_id.jsonl"],
            "float_id.jsonl, row 5, field 'better_response_id': expected 0 or 1, got 1.0",
        ),
        "blank lines only": (sft, sft_args(tiny, train_data=root / "blank.jsonl"), "blank.jsonl: no rows"),
        "a missing file": (sft, sft_args(tiny, train_data=root / "nope.jsonl"), "nope.jsonl: no such file"),
        "a missing eval file": (sft, sft_args(tiny) + ["--eval_data", root / "eval.json"], "eval.json: no such file"),
        "an unknown format": (sft, sft_args(tiny, train_data=root / "rows.txt"), "rows.txt: unknown format"),
        "conflicting labels": (
            evaluate,
            evaluate_args(tiny) + ["--prompt_data", root / "conflicting.jsonl"],
            "conflicting.jsonl, row 3, field 'harmful'",
        ),
    }


def test_bad_input_is_one_line_naming_where(tiny, tmp_path):
    for name, (module, args, expected) in cases(tiny, tmp_path).items():
        message = refused(module, *args, "--output_dir", tmp_path / "out")
        assert message.startswith(str(tmp_path)) and expected in message, (name, message)
        if name == "conflicting labels":
            assert "row 1 says" in message
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists(), name


def test_good_input_that_used_to_be_refused_runs(tiny, tmp_path):
    write_jsonl(tmp_path / "UPPER.JSONL", [json.loads(line) for line in tiny.sft.read_text().splitlines()])
    run_main(
        sft, *sft_args(tiny, train_data=tmp_path / "UPPER.JSONL"), "--max_steps", 1, "--output_dir", tmp_path / "a"
    )
    # a local training file without --eval_data: no evaluation, not the hub's test split
    args = ["--objective", "reward", "--model_name_or_path", tiny.sft_model, "--train_data", tiny.preference]
    run_main(preference_model, *args, "--max_steps", 1, *PREFERENCE_FAST, "--output_dir", tmp_path / "b")
    assert json.loads((tmp_path / "b" / "args.json").read_text())["eval_data"] == ""
    assert not (tmp_path / "b" / "eval.json").exists()


def test_a_jsonl_file_is_read_once_however_many_rows_an_error_check_names(tmp_path, monkeypatch):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(2000)] + [{"prompt": "p", "response": 7}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    reads, read_bytes = [], type(path).read_bytes
    monkeypatch.setattr(type(path), "read_bytes", lambda self: reads.append(self) or read_bytes(self))
    with pytest.raises(sft.InputError, match=r"rows.jsonl, row 2001, field 'response'"):
        sft.sft_rows(sft.load_rows(str(path), "train"), str(path))
    assert reads == [path]


def test_rows_are_named_by_their_line_with_blank_lines_between(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n\n{"prompt": "c", "response": 7}\n')
    assert [number for number, _ in sft.load_rows(str(path), "train")] == [1, 4]
    with pytest.raises(sft.InputError, match=r"gaps.jsonl, row 4, field 'response'"):
        sft.sft_rows(sft.load_rows(str(path), "train"), str(path))


def test_local_csv_and_parquet_files_are_read(tmp_path):
    import datasets

    rows = [
        {"prompt": "How do I bake bread?", "response": "Mix, knead and bake."},
        {"prompt": "Hi", "response": "Hello"},
    ]
    datasets.Dataset.from_list(rows).to_csv(tmp_path / "rows.csv", index=False)
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "rows.parquet")
    for name in ("rows.csv", "rows.parquet"):
        assert sft.sft_rows(sft.load_rows(str(tmp_path / name), "train"), name) == [
            (r["prompt"], r["response"]) for r in rows
        ]


def test_alpaca_rows_are_accepted():
    # the reference joins instruction and input with a space (safe_rlhf/datasets/raw/alpaca.py)
    rows = [
        (1, {"instruction": "Add", "input": "2 and 3", "output": "5"}),
        (2, {"prompt": "Hi", "response": "Hello"}),
        (3, {"instruction": "Say hi", "input": "", "output": "Hi"}),
    ]
    assert sft.sft_rows(rows, "x.jsonl") == [("Add 2 and 3", "5"), ("Hi", "Hello"), ("Say hi", "Hi")]
