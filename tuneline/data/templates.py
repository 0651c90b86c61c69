"""Chat templates (`dataset.template`): a conversation rendered as text, with the character spans of the
answers the loss covers; the check that the tokenizer has the tokens a template writes; and the warning when a
named template is not the format the tokenizer's own chat template writes."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from tuneline.errors import TunelineError

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # character ranges of the answers, each closed by its end token
    bos: str | None  # the token the text must start with, once


def _plain_messages(messages: list[dict]) -> list[dict]:
    """Alpaca's optional input joined to its instruction, for templates without an Input section."""
    return [
        {"role": m["role"], "content": m["content"] + (f"\n\n{m['input']}" if m.get("input") else "")} for m in messages
    ]


def _default_bos(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The BOS the tokenizer puts before plain text, if it does: the model was pretrained with it."""
    if tokenizer.bos_token_id is None:
        return None
    return tokenizer.bos_token if tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id] else None


def _render_segments(segments: list[tuple[str, bool]], bos: str | None) -> Rendered:
    """Join (text, trained) segments; the trained ones become the answer spans."""
    text, spans = bos or "", []
    for piece, trained in segments:
        if trained:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    return Rendered(text, spans, bos)


def _render_llama2(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> Rendered:
    """<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] {user} [/INST] ..."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    turns = [m for m in _plain_messages(messages) if m["role"] != "system"]
    segments = []
    for number, message in enumerate(turns):
        if message["role"] == "user":
            content = (
                f"<<SYS>>\n{system}\n<</SYS>>\n\n{message['content']}" if number == 0 and system else message["content"]
            )
            segments.append((("" if number == 0 else tokenizer.bos_token) + f"[INST] {content} [/INST]", False))
        else:
            segments.append((f" {message['content']} {tokenizer.eos_token}", True))
    return _render_segments(segments, tokenizer.bos_token)


def _render_llama3(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> Rendered:
    """<|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>..."""

    def header(role: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    segments = []
    for message in _plain_messages(messages):
        if message["role"] == "assistant":
            segments.append((message["content"] + "<|eot_id|>", True))
        else:
            after = header("assistant") if message["role"] == "user" else ""
            segments.append((header(message["role"]) + message["content"] + "<|eot_id|>" + after, False))
    return _render_segments(segments, "<|begin_of_text|>")


def _render_chatml(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> Rendered:
    """<|im_start|>{role}\\n{content}<|im_end|>\\n ...; the newline after an answer is not trained."""
    segments = []
    for message in _plain_messages(messages):
        if message["role"] == "assistant":
            segments += [(message["content"] + "<|im_end|>", True), ("\n", False)]
        else:
            after = "<|im_start|>assistant\n" if message["role"] == "user" else ""
            segments.append((f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n{after}", False))
    return _render_segments(segments[:-1], _default_bos(tokenizer))


def _render_alpaca(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> Rendered:
    """{preamble}\\n\\n### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n{answer}</s>"""
    system = messages[0]["content"] if messages[0]["role"] == "system" else ALPACA_PREAMBLE
    segments = [(f"{system}\n\n", False)]
    for message in messages:
        if message["role"] == "user":
            extra = f"\n\n### Input:\n{message['input']}" if message.get("input") else ""
            segments.append((f"### Instruction:\n{message['content']}{extra}\n\n### Response:\n", False))
        elif message["role"] == "assistant":
            segments += [(message["content"] + tokenizer.eos_token, True), ("\n\n", False)]
    return _render_segments(segments[:-1], _default_bos(tokenizer))


def _render_tokenizer_template(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> Rendered:
    """The model's own chat template. Each answer's span is what rendering the conversation up to that
    answer adds to rendering it up to the assistant header before it, without the blank after its end."""
    messages = _plain_messages(messages)

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
    bos = _default_bos(tokenizer)
    if bos and not text.startswith(bos):
        text, spans = bos + text, [(start + len(bos), end + len(bos)) for start, end in spans]
    elif tokenizer.bos_token and text.startswith(tokenizer.bos_token):
        bos = tokenizer.bos_token
    return Rendered(text, spans, bos)


TEMPLATES: dict[str, Callable[[list[dict], PreTrainedTokenizerBase], Rendered]] = {
    "tokenizer": _render_tokenizer_template,
    "llama2": _render_llama2,
    "llama3": _render_llama3,
    "chatml": _render_chatml,
    "alpaca": _render_alpaca,
}


# Tokens a template writes that must be single tokens of the tokenizer.
_TEMPLATE_TOKENS = {
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
    for token in _TEMPLATE_TOKENS[template](tokenizer):
        if token is None or token not in vocab:
            raise TunelineError(
                f"params.yaml: dataset.template: '{template}' needs the token {token or '(BOS/EOS)'}, "
                f"which the tokenizer "
                f"in {tokenizer_dir} does not have; choose the template the model was trained with (or 'tokenizer')"
            )


# The marker each named template writes, which a chat template of the same family writes too.
_MARKERS = {"llama2": "[INST]", "llama3": "<|start_header_id|>", "chatml": "<|im_start|>", "alpaca": "### Instruction:"}


def template_mismatch(template: str, tokenizer: PreTrainedTokenizerBase, tokenizer_dir: Path) -> str | None:
    """A one-line warning when a named template writes a marker that the tokenizer's own chat template does
    not: the model learnt its own format, not this one (nor a hybrid such as llama2 on SmolLM2, whose BOS is
    ChatML's <|im_start|>). None for `tokenizer`, and for a tokenizer without a chat template: a base model has
    no format of its own that a named template could contradict."""
    if template == "tokenizer" or not tokenizer.chat_template:
        return None
    own = tokenizer.get_chat_template()
    if _MARKERS[template] in own:
        return None
    family = next((name for name, marker in _MARKERS.items() if marker in own), None)
    uses = f"'{_MARKERS[family]}' (as {family} does)" if family else "markers of its own"
    return (
        f"params.yaml: dataset.template: '{template}' writes '{_MARKERS[template]}', but the chat template of the "
        f"tokenizer in {tokenizer_dir} uses {uses}, so the model would learn a format it was never trained on; "
        f"set dataset.template: tokenizer (the model's own chat template)" + (f" or {family}" if family else "")
    )
