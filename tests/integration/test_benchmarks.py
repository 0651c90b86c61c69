"""The small-model version of benchmarks/merge_7b.py, so the benchmark itself cannot rot between 7B runs."""

import re
import subprocess
import sys

from conftest import PROJECT, subprocess_env

FIGURE = r"(\d+(?:\.\d+)?)"


def test_merge_benchmark_small_prints_its_figures_and_cleans_up(tmp_path, report):
    result = subprocess.run(
        [sys.executable, str(PROJECT / "benchmarks" / "merge_7b.py"), "--small", "--cache", str(tmp_path)],
        cwd=PROJECT, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert set(lines) >= {"model", "disk", "convert", "merge", "limit", "peft"}, result.stdout
    for phase in ("convert", "merge"):
        seconds, share, rss = (float(value) for value in re.search(
            rf"{FIGURE} s .*MB/s, +{FIGURE}% of the disk's speed.*peak RSS +{FIGURE} GiB", lines[phase]).groups())
        assert seconds > 0 and share > 0
        assert rss < 2, lines[phase]  # a ~60 MB model: far below the 2 GiB target, whatever the imports take
    assert re.search(rf"peak RSS {FIGURE} GiB", lines["peft"]), lines["peft"]  # it fits, so it really ran
    # built once and kept; the converted and merged models of the run are removed
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter-r16", "llama2-7b-shaped-bin"]
    report("merge benchmark (--small):\n" + result.stdout.strip())
