"""Convert: turn fetched weights into a standard Hugging Face model directory of safetensors shards.

    python -m stages.convert FETCHED_DIR OUT_DIR TOKENIZER_DIR

Reads a GGUF file (dequantized by transformers), a Hugging Face directory with safetensors or sharded
pytorch_model-*.bin, or a Meta-style consolidated.*.pth with params.json and tokenizer.model. Writes
the config and the weights in `convert.dtype` as shards of at most `convert.max_shard_size` (with
`convert.write_pth` also one torch state dict, `model.pth`) to OUT_DIR, and the tokenizer with its chat
template to TOKENIZER_DIR: a separate output, so that the dataset stage reruns when the tokenizer changes
and not when only the weights do.
Safetensors, .bin and Meta .pth checkpoints are streamed tensor by tensor (tuneline.tensor_io): whatever the
model's size, the stage holds a few tensors at a time. GGUF tensors are read and dequantized one by one too;
only `convert.write_pth` (one torch state dict) holds the whole model. The readers are in tuneline/converting.py.
"""

import sys
from pathlib import Path

from tuneline.artifacts import atomic_dir, parse_size
from tuneline.converting import convert
from tuneline.errors import exit_on_error
from tuneline.params import ConvertParams, load_section


@exit_on_error
def main() -> None:
    if len(sys.argv) != 4:
        sys.exit("usage: python -m stages.convert FETCHED_DIR OUT_DIR TOKENIZER_DIR")
    params: ConvertParams = load_section("convert")
    src_dir, out_dir, tokenizer_dir = map(Path, sys.argv[1:])
    max_shard_size = parse_size(params.max_shard_size, "convert.max_shard_size")
    with atomic_dir(out_dir) as tmp, atomic_dir(tokenizer_dir) as tokenizer_tmp:
        source_format = convert(
            src_dir=src_dir, out_dir=tmp, tokenizer_dir=tokenizer_tmp, dtype=params.dtype,
            max_shard_size=max_shard_size, write_pth=params.write_pth,
        )
    print(f"converted {source_format} checkpoint {src_dir} -> {out_dir} ({params.dtype})")


if __name__ == "__main__":
    main()
