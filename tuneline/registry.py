"""The promotion gate: promote a new model only when it beats the promoted one, and record the decision.

The new model's figure for `promote.metric` (params.yaml) is compared with the promoted model's on the same
eval split: its recorded figure when the split is unchanged, otherwise the promoted model re-scored on the
new split (its weights come from the DVC cache at its commit). Every decision, either way, goes into
registry.json; a promoted model's commit is tagged tuneline-model@vN.0.0.
"""

import tempfile
from pathlib import Path

from dvc.api import DVCFileSystem

from tuneline.artifacts import write_json
from tuneline.errors import TunelineError
from tuneline.lineage import REGISTRY_FILE, git, read_registry, utc_now
from tuneline.params import PARAMS_FILE, PromoteParams, load_section
from tuneline.pipeline import MODEL_ARTIFACT, model_path, stage_paths


def run_git(repo_dir: Path, *args: str) -> str:
    """`git ARGS` in the repository, its output; a failure is an error (lineage.git returns None)."""
    output = git(repo_dir, *args)
    if output is None:
        raise TunelineError(f"{repo_dir}: `git {' '.join(args)}` failed; check the repository's state")
    return output


def _evaluate_paths(repo_dir: Path) -> tuple[str, str]:
    """The dataset folder the evaluate stage scores on and the metrics file it writes, from dvc.yaml."""
    _, _, _, dataset_dir, _, metrics_file, _ = stage_paths(repo_dir, "evaluate")
    return dataset_dir, metrics_file


def candidate_value(record: dict, params: PromoteParams, metrics_file: str) -> float:
    """The new merged model's figure for `promote.metric`, from the run's eval metrics as lineage.json records
    them."""
    evaluation = record["metrics"].get(metrics_file, {})
    figure = evaluation.get(params.metric)
    if not isinstance(figure, dict) or "merged" not in figure:
        known = ", ".join(name for name, value in evaluation.items() if isinstance(value, dict) and "merged" in value)
        raise TunelineError(
            f"params.yaml: promote.metric: '{params.metric}' is not a figure of {metrics_file}; "
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


def _rescore_promoted(repo_dir: Path, promoted: dict, metric: str) -> float:
    """Score the promoted model on the current eval split: its weights come from the DVC cache at its commit."""
    # Imported here, not above: scoring needs torch, peft and scikit-learn, seconds of imports that every
    # `tuneline retrain/serve/deploy` and Prefect worker would pay at start, and only a re-score uses them.
    from tuneline.modeling import load_full_model, load_tokenizer, read_split
    from tuneline.scoring import score_model, select_rows

    params = load_section("evaluate", repo_dir / PARAMS_FILE)
    dataset_dir = repo_dir / _evaluate_paths(repo_dir)[0]
    rows = select_rows(read_split(dataset_dir / "eval.parquet"), params)
    tokenizer = load_tokenizer(dataset_dir / "tokenizer")
    with tempfile.TemporaryDirectory(prefix="promoted-model-") as scratch:
        model_dir = Path(scratch) / "model"  # absent: fsspec copies the directory's contents there
        DVCFileSystem(str(repo_dir), rev=promoted["commit"]).get(model_path(repo_dir), str(model_dir), recursive=True)
        figures, _ = score_model(load_full_model(model_dir).eval(), tokenizer, rows, params, "promoted")
    return float(figures[metric])


def promotion_gate(repo_dir: Path, record: dict, run_commit: str | None) -> dict:
    """Compare the new model with the promoted one on the same eval split; record the decision."""
    params: PromoteParams = load_section("promote", repo_dir / PARAMS_FILE)
    registry = read_registry(repo_dir)
    dataset_dir, metrics_file = _evaluate_paths(repo_dir)
    model_sha256 = record["artifacts"][model_path(repo_dir)]["sha256"]
    eval_split = record["artifacts"][dataset_dir]["files"]["eval.parquet"]
    value = candidate_value(record, params, metrics_file)
    promoted = registry["promoted"]
    compared_on = None
    if promoted is None:
        promoted_value = None
    elif promoted["eval_split_sha256"] == eval_split and promoted["metric"] == params.metric:
        promoted_value, compared_on = promoted["value"], "the same eval split (its recorded figure)"
    elif promoted["commit"]:
        promoted_value = _rescore_promoted(repo_dir, promoted, params.metric)
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
        "metrics": record["metrics"].get(metrics_file, {}),
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
    """The registry's decision on this model, when one was already made (a rerun that changed nothing)."""
    return next((e for e in read_registry(repo_dir)["history"] if e["model_sha256"] == model_sha256), None)
