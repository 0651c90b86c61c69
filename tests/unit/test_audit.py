"""tuneline/audit.py on a hand-made run record: an artifact found by sha256 or commit in git history, its
promotion, and a copy of a model answered from the lineage it carries."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import PROJECT
from tuneline.audit import audit, format_report
from tuneline.errors import TunelineError

MODEL_SHA256 = "a" * 64
RECORD = {
    "artifacts": {"models/merged": {"sha256": MODEL_SHA256, "files": {"model.safetensors": "b" * 64}}},
    "produced_at": "2026-12-01T08:00:00+00:00",
    "code": {"commit": "c" * 40, "dirty": False, "dirty_files": []},
    "base": {"source": "file:///models/tiny", "revision": None, "files": {"model.safetensors": "d" * 64}},
    "dataset": {"inputs": {"data/sources/tiny.jsonl": "e" * 64}, "splits": {}, "counts": {"read": 8}},
    "metrics": {"metrics/eval.json": {"accuracy": {"merged": 0.75}}},
}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", "-c", "commit.gpgsign=false",
                           *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A pipeline repo whose one commit records a run and a promotion of its model."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy2(PROJECT / "dvc.yaml", repo / "dvc.yaml")
    (repo / "lineage.json").write_text(json.dumps(RECORD))
    (repo / "registry.json").write_text(json.dumps({"promoted": None, "history": [
        {"model_sha256": MODEL_SHA256, "decision": "promoted", "version": 1, "decided_at": "2026-12-01",
         "reason": "no model promoted yet; accuracy 0.7500"}]}))
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "retrain: ran everything")
    return repo


def test_a_sha256_is_found_in_the_commit_that_recorded_it(repo: Path) -> None:
    facts = audit(MODEL_SHA256, repo)
    assert facts["artifact"] == "models/merged"
    assert facts["found_in"]["commit"] == git(repo, "rev-parse", "HEAD")
    assert facts["found_in"]["subject"] == "retrain: ran everything"
    assert [entry["decision"] for entry in facts["promotion"]] == ["promoted"]
    text = format_report(facts)
    assert f"models/merged  sha256 {MODEL_SHA256}" in text
    assert "data/sources/tiny.jsonl  sha256 " + "e" * 64 in text
    assert "promotion    promoted as v1 on 2026-12-01" in text


def test_a_git_revision_names_the_model_it_recorded(repo: Path) -> None:
    assert audit("HEAD", repo)["sha256"] == MODEL_SHA256


def test_a_copy_outside_any_repository_answers_from_its_own_lineage(tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "lineage.json").write_text(json.dumps({key: RECORD[key] for key in ("code", "base", "dataset")}))
    facts = audit(str(copy), tmp_path)
    assert facts["found_in"]["where"] == "embedded" and facts["promotion"] == []
    assert "the lineage the model carries (no repository at hand)" in format_report(facts)


def test_an_unknown_sha256_is_one_line(repo: Path) -> None:
    with pytest.raises(TunelineError, match="no artifact or file with this sha256"):
        audit("f" * 64, repo)
