"""Kills: every stage SIGKILLed at exact points of its work (tests/faults/sitecustomize.py), then the repo is
checked the way a user would find it: every out absent or complete and valid, `dvc status` telling the
truth, the next `dvc repro` completing. And train, killed mid-run, resumes from its last complete checkpoint
to the very adapter an uninterrupted run makes.

The repo here is this module's copy of the reproduced tiny pipeline, reproduced again with shards small enough
that convert and merge write several, and a checkpoint every 2 training steps.
"""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from safetensors import safe_open

from conftest import (
    PROJECT, VENV_BIN, commit_all, copy_pipeline_repo, describe, dvc, dvc_status, ran_stages, read_params, repro,
    run, subprocess_env, write_params,
)
from tuneline.lineage import file_hashes
from tuneline.pipeline import stage_outs

FAULTS_DIR = PROJECT / "tests" / "faults"

# (stage, kill point as MODULE:ATTRIBUTE:N for tests/faults/sitecustomize.py, what was going on). A kill mid-training
# is test_killed_train_resumes_from_its_last_checkpoint_to_the_same_adapter's; one kill per way an out is written.
KILL_POINTS = [
    ("fetch", "os:sendfile:3", "copying the second downloaded file"),
    ("convert", "tuneline.tensor_io:ShardedSafetensorsWriter._close_shard:2", "finishing the second shard"),
    ("convert", "tuneline.artifacts:_replace_path:2", "moving its two outs into place, after the first"),
    ("dataset", "pandas:DataFrame.to_parquet:2", "writing the eval split"),
    ("train", "transformers.trainer:Trainer._save_rng_state:1", "saving a checkpoint"),
    ("merge", "tuneline.tensor_io:ShardedSafetensorsWriter._open_shard:2", "starting the second shard"),
    ("evaluate", "tuneline.artifacts:write_json:2", "writing metrics"),
    ("lineage", "tuneline.artifacts:write_json:1", "writing lineage.json"),
]


@pytest.fixture(scope="module")
def fault_repo(tmp_path_factory, reproduced_template) -> Path:
    repo = copy_pipeline_repo(reproduced_template, tmp_path_factory.mktemp("faults") / "repo")
    params = read_params(repo)
    params["convert"]["max_shard_size"] = "100KB"
    params["merge"]["max_shard_size"] = "100KB"
    params["train"].update(max_steps=8, save_steps=2, keep_checkpoints=2)
    write_params(repo, params)
    (repo / ".gitignore").write_text("__pycache__/\n*.pyc\n*.tmp-*\n/checkpoints/\n")
    repro(repo)  # convert onwards
    commit_all(repo, "reproduced with small shards and a checkpoint every 2 steps")
    return repo


def dvc_killed(repo: Path, kill_point: str, stage: str, *args: str):
    """`dvc ARGS` with the stage process set to SIGKILL itself at `kill_point`."""
    env = subprocess_env()
    env["PYTHONPATH"] = str(FAULTS_DIR)
    env["TUNELINE_KILL"] = f"stages.{stage}:{kill_point}"
    return run([str(VENV_BIN / "dvc"), *args], cwd=repo, env=env, check=False)


def problem_with(path: Path) -> str | None:
    """Why the out at `path` is not complete and valid, or None when it is."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if path.is_dir() and not files:
        return "empty directory"
    for file in files:
        if ".tmp-" in file.name:
            return f"temporary file {file.name} inside"
        try:
            check_file(file)
        except Exception as error:  # any reader's failure is what this check is looking for
            return f"{file.relative_to(path.parent)}: {type(error).__name__}: {error}"
    for listing in (path / "tuneline_manifest.json", path / "lineage.json"):
        recorded = json.loads(listing.read_text()).get("files", {}) if listing.is_file() else {}
        for name, entry in recorded.items():
            digest = entry["sha256"] if isinstance(entry, dict) else entry
            if file_hashes(path).get(name) != digest:
                return f"{name} differs from {listing.name}"
    index = path / "model.safetensors.index.json"
    shards = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else set()
    if any(not (path / shard).is_file() for shard in shards):
        return "a shard named in the index is missing"
    return None


def check_file(file: Path) -> None:
    if file.suffix == ".json":
        json.loads(file.read_text())
    elif file.suffix == ".jsonl":
        [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    elif file.suffix == ".parquet":
        pq.read_table(file)
    elif file.suffix == ".safetensors":
        with safe_open(file, "pt") as tensors:
            for name in tensors.keys():
                tensors.get_tensor(name)
    elif file.stat().st_size == 0 and file.suffix not in (".txt", ".tsv"):
        raise ValueError("empty file")


def inspect(repo: Path) -> tuple[list[str], list[str], dict]:
    """(absent outs, corrupted outs with why, dvc status)."""
    absent, corrupted = [], []
    for outs in stage_outs(repo).values():
        for out in outs:
            if not (repo / out).exists():
                absent.append(out)
            elif problem := problem_with(repo / out):
                corrupted.append(f"{out}: {problem}")
    return absent, corrupted, dvc_status(repo)


def test_a_stage_killed_anywhere_leaves_every_out_absent_or_complete(fault_repo, report):
    outs = stage_outs(fault_repo)
    injected = survived = corrupted_total = 0
    lines = []
    for stage, kill_point, doing in KILL_POINTS:
        killed = dvc_killed(fault_repo, kill_point, stage, "repro", "--force", "--single-item", stage)
        assert "fault injection: SIGKILL" in killed.stdout + killed.stderr, describe(killed)
        assert killed.returncode != 0
        injected += 1
        absent, corrupted, status = inspect(fault_repo)
        corrupted_total += len(corrupted)
        # dvc status tells the truth: every stage with a missing out is reported as changed.
        truthful = all(name in status for name, paths in outs.items() if set(paths) & set(absent))
        recovered = dvc(fault_repo, "repro")
        log = recovered.stdout + recovered.stderr
        how = ("restored from the run-cache" if "is cached - skipping run" in log
               else f"ran {', '.join(sorted(ran_stages(recovered)))}")
        after_absent, after_corrupted, after_status = inspect(fault_repo)
        ok = (not corrupted and truthful and recovered.returncode == 0 and not after_absent
              and not after_corrupted and after_status == {})
        survived += ok
        lines.append(f"  {stage}: killed while {doing}: absent after the kill: {', '.join(absent) or 'none'}; "
                     f"corrupted: {len(corrupted)}; dvc status {'truthful' if truthful else 'WRONG'}; "
                     f"next dvc repro {'completed' if recovered.returncode == 0 else 'FAILED'} ({how})"
                     + ("" if ok else f"\n    {corrupted + after_corrupted} {after_absent} {after_status}\n"
                                      f"    {describe(recovered, 2000)}"))
    report("\n".join([f"kill at every stage: {injected} faults injected, {survived} survived, "
                      f"{corrupted_total} artifacts corrupted", *lines]))
    assert (injected, survived, corrupted_total) == (len(KILL_POINTS), len(KILL_POINTS), 0)


def adapter_files(repo: Path) -> dict[str, str]:
    return file_hashes(repo / "models" / "adapter")


def loss_curve(repo: Path) -> str:
    return (repo / "dvclive" / "train" / "plots" / "metrics" / "loss.tsv").read_text()


def test_killed_train_resumes_from_its_last_checkpoint_to_the_same_adapter(fault_repo, report):
    params = yaml.safe_load((fault_repo / "params.yaml").read_text())
    params["train"]["seed"] = 7  # inputs never trained before: no run-cache entry, a real run
    write_params(fault_repo, params)
    checkpoints = fault_repo / "checkpoints" / "train"
    earlier = set(checkpoints.iterdir()) if checkpoints.is_dir() else set()  # left by the kills above
    # Killed while saving the checkpoint of step 6: 2 and 4 were complete; the trainer drops checkpoints beyond
    # keep_checkpoints (2) only after a save completes, so 2 is still there.
    killed = dvc_killed(fault_repo, "transformers.trainer:Trainer._save_rng_state:3", "train", "repro", "train")
    assert "fault injection: SIGKILL" in killed.stdout + killed.stderr, describe(killed)
    run_dirs = list(set(checkpoints.iterdir()) - earlier)
    assert len(run_dirs) == 1
    assert sorted(p.name for p in run_dirs[0].glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]

    # Other inputs (seed 8) never pick these checkpoints up.
    write_params(fault_repo, {**params, "train": {**params["train"], "seed": 8}})
    other = repro(fault_repo, "train")
    assert "resuming" not in other.log
    assert json.loads((fault_repo / "metrics" / "train.json").read_text())["resumed_from_step"] == 0
    assert run_dirs[0].is_dir()  # kept for the run they belong to

    write_params(fault_repo, params)
    resumed = repro(fault_repo, "train")
    assert f"resuming from checkpoints/train/{run_dirs[0].name}/checkpoint-4" in resumed.log  # 6 was cut short
    metrics = json.loads((fault_repo / "metrics" / "train.json").read_text())
    assert (metrics["resumed_from_step"], metrics["steps"]) == (4, 8)
    assert not run_dirs[0].exists()  # a finished run's checkpoints are deleted
    resumed_adapter, resumed_curve = adapter_files(fault_repo), loss_curve(fault_repo)

    uninterrupted = repro(fault_repo, "--force", "--single-item", "train")
    assert "resuming" not in uninterrupted.log
    # train_loss is every step's mean, also after the resume (the trainer's own covers the resumed steps only)
    uninterrupted_loss = json.loads((fault_repo / "metrics" / "train.json").read_text())["train_loss"]
    assert metrics["train_loss"] == pytest.approx(uninterrupted_loss, abs=2e-4)
    assert adapter_files(fault_repo) == resumed_adapter  # bitwise: adapter, config, lineage
    assert loss_curve(fault_repo) == resumed_curve  # the same curve, the steps before the kill included
    assert len(resumed_curve.splitlines()) == 1 + 8

    # The run-cache still works for train: back to seed 8, restored without training.
    write_params(fault_repo, {**params, "train": {**params["train"], "seed": 8}})
    cached = repro(fault_repo, "train")
    assert "Stage 'train' is cached - skipping run" in cached.log, cached.log
    report(f"kill and resume: train SIGKILLed while saving the step-6 checkpoint; rerun resumed from "
           f"checkpoint-4 (the cut-short checkpoint-6 dropped) and ended with the adapter of an uninterrupted run, "
           f"bit for bit ({len(resumed_adapter)} files), and the same {len(resumed_curve.splitlines()) - 1}-step loss "
           f"curve; checkpoints of other inputs were not used; the run-cache restored train for seed 8")
