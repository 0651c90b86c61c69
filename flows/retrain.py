"""Retrain: run the pipeline's DVC stages as Prefect tasks, commit the run, and promote only a better model.

    tuneline retrain [REPO_DIR]                  # once, now (ephemeral Prefect unless PREFECT_API_URL is set)
    tuneline serve --cron "0 3 * * 1" [REPO_DIR] # on a schedule, against a Prefect server
    tuneline deploy --pool NAME --cron "0 3 * * 1" [REPO_DIR]
                                                 # on a schedule, run by a worker of a Prefect work pool

DVC decides what reruns (a stage whose inputs are unchanged is skipped); Prefect decides when, retries the
network-bound fetch, allows one retraining at a time (global concurrency limit `tuneline-retrain`, on top
of DVC's own repo lock) and publishes a report. After a run that changed anything, the flow commits the
run's records (dvc.lock, lineage.json, metrics, the params and data sources it ran on), then the promotion
gate compares the new model with the promoted one on the same eval split (`promote` in params.yaml; the
promoted model is re-scored when the eval split changed). The decision goes into registry.json, either way;
a promoted model's commit is tagged tuneline-model@vN.0.0. A rejected model stays in its commit and the
DVC cache: nothing is lost.
"""

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

from dvc.repo import Repo
from prefect import flow, get_client, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.blocks.system import Secret
from prefect.concurrency.sync import concurrency
from prefect.types.entrypoint import EntrypointType

from tuneline.artifacts import read_json, write_json
from tuneline.errors import TunelineError
from tuneline.lineage import LINEAGE_FILE, MODEL_ARTIFACT, MODEL_PATH, REGISTRY_FILE, git, read_registry, utc_now
from tuneline.params import PARAMS_FILE, PromoteParams, load_section

STAGES = ("fetch", "convert", "dataset", "train", "merge", "evaluate", "lineage")
CONCURRENCY_LIMIT = "tuneline-retrain"
DEPLOYMENT = "tuneline-retrain"  # one scheduled retraining per server: served here or deployed to a work pool
HF_TOKEN_BLOCK = "hf-token"  # a Prefect Secret block, used when HF_TOKEN is not set
# What a run commits: its records, and the params and data it ran on (code stays the user's to commit).
RUN_FILES = ("dvc.lock", LINEAGE_FILE, "metrics", "eval", "dvclive", "params.yaml", "data/sources")


@task
def run_stage(stage: str, repo_dir: Path) -> dict:
    """Reproduce one DVC stage; report whether it ran (False: its inputs were unchanged) and how long."""
    started = time.perf_counter()
    with Repo(str(repo_dir)) as repo:
        reproduced = repo.reproduce(stage, single_item=True)
    return {"stage": stage, "ran": bool(reproduced), "seconds": round(time.perf_counter() - started, 1)}


def read_metrics(repo_dir: Path) -> dict[str, dict]:
    """The metrics files declared in dvc.yaml, as DVC reads them: {path: metrics}."""
    with Repo(str(repo_dir)) as repo:
        shown = repo.metrics.show()
    files = shown.get("workspace", shown.get("", {})).get("data", {})
    return {path: entry.get("data", {}) for path, entry in files.items()}


@task
def commit_run(repo_dir: Path, message: str) -> str | None:
    """Commit the run's records; return the commit that holds them (None outside a git repository)."""
    if git(repo_dir, "rev-parse", "--git-dir") is None:
        return None
    # Data kept out of git (gitignored, e.g. tracked with `dvc add`) is recorded by its sha256 in lineage.json.
    paths = [path for path in RUN_FILES
             if (repo_dir / path).exists() and git(repo_dir, "check-ignore", "-q", path) is None]
    run_git(repo_dir, "add", "-A", "--", *paths)
    if git(repo_dir, "diff", "--cached", "--quiet") is None:  # exit status 1: something is staged
        run_git(repo_dir, "commit", "-q", "-m", message, "--", *paths)
    return run_git(repo_dir, "rev-parse", "HEAD").strip()


@task(retries=3, retry_delay_seconds=[10, 60, 300])
def push_artifacts(repo_dir: Path) -> str:
    """Push the run's artifacts to the default DVC remote, when one is configured, so that other machines
    `dvc pull` them at the run's commit; say what happened."""
    with Repo(str(repo_dir)) as repo:
        remote = repo.config["core"].get("remote")
        if not remote:
            return "no default DVC remote: artifacts stay in this machine's cache (README: Sharing artifacts)"
        pushed = repo.push()
    return f"pushed {pushed} file(s) to the DVC remote '{remote}'"


def run_git(repo_dir: Path, *args: str) -> str:
    output = git(repo_dir, *args)
    if output is None:
        raise TunelineError(f"{repo_dir}: `git {' '.join(args)}` failed; check the repository's state")
    return output


def candidate_value(record: dict, params: PromoteParams) -> float:
    """The new merged model's figure for `promote.metric`, from the run's metrics/eval.json."""
    evaluation = record["metrics"].get("metrics/eval.json", {})
    figure = evaluation.get(params.metric)
    if not isinstance(figure, dict) or "merged" not in figure:
        known = ", ".join(name for name, value in evaluation.items() if isinstance(value, dict) and "merged" in value)
        raise TunelineError(
            f"params.yaml: promote.metric: '{params.metric}' is not a figure of metrics/eval.json; "
            f"its figures are: {known}"
        )
    return float(figure["merged"])


def gate(candidate: float, promoted: float | None, params: PromoteParams) -> tuple[bool, str]:
    """Promote only a model better than the promoted one by more than the margin; say why, either way."""
    if promoted is None:
        return True, f"no model promoted yet; {params.metric} {candidate:.4f}"
    gain = candidate - promoted if params.higher_is_better else promoted - candidate
    verdict = "beats" if gain > params.margin else "does not beat"
    return gain > params.margin, (
        f"{params.metric} {candidate:.4f} {verdict} the promoted model's {promoted:.4f} by more than "
        f"{params.margin} (difference {gain:+.4f})"
    )


def rescore_promoted(repo_dir: Path, promoted: dict, metric: str) -> float:
    """Score the promoted model on the current eval split: its weights come from the DVC cache at its commit."""
    from dvc.api import DVCFileSystem

    from stages.evaluate import score_model, select_rows
    from tuneline.modeling import load_full_model, load_tokenizer, read_split

    params = load_section("evaluate", repo_dir / PARAMS_FILE)
    rows = select_rows(read_split(repo_dir / "data/dataset/eval.parquet"), params)
    tokenizer = load_tokenizer(repo_dir / "data/dataset/tokenizer")
    with tempfile.TemporaryDirectory(prefix="promoted-model-") as scratch:
        model_dir = Path(scratch) / "model"  # absent: fsspec copies the directory's contents there
        DVCFileSystem(str(repo_dir), rev=promoted["commit"]).get(MODEL_PATH, str(model_dir), recursive=True)
        figures, _ = score_model(load_full_model(model_dir).eval(), tokenizer, rows, params, "promoted")
    return float(figures[metric])


@task
def promotion_gate(repo_dir: Path, record: dict, run_commit: str | None) -> dict:
    """Compare the new model with the promoted one on the same eval split; record the decision."""
    params: PromoteParams = load_section("promote", repo_dir / PARAMS_FILE)
    registry = read_registry(repo_dir)
    model_sha256 = record["artifacts"][MODEL_PATH]["sha256"]
    eval_split = record["artifacts"]["data/dataset"]["files"]["eval.parquet"]
    value = candidate_value(record, params)
    promoted = registry["promoted"]
    compared_on = None
    if promoted is None:
        promoted_value = None
    elif promoted["eval_split_sha256"] == eval_split and promoted["metric"] == params.metric:
        promoted_value, compared_on = promoted["value"], "the same eval split (its recorded figure)"
    elif promoted["commit"]:
        promoted_value = rescore_promoted(repo_dir, promoted, params.metric)
        compared_on = "the new eval split (the promoted model re-scored on it)"
    else:
        raise TunelineError(f"{REGISTRY_FILE}: the promoted model has no commit to re-score it from; commit runs")
    promote, reason = gate(value, promoted_value, params)
    entry = {
        "decision": "promoted" if promote else "rejected",
        "reason": reason + (f", on {compared_on}" if compared_on else ""),
        "version": (promoted["version"] + 1 if promoted else 1) if promote else None,
        "model_sha256": model_sha256,
        "commit": run_commit,
        "metric": params.metric,
        "value": value,
        "eval_split_sha256": eval_split,
        "metrics": record["metrics"].get("metrics/eval.json", {}),
        "lineage": {"base": record["base"]["source"] if record.get("base") else None,
                    "data": record["dataset"]["inputs"] if record.get("dataset") else None,
                    "code": record["code"]},
        "decided_at": utc_now(),
    }
    registry["history"].append(entry)
    if promote:
        registry["promoted"] = entry
    write_json(repo_dir / REGISTRY_FILE, registry)
    if run_commit:
        run_git(repo_dir, "add", REGISTRY_FILE)
        run_git(repo_dir, "commit", "-q", "-m", f"registry: {entry['decision']} {model_sha256[:12]}: {reason}",
                "--", REGISTRY_FILE)
        if promote:
            run_git(repo_dir, "tag", "-a", f"{MODEL_ARTIFACT}@v{entry['version']}.0.0", run_commit, "-m", reason)
    return entry


def already_decided(repo_dir: Path, model_sha256: str) -> dict | None:
    return next((e for e in read_registry(repo_dir)["history"] if e["model_sha256"] == model_sha256), None)


def summary_markdown(results: list[dict], metrics: dict[str, dict], record: dict | None, decision: dict | None,
                     note: str) -> str:
    rows = "\n".join(
        f"| {r['stage']} | {'ran' if r['ran'] else 'skipped (unchanged)'} | {r['seconds']} |" for r in results
    )
    metric_lines = "\n".join(f"- `{path}`: `{values}`" for path, values in metrics.items())
    lineage = "(no lineage.json yet)"
    if record:
        inputs = ", ".join(f"`{path}` {digest[:12]}" for path, digest in (record["dataset"] or {})["inputs"].items())
        lineage = (
            f"- model `{MODEL_PATH}` sha256 `{record['artifacts'][MODEL_PATH]['sha256']}`\n"
            f"- base `{(record['base'] or {}).get('source')}`\n- data {inputs}\n"
            f"- code `{record['code']['commit']}`{' (dirty)' if record['code']['dirty'] else ''}"
        )
    promotion = f"**{decision['decision']}**: {decision['reason']}" if decision else "no decision"
    return (
        f"# Retrain summary\n\n{note}\n\n| stage | outcome | seconds |\n|---|---|---|\n{rows}\n\n"
        f"## Promotion\n{promotion}\n\n## Lineage\n{lineage}\n\n## Metrics\n{metric_lines}\n"
    )


def hub_token_from_prefect() -> None:
    """Give the stages HF_TOKEN from the Prefect Secret block `hf-token` when the environment has none.

    The token only ever lives in this process's environment, which DVC hands to the stage processes.
    """
    if os.environ.get("HF_TOKEN"):
        return
    try:
        secret = Secret.load(HF_TOKEN_BLOCK)
    except ValueError:  # no such block: public models need no token
        return
    os.environ["HF_TOKEN"] = secret.get()


def one_retraining_at_a_time():
    """A Prefect global concurrency limit of one slot: a second retraining waits for the first to finish."""
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(CONCURRENCY_LIMIT, 1)
    return concurrency(CONCURRENCY_LIMIT, occupy=1, strict=True)


@flow(name="tuneline-retrain", log_prints=True)
def retrain(repo_dir: Path = Path("."), commit: bool = True) -> dict:
    """Run every stage in pipeline order (DVC skips the unchanged), commit, and pass the promotion gate."""
    logger = get_run_logger()
    repo_dir = repo_dir.resolve()
    started = time.perf_counter()
    hub_token_from_prefect()
    # DVC finds stage targets, and names metrics files, relative to the working directory: a worker's run (it
    # starts in a scratch folder) or `tuneline retrain REPO_DIR` from elsewhere must work in the repo.
    with contextlib.chdir(repo_dir), one_retraining_at_a_time():
        results = []
        for stage in STAGES:
            # Only fetch talks to the network, so only fetch is retried.
            stage_task = run_stage.with_options(name=f"dvc-{stage}", retries=3 if stage == "fetch" else 0,
                                                retry_delay_seconds=[10, 60, 300])
            result = stage_task(stage, repo_dir)
            logger.info("%s: %s (%.1f s)", stage, "ran" if result["ran"] else "skipped (unchanged)", result["seconds"])
            results.append(result)
        ran = [r["stage"] for r in results if r["ran"]]
        record = read_json(repo_dir / LINEAGE_FILE)
        # Also when nothing ran: a run made by hand with `dvc repro` and not yet committed gets its commit.
        run_commit = commit_run(repo_dir, f"retrain: ran {', '.join(ran) or 'nothing'}") if commit else None
        logger.info(push_artifacts(repo_dir))
        decision = already_decided(repo_dir, record["artifacts"][MODEL_PATH]["sha256"])
        if decision:
            seconds = time.perf_counter() - started
            note = (f"Nothing changed: every stage's inputs are as dvc.lock recorded them ({seconds:.1f} s)."
                    if not ran else "The new model is identical to one already decided on.")
            note += f" This model was {decision['decision']} on {decision['decided_at']}."
        else:
            decision = promotion_gate(repo_dir, record, run_commit)
            note = f"Ran {', '.join(ran) or 'nothing'}; the model was {decision['decision']}: {decision['reason']}."
        logger.info(note)
        metrics = read_metrics(repo_dir)
        create_markdown_artifact(
            key="tuneline-retrain-summary",
            markdown=summary_markdown(results, metrics, record, decision, note),
            description="Stages ran or skipped with their durations, the metrics, the lineage and the promotion",
        )
    return {
        "ran": ran,
        "skipped": [r["stage"] for r in results if not r["ran"]],
        "seconds": {r["stage"]: r["seconds"] for r in results},
        "changed": bool(ran),
        "note": note,
        "commit": run_commit,
        "decision": decision,
        "metrics": metrics,
    }


def check_schedule(cron: str) -> None:
    """Fail in one line before registering anything: no Prefect server to schedule on, or a bad cron."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise TunelineError(
            "PREFECT_API_URL is not set: Prefect cannot schedule on its ephemeral server. Start one with "
            "`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api (README: Scheduled retraining)"
        )
    try:
        CronSchedule(cron=cron)
    except ValueError:
        raise TunelineError(
            f"--cron: '{cron}' is not a cron schedule; write it like \"0 3 * * 1\" (Mondays 03:00)"
        ) from None


def serve(repo_dir: Path, cron: str) -> None:
    """Register the flow with the Prefect server at PREFECT_API_URL on a cron schedule, and run what it sends."""
    check_schedule(cron)
    retrain.serve(
        name=DEPLOYMENT,
        cron=cron,
        parameters={"repo_dir": str(repo_dir.resolve())},
        description=f"Scheduled retraining of the tuneline pipeline in {repo_dir.resolve()}",
        entrypoint_type=EntrypointType.MODULE_PATH,  # flows.retrain:retrain, importable wherever tuneline is installed
    )


def deploy(repo_dir: Path, pool: str, cron: str) -> str:
    """Register the flow on the work pool `pool` of the Prefect server at PREFECT_API_URL, on a cron schedule;
    a worker of that pool runs it in the clone at `repo_dir` on its machine. Say what was registered."""
    from prefect.exceptions import ObjectNotFound

    check_schedule(cron)
    # The worker's path: made absolute (its runs start in a scratch folder), but this machine's links are not
    # followed, since the worker may be elsewhere.
    repo_dir = repo_dir.absolute()
    try:
        retrain.deploy(
            name=DEPLOYMENT,
            work_pool_name=pool,
            cron=cron,
            parameters={"repo_dir": str(repo_dir)},
            description=f"Scheduled retraining of the tuneline pipeline in {repo_dir}, by a worker of '{pool}'",
            # The worker imports flows.retrain:retrain from its own install of tuneline: no image, no storage.
            entrypoint_type=EntrypointType.MODULE_PATH,
            build=False,
            push=False,
            print_next_steps=False,
            ignore_warnings=True,  # a process pool is meant: Prefect's hint to use .serve instead is `tuneline serve`
        )
    except ValueError as error:
        if not isinstance(error.__cause__, ObjectNotFound):
            raise
        raise TunelineError(
            f"work pool '{pool}' does not exist on the Prefect server; create it with "
            f"`prefect work-pool create {pool} --type process`"
        ) from None
    return (
        f"registered {retrain.name}/{DEPLOYMENT} on work pool '{pool}': cron \"{cron}\", repo_dir {repo_dir}\n"
        f"run it with a worker, in a clone at {repo_dir} with tuneline installed: prefect worker start --pool {pool}"
    )


if __name__ == "__main__":
    retrain(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("."))
