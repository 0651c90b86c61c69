"""Evaluate: accuracy and answer loss of the base, QLoRA and merged models on the eval split.

    python -m stages.evaluate BASE_DIR ADAPTER_DIR MERGED_DIR DATASET_DIR METRICS_FILE PREDICTIONS_FILE CONFUSION_FILE

Each eval conversation is scored by the log-likelihood of every label as the assistant's answer (no free
generation): the most likely label is the prediction. The answer loss is the mean negative
log-likelihood per token of the reference answer. A logistic regression fitted on the same train split
is the baseline a data scientist would try first.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from tuneline.artifacts import atomic_file, read_json, read_jsonl, write_json
from tuneline.errors import exit_on_error
from tuneline.modeling import (
    QuantSpec, encode_pair, load_full_model, load_quantized_model, load_tokenizer, pad_batch, split_prompt_completion,
)
from tuneline.params import EvaluateParams, load_section


@torch.no_grad()
def answer_logprobs(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int, desc: str) -> list[tuple[float, int]]:
    """For each (prompt, completion): the summed log-probability of the completion's tokens, and their count.

    Rows are left-padded so that every completion ends at the last position; the model then computes
    logits for the last few positions only, which skips most of the vocabulary projection.
    """
    results = []
    for start in tqdm(range(0, len(pairs), batch_size), desc=desc, unit="batch"):
        encoded = [encode_pair(tokenizer, prompt, completion) for prompt, completion in pairs[start : start + batch_size]]
        inputs = pad_batch([ids for ids, _ in encoded], tokenizer.pad_token_id, side="left")
        counts = [len(ids) - prompt_length for ids, prompt_length in encoded]
        keep = max(counts) + 1
        logits = model(**inputs, logits_to_keep=keep).logits.float()
        # The token at position t is predicted by the logits at t - 1.
        log_probs = torch.log_softmax(logits[:, :-1], -1)
        targets = inputs["input_ids"][:, -keep + 1 :]
        token_log_probs = log_probs.gather(-1, targets[..., None]).squeeze(-1)
        for row, count in enumerate(counts):
            results.append((token_log_probs[row, -count:].sum().item(), count))
    return results


def score_model(model, tokenizer, rows: list[dict], labels: list[str], batch_size: int, desc: str) -> dict:
    """Predict each row's label by answer log-likelihood; return predictions, accuracy and answer loss."""
    pairs = [
        split_prompt_completion(tokenizer, row["messages"][:-1] + [{"role": "assistant", "content": label}])
        for row in rows
        for label in labels
    ]
    scored = np.array(answer_logprobs(model, tokenizer, pairs, batch_size, desc)).reshape(len(rows), len(labels), 2)
    log_likelihood, token_counts = scored[..., 0], scored[..., 1]
    truth = np.array([labels.index(row["label"]) for row in rows])
    predicted = log_likelihood.argmax(axis=1)
    rows_index = np.arange(len(rows))
    return {
        "predictions": [labels[index] for index in predicted],
        "accuracy": float((predicted == truth).mean()),
        "eval_loss": float(-log_likelihood[rows_index, truth].sum() / token_counts[rows_index, truth].sum()),
    }


def feature_matrix(rows: list[dict]) -> np.ndarray:
    return np.array([list(row["features"].values()) for row in rows])


def logistic_regression_accuracy(train_rows: list[dict], eval_rows: list[dict]) -> float:
    """Accuracy of a standardized logistic regression fitted on the train split's features."""
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    classifier.fit(feature_matrix(train_rows), [row["label"] for row in train_rows])
    return float(classifier.score(feature_matrix(eval_rows), [row["label"] for row in eval_rows]))


def evaluate(*, base_dir: Path, adapter_dir: Path, merged_dir: Path, dataset_dir: Path, params: EvaluateParams) -> tuple[dict, list[dict]]:
    """Score base, QLoRA and merged models on the eval split; return (metrics, per-row predictions)."""
    card = read_json(dataset_dir / "card.json")
    labels = card["labels"]
    train_rows = read_jsonl(dataset_dir / "train.jsonl")
    eval_rows = read_jsonl(dataset_dir / "eval.jsonl")
    if params.max_examples:
        eval_rows = eval_rows[: params.max_examples]
    tokenizer = load_tokenizer(base_dir)
    # One model in memory at a time: each is loaded, scored and dropped.
    loaders = {
        "base": lambda: load_full_model(base_dir),
        "qlora": lambda: PeftModel.from_pretrained(load_quantized_model(base_dir, QuantSpec.load(adapter_dir)), adapter_dir),
        "merged": lambda: load_full_model(merged_dir),
    }
    results = {
        name: score_model(load().eval(), tokenizer, eval_rows, labels, params.batch_size, desc=f"scoring {name}")
        for name, load in loaders.items()
    }
    metrics = {
        "accuracy": {name: result["accuracy"] for name, result in results.items()},
        "eval_loss": {name: result["eval_loss"] for name, result in results.items()},
        "examples": len(eval_rows),
    }
    metrics["accuracy"]["logistic_regression"] = logistic_regression_accuracy(train_rows, eval_rows)
    predictions = [
        {"user": row["messages"][-2]["content"], "label": row["label"]}
        | {name: result["predictions"][index] for name, result in results.items()}
        for index, row in enumerate(eval_rows)
    ]
    return metrics, predictions


@exit_on_error
def main() -> None:
    if len(sys.argv) != 8:
        sys.exit("usage: python -m stages.evaluate BASE_DIR ADAPTER_DIR MERGED_DIR DATASET_DIR "
                 "METRICS_FILE PREDICTIONS_FILE CONFUSION_FILE")
    params: EvaluateParams = load_section("evaluate")
    base_dir, adapter_dir, merged_dir, dataset_dir, metrics_file, predictions_file, confusion_file = map(Path, sys.argv[1:])
    metrics, predictions = evaluate(
        base_dir=base_dir, adapter_dir=adapter_dir, merged_dir=merged_dir, dataset_dir=dataset_dir, params=params
    )
    with atomic_file(predictions_file) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in predictions))
    write_json(confusion_file, [{"actual": row["label"], "predicted": row["merged"]} for row in predictions])
    write_json(metrics_file, metrics)
    accuracy = metrics["accuracy"]
    print("evaluate: accuracy " + ", ".join(f"{name} {value:.3f}" for name, value in accuracy.items()))


if __name__ == "__main__":
    main()
