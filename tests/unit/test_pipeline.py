"""tuneline/pipeline.py, and the facts it guards: dvc.yaml's code deps are exactly what each stage imports, and
the layers import only downwards (stages -> tuneline; flows -> tuneline; tuneline -> neither, but cli -> flows)."""

import ast
from pathlib import Path

import pytest

from tuneline.pipeline import import_closure, model_path, run_records, stage_deps, stage_names, stage_outs, stage_paths

PROJECT = Path(__file__).resolve().parents[2]
STAGE_FILE_MAX_LINES = 200


def test_stage_names_and_paths_come_from_dvc_yaml() -> None:
    assert stage_names(PROJECT) == ["fetch", "convert", "dataset", "train", "merge", "export", "evaluate", "lineage"]
    assert stage_paths(PROJECT, "convert") == ["models/fetched", "models/base", "models/tokenizer"]
    assert stage_outs(PROJECT)["train"] == ["models/adapter", "dvclive/train", "metrics/train.json"]
    assert model_path(PROJECT) == "models/merged"
    assert {"dvc.lock", "metrics/eval.json", "lineage.json", "eval", "models/.gitignore"} <= set(run_records(PROJECT))
    assert "models/merged" not in run_records(PROJECT)  # cached by DVC, not committed


def test_import_closure_follows_imports_at_any_depth(tmp_path: Path) -> None:
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "sub" / "__init__.py").write_text("from . import leaf\n")
    (tmp_path / "pkg" / "sub" / "leaf.py").write_text("import json\n")
    (tmp_path / "pkg" / "lazy.py").write_text("def f():\n    from pkg.sub import leaf\n")
    (tmp_path / "pkg" / "unused.py").write_text("")
    (tmp_path / "main.py").write_text("import os\nfrom pkg import lazy\n")
    assert import_closure("main", tmp_path) == [
        "main.py", "pkg/__init__.py", "pkg/lazy.py", "pkg/sub/__init__.py", "pkg/sub/leaf.py",
    ]


@pytest.mark.parametrize("stage", stage_names(PROJECT))
def test_code_deps_are_the_stage_import_closure(stage: str) -> None:
    """A file the stage runs but dvc.yaml does not list is a stale cache (editing it reruns nothing); a listed
    file it does not run is a needless rerun."""
    listed = {dep for dep in stage_deps(PROJECT)[stage] if dep.endswith(".py")}
    imported = set(import_closure(f"stages.{stage}", PROJECT))
    assert not imported - listed, f"dvc.yaml: stage '{stage}' runs but does not list {sorted(imported - listed)}"
    assert not listed - imported, f"dvc.yaml: stage '{stage}' lists but never runs {sorted(listed - imported)}"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def _python_files(*folders: str) -> list[Path]:
    return sorted(file for folder in folders for file in (PROJECT / folder).rglob("*.py"))


def _top_levels(path: Path) -> set[str]:
    return {name.split(".")[0] for name in _imports(path)}


def test_nothing_outside_stages_imports_a_stage() -> None:
    offenders = [file.relative_to(PROJECT).as_posix()
                 for file in _python_files("tuneline", "flows", "tests", "benchmarks", "docs")
                 if "stages" in _top_levels(file)]
    assert not offenders, f"these import stages/ (run it as `python -m stages.<name>`, or call tuneline): {offenders}"


def test_the_library_imports_neither_stages_nor_flows_but_the_cli_may_import_flows() -> None:
    offenders = []
    for file in _python_files("tuneline"):
        allowed = {"flows"} if file.name == "cli.py" else set()
        if (_top_levels(file) & {"stages", "flows"}) - allowed:
            offenders.append(file.relative_to(PROJECT).as_posix())
    assert not offenders, f"tuneline/ must not import stages/ or flows/: {offenders}"


@pytest.mark.parametrize("stage", stage_names(PROJECT))
def test_a_stage_file_reads_in_a_page_or_two(stage: str) -> None:
    lines = len((PROJECT / "stages" / f"{stage}.py").read_text().splitlines())
    assert lines <= STAGE_FILE_MAX_LINES, f"stages/{stage}.py has {lines} lines: move logic into tuneline/"


def test_every_library_module_has_unit_tests() -> None:
    """tests/unit/ mirrors tuneline/: each module, or the package that gathers it (tuneline.data), is imported by
    at least one unit test file."""
    imported = set().union(*(_imports(file) for file in _python_files("tests/unit")))
    modules = {".".join(file.relative_to(PROJECT).with_suffix("").parts).removesuffix(".__init__")
               for file in _python_files("tuneline")}
    untested = sorted(module for module in modules - {"tuneline"}
                      if not any(module == name or module.startswith(name + ".") for name in imported - {"tuneline"}))
    assert not untested, f"no unit test imports {untested}"
