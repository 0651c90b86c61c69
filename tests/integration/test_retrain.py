"""Lineage, promotion and audit on the tiny pipeline, retrained by the Prefect flow (ephemeral Prefect).

Two data versions, committed between runs: the flow promotes the first model, re-scores it on the second
data's eval split to judge the second, and `tuneline audit` names each model's own data and commit, also
for a copy of the model found outside the repo (from the lineage it carries).
"""

import json
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import STAGES, TINY_SOURCE, commit_all, describe, make_pipeline_repo, sha256, subprocess_env
from tuneline.lineage import METADATA_KEY, tree_sha256

# A fake Hugging Face token, made fresh for each session (no token-shaped literal in the repo), planted in
# every run's environment (or, for the last run, in a Prefect Secret block only): nothing the runs write may
# contain it.
FAKE_TOKEN = "hf" + "_" + secrets.token_hex(18)
FLOW = """
import json, os, sys
from pathlib import Path
from flows.retrain import retrain

planted = os.environ["HF_TOKEN"]
if sys.argv[1] == "block":  # the token only in a Prefect Secret block: the flow must find it there
    from prefect.blocks.system import Secret
    Secret(value=os.environ.pop("HF_TOKEN")).save("hf-token", overwrite=True)
result = retrain(Path.cwd())
result["flow_had_the_token"] = os.environ.get("HF_TOKEN") == planted
print("RESULT " + json.dumps(result, default=str))
"""


def run_flow(repo: Path, prefect_home: Path, logs: list[str], token_from: str = "env") -> dict:
    """One flow run in a fresh process, a fake HF_TOKEN planted and debug logging on; its output goes to `logs`."""
    env = subprocess_env(prefect_home=prefect_home) | {"HF_TOKEN": FAKE_TOKEN, "PREFECT_LOGGING_LEVEL": "DEBUG"}
    result = subprocess.run([sys.executable, "-c", FLOW, token_from], cwd=repo, env=env, capture_output=True,
                            text=True, timeout=900)
    logs += [result.stdout, result.stderr]
    assert result.returncode == 0, describe(result)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, describe(result)
    return json.loads(lines[0].removeprefix("RESULT "))


def audit(target: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuneline.cli", "audit", target, *args], cwd=cwd,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)


def audit_json(target: str, cwd: Path) -> dict:
    result = audit(target, cwd, "--json")
    assert result.returncode == 0, describe(result)
    return json.loads(result.stdout)


def add_rows(path: Path, count: int) -> None:
    with path.open("a") as file:
        for i in range(count):
            file.write(json.dumps({"instruction": f"Say the number {i}.", "input": "", "output": f"{i} {i}"}) + "\n")


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory, tiny_params) -> dict:
    """The flow run on data v1, then (data v2 committed) on v2, then once more with nothing changed."""
    tmp = tmp_path_factory.mktemp("two-versions")
    repo = make_pipeline_repo(tmp / "repo", tiny_params)
    prefect_home = tmp / "prefect-home"
    data = repo / "data/sources" / TINY_SOURCE
    logs: list[str] = []
    first = run_flow(repo, prefect_home, logs)
    first_data, first_copy = sha256(data), tmp / "elsewhere" / "first-model"
    shutil.copytree(repo / "models/merged", first_copy)
    add_rows(data, 30)
    commit_all(repo, "data v2: 30 more rows")
    second = run_flow(repo, prefect_home, logs)
    third = run_flow(repo, prefect_home, logs, token_from="block")
    return {"repo": repo, "first": first, "second": second, "third": third, "first_data": first_data,
            "second_data": sha256(data), "first_copy": first_copy, "prefect_home": prefect_home, "logs": logs}


def test_flow_promotes_the_first_model_and_judges_the_second_on_the_new_eval_split(two_versions):
    first, second, repo = two_versions["first"], two_versions["second"], two_versions["repo"]
    assert first["ran"] == list(STAGES)
    assert set(first["metrics"]) == {"metrics/train.json", "metrics/merge.json", "metrics/export.json",
                                     "metrics/eval.json"}
    assert first["decision"]["decision"] == "promoted"
    assert first["decision"]["version"] == 1
    assert first["decision"]["reason"].startswith("no model promoted yet")
    assert set(second["ran"]) == {"dataset", "train", "merge", "export", "evaluate", "lineage"}
    # new rows change the eval split, so the promoted model was scored again on it before comparing
    assert second["decision"]["eval_split_sha256"] != first["decision"]["eval_split_sha256"]
    assert "re-scored" in second["decision"]["reason"]
    registry = json.loads((repo / "registry.json").read_text())
    assert [entry["model_sha256"] for entry in registry["history"]] == [
        first["decision"]["model_sha256"], second["decision"]["model_sha256"]]
    assert registry["history"][0]["metrics"] == first["metrics"]["metrics/eval.json"]
    promoted = second["decision"] if second["decision"]["decision"] == "promoted" else first["decision"]
    assert registry["promoted"]["model_sha256"] == promoted["model_sha256"]
    tags = subprocess.run(["git", "tag", "--list", "tuneline-model@*"], cwd=repo, capture_output=True, text=True)
    assert tags.stdout.split() == [f"tuneline-model@v{v}.0.0" for v in range(1, registry["promoted"]["version"] + 1)]
    tagged = subprocess.run(["git", "rev-list", "-n1", "tuneline-model@v1.0.0"], cwd=repo, capture_output=True,
                            text=True)
    assert tagged.stdout.strip() == first["commit"]


def test_nothing_changed_runs_nothing_and_reports_it(two_versions):
    second, third = two_versions["second"], two_versions["third"]
    assert third["ran"] == []
    assert third["skipped"] == list(STAGES)
    assert third["changed"] is False
    assert third["note"].startswith("Nothing changed")
    assert third["metrics"] == second["metrics"]
    assert third["decision"] == second["decision"]  # no new decision: the same model was judged already
    assert third["commit"] == subprocess.run(["git", "rev-parse", "HEAD"], cwd=two_versions["repo"],
                                             capture_output=True, text=True).stdout.strip()


def test_audit_of_each_model_names_its_own_data_and_commit(two_versions):
    repo, first, second = two_versions["repo"], two_versions["first"], two_versions["second"]
    data_key = f"data/sources/{TINY_SOURCE}"
    old = audit_json(first["decision"]["model_sha256"], repo)  # the first model is no longer in the workspace
    assert old["found_in"]["commit"] == first["commit"]
    assert old["dataset"]["inputs"][data_key] == two_versions["first_data"]
    assert old["metrics"]["metrics/eval.json"]["accuracy"] == first["metrics"]["metrics/eval.json"]["accuracy"]
    assert old["promotion"][0]["decision"] == "promoted"
    current = audit_json("models/merged", repo)
    assert current["found_in"]["commit"] == second["commit"]
    assert current["dataset"]["inputs"][data_key] == two_versions["second_data"]
    assert current["sha256"] == second["decision"]["model_sha256"]
    by_revision = audit_json(first["commit"], repo)
    assert by_revision["sha256"] == first["decision"]["model_sha256"]
    # any artifact: the adapter of the current run, by path
    adapter = audit_json("models/adapter", repo)
    assert adapter["artifact"] == "models/adapter"
    assert adapter["found_in"]["commit"] == second["commit"]
    assert adapter["found_in"]["dvc_lock_md5"].endswith(".dir")


def test_audit_of_a_copy_outside_the_repo_answers_from_its_embedded_lineage(two_versions, tmp_path):
    copy, first = two_versions["first_copy"], two_versions["first"]
    facts = audit_json(str(copy), tmp_path)  # cwd: no repository
    assert facts["found_in"]["where"] == "embedded"
    assert facts["sha256"] == tree_sha256(copy) == first["decision"]["model_sha256"]
    assert facts["dataset"]["inputs"][f"data/sources/{TINY_SOURCE}"] == two_versions["first_data"]
    assert facts["base"]["files"]  # the base weights' sha256, file by file
    assert facts["code"]["commit"]
    assert facts["merge"]["fidelity"]["top1_agreement"] >= 0.999
    # the weights file alone, renamed: its safetensors header carries the same lineage
    lone = tmp_path / "some-model.safetensors"
    shutil.copy(copy / "model.safetensors", lone)
    alone = audit_json(str(lone), tmp_path)
    assert alone["found_in"]["where"] == "embedded"
    assert alone["dataset"]["inputs"] == facts["dataset"]["inputs"]
    text = audit(str(lone), tmp_path)
    assert text.returncode == 0, describe(text)
    assert two_versions["first_data"] in text.stdout
    assert "the lineage the model carries" in text.stdout


def test_merged_model_carries_lineage_header_and_model_card(two_versions):
    from safetensors import safe_open

    merged = two_versions["repo"] / "models/merged"
    lineage = json.loads((merged / "lineage.json").read_text())
    assert lineage["files"]["model.safetensors"] == sha256(merged / "model.safetensors")
    with safe_open(str(merged / "model.safetensors"), framework="pt") as opened:
        header = json.loads(opened.metadata()[METADATA_KEY])
    assert header["dataset"] == lineage["dataset"]
    assert header["code"] == lineage["code"]
    card = (merged / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers")
    for fact in (lineage["base"]["source"], two_versions["second_data"], lineage["code"]["commit"],
                 "dequantized", "Intended use"):
        assert fact in card


def test_audit_of_an_unknown_target_is_one_line(two_versions, tmp_path):
    stray = tmp_path / "stray.bin"
    stray.write_bytes(b"not a model")
    for target, expected in ((str(stray), "carries no lineage"), ("0" * 64, "no artifact or file with this sha256"),
                             ("no-such-rev", "not a file, a sha256 or a git revision")):
        result = audit(target, two_versions["repo"])
        assert result.returncode == 1
        assert expected in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_no_secret_in_anything_the_runs_wrote(two_versions, report):
    """The fake token was in every run's environment (the last run's only in a Prefect Secret block, and the
    flow found it there): no file of the repo, the DVC cache, the Prefect database (logs, artifacts) or the
    runs' debug-level output may contain it."""
    assert two_versions["third"]["flow_had_the_token"] is True
    files = [path for root in (two_versions["repo"], two_versions["prefect_home"]) for path in root.rglob("*")
             if path.is_file() and ".git" not in path.relative_to(root).parts]
    token = FAKE_TOKEN.encode()
    hits = [str(path) for path in files if token in path.read_bytes()]
    # git's objects are compressed: read the history (messages and every committed change) as text instead
    history = subprocess.run(["git", "log", "--all", "-p", "--format=%H%n%B"], cwd=two_versions["repo"],
                             capture_output=True, text=True, check=True).stdout
    outputs = [*two_versions["logs"], history]
    hits += [f"run output {number}" for number, text in enumerate(outputs) if FAKE_TOKEN in text]
    scanned = len(files) + len(outputs)
    report(f"secret scan: fake token planted in 3 flow runs (env, then a Prefect Secret block), debug logging; "
           f"{scanned} files and outputs scanned, {len(hits)} containing the token")
    assert len(files) > 50 and any(path.name == "prefect.db" for path in files)
    assert hits == []
