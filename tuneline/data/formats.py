"""The six formats a source's rows can be in (alpaca, messages, oasst, prompt_completion, mcq, tabular),
each row turned into an Example: an optional system turn, then user and assistant turns alternating, ending
with an answer."""

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tuneline.data.rows import MCQ_KEYS, BadRow, Row, source_key
from tuneline.errors import TunelineError
from tuneline.params import McqSource, Source, TabularSource


@dataclass
class Example:
    source: int  # index in dataset.sources
    ref: str  # where the row came from: "data/sources/chat.jsonl:12"
    kind: str  # what evaluation measures: label (classification, MCQ answering), mcq (question generation), free_text
    messages: list[dict]  # {role, content}; an alpaca user turn may also carry "input"
    label: str | None = None  # the class, for rows that have one (tabular; mcq answering: the letter)
    choices: dict[str, str] = field(default_factory=dict)  # label -> the answer text for it
    features: dict | None = None  # tabular rows: the numbers, for the logistic-regression baseline
    trailing_turns: int = 0  # unanswered user turns dropped from the end


def _column(row: dict, source: Source, name: str, required: bool = True) -> object:
    key = source.columns.get(name, name)
    value = row.get(key)
    if required and value is None:
        mapped = f" (mapped from '{name}')" if key != name else ""
        raise BadRow(f"no '{key}' field{mapped}")
    return value


def _text_of(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise BadRow(f"'{name}' is {type(value).__name__}, expected text")
    return value


def _alpaca_messages(row: dict, source: Source) -> list[dict]:
    user = {"role": "user", "content": _text_of(_column(row, source, "instruction"), "instruction")}
    extra = _column(row, source, "input", required=False)
    if extra:
        user["input"] = _text_of(extra, "input")
    return [user, {"role": "assistant", "content": _text_of(_column(row, source, "output"), "output")}]


_ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
}


def _chat_messages(row: dict, source: Source) -> list[dict]:
    """OpenAI-style {role, content} or ShareGPT {from, value} turns."""
    key = source.columns.get("messages") or ("messages" if "messages" in row else "conversations")
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise BadRow(f"no '{key}' list of turns")
    messages = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise BadRow(f"turn {number} is not an object")
        role, content = (
            (turn.get("role"), turn.get("content")) if "role" in turn else (turn.get("from"), turn.get("value"))
        )
        if role not in _ROLES:
            raise BadRow(f"turn {number}: unknown role {role!r}; expected one of {', '.join(_ROLES)}")
        messages.append({"role": _ROLES[role], "content": _text_of(content, f"turn {number} content")})
    return messages


_OASST_TURN = re.compile(r"###\s*(Human|Assistant)\s*:")


def _oasst_messages(row: dict, source: Source) -> list[dict]:
    """Split "### Human: ... ### Assistant: ..." text into turns."""
    text = _text_of(_column(row, source, "text"), "text")
    parts = _OASST_TURN.split(text)
    if parts[0].strip():
        raise BadRow("text before the first '### Human:' turn")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[speaker], "content": content.strip()} for speaker, content in zip(parts[1::2], parts[2::2])]


def _prompt_completion_messages(row: dict, source: Source) -> list[dict]:
    return [
        {"role": "user", "content": _text_of(_column(row, source, "prompt"), "prompt")},
        {"role": "assistant", "content": _text_of(_column(row, source, "completion"), "completion")},
    ]


def _mcq_fields(row: dict, source: McqSource) -> tuple[str, list, str]:
    """A multiple-choice row's question, its four options and its key (A-D; an index 0-3 is converted)."""
    question = _text_of(_column(row, source, "question"), "question")
    options = _column(row, source, "choices", required=False)
    if options is None:
        options = [_column(row, source, key) for key in MCQ_KEYS]
    if not isinstance(options, list | tuple | np.ndarray) or len(options) != len(MCQ_KEYS):
        raise BadRow(f"expected {len(MCQ_KEYS)} options, got {options!r}")
    answer = _column(row, source, "answer")
    key = str(answer).strip().upper()
    if key in ("0", "1", "2", "3"):  # an index, as in MMLU-style data
        key = MCQ_KEYS[int(key)]
    if key not in MCQ_KEYS:
        raise BadRow(f"answer {answer!r} is not one of {', '.join(MCQ_KEYS)} (or 0-3)")
    return question, list(options), key


def _mcq_question_lines(question: str, options: list) -> list[str]:
    """The question and its options, one a line ("Question: …", "A. …" to "D. …"), as both tasks write them."""
    return [f"Question: {question}", *(f"{letter}. {option}" for letter, option in zip(MCQ_KEYS, options))]


def _mcq_request(row: dict, source: McqSource) -> str:
    context = _column(row, source, "context", required=False)
    return f"{source.instruction}\n\n{context}" if context else source.instruction


def _mcq_messages(row: dict, source: McqSource) -> list[dict]:
    """Multiple-choice question generation: the user asks for a question (on the context, if any); the
    answer is the question itself, rendered "Question: … / A. … / B. … / C. … / D. … / Answer: X"."""
    question, options, key = _mcq_fields(row, source)
    return [
        {"role": "user", "content": _mcq_request(row, source)},
        {"role": "assistant", "content": "\n".join([*_mcq_question_lines(question, options), f"Answer: {key}"])},
    ]


def _mcq_answer_example(row: dict, source: McqSource) -> tuple[list[dict], str, dict[str, str]]:
    """Multiple-choice answering, as benchmarks ask it: the user turn holds the question and its four options
    (after the instruction and the context, if any); the answer is the letter, a label among A-D, so that
    evaluation scores each letter by its likelihood."""
    question, options, key = _mcq_fields(row, source)
    prompt = "\n\n".join([_mcq_request(row, source), "\n".join(_mcq_question_lines(question, options))])
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": key}]
    return messages, key, {letter: letter for letter in MCQ_KEYS}


def _label_key(value: object) -> str:
    """A label value as written in label_names: 0, 0.0 and "0" are all "0"."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _tabular_example(row: dict, source: TabularSource) -> tuple[list[dict], str, dict[str, str], dict]:
    """One table row as a question listing its features, answered by its label's name."""
    if any(row.get(name) is None for name in [*source.features, source.label_column]):
        return [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}], "", {}, {}  # dropped as empty
    features = {name: round(_number(row[name], name), source.decimals) for name in source.features}
    measurements = ", ".join(f"{name} {value:.{source.decimals}f}" for name, value in features.items())
    label = source.label_names[_label_key(row[source.label_column])]
    messages = [
        {"role": "user", "content": source.user_template.format(measurements=measurements)},
        {"role": "assistant", "content": label},
    ]
    return messages, label, {name: name for name in source.label_names.values()}, features


def _number(value: object, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise BadRow(f"feature '{name}' is not a number: {value!r}") from None


def check_tabular_params(index: int, source: TabularSource, rows: list[Row]) -> None:
    if "{measurements}" not in source.user_template:
        raise TunelineError(f"{source_key(index)}.user_template: must contain {{measurements}}")
    values = {
        _label_key(row.fields[source.label_column])
        for row in rows
        if row.fields and row.fields.get(source.label_column) is not None
    }
    unnamed = sorted(values - set(source.label_names))
    if unnamed:
        raise TunelineError(f"{source_key(index)}.label_names: no answer for label value(s) {', '.join(unnamed)}")


def row_to_example(index: int, source: Source, row: Row, system_prompt: str) -> Example:
    """One row as a conversation: optional system turn, then user/assistant turns, ending with an answer."""
    if row.problem:
        raise BadRow(row.problem)
    label, choices, features = None, {}, None
    if source.format == "tabular":
        messages, label, choices, features = _tabular_example(row.fields, source)
    elif source.format == "mcq" and source.task == "answer":
        messages, label, choices = _mcq_answer_example(row.fields, source)
    else:
        readers: dict[str, Callable[[dict, Source], list[dict]]] = {
            "alpaca": _alpaca_messages,
            "messages": _chat_messages,
            "oasst": _oasst_messages,
            "prompt_completion": _prompt_completion_messages,
            "mcq": _mcq_messages,
        }
        messages = readers[source.format](row.fields, source)
    messages, trailing = _check_turn_order(messages)
    system = source.system_prompt if source.system_prompt is not None else system_prompt
    if messages[0]["role"] != "system" and system:
        messages = [{"role": "system", "content": system}, *messages]
    return Example(index, row.ref, _kind(source), messages, label or None, choices, features, trailing)


def _kind(source: Source) -> str:
    """What evaluation measures on a source's rows: the likelihood of each label for tabular rows and answered
    multiple-choice questions (label), generated questions (mcq), and generated text for the rest (free_text)."""
    if source.format == "mcq":
        return "label" if source.task == "answer" else "mcq"
    return "label" if source.format == "tabular" else "free_text"


def _check_turn_order(messages: list[dict]) -> tuple[list[dict], int]:
    """An optional system turn, then user and assistant alternating; unanswered user turns at the end are
    dropped (and counted). Returns the messages and the number of turns dropped."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for number, message in enumerate(body):
        expected = "user" if number % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise BadRow(
                f"turn {number + 1 + len(messages) - len(body)} is {message['role']}, expected {expected} "
                f"(an optional system turn first, then user and assistant alternating)"
            )
    trailing = 0
    while messages and messages[-1]["role"] == "user":
        messages, trailing = messages[:-1], trailing + 1
    if not any(message["role"] == "assistant" for message in messages):
        raise BadRow("no assistant turn")
    return messages, trailing
