"""End to end through the real DVC CLI on the tiny model: what a full `dvc repro` makes, what reruns after a
param or code edit and what is skipped, how stages fail.

The tests share this module's copy of the reproduced tiny pipeline (see conftest): `reproduced_pipeline` is what
its first full `dvc repro` ran; `clean_pipeline_repo` hands the copy over fully reproduced and restores it after
the test.
"""

import json
import subprocess
import time
from pathlib import Path

from conftest import (
    STAGES, VENV_BIN, describe, dvc, dvc_status, ran_stages, read_params, repro, sha256, subprocess_env, write_params,
)

MERGE_KEYS = {"kl", "top1_agreement", "kl_merge_into_4bit", "top1_merge_into_4bit", "kl_merge_into_original",
              "top1_merge_into_original"}


def append_comment(path: Path) -> None:
    with path.open("a") as file:
        file.write("\n# a comment added by the tests\n")


def leftovers(repo: Path) -> list[str]:
    """Temporary paths the stages create beside their outs (temporaries, downloads waiting for their check,
    train checkpoints); none may survive a run that completed or failed cleanly."""
    names = []
    for folder in ("models", "data", "dvclive", "metrics", "eval", "checkpoints/train"):
        if (repo / folder).is_dir():
            names += [str(p.relative_to(repo)) for p in (repo / folder).iterdir()
                      if ".tmp-" in p.name or ".download-" in p.name or folder == "checkpoints/train"]
    return names


def test_full_repro_runs_every_stage(pipeline_repo, reproduced_pipeline):
    assert reproduced_pipeline == set(STAGES), reproduced_pipeline.log
    evaluation = json.loads((pipeline_repo / "metrics/eval.json").read_text())
    assert set(evaluation["accuracy"]) >= {"base", "qlora", "merged", "logistic_regression"}
    assert set(evaluation["eval_loss"]) >= {"base", "merged"}
    assert all(0.0 <= value <= 1.0 for value in evaluation["accuracy"].values())
    assert set(evaluation["examples"]) == {"label", "free_text"}  # the sklearn table and the alpaca file
    assert set(evaluation["rouge_l"]) >= {"base", "qlora", "merged"}
    assert evaluation["merged_matches_qlora"] is True
    merge = json.loads((pipeline_repo / "metrics/merge.json").read_text())
    assert set(merge) >= MERGE_KEYS
    assert merge["kl"] <= 1e-3 and merge["top1_agreement"] >= 0.999
    assert merge["prompts"] == 4  # merge.num_prompts
    train = json.loads((pipeline_repo / "metrics/train.json").read_text())
    assert train["steps"] == 4  # train.max_steps
    card = json.loads((pipeline_repo / "data/dataset/dataset_card.json").read_text())
    assert card["steps_per_source"]["read"] == {"0:sklearn:breast_cancer": 569, "1:tiny.jsonl": 40}
    assert card["sha256"]["inputs"]["data/sources/tiny.jsonl"] == sha256(pipeline_repo / "data/sources/tiny.jsonl")
    for path in ("models/fetched/tuneline_manifest.json", "models/base/config.json",
                 "models/adapter/adapter_model.safetensors", "models/merged/config.json",
                 "eval/predictions.jsonl", "eval/confusion.json", "eval/generations.jsonl", "eval/generations.html",
                 "dvclive/train/plots/metrics/loss.tsv"):
        assert (pipeline_repo / path).is_file(), path
    assert leftovers(pipeline_repo) == []


def test_the_export_writes_checked_gguf_files_a_modelfile_and_an_auditable_copy(pipeline_repo, tmp_path):
    export = json.loads((pipeline_repo / "metrics/export.json").read_text())
    files = export["files"]
    assert set(files) == {"f16", "q8_0"}  # params.yaml's export.types
    assert files["f16"]["within_rounding"] and files["f16"]["greedy_equal"] == 1.0
    assert files["q8_0"]["kl"] > files["f16"]["kl"]
    if export["llama_cpp"]:  # CI installs the llama-cpp extra: the files ran in llama.cpp too
        assert files["f16"]["llama_cpp"]["greedy_equal"] == 1.0
    assert sorted(p.name for p in (pipeline_repo / "models/export").iterdir()) == [
        "Modelfile", "model-f16.gguf", "model-q8_0.gguf"]
    copy = tmp_path / "downloaded.gguf"
    copy.write_bytes((pipeline_repo / "models/export/model-q8_0.gguf").read_bytes())
    result = subprocess.run([str(VENV_BIN / "tuneline"), "audit", str(copy), "--json"], cwd=pipeline_repo,
                            capture_output=True, text=True, env=subprocess_env())
    assert result.returncode == 0, describe(result)
    facts = json.loads(result.stdout)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=pipeline_repo, capture_output=True, text=True).stdout
    assert facts["found_in"] == facts["found_in"] | {"where": "commit", "commit": head.strip()}
    assert facts["artifact"] == "models/export"
    assert facts["dataset"]["inputs"]["data/sources/tiny.jsonl"] == sha256(pipeline_repo / "data/sources/tiny.jsonl")


def test_second_repro_runs_nothing(clean_pipeline_repo):
    ran = repro(clean_pipeline_repo)
    assert ran == set(), ran.log
    status = dvc(clean_pipeline_repo, "status")
    assert status.returncode == 0, describe(status)
    assert "up to date" in status.stdout
    assert dvc_status(clean_pipeline_repo) == {}


def test_evaluate_param_change_reruns_only_evaluate(clean_pipeline_repo):
    params = read_params(clean_pipeline_repo)
    params["evaluate"]["batch_size"] = 3
    write_params(clean_pipeline_repo, params)
    assert set(dvc_status(clean_pipeline_repo)) == {"evaluate"}
    ran = repro(clean_pipeline_repo)
    assert ran == {"evaluate", "lineage"}, ran.log
    ran = repro(clean_pipeline_repo)
    assert ran == set(), ran.log


def test_a_second_dvc_repro_started_meanwhile_stops_with_a_clear_message(clean_pipeline_repo, tmp_path, report):
    """Two `dvc repro` at once: DVC's locks stop the second in seconds, and the first completes intact."""
    params = read_params(clean_pipeline_repo)
    params["evaluate"]["batch_size"] = 5
    write_params(clean_pipeline_repo, params)
    log = tmp_path / "first.log"
    with log.open("w") as out:
        first = subprocess.Popen([str(VENV_BIN / "dvc"), "repro"], cwd=clean_pipeline_repo, env=subprocess_env(),
                                 stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while "Running stage 'evaluate'" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    second = dvc(clean_pipeline_repo, "repro")
    assert first.wait(timeout=600) == 0, log.read_text()
    assert second.returncode != 0
    output = second.stdout + second.stderr
    # DVC's per-path read/write lock names the path and the process holding it (its repo lock, taken for
    # shorter moments, says "Unable to acquire lock")
    assert "is busy, it is being blocked by" in output or "Unable to acquire lock" in output, describe(second)
    assert "Running stage" not in output
    assert dvc_status(clean_pipeline_repo) == {}
    assert leftovers(clean_pipeline_repo) == []
    report("concurrent dvc repro: a second `dvc repro` started while the first ran evaluate stopped at once "
           "with DVC's lock message, running nothing; the first completed, dvc status clean, no leftovers")


def test_evaluate_code_change_reruns_only_evaluate(clean_pipeline_repo):
    append_comment(clean_pipeline_repo / "stages/evaluate.py")
    assert set(dvc_status(clean_pipeline_repo)) == {"evaluate"}
    ran = repro(clean_pipeline_repo)
    assert ran == {"evaluate"}, ran.log  # the same metrics: the lineage record has nothing new to record


def test_dataset_param_change_reruns_dataset_and_downstream(clean_pipeline_repo):
    params = read_params(clean_pipeline_repo)
    params["dataset"]["seed"] = params["dataset"]["seed"] + 1
    write_params(clean_pipeline_repo, params)
    assert set(dvc_status(clean_pipeline_repo)) == {"dataset"}
    ran = repro(clean_pipeline_repo)
    assert ran == {"dataset", "train", "merge", "export", "evaluate", "lineage"}, ran.log


def test_train_code_change_reruns_train_only(clean_pipeline_repo):
    """A comment changes train's code hash, so train reruns; training is deterministic on the CPU and the
    adapter is written byte for byte the same, so DVC then skips merge and evaluate."""
    repo = clean_pipeline_repo
    before = {p.name: p.read_bytes() for p in (repo / "models/adapter").iterdir()}
    append_comment(repo / "stages/train.py")
    assert set(dvc_status(repo)) == {"train"}
    ran = repro(repo)
    after = {p.name: p.read_bytes() for p in (repo / "models/adapter").iterdir()}
    assert set(after) == set(before)
    for name in before:
        assert after[name] == before[name], f"models/adapter/{name} changed on an identical retrain"
    assert ran == {"train"}, ran.log


def assert_one_line_stage_error(result, *needles: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode != 0, describe(result)
    assert "Traceback" not in output, describe(result)
    lines = [line for line in output.splitlines() if all(needle in line for needle in needles)]
    assert len(lines) == 1, describe(result)
    assert lines[0].startswith("error: params.yaml: "), lines[0]
    return lines[0]


def test_unknown_target_module_fails_with_one_clear_line(clean_pipeline_repo):
    params = read_params(clean_pipeline_repo)
    params["train"]["target_modules"] = ["no_such_module"]
    write_params(clean_pipeline_repo, params)
    result = dvc(clean_pipeline_repo, "repro")
    assert_one_line_stage_error(result, "train.target_modules", "no_such_module")
    assert ran_stages(result) == {"train"}
    assert "failed to reproduce 'train'" in result.stdout + result.stderr
    assert leftovers(clean_pipeline_repo) == []


def test_wrong_type_param_fails_with_one_clear_line(clean_pipeline_repo):
    params = read_params(clean_pipeline_repo)
    params["train"]["lora_r"] = "sixteen"
    write_params(clean_pipeline_repo, params)
    result = dvc(clean_pipeline_repo, "repro")
    line = assert_one_line_stage_error(result, "train.lora_r")
    assert "sixteen" in line
    assert ran_stages(result) == {"train"}
    assert leftovers(clean_pipeline_repo) == []
