"""The pipeline's time budgets, measured: each stage forced to run, then a no-op `dvc repro`.

    python benchmarks/pipeline_budget.py        # from the repo root, with the venv's bin on PATH (make benchmark)

Budgets (2 CPU cores): the whole default pipeline <= 600 s after install; a no-op `dvc repro` <= 3 s.
Forcing reruns every stage in place: the outputs are rewritten (identical on CPU with the same seed).
"""

import subprocess
import time

STAGES = ("fetch", "convert", "dataset", "train", "merge", "evaluate")
PIPELINE_BUDGET_S = 600
NOOP_BUDGET_S = 3


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    total = 0.0
    for stage in STAGES:
        seconds = timed(["dvc", "repro", "--force", "--single-item", stage])
        total += seconds
        print(f"{stage:<10} {seconds:7.1f} s")
    print(f"{'pipeline':<10} {total:7.1f} s  (budget {PIPELINE_BUDGET_S} s: {total / PIPELINE_BUDGET_S:.0%} of it)")
    noop = timed(["dvc", "repro"])
    print(f"{'no-op':<10} {noop:7.1f} s  (budget {NOOP_BUDGET_S} s: {noop / NOOP_BUDGET_S:.0%} of it)")


if __name__ == "__main__":
    main()
