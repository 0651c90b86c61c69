"""Merge: add the LoRA delta to the dequantized NF4 base, in fp32, and prove it matches the QLoRA model.

    python -m stages.merge BASE_DIR ADAPTER_DIR DATASET_DIR MERGED_DIR METRICS_FILE

The adapter was trained against the NF4-quantized base, not the original weights. So the merge rebuilds
that exact quantization (the spec saved beside the adapter), dequantizes every quantized weight, adds
scale * B @ A in fp32 where an adapter exists, and casts to `merge.dtype`. The result loads with plain
`AutoModelForCausalLM.from_pretrained`, no peft, no bitsandbytes.

It streams (tuneline/merging.py): each base tensor is read, quantized as 4-bit loading did for training,
dequantized, merged, cast and written before the next is read, so the merge holds a few tensors and the
adapter, whatever the model's size. The fidelity check that follows loads the QLoRA model and the merged one,
and the two usual merges.

The merged directory carries its own lineage (lineage.json, and the same facts in every safetensors
header) and a Hugging Face model card (README.md): base, data, params, code version, fidelity.

metrics/merge.json reports KL(QLoRA model || merged model), averaged over every token position of
held-out conversations, and top-1 agreement; and the same two figures for the two usual merges:
peft's merge_and_unload into the 4-bit model (re-quantizes the sum) and into the original weights.
"""

import sys
from pathlib import Path

from tuneline.artifacts import atomic_dir, write_json
from tuneline.errors import exit_on_error
from tuneline.merging import merge
from tuneline.params import MergeParams, load_section


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
