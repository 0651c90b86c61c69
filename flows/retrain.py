"""Retrain: run the pipeline's DVC stages as Prefect tasks, commit the run, and promote only a better model.

    tuneline retrain [REPO_DIR]                  # once, now (ephemeral Prefect unless PREFECT_API_URL is set)
    tuneline serve --cron "0 3 * * 1" [REPO_DIR] # on a schedule, against a Prefect server
    tuneline deploy --pool NAME --cron "0 3 * * 1" [REPO_DIR]
                                                 # on a schedule, run by a worker of a Prefect work pool

DVC decides what reruns (a stage whose inputs are unchanged is skipped); Prefect decides when, retries the
network-bound fetch, allows one retraining at a time (global concurrency limit `tuneline-retrain`, on top
of DVC's own repo lock) and publishes a report. After a run that changed anything, the flow commits the
run's records (dvc.lock, lineage.json, metrics, the params and data sources it ran on), then the promotion
gate (tuneline/registry.py) compares the new model with the promoted one on the same eval split (`promote`
in params.yaml; the promoted model is re-scored when the eval split changed). The decision goes into
registry.json, either way; a promoted model's commit is tagged tuneline-model@vN.0.0. A rejected model
stays in its commit and the DVC cache: nothing is lost.
"""

import contextlib
import os
import sys
import time
from pathlib import Path

from dvc.repo import Repo
from prefect import flow, get_client, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.blocks.system import Secret
from prefect.concurrency.sync import concurrency
from prefect.types.entrypoint import EntrypointType

from tuneline.artifacts import read_json
from tuneline.errors import TunelineError
from tuneline.lineage import LINEAGE_FILE, git
from tuneline.params import PARAMS_FILE
from tuneline.pipeline import model_path, run_records, stage_names, stage_paths
from tuneline.registry import already_decided, promotion_gate, run_git

CONCURRENCY_LIMIT = "tuneline-retrain"
DEPLOYMENT = "tuneline-retrain"  # one scheduled retraining per server: served here or deployed to a work pool
HF_TOKEN_BLOCK = "hf-token"  # a Prefect Secret block, used when HF_TOKEN is not set


@task
def run_stage(stage: str, repo_dir: Path) -> dict:
    """Reproduce one DVC stage; report whether it ran (False: its inputs were unchanged) and how long."""
    started = time.perf_counter()
    with Repo(str(repo_dir)) as repo:
        reproduced = repo.reproduce(stage, single_item=True)
    return {"stage": stage, "ran": bool(reproduced), "seconds": round(time.perf_counter() - started, 1)}


def _read_metrics(repo_dir: Path) -> dict[str, dict]:
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
    # What a run commits: its records, and the params and data sources it ran on (code stays the user's to
    # commit). Data kept out of git (gitignored, e.g. tracked with `dvc add`) is recorded by its sha256 in
    # lineage.json.
    run_files = [*run_records(repo_dir), PARAMS_FILE, stage_paths(repo_dir, "dataset")[0]]
    paths = [path for path in run_files
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
            return ("no default DVC remote: artifacts stay in this machine's cache "
                    "(docs/pipeline.md: Sharing artifacts)")
        pushed = repo.push()
    return f"pushed {pushed} file(s) to the DVC remote '{remote}'"


@task(name="promotion_gate")
def decide_promotion(repo_dir: Path, record: dict, run_commit: str | None) -> dict:
    """The promotion gate, as a task of the flow: registry.json and the tag record its decision."""
    return promotion_gate(repo_dir, record, run_commit)


def _summary_markdown(results: list[dict], metrics: dict[str, dict], record: dict | None, decision: dict | None,
                     note: str, model: str) -> str:
    rows = "\n".join(
        f"| {r['stage']} | {'ran' if r['ran'] else 'skipped (unchanged)'} | {r['seconds']} |" for r in results
    )
    metric_lines = "\n".join(f"- `{path}`: `{values}`" for path, values in metrics.items())
    lineage = "(no lineage.json yet)"
    if record:
        inputs = ", ".join(f"`{path}` {digest[:12]}" for path, digest in (record["dataset"] or {})["inputs"].items())
        lineage = (
            f"- model `{model}` sha256 `{record['artifacts'][model]['sha256']}`\n"
            f"- base `{(record['base'] or {}).get('source')}`\n- data {inputs}\n"
            f"- code `{record['code']['commit']}`{' (dirty)' if record['code']['dirty'] else ''}"
        )
    promotion = f"**{decision['decision']}**: {decision['reason']}" if decision else "no decision"
    return (
        f"# Retrain summary\n\n{note}\n\n| stage | outcome | seconds |\n|---|---|---|\n{rows}\n\n"
        f"## Promotion\n{promotion}\n\n## Lineage\n{lineage}\n\n## Metrics\n{metric_lines}\n"
    )


def _hub_token_from_prefect() -> None:
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


def _one_retraining_at_a_time():
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
    _hub_token_from_prefect()
    # DVC finds stage targets, and names metrics files, relative to the working directory: a worker's run (it
    # starts in a scratch folder) or `tuneline retrain REPO_DIR` from elsewhere must work in the repo.
    with contextlib.chdir(repo_dir), _one_retraining_at_a_time():
        results = []
        for stage in stage_names(repo_dir):
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
        decision = already_decided(repo_dir, record["artifacts"][model_path(repo_dir)]["sha256"])
        if decision:
            seconds = time.perf_counter() - started
            note = (f"Nothing changed: every stage's inputs are as dvc.lock recorded them ({seconds:.1f} s)."
                    if not ran else "The new model is identical to one already decided on.")
            note += f" This model was {decision['decision']} on {decision['decided_at']}."
        else:
            decision = decide_promotion(repo_dir, record, run_commit)
            note = f"Ran {', '.join(ran) or 'nothing'}; the model was {decision['decision']}: {decision['reason']}."
        logger.info(note)
        metrics = _read_metrics(repo_dir)
        create_markdown_artifact(
            key="tuneline-retrain-summary",
            markdown=_summary_markdown(results, metrics, record, decision, note, model_path(repo_dir)),
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


def _check_schedule(cron: str) -> None:
    """Fail in one line before registering anything: no Prefect server to schedule on, or a bad cron."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise TunelineError(
            "PREFECT_API_URL is not set: Prefect cannot schedule on its ephemeral server. Start one with "
            "`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api "
            "(docs/retraining.md: On a schedule)"
        )
    try:
        CronSchedule(cron=cron)
    except ValueError:
        raise TunelineError(
            f"--cron: '{cron}' is not a cron schedule; write it like \"0 3 * * 1\" (Mondays 03:00)"
        ) from None


def serve(repo_dir: Path, cron: str) -> None:
    """Register the flow with the Prefect server at PREFECT_API_URL on a cron schedule, and run what it sends."""
    _check_schedule(cron)
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

    _check_schedule(cron)
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
