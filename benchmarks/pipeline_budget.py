"""The pipeline's time budgets, measured: each stage forced to run, then a no-op `dvc repro`.

    python benchmarks/pipeline_budget.py        # from the repo root, with the venv's bin on PATH (make benchmark)

Budgets (2 CPU cores): the whole default pipeline <= 600 s after install; a no-op `dvc repro` <= 3 s.
Forcing reruns every stage in place: the outputs are rewritten (identical on CPU with the same seed).
The figures also go to benchmarks/results/pipeline_budget.json (--out to write them elsewhere), from which
`python docs/figures.py` writes them into docs/performance.md.
"""

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

from tuneline.pipeline import stage_names

PIPELINE_BUDGET_S = 600
NOOP_BUDGET_S = 3
RESULTS = Path(__file__).resolve().parent / "results" / "pipeline_budget.json"


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the figures go as JSON (default: %(default)s)")
    args = parser.parse_args()
    total = 0.0
    stages = {}
    for stage in stage_names(Path(".")):
        seconds = timed(["dvc", "repro", "--force", "--single-item", stage])
        total += seconds
        stages[stage] = seconds
        print(f"{stage:<10} {seconds:7.1f} s")
    print(f"{'pipeline':<10} {total:7.1f} s  (budget {PIPELINE_BUDGET_S} s: {total / PIPELINE_BUDGET_S:.0%} of it)")
    noop = timed(["dvc", "repro"])
    print(f"{'no-op':<10} {noop:7.1f} s  (budget {NOOP_BUDGET_S} s: {noop / NOOP_BUDGET_S:.0%} of it)")
    results = {"cpu_count": os.cpu_count(), "stages": stages, "pipeline_seconds": total,
               "pipeline_budget_seconds": PIPELINE_BUDGET_S, "noop_seconds": noop, "noop_budget_seconds": NOOP_BUDGET_S}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'results':<10} {args.out}")


if __name__ == "__main__":
    main()
