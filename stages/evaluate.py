"""Evaluate: answer loss and accuracy of the base, QLoRA and merged models on the eval split.

    python -m stages.evaluate BASE_DIR ADAPTER_DIR MERGED_DIR DATASET_DIR METRICS_FILE PREDICTIONS_FILE CONFUSION_FILE

Works on the dataset stage's tokenized eval split, so every model sees exactly the tokens training saw.
The eval loss is the mean negative log-likelihood per trained (answer) token. Rows with a label (tabular,
multiple choice) are also classified by the log-likelihood of each possible answer after the prompt (no
free generation): the most likely one is the prediction. Where rows have numeric features, a logistic
regression fitted on the same train split is the baseline a data scientist would try first.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from peft import PeftModel
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from tuneline.artifacts import atomic_file, write_json
from tuneline.errors import exit_on_error
from tuneline.modeling import QuantSpec, load_full_model, load_quantized_model, load_tokenizer, pad_batch, read_split
from tuneline.params import EvaluateParams, load_section


@torch.no_grad()
def completion_logprobs(
    model, pad_id: int, pairs: list[tuple[list[int], list[int]]], batch_size: int, desc: str
) -> list[float]:
    """For each (prompt ids, completion ids): the summed log-probability of the completion's tokens.

    Rows are left-padded so that every completion ends at the last position; the model then computes
    logits for the last few positions only, which skips most of the vocabulary projection.
    """
    results = []
    for start in tqdm(range(0, len(pairs), batch_size), desc=desc, unit="batch"):
        batch = pairs[start : start + batch_size]
        inputs = pad_batch([prompt + completion for prompt, completion in batch], pad_id, side="left")
        counts = [len(completion) for _, completion in batch]
        keep = max(counts) + 1
        logits = model(**inputs, logits_to_keep=keep).logits.float()
        # The token at position t is predicted by the logits at t - 1.
        log_probs = torch.log_softmax(logits[:, :-1], -1)
        targets = inputs["input_ids"][:, -keep + 1 :]
        token_log_probs = log_probs.gather(-1, targets[..., None]).squeeze(-1)
        results += [token_log_probs[row, -count:].sum().item() for row, count in enumerate(counts)]
    return results


@torch.no_grad()
def answer_loss(model, pad_id: int, rows: pd.DataFrame, batch_size: int, desc: str) -> float:
    """Mean negative log-likelihood per trained token (labels != -100), over every eval example."""
    total, tokens = 0.0, 0
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch"):
        batch = rows.iloc[start : start + batch_size]
        inputs = pad_batch([list(ids) for ids in batch["input_ids"]], pad_id)
        labels = pad_batch([list(labels) for labels in batch["labels"]], -100)["input_ids"]
        targets = labels[:, 1:]  # the token at position t is predicted by the logits at t - 1
        mask = targets != -100
        log_probs = torch.log_softmax(model(**inputs).logits.float()[:, :-1], -1)
        token_log_probs = log_probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        total -= token_log_probs[mask].sum().item()
        tokens += int(mask.sum())
    return total / tokens


def classify(model, pad_id: int, rows: pd.DataFrame, batch_size: int, desc: str) -> list[str]:
    """Each labelled row's most likely answer among its choices, scored after its prompt."""
    pairs, owners = [], []
    for number, row in enumerate(rows.itertuples()):
        prompt = list(row.input_ids[: row.prompt_length])
        for choice, ids in zip(row.choices, row.choice_ids):
            pairs.append((prompt, list(ids)))
            owners.append((number, choice))
    scores = completion_logprobs(model, pad_id, pairs, batch_size, desc)
    best: dict[int, tuple[float, str]] = {}
    for (number, choice), score in zip(owners, scores):
        if number not in best or score > best[number][0]:
            best[number] = (score, choice)
    return [best[number][1] for number in range(len(rows))]


def feature_matrix(rows: pd.DataFrame) -> np.ndarray:
    return np.array([list(json.loads(features).values()) for features in rows["features"]])


def logistic_regression_accuracy(train_rows: pd.DataFrame, eval_rows: pd.DataFrame) -> float:
    """Accuracy of a standardized logistic regression fitted on the train split's features."""
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    classifier.fit(feature_matrix(train_rows), train_rows["label"])
    return float(classifier.score(feature_matrix(eval_rows), eval_rows["label"]))


def evaluate(
    *, base_dir: Path, adapter_dir: Path, merged_dir: Path, dataset_dir: Path, params: EvaluateParams
) -> tuple[dict, list[dict]]:
    """Score base, QLoRA and merged models on the eval split; return (metrics, per-row predictions)."""
    eval_rows = read_split(dataset_dir / "eval.parquet")
    if params.max_examples:
        eval_rows = eval_rows.iloc[: params.max_examples]
    labelled = eval_rows[eval_rows["label"].notna()]
    pad_id = load_tokenizer(dataset_dir / "tokenizer").pad_token_id
    # One model in memory at a time: each is loaded, scored and dropped.
    loaders = {
        "base": lambda: load_full_model(base_dir),
        "qlora": lambda: PeftModel.from_pretrained(
            load_quantized_model(base_dir, QuantSpec.load(adapter_dir)), adapter_dir
        ),
        "merged": lambda: load_full_model(merged_dir),
    }
    metrics: dict = {"eval_loss": {}, "examples": len(eval_rows)}
    predictions: dict[str, list[str]] = {}
    for name, load in loaders.items():
        model = load().eval()
        metrics["eval_loss"][name] = answer_loss(model, pad_id, eval_rows, params.batch_size, f"loss {name}")
        if len(labelled):
            predictions[name] = classify(model, pad_id, labelled, params.batch_size, f"classify {name}")
    if len(labelled):
        truth = np.array(labelled["label"])
        metrics["accuracy"] = {
            name: float(np.mean(np.array(predicted) == truth)) for name, predicted in predictions.items()
        }
        metrics["labelled_examples"] = len(labelled)
        train_rows = read_split(dataset_dir / "train.parquet")
        with_features = train_rows[train_rows["features"].notna()]
        if len(with_features) and labelled["features"].notna().all():
            metrics["accuracy"]["logistic_regression"] = logistic_regression_accuracy(with_features, labelled)
    rows = [
        {"ref": row.ref, "label": row.label} | {name: predicted[number] for name, predicted in predictions.items()}
        for number, row in enumerate(labelled.itertuples())
    ]
    return metrics, rows


@exit_on_error
def main() -> None:
    if len(sys.argv) != 8:
        sys.exit(
            "usage: python -m stages.evaluate BASE_DIR ADAPTER_DIR MERGED_DIR DATASET_DIR "
            "METRICS_FILE PREDICTIONS_FILE CONFUSION_FILE"
        )
    params: EvaluateParams = load_section("evaluate")
    base_dir, adapter_dir, merged_dir, dataset_dir, metrics_file, predictions_file, confusion_file = map(
        Path, sys.argv[1:]
    )
    metrics, predictions = evaluate(
        base_dir=base_dir, adapter_dir=adapter_dir, merged_dir=merged_dir, dataset_dir=dataset_dir, params=params
    )
    with atomic_file(predictions_file) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in predictions))
    write_json(confusion_file, [{"actual": row["label"], "predicted": row["merged"]} for row in predictions])
    write_json(metrics_file, metrics)
    figures, kind = (metrics["accuracy"], "accuracy") if "accuracy" in metrics else (metrics["eval_loss"], "eval loss")
    print(f"evaluate: {kind} " + ", ".join(f"{name} {value:.3f}" for name, value in figures.items()))


if __name__ == "__main__":
    main()
