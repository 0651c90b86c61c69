"""Convert and merge a Llama-2-7B-shaped checkpoint in bounded memory, at disk speed: peak RSS and throughput.

    python benchmarks/merge_7b.py                  # ~35 GB of disk under ~/.cache/tuneline/bench-7b, ~10 min
    python benchmarks/merge_7b.py --small          # the same on a ~60 MB model, for CI (tests/integration/test_benchmarks.py)

Builds once, and keeps: a checkpoint with Llama-2-7B's exact tensor names and shapes and random bf16 weights,
as sharded pytorch_model-*.bin like the original Hugging Face release, and a rank-16 all-linear LoRA adapter.
Then, in this run, each in a fresh process after the input's pages are dropped from the page cache:
  1. the disk's own sequential write and read speed (a file as large as a shard, fsynced, read back);
  2. the convert stage's function: .bin shards -> safetensors (models/base-like);
  3. the merge stage's streaming writer: NF4 quantize -> dequantize -> + LoRA delta in fp32 -> bf16 shards;
  4. for comparison, peft's merge_and_unload on the same model loaded in bf16 (run when it fits in the free
     RAM, otherwise computed from the tensor sizes, and said so).
For each: wall time, bytes read + written per second and that as a share of what the disk alone would take
(read bytes / read speed + written bytes / write speed), and peak RSS. Targets: peak RSS <= 2 GiB,
throughput >= 50 % of the disk's. The figures also go to benchmarks/results/merge_7b.json (not with --small,
unless --out names a file), from which `python docs/figures.py` writes them into docs/performance.md.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from math import prod
from pathlib import Path

import psutil
import torch
from measure import peak_rss
from peft import LoraConfig, PeftModel
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from tqdm import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from tuneline.converting import convert
from tuneline.merging import dequantized_nf4, write_merged_model
from tuneline.modeling import QuantSpec, layer_features, load_tokenizer, meta_model, quantized_layers
from tuneline.tensor_io import plan_shards

GiB = 2**30
RSS_TARGET = 2 * GiB
THROUGHPUT_TARGET = 0.5
LORA_RANK = 16
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Llama-2-7B (meta-llama/Llama-2-7b-hf config.json); --small keeps the architecture, shrinks the sizes.
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, tie_word_embeddings=False)
SMALL = dict(LLAMA2_7B, vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=8)
BIN_SHARD_BYTES = 5 * 10**9  # the original release has two .bin shards of up to 10 GB; 5 GB keeps building lighter
RESULTS = Path(__file__).resolve().parent / "results" / "merge_7b.json"


# ------------------------------------------------------------------------------------------ building (once)


def tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    return {name: tuple(param.shape) for name, param in meta_model(config).state_dict().items()}


def save_tokenizer(directory: Path) -> None:
    """A small word-level tokenizer: the converter copies a tokenizer along, and its vocabulary is irrelevant."""

    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)


def build_bin_checkpoint(directory: Path, config, generator: torch.Generator) -> None:
    """Random bf16 weights (std 0.02, norms at 1) in pytorch_model-0000N-of-0000M.bin shards with their index."""
    shapes = tensor_shapes(config)
    shards = plan_shards(shapes, torch.bfloat16.itemsize, BIN_SHARD_BYTES)
    tmp = directory.with_name(directory.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    save_tokenizer(tmp)
    weight_map = {}
    for index, names in enumerate(tqdm(shards, desc="building the .bin checkpoint")):
        file_name = f"pytorch_model-{index + 1:05d}-of-{len(shards):05d}.bin"
        state = {}
        for name in names:
            if len(shapes[name]) == 1:
                state[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                state[name] = (torch.randn(shapes[name], generator=generator) * 0.02).to(torch.bfloat16)
        torch.save(state, tmp / file_name)
        weight_map.update(dict.fromkeys(names, file_name))
        del state
    total = sum(prod(shape) for shape in shapes.values()) * 2
    (tmp / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    tmp.rename(directory)


def build_adapter(directory: Path, config, generator: torch.Generator) -> None:
    """A rank-16 LoRA on every linear layer, as the train stage saves one (peft files + quantization spec)."""
    tmp = directory.with_name(directory.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {}
    for name, layer in quantized_layers(meta_model(config)).items():
        prefix = f"base_model.model.{name}"
        in_features, out_features = layer_features(layer)
        weights[f"{prefix}.lora_A.weight"] = torch.randn(LORA_RANK, in_features, generator=generator) * 0.01
        weights[f"{prefix}.lora_B.weight"] = torch.randn(out_features, LORA_RANK, generator=generator) * 0.01
    save_file(weights, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=TARGET_MODULES,
               task_type="CAUSAL_LM").save_pretrained(tmp)
    QuantSpec("nf4", True, "float32").save(tmp)  # the train defaults on CPU
    tmp.rename(directory)


# --------------------------------------------------------------------------------- the phases, each in a child


def drop_from_page_cache(paths: list[Path]) -> None:
    """Make the next read of these files come from the disk, not from memory (clean pages only)."""
    for path in paths:
        with path.open("rb") as file:
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def disk_speed(directory: Path, size: int) -> dict:
    """Sequential write (fsynced) and read speed of the disk under `directory`, in bytes/s."""
    path = directory / "disk-speed.tmp"
    block = os.urandom(16 * 2**20)
    started = time.perf_counter()
    with path.open("wb", buffering=0) as file:
        for _ in range(size // len(block)):
            file.write(block)
        os.fsync(file.fileno())
    write_seconds = time.perf_counter() - started
    drop_from_page_cache([path])
    started = time.perf_counter()
    with path.open("rb", buffering=0) as file:
        while file.read(len(block)):
            pass
    read_seconds = time.perf_counter() - started
    path.unlink()
    written = size // len(block) * len(block)
    return {"write": written / write_seconds, "read": written / read_seconds}


def run_convert(source: Path, out: Path) -> None:
    out.mkdir(parents=True)
    convert(src_dir=source, out_dir=out, tokenizer_dir=out / "tokenizer", dtype="bfloat16",
            max_shard_size=5 * 10**9, write_pth=False)


def run_merge(base: Path, adapter: Path, out: Path) -> None:
    out.mkdir(parents=True)
    write_merged_model(base, adapter, load_tokenizer(base / "tokenizer"), out, "bfloat16", 5 * 10**9, lineage={})


def run_peft_merge(base: Path, adapter: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    PeftModel.from_pretrained(model, adapter).merge_and_unload()


def nf4_rate(config) -> float:
    """Parameters per second that bitsandbytes' NF4 quantize -> dequantize round trip (the merge's compute)
    reaches on this machine, on the largest layer of the model."""
    weight = torch.randn(config.intermediate_size, config.hidden_size).to(torch.bfloat16)
    spec = QuantSpec("nf4", True, "float32")
    dequantized_nf4(weight, spec)  # warm-up
    started = time.perf_counter()
    for _ in range(3):
        dequantized_nf4(weight, spec)
    return 3 * weight.numel() / (time.perf_counter() - started)


def child(phase: str, args: list[str]) -> None:
    """Run one phase in this fresh process and print its wall time and this process's peak RSS as JSON."""
    paths = [Path(arg) for arg in args]
    started = time.perf_counter()
    {"convert": run_convert, "merge": run_merge, "peft": run_peft_merge}[phase](*paths)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "peak_rss": peak_rss()}))


def in_child(phase: str, *paths: Path) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", phase, *map(str, paths)],
                            stdout=subprocess.PIPE, text=True, check=True)  # progress bars go to the terminal
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------ report


def files_size(directory: Path, pattern: str) -> int:
    return sum(path.stat().st_size for path in directory.glob(pattern))


def phase_result(figures: dict, read: int, written: int, disk: dict) -> dict:
    """A phase's wall time and peak RSS with its bytes, and the share of the disk's speed it reached."""
    disk_seconds = read / disk["read"] + written / disk["write"]
    return {**figures, "read_bytes": read, "written_bytes": written, "disk_seconds": disk_seconds,
            "disk_share": disk_seconds / figures["seconds"]}


def report_line(label: str, result: dict) -> str:
    read, written, share = result["read_bytes"], result["written_bytes"], result["disk_share"]
    rss_ok = "ok" if result["peak_rss"] <= RSS_TARGET else "OVER"
    speed_ok = "ok" if share >= THROUGHPUT_TARGET else "UNDER"
    return (f"{label:<8} {result['seconds']:7.1f} s  read {read / 1e9:6.2f} GB + wrote {written / 1e9:6.2f} GB = "
            f"{(read + written) / result['seconds'] / 1e6:5.0f} MB/s, {share:4.0%} of the disk's speed ({speed_ok}: "
            f"target {THROUGHPUT_TARGET:.0%}); peak RSS {result['peak_rss'] / GiB:5.2f} GiB ({rss_ok}: target "
            f"{RSS_TARGET / GiB:.0f} GiB)")


def peft_comparison(base: Path, adapter: Path, config) -> tuple[str, dict]:
    """Run peft's merge_and_unload if the bf16 model fits in the free RAM, else compute what it needs: the report
    line and its figures."""
    model_bytes = sum(prod(shape) for shape in tensor_shapes(config).values()) * 2
    needed = model_bytes + files_size(adapter, "*.safetensors")
    available = psutil.virtual_memory().available
    sizes = {"model_bytes": model_bytes, "needed_bytes": needed, "available_bytes": available}
    if needed * 1.2 > available:
        return (f"peft     merge_and_unload needs the whole model in memory: {needed / GiB:.1f} GiB in bf16 (weights "
                f"{model_bytes / GiB:.1f} GiB + adapter), computed from the tensor sizes; not run, "
                f"{available / GiB:.1f} GiB is free"), {"ran": False, **sizes}
    figures = in_child("peft", base, adapter)
    return (f"peft     merge_and_unload (bf16 model in memory, not saved): {figures['seconds']:.1f} s, peak RSS "
            f"{figures['peak_rss'] / GiB:.2f} GiB (the weights alone are {model_bytes / GiB:.1f} GiB)"), {
        "ran": True, **figures, **sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="a ~60 MB model of the same architecture (CI)")
    parser.add_argument("--cache", type=Path, help="where the checkpoint is built once and outputs are written")
    parser.add_argument("--out", type=Path,
                        help=f"where the figures go as JSON (default: {RESULTS}; none with --small)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1:])
    config = LlamaConfig(**(SMALL if args.small else LLAMA2_7B))
    cache = args.cache or Path.home() / ".cache" / "tuneline" / ("bench-small" if args.small else "bench-7b")
    source, adapter = cache / "llama2-7b-shaped-bin", cache / "adapter-r16"
    generator = torch.Generator().manual_seed(0)
    if not source.is_dir():
        build_bin_checkpoint(source, config, generator)
    if not adapter.is_dir():
        build_adapter(adapter, config, generator)
    base, merged = cache / "converted", cache / "merged"
    for leftover in (base, merged):
        shutil.rmtree(leftover, ignore_errors=True)

    parameters = sum(prod(shape) for shape in tensor_shapes(config).values())
    print(f"model    Llama-2-7B shapes{' (--small: sizes shrunk)' if args.small else ''}: {parameters / 1e9:.2f} B "
          f"parameters, {parameters * 2 / 1e9:.2f} GB in bf16; adapter rank {LORA_RANK} on {len(TARGET_MODULES)} "
          f"linear layers per block; {os.cpu_count()} CPU cores")
    disk = disk_speed(cache, min(4 * GiB, parameters * 2))
    print(f"disk     sequential write {disk['write'] / 1e6:.0f} MB/s (fsynced), read {disk['read'] / 1e6:.0f} MB/s "
          f"(page cache dropped)")

    drop_from_page_cache(list(source.glob("*.bin")))
    figures = in_child("convert", source, base)
    converted = phase_result(figures, files_size(source, "*.bin"), files_size(base, "*.safetensors"), disk)
    print(report_line("convert", converted))

    drop_from_page_cache(list(base.glob("*.safetensors")))
    figures = in_child("merge", base, adapter, merged)
    merge = phase_result(figures, files_size(base, "*.safetensors") + files_size(adapter, "*.safetensors"),
                         files_size(merged, "*.safetensors"), disk)
    print(report_line("merge", merge))
    rate = nf4_rate(config)
    quantized = sum(layer.weight.numel() for layer in quantized_layers(meta_model(config)).values())
    print(f"limit    NF4 quantize + dequantize (bitsandbytes, {torch.get_num_threads()} threads): {rate / 1e6:.0f} M "
          f"params/s, so {quantized / rate:.0f} s of the merge is that compute for {quantized / 1e9:.2f} B quantized "
          f"parameters")
    shutil.rmtree(merged)
    line, peft = peft_comparison(base, adapter, config)
    print(line)
    shutil.rmtree(base)
    if args.out or not args.small:
        results = {
            "small": args.small, "cpu_count": os.cpu_count(), "parameters": parameters,
            "bf16_bytes": parameters * 2, "lora_rank": LORA_RANK, "target_modules": TARGET_MODULES,
            "adapter_bytes": files_size(adapter, "*.safetensors"),
            "disk": {"write_bytes_per_second": disk["write"], "read_bytes_per_second": disk["read"]},
            "convert": converted, "merge": merge,
            "nf4": {"threads": torch.get_num_threads(), "parameters_per_second": rate,
                    "quantized_parameters": quantized, "seconds": quantized / rate},
            "peft": peft,
            "targets": {"peak_rss_bytes": RSS_TARGET, "disk_share": THROUGHPUT_TARGET},
        }
        out = args.out or RESULTS
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results  {out}")


if __name__ == "__main__":
    main()
