"""What the dataset stage writes: the two splits (parquet, and JSONL to read), the token-length histogram,
the dataset card (JSON and markdown) and the lineage that the models trained on the data inherit."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from transformers import PreTrainedTokenizerBase

from tuneline.artifacts import sha256_file, write_json
from tuneline.data.build import STEPS, Built
from tuneline.data.tokens import Encoded, marked
from tuneline.lineage import LINEAGE_FILE
from tuneline.params import DatasetParams

_BAD_ROWS_LISTED = 10


def _split_table(examples: list[Encoded]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "input_ids": [e.input_ids for e in examples],
            "attention_mask": [[1] * len(e.input_ids) for e in examples],
            "labels": [e.labels for e in examples],
            "prompt_length": [e.prompt_length for e in examples],
            "source": [e.example.source for e in examples],
            "kind": [e.example.kind for e in examples],
            "question": [e.example.messages[-2]["content"] for e in examples],  # the last user turn, to read
            "reference": [e.example.messages[-1]["content"] for e in examples],  # the answer the loss covers last
            "ref": [e.example.ref for e in examples],
            "label": [e.example.label for e in examples],
            "choices": [list(e.choice_ids) for e in examples],
            "choice_ids": [list(e.choice_ids.values()) for e in examples],
            "features": [json.dumps(e.example.features) if e.example.features else None for e in examples],
        }
    )


def _length_histogram(lengths: list[int], bins: int = 20) -> list[dict]:
    counts, edges = np.histogram(lengths, bins=min(bins, max(1, len(set(lengths)))))
    return [
        {"tokens": f"{int(edges[i])}-{int(edges[i + 1])}", "examples": int(count)} for i, count in enumerate(counts)
    ]


def _tokenizer_identity(tokenizer: PreTrainedTokenizerBase, tokenizer_dir: Path, pad_changed_from: str | None) -> dict:
    return {
        "path": str(tokenizer_dir),
        "class": type(tokenizer).__name__,
        "sha256": {path.name: sha256_file(path) for path in sorted(tokenizer_dir.iterdir()) if path.is_file()},
        "vocabulary": len(tokenizer),
        "bos": tokenizer.bos_token,
        "eos": tokenizer.eos_token,
        "pad": tokenizer.pad_token,
        "pad_changed_from": pad_changed_from,
    }


def _make_card(built: Built, params: DatasetParams, tokenizer, tokenizer_dir: Path, out_dir: Path) -> dict:
    lengths = [len(e.input_ids) for e in built.train + built.evaluation]
    trained = [sum(label != -100 for label in e.labels) for e in built.train + built.evaluation]

    def per_source(step: str) -> dict:
        return {f"{i}:{source.path}": built.counts[step][i] for i, source in enumerate(params.sources)}

    return {
        "steps": {step: sum(built.counts[step].values()) for step in STEPS},
        "steps_per_source": {step: per_source(step) for step in STEPS},
        "sources": [
            {"path": source.path, "format": source.format, "weight": source.weight, "max_rows": source.max_rows}
            for source in params.sources
        ],
        "bad_rows": built.bad_rows[:_BAD_ROWS_LISTED],
        "token_length": {
            "min": min(lengths),
            "mean": round(float(np.mean(lengths)), 1),
            "p95": int(np.percentile(lengths, 95)),
            "max": max(lengths),
            "max_length": params.max_length,
        },
        "trained_tokens": {"total": sum(trained), "mean": round(float(np.mean(trained)), 1)},
        "kinds": dict(sorted(Counter(e.example.kind for e in built.train + built.evaluation).items())),
        "label_balance": {
            "train": dict(sorted(Counter(e.example.label for e in built.train if e.example.label).items())),
            "eval": dict(sorted(Counter(e.example.label for e in built.evaluation if e.example.label).items())),
        },
        "template": {
            "name": params.template,
            "train_on": params.train_on,
            "system_prompt": params.system_prompt,
            "chat_template_sha256": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest()
            if params.template == "tokenizer"
            else None,
        },
        "tokenizer": _tokenizer_identity(tokenizer, tokenizer_dir, built.pad_changed_from),
        "sha256": {
            "inputs": built.inputs,
            "outputs": {
                name: sha256_file(out_dir / name)
                for name in ("train.parquet", "eval.parquet", "train.jsonl", "eval.jsonl")
            },
        },
        "examples": [marked(e, tokenizer) for e in pick_examples(built.train)],
    }


def pick_examples(train: list[Encoded]) -> list[Encoded]:
    """Two examples to show: the first, and the first with more than one answer if any (else the second)."""
    multi = [e for e in train[1:] if sum(m["role"] == "assistant" for m in e.example.messages) > 1]
    return [train[0], *(multi[:1] or train[1:2])]


def _card_markdown(card: dict) -> str:
    per_source = card["steps_per_source"]
    names = list(per_source["read"])
    steps = "\n".join(
        f"| {step} | {total} | " + " | ".join(str(per_source[step][name]) for name in names) + " |"
        for step, total in card["steps"].items()
    )
    sources = "\n".join(f"| {s['path']} | {s['format']} | {s['weight']} |" for s in card["sources"])
    header = "| step | all | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names)
    examples = "\n\n".join(f"```\n{example}\n```" for example in card["examples"])
    length = card["token_length"]
    return (
        f"# Dataset card\n\nTemplate `{card['template']['name']}` (loss on {card['template']['train_on']}), "
        f"tokenizer `{card['tokenizer']['class']}` (pad `{card['tokenizer']['pad']}`).\n\n"
        f"| source | format | weight |\n|---|---|---|\n{sources}\n\n"
        f"{header}\n{steps}\n\n"
        f"Tokens per example: min {length['min']}, mean {length['mean']}, p95 {length['p95']}, max {length['max']} "
        f"(max_length {length['max_length']}). Label balance: train {card['label_balance']['train']}, "
        f"eval {card['label_balance']['eval']}.\n\n"
        f"Examples (trained tokens inside ⟦ ⟧):\n\n{examples}\n"
    )


def write_outputs(
    built: Built, params: DatasetParams, tokenizer: PreTrainedTokenizerBase, tokenizer_dir: Path, out: Path
) -> dict:
    tokenizer.save_pretrained(out / "tokenizer")
    for name, examples in (("train", built.train), ("eval", built.evaluation)):
        _split_table(examples).to_parquet(out / f"{name}.parquet", index=False)
        (out / f"{name}.jsonl").write_text(
            "".join(
                json.dumps({"ref": e.example.ref, "label": e.example.label, "text": e.text}, ensure_ascii=False) + "\n"
                for e in examples
            )
        )
    lengths = [len(e.input_ids) for e in built.train + built.evaluation]
    write_json(out / "token_lengths.json", _length_histogram(lengths))
    card = _make_card(built, params, tokenizer, tokenizer_dir, out)
    write_json(out / "dataset_card.json", card)
    (out / "dataset_card.md").write_text(_card_markdown(card))
    write_json(out / LINEAGE_FILE, _dataset_lineage(card, params))
    return card


def _dataset_lineage(card: dict, params: DatasetParams) -> dict:
    """The card's facts that identify the data (no examples, no display): a change here is a data change."""
    return {
        "inputs": card["sha256"]["inputs"],
        "splits": {name: card["sha256"]["outputs"][name] for name in ("train.parquet", "eval.parquet")},
        "counts": card["steps"],
        "params": params.model_dump(mode="json"),
    }
