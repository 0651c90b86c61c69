"""Lineage: record what this run produced and from what, in one file that git keeps.

    python -m stages.lineage RECORD_FILE MERGED_DIR --metrics METRICS_FILE... --artifacts PATH...

The merged model already carries its lineage (base, data, params, code; see stages/merge.py). This stage
adds the sha256 of every pipeline artifact and the run's metrics, and writes it all to RECORD_FILE
(lineage.json at the repo root, committed with dvc.lock). Because every commit holds the sha256 of the
models it produced, `tuneline audit` can walk the git history from a model file's sha256 to its commit.
"""

import argparse
from pathlib import Path

from tuneline.artifacts import read_json, write_json
from tuneline.errors import exit_on_error
from tuneline.lineage import LINEAGE_FILE, describe_artifact, utc_now


def record(merged_dir: Path, metrics_files: list[Path], artifacts: list[Path]) -> dict:
    """The merged model's lineage, plus every artifact's sha256 (and its files') and the metrics."""
    return read_json(merged_dir / LINEAGE_FILE) | {
        "recorded_at": utc_now(),
        "artifacts": {path.as_posix(): describe_artifact(path) for path in artifacts},
        "metrics": {path.as_posix(): read_json(path) for path in metrics_files},
    }


@exit_on_error
def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.lineage", description=__doc__.split("\n")[0])
    parser.add_argument("record_file", type=Path)
    parser.add_argument("merged_dir", type=Path)
    parser.add_argument("--metrics", type=Path, nargs="+", required=True)
    parser.add_argument("--artifacts", type=Path, nargs="+", required=True)
    args = parser.parse_args()
    lineage = record(args.merged_dir, args.metrics, args.artifacts)
    write_json(args.record_file, lineage)
    model = lineage["artifacts"][args.merged_dir.as_posix()]["sha256"]
    print(f"lineage: {len(args.artifacts)} artifacts recorded in {args.record_file}; "
          f"{args.merged_dir} sha256 {model}")


if __name__ == "__main__":
    main()
