"""Exporting: the merged model as GGUF files for llama.cpp and Ollama, checked against the merged model.

A GGUF file holds the weights under llama.cpp's tensor names (gguf-py's own name maps), the hyperparameters
llama.cpp reads, the tokenizer (tokens, merges, BOS/EOS/pad and end-of-turn ids), the chat template and the
model's lineage (`tuneline.lineage`, the merged model's lineage.json plus how the file was made). Each family
differs from Hugging Face's layout in a few known ways, undone by transformers' GGUF loader: Llama permutes
the rows of q and k for its rotary embedding, GPT-2 stores Conv1D weights transposed. Writing streams: the
tensor list is planned from the shapes, then each tensor is read, converted, quantized and written before the
next is read, so writing a file holds one tensor at a time (the check that follows loads whole models).

The `gguf` package quantizes f32, f16, bf16, q8_0, q4_0, q4_1, q5_0 and q5_1. llama.cpp's K-quants (q4_k_m...)
need llama-cpp-python (`pip install 'tuneline[llama-cpp]'`): its quantizer runs on an f32 file written first.

Fidelity: each file is read back through transformers' GGUF loader and compared with the merged model on the
held-out prompts the merge uses (KL, top-1) and by greedy answers; where llama-cpp-python is installed, the
same figures come from llama.cpp itself. A float file must match the merged model as well as the merged model
rounded to that dtype in torch does; anything else means the file does not say what the model computes (a
config GGUF cannot carry), and the export fails naming the config keys the reader gets wrong.
"""

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from tuneline.errors import TunelineError
from tuneline.fidelity import fidelity, greedy_answers, held_out_batches, held_out_prompts, held_out_sequences
from tuneline.lineage import LINEAGE_FILE, METADATA_KEY, tree_sha256
from tuneline.modeling import END_OF_TURN_TOKENS, end_token_ids, load_tokenizer
from tuneline.ollama import modelfile
from tuneline.params import ExportParams
from tuneline.tensor_io import LazyTensor, loaded_in_order, read_checkpoint

MODELFILE = "Modelfile"
# Types the gguf package writes itself; llama.cpp's K-quants need llama-cpp-python.
PYTHON_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
LLAMA_CPP_TYPES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
FLOAT_TYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Family:
    """How one model family is written as GGUF: llama.cpp's architecture and what differs from HF's layout."""

    arch: str  # llama.cpp's name: general.architecture and the prefix of its hyperparameters
    permute_qk: bool = False  # Llama-style: q and k rows interleaved for llama.cpp's rotary embedding
    transposed: tuple[str, ...] = ()  # GPT-2: Conv1D weights, stored [in, out] by HF, [out, in] by GGUF
    key_length: bool = False  # head_dim is written (and read back) as attention.key_length


FAMILIES = {
    "llama": Family("llama", permute_qk=True),
    "mistral": Family("llama", permute_qk=True),  # llama.cpp runs Mistral as llama (without a sliding window)
    "qwen2": Family("qwen2"),
    "qwen3": Family("qwen3", key_length=True),
    "phi3": Family("phi3"),
    "gpt2": Family("gpt2", transposed=(".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight",
                                       ".mlp.c_proj.weight")),
}


def export_family(config: PretrainedConfig) -> Family:
    """The family's GGUF layout, or one line saying why this model cannot be exported."""
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise TunelineError(
            f"model family '{config.model_type}': no GGUF export (tuneline exports {', '.join(sorted(FAMILIES))}, "
            "the families llama.cpp's GGUF and transformers' GGUF reader both know); set export.types: [] to skip it"
        )
    rope_type = _rope(config).get("rope_type", "default")
    if rope_type != "default":
        raise TunelineError(f"model family '{config.model_type}': rope_type '{rope_type}' is not exported to GGUF "
                            "yet (only the default rotary embedding); set export.types: [] to skip the export")
    return family


def _rope(config: PretrainedConfig) -> dict:
    """The rotary embedding's parameters (for Gemma 3, those of its full-attention layers)."""
    rope = getattr(config, "rope_parameters", None) or {}
    return rope.get("full_attention", rope)


def hyperparameters(config: PretrainedConfig, family: Family) -> dict[str, int | float]:
    """The `<arch>.*` keys llama.cpp (and transformers' GGUF reader) take the model's shape from."""
    if family.arch == "gpt2":
        return {
            "context_length": config.n_positions, "embedding_length": config.n_embd, "block_count": config.n_layer,
            "feed_forward_length": config.n_inner or 4 * config.n_embd, "attention.head_count": config.n_head,
            "attention.layer_norm_epsilon": config.layer_norm_epsilon,
        }
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    keys = {
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers,
        "feed_forward_length": config.intermediate_size,
        "attention.head_count": config.num_attention_heads,
        "attention.head_count_kv": config.num_key_value_heads,
        "attention.layer_norm_rms_epsilon": config.rms_norm_eps,
        "rope.freq_base": _rope(config).get("rope_theta", 10000.0),
        "rope.dimension_count": int(head_dim * getattr(config, "partial_rotary_factor", 1.0)),
        "vocab_size": config.vocab_size,
    }
    if family.key_length:
        keys |= {"attention.key_length": head_dim, "attention.value_length": head_dim}
    return keys


def _permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's layout of a Llama q/k projection: each head's two rotary halves interleaved row by row."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def to_gguf_layout(name: str, tensor: torch.Tensor, config: PretrainedConfig, family: Family) -> torch.Tensor:
    """A Hugging Face tensor as llama.cpp stores it (the inverse of what transformers' GGUF loader does)."""
    if family.permute_qk and name.endswith("self_attn.q_proj.weight"):
        return _permute_rows(tensor, config.num_attention_heads)
    if family.permute_qk and name.endswith("self_attn.k_proj.weight"):
        return _permute_rows(tensor, config.num_key_value_heads)
    if name.endswith(family.transposed):
        return tensor.T.contiguous()
    return tensor


def _gguf_tensor_names(config: PretrainedConfig, family: Family, names: list[str]) -> dict[str, str]:
    """HF tensor name -> GGUF tensor name, through gguf-py's map for the architecture."""
    import gguf

    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == family.arch)
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    mapped = {}
    for name in names:
        stem, _, suffix = name.rpartition(".")
        gguf_name = name_map.get_name(stem)
        if gguf_name is None:
            raise TunelineError(f"model family '{config.model_type}': tensor {name} has no GGUF name in llama.cpp's "
                                f"map for {family.arch}; this checkpoint cannot be exported")
        mapped[name] = f"{gguf_name}.{suffix}"
    return mapped


def tensor_type(shape: tuple[int, ...], export_type: str):
    """The GGML type a tensor is stored in: 1-D tensors (norms, biases) in f32, as llama.cpp's converter does;
    2-D ones in the export type, or f16 where the row does not divide into the type's blocks."""
    import gguf

    if len(shape) < 2 or export_type == "f32":
        return gguf.GGMLQuantizationType.F32
    qtype = gguf.GGMLQuantizationType[export_type.upper()]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
               "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1"}


def check_tokenizer(tokenizer_json: dict) -> None:
    """The tokenizer is byte-level BPE, which GGUF calls 'gpt2' (SmolLM, Llama 3, Qwen, GPT-2): the one kind
    whose export is checked against transformers' and llama.cpp's readers."""
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style BPE (byte fallback)" if model.get("byte_fallback") else model.get("type")
        raise TunelineError(f"tokenizer.json: a {kind} tokenizer is not exported to GGUF yet (byte-level BPE "
                            "tokenizers are); set export.types: [] to skip the export")


# llama.cpp picks its pre-tokenizer regex by name; these are the names of the usual tokenizer.json pre-tokenizers.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer ('default' when it is none of the known ones)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    regex = next((step.get("pattern", {}).get("Regex") for step in steps if step.get("type") == "Split"), None)
    return {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}.get(regex, "default")


def _vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every token by id, padded to the embedding's rows, with llama.cpp's token types (as its converter)."""
    import gguf

    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(added[index].content)
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            token = by_id[index]
            tokens.append(token)
            is_byte = token.startswith("<0x") and token.endswith(">") and len(token) == 6
            types.append(gguf.TokenType.BYTE if is_byte else gguf.TokenType.NORMAL)
    return tokens, [int(kind) for kind in types]


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn: the chat template's end-of-turn token, else EOS."""
    vocab = tokenizer.get_vocab()
    return next((vocab[token] for token in END_OF_TURN_TOKENS if token in vocab), tokenizer.eos_token_id)


def _add_tokenizer(writer, model_dir: Path, tokenizer, vocab_size: int) -> None:
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text())
    check_tokenizer(tokenizer_json)
    tokens, types = _vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = tokenizer_json["model"].get("merges", [])
    writer.add_token_merges([merge if isinstance(merge, str) else " ".join(merge) for merge in merges])
    for role in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{role}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{role}_token_id")(token_id)
    writer.add_eot_token_id(end_of_turn_id(tokenizer))
    writer.add_add_bos_token(tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _tensor_plan(base: dict[str, LazyTensor], config: PretrainedConfig, family: Family) -> dict[str, str]:
    """The merged checkpoint's tensors in the order they are written, by their GGUF names."""
    names = [name for name in base if not name.endswith("rotary_emb.inv_freq")]
    return _gguf_tensor_names(config, family, names)


def write_gguf(model_dir: Path, out_file: Path, export_type: str, lineage: dict) -> None:
    """Stream the merged model in `model_dir` into one GGUF file of `export_type` (one of PYTHON_TYPES)."""
    import gguf

    config = AutoConfig.from_pretrained(model_dir)
    family = export_family(config)
    tokenizer = load_tokenizer(model_dir)
    base = read_checkpoint(model_dir)
    names = _tensor_plan(base, config, family)
    writer = gguf.GGUFWriter(out_file, family.arch)
    writer.add_name(str((lineage.get("base") or {}).get("source", model_dir.name)))
    writer.add_finetune("tuneline")
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[export_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in hyperparameters(config, family).items():
        add = writer.add_float32 if isinstance(value, float) else writer.add_uint32
        add(f"{family.arch}.{key}", value)
    _add_tokenizer(writer, model_dir, tokenizer, config.vocab_size)
    writer.add_string(METADATA_KEY, json.dumps(lineage))  # `tuneline audit FILE.gguf` reads it
    types = {}
    for name, gguf_name in names.items():
        shape = base[name].shape if not name.endswith(family.transposed) else base[name].shape[::-1]
        types[name] = tensor_type(tuple(shape), export_type)
        nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(shape, types[name])))
        writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), nbytes, raw_dtype=types[name])
    writer.write_header_to_file(out_file)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, tensor in tqdm(loaded_in_order({name: base[name] for name in names}), total=len(names),
                             desc=f"export: writing {out_file.name}", unit="tensor"):
        data = to_gguf_layout(name, tensor.float(), config, family).numpy()
        writer.write_tensor_data(gguf.quants.quantize(data, types[name]))
    writer.close()


def quantize_with_llama_cpp(f32_file: Path, out_file: Path, export_type: str) -> None:
    """llama.cpp's own quantizer (K-quants), from an f32 GGUF."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{export_type.upper()}")
    status = llama_cpp.llama_model_quantize(str(f32_file).encode(), str(out_file).encode(), ctypes.byref(params))
    if status != 0:
        raise TunelineError(f"{out_file}: llama.cpp's quantizer failed (status {status}) on {f32_file}")


def llama_cpp_installed() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def check_types(types: list[str]) -> None:
    """Every requested type is one tuneline writes here; K-quants need llama-cpp-python."""
    for export_type in types:
        if export_type in PYTHON_TYPES:
            continue
        if export_type in LLAMA_CPP_TYPES:
            if not llama_cpp_installed():
                raise TunelineError(f"params.yaml: export.types: {export_type} needs llama.cpp: pip install "
                                    f"'tuneline[llama-cpp]' (it builds llama.cpp), or use one of "
                                    f"{', '.join(PYTHON_TYPES)}")
            continue
        raise TunelineError(f"params.yaml: export.types: unknown type '{export_type}'; use "
                            f"{', '.join(PYTHON_TYPES)} or, with llama.cpp, {', '.join(LLAMA_CPP_TYPES)}")


# ------------------------------------------------------------------------------------------ fidelity


def load_gguf_model(path: Path, model_dir: Path) -> torch.nn.Module:
    """A GGUF file as transformers reads it (dequantized to float32); one line when it cannot, naming the config
    values of the merged model in `model_dir` that the file reads back differently."""
    try:
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    except Exception as error:  # noqa: BLE001 - whatever transformers' reader trips on, say what the file lacks
        differences = "; ".join(config_differences(model_dir, path)) or "no config key differs"
        first_line = (str(error).splitlines() or [""])[0]
        raise TunelineError(f"{path.name}: transformers' GGUF reader cannot load it back ({type(error).__name__}: "
                            f"{first_line}); as read back: {differences}") from None


def rounded_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The model with every matrix rounded to `dtype`, as a float GGUF of that dtype stores it."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in rounded.parameters():
            if parameter.dim() >= 2:
                parameter.copy_(parameter.to(dtype).float())
    return rounded


def config_differences(model_dir: Path, gguf_file: Path) -> list[str]:
    """Config values of the merged model that the GGUF reads back differently: what GGUF could not carry."""
    merged = AutoConfig.from_pretrained(model_dir).to_dict()
    read_back = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).to_dict()
    ignored = {"architectures", "dtype", "transformers_version", "_name_or_path", "_model_name_or_path", "model_type",
               "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "initializer_range"}
    return [f"{key} {merged[key]!r} (read back as {read_back.get(key)!r})" for key in sorted(merged)
            if key not in ignored and not _same_value(merged[key], read_back.get(key))]


def _same_value(value: object, read_back: object) -> bool:
    """Equal, floats as GGUF stores them (float32)."""
    if isinstance(value, float) and isinstance(read_back, float):
        return float(np.float32(value)) == float(np.float32(read_back))
    return value == read_back


@dataclass(frozen=True)
class HeldOut:
    """The held-out conversations every file is checked on, and the merged model's figures on them."""

    sequences: list[list[int]]  # whole conversations: KL and top-1
    batches: list  # the same, padded
    prompts: list[list[int]]  # up to the answer: greedy answers
    expected: list[list[int]]  # the merged model's greedy answers
    logits: list[np.ndarray]  # the merged model's on each conversation, for llama.cpp's figures (else empty)


# ---------------------------------------------------------------------------------------- llama.cpp


def llama_cpp_figures(path: Path, tokenizer, held_out: HeldOut, max_new_tokens: int) -> dict:
    """The GGUF file run by llama.cpp itself: KL and top-1 against the merged model's logits, greedy answers,
    and whether llama.cpp tokenizes the prompts' text as the training tokenizer does."""
    from llama_cpp import Llama

    end_ids = end_token_ids(tokenizer)
    context = max(len(ids) for ids in [*held_out.sequences, *held_out.prompts]) + max_new_tokens + 8
    llm = Llama(model_path=str(path), n_ctx=context, logits_all=True, verbose=False, seed=0,
                n_threads=os.cpu_count())  # llama-cpp-python's default is half the cores
    kl_sum, agree, positions = 0.0, 0, 0
    for ids, reference in zip(held_out.sequences, held_out.logits):
        llm.reset()
        llm.eval(ids)
        log_p = _log_softmax(reference.astype(np.float64))
        log_q = _log_softmax(np.asarray(llm.scores[: len(ids)], dtype=np.float64))
        kl_sum += float((np.exp(log_p) * (log_p - log_q)).sum())
        agree += int((log_p.argmax(-1) == log_q.argmax(-1)).sum())
        positions += len(ids)
    answers = []
    for prompt in held_out.prompts:
        llm.reset()
        llm.eval(prompt)
        tokens: list[int] = []
        while len(tokens) < max_new_tokens and not (tokens and tokens[-1] in end_ids):
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(tokens[-1:])
        answers.append(tokens)
    texts = [tokenizer.decode(prompt) for prompt in held_out.prompts]
    same_tokens = [llm.tokenize(text.encode(), add_bos=False, special=True)
                   == tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    return {"kl": kl_sum / positions, "top1_agreement": agree / positions,
            "greedy_equal": sum(a == b for a, b in zip(answers, held_out.expected)) / len(answers),
            "tokenization_equal": sum(same_tokens) / len(same_tokens)}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@torch.no_grad()
def reference_logits(model, sequences: list[list[int]]) -> list[np.ndarray]:
    return [model(input_ids=torch.tensor([ids])).logits[0].float().numpy() for ids in sequences]


# ------------------------------------------------------------------------------------------- the stage


def export(*, model_dir: Path, dataset_dir: Path, params: ExportParams, out_dir: Path) -> dict:
    """Write one GGUF file per `params.types` and the Ollama Modelfile to `out_dir`; return the fidelity report."""
    check_types(params.types)
    if not params.types:
        return {"files": {}, "llama_cpp": llama_cpp_installed()}
    export_family(AutoConfig.from_pretrained(model_dir))
    lineage = json.loads((model_dir / LINEAGE_FILE).read_text()) if (model_dir / LINEAGE_FILE).is_file() else {}
    merged_sha256 = tree_sha256(model_dir)
    files = {}
    for export_type in params.types:
        files[export_type] = out_dir / f"model-{export_type}.gguf"
        file_lineage = lineage | {"export": {"type": export_type, "merged_sha256": merged_sha256}}
        if export_type in PYTHON_TYPES:
            write_gguf(model_dir, files[export_type], export_type, file_lineage)
        else:
            f32_file = out_dir / f"model-{export_type}.f32.gguf"
            write_gguf(model_dir, f32_file, "f32", file_lineage)
            quantize_with_llama_cpp(f32_file, files[export_type], export_type)
            f32_file.unlink()
    tokenizer = load_tokenizer(model_dir)
    system_prompt = ((lineage.get("dataset") or {}).get("params") or {}).get("system_prompt")
    header = (f"Made by tuneline's export stage from {model_dir} (sha256 {merged_sha256}).\n"
              f"ollama create <name> -f {MODELFILE}    (FROM names one of: {', '.join(params.types)})")
    (out_dir / MODELFILE).write_text(modelfile(tokenizer, files[params.types[0]].name, system_prompt, header))
    merged = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sequences = held_out_sequences(dataset_dir, params.num_prompts)
    prompts = held_out_prompts(dataset_dir, params.num_prompts)
    held_out = HeldOut(sequences, held_out_batches(tokenizer, sequences), prompts,
                       greedy_answers(merged, tokenizer, prompts, params.max_new_tokens),
                       reference_logits(merged, sequences) if llama_cpp_installed() else [])
    report = {export_type: verify(path, export_type, model_dir, merged, tokenizer, held_out, params)
              for export_type, path in files.items()}
    return {"merged_sha256": merged_sha256, "prompts": len(sequences), "files": report,
            "llama_cpp": llama_cpp_installed()}


def verify(path: Path, export_type: str, model_dir: Path, merged, tokenizer, held_out: HeldOut,
           params: ExportParams) -> dict:
    """One GGUF file against the merged model: read back by transformers (and by llama.cpp where installed)."""
    candidates = {"gguf": load_gguf_model(path, model_dir)}
    if export_type in FLOAT_TYPES:
        candidates["rounded"] = rounded_model(merged, FLOAT_TYPES[export_type])
    figures = fidelity(merged, candidates, held_out.batches)
    answers = greedy_answers(candidates["gguf"], tokenizer, held_out.prompts, params.max_new_tokens)
    report = {
        "file": path.name,
        "size_bytes": path.stat().st_size,
        "kl": figures["gguf"]["kl"],
        "top1_agreement": figures["gguf"]["top1"],
        "greedy_equal": sum(a == b for a, b in zip(answers, held_out.expected)) / len(held_out.expected),
    }
    if export_type in FLOAT_TYPES:
        report["kl_rounding"] = figures["rounded"]["kl"]  # the merged model rounded to this dtype, in torch
        report["within_rounding"] = report["kl"] <= 1.01 * report["kl_rounding"] + 1e-9
        if not report["within_rounding"]:
            carried = "; ".join(config_differences(model_dir, path)) or "no config key differs"
            raise TunelineError(
                f"{path.name}: does not compute what the merged model computes (KL {report['kl']:.2e}, rounding "
                f"to {export_type} alone gives {report['kl_rounding']:.2e}); as read back from GGUF: {carried}")
    if params.max_kl is not None and report["kl"] > params.max_kl:
        raise TunelineError(f"{path.name}: KL {report['kl']:.2e} against the merged model exceeds export.max_kl "
                            f"{params.max_kl:g}; export a finer type (q8_0, f16) or raise export.max_kl")
    if llama_cpp_installed():
        report["llama_cpp"] = llama_cpp_figures(path, tokenizer, held_out, params.max_new_tokens)
    return report
