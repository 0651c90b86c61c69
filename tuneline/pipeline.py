"""The pipeline as dvc.yaml declares it: the stages in order, their outs, the code each one runs.

dvc.yaml is the one place where the DAG and its paths are written; the retrain flow, the CLI and the tests read
them here rather than keep copies. `import_closure` answers which of the repo's files a stage runs: dvc.yaml
lists exactly those as the stage's code deps (tests/unit/test_pipeline.py compares them both ways), and train's
checkpoint key hashes the same files.
"""

import ast
import shlex
from pathlib import Path

import yaml

from tuneline.errors import TunelineError

DVC_FILE = "dvc.yaml"
MODEL_ARTIFACT = "tuneline-model"  # dvc.yaml's artifacts: entry; promoted runs are tagged tuneline-model@vN.0.0


def _dvc_yaml(repo_dir: Path) -> dict:
    path = repo_dir / DVC_FILE
    if not path.is_file():
        raise TunelineError(f"{path}: not found; run this in the pipeline's repository (or pass its path)")
    return yaml.safe_load(path.read_text())


def _stages(repo_dir: Path) -> dict[str, dict]:
    return _dvc_yaml(repo_dir)["stages"]


def stage_names(repo_dir: Path) -> list[str]:
    """The stages in dvc.yaml's order, which is the pipeline's order (each after the stages it depends on)."""
    return list(_stages(repo_dir))


def _paths(entries: list) -> list[str]:
    """The paths of dvc.yaml entries, each a path or {path: options}."""
    return [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries]


def _outs(stage: dict) -> list[tuple[str, dict]]:
    """(path, options) of every out, metric and plot a stage declares; an entry is a path or {path: options}."""
    entries = stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", [])
    return [(entry, {}) if isinstance(entry, str) else (next(iter(entry)), next(iter(entry.values())) or {})
            for entry in entries]


def stage_outs(repo_dir: Path) -> dict[str, list[str]]:
    """Stage name -> the paths it writes: outs, metrics and plots declared under the stage."""
    return {name: [path for path, _ in _outs(stage)] for name, stage in _stages(repo_dir).items()}


def stage_deps(repo_dir: Path) -> dict[str, list[str]]:
    """Stage name -> its deps as dvc.yaml lists them."""
    return {name: _paths(stage.get("deps", [])) for name, stage in _stages(repo_dir).items()}


def stage_paths(repo_dir: Path, stage: str) -> list[str]:
    """The arguments dvc.yaml's command passes the stage module, in the order its argv takes them."""
    words = shlex.split(_stages(repo_dir)[stage]["cmd"])
    return [word for word in words[words.index(f"stages.{stage}") + 1:] if not word.startswith("-")]


def model_path(repo_dir: Path) -> str:
    """The model that is promoted and audited by default: the path of dvc.yaml's `artifacts:` entry."""
    return _dvc_yaml(repo_dir)["artifacts"][MODEL_ARTIFACT]["path"]


def run_records(repo_dir: Path) -> list[str]:
    """What a pipeline run writes for git rather than DVC's cache: dvc.lock, the outs declared `cache: false`
    (metrics, eval pages, lineage.json) and the .gitignore files DVC keeps beside its cached outs."""
    records = {"dvc.lock"}
    for stage in _stages(repo_dir).values():
        for path, options in _outs(stage):
            cached = options.get("cache", True)
            records.add(path if not cached else (Path(path).parent / ".gitignore").as_posix())
    return sorted(records)


def _module_file(module: str, root: Path) -> Path | None:
    """The file of `module` inside `root` (a package's __init__.py), or None for a module from elsewhere."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path, module: str) -> set[str]:
    """Every module an import statement in `path` names, at any depth (imports inside functions run too),
    with the packages above each one (importing a.b runs a/__init__.py first)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    named = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                prefix = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{prefix}.{node.module}" if node.module else prefix
            else:
                base = node.module
            named.add(base)
            named.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    with_parents = set()
    for name in named:
        parts = name.split(".")
        with_parents.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return with_parents


def import_closure(module: str, root: Path) -> list[str]:
    """The files under `root` that running `python -m MODULE` from `root` imports, directly or not, the module's
    own file and its packages' __init__.py included; sorted paths relative to `root`."""
    seen: dict[str, Path] = {}
    parts = module.split(".")
    pending = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]  # `-m a.b` runs a/__init__.py first
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        path = _module_file(name, root)
        if path is None:
            continue
        seen[name] = path
        pending.extend(_imported_modules(path, name))
    return sorted(path.relative_to(root).as_posix() for path in seen.values())
