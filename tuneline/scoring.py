"""Scoring a model on the dataset stage's tokenized eval split: likelihoods, generation and the metrics.

What is measured follows each row's kind (set by the dataset stage from its source's format;
`evaluate.kind` overrides): label rows (tabular, and answered multiple-choice questions, whose labels are
the letters A-D) by the log-likelihood of each label as the answer (accuracy, macro-F1, and a logistic
regression on the same features as baseline), mcq rows by the questions they generate (format validity
and answer-key accuracy), free_text rows by exact match and ROUGE-L of the generated answer and by the
reference answers' loss and perplexity; `eval_loss` covers every row. lm-evaluation-harness tasks run on
the merged model where `evaluate.lm_eval.tasks` names them.
`evaluate()` scores the base, QLoRA and merged models (the evaluate stage); `score_model()` scores one
(also the promotion gate, re-scoring a promoted model on a new eval split).
"""

import difflib
import json
import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from peft import PeftModel
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from tuneline.errors import TunelineError
from tuneline.modeling import (
    QuantSpec, end_token_ids, load_full_model, load_quantized_model, load_tokenizer, pad_batch, read_split,
)
from tuneline.params import EvaluateParams, GenerationParams, LmEvalParams

if TYPE_CHECKING:  # lm-eval is an optional extra
    from lm_eval.tasks import TaskManager

MODELS = ("base", "qlora", "merged")
_MCQ_PATTERN = re.compile(
    r"Question:\s*(?P<question>\S.*?)\s*\n"
    r"\s*A\.\s*(?P<A>\S.*?)\s*\n\s*B\.\s*(?P<B>\S.*?)\s*\n\s*C\.\s*(?P<C>\S.*?)\s*\n\s*D\.\s*(?P<D>\S.*?)\s*\n"
    r"\s*Answer:\s*(?P<key>[ABCD])\s*",
    re.DOTALL,
)


# ----------------------------------------------------------------------------------------- likelihoods


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
def answer_losses(model, pad_id: int, rows: pd.DataFrame, batch_size: int, desc: str) -> np.ndarray:
    """Per row: the summed negative log-likelihood of its trained tokens (labels != -100), and their count."""
    losses = []
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch"):
        batch = rows.iloc[start : start + batch_size]
        inputs = pad_batch([list(ids) for ids in batch["input_ids"]], pad_id)
        labels = pad_batch([list(labels) for labels in batch["labels"]], -100)["input_ids"]
        targets = labels[:, 1:]  # the token at position t is predicted by the logits at t - 1
        mask = targets != -100
        log_probs = torch.log_softmax(model(**inputs).logits.float()[:, :-1], -1)
        token_log_probs = log_probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        losses += [(-row[row_mask].sum().item(), int(row_mask.sum())) for row, row_mask in zip(token_log_probs, mask)]
    return np.array(losses).reshape(-1, 2)


def mean_loss(losses: np.ndarray) -> float:
    """Mean negative log-likelihood per token over the rows of `answer_losses`."""
    return float(losses[:, 0].sum() / losses[:, 1].sum())


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


# ------------------------------------------------------------------------------------------ generation


def decoding_options(params: GenerationParams) -> dict:
    """model.generate keyword arguments for the chosen decoding; the others' knobs are left out."""
    options = {"max_new_tokens": params.max_new_tokens, "repetition_penalty": params.repetition_penalty}
    if params.mode == "beam":
        return options | {"do_sample": False, "num_beams": params.num_beams}
    if params.mode == "sample":
        return options | {
            "do_sample": True,
            "temperature": params.temperature,
            "top_k": params.top_k,
            "top_p": params.top_p,
        }
    return options | {"do_sample": False, "num_beams": 1}


@torch.no_grad()
def generate(
    model, tokenizer, prompts: list[list[int]], params: GenerationParams, batch_size: int, desc: str
) -> list[str]:
    """Answer every prompt (token ids), batched and left-padded; stop at EOS or the end-of-turn token."""
    end_ids = sorted(end_token_ids(tokenizer))
    options = decoding_options(params)
    torch.manual_seed(params.seed)  # sampling draws the same tokens on every rerun
    answers = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        inputs = pad_batch(prompts[start : start + batch_size], tokenizer.pad_token_id, side="left")
        output = model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            eos_token_id=end_ids,
            pad_token_id=tokenizer.pad_token_id,
            **options,
        )
        for new_tokens in output[:, inputs["input_ids"].shape[1] :].tolist():
            ends = [position for position, token in enumerate(new_tokens) if token in end_ids]
            answers.append(tokenizer.decode(new_tokens[: ends[0] if ends else None], skip_special_tokens=True).strip())
    return answers


# --------------------------------------------------------------------------------------------- metrics


def _normalise_answer(text: str) -> str:
    return " ".join(text.casefold().split())


def exact_match(outputs: list[str], references: list[str]) -> float:
    """Share of outputs equal to their reference, ignoring case and spacing."""
    return float(np.mean([_normalise_answer(o) == _normalise_answer(r) for o, r in zip(outputs, references)]))


def rouge_l(output: str, reference: str) -> float:
    """ROUGE-L F1: the longest common subsequence of words, against both lengths."""
    candidate, target = _normalise_answer(output).split(), _normalise_answer(reference).split()
    if not candidate or not target:
        return float(candidate == target)
    previous = [0] * (len(target) + 1)
    for word in candidate:
        current = [0]
        for index, other in enumerate(target):
            current.append(previous[index] + 1 if word == other else max(previous[index + 1], current[index]))
        previous = current
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate), common / len(target)
    return 2 * precision * recall / (precision + recall)


def parse_mcq(text: str) -> dict | None:
    """A generated multiple-choice question, or None unless it has a question, four distinct non-empty
    options A-D and one answer key, in the training data's layout."""
    match = _MCQ_PATTERN.fullmatch(text.strip())
    if match is None:
        return None
    options = [match[key] for key in "ABCD"]
    if len({_normalise_answer(option) for option in options}) != 4:
        return None
    return {"question": match["question"], "options": options, "key": match["key"]}


def mcq_scores(outputs: list[str], references: list[str]) -> dict[str, float]:
    """Format validity (share of outputs that parse) and answer-key accuracy (share of rows whose
    reference has a key that a valid output repeats)."""
    parsed = [parse_mcq(output) for output in outputs]
    keys = [(parse_mcq(reference) or {}).get("key") for reference in references]
    keyed = [(output, key) for output, key in zip(parsed, keys) if key]
    scores = {"mcq_format_valid": float(np.mean([output is not None for output in parsed]))}
    if keyed:
        scores["mcq_key_accuracy"] = float(
            np.mean([output is not None and output["key"] == key for output, key in keyed])
        )
    return scores


def label_scores(predicted: list[str], truth: list[str]) -> dict[str, float]:
    labels = sorted(set(truth))
    return {
        "accuracy": float(np.mean(np.array(predicted) == np.array(truth))),
        "macro_f1": float(f1_score(truth, predicted, labels=labels, average="macro", zero_division=0)),
    }


def _feature_matrix(rows: pd.DataFrame) -> np.ndarray:
    return np.array([list(json.loads(features).values()) for features in rows["features"]])


def logistic_regression_accuracy(train_rows: pd.DataFrame, eval_rows: pd.DataFrame) -> float:
    """Accuracy of a standardized logistic regression fitted on the train split's features."""
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    classifier.fit(_feature_matrix(train_rows), train_rows["label"])
    return float(classifier.score(_feature_matrix(eval_rows), eval_rows["label"]))


def merge_tolerances(merge_metrics: dict, max_new_tokens: int) -> dict[str, float]:
    """How far the merged model's figures may sit from the QLoRA model's, from what the merge report
    measured: a rate (accuracy, exact match…) may move by the chance that any of an answer's tokens
    disagrees at top-1; a loss by ten times sqrt(KL) (a Pinsker-style bound on the per-token shift)."""
    disagree = 1.0 - merge_metrics["top1_agreement"]
    return {
        "rate": min(1.0, disagree * max_new_tokens),
        "loss": max(1e-4, 10 * math.sqrt(max(merge_metrics["kl"], 0.0))),
    }


def merged_vs_qlora(metrics: dict, tolerances: dict[str, float]) -> list[str]:
    """The figures where the merged model differs from the QLoRA model by more than the merge predicts."""
    problems = []
    for name, values in metrics.items():
        if not isinstance(values, dict) or not {"qlora", "merged"} <= set(values):
            continue
        qlora, merged = values["qlora"], values["merged"]
        tolerance = tolerances["loss"] if name in ("eval_loss", "answer_loss") else tolerances["rate"]
        if name == "perplexity":
            tolerance = qlora * (math.exp(tolerances["loss"]) - 1)
        if abs(merged - qlora) > tolerance + 1e-12:
            problems.append(f"{name}: merged {merged:.6g} vs QLoRA {qlora:.6g} (allowed ±{tolerance:.3g})")
    return problems


# ---------------------------------------------------------------------------------------------- lm-eval


_LM_EVAL_KEY = "params.yaml: evaluate.lm_eval"


def _lm_eval_installed() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def lm_eval_device() -> str:
    """The device lm-eval runs the model on: lm-eval's own default is CUDA, even on a machine without it."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_lm_eval_tasks(params: LmEvalParams) -> "TaskManager | None":
    """lm-eval's TaskManager, with every task of `evaluate.lm_eval.tasks` found and its data loaded, so that a
    wrong name or data that cannot be fetched stops the stage in one line before any model is scored; None
    when there is nothing to run (no tasks, or lm-eval not installed: `run_lm_eval` says so)."""
    if not params.tasks or not _lm_eval_installed():
        return None
    from lm_eval.tasks import TaskManager

    if params.include_path is not None and not Path(params.include_path).is_dir():
        raise TunelineError(
            f"{_LM_EVAL_KEY}.include_path: '{params.include_path}' is not a folder; point it at the folder that "
            f"holds your task YAMLs (relative to the pipeline's root)"
        )
    manager = TaskManager(include_path=params.include_path)
    for task in params.tasks:  # every name first: a typo in the last task need not wait for the data of the others
        _check_lm_eval_task_name(manager, task)
    for task in params.tasks:
        _load_lm_eval_task(manager, task)
    return manager


def _check_lm_eval_task_name(manager: "TaskManager", task: str) -> None:
    if task in manager.all_tasks or Path(task).is_file():  # lm-eval also takes the path of a task YAML
        return
    close = difflib.get_close_matches(task, manager.all_tasks, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise TunelineError(
        f"{_LM_EVAL_KEY}.tasks: '{task}' is not an lm-eval task{hint}; `lm-eval ls tasks` lists them, and "
        f"evaluate.lm_eval.include_path adds a folder of your own task YAMLs"
    )


def _load_lm_eval_task(manager: "TaskManager", task: str) -> None:
    """Build the task, which fetches its data (from the Hugging Face cache when offline)."""
    try:
        manager.load([task])
    except Exception as error:  # datasets and the hub client raise many types (offline, 404, gated, no file)
        raise TunelineError(
            f"{_LM_EVAL_KEY}.tasks: '{task}' cannot load its data ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:200]}); run it once where the Hugging Face hub is reachable (the "
            f"cache keeps the data), or give it local data files in a task YAML under evaluate.lm_eval.include_path"
        ) from None


def run_lm_eval(
    merged_dir: Path, params: LmEvalParams, batch_size: int, task_manager: "TaskManager | None" = None
) -> dict:
    """lm-evaluation-harness on the merged model (`task_manager` from `load_lm_eval_tasks`, or loaded here),
    or why it was skipped."""
    if not params.tasks:
        return {}
    if not _lm_eval_installed():
        print("evaluate: lm_eval.tasks set but lm-eval is not installed (pip install 'tuneline[lm-eval]'); skipped")
        return {"lm_eval_skipped": "not installed"}
    import lm_eval

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(merged_dir), "dtype": "float32"},
        tasks=list(params.tasks),
        limit=params.limit,
        batch_size=batch_size,
        device=lm_eval_device(),
        task_manager=task_manager or load_lm_eval_tasks(params),
        bootstrap_iters=0,  # no standard errors: they are not reported
        log_samples=False,
    )["results"]
    return {  # lm-eval names a figure "metric,filter"; its other keys (alias, sample_len) describe the run
        f"lm_eval_{task}_{metric.split(',')[0]}": value
        for task, figures in results.items()
        for metric, value in figures.items()
        if "," in metric and "stderr" not in metric and isinstance(value, int | float)
    }


# ------------------------------------------------------------------------------------------- evaluation


def select_rows(eval_rows: pd.DataFrame, params: EvaluateParams) -> pd.DataFrame:
    """The eval rows to score, each with the kind it is measured as."""
    rows = eval_rows.iloc[: params.max_examples] if params.max_examples else eval_rows
    if params.kind == "auto":
        return rows
    if params.kind == "label" and rows["label"].isna().any():
        raise TunelineError(
            f"params.yaml: evaluate.kind: label needs a label on every eval row; {int(rows['label'].isna().sum())} "
            f"have none (only tabular sources have labels); use auto"
        )
    return rows.assign(kind=params.kind)


def score_model(model, tokenizer, rows: pd.DataFrame, params: EvaluateParams, name: str) -> tuple[dict, dict]:
    """One model's figures on the rows, and its per-row outputs: {"answers": [...], "labels": [...]}."""
    pad_id = tokenizer.pad_token_id
    losses = answer_losses(model, pad_id, rows, params.batch_size, f"loss {name}")  # once, for every kind
    figures = {"eval_loss": mean_loss(losses)}
    prompts = [list(row.input_ids[: row.prompt_length]) for row in rows.itertuples()]
    answers = generate(model, tokenizer, prompts, params.generation, params.batch_size, f"generate {name}")
    outputs = {"answers": answers}
    kinds = rows["kind"].to_numpy()
    if (kinds == "label").any():
        labelled = rows[kinds == "label"]
        outputs["labels"] = classify(model, pad_id, labelled, params.batch_size, f"classify {name}")
        figures |= label_scores(outputs["labels"], labelled["label"].tolist())
    if (kinds == "mcq").any():
        figures |= mcq_scores(
            [a for a, k in zip(answers, kinds) if k == "mcq"], rows["reference"][kinds == "mcq"].tolist()
        )
    if (kinds == "free_text").any():
        free = rows[kinds == "free_text"]
        free_answers = [a for a, k in zip(answers, kinds) if k == "free_text"]
        figures["exact_match"] = exact_match(free_answers, free["reference"].tolist())
        figures["rouge_l"] = float(np.mean([rouge_l(a, r) for a, r in zip(free_answers, free["reference"])]))
        figures["answer_loss"] = mean_loss(losses[kinds == "free_text"])
        figures["perplexity"] = math.exp(figures["answer_loss"])
    return figures, outputs


def evaluate(
    *,
    base_dir: Path,
    adapter_dir: Path,
    merged_dir: Path,
    dataset_dir: Path,
    merge_metrics: dict,
    params: EvaluateParams,
) -> tuple[dict, pd.DataFrame, dict[str, dict]]:
    """Score base, QLoRA and merged models; return (metrics, the rows scored, each model's outputs)."""
    rows = select_rows(read_split(dataset_dir / "eval.parquet"), params)
    lm_eval_tasks = load_lm_eval_tasks(params.lm_eval)  # before the models: a bad task fails now, not after them
    tokenizer = load_tokenizer(dataset_dir / "tokenizer")
    spec = QuantSpec.load(adapter_dir)
    # One model in memory at a time: each is loaded, scored and dropped. All three compute in the dtype the QLoRA
    # model computes in, so merged and QLoRA are compared like with like.
    loaders = {
        "base": lambda: load_full_model(base_dir, spec.compute_dtype),
        "qlora": lambda: PeftModel.from_pretrained(load_quantized_model(base_dir, spec), adapter_dir),
        "merged": lambda: load_full_model(merged_dir, spec.compute_dtype),
    }
    per_model, outputs = {}, {}
    for name, load in loaders.items():
        per_model[name], outputs[name] = score_model(load().eval(), tokenizer, rows, params, name)
    metrics: dict = {"examples": dict(sorted(rows["kind"].value_counts().items())), "compute_dtype": spec.compute_dtype}
    for figure in per_model["base"]:
        metrics[figure] = {name: per_model[name][figure] for name in MODELS}
    labelled = rows[rows["kind"] == "label"]
    if len(labelled) and labelled["features"].notna().all():
        train_rows = read_split(dataset_dir / "train.parquet")
        metrics["accuracy"]["logistic_regression"] = logistic_regression_accuracy(
            train_rows[train_rows["features"].notna()], labelled
        )
    problems = merged_vs_qlora(metrics, merge_tolerances(merge_metrics, params.generation.max_new_tokens))
    metrics["merged_matches_qlora"] = not problems
    for problem in problems:
        print(f"WARNING: the merged model does not behave like the QLoRA model: {problem}", file=sys.stderr)
    metrics |= run_lm_eval(merged_dir, params.lm_eval, params.batch_size, lm_eval_tasks)
    return metrics, rows, outputs
