"""Ollama: a Modelfile whose TEMPLATE is the model's own chat template, translated, and whose stops are its own.

Ollama templates are Go templates, chat templates Jinja. Rather than translate Jinja, the chat template is
rendered once with marker strings in place of the system prompt and the messages; the text between markers is
what the template writes around each part (`ChatPieces`). The Go template puts those same pieces around
Ollama's .System and .Messages, so `ollama create` gives a model that is prompted exactly as it was trained,
and that stops at the tokens that end its turns. `render` writes what the Go template writes, in Python, so the
tests compare it with the chat template's own output.
"""

import os
from dataclasses import dataclass

from tuneline.errors import TunelineError
from tuneline.modeling import end_token_ids

# Markers no template changes (templates strip or trim messages, and Python strips control characters too).
_SYSTEM, _USER1, _ANSWER, _USER2 = "@@system@@", "@@user-1@@", "@@answer@@", "@@user-2@@"


@dataclass(frozen=True)
class ChatPieces:
    """The text a chat template writes around each part of a conversation."""

    system_start: str | None  # before the system prompt (BOS included); None: the template takes no system turn
    system_end: str | None  # after it, before the first user turn's own start
    no_system_start: str  # the start of a conversation without a system prompt (the template's default one)
    user_start: str
    user_end: str  # after a user turn, up to where the assistant's answer begins (the generation prompt)
    answer_end: str  # after an answer, before the next user turn


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _split(text: str, *markers: str) -> list[str]:
    """`text` cut at each marker in turn: the pieces between them."""
    pieces = []
    for marker in markers:
        if marker not in text:
            raise ValueError(marker)
        before, text = text.split(marker, 1)
        pieces.append(before)
    return [*pieces, text]


def chat_pieces(tokenizer) -> ChatPieces:
    """The pieces of the tokenizer's chat template, found by rendering two turns with markers."""
    conversation = [{"role": "user", "content": _USER1}, {"role": "assistant", "content": _ANSWER},
                    {"role": "user", "content": _USER2}]
    without_system = _rendered_pieces(tokenizer, conversation, _USER1, _ANSWER, _USER2)
    try:
        with_system = _rendered_pieces(tokenizer, [{"role": "system", "content": _SYSTEM}, *conversation],
                                       _SYSTEM, _USER1, _ANSWER, _USER2)
    except TunelineError:  # Gemma's template refuses a system turn: the Modelfile then has none either
        with_system = None
    no_system_start, user_end, answer_and_user_start, final_user_end = without_system
    user_start = _after_end_token(os.path.commonprefix([no_system_start[::-1], answer_and_user_start[::-1]])[::-1],
                                  tokenizer)
    if user_end != final_user_end or (with_system and not with_system[1].endswith(user_start)):
        raise TunelineError("the chat template writes turns in a way the Ollama template cannot follow (turns "
                            "differ by position); the GGUF files still carry the template itself")
    return ChatPieces(
        system_start=with_system[0] if with_system else None,
        system_end=with_system[1].removesuffix(user_start) if with_system else None,
        no_system_start=no_system_start.removesuffix(user_start),
        user_start=user_start,
        user_end=user_end,
        answer_end=answer_and_user_start.removesuffix(user_start),
    )


def _rendered_pieces(tokenizer, messages: list[dict], *markers: str) -> list[str]:
    try:
        return _split(_render(tokenizer, messages, True), *markers)
    except Exception as error:  # noqa: BLE001 - a template that cannot render these turns cannot be translated
        raise TunelineError(f"the chat template cannot be translated for Ollama ({type(error).__name__}: {error}); "
                            "the GGUF files still carry the template itself") from None


def _after_end_token(text: str, tokenizer) -> str:
    """`text` from after the end-of-turn token it holds (and that token's newline), if any: the end token closes
    the previous turn, so it belongs to the system prompt's or the answer's end, not to the next user turn."""
    for token in tokenizer.convert_ids_to_tokens(sorted(end_token_ids(tokenizer))):
        if token in text:
            rest = text.split(token, 1)[1]
            return rest.removeprefix("\n")
    return text


def go_template(pieces: ChatPieces) -> str:
    """The Ollama TEMPLATE: the pieces around .System and each of .Messages, then the generation prompt."""
    def text(piece: str) -> str:  # a literal inside a Go template; {{ and }} would start an action
        return piece.replace("{{", '{{ "{{" }}')

    start = text(pieces.no_system_start)
    if pieces.system_start is not None:
        start = (f"{{{{ if .System }}}}{text(pieces.system_start)}{{{{ .System }}}}{text(pieces.system_end)}"
                 f"{{{{ else }}}}{start}{{{{ end }}}}")
    return (
        f"{start}"
        "{{ range .Messages }}"
        f"{{{{ if eq .Role \"user\" }}}}{text(pieces.user_start)}{{{{ .Content }}}}{text(pieces.user_end)}"
        f"{{{{ else if eq .Role \"assistant\" }}}}{{{{ .Content }}}}{text(pieces.answer_end)}"
        "{{ end }}{{ end }}"
    )


def render(pieces: ChatPieces, system: str | None, messages: list[dict]) -> str:
    """What the Go template writes for this conversation (the prompt Ollama gives the model)."""
    with_system = system and pieces.system_start is not None
    parts = [f"{pieces.system_start}{system}{pieces.system_end}" if with_system else pieces.no_system_start]
    for message in messages:
        if message["role"] == "user":
            parts.append(f"{pieces.user_start}{message['content']}{pieces.user_end}")
        elif message["role"] == "assistant":
            parts.append(f"{message['content']}{pieces.answer_end}")
    return "".join(parts)


def _quoted(text: str) -> str:
    if '"""' in text:
        raise TunelineError(f'cannot write {text[:40]!r}... into a Modelfile: it contains """')
    return f'"""{text}"""'


def modelfile(tokenizer, gguf_name: str, system_prompt: str | None, header: str) -> str:
    """An Ollama Modelfile for the GGUF file beside it."""
    stops = sorted(tokenizer.convert_ids_to_tokens(sorted(end_token_ids(tokenizer))))
    lines = [f"# {line}" for line in header.splitlines()]
    pieces = chat_pieces(tokenizer)
    lines += [f"FROM ./{gguf_name}", f"TEMPLATE {_quoted(go_template(pieces))}"]
    if system_prompt and pieces.system_start is not None:
        lines.append(f"SYSTEM {_quoted(system_prompt)}")
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"
