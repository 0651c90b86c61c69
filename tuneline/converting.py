"""Converting: turn fetched weights into a standard Hugging Face model directory of safetensors shards.

Reads a GGUF file (dequantized by transformers), a Hugging Face directory with safetensors or sharded
pytorch_model-*.bin, or a Meta-style consolidated.*.pth with params.json and tokenizer.model; writes the
config and the weights in one dtype as safetensors shards (optionally also one torch state dict, `PTH_FILE`),
and the tokenizer with its chat template to a directory of its own.
Safetensors, .bin and Meta .pth checkpoints are streamed tensor by tensor (tuneline.tensor_io): whatever the
model's size, a conversion holds a few tensors at a time. GGUF tensors are read and dequantized one by one too;
only `write_pth` (one torch state dict) holds the whole model.
"""

import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, PretrainedConfig

from tuneline.artifacts import check_free_space, sha256_file, write_json
from tuneline.errors import TunelineError
from tuneline.lineage import BASE_SOURCE_FILE, FETCH_MANIFEST, file_hashes, source_revision
from tuneline.modeling import DTYPES, check_family, meta_model, quantized_layers, weight_bytes
from tuneline.tensor_io import (
    LazyTensor, loaded_in_order, read_bytes, read_safetensors, read_torch_file, write_safetensors,
)

PTH_FILE = "model.pth"
# Meta checkpoint names -> Hugging Face Llama names; {i} is the layer index.
META_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}
# Model-parallel Meta shards split these along dim 1 (all other matrices along dim 0; norms are copies).
META_CONCAT_DIM1 = ("tok_embeddings", "attention.wo", "feed_forward.w2")


def convert(
    *, src_dir: Path, out_dir: Path, tokenizer_dir: Path, dtype: str, max_shard_size: int, write_pth: bool
) -> str:
    """Convert the checkpoint in `src_dir` into Hugging Face weights at `out_dir` and its tokenizer at
    `tokenizer_dir`; return the source format."""
    _verify_fetched(src_dir)
    gguf_files = sorted(src_dir.glob("*.gguf"))
    meta_shards = sorted(src_dir.glob("consolidated.*.pth"))
    if gguf_files:
        config, tokenizer, tensors = _read_gguf(gguf_files[0])
        source_format = "gguf"
    elif (src_dir / "config.json").exists():
        config, tokenizer, tensors = _read_hf_dir(src_dir)
        source_format = "huggingface"
    elif meta_shards:
        config, tokenizer, tensors = _read_meta(src_dir, meta_shards)
        source_format = "meta"
    else:
        found = ", ".join(sorted(path.name for path in src_dir.iterdir())) or "nothing"
        raise TunelineError(
            f"convert: {src_dir} holds no *.gguf, Hugging Face checkpoint (config.json) or "
            f"consolidated.*.pth; found: {found}"
        )
    architecture = _supported_architecture(config, tensors, src_dir)
    # Serving engines and llama.cpp's converter read the class from config.json; transformers' GGUF loader leaves
    # it out.
    config.architectures = config.architectures or [architecture]
    config.dtype = dtype
    check_free_space(out_dir, weight_bytes(config, dtype) * (2 if write_pth else 1))
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(tokenizer_dir)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # tied to the embeddings; safetensors stores each tensor once
    shapes = {name: tensor.shape for name, tensor in tensors.items()}
    write_safetensors(out_dir, shapes, loaded_in_order(tensors), DTYPES[dtype], max_shard_size,
                      description="convert: writing")
    if write_pth:
        torch.save({name: tensor.load().to(DTYPES[dtype]) for name, tensor in tensors.items()}, out_dir / PTH_FILE)
    write_json(out_dir / BASE_SOURCE_FILE, _base_source(src_dir, source_format, dtype))
    return source_format


def _supported_architecture(config: PretrainedConfig, tensors: dict[str, LazyTensor], src_dir: Path) -> str:
    """The causal-LM class transformers builds from `config`. Refuses here, before any training, a family the
    pipeline cannot fine-tune and merge: transformers cannot build it, 4-bit loading quantizes none of its layers,
    or its checkpoint names the quantized weights otherwise than its modules (transformers renames them on load;
    the merge rebuilds the quantization by name)."""
    model = meta_model(config)
    check_family(model)
    stored_otherwise = sorted(f"{name}.weight" for name in quantized_layers(model) if f"{name}.weight" not in tensors)
    if stored_otherwise:
        raise TunelineError(
            f"convert: {src_dir}: model family '{config.model_type}': the checkpoint holds no tensor "
            f"{', '.join(stored_otherwise[:2])} (it names its weights otherwise; transformers renames them on load); "
            "load it with transformers and save_pretrained, then fetch that folder"
        )
    return type(model).__name__


def _verify_fetched(src_dir: Path) -> None:
    """Check every file the fetch manifest lists, size then sha256, before any library reads it: a truncated or
    corrupted download is one clear line here, not a crash deep inside a GGUF or safetensors reader."""
    manifest_path = src_dir / FETCH_MANIFEST
    if not manifest_path.is_file():
        return  # a folder converted outside the pipeline: nothing to check against
    for name, entry in json.loads(manifest_path.read_text())["files"].items():
        path = src_dir / name
        problem = None
        if not path.is_file():
            problem = "is missing"
        elif path.stat().st_size != entry["size"]:
            problem = f"has {path.stat().st_size} bytes, the download had {entry['size']} (truncated?)"
        elif sha256_file(path) != entry["sha256"]:
            problem = "does not match the sha256 it was fetched with (corrupted?)"
        if problem:
            raise TunelineError(f"{path}: {problem}; fetch it again: dvc repro --force fetch")


def _base_source(src_dir: Path, source_format: str, dtype: str) -> dict:
    """Where these weights came from: the fetch manifest (source URI, sha256 of each file) and the conversion.

    Travels with the base weights, so the lineage of every model trained on them can name their origin.
    """
    manifest_path = src_dir / FETCH_MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        source = manifest["source"]
        files = {name: entry["sha256"] for name, entry in manifest["files"].items()}
    else:  # converted outside the pipeline, straight from a folder
        source, files = str(src_dir), file_hashes(src_dir)
    return {"source": source, "revision": source_revision(source), "files": files,
            "format": source_format, "dtype": dtype}


def _read_gguf(path: Path) -> tuple[PretrainedConfig, object, dict[str, LazyTensor]]:
    """Read a GGUF file's config and tokenizer through transformers, and its tensors lazily: each is read from the
    file and dequantized only when it is written, with transformers' own GGUF name mapping and per-architecture
    fixes (such as Llama's query and key row order)."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, load_gguf_checkpoint, read_field,
    )

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        parsed = load_gguf_checkpoint(path)  # the metadata transformers reads, without the tensors
        reader = GGUFReader(path)  # maps the file; only the pages of the tensor index are touched
    except (ValueError, OSError, KeyError, struct.error) as error:  # struct.error: cut short in its header
        raise TunelineError(f"convert: {path} could not be read as GGUF: {error or type(error).__name__}") from None
    processor = TENSOR_PROCESSORS.get(read_field(reader, "general.architecture")[0], TensorProcessor)(
        config=parsed["config"]
    )
    shapes = meta_model(config)
    hf_names = get_gguf_hf_weights_map(shapes, processor)
    hf_shapes = {name: tuple(tensor.shape) for name, tensor in shapes.state_dict().items()}
    tensors = {}
    for tensor in reader.tensors:  # in file order; tensors without a model weight (rope_freqs) are skipped
        if tensor.name in hf_names:
            read = partial(_dequantized_gguf_tensor, path, tensor, processor, hf_names, parsed)
            tensors[hf_names[tensor.name]] = LazyTensor(hf_shapes[hf_names[tensor.name]], torch.float32, read)
    return config, tokenizer, tensors


def _dequantized_gguf_tensor(path: Path, tensor, processor, hf_names: dict[str, str], parsed: dict) -> torch.Tensor:
    """One GGUF tensor read with a plain file read (not through the map) and dequantized as transformers does."""
    from gguf import dequantize

    raw = read_bytes(path, tensor.data_offset, tensor.n_bytes).numpy().view(tensor.data.dtype)
    weights = dequantize(raw.reshape(tensor.data.shape), tensor.tensor_type)
    result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=hf_names,
                               parsed_parameters=parsed)
    return torch.from_numpy(np.copy(result.weights)).to(torch.float32)


def _read_hf_dir(src_dir: Path) -> tuple[PretrainedConfig, object, dict[str, LazyTensor]]:
    config = AutoConfig.from_pretrained(src_dir)
    tokenizer = AutoTokenizer.from_pretrained(src_dir)
    shards = sorted(src_dir.glob("*.safetensors")) or sorted(src_dir.glob("pytorch_model*.bin"))
    if not shards:
        raise TunelineError(f"convert: {src_dir} has config.json but no *.safetensors or pytorch_model*.bin")
    tensors: dict[str, LazyTensor] = {}
    for shard in shards:
        tensors.update(read_safetensors(shard) if shard.suffix == ".safetensors" else read_torch_file(shard))
    return config, tokenizer, tensors


def _read_meta(src_dir: Path, shards: list[Path]) -> tuple[PretrainedConfig, object, dict[str, LazyTensor]]:
    """Read a Meta-style checkpoint: params.json, tokenizer.model and consolidated.NN.pth shards."""
    from transformers import LlamaTokenizer

    for required in ("params.json", "tokenizer.model"):
        if not (src_dir / required).exists():
            raise TunelineError(f"convert: {src_dir / required} is missing; a Meta checkpoint needs it")
    params = json.loads((src_dir / "params.json").read_text())
    parts = [read_torch_file(shard) for shard in shards]
    state = {name: merge_meta_parts(name, [part[name] for part in parts]) for name in parts[0]}
    n_heads = params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    config = LlamaConfig(
        vocab_size=state["tok_embeddings.weight"].shape[0],
        hidden_size=params["dim"],
        intermediate_size=state["layers.0.feed_forward.w1.weight"].shape[0],
        num_hidden_layers=params["n_layers"],
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        rms_norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=params.get("rope_theta", 10000.0),
        tie_word_embeddings=False,
    )
    advice = "copy the checkpoint's own tokenizer.model there"
    try:
        # from_pretrained reads tokenizer.model through sentencepiece + protobuf; in transformers 5 the
        # vocab_file= constructor ignores the file and builds an empty tokenizer without a word.
        with _quiet_transformers():
            tokenizer = LlamaTokenizer.from_pretrained(src_dir)
    except (ValueError, OSError):  # transformers' own message suggests installing tiktoken: not the cause
        raise TunelineError(
            f"convert: {src_dir / 'tokenizer.model'} is not a readable SentencePiece model; {advice}"
        ) from None
    if not tokenizer("hello world", add_special_tokens=False)["input_ids"]:  # an empty file reads as 3 tokens
        raise TunelineError(
            f"convert: {src_dir / 'tokenizer.model'} encodes no text (it holds {len(tokenizer)} tokens); {advice}"
        )
    return config, tokenizer, hf_named_meta_tensors(state, n_heads, n_kv_heads)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Keep transformers' warnings about a file it cannot read off stderr: our error says it in one line."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def merge_meta_parts(name: str, parts: list[LazyTensor]) -> LazyTensor:
    """One tensor from its model-parallel slices, concatenated when it is read."""
    if len(parts) == 1 or len(parts[0].shape) == 1:
        return parts[0]
    dim = 1 if any(key in name for key in META_CONCAT_DIM1) else 0
    shape = list(parts[0].shape)
    shape[dim] = sum(part.shape[dim] for part in parts)
    return LazyTensor(tuple(shape), parts[0].dtype, lambda: torch.cat([part.load() for part in parts], dim=dim))


def hf_named_meta_tensors(state: dict[str, LazyTensor], n_heads: int, n_kv_heads: int) -> dict[str, LazyTensor]:
    """The Meta tensors under Hugging Face names, the query and key rows permuted as they are read."""
    renamed = {}
    for meta_name, tensor in state.items():
        if "rope.freqs" in meta_name:
            continue  # recomputed by the model
        pattern, layer = meta_name, None
        if meta_name.startswith("layers."):
            layer = meta_name.split(".")[1]
            pattern = meta_name.replace(f"layers.{layer}.", "layers.{i}.", 1)
        if pattern.endswith(("wq.weight", "wk.weight")):
            heads = n_heads if pattern.endswith("wq.weight") else n_kv_heads
            tensor = LazyTensor(tensor.shape, tensor.dtype, partial(_permuted_rotary, tensor, heads))
        renamed[META_TO_HF[pattern].format(i=layer)] = tensor
    return renamed


def _permuted_rotary(tensor: LazyTensor, n_heads: int) -> torch.Tensor:
    return _permute_rotary(tensor.load(), n_heads)


def _permute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta interleaves each head's rotary pairs; Hugging Face Llama expects them split into halves."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
