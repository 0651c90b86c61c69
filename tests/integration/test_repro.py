"""End to end through the real DVC CLI on the tiny model: what runs, what is skipped, how stages fail, and what
another machine's clone pulls from a DVC remote.

All tests share the session's pipeline repo (see conftest): `reproduced_pipeline` is its first full
`dvc repro`; `clean_pipeline_repo` hands it over fully reproduced and restores it after the test.
"""

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import yaml

from conftest import (
    CHATML_TEMPLATE, STAGES, TINY_SOURCE, describe, dvc, dvc_status, git, ran_stages, repro, write_params,
)
from tuneline.lineage import tree_sha256

MERGE_KEYS = {"kl", "top1_agreement", "kl_merge_into_4bit", "top1_merge_into_4bit", "kl_merge_into_original",
              "top1_merge_into_original"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_params(repo: Path) -> dict:
    return yaml.safe_load((repo / "params.yaml").read_text())


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
    import subprocess
    import time

    from conftest import VENV_BIN, subprocess_env

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
    assert ran == {"dataset", "train", "merge", "evaluate", "lineage"}, ran.log


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


# ------------------------------------------------------------------------------ data caching by content


def test_touching_a_data_file_reruns_nothing_and_editing_it_reruns_dataset_onwards(clean_pipeline_repo):
    data_file = clean_pipeline_repo / "data/sources" / TINY_SOURCE
    content = data_file.read_bytes()
    data_file.write_bytes(content)  # rewritten unchanged: new mtime, same content
    os.utime(data_file, (1, 1))
    assert dvc_status(clean_pipeline_repo) == {}
    ran = repro(clean_pipeline_repo)
    assert ran == set(), ran.log

    # every answer edited, so that the few training steps surely see a changed row
    rows = [json.loads(line) for line in content.decode().splitlines()]
    data_file.write_text("".join(json.dumps({**row, "output": row["output"] + " indeed"}) + "\n" for row in rows))
    assert set(dvc_status(clean_pipeline_repo)) == {"dataset"}
    ran = repro(clean_pipeline_repo)
    assert ran == {"dataset", "train", "merge", "evaluate", "lineage"}, ran.log
    card = json.loads((clean_pipeline_repo / "data/dataset/dataset_card.json").read_text())
    assert card["sha256"]["inputs"][f"data/sources/{TINY_SOURCE}"] == sha256(data_file)


def test_template_change_reruns_dataset_onwards(clean_pipeline_repo):
    params = read_params(clean_pipeline_repo)
    params["dataset"]["template"] = "chatml"
    write_params(clean_pipeline_repo, params)
    assert set(dvc_status(clean_pipeline_repo)) == {"dataset"}
    ran = repro(clean_pipeline_repo, "dataset")
    assert ran == {"dataset"}, ran.log
    card = json.loads((clean_pipeline_repo / "data/dataset/dataset_card.json").read_text())
    assert card["template"]["name"] == "chatml"


def test_new_tokenizer_reruns_dataset_but_new_weights_alone_do_not(clean_pipeline_repo, tiny_model_dir, tmp_path):
    """The dataset stage depends on models/tokenizer, not models/base: re-tokenizing follows the tokenizer."""
    import torch
    from safetensors.torch import load_file, save_file

    new_weights = tmp_path / "new-weights"
    shutil.copytree(tiny_model_dir, new_weights)
    weights = load_file(new_weights / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5
    save_file(weights, new_weights / "model.safetensors", metadata={"format": "pt"})
    params = read_params(clean_pipeline_repo)
    params["fetch"]["source"] = f"file://{new_weights}"
    write_params(clean_pipeline_repo, params)
    ran = repro(clean_pipeline_repo)
    assert ran == {"fetch", "convert", "train", "merge", "evaluate", "lineage"}, ran.log

    new_template = tmp_path / "new-template"
    shutil.copytree(new_weights, new_template)
    # the same template with a blank line between turns
    (new_template / "chat_template.jinja").write_text(CHATML_TEMPLATE.replace("'<|im_end|>' + '\n'", "'<|im_end|>' + '\n\n'"))
    params["fetch"]["source"] = f"file://{new_template}"
    write_params(clean_pipeline_repo, params)
    ran = repro(clean_pipeline_repo, "dataset")
    assert ran == {"fetch", "convert", "dataset"}, ran.log
    first = json.loads((clean_pipeline_repo / "data/dataset/train.jsonl").read_text().splitlines()[0])
    assert "<|im_end|>\n\n<|im_start|>" in first["text"]
    assert torch.equal(load_file(clean_pipeline_repo / "models/base/model.safetensors")["model.norm.weight"], weights["model.norm.weight"])


def test_dataset_card_change_alone_retrains_nothing(clean_pipeline_repo):
    """train, merge and evaluate depend on the dataset files they read, not on the whole folder."""
    code = clean_pipeline_repo / "tuneline/data/card.py"
    code.write_text(code.read_text().replace("# Dataset card", "# Dataset card (edited)"))
    ran = repro(clean_pipeline_repo)
    assert ran == {"dataset", "lineage"}, ran.log  # the record notes the folder's new sha256
    assert "(edited)" in (clean_pipeline_repo / "data/dataset/dataset_card.md").read_text()


# ------------------------------------------------------------------------------------ comparing runs


def test_dvc_exp_run_with_another_lora_rank_is_listed_beside_the_baseline(clean_pipeline_repo):
    import csv
    import io

    repo = clean_pipeline_repo
    result = dvc(repo, "exp", "run", "-S", "train.lora_r=4", "-S", "train.lora_alpha=8", "-n", "rank-4")
    assert result.returncode == 0, describe(result)
    assert ran_stages(result) == {"train", "merge", "evaluate", "lineage"}, describe(result)
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
