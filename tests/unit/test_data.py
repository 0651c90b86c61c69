"""tuneline/data/: the dataset stage's formats, templates, checks, cleaning, bad input and outputs.

Every test writes its own input files under a tmp data folder and uses tokenizers only (no model weights).
Most tests use a tiny WORD-LEVEL tokenizer, so that a token is a word, a punctuation run, a special token or
a newline, and the expected tokens and loss mask can be written out by hand, position by position, with
`view`: tokens joined by spaces, newlines shown as ↵, each run of trained positions inside ⟦ ⟧, e.g.

    "<s> [INST] hi [/INST] ⟦hello </s>⟧"

"[INST]", "[/INST]", "<<SYS>>" and "<</SYS>>" are single (non-special) tokens of that tokenizer, to keep the
views short. The byte-level BPE tokenizer of conftest (ChatML chat template) checks the `tokenizer` template
on a real-world kind of tokenizer.
"""

import hashlib
import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from conftest import CHATML_TEMPLATE, build_tiny_tokenizer, run_stage
from tuneline.data import STEPS, Built, build_dataset, write_outputs
from tuneline.data.build import summary_line
from tuneline.data.card import pick_examples
from tuneline.data.cleaning import stratified_split
from tuneline.data.formats import Example, row_to_example
from tuneline.data.rows import Row
from tuneline.data.templates import ALPACA_PREAMBLE, TEMPLATES, check_template_tokens, template_mismatch
from tuneline.data.tokens import Encoded, check_encoded, choose_pad_token, encode
from tuneline.errors import TunelineError
from tuneline.modeling import end_token_ids
from tuneline.params import DatasetParams, McqSource, validate_section

# -------------------------------------------------------------------------------------- the fixtures' data

ALPACA_ITEMS = [  # alpaca.json (a JSON array): no input, an input, an empty input
    {"instruction": "name a colour", "output": "red"},
    {"instruction": "add the numbers", "input": "two and three", "output": "five"},
    {"instruction": "say hi", "input": "", "output": "hi"},
]
ALPACA_LINES = [  # alpaca.jsonl
    {"instruction": "say bye", "output": "bye"},
    {"instruction": "say yes", "output": "yes"},
]
SYSTEM, USER_1, ANSWER_1, USER_2, ANSWER_2 = "be brief", "hi", "hello", "how are you", "fine thanks"
CONVERSATION = [  # two answers and a system turn: the conversation every template renders
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": USER_1},
    {"role": "assistant", "content": ANSWER_1},
    {"role": "user", "content": USER_2},
    {"role": "assistant", "content": ANSWER_2},
]
OPENAI_CHATS = [
    {"messages": CONVERSATION},
    {"messages": [{"role": "user", "content": "say no"}, {"role": "assistant", "content": "no"}]},
]
SHAREGPT_CHATS = [
    {"conversations": [{"from": "system", "value": "be kind"}, {"from": "human", "value": "what is up"},
                       {"from": "gpt", "value": "the sky"}]},
    {"conversations": [{"from": "human", "value": "name a colour"}, {"from": "gpt", "value": "blue"}]},
]
OASST_ROWS = [  # the first ends with an unanswered Human turn
    {"text": "### Human: hi ### Assistant: hello ### Human: how are you ### Assistant: fine thanks ### Human: bye"},
    {"text": "### Human: say hi ### Assistant: hi"},
]
PROMPT_COMPLETION_ROWS = [
    {"prompt": "capital of france", "completion": "paris"},
    {"prompt": "capital of spain", "completion": "madrid"},
]
MCQ_CSV_ROWS = [  # the question column is called "stem" (mapped in params); two per answer, so each is in eval once
    {"stem": "what falls from clouds", "A": "snow", "B": "sand", "C": "salt", "D": "sun", "answer": "A", "context": "it is cold"},
    {"stem": "what is frozen water", "A": "ice", "B": "fire", "C": "sand", "D": "salt", "answer": "A", "context": None},
    {"stem": "what is hot", "A": "ice", "B": "fire", "C": "snow", "D": "rain", "answer": "B", "context": None},
    {"stem": "what is dry", "A": "rain", "B": "sand", "C": "snow", "D": "ice", "answer": "B", "context": None},
]
MCQ_PARQUET_ROWS = [
    {"question": "which is a fruit", "choices": ["stone", "chair", "apple", "cloud"], "answer": 2},
    {"question": "which is a colour", "choices": ["stone", "chair", "blue", "cloud"], "answer": 2},
]
MCQ_INSTRUCTION = McqSource.model_fields["instruction"].default
VIEW_MCQ_INSTRUCTION = "Write a multiple - choice question with four options ( A - D ) and the answer key ."
TABULAR_SOURCE = {
    "format": "tabular", "label_column": "target", "label_names": {"0": "malignant", "1": "benign"},
    "features": ["radius", "texture"], "decimals": 1,
    "user_template": "Measurements: {measurements}. Is it malignant or benign?",
}
LONG_QUESTION = "tell me a very long story about a dragon who lived in a cave under the old mountain near the sea"
CLEANING_CHATS = [  # (user, assistant) pairs; the comment says what each cleaning step does to it
    [("order a cafe\u0301", "one cafe\u0301 please")],  # normalised: NFC (the kept text says "café")
    [("greet me  \r\nnow  ", "hello there  ")],  # normalised: CRLF and trailing blanks
    [("say nothing", "")],  # empty
    [("name a fruit", "apple")],
    [("name a fruit", "apple")],  # exact duplicate
    [("Name a  fruit!", "Apple.")],  # near duplicate: case, punctuation and spacing
    [(LONG_QUESTION, "no")],  # too long even for its only answer
    [(USER_1, ANSWER_1), (LONG_QUESTION, "no")],  # too long: cut back to its first answer
    [("name a colour", "blue")],
]
NFC_WORDS = ["caf\u00e9"]  # what normalisation makes of "cafe\u0301"
# Words the templates and renderers write around the data.
TEMPLATE_TEXTS = [
    ALPACA_PREAMBLE, "### Instruction: ### Input: ### Response:", "system user assistant",
    "Question: Answer: A. B. C. D.", MCQ_INSTRUCTION, TABULAR_SOURCE["user_template"], *TABULAR_SOURCE["label_names"].values(),
    "radius 1.0, texture 2.0",
]
OTHER_TEXTS = ["default helper", "say default"]  # a system prompt, and words of rows some tests generate ("say 3")

# ------------------------------------------------------------------------------------- word-level tokenizer

SPECIALS = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<|pad|>")
SINGLE_TOKENS = ("\n", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")  # plain added tokens, split out before words
PRE_TOKENIZER = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="contiguous")])
# A chat template for `template: tokenizer` on the word-level tokenizer: "role: content", answers closed by EOS.
WORD_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def strings_in(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [text for item in value for text in strings_in(item)] if isinstance(value, list | tuple) else []


@pytest.fixture(scope="module")
def words() -> list[str]:
    """Every word the fixtures and templates write (and the numbers 0-99), as the pre-tokenizer splits them."""
    texts = strings_in([ALPACA_ITEMS, ALPACA_LINES, CONVERSATION, OPENAI_CHATS, SHAREGPT_CHATS, OASST_ROWS,
                        PROMPT_COMPLETION_ROWS, MCQ_CSV_ROWS, MCQ_PARQUET_ROWS, CLEANING_CHATS, NFC_WORDS, TEMPLATE_TEXTS,
                        OTHER_TEXTS])
    found = {str(number) for number in range(100)}
    for text in texts:
        for token in (*SPECIALS, *SINGLE_TOKENS):
            text = text.replace(token, " ")
        found.update(word for word, _ in PRE_TOKENIZER.pre_tokenize_str(text))
    return sorted(found)


def word_tokenizer(words: list[str], *, specials=SPECIALS, bos="<s>", eos="</s>", unk="<unk>", pad="<|pad|>",
                   chat_template=None) -> PreTrainedTokenizerFast:
    vocab = {token: number for number, token in enumerate([*specials, *SINGLE_TOKENS, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = PRE_TOKENIZER
    backend.add_special_tokens(list(specials))
    backend.add_tokens([AddedToken(token, normalized=False) for token in SINGLE_TOKENS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk,
                                        pad_token=pad, chat_template=chat_template)
    text = "<s>[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nhi, there [/INST] hello </s>"
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    pieces = [text[start:end] for start, end in encoding["offset_mapping"]]
    assert pieces == tokenizer.convert_ids_to_tokens(encoding["input_ids"]), "offsets must point at each token's text"
    return tokenizer


@pytest.fixture
def make_tokenizer(words):
    """A fresh word-level tokenizer each call (the stage sets the pad token on the one it is given)."""
    return lambda **options: word_tokenizer(words, **options)


@pytest.fixture
def tokenizer(make_tokenizer) -> PreTrainedTokenizerFast:
    return make_tokenizer()


def view(encoded: Encoded, tokenizer) -> str:
    """The tokens joined by spaces, newlines as ↵, each run of trained positions inside ⟦ ⟧. Also checks that
    a trained position's label is the token itself (the model shifts labels internally)."""
    assert len(encoded.labels) == len(encoded.input_ids)
    shown, was_trained = [], False
    for token_id, label in zip(encoded.input_ids, encoded.labels):
        assert label in (-100, token_id), f"label {label} at token {token_id}"
        token = tokenizer.convert_ids_to_tokens(token_id).replace("\n", "↵")
        trained = label != -100
        if trained and not was_trained:
            token = "⟦" + token
        if was_trained and not trained:
            shown[-1] += "⟧"
        shown.append(token)
        was_trained = trained
    return " ".join(shown) + ("⟧" if was_trained else "")


def trained_texts(encoded: Encoded, tokenizer) -> list[str]:
    """Each run of trained tokens, decoded."""
    runs, current = [], []
    for token_id, label in [*zip(encoded.input_ids, encoded.labels), (None, -100)]:
        if label != -100:
            current.append(token_id)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


# --------------------------------------------------------------------------------------- params and files


def raw_params(sources: list[dict], **overrides) -> dict:
    """The `dataset` section of params.yaml: llama2, no system prompt, half the examples to eval."""
    return {"sources": sources, "template": "llama2", "system_prompt": "", "train_on": "all_turns", "max_length": 512,
            "balance": False, "eval_fraction": 0.5, "seed": 0, "on_bad_row": "error", **overrides}


def dataset_params(sources: list[dict], **overrides) -> DatasetParams:
    return validate_section("dataset", raw_params(sources, **overrides))


def write_params_file(path: Path, sources: list[dict], **overrides) -> Path:
    path.write_text(yaml.safe_dump({"dataset": raw_params(sources, **overrides)}))
    return path


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Rows as JSONL, a JSON array, CSV or parquet, after the file's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def chats(pairs_per_row: list[list[tuple[str, str]]]) -> list[dict]:
    """messages rows from lists of (user, assistant) pairs."""
    return [{"messages": [{"role": role, "content": text} for pair in pairs for role, text in zip(("user", "assistant"), pair)]}
            for pairs in pairs_per_row]


def tabular_rows(labels: list[int]) -> list[dict]:
    """One row per label, with distinct features (so none is a duplicate)."""
    return [{"radius": 10 + number, "texture": 60 + number / 10, "target": label} for number, label in enumerate(labels)]


@pytest.fixture
def data_dir(tmp_path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


def build(data_dir: Path, tokenizer, sources: list[dict], **overrides) -> Built:
    return build_dataset(params=dataset_params(sources, **overrides), data_dir=data_dir, tokenizer=tokenizer,
                         tokenizer_dir=data_dir.parent / "tokenizer")


def by_ref(built: Built, data_dir: Path) -> dict[str, Encoded]:
    """Every kept example (train and eval) by its ref, the data folder left out: "alpaca.json: item 2"."""
    return {encoded.example.ref.removeprefix(f"{data_dir}/"): encoded for encoded in built.train + built.evaluation}


def encode_messages(template: str, messages: list[dict], tokenizer, train_on: str = "all_turns") -> Encoded:
    """Render, tokenize and check one conversation, as the stage does for every example."""
    rendered = TEMPLATES[template](messages, tokenizer)
    encoded = encode(Example(0, "conversation", "free_text", messages), rendered, tokenizer, train_on)
    check_encoded(encoded, rendered, tokenizer, end_token_ids(tokenizer), template)
    return encoded


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(TunelineError) as error:
        call(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------ formats


class TestFormats:
    """Each format read from a file the test writes, turned into a conversation and rendered with llama2."""

    def test_alpaca_json_array_with_and_without_input(self, data_dir, tokenizer):
        write_rows(data_dir / "alpaca.json", ALPACA_ITEMS)
        examples = by_ref(build(data_dir, tokenizer, [{"path": "alpaca.json", "format": "alpaca"}]), data_dir)
        assert examples["alpaca.json: item 1"].example.messages == [
            {"role": "user", "content": "name a colour"}, {"role": "assistant", "content": "red"}]
        assert examples["alpaca.json: item 2"].example.messages == [
            {"role": "user", "content": "add the numbers", "input": "two and three"}, {"role": "assistant", "content": "five"}]
        assert "input" not in examples["alpaca.json: item 3"].example.messages[0]  # an empty input is no input
        assert view(examples["alpaca.json: item 1"], tokenizer) == "<s> [INST] name a colour [/INST] ⟦red </s>⟧"
        assert view(examples["alpaca.json: item 2"], tokenizer) == (
            "<s> [INST] add the numbers ↵ ↵ two and three [/INST] ⟦five </s>⟧")

    def test_alpaca_jsonl_with_the_params_system_prompt(self, data_dir, tokenizer):
        write_rows(data_dir / "alpaca.jsonl", ALPACA_LINES)
        built = build(data_dir, tokenizer, [{"path": "alpaca.jsonl", "format": "alpaca"}], system_prompt=SYSTEM)
        examples = by_ref(built, data_dir)
        assert set(examples) == {"alpaca.jsonl:1", "alpaca.jsonl:2"}
        assert view(examples["alpaca.jsonl:1"], tokenizer) == (
            "<s> [INST] <<SYS>> ↵ be brief ↵ <</SYS>> ↵ ↵ say bye [/INST] ⟦bye </s>⟧")

    def test_messages_openai_and_sharegpt_from_a_glob(self, data_dir, tokenizer):
        write_rows(data_dir / "chats" / "openai.jsonl", OPENAI_CHATS)
        write_rows(data_dir / "chats" / "sharegpt.jsonl", SHAREGPT_CHATS)
        sources = [{"path": "chats/*.jsonl", "format": "messages"}]
        examples = by_ref(build(data_dir, tokenizer, sources, system_prompt="default helper"), data_dir)
        assert examples["chats/openai.jsonl:1"].example.messages == CONVERSATION  # its own system turn wins
        assert view(examples["chats/openai.jsonl:1"], tokenizer) == (
            "<s> [INST] <<SYS>> ↵ be brief ↵ <</SYS>> ↵ ↵ hi [/INST] ⟦hello </s>⟧ "
            "<s> [INST] how are you [/INST] ⟦fine thanks </s>⟧")
        assert examples["chats/sharegpt.jsonl:1"].example.messages == [
            {"role": "system", "content": "be kind"}, {"role": "user", "content": "what is up"},
            {"role": "assistant", "content": "the sky"}]
        assert view(examples["chats/sharegpt.jsonl:2"], tokenizer) == (
            "<s> [INST] <<SYS>> ↵ default helper ↵ <</SYS>> ↵ ↵ name a colour [/INST] ⟦blue </s>⟧")

    def test_oasst_multi_turn_and_trailing_human_turn_dropped(self, data_dir, tokenizer):
        write_rows(data_dir / "oasst.jsonl", OASST_ROWS)
        built = build(data_dir, tokenizer, [{"path": "oasst.jsonl", "format": "oasst"}])
        examples = by_ref(built, data_dir)
        assert examples["oasst.jsonl:1"].example.messages == CONVERSATION[1:]  # "bye" is gone
        assert built.counts["trailing_turns_dropped"] == Counter({0: 1})
        assert view(examples["oasst.jsonl:1"], tokenizer) == (
            "<s> [INST] hi [/INST] ⟦hello </s>⟧ <s> [INST] how are you [/INST] ⟦fine thanks </s>⟧")

    def test_clean_oasst_rows_are_not_counted_as_normalised(self, data_dir, tokenizer):
        write_rows(data_dir / "oasst.jsonl", OASST_ROWS)
        built = build(data_dir, tokenizer, [{"path": "oasst.jsonl", "format": "oasst"}])
        assert built.counts["normalised"][0] == 0

    def test_prompt_completion_csv(self, data_dir, tokenizer):
        write_rows(data_dir / "pc.csv", PROMPT_COMPLETION_ROWS)
        examples = by_ref(build(data_dir, tokenizer, [{"path": "pc.csv", "format": "prompt_completion"}]), data_dir)
        assert set(examples) == {"pc.csv: row 1", "pc.csv: row 2"}
        assert view(examples["pc.csv: row 2"], tokenizer) == "<s> [INST] capital of spain [/INST] ⟦madrid </s>⟧"

    def test_mcq_csv_with_context_and_mapped_question_column(self, data_dir, tokenizer):
        write_rows(data_dir / "mcq.csv", MCQ_CSV_ROWS)
        built = build(data_dir, tokenizer, [{"path": "mcq.csv", "format": "mcq", "columns": {"question": "stem"}}])
        first = by_ref(built, data_dir)["mcq.csv: row 1"]
        # question generation: the user asks (about the context), the answer is the whole question
        assert first.example.messages == [
            {"role": "user", "content": f"{MCQ_INSTRUCTION}\n\nit is cold"},
            {"role": "assistant", "content": "Question: what falls from clouds\nA. snow\nB. sand\nC. salt\nD. sun\nAnswer: A"}]
        assert (first.example.kind, first.example.label) == ("mcq", None)
        assert view(first, tokenizer) == (
            f"<s> [INST] {VIEW_MCQ_INSTRUCTION} ↵ ↵ it is cold [/INST] ⟦Question : what falls from clouds ↵ A . snow ↵ "
            "B . sand ↵ C . salt ↵ D . sun ↵ Answer : A </s>⟧")
        assert by_ref(built, data_dir)["mcq.csv: row 3"].example.messages[0]["content"] == MCQ_INSTRUCTION  # no context
        assert all(encoded.choice_ids == {} for encoded in built.train + built.evaluation)

    def test_mcq_parquet_with_a_choices_list_and_an_integer_answer(self, data_dir, tokenizer):
        write_rows(data_dir / "mcq.parquet", MCQ_PARQUET_ROWS)
        built = build(data_dir, tokenizer, [{"path": "mcq.parquet", "format": "mcq"}])
        first = by_ref(built, data_dir)["mcq.parquet: row 1"]
        assert first.example.messages[-1]["content"].endswith("\nC. apple\nD. cloud\nAnswer: C")
        assert view(first, tokenizer) == (
            f"<s> [INST] {VIEW_MCQ_INSTRUCTION} [/INST] ⟦Question : which is a fruit ↵ A . stone ↵ B . chair ↵ "
            "C . apple ↵ D . cloud ↵ Answer : C </s>⟧")

    def test_tabular_csv_with_label_names_and_decimals(self, data_dir, tokenizer):
        rows = [{"radius": 12.34, "texture": 5, "target": 0}, {"radius": 8.26, "texture": 7.5, "target": 1},
                {"radius": 13.71, "texture": 6, "target": 0}, {"radius": 9.02, "texture": 8, "target": 1}]
        write_rows(data_dir / "cells.csv", rows)
        built = build(data_dir, tokenizer, [{"path": "cells.csv", **TABULAR_SOURCE}])
        examples = by_ref(built, data_dir)
        first, second = examples["cells.csv: row 1"], examples["cells.csv: row 2"]
        assert (first.example.label, second.example.label) == ("malignant", "benign")
        assert first.example.features == {"radius": 12.3, "texture": 5.0}
        assert view(first, tokenizer) == (
            "<s> [INST] Measurements : radius 12 . 3 , texture 5 . 0 . Is it malignant or benign ? "
            "[/INST] ⟦malignant </s>⟧")
        for encoded in built.evaluation:
            assert {name: tokenizer.convert_ids_to_tokens(ids) for name, ids in encoded.choice_ids.items()} == {
                "malignant": ["malignant", "</s>"], "benign": ["benign", "</s>"]}

    def test_row_to_example_adds_the_sources_own_system_prompt(self):
        source = dataset_params([{"path": "x.jsonl", "format": "prompt_completion", "system_prompt": "be kind"}]).sources[0]
        example = row_to_example(0, source, Row("x.jsonl:1", {"prompt": "hi", "completion": "hello"}), "be brief")
        assert example.messages[0] == {"role": "system", "content": "be kind"}


# ---------------------------------------------------------------------------------------------- templates


class TestTemplates:
    """Every template on the same two-answer conversation with a system turn, position by position."""

    def test_llama2_multi_turn_with_system(self, tokenizer):
        encoded = encode_messages("llama2", CONVERSATION, tokenizer)
        assert view(encoded, tokenizer) == (
            "<s> [INST] <<SYS>> ↵ be brief ↵ <</SYS>> ↵ ↵ hi [/INST] ⟦hello </s>⟧ "
            "<s> [INST] how are you [/INST] ⟦fine thanks </s>⟧")
        assert encoded.text == (
            "<s>[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nhi [/INST] hello </s><s>[INST] how are you [/INST] fine thanks </s>")

    def test_llama3(self, tokenizer):
        encoded = encode_messages("llama3", CONVERSATION, tokenizer)
        assert view(encoded, tokenizer) == (
            "<|begin_of_text|> <|start_header_id|> system <|end_header_id|> ↵ ↵ be brief <|eot_id|> "
            "<|start_header_id|> user <|end_header_id|> ↵ ↵ hi <|eot_id|> "
            "<|start_header_id|> assistant <|end_header_id|> ↵ ↵ ⟦hello <|eot_id|>⟧ "
            "<|start_header_id|> user <|end_header_id|> ↵ ↵ how are you <|eot_id|> "
            "<|start_header_id|> assistant <|end_header_id|> ↵ ↵ ⟦fine thanks <|eot_id|>⟧")

    def test_chatml_newline_after_an_answer_is_not_trained(self, tokenizer):
        encoded = encode_messages("chatml", CONVERSATION, tokenizer)
        assert view(encoded, tokenizer) == (
            "<|im_start|> system ↵ be brief <|im_end|> ↵ <|im_start|> user ↵ hi <|im_end|> ↵ "
            "<|im_start|> assistant ↵ ⟦hello <|im_end|>⟧ ↵ <|im_start|> user ↵ how are you <|im_end|> ↵ "
            "<|im_start|> assistant ↵ ⟦fine thanks <|im_end|>⟧")

    def test_alpaca_with_and_without_input(self, tokenizer):
        preamble = "Below is an instruction that describes a task . Write a response that appropriately completes the request ."
        with_input = [{"role": "user", "content": "add the numbers", "input": "two and three"}, {"role": "assistant", "content": "five"}]
        assert view(encode_messages("alpaca", with_input, tokenizer), tokenizer) == (
            f"{preamble} ↵ ↵ ### Instruction : ↵ add the numbers ↵ ↵ ### Input : ↵ two and three ↵ ↵ "
            "### Response : ↵ ⟦five </s>⟧")
        without_input = [{"role": "user", "content": "name a colour"}, {"role": "assistant", "content": "red"}]
        assert view(encode_messages("alpaca", without_input, tokenizer), tokenizer) == (
            f"{preamble} ↵ ↵ ### Instruction : ↵ name a colour ↵ ↵ ### Response : ↵ ⟦red </s>⟧")

    def test_alpaca_system_prompt_replaces_the_preamble_and_turns_repeat(self, tokenizer):
        assert view(encode_messages("alpaca", CONVERSATION, tokenizer), tokenizer) == (
            "be brief ↵ ↵ ### Instruction : ↵ hi ↵ ↵ ### Response : ↵ ⟦hello </s>⟧ ↵ ↵ "
            "### Instruction : ↵ how are you ↵ ↵ ### Response : ↵ ⟦fine thanks </s>⟧")

    def test_tokenizer_chat_template_on_the_word_tokenizer(self, make_tokenizer):
        tokenizer = make_tokenizer(chat_template=WORD_CHAT_TEMPLATE)
        encoded = encode_messages("tokenizer", CONVERSATION, tokenizer)
        assert view(encoded, tokenizer) == (
            "<s> system : be brief ↵ user : hi ↵ assistant : ⟦hello </s>⟧ ↵ user : how are you ↵ "
            "assistant : ⟦fine thanks </s>⟧")  # the blank after the last answer is cut: it is not data

    def test_tokenizer_template_on_the_byte_level_bpe_chatml_tokenizer(self):
        tokenizer = build_tiny_tokenizer()
        encoded = encode_messages("tokenizer", CONVERSATION, tokenizer)
        assert trained_texts(encoded, tokenizer) == [f"{ANSWER_1}<|im_end|>", f"{ANSWER_2}<|im_end|>"]
        assert encoded.text == (
            f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{USER_1}<|im_end|>\n<|im_start|>assistant\n{ANSWER_1}<|im_end|>\n"
            f"<|im_start|>user\n{USER_2}<|im_end|>\n<|im_start|>assistant\n{ANSWER_2}<|im_end|>")

    def test_first_answer_token_merged_with_the_prompts_blank_is_trained(self):
        tokenizer = build_tiny_tokenizer()
        tokenizer.chat_template = WORD_CHAT_TEMPLATE.replace("assistant:", "assistant: ")
        messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "world"}]
        encoded = encode_messages("tokenizer", messages, tokenizer)
        assert [text.strip() for text in trained_texts(encoded, tokenizer)] == ["world<|im_end|>"]
        assert "wor" not in tokenizer.decode(encoded.input_ids[: encoded.prompt_length])

    def test_last_turn_trains_only_the_final_answer(self, tokenizer):
        encoded = encode_messages("chatml", CONVERSATION, tokenizer, train_on="last_turn")
        assert view(encoded, tokenizer) == (
            "<|im_start|> system ↵ be brief <|im_end|> ↵ <|im_start|> user ↵ hi <|im_end|> ↵ "
            "<|im_start|> assistant ↵ hello <|im_end|> ↵ <|im_start|> user ↵ how are you <|im_end|> ↵ "
            "<|im_start|> assistant ↵ ⟦fine thanks <|im_end|>⟧")

    def test_prompt_length_points_at_the_last_answer(self, tokenizer):
        encoded = encode_messages("llama2", CONVERSATION, tokenizer)
        tokens = tokenizer.convert_ids_to_tokens(encoded.input_ids)
        assert tokens[encoded.prompt_length:] == ["fine", "thanks", "</s>"]
        assert encoded.labels[encoded.prompt_length] == encoded.input_ids[encoded.prompt_length]
        assert encoded.labels[encoded.prompt_length - 1] == -100


# -------------------------------------------------------------------------------------------------- checks


class TestChecks:
    """What the stage refuses about a template or tokenizer, and how it fixes the pad token."""

    @pytest.fixture
    def chat(self, data_dir) -> list[dict]:
        write_rows(data_dir / "chat.jsonl", OPENAI_CHATS)
        return [{"path": "chat.jsonl", "format": "messages"}]

    def test_bos_twice_is_an_error_naming_the_row(self, data_dir, make_tokenizer, chat):
        tokenizer = make_tokenizer(chat_template="{{ bos_token }}" + WORD_CHAT_TEMPLATE)
        message = one_line_error(build, data_dir, tokenizer, chat, template="tokenizer")
        assert message.startswith(f"{data_dir}/chat.jsonl:1: template 'tokenizer'")
        assert "BOS twice" in message

    def test_answer_not_closed_by_eos_is_an_error(self, data_dir, make_tokenizer, chat):
        tokenizer = make_tokenizer(chat_template=WORD_CHAT_TEMPLATE.replace("{{ eos_token }}", ""))
        message = one_line_error(build, data_dir, tokenizer, chat, template="tokenizer")
        assert message.startswith(f"{data_dir}/chat.jsonl:1:")
        assert "not closed by EOS" in message and "'hello'" in message

    def test_pad_equal_to_eos_is_changed_without_growing_the_vocabulary(self, tmp_path, data_dir, make_tokenizer, chat):
        tokenizer = make_tokenizer(pad="</s>")
        size, vocabulary = len(tokenizer), tokenizer.get_vocab()
        built = build(data_dir, tokenizer, chat)
        assert built.pad_changed_from == "</s>"
        assert tokenizer.pad_token != tokenizer.eos_token and tokenizer.pad_token in vocabulary
        assert len(tokenizer) == size
        tokenizer.save_pretrained(tmp_path / "tokenizer")
        card = write_outputs(built, dataset_params(chat), tokenizer, tmp_path / "tokenizer", tmp_path / "out")
        assert card["tokenizer"]["pad_changed_from"] == "</s>"
        assert card["tokenizer"]["pad"] == tokenizer.pad_token
        assert AutoTokenizer.from_pretrained(tmp_path / "out" / "tokenizer").pad_token == tokenizer.pad_token

    def test_missing_pad_is_set(self, make_tokenizer):
        tokenizer = make_tokenizer(pad=None)
        assert choose_pad_token(tokenizer) == "none"
        assert tokenizer.pad_token not in (None, tokenizer.eos_token)

    def test_distinct_pad_is_kept(self, tokenizer):
        assert choose_pad_token(tokenizer) is None
        assert tokenizer.pad_token == "<|pad|>"

    def test_no_spare_token_to_pad_with_is_an_error(self, make_tokenizer):
        tokenizer = make_tokenizer(specials=("<s>", "</s>"), unk=None, pad="</s>")
        assert "no token to pad with other than EOS (</s>)" in one_line_error(choose_pad_token, tokenizer)

    def test_named_template_whose_tokens_the_tokenizer_lacks(self, tmp_path):
        message = one_line_error(check_template_tokens, "llama3", build_tiny_tokenizer(), tmp_path)
        assert "'llama3' needs the token <|begin_of_text|>" in message

    def test_template_tokenizer_without_a_chat_template(self, tmp_path, tokenizer):
        message = one_line_error(check_template_tokens, "tokenizer", tokenizer, tmp_path)
        assert message.startswith("params.yaml: dataset.template:") and "has no chat template" in message

    @pytest.mark.parametrize("template, chat_template, expected", [
        ("llama2", CHATML_TEMPLATE,
         "params.yaml: dataset.template: 'llama2' writes '[INST]', but the chat template of the tokenizer in "
         "models/tokenizer uses '<|im_start|>' (as chatml does), so the model would learn a format it was never "
         "trained on; set dataset.template: tokenizer (the model's own chat template) or chatml"),
        ("alpaca", WORD_CHAT_TEMPLATE,
         "params.yaml: dataset.template: 'alpaca' writes '### Instruction:', but the chat template of the tokenizer in "
         "models/tokenizer uses markers of its own, so the model would learn a format it was never trained on; "
         "set dataset.template: tokenizer (the model's own chat template)"),
    ], ids=["llama2 on a chatml tokenizer", "alpaca on a template of no named family"])
    def test_a_named_template_the_chat_template_does_not_use_is_warned_about(self, make_tokenizer, template,
                                                                             chat_template, expected):
        tokenizer = make_tokenizer(chat_template=chat_template)
        assert template_mismatch(template, tokenizer, Path("models/tokenizer")) == expected

    @pytest.mark.parametrize("template, chat_template", [
        ("chatml", CHATML_TEMPLATE), ("tokenizer", CHATML_TEMPLATE), ("llama2", None), ("chatml", None),
    ], ids=["the tokenizer's own family", "the tokenizer's own template", "a base tokenizer, llama2",
            "a base tokenizer, chatml"])
    def test_no_warning_for_the_models_own_format_or_a_tokenizer_without_one(self, make_tokenizer, template,
                                                                             chat_template):
        """A tokenizer without a chat template (a base model's) has no format a named template could contradict."""
        tokenizer = make_tokenizer(chat_template=chat_template)
        assert template_mismatch(template, tokenizer, Path("models/tokenizer")) is None


# ------------------------------------------------------------------------------------------------ cleaning


class TestCleaning:
    def test_each_step_removes_what_it_should_and_counts_it(self, data_dir, tokenizer):
        """CLEANING_CHATS has one row per step; max_length 16 fits one short turn (6-10 tokens), not LONG_QUESTION."""
        write_rows(data_dir / "clean.jsonl", chats(CLEANING_CHATS))
        built = build(data_dir, tokenizer, [{"path": "clean.jsonl", "format": "messages"}], max_length=16, eval_fraction=0.4)
        steps = {step: sum(built.counts[step].values()) for step in STEPS}
        assert steps == {"read": 9, "bad_rows": 0, "trailing_turns_dropped": 0, "normalised": 2, "empty": 1,
                         "duplicates": 1, "near_duplicates": 1, "truncated_to_whole_turns": 1, "too_long": 1,
                         "balanced_away": 0, "train": 3, "eval": 2, "train_after_weights": 3}
        examples = by_ref(built, data_dir)
        assert sorted(examples) == ["clean.jsonl:1", "clean.jsonl:2", "clean.jsonl:4", "clean.jsonl:8", "clean.jsonl:9"]
        nfc = examples["clean.jsonl:1"]
        assert view(nfc, tokenizer) == "<s> [INST] order a caf\u00e9 [/INST] ⟦one caf\u00e9 please </s>⟧"
        assert "cafe\u0301" not in nfc.text
        assert view(examples["clean.jsonl:2"], tokenizer) == "<s> [INST] greet me ↵ now [/INST] ⟦hello there </s>⟧"
        assert examples["clean.jsonl:2"].example.messages[0]["content"] == "greet me\nnow"
        cut = examples["clean.jsonl:8"]
        assert view(cut, tokenizer) == "<s> [INST] hi [/INST] ⟦hello </s>⟧"
        assert cut.input_ids[-1] == tokenizer.eos_token_id and cut.labels[-1] == tokenizer.eos_token_id

    def test_balancing_downsamples_every_label_to_the_rarest(self, data_dir, tokenizer):
        write_rows(data_dir / "cells.csv", tabular_rows([0] * 6 + [1] * 2))
        built = build(data_dir, tokenizer, [{"path": "cells.csv", **TABULAR_SOURCE}], balance=True)
        assert built.counts["balanced_away"] == Counter({0: 4})
        assert Counter(e.example.label for e in built.train + built.evaluation) == {"malignant": 2, "benign": 2}
        unbalanced = build(data_dir, tokenizer, [{"path": "cells.csv", **TABULAR_SOURCE}], balance=False)
        assert sum(unbalanced.counts["balanced_away"].values()) == 0
        assert len(unbalanced.train + unbalanced.evaluation) == 8

    def test_split_is_stratified_by_source_and_label_and_seeded(self, data_dir, tokenizer):
        write_rows(data_dir / "cells.csv", tabular_rows([0] * 20 + [1] * 20))
        write_rows(data_dir / "pc.jsonl", [{"prompt": f"say {n}", "completion": str(n)} for n in range(8)])
        sources = [{"path": "cells.csv", **TABULAR_SOURCE}, {"path": "pc.jsonl", "format": "prompt_completion"}]

        def split(seed: int) -> tuple[Built, list[str]]:
            built = build(data_dir, tokenizer, sources, eval_fraction=0.25, seed=seed)
            return built, [encoded.example.ref for encoded in built.evaluation]

        built, eval_refs = split(seed=1)
        assert built.counts["eval"] == Counter({0: 10, 1: 2}) and built.counts["train"] == Counter({0: 30, 1: 6})
        assert Counter(e.example.label for e in built.evaluation) == {"malignant": 5, "benign": 5, None: 2}
        assert split(seed=1)[1] == eval_refs
        assert split(seed=2)[1] != eval_refs

    @pytest.mark.parametrize("groups, size, fraction", [(10, 3, 0.5), (4, 2, 0.25)])
    def test_split_size_follows_eval_fraction_with_many_small_groups(self, groups, size, fraction):
        examples = [Encoded(Example(0, f"row {n}", "label", [], label=str(n % groups)), "", [], [], 0) for n in range(groups * size)]
        _, evaluation = stratified_split(examples, fraction, seed=0)
        assert abs(len(evaluation) - len(examples) * fraction) <= 1

    def test_weight_repeats_a_source_in_train_and_max_rows_caps_one(self, data_dir, tokenizer):
        write_rows(data_dir / "a.jsonl", [{"instruction": f"say {n}", "output": str(n)} for n in range(4)])
        # b's answers differ from a's: the same conversation in two sources is a duplicate
        write_rows(data_dir / "b.jsonl", [{"prompt": f"say {n}", "completion": f"{n} {n}"} for n in range(4)])
        write_rows(data_dir / "c.jsonl", [{"prompt": f"default {n}", "completion": str(n)} for n in range(10)])
        sources = [{"path": "a.jsonl", "format": "alpaca"}, {"path": "b.jsonl", "format": "prompt_completion", "weight": 2.0},
                   {"path": "c.jsonl", "format": "prompt_completion", "max_rows": 4}]
        built = build(data_dir, tokenizer, sources)
        assert built.counts["read"] == Counter({0: 4, 1: 4, 2: 4})
        assert built.counts["train"] == Counter({0: 2, 1: 2, 2: 2})
        assert built.counts["eval"] == Counter({0: 2, 1: 2, 2: 2})
        assert built.counts["train_after_weights"] == Counter({0: 2, 1: 4, 2: 2})
        assert Counter(e.example.source for e in built.train) == {0: 2, 1: 4, 2: 2}

    def test_max_rows_sample_is_seeded(self, data_dir, tokenizer):
        write_rows(data_dir / "c.jsonl", [{"prompt": f"default {n}", "completion": str(n)} for n in range(30)])
        sources = [{"path": "c.jsonl", "format": "prompt_completion", "max_rows": 6}]

        def refs(seed: int) -> set[str]:
            return set(by_ref(build(data_dir, tokenizer, sources, seed=seed), data_dir))

        assert len(refs(0)) == 6 and refs(0) == refs(0) and refs(0) != refs(1)


# --------------------------------------------------------------------------------------------- bad input

BAD_ROWS = {  # file name, content, source format and options, the message after "<data dir>/"
    "malformed JSON line": ("rows.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": oops}\n',
                            {"format": "alpaca"}, "rows.jsonl:3: malformed JSON (Expecting value at column 17)"),
    "missing field": ("rows.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n',
                      {"format": "alpaca"}, "rows.jsonl:2: no 'output' field"),
    "missing mapped field": ("rows.jsonl", '{"instruction": "a", "reply": "b"}\n{"instruction": "c"}\n',
                             {"format": "alpaca", "columns": {"output": "reply"}}, "rows.jsonl:2: no 'reply' field (mapped from 'output')"),
    "missing column": ("rows.csv", "instruction,input\nhi,there\n", {"format": "alpaca"}, "rows.csv: no column 'output'"),
    "no assistant turn": ("chat.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n',
                          {"format": "messages"}, "chat.jsonl:1: no assistant turn"),
    "roles out of order": ("chat.jsonl", '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, '
                           '{"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}\n',
                           {"format": "messages"}, "chat.jsonl:1: turn 3 is user, expected assistant"),
    "unknown role": ("chat.jsonl", '{"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]}\n',
                     {"format": "messages"}, "chat.jsonl:1: turn 2: unknown role 'robot'"),
    "not an object in an array": ("rows.json", '[{"instruction": "a", "output": "b"}, 3]', {"format": "alpaca"},
                                  "rows.json: item 2: not an object"),
    "not valid JSON": ("rows.json", '[{"instruction": "a",\n', {"format": "alpaca"}, "rows.json:2: not valid JSON"),
    "text before the first Human turn": ("oasst.jsonl", '{"text": "hello ### Human: a ### Assistant: b"}\n',
                                         {"format": "oasst"}, "oasst.jsonl:1: text before the first '### Human:' turn"),
    "mcq answer not A-D": ("mcq.csv", "question,A,B,C,D,answer\nq,a,b,c,d,E\n", {"format": "mcq"},
                           "mcq.csv: row 1: answer 'E' is not one of A, B, C, D"),
    "unknown file type": ("notes.txt", "hello\n", {"format": "alpaca"}, "notes.txt: unknown file type"),
    "unreadable parquet": ("rows.parquet", "not parquet", {"format": "alpaca"}, "rows.parquet: not a readable parquet file"),
}


class TestBadInput:
    @pytest.mark.parametrize("case", BAD_ROWS)
    def test_one_line_naming_the_file_and_row(self, data_dir, tokenizer, case):
        name, content, source, expected = BAD_ROWS[case]
        (data_dir / name).write_text(content)
        message = one_line_error(build, data_dir, tokenizer, [{"path": name, **source}])
        assert message.startswith(f"{data_dir}/{expected}"), message

    @pytest.mark.parametrize("change, expected", [
        ({"sources": [{"path": "a.jsonl", "format": "sharegpt"}]},
         "params.yaml: dataset.sources[0].format: must be one of: alpaca, messages, oasst, prompt_completion, mcq, tabular"),
        ({"template": "vicuna"}, "params.yaml: dataset.template:"),
        ({"sources": []}, "params.yaml: dataset.sources:"),
        ({"on_bad_row": "ignore"}, "params.yaml: dataset.on_bad_row:"),
    ])
    def test_bad_params(self, change, expected):
        raw = {**raw_params([{"path": "a.jsonl", "format": "alpaca"}]), **change}
        assert one_line_error(validate_section, "dataset", raw).startswith(expected)

    @pytest.mark.parametrize("path", ["../outside.jsonl", "/etc/outside.jsonl", "sub/../../outside.jsonl"])
    def test_path_outside_the_data_folder(self, data_dir, tokenizer, path):
        write_rows(data_dir.parent / "outside.jsonl", ALPACA_LINES)
        message = one_line_error(build, data_dir, tokenizer, [{"path": path, "format": "alpaca"}])
        assert message.startswith(f"params.yaml: dataset.sources[0].path: '{path}' must be relative to {data_dir}/")

    def test_glob_matching_nothing(self, data_dir, tokenizer):
        write_rows(data_dir / "a.jsonl", ALPACA_LINES)
        message = one_line_error(build, data_dir, tokenizer, [{"path": "a.jsonl", "format": "alpaca"},
                                                              {"path": "chats/*.jsonl", "format": "messages"}])
        assert message == f"params.yaml: dataset.sources[1].path: 'chats/*.jsonl' matches no file under {data_dir}/"

    def test_an_input_yielding_no_examples(self, data_dir, tokenizer):
        write_rows(data_dir / "a.jsonl", ALPACA_LINES)
        (data_dir / "bad.jsonl").write_text('{"instruction": "x"}\n')
        sources = [{"path": "a.jsonl", "format": "alpaca"}, {"path": "bad.jsonl", "format": "alpaca"}]
        message = one_line_error(build, data_dir, tokenizer, sources, on_bad_row="skip")
        assert message.startswith("params.yaml: dataset.sources[1]: bad.jsonl yields no examples")

    def test_everything_too_long_is_an_error(self, data_dir, tokenizer):
        write_rows(data_dir / "a.jsonl", ALPACA_LINES)
        message = one_line_error(build, data_dir, tokenizer, [{"path": "a.jsonl", "format": "alpaca"}], max_length=3)
        assert message.startswith("dataset: no examples left after cleaning") and "max_length 3" in message

    def test_skip_counts_bad_rows_and_the_card_lists_the_first_ones(self, tmp_path, data_dir, tokenizer):
        lines = [json.dumps(row) for row in ALPACA_LINES] + [f'{{"instruction": "q{n}"}}' for n in range(12)]
        (data_dir / "rows.jsonl").write_text("\n".join(lines) + "\n")
        sources = [{"path": "rows.jsonl", "format": "alpaca"}]
        built = build(data_dir, tokenizer, sources, on_bad_row="skip")
        assert built.counts["bad_rows"] == Counter({0: 12}) and built.counts["read"] == Counter({0: 14})
        assert built.bad_rows[0] == f"{data_dir}/rows.jsonl:3: no 'output' field"
        tokenizer.save_pretrained(tmp_path / "tokenizer")
        card = write_outputs(built, dataset_params(sources, on_bad_row="skip"), tokenizer, tmp_path / "tokenizer", tmp_path / "out")
        assert card["steps"]["bad_rows"] == 12
        assert card["bad_rows"] == [f"{data_dir}/rows.jsonl:{n}: no 'output' field" for n in range(3, 13)]

    @pytest.mark.integration  # runs the stage as a process: a few seconds of imports
    def test_stage_exits_with_one_line_and_writes_nothing(self, tmp_path, data_dir, tokenizer):
        """`python -m stages.dataset` as dvc.yaml runs it, on a malformed JSONL line."""
        (data_dir / "rows.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
        tokenizer.save_pretrained(tmp_path / "tokenizer")
        write_params_file(tmp_path / "params.yaml", [{"path": "rows.jsonl", "format": "alpaca"}])
        result = run_stage("dataset", "data", "tokenizer", "out", cwd=tmp_path, check=False)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert "Traceback" not in result.stderr
        assert len(lines) == 1 and lines[0].startswith("error: data/rows.jsonl:2: malformed JSON"), result.stderr
        assert not (tmp_path / "out").exists()


class TestBadInputNotYetHandled:
    """Input that should give one line naming the file and row, or be read as the user wrote it, and does not."""

    @pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00binary"], ids=["empty", "not-utf8"])
    def test_unreadable_csv_is_one_line(self, data_dir, tokenizer, content):
        (data_dir / "rows.csv").write_bytes(content)
        assert one_line_error(build, data_dir, tokenizer, [{"path": "rows.csv", "format": "alpaca"}]).startswith(f"{data_dir}/rows.csv")

    @pytest.mark.parametrize("name", ["rows.jsonl", "rows.json"])
    def test_non_utf8_json_is_one_line(self, data_dir, tokenizer, name):
        (data_dir / name).write_bytes('[{"instruction": "café", "output": "ok"}]\n'.encode("latin-1"))
        assert one_line_error(build, data_dir, tokenizer, [{"path": name, "format": "alpaca"}]).startswith(f"{data_dir}/{name}")

    def test_non_numeric_feature_names_the_row(self, data_dir, tokenizer):
        write_rows(data_dir / "cells.csv", [{"radius": 1.5, "texture": 2, "target": 0}, {"radius": "big", "texture": 3, "target": 1}])
        message = one_line_error(build, data_dir, tokenizer, [{"path": "cells.csv", **TABULAR_SOURCE}])
        assert message.startswith(f"{data_dir}/cells.csv: row 2")

    def test_numeric_text_in_a_csv_is_kept_as_written(self, data_dir, tokenizer):
        write_rows(data_dir / "pc.csv", [{"prompt": "two plus two", "completion": "4"}, {"prompt": "half", "completion": "0.50"}])
        examples = by_ref(build(data_dir, tokenizer, [{"path": "pc.csv", "format": "prompt_completion"}]), data_dir)
        assert [examples[f"pc.csv: row {n}"].example.messages[-1]["content"] for n in (1, 2)] == ["4", "0.50"]

    def test_mcq_option_none_in_a_csv_is_text(self, data_dir, tokenizer):
        rows = [{"question": f"what is {n}", "A": "one", "B": "two", "C": "three", "D": "None", "answer": "D"} for n in range(2)]
        write_rows(data_dir / "mcq.csv", rows)
        examples = by_ref(build(data_dir, tokenizer, [{"path": "mcq.csv", "format": "mcq"}]), data_dir)
        assert examples["mcq.csv: row 1"].example.messages[-1]["content"].endswith("\nD. None\nAnswer: D")


# ------------------------------------------------------------------------------------------------- outputs


class TestOutputs:
    @pytest.fixture
    def written(self, tmp_path, data_dir, tokenizer) -> tuple[Built, dict, Path, list[dict]]:
        """alpaca, multi-turn messages and mcq sources built and written; returns (built, card, out, sources)."""
        write_rows(data_dir / "alpaca.json", ALPACA_ITEMS)
        write_rows(data_dir / "chat.jsonl", OPENAI_CHATS + chats([[("say yes", "yes")]]))
        write_rows(data_dir / "mcq.csv", MCQ_CSV_ROWS)
        write_rows(data_dir / "cells.csv", tabular_rows([0, 0, 1, 1]))
        sources = [{"path": "alpaca.json", "format": "alpaca"}, {"path": "chat.jsonl", "format": "messages"},
                   {"path": "mcq.csv", "format": "mcq", "columns": {"question": "stem"}}, {"path": "cells.csv", **TABULAR_SOURCE}]
        params = dataset_params(sources)
        built = build_dataset(params=params, data_dir=data_dir, tokenizer=tokenizer, tokenizer_dir=tmp_path / "tokenizer")
        tokenizer.save_pretrained(tmp_path / "tokenizer")
        out = tmp_path / "out"
        out.mkdir()
        return built, write_outputs(built, params, tokenizer, tmp_path / "tokenizer", out), out, sources

    def test_parquet_splits(self, written):
        built, _, out, _ = written
        for name, examples in (("train", built.train), ("eval", built.evaluation)):
            table = pd.read_parquet(out / f"{name}.parquet")
            assert {"input_ids", "attention_mask", "labels", "prompt_length", "label", "choices", "choice_ids"} <= set(table.columns)
            assert len(table) == len(examples)
            for row, encoded in zip(table.itertuples(), examples):
                assert list(row.input_ids) == encoded.input_ids and list(row.labels) == encoded.labels
                assert list(row.attention_mask) == [1] * len(encoded.input_ids)
                assert row.prompt_length == encoded.prompt_length
                assert (None if pd.isna(row.label) else row.label) == encoded.example.label
                assert list(row.choices) == list(encoded.choice_ids)
                assert [list(ids) for ids in row.choice_ids] == list(encoded.choice_ids.values())
                assert encoded.labels[row.prompt_length] != -100 and encoded.labels[row.prompt_length - 1] == -100
        evaluation = pd.read_parquet(out / "eval.parquet")
        labelled = evaluation.dropna(subset=["label"])
        assert sorted(labelled.label) == ["benign", "malignant"]  # stratified: one of each
        assert [list(choices) for choices in labelled.choices] == [["malignant", "benign"]] * 2
        assert set(evaluation.kind) == {"free_text", "mcq", "label"}
        assert list(evaluation.reference) == [e.example.messages[-1]["content"] for e in built.evaluation]

    def test_readable_text_and_tokenizer(self, written, tokenizer):
        built, _, out, _ = written
        lines = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
        assert [line["text"] for line in lines] == [encoded.text for encoded in built.train]
        assert [line["ref"] for line in lines] == [encoded.example.ref for encoded in built.train]
        assert len((out / "eval.jsonl").read_text().splitlines()) == len(built.evaluation)
        saved = AutoTokenizer.from_pretrained(out / "tokenizer")
        assert saved.pad_token == tokenizer.pad_token == "<|pad|>"
        assert saved.convert_ids_to_tokens(built.train[0].input_ids) == tokenizer.convert_ids_to_tokens(built.train[0].input_ids)

    def test_card(self, tmp_path, data_dir, written, tokenizer):
        built, card, out, sources = written
        assert card == json.loads((out / "dataset_card.json").read_text())
        assert list(card["steps"]) == list(STEPS)
        assert card["steps"]["read"] == 3 + 3 + 4 + 4
        assert card["steps_per_source"]["read"] == {"0:alpaca.json": 3, "1:chat.jsonl": 3, "2:mcq.csv": 4, "3:cells.csv": 4}
        assert card["kinds"] == {"free_text": 6, "label": 4, "mcq": 4}
        assert card["sha256"]["inputs"] == {str(data_dir / s["path"]): hashlib.sha256((data_dir / s["path"]).read_bytes()).hexdigest()
                                            for s in sources}
        assert card["sha256"]["outputs"] == {name: hashlib.sha256((out / name).read_bytes()).hexdigest()
                                             for name in ("train.parquet", "eval.parquet", "train.jsonl", "eval.jsonl")}
        lengths = [len(e.input_ids) for e in built.train + built.evaluation]
        assert (card["token_length"]["min"], card["token_length"]["max"]) == (min(lengths), max(lengths))
        assert card["label_balance"] == {"train": {"benign": 1, "malignant": 1}, "eval": {"benign": 1, "malignant": 1}}
        assert card["template"] == {"name": "llama2", "train_on": "all_turns", "system_prompt": "", "chat_template_sha256": None}
        assert card["tokenizer"]["sha256"] == {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
                                               for path in (tmp_path / "tokenizer").iterdir()}
        assert (card["tokenizer"]["vocabulary"], card["tokenizer"]["eos"], card["tokenizer"]["pad"]) == (len(tokenizer), "</s>", "<|pad|>")
        assert len(card["examples"]) == 2 and all("⟦" in example and "⟧" in example for example in card["examples"])
        markdown = (out / "dataset_card.md").read_text()
        assert "Template `llama2`" in markdown and "| near_duplicates |" in markdown and card["examples"][1] in markdown

    def test_token_length_histogram_counts_every_example(self, written):
        built, _, out, _ = written
        histogram = json.loads((out / "token_lengths.json").read_text())
        assert sum(bin["examples"] for bin in histogram) == len(built.train) + len(built.evaluation)

    def test_card_shows_two_different_examples(self, tokenizer):
        multi = encode_messages("llama2", CONVERSATION, tokenizer)
        single = encode_messages("llama2", CONVERSATION[:3], tokenizer)
        first, second = pick_examples([multi, single])
        assert first is not second

    @pytest.mark.parametrize("dropped, expected", [
        ({"duplicates": 11, "balanced_away": 134},
         "dataset: 609 rows read, 418 train / 46 eval (418 train after weights); dropped: 11 duplicates, 134 balanced_away"),
        ({}, "dataset: 464 rows read, 418 train / 46 eval (418 train after weights)"),
    ], ids=["some dropped", "nothing dropped"])
    def test_the_stages_summary_line_names_only_what_was_dropped(self, dropped, expected):
        steps = dict.fromkeys(STEPS, 0) | {"train": 418, "eval": 46, "train_after_weights": 418, "normalised": 7}
        steps |= {"read": 464 + sum(dropped.values()), **dropped}  # normalised rows are changed, not dropped
        assert summary_line(steps) == expected

    @pytest.mark.integration  # runs the stage as a process: a few seconds of imports
    def test_the_stage_writes_the_out_dir(self, tmp_path, data_dir, tokenizer):
        write_rows(data_dir / "alpaca.json", ALPACA_ITEMS + ALPACA_LINES)
        tokenizer.save_pretrained(tmp_path / "tokenizer")
        write_params_file(tmp_path / "params.yaml", [{"path": "alpaca.json", "format": "alpaca"}])
        result = run_stage("dataset", "data", "tokenizer", "out/dataset", cwd=tmp_path)
        assert "dataset: 5 rows read" in result.stdout
        assert {path.name for path in (tmp_path / "out" / "dataset").iterdir()} == {
            "train.parquet", "eval.parquet", "train.jsonl", "eval.jsonl", "tokenizer", "dataset_card.json",
            "dataset_card.md", "token_lengths.json", "lineage.json"}
        lineage = json.loads((tmp_path / "out/dataset/lineage.json").read_text())
        expected = hashlib.sha256((data_dir / "alpaca.json").read_bytes()).hexdigest()
        assert lineage["inputs"] == {"data/alpaca.json": expected}
        assert set(lineage["splits"]) == {"train.parquet", "eval.parquet"}
        assert lineage["counts"]["read"] == 5
        assert lineage["params"]["sources"][0]["path"] == "alpaca.json"


# ------------------------------------------------------------------------------------ hub source, preview


class TestHubSource:
    """hf:// sources. The hub is out of reach in tests, so datasets.load_dataset is replaced by a local Dataset."""

    def test_loads_the_pinned_revision_and_split(self, data_dir, tokenizer, monkeypatch):
        import datasets

        calls = []

        def load_dataset(name, subset, **options):
            calls.append((name, subset, options))
            return datasets.Dataset.from_list(ALPACA_ITEMS)

        monkeypatch.setattr(datasets, "load_dataset", load_dataset)
        source = {"path": "hf://org/alpaca-mini@0123abc", "format": "alpaca", "split": "validation"}
        built = build(data_dir, tokenizer, [source])
        assert [(name, subset, options["split"], options["revision"]) for name, subset, options in calls] == [
            ("org/alpaca-mini", None, "validation", "0123abc")]
        examples = {encoded.example.ref: encoded for encoded in built.train + built.evaluation}
        assert view(examples["hf://org/alpaca-mini@0123abc[validation]: row 1"], tokenizer) == (
            "<s> [INST] name a colour [/INST] ⟦red </s>⟧")
        assert list(built.inputs) == ["hf://org/alpaca-mini@0123abc[validation]"]

    def test_unpinned_revision_is_an_error(self, data_dir, tokenizer):
        message = one_line_error(build, data_dir, tokenizer, [{"path": "hf://org/alpaca-mini", "format": "alpaca"}])
        assert message.startswith("params.yaml: dataset.sources[0].path: pin a revision: hf://org/alpaca-mini@")


class TestPreview:
    def test_cli_prints_rendered_examples_with_trained_spans_marked(self, tmp_path, data_dir, tokenizer, capsys):
        from tuneline.cli import main

        write_rows(data_dir / "alpaca.json", ALPACA_ITEMS)
        tokenizer.save_pretrained(tmp_path / "tokenizer")
        write_params_file(tmp_path / "params.yaml", [{"path": "alpaca.json", "format": "alpaca"}])
        main(["dataset", "preview", "--params", str(tmp_path / "params.yaml"), "--data", str(data_dir),
              "--tokenizer", str(tmp_path / "tokenizer"), "-n", "1"])
        printed = capsys.readouterr()
        assert printed.out == (
            f"--- {data_dir}/alpaca.json: item 1 (8 tokens, 2 trained)\n<s> [INST] name a colour [/INST]⟦red </s>⟧\n")
        assert printed.err == ""  # llama2 on a tokenizer without a chat template: nothing to warn about

    def test_cli_warns_about_a_named_template_the_tokenizer_was_not_trained_with(self, tmp_path, data_dir,
                                                                                make_tokenizer, capsys):
        from tuneline.cli import main

        write_rows(data_dir / "alpaca.json", ALPACA_ITEMS)
        make_tokenizer(chat_template=CHATML_TEMPLATE).save_pretrained(tmp_path / "tokenizer")
        write_params_file(tmp_path / "params.yaml", [{"path": "alpaca.json", "format": "alpaca"}])  # llama2
        main(["dataset", "preview", "--params", str(tmp_path / "params.yaml"), "--data", str(data_dir),
              "--tokenizer", str(tmp_path / "tokenizer"), "-n", "1"])
        printed = capsys.readouterr()
        assert printed.err == (
            "WARNING: params.yaml: dataset.template: 'llama2' writes '[INST]', but the chat template of the tokenizer "
            f"in {tmp_path}/tokenizer uses '<|im_start|>' (as chatml does), so the model would learn a format it "
            "was never trained on; set dataset.template: tokenizer (the model's own chat template) or chatml\n")
        assert "<s> [INST] name a colour [/INST]⟦red </s>⟧" in printed.out  # rendered as asked
