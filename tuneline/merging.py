"""Merging: add the LoRA delta to the dequantized NF4 base, in fp32, and measure how well it matches the QLoRA model.

The adapter was trained against the NF4-quantized base, not the original weights. So `merge` rebuilds that
exact quantization (the spec saved beside the adapter), dequantizes every quantized weight, adds
scale * B @ A in fp32 where an adapter exists, and casts to the requested dtype. It streams: each base tensor
is read, quantized with bitsandbytes exactly as 4-bit loading did for training, dequantized, merged, cast and
written before the next is read (tuneline.tensor_io), so the merge holds a few tensors and the adapter,
whatever the model's size.

The merged directory carries its own lineage (lineage.json, and the same facts in every safetensors header)
and a Hugging Face model card (README.md). The fidelity figures compare the QLoRA model with the merged one
and with the two usual merges: peft's merge_and_unload into the 4-bit model and into the original weights.
"""

import json
import math
from collections.abc import Iterator
from pathlib import Path

import bitsandbytes as bnb
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

from tuneline.artifacts import check_free_space, parse_size, write_json
from tuneline.errors import TunelineError
from tuneline.fidelity import fidelity, held_out_batches, held_out_sequences
from tuneline.lineage import (
    ADAPTER_LINEAGE_FILE, LINEAGE_FILE, METADATA_KEY, code_version, file_hashes, tree_sha256, utc_now,
)
from tuneline.modeling import (
    DTYPES, QuantSpec, device, is_transposed, load_full_model, load_quantized_model, load_tokenizer,
    meta_model, quantized_layers, weight_bytes,
)
from tuneline.params import MergeParams
from tuneline.tensor_io import LazyTensor, loaded_in_order, read_checkpoint, read_safetensors, write_safetensors

_ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _lora_factors(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """For each adapted weight, by its base tensor name: LoRA's A and B in fp32 and the scale, alpha/r (or
    alpha/sqrt(r) with rsLoRA) as peft computes it."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = read_safetensors(adapter_dir / _ADAPTER_WEIGHTS)
    factors = {}
    for key, lora_a in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        rank = lora_a.shape[0]
        scale = config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)
        lora_b = tensors[key.replace(".lora_A.", ".lora_B.")]
        factors[f"{module}.weight"] = (lora_a.load().float(), lora_b.load().float(), scale)
    return factors


def dequantized_nf4(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The weight the QLoRA model computed with: quantized as 4-bit loading quantizes it (from the compute
    dtype, in bitsandbytes' default blocks), dequantized to the compute dtype, in fp32."""
    weight = weight.to(device(), DTYPES[spec.compute_dtype])
    packed, state = bnb.functional.quantize_4bit(
        weight, compress_statistics=spec.double_quant, quant_type=spec.quant_type
    )
    return bnb.functional.dequantize_4bit(packed, state).to(torch.float32)


def _merged_tensors(
    base: dict[str, LazyTensor], quantized: dict[str, bool], factors: dict, spec: QuantSpec
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every weight of the merged model in fp32, in the base checkpoint's order, one at a time.

    `quantized`: the weights 4-bit loading quantizes, each with whether it is stored transposed (Conv1D: 4-bit
    loading quantizes its transpose, and LoRA's B @ A has that shape too). Quantized weights without an adapter
    are dequantized too: the trained model computed with those dequantized weights, not with the originals. The
    rest were loaded in the compute dtype, and stay so.
    """
    for name, tensor in loaded_in_order(base):
        if name in quantized:
            transposed = quantized[name]
            weight = dequantized_nf4(tensor.T if transposed else tensor, spec)
            if name in factors:
                lora_a, lora_b, scale = factors[name]
                weight += (lora_b.to(weight.device) @ lora_a.to(weight.device)) * scale
            if transposed:
                weight = weight.T.contiguous()
        else:
            weight = tensor.to(device(), DTYPES[spec.compute_dtype]).to(torch.float32)
        yield name, weight.cpu()


def write_merged_model(
    base_dir: Path, adapter_dir: Path, tokenizer, out_dir: Path, dtype: str, max_shard_size: int, lineage: dict
) -> None:
    """Stream the dequantize-then-merge model into `out_dir`: config, tokenizer and safetensors shards."""
    spec = QuantSpec.load(adapter_dir)
    config = AutoConfig.from_pretrained(base_dir)
    base = read_checkpoint(base_dir)
    if config.tie_word_embeddings:
        base.pop("lm_head.weight", None)  # tied to the embeddings; safetensors stores each tensor once
    layers = quantized_layers(meta_model(config))
    quantized = {f"{name}.weight": is_transposed(layer) for name, layer in layers.items()}
    factors = _lora_factors(adapter_dir)
    unmatched = sorted(set(factors) - set(quantized))
    if unmatched:
        raise TunelineError(f"{adapter_dir}: adapter weights for {', '.join(unmatched[:3])} match no quantized "
                            f"linear layer of {base_dir}; was it trained on this base?")
    config.dtype = dtype
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    metadata = {"format": "pt", METADATA_KEY: json.dumps(lineage)}  # a copied shard still says where it came from
    shapes = {name: tensor.shape for name, tensor in base.items()}
    write_safetensors(out_dir, shapes, _merged_tensors(base, quantized, factors, spec), DTYPES[dtype],
                      max_shard_size, metadata, description="merge: writing")


def merge(*, base_dir: Path, adapter_dir: Path, dataset_dir: Path, params: MergeParams, out_dir: Path) -> dict:
    """Write the dequantize-then-merge model to `out_dir` and return the fidelity metrics."""
    spec = QuantSpec.load(adapter_dir)
    tokenizer = load_tokenizer(dataset_dir / "tokenizer")  # the training tokenizer, pad token included
    max_shard_size = parse_size(params.max_shard_size, "merge.max_shard_size")
    check_free_space(out_dir, weight_bytes(AutoConfig.from_pretrained(base_dir), params.dtype))
    lineage = _merged_lineage(adapter_dir, params)
    write_merged_model(base_dir, adapter_dir, tokenizer, out_dir, params.dtype, max_shard_size, lineage)
    qlora_model = PeftModel.from_pretrained(load_quantized_model(base_dir, spec), adapter_dir).eval()
    candidates = {
        # What was written, loaded the plain way (no peft, no bitsandbytes), computed in the dtype the QLoRA model
        # computes in (like with like: bf16 on a GPU by default, fp32 on the CPU).
        "ours": AutoModelForCausalLM.from_pretrained(out_dir, dtype=DTYPES[spec.compute_dtype],
                                                     device_map={"": qlora_model.device}),
        # The usual merges, for comparison: peft's merge_and_unload into the 4-bit model (the sum is
        # re-quantized to 4 bit) and into the original, never-quantized weights.
        "into_4bit": PeftModel.from_pretrained(load_quantized_model(base_dir, spec), adapter_dir).merge_and_unload(),
        "into_original": PeftModel.from_pretrained(load_full_model(base_dir), adapter_dir).merge_and_unload(),
    }
    sequences = held_out_sequences(dataset_dir, params.num_prompts)
    batches = held_out_batches(tokenizer, sequences)
    figures = fidelity(qlora_model, {name: model.eval() for name, model in candidates.items()}, batches)
    lineage["merge"]["fidelity"] = {"kl": figures["ours"]["kl"], "top1_agreement": figures["ours"]["top1"],
                                    "prompts": len(sequences), "compute_dtype": spec.compute_dtype}
    lineage["files"] = file_hashes(out_dir)  # before lineage.json and README.md exist: the model's own files
    write_json(out_dir / LINEAGE_FILE, lineage)
    (out_dir / "README.md").write_text(_model_card(lineage))
    return {
        "kl": figures["ours"]["kl"],
        "top1_agreement": figures["ours"]["top1"],
        "kl_merge_into_4bit": figures["into_4bit"]["kl"],
        "top1_merge_into_4bit": figures["into_4bit"]["top1"],
        "kl_merge_into_original": figures["into_original"]["kl"],
        "top1_merge_into_original": figures["into_original"]["top1"],
        "dtype": params.dtype,
        "compute_dtype": spec.compute_dtype,
        "prompts": len(sequences),
        "positions": sum(int(inputs["attention_mask"].sum()) for inputs in batches),
    }


def _merged_lineage(adapter_dir: Path, params: MergeParams) -> dict:
    """What produced the merged model: the adapter's lineage (base, data, train params), the adapter's own
    sha256, how it was merged, the code version and when."""
    adapter_lineage_file = adapter_dir / ADAPTER_LINEAGE_FILE
    inherited = json.loads(adapter_lineage_file.read_text()) if adapter_lineage_file.is_file() else {}
    return {
        "produced_at": utc_now(),
        "code": code_version(Path.cwd()),
        "base": inherited.get("base"),
        "dataset": inherited.get("dataset"),
        "train": inherited.get("train"),
        "training": inherited.get("training"),
        "adapter": {"sha256": tree_sha256(adapter_dir)},
        "merge": {
            "method": "NF4 quantization rebuilt as trained, dequantized, + LoRA delta (scale * B @ A) in float32",
            "params": params.model_dump(mode="json"),
        },
    }


def _model_card(lineage: dict) -> str:
    """A Hugging Face style README.md: what the model is, what made it, how well it matches the trained one."""
    base, dataset, train = lineage["base"] or {}, lineage["dataset"] or {}, lineage["train"] or {}
    training, merge, code = lineage["training"] or {}, lineage["merge"], lineage["code"]
    source = base.get("source", "unknown")
    front_matter = "library_name: transformers\npipeline_tag: text-generation\ntags: [tuneline, qlora, merged]"
    if source.startswith("hf://"):
        front_matter = f"base_model: {source.removeprefix('hf://').split('@')[0]}\n{front_matter}"
    counts = dataset.get("counts", {})
    train_params = ", ".join(f"{key} {train[key]}" for key in _CARD_TRAIN_KEYS if key in train)
    dirty = " (with uncommitted changes)" if code["dirty"] else ""
    return f"""---
{front_matter}
---

# QLoRA fine-tune of {source}, merged

Made by the tuneline pipeline. Loads with plain transformers, no peft or bitsandbytes:
`AutoModelForCausalLM.from_pretrained(this_directory)`.

## Base model
`{source}` (revision `{base.get('revision')}`):
{_sha256_list(base.get('files', {}))}

## Data
{_sha256_list(dataset.get('inputs', {}))}

{counts.get('train', '?')} training and {counts.get('eval', '?')} held-out examples after cleaning \
({counts.get('read', '?')} rows read); the dataset params are in lineage.json.

## Training
QLoRA: {train_params}. {training.get('steps', '?')} steps, final loss {training.get('final_loss', '?')}.

## How it was merged
{merge['method']}, cast to {merge['params']['dtype']}. The adapter was trained against the 4-bit base, so
its delta is added to those dequantized weights, not to the original ones. Against the trained QLoRA model
on {merge['fidelity']['prompts']} held-out examples, both computed in {merge['fidelity']['compute_dtype']}: KL \
{merge['fidelity']['kl']:.2e}, top-1 agreement {merge['fidelity']['top1_agreement']:.4f}.

## Evaluation
The task metrics come from the evaluate stage, after this merge: `tuneline audit <this directory>` in the
pipeline's repository prints them (metrics/eval.json of the commit that recorded this model).

## Lineage
Produced {lineage['produced_at']} from commit `{code['commit']}`{dirty}; adapter sha256 \
`{lineage['adapter']['sha256']}`. Files:
{_sha256_list(lineage['files'])}

## Intended use
Research and evaluation on the task its training data describe. It inherits the base model's licence,
limitations and biases; check its evaluation before relying on it.
"""


def _sha256_list(hashes: dict[str, str]) -> str:
    return "\n".join(f"- `{name}` sha256 `{digest}`" for name, digest in hashes.items()) or "- (not recorded)"


_CARD_TRAIN_KEYS = ("quant_type", "lora_r", "lora_alpha", "target_modules", "learning_rate", "batch_size", "max_steps")
