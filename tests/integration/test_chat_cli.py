"""`tuneline chat` in the reproduced tiny pipeline, as a script runs it: what it prints is exactly the answer the
evaluate stage's generation (scoring.generate, evaluate.generation of params.yaml) gives the merged model for the
same conversation, the training data's system prompt then the question, with --prompt and through a pipe.

The tests only read this module's copy of the reproduced tiny pipeline (conftest's `pipeline_repo`).
"""

import shlex
from pathlib import Path

import pytest

from conftest import VENV_BIN, run
from tuneline.lineage import embedded_lineage
from tuneline.modeling import load_full_model, load_tokenizer
from tuneline.params import load_section
from tuneline.pipeline import model_path
from tuneline.scoring import generate

QUESTION = "Measurements: worst radius 17.33, worst concave points 0.19. Is the tumour malignant or benign?"


@pytest.fixture(scope="module")
def system_prompt(pipeline_repo: Path) -> str:
    return embedded_lineage(pipeline_repo / model_path(pipeline_repo))["dataset"]["params"]["system_prompt"]


@pytest.fixture(scope="module")
def expected_answer(pipeline_repo: Path, system_prompt: str) -> str:
    """The merged model's answer to QUESTION after the system prompt, as the evaluate stage generates it."""
    merged = pipeline_repo / model_path(pipeline_repo)
    model, tokenizer = load_full_model(merged).eval(), load_tokenizer(merged)
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": QUESTION}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    generation = load_section("evaluate", pipeline_repo / "params.yaml").generation
    assert generation.mode == "greedy"
    answer = generate(model, tokenizer, [ids], generation, 1, "chat")[0]
    assert answer  # the comparison means something
    return answer


def test_prompt_prints_exactly_the_merged_models_greedy_answer(pipeline_repo, system_prompt, expected_answer):
    result = run([str(VENV_BIN / "tuneline"), "chat", "--prompt", QUESTION], cwd=pipeline_repo)

    assert result.stdout == expected_answer + "\n"
    assert f'chat: models/merged; system prompt: "{system_prompt}"; decoding: greedy' in result.stderr


def test_a_question_piped_in_gets_the_same_answer(pipeline_repo, expected_answer):
    result = run(["bash", "-c", f"printf '%s\\n' {shlex.quote(QUESTION)} | tuneline chat"], cwd=pipeline_repo)

    assert result.stdout == expected_answer + "\n"
    assert not any(line.startswith("> ") for line in result.stderr.splitlines())  # no marker: stdin is no terminal


def test_the_exported_gguf_file_answers_as_the_merged_model(pipeline_repo, system_prompt, expected_answer):
    """The f16 file, read by transformers (tokenizer and chat template from the file's own metadata; the system
    prompt from the lineage it carries)."""
    result = run([str(VENV_BIN / "tuneline"), "chat", "models/export/model-f16.gguf", "--prompt", QUESTION],
                 cwd=pipeline_repo)

    assert result.stdout == expected_answer + "\n"
    assert f'system prompt: "{system_prompt}"' in result.stderr
