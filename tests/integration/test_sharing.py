"""Comparing and sharing runs through the real DVC CLI on the tiny model: `dvc exp run` beside the baseline,
and what another machine's clone pulls from a DVC remote.

The tests share this module's copy of the reproduced tiny pipeline (see conftest's `clean_pipeline_repo`).
"""

import csv
import io
import subprocess

from conftest import describe, dvc, dvc_status, git, ran_stages
from tuneline.lineage import tree_sha256


def test_dvc_exp_run_with_another_lora_rank_is_listed_beside_the_baseline(clean_pipeline_repo):
    repo = clean_pipeline_repo
    result = dvc(repo, "exp", "run", "-S", "train.lora_r=4", "-S", "train.lora_alpha=8", "-n", "rank-4")
    assert result.returncode == 0, describe(result)
    assert ran_stages(result) == {"train", "merge", "export", "evaluate", "lineage"}, describe(result)
    try:
        shown = dvc(repo, "exp", "show", "--csv", "--no-pager")
        assert shown.returncode == 0, describe(shown)
        table = list(csv.DictReader(io.StringIO(shown.stdout)))
        ranks = {row["train.lora_r"]: row for row in table if row["train.lora_r"]}
        assert {"4", "16"} <= set(ranks), shown.stdout
        for rank in ("4", "16"):
            assert float(ranks[rank]["accuracy.merged"]) >= 0.0, shown.stdout
            assert ranks[rank]["kl"], shown.stdout
        assert ranks["4"]["Experiment"] == "rank-4"
        diff = dvc(repo, "metrics", "diff", "--json")
        assert diff.returncode == 0, describe(diff)
    finally:
        dvc(repo, "exp", "remove", "--all")


# ------------------------------------------------------------------------------------- sharing artifacts
# The remote is a local directory here; S3, GCS or SSH remotes differ only in their URL (docs/pipeline.md: Sharing
# artifacts). The second machine is a `git clone` of the pipeline repo with an empty DVC cache.


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
