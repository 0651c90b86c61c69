"""Evaluate: is the tuned model better than the base, and does the merged model behave like the tuned one?

    python -m stages.evaluate BASE_DIR ADAPTER_DIR MERGED_DIR DATASET_DIR MERGE_METRICS METRICS_FILE EVAL_DIR

Every figure is computed for the base, QLoRA (4-bit base + adapter) and merged models, on the dataset
stage's tokenized eval split, so every model sees exactly the tokens training saw. What is measured
follows each example's kind (set by the dataset stage from its source's format; `evaluate.kind` overrides):

    label      accuracy and macro-F1 of the most likely label (each label scored by its log-likelihood as
               the answer; an answered multiple-choice question's labels are its letters), a confusion
               matrix, and a logistic regression on the same features as baseline (tabular rows)
    mcq        generated questions: the rate that parse into a question, four distinct options and one
               answer key (format validity), and how often that key is the reference's
    free_text  exact match and ROUGE-L of the generated answer against the reference, and the reference
               answers' mean loss (nats per token) and perplexity

plus `eval_loss` over every example. Every eval prompt is answered by all three models with the decoding
of `evaluate.generation` (greedy, beam or sampling; batched with left padding; stopped at the template's
end-of-turn): EVAL_DIR/generations.jsonl and generations.html put them side by side. The merged model's
figures must match the QLoRA model's within what metrics/merge.json predicts (KL, top-1 agreement);
`merged_matches_qlora` says whether they do, and a mismatch is printed as a warning. With
`evaluate.lm_eval.tasks`, lm-evaluation-harness runs on the merged model (the `lm-eval` extra); the tasks
are checked, and their data loaded, before any model is scored.

The scoring lives in tuneline/scoring.py, the eval directory's tables in tuneline/eval_report.py.
"""

import sys
from pathlib import Path

from tuneline.artifacts import atomic_dir, read_json, write_json
from tuneline.errors import exit_on_error
from tuneline.eval_report import write_eval_dir
from tuneline.params import EvaluateParams, load_section
from tuneline.scoring import evaluate


@exit_on_error
def main() -> None:
    if len(sys.argv) != 8:
        sys.exit(
            "usage: python -m stages.evaluate BASE_DIR ADAPTER_DIR MERGED_DIR DATASET_DIR MERGE_METRICS "
            "METRICS_FILE EVAL_DIR"
        )
    params: EvaluateParams = load_section("evaluate")
    base_dir, adapter_dir, merged_dir, dataset_dir, merge_file, metrics_file, eval_dir = map(Path, sys.argv[1:])
    metrics, rows, outputs = evaluate(
        base_dir=base_dir,
        adapter_dir=adapter_dir,
        merged_dir=merged_dir,
        dataset_dir=dataset_dir,
        merge_metrics=read_json(merge_file),
        params=params,
    )
    with atomic_dir(eval_dir) as tmp:
        write_eval_dir(tmp, rows, outputs)
        write_json(metrics_file, metrics)
    shown = [name for name in ("accuracy", "mcq_format_valid", "rouge_l", "eval_loss") if name in metrics][:2]
    print(
        "evaluate: "
        + "; ".join(
            f"{name} " + ", ".join(f"{model} {value:.3f}" for model, value in metrics[name].items()) for name in shown
        )
        + f"; merged matches QLoRA: {metrics['merged_matches_qlora']}"
    )


if __name__ == "__main__":
    main()
