"""Dataset: turn a table into train and eval chat conversations plus a dataset card.

    python -m stages.dataset TOKENIZER_DIR OUT_DIR

Each row becomes a system prompt, a user message listing its measurements and an assistant answer with
its label. OUT_DIR receives train.jsonl, eval.jsonl and card.json (counts, label balance, token lengths,
sha256 of inputs and outputs, one rendered example). Another input format is one more reader in READERS.
"""

import json
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split
from transformers import AutoTokenizer

from tuneline.artifacts import atomic_dir, sha256_file, write_json
from tuneline.errors import TunelineError, exit_on_error
from tuneline.params import DatasetParams, load_section


def read_sklearn_table(name: str) -> tuple[pd.DataFrame, dict[str, Path]]:
    """A table that scikit-learn ships, e.g. sklearn:breast_cancer; its bundled CSV is the input file."""
    import sklearn.datasets

    loaders = {"breast_cancer": sklearn.datasets.load_breast_cancer}
    if name not in loaders:
        raise TunelineError(f"params.yaml: dataset.source: unknown sklearn table '{name}'; known: {', '.join(loaders)}")
    bunch = loaders[name](as_frame=True)
    csv_path = Path(sklearn.datasets.__file__).parent / "data" / bunch.filename
    return bunch.frame, {f"sklearn/datasets/data/{bunch.filename}": csv_path}


def read_csv_table(path: str) -> tuple[pd.DataFrame, dict[str, Path]]:
    if not Path(path).is_file():
        raise TunelineError(f"params.yaml: dataset.source: {path} does not exist")
    return pd.read_csv(path), {path: Path(path)}


# Each reader returns the table and its input files (name as recorded in the card -> path on disk).
READERS: dict[str, Callable[[str], tuple[pd.DataFrame, dict[str, Path]]]] = {
    "sklearn": read_sklearn_table,
    "csv": read_csv_table,
}


def read_table(source: str) -> tuple[pd.DataFrame, dict[str, Path]]:
    scheme, _, rest = source.partition(":")
    if scheme in READERS and rest:
        return READERS[scheme](rest)
    return read_csv_table(source)


def label_key(value: object) -> str:
    """A label value as written in dataset.label_names: 0, 0.0 and "0" are all "0"."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def check_columns(table: pd.DataFrame, params: DatasetParams) -> None:
    columns = list(table.columns)
    for feature in params.features:
        if feature not in columns:
            raise TunelineError(
                f"params.yaml: dataset.features: '{feature}' is not a column of {params.source}; "
                f"columns are: {', '.join(map(str, columns))}"
            )
    if params.label_column not in columns:
        raise TunelineError(f"params.yaml: dataset.label_column: '{params.label_column}' is not a column of {params.source}")
    unnamed = sorted({label_key(value) for value in table[params.label_column]} - set(params.label_names))
    if unnamed:
        raise TunelineError(f"params.yaml: dataset.label_names: no answer for label value(s) {', '.join(unnamed)}")
    if "{measurements}" not in params.user_template:
        raise TunelineError("params.yaml: dataset.user_template: must contain {measurements}")


def balance_labels(table: pd.DataFrame, label_column: str, seed: int) -> pd.DataFrame:
    """Downsample every label to the count of the rarest one."""
    smallest = table[label_column].value_counts().min()
    return table.groupby(label_column, group_keys=False).sample(n=smallest, random_state=seed).sort_index()


def row_to_example(row: pd.Series, params: DatasetParams) -> dict:
    features = {name: round(float(row[name]), params.decimals) for name in params.features}
    measurements = ", ".join(f"{name} {value:.{params.decimals}f}" for name, value in features.items())
    answer = params.label_names[label_key(row[params.label_column])]
    messages = [
        {"role": "system", "content": params.system_prompt},
        {"role": "user", "content": params.user_template.format(measurements=measurements)},
        {"role": "assistant", "content": answer},
    ]
    return {"messages": messages, "label": answer, "features": features}


def build_dataset(*, table: pd.DataFrame, params: DatasetParams) -> tuple[list[dict], list[dict]]:
    """Check, balance, split (stratified) and render the table; return (train, eval) examples."""
    check_columns(table, params)
    table = table.dropna(subset=[*params.features, params.label_column])
    if params.balance:
        table = balance_labels(table, params.label_column, params.seed)
    train_rows, eval_rows = train_test_split(
        table, test_size=params.eval_fraction, random_state=params.seed, stratify=table[params.label_column]
    )
    train = [row_to_example(row, params) for _, row in train_rows.iterrows()]
    evaluation = [row_to_example(row, params) for _, row in eval_rows.iterrows()]
    return train, evaluation


def token_length_stats(examples: list[dict], tokenizer) -> dict:
    texts = [tokenizer.apply_chat_template(example["messages"], tokenize=False) for example in examples]
    lengths = np.array([len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]])
    return {"min": int(lengths.min()), "mean": round(float(lengths.mean()), 1),
            "p95": int(np.percentile(lengths, 95)), "max": int(lengths.max())}


def write_jsonl(path: Path, examples: list[dict]) -> None:
    path.write_text("".join(json.dumps(example) + "\n" for example in examples))


@exit_on_error
def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: python -m stages.dataset TOKENIZER_DIR OUT_DIR")
    params: DatasetParams = load_section("dataset")
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    out_dir = Path(sys.argv[2])
    table, input_files = read_table(params.source)
    train, evaluation = build_dataset(table=table, params=params)
    with atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "eval.jsonl", evaluation)
        card = {
            "source": params.source,
            "kind": "label",
            "rows_read": len(table),
            "rows_kept": len(train) + len(evaluation),
            "rows_train": len(train),
            "rows_eval": len(evaluation),
            "labels": sorted(set(params.label_names.values())),
            "label_balance": {
                "train": dict(Counter(e["label"] for e in train)),
                "eval": dict(Counter(e["label"] for e in evaluation)),
            },
            "token_length": token_length_stats(train + evaluation, tokenizer),
            "sha256": {
                "inputs": {name: sha256_file(path) for name, path in input_files.items()},
                "outputs": {name: sha256_file(tmp / name) for name in ("train.jsonl", "eval.jsonl")},
            },
            "example": tokenizer.apply_chat_template(train[0]["messages"], tokenize=False),
        }
        write_json(tmp / "card.json", card)
    print(f"dataset: {card['rows_read']} rows read, {card['rows_kept']} kept "
          f"({len(train)} train, {len(evaluation)} eval), balance {card['label_balance']['train']}")


if __name__ == "__main__":
    main()
