"""tuneline/chat.py and `tuneline chat`: the answer is the evaluate stage's (scoring.generate) for the same
conversation, streamed; the system prompt comes from the model's lineage; piped turns keep the history, /reset
clears it, /exit ends; a path that is not a model is one line. On the tiny random model, in-process."""

import functools
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tuneline.chat import DEFAULT_GENERATION, Chat, generation_params, load_model, system_prompt
from tuneline.cli import main
from tuneline.params import GenerationParams, validate_section
from tuneline.scoring import generate

SYSTEM = "Answer in one word: malignant or benign."
QUESTION = "Measurements: worst radius 17.33. Is the tumour malignant or benign?"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model with a lineage.json whose dataset was built with SYSTEM, as the merge stage writes it."""
    path = tmp_path_factory.mktemp("chat") / "merged"
    shutil.copytree(tiny_model_dir, path)
    (path / "lineage.json").write_text(json.dumps({"dataset": {"params": {"system_prompt": SYSTEM}}}))
    return path


@pytest.fixture(scope="module")
def evaluate_params(tiny_params) -> dict:
    """The evaluate section, with few new tokens: generation on the tiny model costs ~50 ms a token on 2 cores."""
    return {**tiny_params["evaluate"], "generation": {**tiny_params["evaluate"]["generation"], "max_new_tokens": 6,
                                                      "num_beams": 2}}


@pytest.fixture(scope="module")
def generation(evaluate_params) -> GenerationParams:
    return validate_section("evaluate", evaluate_params).generation


@pytest.fixture(scope="module")
def params_file(tmp_path_factory, evaluate_params) -> Path:
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.safe_dump({"evaluate": evaluate_params}))
    return path


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(model_dir)


@functools.cache  # several tests compare with the same answers
def evaluate_answer(loaded, generation, turns: tuple[str, ...]) -> str:
    """What the evaluate stage generates after SYSTEM and `turns` (user, assistant, ..., user)."""
    model, tokenizer = loaded
    messages = [{"role": "system", "content": SYSTEM}]
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    return generate(model, tokenizer, [ids], generation, 1, "x")[0]


class Recorder(io.StringIO):
    """A stream that keeps each write apart, to see an answer arrive in pieces."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def run_chat(argv: list[str], capsys, monkeypatch, stdin: str = "") -> tuple[str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    main(["chat", *argv])
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_prompt_prints_the_evaluate_stages_greedy_answer(model_dir, params_file, loaded, generation, capsys,
                                                         monkeypatch) -> None:
    expected = evaluate_answer(loaded, generation, (QUESTION,))
    assert expected  # the tiny model says something, so the comparison means something

    out, err = run_chat([str(model_dir), "--prompt", QUESTION, "--params", str(params_file)], capsys, monkeypatch)

    assert out == expected + "\n"
    start = [line for line in err.splitlines() if line.startswith("chat: ")]
    assert start == [f'chat: {model_dir}; system prompt: "{SYSTEM}"; decoding: greedy, max_new_tokens 6']


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_every_decoding_mode_answers_as_the_evaluate_stage_streaming_where_it_can(loaded, generation, mode) -> None:
    generation = generation.model_copy(update={"mode": mode})
    out = Recorder()
    Chat(*loaded, generation, SYSTEM).answer(QUESTION, out)

    assert out.getvalue() == evaluate_answer(loaded, generation, (QUESTION,))
    assert len(out.writes) > 1 if mode != "beam" else len(out.writes) == 1  # transformers cannot stream beam search


def test_the_system_prompt_comes_from_the_lineage(model_dir, tiny_model_dir, loaded) -> None:
    def rendered(path: Path) -> str:
        return loaded[1].decode(Chat(*loaded, DEFAULT_GENERATION, system_prompt(path)).prompt_ids("hi"))

    assert system_prompt(model_dir) == SYSTEM
    assert f"<|im_start|>system\n{SYSTEM}<|im_end|>" in rendered(model_dir)
    assert system_prompt(tiny_model_dir) is None  # no lineage: no system turn
    assert "system" not in rendered(tiny_model_dir)


def test_piped_turns_keep_the_history(model_dir, params_file, loaded, generation, capsys, monkeypatch) -> None:
    first = evaluate_answer(loaded, generation, ("first question",))
    second = evaluate_answer(loaded, generation, ("first question", first, "second question"))
    assert second != evaluate_answer(loaded, generation, ("second question",))  # the history changes the answer

    out, _ = run_chat([str(model_dir), "--params", str(params_file)], capsys, monkeypatch,
                      stdin="first question\nsecond question\n")

    assert out == f"{first}\n{second}\n"


def test_reset_clears_the_history_and_exit_ends(model_dir, params_file, loaded, generation, capsys,
                                                monkeypatch) -> None:
    first = evaluate_answer(loaded, generation, ("first question",))
    second_alone = evaluate_answer(loaded, generation, ("second question",))

    out, err = run_chat([str(model_dir), "--params", str(params_file)], capsys, monkeypatch,
                        stdin="first question\n/reset\nsecond question\n/exit\nnever answered\n")

    assert out == f"{first}\n{second_alone}\n"
    assert "chat: history cleared" in err


@pytest.mark.parametrize("name, message", [
    ("missing", "not found; run the pipeline first (dvc repro), or pass a merged model directory or a .gguf file"),
    ("empty", "not a model; pass a merged model directory (with config.json"),
    ("weights.bin", "not a model; pass a merged model directory (with config.json"),
])
def test_a_path_that_is_not_a_model_is_one_line(tmp_path, capsys, monkeypatch, name, message) -> None:
    path = tmp_path / name
    if name == "empty":
        path.mkdir()
    elif name != "missing":
        path.write_bytes(b"\0")

    with pytest.raises(SystemExit) as exit_info:
        run_chat([str(path), "--prompt", "hi"], capsys, monkeypatch)

    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {message}"), lines


def test_without_a_params_file_decoding_is_greedy_and_says_so(model_dir, tmp_path, loaded, capsys,
                                                              monkeypatch) -> None:
    assert (DEFAULT_GENERATION.mode, DEFAULT_GENERATION.max_new_tokens) == ("greedy", 256)
    short = DEFAULT_GENERATION.model_copy(update={"max_new_tokens": 6})  # 256 tokens of the tiny model take seconds
    monkeypatch.setattr("tuneline.chat.DEFAULT_GENERATION", short)
    missing = tmp_path / "params.yaml"

    out, err = run_chat([str(model_dir), "--prompt", QUESTION, "--params", str(missing)], capsys, monkeypatch)

    assert out == evaluate_answer(loaded, short, (QUESTION,)) + "\n"
    assert f"chat: {missing} not found; decoding greedily, max_new_tokens 6\n" in err
    assert generation_params(missing) is None
