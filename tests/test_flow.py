"""The Prefect retrain flow on a fresh tiny pipeline repo, with an ephemeral Prefect (no server, no URL).

The flow runs in a subprocess whose cwd is the repo (stage commands are relative to it), with its own
PREFECT_HOME; both calls share one subprocess so the temporary Prefect server starts once.
"""

import json
import subprocess
import sys

from conftest import STAGES, describe, make_pipeline_repo, subprocess_env

SCRIPT = """
import json
from pathlib import Path
from flows.retrain import retrain

repo = Path.cwd()
first = retrain(repo)
second = retrain(repo)
print("RESULT " + json.dumps({"first": first, "second": second}, default=str))
"""


def test_retrain_flow_runs_everything_then_nothing(tmp_path, tiny_params):
    repo = make_pipeline_repo(tmp_path / "repo", tiny_params)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=repo, env=subprocess_env(prefect_home=tmp_path / "prefect-home"),
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, describe(result)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, describe(result)
    outcome = json.loads(lines[0].removeprefix("RESULT "))
    first, second = outcome["first"], outcome["second"]
    assert first["ran"] == list(STAGES)
    assert first["skipped"] == []
    assert second["ran"] == []
    assert second["skipped"] == list(STAGES)
    # the flow reports the metrics DVC knows about, as read after the run
    assert set(first["metrics"]) == {"metrics/train.json", "metrics/merge.json", "metrics/eval.json"}
    assert set(first["metrics"]["metrics/eval.json"]["accuracy"]) >= {"base", "qlora", "merged", "logistic_regression"}
    assert second["metrics"] == first["metrics"]
    assert (repo / "models/merged/config.json").is_file()
