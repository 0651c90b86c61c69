"""Audit: which weights, data, params and code produced a model (or any pipeline artifact), and how it scored.

    tuneline audit PATH | SHA256 | GIT-REV [--json] [--repo DIR]

PATH: its sha256 is looked up in the lineage.json of every commit, oldest first (the commit that produced
it); a model found in no commit answers from the lineage it carries (lineage.json or its safetensors
header), so a copy found far from the repo still says where it came from. SHA256: a model's or any file's,
looked up the same way. GIT-REV: the merged model that commit recorded.
"""

import json
import re
from pathlib import Path

import yaml

from tuneline.errors import TunelineError
from tuneline.lineage import LINEAGE_FILE, embedded_lineage, git, read_registry, tree_sha256
from tuneline.pipeline import model_path

SHA256 = re.compile(r"[0-9a-f]{64}")


def audit(target: str, repo_dir: Path) -> dict:
    """The audit report of `target` (a path, a sha256 or a git revision), as a dict."""
    path = Path(target)
    if path.exists():
        sha256 = tree_sha256(path)
        found = _find_in_history(repo_dir, sha256, match_files=path.is_file())
        if found:
            return _report(repo_dir, sha256, **found)
        lineage = embedded_lineage(path)
        if lineage is None:
            raise TunelineError(
                f"{path}: sha256 {sha256} is in no lineage.json of {repo_dir.resolve()}'s history and it carries "
                f"no lineage (no lineage.json, no tuneline safetensors header or GGUF metadata); audit it from its "
                "pipeline's repo"
            )
        return _report(repo_dir, sha256, record=lineage, artifact=str(path), commit=None, where="embedded")
    if SHA256.fullmatch(target.lower()):
        found = _find_in_history(repo_dir, target.lower(), match_files=True)
        if not found:
            raise TunelineError(
                f"{target}: no artifact or file with this sha256 in the lineage.json of any commit of "
                f"{repo_dir.resolve()} (nor in the workspace's)"
            )
        return _report(repo_dir, target.lower(), **found)
    output = git(repo_dir, "rev-parse", "--verify", "--quiet", f"{target}^{{commit}}")
    if output is None:
        raise TunelineError(f"{target}: not a file, a sha256 or a git revision of {repo_dir.resolve()}")
    commit = output.strip()
    record = _record_at(repo_dir, commit)
    if record is None:
        raise TunelineError(f"{target}: commit {commit[:12]} holds no {LINEAGE_FILE}; it records no run")
    model = model_path(repo_dir)
    sha256 = record["artifacts"][model]["sha256"]
    # The commit that first recorded this model, if the current branch's history has it; else this one.
    found = _find_in_history(repo_dir, sha256, match_files=False)
    return _report(repo_dir, sha256, **(found or {"record": record, "artifact": model, "commit": commit,
                                                 "where": "commit"}))


def _record_at(repo_dir: Path, commit: str) -> dict | None:
    text = git(repo_dir, "show", f"{commit}:{LINEAGE_FILE}")
    return json.loads(text) if text else None


def _find_in_history(repo_dir: Path, sha256: str, match_files: bool) -> dict | None:
    """The oldest commit whose lineage.json lists an artifact with this sha256 (or, with `match_files`, a file
    of one), else the workspace's uncommitted lineage.json; None when neither does."""
    commits = (git(repo_dir, "log", "--reverse", "--format=%H", "--", LINEAGE_FILE) or "").split()
    candidates = [(commit, _record_at(repo_dir, commit)) for commit in commits]
    workspace = repo_dir / LINEAGE_FILE
    if workspace.is_file():
        candidates.append((None, json.loads(workspace.read_text())))
    for commit, record in candidates:
        for name, artifact in (record or {}).get("artifacts", {}).items():
            if artifact["sha256"] == sha256 or (match_files and sha256 in artifact["files"].values()):
                return {"record": record, "artifact": name, "commit": commit,
                        "where": "commit" if commit else "workspace"}
    return None


def _report(repo_dir: Path, sha256: str, *, record: dict, artifact: str, commit: str | None, where: str) -> dict:
    """The facts of one artifact: itself, where it was found, and what produced it."""
    found = {"where": where, "commit": commit}
    if commit:
        found |= {
            "date": (git(repo_dir, "show", "-s", "--format=%cI", commit) or "").strip(),
            "subject": (git(repo_dir, "show", "-s", "--format=%s", commit) or "").strip(),
            "dvc_lock_md5": _dvc_lock_md5(repo_dir, commit, artifact),
        }
    return {
        "artifact": artifact,
        "sha256": sha256,
        "found_in": found,
        "produced_at": record.get("produced_at"),
        "code": record.get("code"),
        "base": record.get("base"),
        "dataset": record.get("dataset"),
        "train": record.get("train"),
        "training": record.get("training"),
        "merge": record.get("merge"),
        "metrics": record.get("metrics", {}),
        "promotion": _promotion_of(repo_dir, record, artifact),
    }


def _dvc_lock_md5(repo_dir: Path, commit: str, artifact: str) -> str | None:
    """The md5 DVC recorded for the artifact in that commit's dvc.lock (what `dvc checkout` restores)."""
    lock = yaml.safe_load(git(repo_dir, "show", f"{commit}:dvc.lock") or "{}") or {}
    for stage in lock.get("stages", {}).values():
        for out in stage.get("outs", []):
            if out.get("path") == artifact:
                return out.get("md5")
    return None


def _promotion_of(repo_dir: Path, record: dict, artifact: str) -> list[dict]:
    """The registry's decisions on this model (promoted or rejected, and why)."""
    if "artifacts" not in record or artifact != model_path(repo_dir):  # a model's own lineage names no artifacts
        return []
    model = record["artifacts"][artifact]["sha256"]
    return [entry for entry in read_registry(repo_dir)["history"] if entry["model_sha256"] == model]


def format_report(facts: dict) -> str:
    """The report for a person: one fact per line, full hashes."""
    found, code = facts["found_in"], facts["code"] or {}
    if found["where"] == "commit":
        where = (f"commit {found['commit']} ({found['date']}, \"{found['subject']}\"); "
                 f"dvc.lock md5 {found['dvc_lock_md5']}")
    elif found["where"] == "workspace":
        where = "the workspace's lineage.json (this run is not committed yet)"
    else:
        where = "the lineage the model carries (no repository at hand)"
    lines = [
        f"{facts['artifact']}  sha256 {facts['sha256']}",
        f"recorded in  {where}",
        f"produced     {facts['produced_at']} by code commit {code.get('commit')}"
        + (f" with uncommitted changes to {', '.join(code['dirty_files'])}" if code.get("dirty") else " (clean)"),
    ]
    base = facts["base"] or {}
    lines.append(f"base         {base.get('source')} (revision {base.get('revision')})")
    lines += [f"               {name}  sha256 {digest}" for name, digest in base.get("files", {}).items()]
    dataset = facts["dataset"] or {}
    for number, (name, digest) in enumerate(dataset.get("inputs", {}).items()):
        lines.append(f"{'data' if number == 0 else '':<13}{name}  sha256 {digest}")
    for name, digest in dataset.get("splits", {}).items():
        lines.append(f"               {name}  sha256 {digest}")
    if dataset.get("counts"):
        lines.append("  counts       " + ", ".join(f"{step} {n}" for step, n in dataset["counts"].items() if n))
    if dataset.get("params"):
        shown = {key: value for key, value in dataset["params"].items() if key != "sources"}
        lines.append("  params       " + ", ".join(f"{key} {value}" for key, value in shown.items()))
    if facts["train"]:
        lines.append("train        " + ", ".join(f"{key} {value}" for key, value in facts["train"].items()))
    if facts["training"]:
        lines.append(f"               {facts['training']['steps']} steps, final loss {facts['training']['final_loss']}")
    merge = facts["merge"] or {}
    if merge:
        fidelity = merge.get("fidelity", {})
        lines.append(f"merge        {merge['method']}; {merge['params']['dtype']}")
        if fidelity:
            lines.append(f"               vs the QLoRA model: KL {fidelity['kl']:.2e}, "
                         f"top-1 agreement {fidelity['top1_agreement']:.4f}")
    for path, values in facts["metrics"].items():
        lines.append(f"metrics      {path}: " + "; ".join(f"{key} {_short(value)}" for key, value in values.items()))
    for entry in facts["promotion"]:
        version = f" as v{entry['version']}" if entry["version"] else ""
        lines.append(f"promotion    {entry['decision']}{version} on {entry['decided_at']}: {entry['reason']}")
    return "\n".join(lines)


def _short(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{key} {_short(inner)}" for key, inner in value.items())
    return str(value)
