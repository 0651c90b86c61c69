"""Training at scale, end to end: the throughput benchmark on the tiny model, and DDP under a launcher (two CPU
processes, gloo), killed and resumed."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import PROJECT, describe, subprocess_env, write_params


# ------------------------------------------------------------------------------------------- the benchmark

TABLE_ROW = re.compile(
    r"^\s+(?P<run>plain|ours)\s+(?P<steps>\d+)\s+(?P<real>[\d,]+)\s+(?P<computed>[\d,]+)\s+[\d.]+\s+[\d.]+"
    r"\s+[\d.]+ GiB\s+(?P<loss>[\d.]+)$",
    re.MULTILINE,
)


def test_the_throughput_benchmark_on_the_tiny_model(tiny_model_dir, tiny_dataset_dir):
    """What the benchmark's reader relies on: both runs train on the same tokens, ours computes fewer on varied
    lengths, the losses agree, and the table is printed."""
    result = subprocess.run(
        [sys.executable, "benchmarks/train_throughput.py", "--model", str(tiny_model_dir), "--dataset",
         str(tiny_dataset_dir), "--sets", "chat", "--chat-examples", "150", "--steps", "3", "--batch-size", "4"],
        cwd=PROJECT, env={**subprocess_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
    )
    assert result.returncode == 0, describe(result)
    out = result.stdout
    rows = {match["run"]: match for match in TABLE_ROW.finditer(out)}
    assert set(rows) == {"plain", "ours"}, out
    plain, ours = rows["plain"], rows["ours"]
    assert plain["steps"] == ours["steps"] == "3"
    assert plain["real"] == ours["real"]
    assert int(ours["computed"].replace(",", "")) < int(plain["computed"].replace(",", ""))
    assert float(ours["loss"]) == pytest.approx(float(plain["loss"]), rel=0.01)
    assert re.search(r"token ids and loss mask equal to the dataset stage's: (\d+)/\1 examples", out), out
    assert "same examples in every step: yes" in out
    assert re.search(r"ours/plain: speed [\d.]+x", out)
    assert re.search(r"target: ours >= 2.0x .*: [\d.]+x, (met|NOT met)", out)



# ------------------------------------------------------------------------------------------- the launcher


def test_train_under_torchrun_in_two_cpu_processes_resumes_and_writes_once(tmp_path, params, tiny_model_dir,
                                                                           tiny_dataset_dir):
    """`python -m stages.train` relaunches itself in two gloo processes. Killed while they write their third
    checkpoint, it resumes from the second; both processes train every step in step, and the main one writes."""
    params["train"].update(launcher="torchrun", num_processes=2, max_steps=4, batch_size=2, save_steps=1)
    write_params(tmp_path, params)
    command = [sys.executable, "-m", "stages.train", str(tiny_model_dir), str(tiny_dataset_dir), "adapter",
               "metrics.json", "live", "checkpoints"]
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT)}
    kill = {"PYTHONPATH": os.pathsep.join([str(PROJECT / "tests" / "faults"), str(PROJECT)]),
            "TUNELINE_KILL": "stages.train:transformers.trainer:Trainer._save_rng_state:3"}
    killed = subprocess.run(command, cwd=tmp_path, env={**env, **kill}, capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0 and "fault injection: SIGKILL" in killed.stderr, describe(killed)
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "metrics.json").exists()

    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, describe(result)
    assert "train: torchrun runs 2 processes" in result.stdout
    assert re.search(r"train: resuming from checkpoints/\w+/checkpoint-2 ", result.stdout), describe(result)
    # Hex digits only: the two processes' lines can run together on the pipe ("…sha256 9b32…train: rank 1 …").
    digests = dict(re.findall(r"train: rank (\d) of 2: 4 steps, adapter sha256 ([0-9a-f]+)", result.stdout))
    assert set(digests) == {"0", "1"}, describe(result)  # both processes trained every step...
    assert digests["0"] == digests["1"]  # ...in step (DDP), and the adapter written is what each of them holds
    assert result.stdout.count("train: loss ") == 1  # only the main process reports

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 4 and metrics["resumed_from_step"] == 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter", "live", "metrics.json", "params.yaml"]
    assert saved_digest(load_file(tmp_path / "adapter" / "adapter_model.safetensors")) == digests["0"]
    assert (tmp_path / "live" / "plots" / "metrics" / "loss.tsv").is_file()

    from peft import PeftModel

    from tuneline.modeling import load_full_model

    PeftModel.from_pretrained(load_full_model(tiny_model_dir), tmp_path / "adapter")  # loadable


def saved_digest(weights: dict[str, torch.Tensor]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for _, tensor in sorted(weights.items()):
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
