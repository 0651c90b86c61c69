"""Retrain: run the pipeline's DVC stages in order as Prefect tasks, and report what ran.

    python -m flows.retrain [REPO_DIR]      # ephemeral Prefect: no server needed

Each task reproduces one stage through DVC's Python API, so DVC decides whether it runs or is skipped
(unchanged inputs); Prefect adds retries on the network-bound fetch, logs, and a keyed artifact with
which stages ran and the metrics.
"""

import sys
import time
from pathlib import Path
from textwrap import dedent

from dvc.repo import Repo
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

STAGES = ("fetch", "convert", "dataset", "train", "merge", "evaluate")


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


def summary_markdown(results: list[dict], metrics: dict[str, dict]) -> str:
    rows = "\n".join(
        f"| {r['stage']} | {'ran' if r['ran'] else 'skipped (unchanged)'} | {r['seconds']} |" for r in results
    )
    metric_lines = "\n".join(f"- `{path}`: `{values}`" for path, values in metrics.items())
    return dedent(
        """\
        # Retrain summary

        | stage | outcome | seconds |
        |---|---|---|
        {rows}

        ## Metrics
        {metric_lines}
        """
    ).format(rows=rows, metric_lines=metric_lines)


@flow(name="tuneline-retrain", log_prints=True)
def retrain(repo_dir: Path = Path(".")) -> dict:
    """Run every stage in pipeline order; DVC skips the unchanged ones."""
    logger = get_run_logger()
    results = []
    for stage in STAGES:
        # Only fetch talks to the network, so only fetch is retried.
        stage_task = run_stage.with_options(name=f"dvc-{stage}", retries=3 if stage == "fetch" else 0,
                                            retry_delay_seconds=[10, 60, 300])
        result = stage_task(stage, repo_dir)
        logger.info("%s: %s", stage, "ran" if result["ran"] else "skipped (unchanged)")
        results.append(result)
    metrics = read_metrics(repo_dir)
    create_markdown_artifact(
        key="tuneline-retrain-summary",
        markdown=summary_markdown(results, metrics),
        description="Which pipeline stages ran or were skipped, and the resulting metrics",
    )
    return {
        "ran": [r["stage"] for r in results if r["ran"]],
        "skipped": [r["stage"] for r in results if not r["ran"]],
        "metrics": metrics,
    }


if __name__ == "__main__":
    retrain(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("."))
