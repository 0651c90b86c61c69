"""The evaluate stage's eval directory: every model's generations side by side (generations.jsonl and
generations.html, for a person to read) and the label predictions (predictions.jsonl, confusion.json)."""

import html
import json
from pathlib import Path

import pandas as pd

from tuneline.artifacts import write_json
from tuneline.scoring import MODELS


def _generation_table(rows: pd.DataFrame, outputs: dict[str, dict]) -> list[dict]:
    return [
        {"ref": row.ref, "kind": row.kind, "question": row.question, "reference": row.reference}
        | {name: outputs[name]["answers"][number] for name in MODELS}
        for number, row in enumerate(rows.itertuples())
    ]


def _generation_html(table: list[dict]) -> str:
    """The generations side by side, one row per eval example, for a person to read."""
    columns = ["ref", "kind", "question", "reference", *MODELS]
    head = "".join(f"<th>{column}</th>" for column in columns)
    body = "\n".join(
        "<tr>" + "".join(f"<td><pre>{html.escape(str(row[column]))}</pre></td>" for column in columns) + "</tr>"
        for row in table
    )
    style = "td,th{border:1px solid #ccc;vertical-align:top;padding:4px}pre{white-space:pre-wrap;margin:0}"
    return (
        f"<!doctype html><meta charset='utf-8'><title>tuneline generations</title><style>{style}</style>"
        f"<table style='border-collapse:collapse'><tr>{head}</tr>\n{body}</table>\n"
    )


def write_eval_dir(out: Path, rows: pd.DataFrame, outputs: dict[str, dict]) -> None:
    """Write generations.jsonl/.html, predictions.jsonl and confusion.json (the merged model's) into `out`."""
    table = _generation_table(rows, outputs)
    (out / "generations.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in table))
    (out / "generations.html").write_text(_generation_html(table))
    labelled = rows[rows["kind"] == "label"]
    predictions = [
        {"ref": row.ref, "label": row.label} | {name: outputs[name]["labels"][number] for name in MODELS}
        for number, row in enumerate(labelled.itertuples())
    ]
    (out / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in predictions))
    write_json(out / "confusion.json", [{"actual": row["label"], "predicted": row["merged"]} for row in predictions])
