"""tuneline/ollama.py: the Modelfile's TEMPLATE writes exactly what the model's chat template writes, for the
usual templates; a template that cannot be followed is refused in one line."""

import pytest
from transformers import AutoTokenizer

from tuneline.errors import TunelineError
from tuneline.ollama import chat_pieces, go_template, modelfile, render

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA_TEMPLATE = (  # Gemma's refuses a system turn
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Is it malignant?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "Is it benign?"}],
]


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def with_template(tokenizer, template: str, special_tokens: list[str]):
    tokenizer.add_special_tokens({"additional_special_tokens": special_tokens, "bos_token": "<|begin_of_text|>"})
    tokenizer.chat_template = template
    return tokenizer


@pytest.mark.parametrize("template", ["chatml", "llama3"])
@pytest.mark.parametrize("system", ["Answer in one word.", None])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_the_ollama_template_writes_what_the_chat_template_writes(tokenizer, template, system, messages):
    if template == "llama3":
        specials = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        tokenizer = with_template(tokenizer, LLAMA3_TEMPLATE, specials)
    conversation = ([{"role": "system", "content": system}] if system else []) + messages
    expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert render(chat_pieces(tokenizer), system, messages) == expected


def test_the_turn_pieces_split_where_turns_end(tokenizer):
    pieces = chat_pieces(tokenizer)
    assert (pieces.user_start, pieces.answer_end) == ("<|im_start|>user\n", "<|im_end|>\n")
    template = go_template(pieces)
    assert template.startswith("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n")
    assert "{{-" not in template  # a trimming action would eat the newline the model was trained with


def test_the_modelfile_names_the_file_the_system_prompt_and_the_stops(tokenizer):
    text = modelfile(tokenizer, "model-q8_0.gguf", "Classify the tumour.", "made by tuneline")
    assert text.splitlines()[:2] == ["# made by tuneline", "FROM ./model-q8_0.gguf"]
    assert 'SYSTEM """Classify the tumour."""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_a_template_without_a_system_turn_gets_a_template_without_one(tokenizer):
    tokenizer = with_template(tokenizer, GEMMA_TEMPLATE, ["<start_of_turn>", "<end_of_turn>"])
    pieces = chat_pieces(tokenizer)
    assert pieces.system_start is None and ".System" not in go_template(pieces)
    for messages in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render(pieces, None, messages) == expected


def test_a_template_that_cannot_render_turns_is_refused_in_one_line(tokenizer):
    tokenizer.chat_template = "{{ raise_exception('only one turn') }}"
    with pytest.raises(TunelineError, match=r"chat template cannot be translated for Ollama \(TemplateError: only "
                                            r"one turn\); the GGUF files still carry the template itself"):
        chat_pieces(tokenizer)
