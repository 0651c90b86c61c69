"""Reading a source's rows: files under the data folder (JSONL, a JSON array, CSV, parquet), the tables
scikit-learn ships, and Hugging Face datasets at a pinned revision. A row that cannot be read is kept as a Row
with its problem, so that `dataset.on_bad_row` decides what becomes of it."""

import glob
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tuneline.artifacts import sha256_file
from tuneline.errors import TunelineError
from tuneline.params import Source, TabularSource

_TABLE_SUFFIXES = (".csv", ".parquet")
_ROW_SUFFIXES = (".jsonl", ".json", *_TABLE_SUFFIXES)
MCQ_KEYS = ("A", "B", "C", "D")  # the options of a multiple-choice question, in order


class BadRow(Exception):
    """A row that cannot become a training example; with on_bad_row: skip it is counted and listed."""


@dataclass
class Row:
    ref: str
    fields: dict | None
    problem: str | None = None  # set when the row itself cannot be read (a malformed JSON line)


def source_key(index: int) -> str:
    return f"params.yaml: dataset.sources[{index}]"


def resolve_files(index: int, source: Source, data_dir: Path) -> list[Path]:
    """The files a source's path or glob names, all inside DATA_DIR (which DVC tracks by content)."""
    pattern = Path(source.path)
    if pattern.is_absolute() or ".." in pattern.parts:
        raise TunelineError(
            f"{source_key(index)}.path: '{source.path}' must be relative to {data_dir}/, the folder dvc.yaml "
            f"tracks; move the data there so that editing it reruns the pipeline"
        )
    files = sorted(Path(name) for name in glob.glob(str(data_dir / pattern), recursive=True) if Path(name).is_file())
    if not files:
        raise TunelineError(f"{source_key(index)}.path: '{source.path}' matches no file under {data_dir}/")
    unknown = [path for path in files if path.suffix not in _ROW_SUFFIXES]
    if unknown:
        raise TunelineError(f"{unknown[0]}: unknown file type; use one of: {', '.join(_ROW_SUFFIXES)}")
    return files


def _read_file_rows(index: int, source: Source, path: Path) -> Iterator[Row]:
    """The rows of one file: JSONL (a line each), a JSON array, CSV or parquet."""
    try:
        if path.suffix == ".jsonl":
            yield from _jsonl_rows(path)
        elif path.suffix == ".json":
            yield from _json_array_rows(path)
        else:
            table = _read_table_file(path, as_text=not isinstance(source, TabularSource))
            _check_table_columns(index, source, path, list(table.columns))
            yield from _table_rows(str(path), table)
    except UnicodeDecodeError as error:
        raise TunelineError(f"{path}: not UTF-8 text (byte {error.start}); save it as UTF-8") from None


def _jsonl_rows(path: Path) -> Iterator[Row]:
    """One row per line, decoded line by line so that a bad byte is reported at its line and file offset."""
    offset = 0
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise TunelineError(
                    f"{path}:{number}: not UTF-8 text (byte {offset + error.start}); save it as UTF-8"
                ) from None
            offset += len(raw)
            if line.strip():
                # Without its line end: a line cut short fails where it ends, not at column 1 of the line after.
                yield _parse_json_row(f"{path}:{number}", line.rstrip("\r\n"))


def _json_array_rows(path: Path) -> Iterator[Row]:
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise TunelineError(f"{path}:{error.lineno}: not valid JSON ({error.msg}); expected an array of rows") from None
    if not isinstance(items, list):
        raise TunelineError(f"{path}: expected a JSON array of rows (or use .jsonl, one row per line)")
    for number, item in enumerate(items, start=1):
        ref = f"{path}: item {number}"
        yield Row(ref, item) if isinstance(item, dict) else Row(ref, None, "not an object")


def _parse_json_row(ref: str, line: str) -> Row:
    try:
        fields = json.loads(line)
    except json.JSONDecodeError as error:
        return Row(ref, None, f"malformed JSON ({_json_error_place(error)})")
    return Row(ref, fields) if isinstance(fields, dict) else Row(ref, None, "not a JSON object")


def _json_error_place(error: json.JSONDecodeError) -> str:
    """The parser's reason and the column (in characters, from 1) where it stopped on a one-line document."""
    reason = error.msg.removesuffix(" at")  # "Unterminated string starting at", "Invalid control character at"
    at_end = ", the end of the line" if error.pos == len(error.doc) else ""
    return f"{reason} at column {error.colno}{at_end}"


def _read_table_file(path: Path, as_text: bool) -> pd.DataFrame:
    """A CSV or parquet file. CSV cells of text formats stay text as written ("4", "0.50", "None", "NA");
    tabular CSVs are parsed as numbers, empty cells becoming missing values."""
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, dtype=str, keep_default_na=False) if as_text else pd.read_csv(path)
    except Exception as error:  # pandas and pyarrow raise many types for unreadable files
        raise TunelineError(f"{path}: not a readable {path.suffix[1:]} file ({' '.join(str(error).split())})") from None


def _table_rows(name: str, table: pd.DataFrame) -> Iterator[Row]:
    for number, fields in enumerate(table.to_dict("records"), start=1):
        cells = {key: None if _is_missing(value) else value for key, value in fields.items()}
        yield Row(f"{name}: row {number}", cells)


def _is_missing(value: object) -> bool:
    return isinstance(value, float) and np.isnan(value)


def _read_sklearn_rows(index: int, name: str) -> tuple[list[Row], dict[str, str]]:
    """A table that scikit-learn ships, e.g. sklearn:breast_cancer; its bundled CSV is the input file."""
    import sklearn.datasets

    loaders = {"breast_cancer": sklearn.datasets.load_breast_cancer}
    if name not in loaders:
        raise TunelineError(f"{source_key(index)}.path: unknown sklearn table '{name}'; known: {', '.join(loaders)}")
    bunch = loaders[name](as_frame=True)
    csv_path = Path(sklearn.datasets.__file__).parent / "data" / bunch.filename
    return list(_table_rows(f"sklearn:{name}", bunch.frame)), {
        f"sklearn/datasets/data/{bunch.filename}": sha256_file(csv_path)
    }


def _read_hub_rows(index: int, source: Source) -> tuple[list[Row], dict[str, str]]:
    """A Hugging Face dataset at a pinned revision (hf://NAME@REVISION); HF_TOKEN from the environment."""
    from datasets import load_dataset

    name, _, revision = source.path.removeprefix("hf://").partition("@")
    if not revision:
        raise TunelineError(
            f"{source_key(index)}.path: pin a revision: hf://{name}@<commit or tag>, so a rerun reads the same data"
        )
    try:
        data = load_dataset(
            name, source.subset, split=source.split, revision=revision, token=os.environ.get("HF_TOKEN") or None
        )
    except Exception as error:  # the hub client raises many types (offline, 404, gated, bad split)
        raise TunelineError(
            f"{source_key(index)}: cannot load {source.path} "
            f"({type(error).__name__}: {' '.join(str(error).split())[:200]})"
        ) from None
    ref = f"{source.path}[{source.split}]"
    rows = [Row(f"{ref}: row {number}", dict(fields)) for number, fields in enumerate(data, start=1)]
    return rows, {ref: data._fingerprint}


def read_source(index: int, source: Source, data_dir: Path, seed: int) -> tuple[list[Row], dict[str, str]]:
    """All rows of one source (a seeded sample of `max_rows` of them) and the sha256 of its inputs."""
    if source.path.startswith("sklearn:"):
        rows, hashes = _read_sklearn_rows(index, source.path.removeprefix("sklearn:"))
    elif source.path.startswith("hf://"):
        rows, hashes = _read_hub_rows(index, source)
    else:
        files = resolve_files(index, source, data_dir)
        rows = [row for path in files for row in _read_file_rows(index, source, path)]
        hashes = {str(path): sha256_file(path) for path in files}
    if source.max_rows is not None and len(rows) > source.max_rows:
        keep = sorted(random.Random(seed).sample(range(len(rows)), source.max_rows))
        rows = [rows[i] for i in keep]
    return rows, hashes


def _check_table_columns(index: int, source: Source, path: Path, columns: list[str]) -> None:
    """A column a CSV or parquet file lacks fails the whole file at once, not row by row."""
    for needed in _required_columns(source, columns):
        if needed not in columns:
            raise TunelineError(
                f"{path}: no column '{needed}' (columns: {', '.join(map(str, columns))}); "
                f"name yours in {source_key(index).removeprefix('params.yaml: ')}.columns"
            )


def _required_columns(source: Source, columns: list[str]) -> list[str]:
    if isinstance(source, TabularSource):
        return [*source.features, source.label_column]
    if source.format == "mcq" and source.columns.get("choices", "choices") not in columns:
        return [source.columns.get(name, name) for name in ("question", "answer", *MCQ_KEYS)]
    needed = {
        "alpaca": ["instruction", "output"],
        "oasst": ["text"],
        "prompt_completion": ["prompt", "completion"],
        "mcq": ["question", "answer"],
        "messages": [],
    }[source.format]
    return [source.columns.get(name, name) for name in needed]
