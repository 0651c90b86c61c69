"""Merge: add the LoRA delta to the dequantized NF4 base, in fp32, and prove it matches the QLoRA model.

    python -m stages.merge BASE_DIR ADAPTER_DIR DATASET_DIR MERGED_DIR METRICS_FILE

The adapter was trained against the NF4-quantized base, not the original weights. So the merge rebuilds
that exact quantization (the spec saved beside the adapter), dequantizes every quantized weight, adds
scale * B @ A in fp32 where an adapter exists, and casts to `merge.dtype`. The result loads with plain
`AutoModelForCausalLM.from_pretrained`, no peft, no bitsandbytes.

metrics/merge.json reports KL(QLoRA model || merged model), averaged over every token position of
held-out conversations, and top-1 agreement; and the same two figures for the two usual merges:
peft's merge_and_unload into the 4-bit model (re-quantizes the sum) and into the original weights.
"""

import sys
from collections.abc import Iterator
from pathlib import Path

import bitsandbytes as bnb
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from tuneline.artifacts import TensorWriter, atomic_dir, parse_size, write_json
from tuneline.errors import exit_on_error
from tuneline.modeling import (
    DTYPES, QuantSpec, load_full_model, load_quantized_model, load_tokenizer, pad_batch, read_split,
)
from tuneline.params import MergeParams, load_section


def dequantize(layer: bnb.nn.Linear4bit) -> torch.Tensor:
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.float32)


def lora_delta(layer: LoraLayer) -> torch.Tensor:
    """scale * B @ A in fp32, scale being alpha/r (or alpha/sqrt(r) with rsLoRA), as peft computes it."""
    lora_a = layer.lora_A["default"].weight.to(torch.float32)
    lora_b = layer.lora_B["default"].weight.to(torch.float32)
    return (lora_b @ lora_a) * layer.scaling["default"]


def merged_tensors(qlora_model: PeftModel) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every weight of the merged model in fp32, under the base model's own tensor names.

    Quantized layers without an adapter are dequantized too: the trained model computed with those
    dequantized weights, not with the originals.
    """
    base = qlora_model.get_base_model()
    tied = base.config.tie_word_embeddings
    lora_prefixes: list[str] = []
    for name, module in base.named_modules():
        if any(name.startswith(prefix) for prefix in lora_prefixes):
            continue  # the adapter's own sub-modules and its wrapped base layer
        if isinstance(module, LoraLayer):
            lora_prefixes.append(name + ".")
            layer = module.get_base_layer()
            yield f"{name}.weight", dequantize(layer) + lora_delta(module)
            if layer.bias is not None:
                yield f"{name}.bias", layer.bias.to(torch.float32)
        elif isinstance(module, bnb.nn.Linear4bit):
            yield f"{name}.weight", dequantize(module)
            if module.bias is not None:
                yield f"{name}.bias", module.bias.to(torch.float32)
        else:
            for param_name, param in module.named_parameters(recurse=False):
                if tied and f"{name}.{param_name}" == "lm_head.weight":
                    continue
                yield f"{name}.{param_name}", param.detach().to(torch.float32)


def write_merged_model(qlora_model: PeftModel, tokenizer, out_dir: Path, dtype: str, max_shard_size: int) -> None:
    config = qlora_model.get_base_model().config.__class__.from_dict(qlora_model.get_base_model().config.to_dict())
    del config.quantization_config
    config.dtype = dtype
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    with TensorWriter(out_dir, max_shard_size) as writer:
        for name, tensor in merged_tensors(qlora_model):
            writer.save_tensor(name, tensor.to(DTYPES[dtype]))


@torch.no_grad()
def fidelity(reference: torch.nn.Module, candidates: dict[str, torch.nn.Module], batches: list) -> dict[str, dict]:
    """For each candidate: KL(reference || candidate) per token position, averaged, and top-1 agreement.

    Computed in float64: the exact merge's KL is ~1e-8, below float32's rounding noise.
    """
    kl_sum = dict.fromkeys(candidates, 0.0)
    agree = dict.fromkeys(candidates, 0)
    positions = 0
    for inputs in batches:
        mask = inputs["attention_mask"].bool()
        positions += int(mask.sum())
        log_p = torch.log_softmax(reference(**inputs).logits.double(), -1)
        for name, candidate in candidates.items():
            log_q = torch.log_softmax(candidate(**inputs).logits.double(), -1)
            kl_sum[name] += (log_p.exp() * (log_p - log_q)).sum(-1)[mask].sum().item()
            agree[name] += (log_p.argmax(-1) == log_q.argmax(-1))[mask].sum().item()
    return {name: {"kl": kl_sum[name] / positions, "top1": agree[name] / positions} for name in candidates}


def held_out_batches(tokenizer, sequences: list[list[int]], batch_size: int = 8) -> list:
    pad_id = tokenizer.pad_token_id
    return [pad_batch(sequences[i : i + batch_size], pad_id) for i in range(0, len(sequences), batch_size)]


def merge(*, base_dir: Path, adapter_dir: Path, dataset_dir: Path, params: MergeParams, out_dir: Path) -> dict:
    """Write the dequantize-then-merge model to `out_dir` and return the fidelity metrics."""
    spec = QuantSpec.load(adapter_dir)
    tokenizer = load_tokenizer(dataset_dir / "tokenizer")  # the training tokenizer, pad token included
    qlora_model = PeftModel.from_pretrained(load_quantized_model(base_dir, spec), adapter_dir).eval()
    max_shard_size = parse_size(params.max_shard_size, "merge.max_shard_size")
    write_merged_model(qlora_model, tokenizer, out_dir, params.dtype, max_shard_size)
    candidates = {
        # What was written, loaded the plain way (no peft, no bitsandbytes), computed in fp32.
        "ours": AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, device_map={"": qlora_model.device}),
        # The usual merges, for comparison: peft's merge_and_unload into the 4-bit model (the sum is
        # re-quantized to 4 bit) and into the original, never-quantized weights.
        "into_4bit": PeftModel.from_pretrained(load_quantized_model(base_dir, spec), adapter_dir).merge_and_unload(),
        "into_original": PeftModel.from_pretrained(load_full_model(base_dir), adapter_dir).merge_and_unload(),
    }
    sequences = [list(ids) for ids in read_split(dataset_dir / "eval.parquet")["input_ids"][: params.num_prompts]]
    batches = held_out_batches(tokenizer, sequences)
    figures = fidelity(qlora_model, {name: model.eval() for name, model in candidates.items()}, batches)
    return {
        "kl": figures["ours"]["kl"],
        "top1_agreement": figures["ours"]["top1"],
        "kl_merge_into_4bit": figures["into_4bit"]["kl"],
        "top1_merge_into_4bit": figures["into_4bit"]["top1"],
        "kl_merge_into_original": figures["into_original"]["kl"],
        "top1_merge_into_original": figures["into_original"]["top1"],
        "dtype": params.dtype,
        "prompts": len(sequences),
        "positions": sum(int(inputs["attention_mask"].sum()) for inputs in batches),
    }


@exit_on_error
def main() -> None:
    if len(sys.argv) != 6:
        sys.exit("usage: python -m stages.merge BASE_DIR ADAPTER_DIR DATASET_DIR MERGED_DIR METRICS_FILE")
    params: MergeParams = load_section("merge")
    base_dir, adapter_dir, dataset_dir, merged_dir, metrics_file = map(Path, sys.argv[1:])
    with atomic_dir(merged_dir) as tmp:
        metrics = merge(base_dir=base_dir, adapter_dir=adapter_dir, dataset_dir=dataset_dir, params=params, out_dir=tmp)
        write_json(metrics_file, metrics)
    print(f"merge: KL {metrics['kl']:.2e} (top-1 {metrics['top1_agreement']:.4f}); "
          f"into 4-bit KL {metrics['kl_merge_into_4bit']:.2e}; "
          f"into original KL {metrics['kl_merge_into_original']:.2e}")


if __name__ == "__main__":
    main()
