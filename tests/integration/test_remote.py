"""Sharing artifacts through a DVC remote: what one machine's run pushes, another machine's clone pulls.

The remote is a local directory here; S3, GCS or SSH remotes differ only in their URL (README: Sharing
artifacts). The second machine is a `git clone` of the pipeline repo with an empty DVC cache.
"""

import subprocess

from conftest import dvc, dvc_status, git
from tuneline.lineage import tree_sha256


def test_a_clone_pulls_what_the_retrain_flow_pushed(clean_pipeline_repo, tmp_path):
    from flows.retrain import push_artifacts

    remote = tmp_path / "remote"
    assert push_artifacts.fn(clean_pipeline_repo).startswith("no default DVC remote")
    dvc(clean_pipeline_repo, "remote", "add", "--default", "shared", str(remote), check=True)
    message = push_artifacts.fn(clean_pipeline_repo)
    assert message.startswith("pushed ") and message.endswith(" file(s) to the DVC remote 'shared'"), message
    assert int(message.split()[1]) > 0
    assert push_artifacts.fn(clean_pipeline_repo).startswith("pushed 0 file(s)")  # nothing new the second time

    clone = tmp_path / "other-machine"
    subprocess.run(["git", "clone", "-q", str(clean_pipeline_repo), str(clone)], check=True)
    dvc(clone, "remote", "add", "--default", "shared", str(remote), check=True)
    assert not (clone / "models" / "merged").exists()  # git holds only the .gitignore DVC wrote
    pulled = dvc(clone, "pull", check=True)
    assert "fetched" in pulled.stdout.lower() or "added" in pulled.stdout.lower(), pulled.stdout
    assert dvc_status(clone) == {}  # every out at the commit's hashes: nothing to rerun
    for out in ("models/merged", "models/adapter", "data/dataset"):
        assert tree_sha256(clone / out) == tree_sha256(clean_pipeline_repo / out), out
    assert git(clone, "rev-parse", "HEAD").stdout == git(clean_pipeline_repo, "rev-parse", "HEAD").stdout
