"""Each stage as dvc.yaml runs it (`python -m stages.<name> PATHS`, params.yaml in the working directory): its
argv, its outs written whole or not at all, and one line on stderr when it fails."""

import copy
from pathlib import Path

import yaml

from conftest import run_stage


def test_fetch_writes_its_out_dir_and_manifest(tmp_path: Path, tiny_params: dict) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params))
    run_stage("fetch", "models/fetched", cwd=tmp_path)
    manifest = yaml.safe_load((tmp_path / "models/fetched/tuneline_manifest.json").read_text())
    assert "model.safetensors" in manifest["files"]
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["fetched"]


def test_a_failing_stage_says_one_line_and_leaves_nothing(tmp_path: Path, tiny_params: dict) -> None:
    bad = copy.deepcopy(tiny_params)
    bad["fetch"]["source"] = "ftp://x"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    result = run_stage("fetch", "models/fetched", cwd=tmp_path, check=False)
    assert result.returncode == 1
    err = result.stderr.strip()
    assert err.startswith("error: params.yaml: fetch.source: unknown scheme") and "\n" not in err
    assert list((tmp_path / "models").iterdir()) == []  # no half-written out, no temp dir


def test_a_stage_called_with_the_wrong_arguments_prints_its_usage(tmp_path: Path) -> None:
    result = run_stage("merge", "models/base", cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("usage: python -m stages.merge BASE_DIR ADAPTER_DIR")
