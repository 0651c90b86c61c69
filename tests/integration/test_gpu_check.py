"""benchmarks/gpu_check.py --dry-run: every part of the device check on the CPU with tiny shapes, so that the script
the GPU sessions run (a device call has minutes, not retries) cannot rot between them."""

import json
import math
import subprocess
import sys

import pytest

from conftest import PROJECT, describe, subprocess_env

CPU_PARTS = ("environment", "train", "merge", "evaluate", "checkpoint_7b", "throughput_7b", "merge_7b")
CUDA_PARTS = ("paged_optimizer", "nccl", "nf4_cuda")
AUTO_ON_CPU = {"compute_dtype": "float32", "optim": "adamw_torch"}  # params.yaml's `auto`, resolved without CUDA


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, tiny_dataset_dir) -> dict:
    """One dry run for the module's tests: its process, gpu_check.json, the part logs and the work folder."""
    root = tmp_path_factory.mktemp("gpu-check")
    env = subprocess_env()
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, also where a GPU is present
    env.pop("OUT", None)
    work, out = root / "work", root / "out"
    result = subprocess.run(
        [sys.executable, str(PROJECT / "benchmarks" / "gpu_check.py"), "--dry-run", "--dataset", str(tiny_dataset_dir),
         "--work", str(work), "--out", str(out)],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600,
    )
    logs = (out / "gpu_check_logs.txt").read_text() if (out / "gpu_check_logs.txt").is_file() else ""
    assert result.returncode == 0, describe(result) + "\n--- part logs (tail) ---\n" + logs[-8000:]
    return {"process": result, "results": json.loads((out / "gpu_check.json").read_text()), "logs": logs,
            "work": work}


def _table_line(results: dict, label: str) -> str:
    (line,) = [line for line in results["table"][2:] if f" {label} " in line]
    return line


def test_dry_run_runs_every_cpu_part_and_skips_the_cuda_ones_in_one_table(dry_run, report):
    results, stdout = dry_run["results"], dry_run["process"].stdout
    parts = results["parts"]
    assert set(parts) == {*CPU_PARTS, *CUDA_PARTS}
    for key in CPU_PARTS:
        assert parts[key]["status"] == "ok", (key, parts[key], dry_run["logs"][-8000:])
    for key in CUDA_PARTS:
        assert parts[key] == {"status": "skipped", "reason": "no CUDA"}

    # One table, printed last and kept in the JSON: a header, the column names, then a line per part.
    table = results["table"]
    assert stdout.splitlines()[-len(table) - 1:-1] == table, stdout[-4000:]
    assert table[0].startswith("gpu_check --dry-run (tiny shapes, one process) on the CPU"), table[0]
    lines = table[2:]
    assert len(lines) == len(parts), table
    for key in CPU_PARTS:
        assert sum(line.endswith(f"ok: {parts[key]['summary']}") for line in lines) == 1, (key, table)
    assert sum(line.endswith("skipped: no CUDA") for line in lines) == len(CUDA_PARTS), table
    assert 0 < results["seconds"] < results["budget_s"]
    assert all(parts[key]["seconds"] > 0 for key in CPU_PARTS)

    environment = parts["environment"]["figures"]
    assert environment["device"]["cuda"] is False and environment["import_failures"] == {}
    assert "on the CPU (no CUDA)" in parts["environment"]["summary"]

    logs = dry_run["logs"]
    assert "===== stage-train.log" in logs and "===== throughput-chat-ours.log" in logs
    assert not dry_run["work"].exists()  # the work folder goes at the end (without --keep)
    report(f"gpu_check --dry-run: {results['seconds']:.0f} s\n" + "\n".join(table))


def test_dry_run_trains_with_params_yaml_auto_resolved_for_the_cpu(dry_run):
    parts = dry_run["results"]["parts"]
    train = parts["train"]["figures"]
    assert (train["params_compute_dtype"], train["params_optim"]) == ("auto", "auto")  # params.yaml's own values
    assert {key: train[key] for key in AUTO_ON_CPU} == AUTO_ON_CPU == train["expected"]
    assert train["steps"] == 1 and train["device"] == "cpu" and math.isfinite(train["final_loss"])
    line = _table_line(dry_run["results"], "train stage, SmolLM2-135M shape")
    assert "ok: auto + auto -> float32 + adamw_torch; 1 step of 2" in line, line
    # merge and evaluate compare in the dtype train computed in
    assert parts["merge"]["figures"]["compute_dtype"] == parts["evaluate"]["figures"]["compute_dtype"] == "float32"
    assert "compared in float32" in _table_line(dry_run["results"], "merge stage + fidelity")
    chat = parts["throughput_7b"]["figures"]["sets"]["chat"]
    for run in ("ours", "plain"):
        assert {key: chat["runs"][run][key] for key in AUTO_ON_CPU} == AUTO_ON_CPU
    assert parts["merge_7b"]["figures"]["compute_dtype"] == "float32"


def test_dry_run_figures_are_sane(dry_run):
    parts = dry_run["results"]["parts"]
    train = parts["train"]["figures"]
    assert train["seconds_per_step"] > 0 and train["trainable_parameters"] > 0
    merge = parts["merge"]["figures"]
    assert 0 <= merge["kl"] < merge["kl_merge_into_4bit"], merge  # the exact merge beats peft's re-quantized one
    assert 0 <= merge["top1_agreement"] <= 1 and merge["prompts"] == 2
    evaluate = parts["evaluate"]["figures"]
    assert evaluate["merged_matches_qlora"] is True and sum(evaluate["examples"].values()) == 4
    checkpoint = parts["checkpoint_7b"]["figures"]
    assert checkpoint["bytes"] == 2 * checkpoint["parameters"] > 0  # bf16
    chat = parts["throughput_7b"]["figures"]["sets"]["chat"]
    assert chat["ours_over_plain"]["same_examples"], chat
    for run in ("ours", "plain"):
        assert chat["runs"][run]["real_tokens"] > 0 and chat["runs"][run]["tokens_per_second"] > 0, chat
        assert math.isfinite(chat["runs"][run]["loss_per_token"]) and chat["runs"][run]["peak_gpu"] is None
    merged = parts["merge_7b"]["figures"]
    assert merged["disk_share"] > 0 and merged["peak_rss"] > 0 and merged["written_bytes"] > 0, merged
