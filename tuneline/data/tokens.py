"""Rendered conversations as tokens: the loss mask over the answers (labels, -100 = no loss), the checks
on the tokens, cutting to `max_length` by whole answers, a pad token distinct from EOS, the tokenized answers
of labelled examples, and an example's text with its trained tokens marked."""

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tuneline.data.formats import Example
from tuneline.data.templates import Rendered
from tuneline.errors import TunelineError
from tuneline.modeling import END_OF_TURN_TOKENS


@dataclass
class Encoded:
    example: Example
    text: str
    input_ids: list[int]
    labels: list[int]
    prompt_length: int  # tokens before the last trained answer: the prompt a generation starts from
    choice_ids: dict[str, list[int]] = field(default_factory=dict)  # eval, labelled: label -> its answer's tokens


def load_dataset_tokenizer(tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    if not (tokenizer_dir / "tokenizer_config.json").exists():
        raise TunelineError(f"{tokenizer_dir}: no tokenizer there; run `dvc repro convert` first (or pass --tokenizer)")
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def choose_pad_token(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Give the tokenizer a pad token distinct from EOS without growing the vocabulary; return the old one
    if it changed. A pad equal to EOS is the classic bug where masking padding also masks every EOS, and the
    model never learns to stop."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return None
    used = {
        tokenizer.eos_token,
        tokenizer.bos_token,
        *END_OF_TURN_TOKENS,
        "<|im_start|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|begin_of_text|>",
    }
    specials = [
        *tokenizer.all_special_tokens,
        *(t.content for t in tokenizer.added_tokens_decoder.values() if t.special),
    ]
    # A token meant for padding first, then unk, then reserved tokens, then any other spare special.
    ranked = sorted(specials, key=lambda t: ("pad" not in t.lower(), t != tokenizer.unk_token, "reserved" not in t))
    candidates = [token for token in ranked if token and token not in used]
    if not candidates:
        raise TunelineError(
            f"the tokenizer has no token to pad with other than EOS ({tokenizer.eos_token}) and no spare special "
            f"token; give it a pad token (tokenizer.add_special_tokens) in the model you fetch"
        )
    old = tokenizer.pad_token
    tokenizer.pad_token = candidates[0]
    return old or "none"


def encode(example: Example, rendered: Rendered, tokenizer: PreTrainedTokenizerBase, train_on: str) -> Encoded:
    """Tokenize the whole text (as inference does) and train on the tokens that overlap an answer span (all
    answers, or only the last one). A token that straddles the prompt's end (a blank merged into the answer's
    first word) belongs to the answer: generation must produce it."""
    encoding = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    spans = rendered.spans if train_on == "all_turns" else rendered.spans[-1:]
    ids, labels = encoding["input_ids"], []
    prompt_length = len(ids)
    last_start, last_end = rendered.spans[-1]
    for position, ((start, end), token) in enumerate(zip(encoding["offset_mapping"], ids)):
        trained = any(start < span_end and end > span_start for span_start, span_end in spans)
        labels.append(token if trained else -100)
        if start < last_end and end > last_start:
            prompt_length = min(prompt_length, position)
    return Encoded(example, rendered.text, ids, labels, prompt_length)


def check_encoded(
    encoded: Encoded, rendered: Rendered, tokenizer: PreTrainedTokenizerBase, ends: set[int], template: str
) -> None:
    """Exactly one BOS at the start (where there is one), every answer closed by EOS or end-of-turn, and at
    least one token with a loss: a template or tokenizer that breaks these fails here, not silently later."""
    where = f"{encoded.example.ref}: template '{template}'"
    ids = encoded.input_ids
    bos_id = tokenizer.convert_tokens_to_ids(rendered.bos) if rendered.bos else None
    if bos_id is not None and ids[0] != bos_id:
        raise TunelineError(f"{where}: the tokens do not start with BOS {rendered.bos}; fix the chat template")
    if tokenizer.bos_token_id is not None and ids[:2] == [tokenizer.bos_token_id] * 2:
        raise TunelineError(
            f"{where}: the tokens start with BOS twice (the chat template writes one and so does the "
            f"tokenizer); fix the chat template"
        )
    runs = _trained_runs(encoded.labels)
    if not runs:
        raise TunelineError(f"{where}: no token carries a loss; the answer spans are empty")
    for start, end in runs:
        if ids[end - 1] not in ends:
            raise TunelineError(
                f"{where}: an answer is not closed by EOS or an end-of-turn token (it ends with "
                f"{tokenizer.convert_ids_to_tokens(ids[end - 1])!r}); the model would never learn to stop; "
                f"use a template that closes answers"
            )


def _trained_runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive trained positions."""
    runs, start = [], None
    for position, label in enumerate([*labels, -100]):
        if label != -100 and start is None:
            start = position
        elif label == -100 and start is not None:
            runs.append((start, position))
            start = None
    return runs


def fit_to_length(
    example: Example,
    render: Callable[[list[dict]], Rendered],
    tokenizer: PreTrainedTokenizerBase,
    train_on: str,
    max_length: int,
) -> tuple[Encoded | None, Rendered | None, bool]:
    """Encode the example; over max_length, cut it back to the last whole answer that fits. Returns
    (encoded or None when even the first answer does not fit, its rendering, whether it was cut)."""
    rendered = render(example.messages)
    encoded = encode(example, rendered, tokenizer, train_on)
    if len(encoded.input_ids) <= max_length:
        return encoded, rendered, False
    answers = [index for index, message in enumerate(example.messages) if message["role"] == "assistant"]
    for last in reversed(answers[:-1]):
        shorter = replace(example, messages=example.messages[: last + 1])
        rendered = render(shorter.messages)
        encoded = encode(shorter, rendered, tokenizer, train_on)
        if len(encoded.input_ids) <= max_length:
            return encoded, rendered, True
    return None, None, False


def choice_ids(
    encoded: Encoded, render: Callable[[list[dict]], Rendered], tokenizer: PreTrainedTokenizerBase
) -> dict[str, list[int]]:
    """For a labelled example: the tokens of each possible answer after the shared prompt, for scoring."""
    result = {}
    prompt = encoded.input_ids[: encoded.prompt_length]
    for label, answer in encoded.example.choices.items():
        messages = [*encoded.example.messages[:-1], {"role": "assistant", "content": answer}]
        candidate = encode(encoded.example, render(messages), tokenizer, "last_turn")
        if candidate.input_ids[: candidate.prompt_length] != prompt:
            raise TunelineError(
                f"{encoded.example.ref}: the template renders the prompt differently for the answer {answer!r}"
            )
        result[label] = [token for token, label_id in zip(candidate.input_ids, candidate.labels) if label_id != -100]
    return result


def marked(encoded: Encoded, tokenizer: PreTrainedTokenizerBase) -> str:
    """The example's text with the trained tokens inside ⟦ ⟧, decoded run by run from the token ids."""
    pieces, run, trained = [], [], False
    for token, label in [*zip(encoded.input_ids, encoded.labels), (None, None)]:
        now = label is not None and label != -100
        if token is None or (run and now != trained):
            text = tokenizer.decode(run, skip_special_tokens=False)
            pieces.append(f"⟦{text}⟧" if trained else text)
            run = []
        if token is not None:
            run.append(token)
            trained = now
    return "".join(pieces)
