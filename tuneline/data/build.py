"""The dataset pipeline: build_dataset reads, converts, cleans, renders, tokenizes, checks, balances,
splits and weights every source, counting what each step drops; preview shows the first rendered examples;
summary_line is the stage's one line. Both warn on stderr about a named template the model was not trained with."""

import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from tuneline.data.cleaning import (
    apply_weights, balance_labels, drop_duplicates, exact_key, is_empty, near_key, normalise, stratified_split,
)
from tuneline.data.formats import Example, check_tabular_params, row_to_example
from tuneline.data.rows import BadRow, read_source, source_key
from tuneline.data.templates import TEMPLATES, Rendered, check_template_tokens, template_mismatch
from tuneline.data.tokens import (
    Encoded, check_encoded, choice_ids, choose_pad_token, encode, fit_to_length, load_dataset_tokenizer, marked,
)
from tuneline.errors import TunelineError
from tuneline.modeling import end_token_ids
from tuneline.params import DatasetParams, TabularSource

# What build_dataset counts per source, in the order the steps run: the rows of the dataset card.
STEPS = (
    "read",
    "bad_rows",
    "trailing_turns_dropped",
    "normalised",
    "empty",
    "duplicates",
    "near_duplicates",
    "truncated_to_whole_turns",
    "too_long",
    "balanced_away",
    "train",
    "eval",
    "train_after_weights",
)
# The steps that count rows kept (or changed), not dropped: the summary line lists them apart.
_KEPT_STEPS = ("read", "normalised", "train", "eval", "train_after_weights")


@dataclass
class Built:
    train: list[Encoded]
    evaluation: list[Encoded]
    counts: dict[str, Counter]  # step -> Counter of source index
    bad_rows: list[str]
    inputs: dict[str, str]  # input name -> sha256
    pad_changed_from: str | None


def build_dataset(
    *, params: DatasetParams, data_dir: Path, tokenizer: PreTrainedTokenizerBase, tokenizer_dir: Path
) -> Built:
    """Read, convert, clean, render, tokenize, check, balance, split and weight every source."""
    _check_template(params.template, tokenizer, tokenizer_dir)
    pad_changed_from = choose_pad_token(tokenizer)
    counts: dict[str, Counter] = {step: Counter() for step in STEPS}
    bad_rows: list[str] = []
    inputs: dict[str, str] = {}
    examples: list[Example] = []
    for index, source in enumerate(params.sources):
        rows, hashes = read_source(index, source, data_dir, params.seed)
        inputs.update(hashes)
        if isinstance(source, TabularSource):
            check_tabular_params(index, source, rows)
        counts["read"][index] = len(rows)
        before = len(examples)
        for row in rows:
            try:
                example = row_to_example(index, source, row, params.system_prompt)
            except BadRow as problem:
                if params.on_bad_row == "error":
                    raise TunelineError(f"{row.ref}: {problem} (or set dataset.on_bad_row: skip)") from None
                counts["bad_rows"][index] += 1
                bad_rows.append(f"{row.ref}: {problem}")
                continue
            counts["trailing_turns_dropped"][index] += example.trailing_turns
            examples.append(example)
        if len(examples) == before:
            raise TunelineError(
                f"{source_key(index)}: {source.path} yields no examples ({len(rows)} rows read, all bad)"
            )

    normalised = [normalise(example) for example in examples]
    for old, new in zip(examples, normalised):
        counts["normalised"][new.source] += old.messages != new.messages
    examples = _count_dropped(counts, "empty", *_partition(normalised, lambda example: not is_empty(example)))
    examples = _count_dropped(counts, "duplicates", *drop_duplicates(examples, exact_key))
    examples = _count_dropped(counts, "near_duplicates", *drop_duplicates(examples, near_key))

    def render(messages: list[dict]) -> Rendered:
        return TEMPLATES[params.template](messages, tokenizer)

    ends = end_token_ids(tokenizer)
    encoded_examples = []
    for example in tqdm(examples, desc="tokenizing", unit="example", mininterval=5, disable=len(examples) < 5000):
        encoded, rendered, cut = fit_to_length(example, render, tokenizer, params.train_on, params.max_length)
        if encoded is None:
            counts["too_long"][example.source] += 1
            continue
        counts["truncated_to_whole_turns"][example.source] += cut
        check_encoded(encoded, rendered, tokenizer, ends, params.template)
        encoded_examples.append(encoded)
    if not encoded_examples:
        raise TunelineError(
            f"dataset: no examples left after cleaning ({sum(counts['too_long'].values())} too long for "
            f"dataset.max_length {params.max_length})"
        )

    if params.balance:
        encoded_examples = _count_dropped(
            counts, "balanced_away", *balance_labels(encoded_examples, params.seed), lambda e: e.example.source
        )
    train, evaluation = stratified_split(encoded_examples, params.eval_fraction, params.seed)
    counts["train"].update(encoded.example.source for encoded in train)
    counts["eval"].update(encoded.example.source for encoded in evaluation)
    train = apply_weights(train, params.sources, params.seed)
    counts["train_after_weights"].update(encoded.example.source for encoded in train)
    for encoded in evaluation:
        if encoded.example.label:
            encoded.choice_ids = choice_ids(encoded, render, tokenizer)
    return Built(train, evaluation, counts, bad_rows, inputs, pad_changed_from)


def _check_template(template: str, tokenizer: PreTrainedTokenizerBase, tokenizer_dir: Path) -> None:
    """Refuse a template whose tokens the tokenizer lacks; warn on stderr about one it was not trained with."""
    check_template_tokens(template, tokenizer, tokenizer_dir)
    mismatch = template_mismatch(template, tokenizer, tokenizer_dir)
    if mismatch:
        print(f"WARNING: {mismatch}", file=sys.stderr)


def _partition(examples: list, keep: Callable) -> tuple[list, list]:
    return [e for e in examples if keep(e)], [e for e in examples if not keep(e)]


def _count_dropped(
    counts: dict[str, Counter], step: str, kept: list, dropped: list, source_of: Callable = lambda e: e.source
) -> list:
    counts[step].update(source_of(item) for item in dropped)
    return kept


def preview(*, params: DatasetParams, data_dir: Path, tokenizer_dir: Path, count: int) -> str:
    """The first `count` rows of every source, rendered and tokenized, trained tokens inside ⟦ ⟧."""
    tokenizer = load_dataset_tokenizer(tokenizer_dir)
    _check_template(params.template, tokenizer, tokenizer_dir)
    choose_pad_token(tokenizer)
    shown = []
    for index, source in enumerate(params.sources):
        rows, _ = read_source(index, source, data_dir, params.seed)
        for row in rows[:count]:
            try:
                example = normalise(row_to_example(index, source, row, params.system_prompt))
            except BadRow as problem:
                shown.append(f"--- {row.ref}: bad row: {problem}")
                continue
            encoded = encode(
                example, TEMPLATES[params.template](example.messages, tokenizer), tokenizer, params.train_on
            )
            shown.append(
                f"--- {row.ref} ({len(encoded.input_ids)} tokens, {sum(l != -100 for l in encoded.labels)} trained)\n"
                f"{marked(encoded, tokenizer)}"
            )
    return "\n".join(shown)


def summary_line(steps: dict[str, int]) -> str:
    """The dataset stage's one line from the card's totals: rows read, the splits, and what was dropped, if any."""
    dropped = ", ".join(f"{count} {step}" for step, count in steps.items() if count and step not in _KEPT_STEPS)
    return (
        f"dataset: {steps['read']} rows read, {steps['train']} train / {steps['eval']} eval "
        f"({steps['train_after_weights']} train after weights)" + (f"; dropped: {dropped}" if dropped else "")
    )
