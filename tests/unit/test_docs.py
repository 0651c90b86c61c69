"""README.md and docs/ stay true to the runs: every figure they quote is the one docs/figures.py writes from the
files the runs produced (metrics/*.json, lineage.json, benchmarks/results/*.json), and every link lands."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = next(path for path in Path(__file__).resolve().parents if (path / "pyproject.toml").is_file())
DOCUMENTS = [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- figures:(?P<name>[\w-]+) -->)(?P<body>.*?)(<!-- /figures:(?P=name) -->)", re.DOTALL)
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def figures(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(root / "docs" / "figures.py"), *args], cwd=root,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The documents, the script and the files the figures come from, in a scratch repo root."""
    for name in ("README.md", "lineage.json"):
        shutil.copy(PROJECT / name, tmp_path / name)
    for name in ("docs", "metrics", "benchmarks/results"):
        if (PROJECT / name).is_dir():
            shutil.copytree(PROJECT / name, tmp_path / name)
    return tmp_path


def test_the_committed_figures_are_those_of_the_committed_runs() -> None:
    result = figures(PROJECT, "--check")
    assert result.returncode == 0, f"{result.stderr}\nrun `make docs` (python docs/figures.py) and commit the result"


def test_a_figure_edited_by_hand_is_named_and_rewritten(copy: Path) -> None:
    evaluation = copy / "docs" / "evaluation.md"
    text = evaluation.read_text()
    block = next(match for match in BLOCK.finditer(text) if match["name"] == "merge")
    altered = re.sub(r"(?<=\| )\d", lambda digit: str((int(digit[0]) + 1) % 10), block["body"], count=1)  # a KL
    assert altered != block["body"]
    evaluation.write_text(text[:block.start("body")] + altered + text[block.end("body"):])

    result = figures(copy, "--check")
    assert result.returncode == 1
    assert "docs/evaluation.md: figures:merge" in result.stderr, result.stderr
    assert "README.md" not in result.stderr, result.stderr  # the blocks left alone are not named
    assert evaluation.read_text() != text  # --check rewrites nothing

    assert figures(copy).returncode == 0
    assert evaluation.read_text() == text
    assert figures(copy, "--check").returncode == 0


def test_a_new_run_makes_every_block_that_quotes_it_stale(copy: Path) -> None:
    metrics = json.loads((copy / "metrics" / "eval.json").read_text())
    metrics["accuracy"]["merged"] = 0.5
    (copy / "metrics" / "eval.json").write_text(json.dumps(metrics))

    result = figures(copy, "--check")
    assert result.returncode == 1
    stale = set(result.stderr.splitlines()[1:])
    assert stale == {"  README.md: figures:eval", "  docs/evaluation.md: figures:eval"}, result.stderr


def test_benchmark_results_fill_their_blocks(copy: Path) -> None:
    """Results shaped as benchmarks/*.py write them replace the "(run ... to fill)" lines."""
    results = copy / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    gib = 2**30
    phase = {"seconds": 40.0, "peak_rss": gib, "read_bytes": 13e9, "written_bytes": 13e9, "disk_seconds": 30.0,
             "disk_share": 0.75}
    (results / "merge_7b.json").write_text(json.dumps({
        "small": False, "cpu_count": 2, "parameters": 6.7e9, "bf16_bytes": 13.4e9, "lora_rank": 16,
        "target_modules": ["q_proj"], "adapter_bytes": 1.6e8,
        "disk": {"write_bytes_per_second": 1e9, "read_bytes_per_second": 1e9}, "convert": phase, "merge": phase,
        "nf4": {"threads": 2, "parameters_per_second": 2.5e7, "quantized_parameters": 6.5e9, "seconds": 260.0},
        "peft": {"ran": False, "model_bytes": 13.4e9, "needed_bytes": 13.6e9, "available_bytes": 8e9},
        "targets": {"peak_rss_bytes": 2 * gib, "disk_share": 0.5},
    }))
    (results / "pipeline_budget.json").write_text(json.dumps({
        "cpu_count": 2, "stages": {"fetch": 1.0, "train": 100.0}, "pipeline_seconds": 101.0,
        "pipeline_budget_seconds": 600, "noop_seconds": 1.2, "noop_budget_seconds": 3,
    }))
    run = {"steps": 10, "real_tokens": 1000, "computed_tokens": 1500, "trained_tokens": 200, "loss_sum": 600.0,
           "seconds": 10.0, "batches": "ab", "peak_rss": gib, "tokens_per_second": 100.0, "loss_per_token": 3.0}
    data_set = {"title": "t", "examples": 300, "tokens": {"min": 37, "max": 245, "mean": 100.0},
                "runs": {"plain": run, "ours": run},
                "ours_over_plain": {"speed": 1.0, "computed_tokens": 1.0, "peak_rss": 1.0, "loss_change": 0.0,
                                    "same_examples": True}}
    (results / "train_throughput.json").write_text(json.dumps({
        "steps": 10, "cpu_count": 2, "speed_target": 1.5, "batch_size": 8,
        "sets": {"pipeline": data_set, "chat": data_set},
    }))

    result = figures(copy)
    assert result.returncode == 0, result.stderr
    text = "\n".join(path.read_text() for path in [copy / "README.md", *(copy / "docs").glob("*.md")])
    assert "to fill)" not in text
    assert "37–245 tokens" in text and "not run: needs 12.7 GiB in memory" in text


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_link_lands(document: Path) -> None:
    """Relative links point at a file of the repo and, with #anchor, at one of its headings (GitHub's slugs)."""
    for target in LINK.findall(document.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        assert linked.exists(), f"{document.name}: link to {target}: no such file"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.MULTILINE)
            slugs = {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}
            assert anchor in slugs, f"{document.name}: link to {target}: no such heading in {linked.name}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_code_file_named_exists(document: Path) -> None:
    """A module or test the text names in backticks (`tuneline/merging.py`) is there: a move updates the docs."""
    named = re.findall(r"`((?:tuneline|stages|flows|tests|benchmarks|docs)/[\w/.]+\.(?:py|md))(?:::\w+)?`",
                       document.read_text())
    missing = sorted({path for path in named if not (PROJECT / path).is_file()})
    assert not missing, f"{document.name} names files that do not exist: {', '.join(missing)}"
