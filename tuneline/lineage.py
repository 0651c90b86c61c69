"""Lineage: what produced an artifact (weights, data, params, code), written where the artifact goes.

Each stage passes on what it knows: convert writes the fetched source into models/base, the dataset stage
writes data/dataset/lineage.json, train writes both plus its params into the adapter, merge writes all of it
with the code version into the merged model (lineage.json, the safetensors header, the model card), and the
`lineage` stage records every artifact's sha256 in ./lineage.json, which git keeps: `tuneline audit` walks it.

An artifact's sha256 is that of its file, or for a directory that of its sorted `sha256sum` listing:
    (cd DIR && find . -type f | LC_ALL=C sort | sed 's|^\\./||' | xargs sha256sum) | sha256sum
"""

import datetime
import hashlib
import json
import subprocess
from pathlib import Path

from safetensors import safe_open

from tuneline.artifacts import read_json, sha256_file
from tuneline.pipeline import MODEL_ARTIFACT, model_path, run_records

FETCH_MANIFEST = "tuneline_manifest.json"  # in models/fetched: source and sha256 of each file
LINEAGE_FILE = "lineage.json"  # in data/dataset and the merged model, and the run's record at the repo root
BASE_SOURCE_FILE = "tuneline_source.json"  # in models/base: where the weights came from
ADAPTER_LINEAGE_FILE = "tuneline_lineage.json"  # in models/adapter: base, data and train params
METADATA_KEY = "tuneline.lineage"  # safetensors header / GGUF metadata key holding the lineage as JSON
REGISTRY_FILE = "registry.json"  # every promotion decision, written by the retrain flow


def file_hashes(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path` itself), keyed by relative path, sorted."""
    if path.is_file():
        return {path.name: sha256_file(path)}
    files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    return {p.relative_to(path).as_posix(): sha256_file(p) for p in files}


def tree_sha256(path: Path, hashes: dict[str, str] | None = None) -> str:
    """The artifact's own sha256: its file's, or its directory's `sha256sum` listing's (module docstring)."""
    if path.is_file():
        return sha256_file(path)
    hashes = file_hashes(path) if hashes is None else hashes
    listing = "".join(f"{digest}  {name}\n" for name, digest in sorted(hashes.items()))
    return hashlib.sha256(listing.encode()).hexdigest()


def describe_artifact(path: Path) -> dict:
    hashes = file_hashes(path)
    return {"sha256": tree_sha256(path, hashes), "files": hashes}


def git(repo_dir: Path, *args: str) -> str | None:
    """Output of a git command in `repo_dir`, or None when git or the repository is not there."""
    try:
        result = subprocess.run(["git", *args], cwd=repo_dir, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None
    return result.stdout if result.returncode == 0 else None


def code_version(repo_dir: Path) -> dict:
    """The git commit the code was run from, and whether tracked files other than run records differ (what runs
    write for git, and the registry, do not make the code "dirty")."""
    commit = git(repo_dir, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "dirty_files": []}
    status = git(repo_dir, "status", "--porcelain", "--untracked-files=no", "--", ".",
                 *(f":(exclude){path}" for path in [*run_records(repo_dir), REGISTRY_FILE])) or ""
    dirty_files = sorted(line[3:] for line in status.splitlines())
    return {"commit": commit.strip(), "dirty": bool(dirty_files), "dirty_files": dirty_files}


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def source_revision(source: str) -> str | None:
    """The pinned revision in a fetch source: hf://org/repo@REV -> REV, pypi://pkg==VERSION/... -> VERSION."""
    if source.startswith("hf://") and "@" in source:
        return source.rsplit("@", 1)[1]
    if source.startswith("pypi://") and "==" in source:
        return source.split("==", 1)[1].split("/", 1)[0]
    return None


def read_registry(repo_dir: Path) -> dict:
    """registry.json: {"promoted": the current model's decision or None, "history": every decision}."""
    path = repo_dir / REGISTRY_FILE
    if not path.exists():
        return {"artifact": MODEL_ARTIFACT, "path": model_path(repo_dir), "promoted": None, "history": []}
    return read_json(path)


def gguf_lineage(path: Path) -> dict | None:
    """The lineage an exported GGUF file carries in its metadata, or None."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields.get(METADATA_KEY)
    except (ValueError, OSError, IndexError):  # not a GGUF file after all
        return None
    return json.loads(field.contents()) if field is not None else None


def embedded_lineage(path: Path) -> dict | None:
    """The lineage a model carries: lineage.json in its directory, else a safetensors header's or a GGUF
    file's metadata; or None."""
    if path.is_dir() and (path / LINEAGE_FILE).is_file():
        return read_json(path / LINEAGE_FILE)
    if path.is_file() and path.suffix == ".gguf":
        return gguf_lineage(path)
    weight_files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    for weights in weight_files:
        if weights.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(weights), framework="pt") as opened:
                metadata = opened.metadata() or {}
        except Exception:  # noqa: BLE001 - not a safetensors file after all: it has no embedded lineage
            continue
        if METADATA_KEY in metadata:
            return json.loads(metadata[METADATA_KEY])
    return None
