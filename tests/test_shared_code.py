"""The four stage scripts are standalone, so they repeat a little setup. These copies must not drift apart:
the marked shared block is identical in every script, and a function defined in two scripts is the same code."""

import ast
import re

from helpers import REPO

SCRIPTS = [REPO / name for name in ("sft.py", "preference_model.py", "ppo_lagrangian.py", "evaluate.py") if (REPO / name).exists()]
BLOCK = re.compile(r"^# ---- shared setup.*?^# ---- end of shared setup ----$", re.S | re.M)


def test_shared_block_is_identical_in_every_script():
    blocks = {path.name: BLOCK.findall(path.read_text()) for path in SCRIPTS}
    for name, found in blocks.items():
        assert len(found) == 1, f"{name} must hold exactly one shared setup block"
    reference = blocks["sft.py"][0]
    for name, found in blocks.items():
        assert found[0] == reference, f"the shared setup block of {name} differs from sft.py's: copy it again"


def test_functions_with_the_same_name_have_the_same_code():
    definitions = {}
    for path in SCRIPTS:
        source = path.read_text()
        for node in ast.parse(source).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name not in ("main", "Args"):
                definitions.setdefault(node.name, []).append((path.name, ast.get_source_segment(source, node)))
    for name, copies in definitions.items():
        first_file, first_code = copies[0]
        for other_file, code in copies[1:]:
            assert code == first_code, f"{name} differs between {first_file} and {other_file}"
