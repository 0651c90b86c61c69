"""`tuneline chat`: talk to the merged model (or a GGUF file) the way the evaluate stage prompts it.

The conversation is rendered with the model's own chat template, after the system prompt the training data was
built with (from the model's lineage), and decoded with params.yaml's `evaluate.generation`; a greedy answer is
therefore the very string the evaluate stage generates for the same conversation (`scoring.generate`). Answers
stream to stdout and nothing else does, so a script can compare them; everything else goes to stderr.

    tuneline chat --prompt "Is a worst radius of 25 malignant?"     one answer, then exit
    printf 'first\\nsecond\\n' | tuneline chat                        one answer per line, history kept
    tuneline chat models/fetched/SmolLM2-135M-Instruct.Q4_1.gguf     a GGUF file, dequantized to float32
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, TextStreamer

from tuneline.errors import TunelineError
from tuneline.lineage import embedded_lineage
from tuneline.modeling import device, end_token_ids, load_full_model, load_tokenizer, pad_batch
from tuneline.params import GenerationParams, load_section
from tuneline.scoring import decoding_options

# Without a params file: greedy (the other knobs are unused by it) and room for a paragraph.
DEFAULT_GENERATION = GenerationParams(
    mode="greedy", max_new_tokens=256, num_beams=1, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
    seed=0,
)
EXIT, RESET = "/exit", "/reset"


def _answer_text(tokenizer: PreTrainedTokenizerBase, new_tokens: list[int], end_ids: set[int]) -> str:
    """The answer in generated tokens, as `scoring.generate` reads it: up to the first end token, without special
    tokens, stripped."""
    ends = [position for position, token in enumerate(new_tokens) if token in end_ids]
    return tokenizer.decode(new_tokens[: ends[0] if ends else None], skip_special_tokens=True).strip()


class _AnswerStreamer(TextStreamer):
    """Writes the answer to `out` while it is generated, ending as exactly `_answer_text` of all its tokens.

    TextStreamer's own `put` decodes afresh after each newline (which can drop a SentencePiece word's space) and
    neither strips nor stops at end-of-turn tokens that are not special; this one decodes every token so far each
    time and writes what the text gained, holding back what may still change: trailing whitespace (stripped if
    the answer ends there) and a trailing U+FFFD (the first bytes of a multi-byte character).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, end_ids: set[int], out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.end_ids, self.out = end_ids, out
        self.tokens: list[int] = []
        self.written = ""

    def put(self, value: torch.Tensor) -> None:
        if self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.tokens += value.reshape(-1).tolist()
        self._write(_answer_text(self.tokenizer, self.tokens, self.end_ids).rstrip("\ufffd").rstrip())

    def end(self) -> None:
        self._write(_answer_text(self.tokenizer, self.tokens, self.end_ids))
        self.next_tokens_are_prompt, self.tokens, self.written = True, [], ""

    def _write(self, text: str) -> None:
        if len(text) > len(self.written) and text.startswith(self.written):
            self.out.write(text[len(self.written):])
            self.out.flush()
            self.written = text


@dataclass
class Chat:
    """A conversation with one model: the system prompt, the turns so far, and the decoding of every answer."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    generation: GenerationParams
    system_prompt: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    def messages(self, user_text: str) -> list[dict[str, str]]:
        """The conversation the model answers next: system prompt, history, then `user_text`."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, *self.history, {"role": "user", "content": user_text}]

    def prompt_ids(self, user_text: str) -> list[int]:
        return self.tokenizer.apply_chat_template(self.messages(user_text), add_generation_prompt=True,
                                                  return_dict=False)

    @torch.no_grad()
    def answer(self, user_text: str, out: TextIO) -> str:
        """Answer `user_text`, streaming the answer to `out`, and add both turns to the history."""
        end_ids = end_token_ids(self.tokenizer)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(end_ids)
        prompt = self.prompt_ids(user_text)
        inputs = pad_batch([prompt], pad_id, side="left")
        # transformers cannot stream beam search: that answer is written once complete.
        streamer = None if self.generation.mode == "beam" else _AnswerStreamer(self.tokenizer, end_ids, out)
        torch.manual_seed(self.generation.seed)  # as scoring.generate: a sampled answer is the same on every rerun
        output = self.model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            eos_token_id=sorted(end_ids),
            pad_token_id=pad_id,
            streamer=streamer,
            **decoding_options(self.generation),
        )
        text = _answer_text(self.tokenizer, output[0, len(prompt):].tolist(), end_ids)
        if streamer is None:
            out.write(text)
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": text}]
        return text

    def reset(self) -> None:
        self.history.clear()


def _check_model_path(path: Path) -> None:
    """Refuse, in one line, a path that is neither a GGUF file nor a directory with config.json."""
    if not path.exists():
        raise TunelineError(f"{path}: not found; run the pipeline first (dvc repro), or pass a merged model "
                            "directory or a .gguf file")
    if not (path.is_file() and path.suffix == ".gguf") and not (path / "config.json").is_file():
        raise TunelineError(f"{path}: not a model; pass a merged model directory (with config.json, as the merge "
                            "stage writes) or a .gguf file")


def load_model(path: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The model and tokenizer of a merged model directory, or of a GGUF file (transformers dequantizes it), in
    float32 as the evaluate stage loads the merged model; `path` is one `_check_model_path` accepts."""
    if path.is_file():
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     device_map={"": device()})
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    else:
        model, tokenizer = load_full_model(path), load_tokenizer(path)
    if not tokenizer.chat_template:
        raise TunelineError(f"{path}: the tokenizer has no chat template, so a conversation cannot be rendered "
                            "for it; pass a chat model")
    return model.eval(), tokenizer


def system_prompt(path: Path) -> str | None:
    """The system prompt the model's training data was built with (dataset.system_prompt, from its lineage);
    None when the lineage does not say or is empty ("" means none)."""
    dataset = (embedded_lineage(path) or {}).get("dataset") or {}
    return (dataset.get("params") or {}).get("system_prompt") or None


def generation_params(params_file: Path) -> GenerationParams | None:
    """params.yaml's `evaluate.generation`; None when there is no params file."""
    return load_section("evaluate", params_file).generation if params_file.is_file() else None


def _describe(path: Path, prompt: str | None, generation: GenerationParams) -> str:
    """The one line at start: model, system prompt and decoding."""
    shown = json.dumps(prompt, ensure_ascii=False) if prompt else "none in the model's lineage"
    return (f"chat: {path}; system prompt: {shown}; decoding: {generation.mode}, "
            f"max_new_tokens {generation.max_new_tokens}")


def _converse(chat: Chat, lines: TextIO, out: TextIO, err: TextIO, marker: str = "") -> None:
    """Answer each line of `lines` until EOF or /exit; /reset clears the history. `marker` is written to `err`
    before each line is read (a prompt, for a terminal)."""
    try:
        while True:
            err.write(marker)
            err.flush()
            line = lines.readline()
            text = line.strip()
            if not line or text == EXIT:
                break
            if text == RESET:
                chat.reset()
                print("chat: history cleared", file=err)
            elif text:
                chat.answer(text, out)
                out.write("\n")
                out.flush()
    except KeyboardInterrupt:  # Ctrl-C ends a terminal session like EOF, without a traceback
        pass
    if marker:
        err.write("\n")


def chat(model_path: Path, prompt: str | None, params_file: Path, stdin: TextIO, stdout: TextIO,
         stderr: TextIO) -> None:
    """`tuneline chat`: answer `prompt` once, or every line of `stdin` in one conversation."""
    _check_model_path(model_path)  # before anything slow
    generation = generation_params(params_file)
    if generation is None:
        generation = DEFAULT_GENERATION
        print(f"chat: {params_file} not found; decoding greedily, max_new_tokens {generation.max_new_tokens}",
              file=stderr)
    model, tokenizer = load_model(model_path)
    session = Chat(model, tokenizer, generation, system_prompt(model_path))
    print(_describe(model_path, session.system_prompt, generation), file=stderr)
    if prompt is not None:
        session.answer(prompt, stdout)
        stdout.write("\n")
        stdout.flush()
    else:
        _converse(session, stdin, stdout, stderr, "> " if stdin.isatty() else "")
