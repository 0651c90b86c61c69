"""Dataset: turn the users' data, in any of six formats, into checked, tokenized training examples.

    python -m stages.dataset DATA_DIR TOKENIZER_DIR OUT_DIR

Reads every source of `dataset.sources` (files or globs under DATA_DIR, which dvc.yaml tracks by content;
scikit-learn's bundled tables; Hugging Face datasets at a pinned revision), turns each row into a
conversation, cleans the lot, renders it with `dataset.template`, tokenizes it with the loss on the
assistant turns only, checks the tokens, balances labels, splits train/eval and writes to OUT_DIR:

    train.parquet, eval.parquet   input_ids, attention_mask, labels (-100 = no loss) and what evaluation
                                  needs (prompt_length, label, choices with their tokenized answers)
    train.jsonl, eval.jsonl       the rendered text of every example, to read
    tokenizer/                    the tokenizer the ids belong to (its pad token made distinct from EOS)
    dataset_card.json, .md        counts per cleaning step and per source, token lengths, label balance,
                                  sha256 of inputs and outputs, tokenizer and template identity, examples
    token_lengths.json            the token-length histogram, for `dvc plots`
    lineage.json                  what the models trained on this data inherit: sha256 of every input and
                                  of the two splits, the dataset params and the cleaning counts

Cleaning runs in this order, each step counted: normalise (Unicode NFC, line ends, trailing blanks) ->
drop empty -> exact dedup -> near-dedup (a hash of the text lowercased, without punctuation or spacing) ->
length (conversations over `max_length` tokens are cut back to their last whole answer that fits, or
dropped) -> label balancing by downsampling -> stratified split -> source weights (train split only).
`tuneline dataset preview` shows the first rendered examples of each source with the trained spans marked.
"""

import glob
import hashlib
import json
import os
import random
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tuneline.artifacts import atomic_dir, sha256_file, write_json
from tuneline.errors import TunelineError, exit_on_error
from tuneline.lineage import LINEAGE_FILE
from tuneline.modeling import END_OF_TURN_TOKENS, end_token_ids
from tuneline.params import DatasetParams, McqSource, Source, TabularSource, load_section

TABLE_SUFFIXES = (".csv", ".parquet")
ROW_SUFFIXES = (".jsonl", ".json", *TABLE_SUFFIXES)
BAD_ROWS_LISTED = 10
MCQ_KEYS = ("A", "B", "C", "D")
KINDS = {"tabular": "label", "mcq": "mcq"}  # source format -> evaluation kind; any other format: free_text
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
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


class BadRow(Exception):
    """A row that cannot become a training example; with on_bad_row: skip it is counted and listed."""


# ------------------------------------------------------------------------------------------ examples


@dataclass
class Example:
    source: int  # index in dataset.sources
    ref: str  # where the row came from: "data/sources/chat.jsonl:12"
    kind: str  # what evaluation measures: label (classification), mcq (question generation), free_text
    messages: list[dict]  # {role, content}; an alpaca user turn may also carry "input"
    label: str | None = None  # the class, for rows that have one (tabular)
    choices: dict[str, str] = field(default_factory=dict)  # label -> the answer text for it
    features: dict | None = None  # tabular rows: the numbers, for the logistic-regression baseline
    trailing_turns: int = 0  # unanswered user turns dropped from the end


@dataclass
class Encoded:
    example: Example
    text: str
    input_ids: list[int]
    labels: list[int]
    prompt_length: int  # tokens before the last trained answer: the prompt a generation starts from
    choice_ids: dict[str, list[int]] = field(default_factory=dict)  # eval, labelled: label -> its answer's tokens


# ------------------------------------------------------------------------------------------- reading


@dataclass
class Row:
    ref: str
    fields: dict | None
    problem: str | None = None  # set when the row itself cannot be read (a malformed JSON line)


def source_key(index: int) -> str:
    return f"params.yaml: dataset.sources[{index}]"


def resolve_files(index: int, source: Source, data_dir: Path) -> list[Path]:
    """The files a source's path or glob names, all inside DATA_DIR (which DVC tracks by content)."""
    pattern = Path(source.path)
    if pattern.is_absolute() or ".." in pattern.parts:
        raise TunelineError(
            f"{source_key(index)}.path: '{source.path}' must be relative to {data_dir}/, the folder dvc.yaml "
            f"tracks; move the data there so that editing it reruns the pipeline"
        )
    files = sorted(Path(name) for name in glob.glob(str(data_dir / pattern), recursive=True) if Path(name).is_file())
    if not files:
        raise TunelineError(f"{source_key(index)}.path: '{source.path}' matches no file under {data_dir}/")
    unknown = [path for path in files if path.suffix not in ROW_SUFFIXES]
    if unknown:
        raise TunelineError(f"{unknown[0]}: unknown file type; use one of: {', '.join(ROW_SUFFIXES)}")
    return files


def read_file_rows(index: int, source: Source, path: Path) -> Iterator[Row]:
    """The rows of one file: JSONL (a line each), a JSON array, CSV or parquet."""
    try:
        if path.suffix == ".jsonl":
            yield from jsonl_rows(path)
        elif path.suffix == ".json":
            yield from json_array_rows(path)
        else:
            table = read_table_file(path, as_text=not isinstance(source, TabularSource))
            check_table_columns(index, source, path, list(table.columns))
            yield from table_rows(str(path), table)
    except UnicodeDecodeError as error:
        raise TunelineError(f"{path}: not UTF-8 text (byte {error.start}); save it as UTF-8") from None


def jsonl_rows(path: Path) -> Iterator[Row]:
    """One row per line, decoded line by line so that a bad byte is reported at its line and file offset."""
    offset = 0
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise TunelineError(
                    f"{path}:{number}: not UTF-8 text (byte {offset + error.start}); save it as UTF-8"
                ) from None
            offset += len(raw)
            if line.strip():
                yield parse_json_row(f"{path}:{number}", line)


def json_array_rows(path: Path) -> Iterator[Row]:
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise TunelineError(f"{path}:{error.lineno}: not valid JSON ({error.msg}); expected an array of rows") from None
    if not isinstance(items, list):
        raise TunelineError(f"{path}: expected a JSON array of rows (or use .jsonl, one row per line)")
    for number, item in enumerate(items, start=1):
        ref = f"{path}: item {number}"
        yield Row(ref, item) if isinstance(item, dict) else Row(ref, None, "not an object")


def parse_json_row(ref: str, line: str) -> Row:
    try:
        fields = json.loads(line)
    except json.JSONDecodeError as error:
        return Row(ref, None, f"malformed JSON ({error.msg} at column {error.colno})")
    return Row(ref, fields) if isinstance(fields, dict) else Row(ref, None, "not a JSON object")


def read_table_file(path: Path, as_text: bool) -> pd.DataFrame:
    """A CSV or parquet file. CSV cells of text formats stay text as written ("4", "0.50", "None", "NA");
    tabular CSVs are parsed as numbers, empty cells becoming missing values."""
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, dtype=str, keep_default_na=False) if as_text else pd.read_csv(path)
    except Exception as error:  # pandas and pyarrow raise many types for unreadable files
        raise TunelineError(f"{path}: not a readable {path.suffix[1:]} file ({' '.join(str(error).split())})") from None


def table_rows(name: str, table: pd.DataFrame) -> Iterator[Row]:
    for number, fields in enumerate(table.to_dict("records"), start=1):
        yield Row(f"{name}: row {number}", {key: None if is_missing(value) else value for key, value in fields.items()})


def is_missing(value: object) -> bool:
    return isinstance(value, float) and np.isnan(value)


def read_sklearn_rows(index: int, name: str) -> tuple[list[Row], dict[str, str]]:
    """A table that scikit-learn ships, e.g. sklearn:breast_cancer; its bundled CSV is the input file."""
    import sklearn.datasets

    loaders = {"breast_cancer": sklearn.datasets.load_breast_cancer}
    if name not in loaders:
        raise TunelineError(f"{source_key(index)}.path: unknown sklearn table '{name}'; known: {', '.join(loaders)}")
    bunch = loaders[name](as_frame=True)
    csv_path = Path(sklearn.datasets.__file__).parent / "data" / bunch.filename
    return list(table_rows(f"sklearn:{name}", bunch.frame)), {
        f"sklearn/datasets/data/{bunch.filename}": sha256_file(csv_path)
    }


def read_hub_rows(index: int, source: Source) -> tuple[list[Row], dict[str, str]]:
    """A Hugging Face dataset at a pinned revision (hf://NAME@REVISION); HF_TOKEN from the environment."""
    from datasets import load_dataset

    name, _, revision = source.path.removeprefix("hf://").partition("@")
    if not revision:
        raise TunelineError(
            f"{source_key(index)}.path: pin a revision: hf://{name}@<commit or tag>, so a rerun reads the same data"
        )
    try:
        data = load_dataset(
            name, source.subset, split=source.split, revision=revision, token=os.environ.get("HF_TOKEN") or None
        )
    except Exception as error:  # the hub client raises many types (offline, 404, gated, bad split)
        raise TunelineError(
            f"{source_key(index)}: cannot load {source.path} "
            f"({type(error).__name__}: {' '.join(str(error).split())[:200]})"
        ) from None
    ref = f"{source.path}[{source.split}]"
    rows = [Row(f"{ref}: row {number}", dict(fields)) for number, fields in enumerate(data, start=1)]
    return rows, {ref: data._fingerprint}


def read_source(index: int, source: Source, data_dir: Path, seed: int) -> tuple[list[Row], dict[str, str]]:
    """All rows of one source (a seeded sample of `max_rows` of them) and the sha256 of its inputs."""
    if source.path.startswith("sklearn:"):
        rows, hashes = read_sklearn_rows(index, source.path.removeprefix("sklearn:"))
    elif source.path.startswith("hf://"):
        rows, hashes = read_hub_rows(index, source)
    else:
        files = resolve_files(index, source, data_dir)
        rows = [row for path in files for row in read_file_rows(index, source, path)]
        hashes = {str(path): sha256_file(path) for path in files}
    if source.max_rows is not None and len(rows) > source.max_rows:
        keep = sorted(random.Random(seed).sample(range(len(rows)), source.max_rows))
        rows = [rows[i] for i in keep]
    return rows, hashes


def check_table_columns(index: int, source: Source, path: Path, columns: list[str]) -> None:
    """A column a CSV or parquet file lacks fails the whole file at once, not row by row."""
    for needed in required_columns(source, columns):
        if needed not in columns:
            raise TunelineError(
                f"{path}: no column '{needed}' (columns: {', '.join(map(str, columns))}); "
                f"name yours in {source_key(index).removeprefix('params.yaml: ')}.columns"
            )


def required_columns(source: Source, columns: list[str]) -> list[str]:
    if isinstance(source, TabularSource):
        return [*source.features, source.label_column]
    if source.format == "mcq" and source.columns.get("choices", "choices") not in columns:
        return [source.columns.get(name, name) for name in ("question", "answer", *MCQ_KEYS)]
    needed = {
        "alpaca": ["instruction", "output"],
        "oasst": ["text"],
        "prompt_completion": ["prompt", "completion"],
        "mcq": ["question", "answer"],
        "messages": [],
    }[source.format]
    return [source.columns.get(name, name) for name in needed]


# ------------------------------------------------------------------------------ rows -> conversations


def column(row: dict, source: Source, name: str, required: bool = True) -> object:
    key = source.columns.get(name, name)
    value = row.get(key)
    if required and value is None:
        mapped = f" (mapped from '{name}')" if key != name else ""
        raise BadRow(f"no '{key}' field{mapped}")
    return value


def text_of(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise BadRow(f"'{name}' is {type(value).__name__}, expected text")
    return value


def alpaca_messages(row: dict, source: Source) -> list[dict]:
    user = {"role": "user", "content": text_of(column(row, source, "instruction"), "instruction")}
    extra = column(row, source, "input", required=False)
    if extra:
        user["input"] = text_of(extra, "input")
    return [user, {"role": "assistant", "content": text_of(column(row, source, "output"), "output")}]


ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
}


def chat_messages(row: dict, source: Source) -> list[dict]:
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
        if role not in ROLES:
            raise BadRow(f"turn {number}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        messages.append({"role": ROLES[role], "content": text_of(content, f"turn {number} content")})
    return messages


OASST_TURN = re.compile(r"###\s*(Human|Assistant)\s*:")


def oasst_messages(row: dict, source: Source) -> list[dict]:
    """Split "### Human: ... ### Assistant: ..." text into turns."""
    text = text_of(column(row, source, "text"), "text")
    parts = OASST_TURN.split(text)
    if parts[0].strip():
        raise BadRow("text before the first '### Human:' turn")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[speaker], "content": content.strip()} for speaker, content in zip(parts[1::2], parts[2::2])]


def prompt_completion_messages(row: dict, source: Source) -> list[dict]:
    return [
        {"role": "user", "content": text_of(column(row, source, "prompt"), "prompt")},
        {"role": "assistant", "content": text_of(column(row, source, "completion"), "completion")},
    ]


def mcq_messages(row: dict, source: McqSource) -> list[dict]:
    """Multiple-choice question generation: the user asks for a question (on the context, if any); the
    answer is the question itself, rendered "Question: … / A. … / B. … / C. … / D. … / Answer: X"."""
    question = text_of(column(row, source, "question"), "question")
    options = column(row, source, "choices", required=False)
    if options is None:
        options = [column(row, source, key) for key in MCQ_KEYS]
    if not isinstance(options, list | tuple | np.ndarray) or len(options) != len(MCQ_KEYS):
        raise BadRow(f"expected {len(MCQ_KEYS)} options, got {options!r}")
    answer = column(row, source, "answer")
    key = str(answer).strip().upper()
    if key in ("0", "1", "2", "3"):  # an index, as in MMLU-style data
        key = MCQ_KEYS[int(key)]
    if key not in MCQ_KEYS:
        raise BadRow(f"answer {answer!r} is not one of {', '.join(MCQ_KEYS)} (or 0-3)")
    context = column(row, source, "context", required=False)
    request = f"{source.instruction}\n\n{context}" if context else source.instruction
    lines = [f"Question: {question}", *(f"{letter}. {option}" for letter, option in zip(MCQ_KEYS, options))]
    return [
        {"role": "user", "content": request},
        {"role": "assistant", "content": "\n".join([*lines, f"Answer: {key}"])},
    ]


def label_key(value: object) -> str:
    """A label value as written in label_names: 0, 0.0 and "0" are all "0"."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def tabular_example(row: dict, source: TabularSource) -> tuple[list[dict], str, dict[str, str], dict]:
    """One table row as a question listing its features, answered by its label's name."""
    if any(row.get(name) is None for name in [*source.features, source.label_column]):
        return [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}], "", {}, {}  # dropped as empty
    features = {name: round(number(row[name], name), source.decimals) for name in source.features}
    measurements = ", ".join(f"{name} {value:.{source.decimals}f}" for name, value in features.items())
    label = source.label_names[label_key(row[source.label_column])]
    messages = [
        {"role": "user", "content": source.user_template.format(measurements=measurements)},
        {"role": "assistant", "content": label},
    ]
    return messages, label, {name: name for name in source.label_names.values()}, features


def number(value: object, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise BadRow(f"feature '{name}' is not a number: {value!r}") from None


def check_tabular_params(index: int, source: TabularSource, rows: list[Row]) -> None:
    if "{measurements}" not in source.user_template:
        raise TunelineError(f"{source_key(index)}.user_template: must contain {{measurements}}")
    values = {
        label_key(row.fields[source.label_column])
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
        messages, label, choices, features = tabular_example(row.fields, source)
    else:
        readers: dict[str, Callable[[dict, Source], list[dict]]] = {
            "alpaca": alpaca_messages,
            "messages": chat_messages,
            "oasst": oasst_messages,
            "prompt_completion": prompt_completion_messages,
            "mcq": mcq_messages,
        }
        messages = readers[source.format](row.fields, source)
    messages, trailing = check_turn_order(messages)
    system = source.system_prompt if source.system_prompt is not None else system_prompt
    if messages[0]["role"] != "system" and system:
        messages = [{"role": "system", "content": system}, *messages]
    kind = KINDS.get(source.format, "free_text")
    return Example(index, row.ref, kind, messages, label or None, choices, features, trailing)


def check_turn_order(messages: list[dict]) -> tuple[list[dict], int]:
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


# -------------------------------------------------------------------------------------------- cleaning


def normalise_text(text: str) -> str:
    """Unicode NFC, \\n line ends, no trailing blanks on a line or around the text. Inner spacing stays
    (indentation matters in code)."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def normalise(example: Example) -> Example:
    messages = [
        {**message, **{key: normalise_text(message[key]) for key in ("content", "input") if key in message}}
        for message in example.messages
    ]
    return replace(example, messages=messages)


def is_empty(example: Example) -> bool:
    return any(not message["content"] for message in example.messages)


def exact_key(example: Example) -> str:
    return json.dumps(example.messages, sort_keys=True, ensure_ascii=False)


def near_key(example: Example) -> str:
    """The conversation lowercased, punctuation and spacing removed, hashed: near-identical rows collide."""
    text = "\x00".join(f"{m['role']}:{m['content']}:{m.get('input', '')}" for m in example.messages)
    return hashlib.sha256(" ".join(re.sub(r"[\W_]+", " ", text.lower()).split()).encode()).hexdigest()


def drop_duplicates(examples: list[Example], key: Callable[[Example], str]) -> tuple[list[Example], list[Example]]:
    """Keep the first example of each key; return (kept, dropped)."""
    seen: set[str] = set()
    kept, dropped = [], []
    for example in examples:
        (dropped if key(example) in seen else kept).append(example)
        seen.add(key(example))
    return kept, dropped


# ------------------------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # character ranges of the answers, each closed by its end token
    bos: str | None  # the token the text must start with, once


def plain_messages(messages: list[dict]) -> list[dict]:
    """Alpaca's optional input joined to its instruction, for templates without an Input section."""
    return [
        {"role": m["role"], "content": m["content"] + (f"\n\n{m['input']}" if m.get("input") else "")} for m in messages
    ]


def default_bos(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The BOS the tokenizer puts before plain text, if it does: the model was pretrained with it."""
    if tokenizer.bos_token_id is None:
        return None
    return tokenizer.bos_token if tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id] else None


def render_segments(segments: list[tuple[str, bool]], bos: str | None) -> Rendered:
    """Join (text, trained) segments; the trained ones become the answer spans."""
    text, spans = bos or "", []
    for piece, trained in segments:
        if trained:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    return Rendered(text, spans, bos)


def render_llama2(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> Rendered:
    """<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] {user} [/INST] ..."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    turns = [m for m in plain_messages(messages) if m["role"] != "system"]
    segments = []
    for number, message in enumerate(turns):
        if message["role"] == "user":
            content = (
                f"<<SYS>>\n{system}\n<</SYS>>\n\n{message['content']}" if number == 0 and system else message["content"]
            )
            segments.append((("" if number == 0 else tokenizer.bos_token) + f"[INST] {content} [/INST]", False))
        else:
            segments.append((f" {message['content']} {tokenizer.eos_token}", True))
    return render_segments(segments, tokenizer.bos_token)


def render_llama3(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> Rendered:
    """<|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>..."""

    def header(role: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    segments = []
    for message in plain_messages(messages):
        if message["role"] == "assistant":
            segments.append((message["content"] + "<|eot_id|>", True))
        else:
            after = header("assistant") if message["role"] == "user" else ""
            segments.append((header(message["role"]) + message["content"] + "<|eot_id|>" + after, False))
    return render_segments(segments, "<|begin_of_text|>")


def render_chatml(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> Rendered:
    """<|im_start|>{role}\\n{content}<|im_end|>\\n ...; the newline after an answer is not trained."""
    segments = []
    for message in plain_messages(messages):
        if message["role"] == "assistant":
            segments += [(message["content"] + "<|im_end|>", True), ("\n", False)]
        else:
            after = "<|im_start|>assistant\n" if message["role"] == "user" else ""
            segments.append((f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n{after}", False))
    return render_segments(segments[:-1], default_bos(tokenizer))


def render_alpaca(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> Rendered:
    """{preamble}\\n\\n### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n{answer}</s>"""
    system = messages[0]["content"] if messages[0]["role"] == "system" else ALPACA_PREAMBLE
    segments = [(f"{system}\n\n", False)]
    for message in messages:
        if message["role"] == "user":
            extra = f"\n\n### Input:\n{message['input']}" if message.get("input") else ""
            segments.append((f"### Instruction:\n{message['content']}{extra}\n\n### Response:\n", False))
        elif message["role"] == "assistant":
            segments += [(message["content"] + tokenizer.eos_token, True), ("\n\n", False)]
    return render_segments(segments[:-1], default_bos(tokenizer))


def render_tokenizer_template(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> Rendered:
    """The model's own chat template. Each answer's span is what rendering the conversation up to that
    answer adds to rendering it up to the assistant header before it, without the blank after its end."""
    messages = plain_messages(messages)

    def render(turns: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    text = render(messages, False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt, upto = render(messages[:index], True), render(messages[: index + 1], False)
            if not (upto.startswith(prompt) and text.startswith(upto)):
                raise TunelineError(
                    "params.yaml: dataset.template: the tokenizer's chat template renders earlier turns differently "
                    "once later turns are added, so answers cannot be located; choose a named template"
                )
            spans.append((len(prompt), len(upto.rstrip())))
    text = text[: spans[-1][1]]  # generation stops at the last answer's end token; what follows is not data
    bos = default_bos(tokenizer)
    if bos and not text.startswith(bos):
        text, spans = bos + text, [(start + len(bos), end + len(bos)) for start, end in spans]
    elif tokenizer.bos_token and text.startswith(tokenizer.bos_token):
        bos = tokenizer.bos_token
    return Rendered(text, spans, bos)


TEMPLATES: dict[str, Callable[[list[dict], PreTrainedTokenizerBase], Rendered]] = {
    "tokenizer": render_tokenizer_template,
    "llama2": render_llama2,
    "llama3": render_llama3,
    "chatml": render_chatml,
    "alpaca": render_alpaca,
}
# Tokens a template writes that must be single tokens of the tokenizer.
TEMPLATE_TOKENS = {
    "llama2": lambda tokenizer: [tokenizer.bos_token, tokenizer.eos_token],
    "llama3": lambda tokenizer: ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "chatml": lambda tokenizer: ["<|im_start|>", "<|im_end|>"],
    "alpaca": lambda tokenizer: [tokenizer.eos_token],
    "tokenizer": lambda tokenizer: [],
}


def check_template_tokens(template: str, tokenizer: PreTrainedTokenizerBase, tokenizer_dir: Path) -> None:
    if template == "tokenizer" and not tokenizer.chat_template:
        raise TunelineError(
            f"params.yaml: dataset.template: the tokenizer in {tokenizer_dir} has no chat template; "
            f"choose a named one (llama2, llama3, chatml, alpaca)"
        )
    vocab = tokenizer.get_vocab()
    for token in TEMPLATE_TOKENS[template](tokenizer):
        if token is None or token not in vocab:
            raise TunelineError(
                f"params.yaml: dataset.template: '{template}' needs the token {token or '(BOS/EOS)'}, "
                f"which the tokenizer "
                f"in {tokenizer_dir} does not have; choose the template the model was trained with (or 'tokenizer')"
            )


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


# ---------------------------------------------------------------------------------------- tokenizing


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
    runs = trained_runs(encoded.labels)
    if not runs:
        raise TunelineError(f"{where}: no token carries a loss; the answer spans are empty")
    for start, end in runs:
        if ids[end - 1] not in ends:
            raise TunelineError(
                f"{where}: an answer is not closed by EOS or an end-of-turn token (it ends with "
                f"{tokenizer.convert_ids_to_tokens(ids[end - 1])!r}); the model would never learn to stop; "
                f"use a template that closes answers"
            )


def trained_runs(labels: list[int]) -> list[tuple[int, int]]:
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
    example: Example, render: Callable[[list[dict]], Rendered], tokenizer, train_on: str, max_length: int
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


def choice_ids(encoded: Encoded, render: Callable[[list[dict]], Rendered], tokenizer) -> dict[str, list[int]]:
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


# ------------------------------------------------------------------------------ balance, split, weights


def balance_labels(examples: list[Encoded], seed: int) -> tuple[list[Encoded], list[Encoded]]:
    """Within each source, downsample every label to the count of its rarest one; return (kept, dropped)."""
    rng = random.Random(seed)
    groups: dict[int, dict[str, list[int]]] = {}
    for position, encoded in enumerate(examples):
        if encoded.example.label is not None:
            groups.setdefault(encoded.example.source, {}).setdefault(encoded.example.label, []).append(position)
    dropped: set[int] = set()
    for source in sorted(groups):
        smallest = min(map(len, groups[source].values()))
        for label in sorted(groups[source]):
            members = groups[source][label]
            dropped.update(rng.sample(members, len(members) - smallest))
    return partition_positions(examples, dropped)


def partition_positions(examples: list[Encoded], positions: set[int]) -> tuple[list[Encoded], list[Encoded]]:
    """(the examples not at `positions`, those at them), each in the original order."""
    return (
        [e for i, e in enumerate(examples) if i not in positions],
        [e for i, e in enumerate(examples) if i in positions],
    )


def stratified_split(examples: list[Encoded], eval_fraction: float, seed: int) -> tuple[list[Encoded], list[Encoded]]:
    """Split each (source, label) group by itself, so both splits keep the mix; original order kept.

    The eval split gets round(total * eval_fraction) examples, shared out by largest remainder (rounding
    each small group alone could put every example, or none, into eval)."""
    rng = random.Random(seed)
    groups: dict[tuple[int, str | None], list[int]] = {}
    for position, encoded in enumerate(examples):
        groups.setdefault((encoded.example.source, encoded.example.label), []).append(position)
    keys = sorted(groups, key=str)
    shares = {key: len(groups[key]) * eval_fraction for key in keys}
    sizes = {key: int(share) for key, share in shares.items()}
    remainder = round(len(examples) * eval_fraction) - sum(sizes.values())
    ties = {key: rng.random() for key in keys}
    for key in sorted(keys, key=lambda key: (sizes[key] - shares[key], ties[key]))[:remainder]:
        sizes[key] += 1
    eval_positions: set[int] = set()
    for key in keys:
        eval_positions.update(rng.sample(groups[key], sizes[key]))
    train, evaluation = partition_positions(examples, eval_positions)
    if not train or not evaluation:
        raise TunelineError(
            f"dataset: {len(examples)} example(s) left after cleaning, too few to split with "
            f"eval_fraction {eval_fraction}; add data or change dataset.eval_fraction"
        )
    return train, evaluation


def apply_weights(train: list[Encoded], sources: list[Source], seed: int) -> list[Encoded]:
    """Scale each source's share of the train split by its weight: repeat whole copies, then sample."""
    rng = random.Random(seed)
    weighted = []
    for index, source in enumerate(sources):
        members = [encoded for encoded in train if encoded.example.source == index]
        target = round(len(members) * source.weight)
        copies, rest = divmod(target, len(members)) if members else (0, 0)
        weighted += members * copies + [members[i] for i in sorted(rng.sample(range(len(members)), rest))]
    return weighted


# --------------------------------------------------------------------------------------------- building


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
    check_template_tokens(params.template, tokenizer, tokenizer_dir)
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
    examples = count_dropped(counts, "empty", *partition(normalised, lambda example: not is_empty(example)))
    examples = count_dropped(counts, "duplicates", *drop_duplicates(examples, exact_key))
    examples = count_dropped(counts, "near_duplicates", *drop_duplicates(examples, near_key))

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
        encoded_examples = count_dropped(
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


def partition(examples: list, keep: Callable) -> tuple[list, list]:
    return [e for e in examples if keep(e)], [e for e in examples if not keep(e)]


def count_dropped(
    counts: dict[str, Counter], step: str, kept: list, dropped: list, source_of: Callable = lambda e: e.source
) -> list:
    counts[step].update(source_of(item) for item in dropped)
    return kept


# ---------------------------------------------------------------------------------------------- output


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


def split_table(examples: list[Encoded]) -> pd.DataFrame:
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


def length_histogram(lengths: list[int], bins: int = 20) -> list[dict]:
    counts, edges = np.histogram(lengths, bins=min(bins, max(1, len(set(lengths)))))
    return [
        {"tokens": f"{int(edges[i])}-{int(edges[i + 1])}", "examples": int(count)} for i, count in enumerate(counts)
    ]


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase, tokenizer_dir: Path, pad_changed_from: str | None) -> dict:
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


def make_card(built: Built, params: DatasetParams, tokenizer, tokenizer_dir: Path, out_dir: Path) -> dict:
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
        "bad_rows": built.bad_rows[:BAD_ROWS_LISTED],
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
        "tokenizer": tokenizer_identity(tokenizer, tokenizer_dir, built.pad_changed_from),
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


def card_markdown(card: dict) -> str:
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


def write_outputs(built: Built, params: DatasetParams, tokenizer, tokenizer_dir: Path, out: Path) -> dict:
    tokenizer.save_pretrained(out / "tokenizer")
    for name, examples in (("train", built.train), ("eval", built.evaluation)):
        split_table(examples).to_parquet(out / f"{name}.parquet", index=False)
        (out / f"{name}.jsonl").write_text(
            "".join(
                json.dumps({"ref": e.example.ref, "label": e.example.label, "text": e.text}, ensure_ascii=False) + "\n"
                for e in examples
            )
        )
    write_json(out / "token_lengths.json", length_histogram([len(e.input_ids) for e in built.train + built.evaluation]))
    card = make_card(built, params, tokenizer, tokenizer_dir, out)
    write_json(out / "dataset_card.json", card)
    (out / "dataset_card.md").write_text(card_markdown(card))
    write_json(out / LINEAGE_FILE, dataset_lineage(card, params))
    return card


def dataset_lineage(card: dict, params: DatasetParams) -> dict:
    """The card's facts that identify the data (no examples, no display): a change here is a data change."""
    return {
        "inputs": card["sha256"]["inputs"],
        "splits": {name: card["sha256"]["outputs"][name] for name in ("train.parquet", "eval.parquet")},
        "counts": card["steps"],
        "params": params.model_dump(mode="json"),
    }


# ---------------------------------------------------------------------------------------------- preview


def preview(*, params: DatasetParams, data_dir: Path, tokenizer_dir: Path, count: int) -> str:
    """The first `count` rows of every source, rendered and tokenized, trained tokens inside ⟦ ⟧."""
    tokenizer = load_dataset_tokenizer(tokenizer_dir)
    check_template_tokens(params.template, tokenizer, tokenizer_dir)
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


def load_dataset_tokenizer(tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    if not (tokenizer_dir / "tokenizer_config.json").exists():
        raise TunelineError(f"{tokenizer_dir}: no tokenizer there; run `dvc repro convert` first (or pass --tokenizer)")
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@exit_on_error
def main() -> None:
    if len(sys.argv) != 4:
        sys.exit("usage: python -m stages.dataset DATA_DIR TOKENIZER_DIR OUT_DIR")
    params: DatasetParams = load_section("dataset")
    data_dir, tokenizer_dir, out_dir = map(Path, sys.argv[1:])
    tokenizer = load_dataset_tokenizer(tokenizer_dir)
    built = build_dataset(params=params, data_dir=data_dir, tokenizer=tokenizer, tokenizer_dir=tokenizer_dir)
    with atomic_dir(out_dir) as tmp:
        card = write_outputs(built, params, tokenizer, tokenizer_dir, tmp)
    steps = card["steps"]
    print(
        f"dataset: {steps['read']} rows read, {steps['train']} train / {steps['eval']} eval "
        f"({steps['train_after_weights']} train after weights); dropped: "
        + ", ".join(
            f"{count} {step}"
            for step, count in steps.items()
            if count and step not in ("read", "train", "eval", "train_after_weights", "normalised")
        )
    )


if __name__ == "__main__":
    main()
