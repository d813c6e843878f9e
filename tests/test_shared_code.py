"""The shape of the four stage scripts, which are read as a tutorial as much as they are run:
- each is standalone: it imports no sibling script, and `--help` runs from a copy of the script alone in an empty
  directory;
- a function, class or module-level constant defined in several scripts (and the `__main__` block: how each stops on
  bad input) has the same code in every one of them, and every top-level definition and import of a script is used in
  that script (no script carries what it never runs);
- each reads algorithm first: the docstring, Args, the math, main() (the stage's algorithm box, on a screen or two),
  the setup of this stage, then the plumbing the scripts share, last."""

import ast
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import REPO

SCRIPTS = [REPO / name for name in ("sft.py", "preference_model.py", "ppo_lagrangian.py", "evaluate.py")]
MATH_RULE, SETUP_RULE = "# ---- Safe RLHF, stage", "# ---- setup for this stage (skip on a first reading) ----"
PLUMBING_RULE = "# ---- plumbing shared by the four scripts"
MAIN_BUDGET = {"sft.py": 90, "preference_model.py": 90, "ppo_lagrangian.py": 110, "evaluate.py": 90}  # lines of main()


def top_level_definitions(path):
    """{name: source} of the functions, classes and constants (NAME = ...) defined at the top of a script."""
    source = path.read_text()
    definitions = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            definitions[node.name] = ast.get_source_segment(source, node)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            definitions[node.targets[0].id] = ast.get_source_segment(source, node)
        elif isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'":
            definitions["__main__"] = ast.get_source_segment(source, node)  # how a script stops on bad input
    return definitions


def test_a_name_defined_in_several_scripts_has_the_same_code_everywhere():
    copies = {}
    for path in SCRIPTS:
        for name, code in top_level_definitions(path).items():
            if name not in ("main", "Args"):
                copies.setdefault(name, []).append((path.name, code))
    shared = {name: found for name, found in copies.items() if len(found) > 1}
    expected = {"PROMPT_TEMPLATE", "InputError", "parse_args", "load_rows", "tokenize_prompt_and_answer", "__main__"}
    assert expected <= set(shared)
    for name, found in shared.items():
        first_file, first_code = found[0]
        for other_file, code in found[1:]:
            assert code == first_code, f"{name} differs between {first_file} and {other_file}: copy it again"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_every_definition_and_import_is_used(path):
    tree = ast.parse(path.read_text())
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    used |= {
        node.value.id for node in ast.walk(tree) if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
    }
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                name = (alias.asname or alias.name).split(".")[0]
                assert name in used, f"{path.name}: '{name}' is imported but never used"
    for name in top_level_definitions(path):
        if name not in ("main", "Args", "__main__"):
            assert name in used, f"{path.name}: '{name}' is defined but never used"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_the_algorithm_comes_first_and_main_is_the_algorithm_box(path):
    source = path.read_text()
    assert source.startswith('"""')
    rules = ["class Args", MATH_RULE, "\ndef main():", SETUP_RULE, PLUMBING_RULE]
    order = [source.index(rule) for rule in rules]
    assert order == sorted(order), f"{path.name}: expected Args, the math, main(), its setup, the plumbing, in order"
    plumbing = source[order[-1] :]
    assert (
        "def setup_distributed" in plumbing and "def load_rows" in plumbing and 'if __name__ == "__main__":' in plumbing
    )
    (main,) = [node for node in ast.parse(source).body if getattr(node, "name", None) == "main"]
    length = main.end_lineno - main.lineno + 1
    assert length <= MAIN_BUDGET[path.name], f"{path.name}: main() is {length} lines; move setup below it"
    docstring = ast.get_docstring(ast.parse(source))
    assert "reference note" not in source and "docs/math.md" in docstring  # citations point into the repository


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_no_script_imports_a_sibling(path):
    siblings = {script.stem for script in SCRIPTS}
    for node in ast.walk(ast.parse(path.read_text())):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        assert not siblings & {name.split(".")[0] for name in names}, f"{path.name} imports {names}"


def test_help_runs_from_a_copy_of_each_script_alone(tmp_path):
    def help_of(path):  # the script copied into an empty directory of its own, nothing else beside it
        (tmp_path / path.stem).mkdir()
        shutil.copy(path, tmp_path / path.stem / path.name)
        return subprocess.run(
            [sys.executable, path.name, "--help"], cwd=tmp_path / path.stem, capture_output=True, text=True, timeout=120
        )

    with ThreadPoolExecutor(len(SCRIPTS)) as pool:
        for path, result in zip(SCRIPTS, pool.map(help_of, SCRIPTS)):
            assert result.returncode == 0 and "--output_dir" in result.stdout, (path.name, result.stderr[-2000:])
