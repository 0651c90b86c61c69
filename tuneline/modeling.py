"""Model loading shared by train, merge and evaluate, so the 4-bit base is built the same way in each.

The merge is only exact if it rebuilds the very NF4 quantization the adapter was trained against; train
therefore saves its `QuantSpec` beside the adapter and merge and evaluate load the base through
`load_quantized_model` with that spec.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module

from tuneline.errors import TunelineError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
QUANT_SPEC_FILE = "tuneline_quantization.json"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def auto_compute_dtype() -> str:
    """The dtype 4-bit layers compute in where nothing says otherwise: bf16 on a CUDA GPU that has it, fp16 on one
    that does not (QLoRA's choice); fp32 on the CPU, the path every CPU figure of tuneline was measured on."""
    if not torch.cuda.is_available():
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def available_memory() -> int:
    """Bytes free for training where it will run: the GPU's free memory, else the RAM not in use."""
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


@dataclass(frozen=True)
class QuantSpec:
    """The 4-bit quantization the base was trained under (in bitsandbytes' default blocks of 64)."""

    quant_type: str
    double_quant: bool
    compute_dtype: str

    def bnb_config(self) -> BitsAndBytesConfig:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=DTYPES[self.compute_dtype],
        )

    def save(self, model_dir: Path) -> None:
        (model_dir / QUANT_SPEC_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, model_dir: Path) -> "QuantSpec":
        path = model_dir / QUANT_SPEC_FILE
        if not path.exists():
            raise TunelineError(f"{path}: missing; the adapter was not written by tuneline's train stage")
        return cls(**json.loads(path.read_text()))


# Tokens that close an assistant turn in the usual chat templates, besides the tokenizer's EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def end_token_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The ids that end an answer: EOS and whichever end-of-turn tokens the vocabulary has."""
    vocab = tokenizer.get_vocab()
    return {tokenizer.eos_token_id} | {vocab[token] for token in END_OF_TURN_TOKENS if token in vocab}


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "right"
    return tokenizer


def load_quantized_model(model_dir: Path, spec: QuantSpec) -> torch.nn.Module:
    """Load the base with its linear layers quantized to 4 bit, the rest in the compute dtype."""
    import bitsandbytes as bnb  # here, not at the top: importing it costs seconds the stages that never quantize skip

    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=spec.bnb_config(),
        dtype=DTYPES[spec.compute_dtype],
        device_map={"": device()},
    )
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # On CPUs with AVX512-BF16, bitsandbytes runs eval-mode inference through a fused kernel that
            # computes in bf16 (absmax too) whatever the compute dtype; training never takes that path.
            # Keep inference on the path training used, so the QLoRA model scored is the one trained.
            module.support_avx512bf16_for_cpu = False
    return model


def meta_model(config) -> torch.nn.Module:
    """The model's modules and parameter shapes, on the meta device: no memory, no disk read. A config that
    transformers cannot build as a causal LM (another kind of model, or a family it cannot instantiate) is one
    line naming the family."""
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as error:  # whatever the family's own code raises: the user gets its first line
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TunelineError(
            f"model family '{config.model_type}': transformers cannot build it as a causal language model "
            f"({reason}); tuneline fine-tunes the families AutoModelForCausalLM builds"
        ) from error


def check_family(model: torch.nn.Module) -> None:
    """Refuse, in one line naming the family, a model QLoRA cannot fine-tune: one without a layer 4-bit loading
    quantizes (Falcon's layers subclass Linear, which transformers' bitsandbytes integration leaves alone)."""
    if not quantized_layers(model):
        raise TunelineError(
            f"model family '{model.config.model_type}' ({type(model).__name__}): no layer that 4-bit loading "
            "quantizes (exactly torch.nn.Linear, or Conv1D), so QLoRA has nothing to train; tuneline cannot "
            "fine-tune this family"
        )


def quantized_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The layers 4-bit loading quantizes, by full module name: the ones LoRA may target and merge adds to.

    transformers' own rule (integrations.bitsandbytes.replace_with_bnb_linear): every layer of exactly
    torch.nn.Linear or of Conv1D (GPT-2's transposed linear), but for the modules its quantizer keeps in the
    compute dtype (the output head, tied weights, the last module, the model's _keep_in_fp32_modules).
    """
    kept = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
    return {name: module for name, module in model.named_modules()
            if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, kept)}


def is_transposed(layer: torch.nn.Module) -> bool:
    """Conv1D stores its weight as (in, out), the transpose of Linear's; 4-bit loading quantizes the transpose."""
    return isinstance(layer, Conv1D)


def layer_features(layer: torch.nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a quantized layer, Linear or Conv1D."""
    rows, columns = layer.weight.shape
    return (rows, columns) if is_transposed(layer) else (columns, rows)


def weight_bytes(config, dtype: str) -> int:
    """What the model's weights take in `dtype`."""
    return sum(param.numel() for param in meta_model(config).parameters()) * DTYPES[dtype].itemsize


def load_full_model(model_dir: Path, dtype: str = "float32") -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype], device_map={"": device()})


def read_split(path: Path) -> pd.DataFrame:
    """A tokenized split written by the dataset stage (input_ids, labels, prompt_length, label, choices...)."""
    if not path.exists():
        raise TunelineError(f"{path}: not found; run the dataset stage first (dvc repro dataset)")
    return pd.read_parquet(path)


def pad_batch(sequences: list[list[int]], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad token id lists into model inputs on the model's device.

    Position ids are given explicitly: transformers numbers positions 0..n regardless of the mask, which
    would shift every left-padded row.
    """
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        span = slice(width - len(ids), width) if side == "left" else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(ids)
        attention_mask[row, span] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    return {name: tensor.to(device()) for name, tensor in inputs.items()}
