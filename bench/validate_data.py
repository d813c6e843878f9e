"""How long checking a preference file takes before training starts: `load_rows` + `preference_pairs` of
preference_model.py (every row's fields checked, every error naming its file, row and field) on a PKU-SafeRLHF-format
.jsonl file of --rows rows (the toy world's training pairs, repeated with numbered prompts).

    python bench/validate_data.py                       # 16,000 rows, this checkout's preference_model.py
    python bench/validate_data.py --script OLD.py --rows 1000   # another version of the script, for comparison

Prints the seconds, the rows per second and the time per row. Run it alone: two torch jobs at once slow each other.
"""

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16000, help="rows in the preference file")
    parser.add_argument("--script", default=str(REPO / "preference_model.py"), help="the preference_model.py to time")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("preference_model_under_test", args.script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    toy = [json.loads(line) for line in (REPO / "data" / "toy" / "preference_train.jsonl").read_text().splitlines()]
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "preference.jsonl"
        with open(path, "w", encoding="utf-8") as file:
            for i in range(args.rows):
                row = toy[i % len(toy)]
                file.write(json.dumps({**row, "prompt": f"{row['prompt']} (#{i})"}) + "\n")
        start = time.perf_counter()
        pairs = module.preference_pairs(module.load_rows(str(path), "train"), str(path), "cost")
        seconds = time.perf_counter() - start
    assert len(pairs) == args.rows
    print(f"{args.script}: {args.rows} rows checked in {seconds:.2f} s ({args.rows / seconds:,.0f} rows/s, "
          f"{1e6 * seconds / args.rows:.1f} µs a row)")  # fmt: skip


if __name__ == "__main__":
    main()
