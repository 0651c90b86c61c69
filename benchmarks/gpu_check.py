"""The device check: the pipeline's CUDA path on one GPU, in one prepared run that prints one table.

    python benchmarks/gpu_check.py --dry-run     # tiny shapes, one step, on the CPU: what CI runs (~30 s on 2 cores)
    python benchmarks/gpu_check.py               # on the H200: full shapes, within --budget (520 s)

On the device machine (one H200; Python 3.12 with torch, transformers, peft, accelerate, pandas, pyarrow; no
network) it runs as one call of the device tool, carrying the wheels benchmarks/gpu_wheels.py gathers (the packages
the GPU path needs that the machine lacks) and the default data set:

    carry: ["benchmarks/wheels", "data/dataset"]        timeout_s: 600
    set -o pipefail; python3 -m pip install -q --no-index --find-links benchmarks/wheels --no-deps --no-compile
    --target /tmp/site -r benchmarks/wheels/requirements.txt || exit 3; export PYTHONPATH=/tmp/site:$PWD
    PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1; python3 benchmarks/gpu_check.py --out $OUT 2>&1 | tee $OUT/gpu_check.log

(one line). The parts, numbered as in issue 17; on the device each runs in its own process under its own time
budget, so a crash, a hang or a failure costs that part alone, and the whole stays inside --budget (--only PART...
reruns some):

  environment  versions (and which differ from pyproject.toml's pins), the GPU, whether every module the parts
               import imports, whether the carried wheels' own requirements are met there
  2 pipeline   the train, merge and evaluate stages, run as dvc.yaml runs them (`python -m stages.NAME PATHS`) with
               params.yaml's own values, train.compute_dtype and train.optim `auto` included, on random weights of
               SmolLM2-135M's shape, the real tokenizer and the default data set (data/dataset). The train line
               says what `auto` resolved to (metrics/train.json), which must be bfloat16 and paged_adamw_8bit on
               the H200 (float32 and adamw_torch on the CPU); merge's fidelity figures are metrics/merge.json's,
               and merge and evaluate must compare in the dtype train computed in
  3 train 7B   benchmarks/train_throughput.py's two runs, the train stage's train() and a plain TRL script, on a
               Llama-2-7B-shaped checkpoint of random weights written here: real tokens/s, peak GPU memory, loss
               per token
  4 merge 7B   benchmarks/merge_7b.py's streaming merge of that checkpoint (NF4 rebuilt on the GPU): seconds, peak
               RSS, and the share of the disk's speed, measured in the same run
  5 CUDA only  paged 8-bit AdamW state, NCCL in one process, bitsandbytes' NF4 round trip on the GPU (on a machine
               without CUDA these say "skipped: no CUDA")

--dry-run (tests/integration/test_gpu_check.py, inside `make test`'s budget) runs every part's code on tiny shapes,
one training step, a few prompts and examples, and, but for the environment part, in this one process: the stages
run through runpy instead of `python -m`, train_throughput's and merge_7b's runs are called instead of started, so
the torch/transformers/TRL stack is imported once instead of a dozen times. Its figures show that the parts run,
not how fast; peak RSS there is the whole process's.

The table goes to stdout; the figures to OUT/gpu_check.json (--out, else $OUT; without either, a full run writes
benchmarks/results/gpu_check.json and a dry run writes none) and each part's log to OUT/gpu_check_logs.txt. dvclive
is not on the device (it drags in dvc): where it cannot be imported, a no-op stand-in takes its place, since train
only logs its loss curve to it. The work folder (about 33 GB on the GPU: the 7B checkpoint and its merge) is deleted
at the end unless --keep.
"""

import argparse
import json
import math
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import chdir, contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from unittest import mock

import yaml

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))  # tuneline, where it is not installed (the device machine)
# tuneline.artifacts' own test for a killed run's temporaries serves this script's stale work folders too.
from tuneline.artifacts import _is_running, write_json  # noqa: E402  (standard library only: the parent stays light)

BENCHMARKS = PROJECT / "benchmarks"
RESULTS = BENCHMARKS / "results" / "gpu_check.json"
GiB = 2**30
# Of the 600 s a device call may run: pip's install of the wheels (~20 s) and the cleanup take the rest.
DEFAULT_BUDGET_S = 520
MIN_PART_S = 15  # a part is not started with less time left than this
# The parts' environment: offline, and no tokenizer threads fighting the training's.
QUIET_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}

# SmolLM2-135M, the default model (params.yaml's fetch); the vocabulary is the data set's tokenizer's (49152).
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=True)
# --dry-run's stand-in for merge_7b.LLAMA2_7B: the same architecture (untied, no GQA), tiny.
TINY_7B = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, rms_norm_eps=1e-5, tie_word_embeddings=False)
# What train.compute_dtype and train.optim `auto` must resolve to (tuneline.training.resolve_device_defaults): QLoRA's
# bf16 and paged 8-bit AdamW on the H200, the CPU path's fp32 and plain AdamW without CUDA.
AUTO_ON_CUDA = {"compute_dtype": "bfloat16", "optim": "paged_adamw_8bit"}
AUTO_ON_CPU = {"compute_dtype": "float32", "optim": "adamw_torch"}
# --dry-run's changes to params.yaml: one step (that trains: warmup's first step has a learning rate of 0, and the
# merge needs a delta), a few prompts and examples, and no launcher (the stage runs in this process: a launcher
# would replace it).
DRY_RUN_PARAMS = {
    "train": {"max_steps": 1, "warmup_steps": 0, "batch_size": 2, "logging_steps": 1, "save_steps": 1,
              "launcher": "none", "num_processes": 1},
    "merge": {"num_prompts": 2},
    "evaluate": {"max_examples": 4, "batch_size": 4, "generation": {"max_new_tokens": 2}},
}
# bitsandbytes pages an optimizer state tensor only from this many elements (optim/optimizer.py, get_state_buffer).
PAGED_MIN_ELEMENTS = 100_000
NF4_MAX_ERROR = 0.12  # mean |dequantized - original| / mean |original| on normal data: 0.091 measured on the CPU
DVCLIVE_STAND_IN = '''"""A no-op stand-in for dvclive (benchmarks/gpu_check.py): train logs its loss curve to a Live."""

import os


class Live:
    def __init__(self, dir="dvclive", **kwargs):
        self.dir, self.step = dir, 0
        os.makedirs(dir, exist_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    def log_metric(self, name, value, **kwargs):
        pass
'''


class PartFailed(Exception):
    """A check a part makes did not hold; the message is the reason shown in the table."""


# ------------------------------------------------------------------------------------------- shared helpers


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    if isinstance(error, PartFailed):
        return text
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _llama_config(shape: dict, tokenizer):
    """A LlamaConfig of `shape` whose vocabulary and special tokens are the tokenizer's."""
    from transformers import LlamaConfig

    config = LlamaConfig(**shape, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config.architectures = ["LlamaForCausalLM"]
    return config


def _tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensors as the convert stage stores them: tied output weights once, as the embeddings."""
    from tuneline.modeling import meta_model

    shapes = {name: tuple(param.shape) for name, param in meta_model(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _write_random_checkpoint(out: Path, config, tokenizer_dir: Path, *, cuda: bool, max_shard_size: int) -> int:
    """Random bf16 weights of `config`'s shapes (std 0.02, norms at 1) in the convert stage's layout: config.json,
    safetensors shards with their index, tokenizer/. Drawn on the GPU when there is one (a 7B draw on the CPU takes
    minutes) and streamed to disk a tensor at a time. Returns the bytes of weights written."""
    import torch

    from tuneline.tensor_io import plan_shards, write_safetensors

    shapes = _tensor_shapes(config)
    order = [name for shard in plan_shards(shapes, 2, max_shard_size) for name in shard]
    device = "cuda" if cuda else "cpu"
    generator = torch.Generator(device).manual_seed(0)

    def tensors():
        for name in order:
            if len(shapes[name]) == 1:
                yield name, torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                weight = torch.randn(shapes[name], generator=generator, device=device, dtype=torch.bfloat16)
                yield name, weight.mul_(0.02).cpu()

    out.mkdir(parents=True)
    config.dtype = "bfloat16"
    config.save_pretrained(out)
    shutil.copytree(tokenizer_dir, out / "tokenizer")
    write_safetensors(out, {name: shapes[name] for name in order}, tensors(), torch.bfloat16, max_shard_size,
                      description="random weights")
    return sum(math.prod(shape) for shape in shapes.values()) * 2


def _exit_reason(what: str, status: object, log: Path) -> str:
    """`WHAT exited with STATUS: its last line of output`, the table's reason for a run that failed."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return f"{what} exited with {status}: {lines[-1] if lines else 'no output'}"


def _run_logged(command: list[str], log: Path, *, cwd: Path = PROJECT, what: str) -> None:
    """Run `command` with its output in `log` (gathered into the logs file at the end); a failure is one line."""
    with log.open("w") as out:
        returncode = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT).returncode
    if returncode:
        raise PartFailed(_exit_reason(what, returncode, log))


@contextmanager
def _output_to(log: Path, what: str) -> Iterator[None]:
    """The block's output in `log`, as a dry run's stand-in for a process of its own: a script's sys.exit with an
    error status fails the part the way that process's exit status would."""
    try:
        with log.open("w") as out, redirect_stdout(out), redirect_stderr(out):
            yield
    except SystemExit as exit_:
        if isinstance(exit_.code, str):  # sys.exit(MESSAGE): Python prints it and exits with 1
            with log.open("a") as out:
                print(exit_.code, file=out)
        if exit_.code:
            status = exit_.code if isinstance(exit_.code, int) else 1
            raise PartFailed(_exit_reason(what, status, log)) from None


def _logs(plan: dict) -> Path:
    return Path(plan["work"]) / "logs"


def _resolved_train_choices(train: dict) -> dict[str, str]:
    """train.compute_dtype and train.optim of `train` (a params.yaml train section) as the train stage resolves
    them on this machine: `auto` by its device, a named value as it is."""
    from tuneline.params import TrainParams
    from tuneline.training import resolve_device_defaults

    resolved = resolve_device_defaults(TrainParams(**train))
    return {"compute_dtype": resolved.compute_dtype, "optim": resolved.optim}


def _peak_gpu() -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def _amount(value: float) -> str:
    """1.23 G, 45.6 M, 7.8 k: counts and bytes in the table, from the 7B run's sizes down to the dry run's."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} "


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GiB:.2f} GiB"


# ------------------------------------------------------------------------------------------- environment


# What the parts need, by distribution name; tuneline's own modules and the two benchmarks are imported too.
DISTRIBUTIONS = ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes", "pydantic",
                 "huggingface-hub", "safetensors", "tokenizers", "pandas", "pyarrow", "numpy", "fsspec")
MODULES = ("torch", "bitsandbytes", "trl", "datasets", "pydantic", "sklearn", "tuneline.training",
           "tuneline.merging", "tuneline.scoring", "train_throughput", "merge_7b")
SHOWN = ("transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "pydantic", "pyarrow")


def _unmet_requirements(names) -> list[str]:
    """`package: requirement (found X)` for each requirement of the carried packages that what is installed here
    does not meet (pip installed them with --no-deps: nothing else checked)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    unmet = []
    for name in names:
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue
            try:
                found = metadata.version(requirement.name)
            except metadata.PackageNotFoundError:
                found = None
            if found is None or not requirement.specifier.contains(found, prereleases=True):
                unmet.append(f"{name}: {text} (found {found or 'none'})")
    return unmet


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    versions = {}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _import_failures(dry_run: bool) -> dict[str, str]:
    """Module -> why it does not import. A dry run only looks for the modules (~15 s saved on 2 cores: the parts
    import them anyway); on the device, a library that does not load is named here, before the parts that need it."""
    import importlib

    failures = {}
    for module in MODULES:
        try:
            if not dry_run:
                importlib.import_module(module)
            elif find_spec(module) is None:
                raise ModuleNotFoundError(f"No module named '{module}'")
        except Exception as error:  # whatever the import raises is the finding
            failures[module] = _first_line(error)
    return failures


def _device(work: str) -> dict:
    import torch

    device = {"cuda": torch.cuda.is_available(), "torch_cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
              "work_free_bytes": shutil.disk_usage(work).free}
    if device["cuda"]:
        properties = torch.cuda.get_device_properties(0)
        device.update(name=properties.name, capability=f"{properties.major}.{properties.minor}",
                      memory_bytes=properties.total_memory, bf16=torch.cuda.is_bf16_supported(),
                      count=torch.cuda.device_count())
    return device


def part_environment(plan: dict, record: Callable[..., None]) -> str:
    """Versions, the accelerator, and whether each module the parts import imports here."""
    import gpu_wheels

    versions, failures, device = _versions(), _import_failures(plan["dry_run"]), _device(plan["work"])
    pins = gpu_wheels.pyproject_pins()
    differ = {name: f"{version} (pinned {pins[name]})" for name, version in versions.items()
              if name in pins and version and version.split("+")[0] != pins[name]}
    unmet = _unmet_requirements(gpu_wheels.wanted())
    dvclive_origin = (find_spec("dvclive").origin or "") if find_spec("dvclive") else ""
    stand_in = str(Path(plan["work"]) / "stand-ins") in dvclive_origin
    record(versions=versions, device=device, import_failures=failures, differ_from_pins=differ,
           unmet_requirements=unmet, dvclive="stand-in" if stand_in else "installed")
    if failures:
        module, reason = next(iter(failures.items()))
        raise PartFailed(f"cannot import {', '.join(failures)} ({module}: {reason})")
    accelerator = (f"{device['name']} (cc {device['capability']}, {_gib(device['memory_bytes'])}, "
                   f"bf16 {'yes' if device['bf16'] else 'no'})" if device["cuda"] else "the CPU (no CUDA)")
    summary = (f"torch {versions['torch']} on {accelerator}; "
               + ", ".join(f"{name} {versions[name]}" for name in SHOWN))
    if differ:
        summary += f"; differ from pyproject pins: {', '.join(f'{name} {text}' for name, text in differ.items())}"
    if unmet:
        summary += f"; unmet: {'; '.join(unmet)}"
    return summary + ("; dvclive: no-op stand-in" if stand_in else "")


# ------------------------------------------------------------------------------------------- 2: the pipeline


def _pipeline(plan: dict) -> dict[str, Path]:
    """The paths of the pipeline run, as dvc.yaml names them, under the work folder."""
    root = Path(plan["work"]) / "pipeline"
    return {"root": root, "base": root / "models" / "base", "adapter": root / "models" / "adapter",
            "merged": root / "models" / "merged", "metrics": root / "metrics", "dataset": Path(plan["dataset"])}


def _deep_update(target: dict, changes: dict) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def _stage(plan: dict, name: str, *paths: Path, metrics: Path) -> dict:
    """Run one stage as dvc.yaml runs it (`python -m stages.NAME PATHS`, beside its params.yaml) and return the
    metrics it wrote to `metrics` (one of PATHS). A dry run runs the module in this process, as runpy runs `-m`."""
    module, arguments = f"stages.{name}", list(map(str, paths))
    log, root = _logs(plan) / f"stage-{name}.log", _pipeline(plan)["root"]
    if plan["dry_run"]:
        with _output_to(log, module), chdir(root), mock.patch.object(sys, "argv", [module, *arguments]):
            runpy.run_module(module, run_name="__main__")
    else:
        _run_logged([sys.executable, "-m", module, *arguments], log, cwd=root, what=module)
    return json.loads(metrics.read_text())


def _expected_train_choices(train: dict, cuda: bool) -> dict[str, str]:
    """What metrics/train.json must say train computed in and stepped with: for `auto` the device's default,
    for a value params.yaml names that value."""
    defaults = AUTO_ON_CUDA if cuda else AUTO_ON_CPU
    return {key: default if train[key] == "auto" else train[key] for key, default in defaults.items()}


def _choices(values: dict) -> str:
    return f"{values['compute_dtype']} + {values['optim']}"


def _steps(count: int) -> str:
    return f"{count} step{'' if count == 1 else 's'}"


def part_train(plan: dict, record: Callable[..., None]) -> str:
    """Random SmolLM2-135M-shaped base, then the train stage with params.yaml's values (`auto` included): what
    `auto` resolved to must be the device's default."""
    from transformers import AutoTokenizer

    paths = _pipeline(plan)
    paths["root"].mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(paths["dataset"] / "tokenizer")
    config = _llama_config(TINY if plan["dry_run"] else SMOLLM2_135M, tokenizer)
    _write_random_checkpoint(paths["base"], config, paths["dataset"] / "tokenizer", cuda=plan["cuda"],
                             max_shard_size=2 * 10**9)
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    _deep_update(params, plan["params"])
    (paths["root"] / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    train = params["train"]
    expected = _expected_train_choices(train, plan["cuda"])
    record(params_compute_dtype=train["compute_dtype"], params_optim=train["optim"], expected=expected,
           batch_size=train["batch_size"], vocab_size=config.vocab_size, layers=config.num_hidden_layers)
    metrics = _stage(plan, "train", paths["base"], paths["dataset"], paths["adapter"], paths["metrics"] / "train.json",
                     paths["root"] / "dvclive" / "train", paths["root"] / "checkpoints" / "train",
                     metrics=paths["metrics"] / "train.json")
    record(**metrics)
    resolved = {key: metrics[key] for key in expected}
    asked = f"{train['compute_dtype']} + {train['optim']}"
    if resolved != expected:
        raise PartFailed(f"params.yaml's {asked} resolved to {_choices(resolved)} on {metrics['device']}, not "
                         f"{_choices(expected)}")
    if plan["cuda"] and not metrics["device"].startswith("cuda"):
        raise PartFailed(f"trained on {metrics['device']} although CUDA is available")
    if not all(math.isfinite(metrics[key]) for key in ("first_loss", "final_loss")):
        raise PartFailed(f"loss {metrics['first_loss']} -> {metrics['final_loss']}")
    return (f"{asked} -> {_choices(resolved)}; {_steps(metrics['steps'])} of {train['batch_size']} "
            f"({metrics['batches']}): loss {metrics['first_loss']} -> {metrics['final_loss']}, "
            f"{metrics['seconds_per_step']} s/step on {metrics['device']}")


def _trained_compute_dtype(plan: dict) -> str:
    return json.loads((_pipeline(plan)["metrics"] / "train.json").read_text())["compute_dtype"]


def _check_compared_in(metrics: dict, plan: dict, stage: str) -> None:
    """Merge and evaluate compare the QLoRA model with the others in the dtype train computed in."""
    trained = _trained_compute_dtype(plan)
    if metrics["compute_dtype"] != trained:
        raise PartFailed(f"{stage} compared in {metrics['compute_dtype']}, train computed in {trained}")


def part_merge(plan: dict, record: Callable[..., None]) -> str:
    """The merge stage on the trained adapter: metrics/merge.json's fidelity figures."""
    paths = _pipeline(plan)
    started = time.perf_counter()
    metrics = _stage(plan, "merge", paths["base"], paths["adapter"], paths["dataset"], paths["merged"],
                     paths["metrics"] / "merge.json", metrics=paths["metrics"] / "merge.json")
    record(**metrics, seconds=time.perf_counter() - started)
    figures = [metrics[key] for key in ("kl", "top1_agreement", "kl_merge_into_4bit", "kl_merge_into_original")]
    if not all(math.isfinite(value) for value in figures):
        raise PartFailed(f"non-finite fidelity figures: {figures}")
    _check_compared_in(metrics, plan, "merge")
    return (f"KL {metrics['kl']:.2e}, top-1 {metrics['top1_agreement']:.4f} on {metrics['prompts']} prompts, "
            f"compared in {metrics['compute_dtype']} (stored {metrics['dtype']}); merge into 4-bit KL "
            f"{metrics['kl_merge_into_4bit']:.2e}, top-1 {metrics['top1_merge_into_4bit']:.4f}; into original KL "
            f"{metrics['kl_merge_into_original']:.2e}")


def part_evaluate(plan: dict, record: Callable[..., None]) -> str:
    """The evaluate stage: base, QLoRA and merged models on the eval split (random weights: the figures show that
    it runs, not what it learns)."""
    paths = _pipeline(plan)
    metrics = _stage(plan, "evaluate", paths["base"], paths["adapter"], paths["merged"], paths["dataset"],
                     paths["metrics"] / "merge.json", paths["metrics"] / "eval.json", paths["root"] / "eval",
                     metrics=paths["metrics"] / "eval.json")
    record(**metrics)
    _check_compared_in(metrics, plan, "evaluate")
    shown = [name for name in ("accuracy", "rouge_l", "eval_loss") if name in metrics][:2]
    figures = "; ".join(f"{name} " + "/".join(f"{metrics[name][model]:.3f}" for model in ("base", "qlora", "merged"))
                        for name in shown)
    return (f"{sum(metrics['examples'].values())} examples in {metrics['compute_dtype']}, base/qlora/merged: "
            f"{figures}; merged matches QLoRA: {metrics['merged_matches_qlora']}")


# ------------------------------------------------------------------------------------------- 3 and 4: 7B shapes


def _checkpoint_7b(plan: dict) -> Path:
    return Path(plan["work"]) / "llama2-7b-shaped"


def part_checkpoint_7b(plan: dict, record: Callable[..., None]) -> str:
    """Write the Llama-2-7B-shaped checkpoint parts 3 and 4 share (the data set's vocabulary: its tokens must fit)."""
    from transformers import AutoTokenizer

    dataset = Path(plan["dataset"])
    tokenizer = AutoTokenizer.from_pretrained(dataset / "tokenizer")
    if plan["dry_run"]:
        shape, shard_bytes = TINY_7B, 2 * 10**9
    else:
        import merge_7b

        shape, shard_bytes = merge_7b.LLAMA2_7B, merge_7b.BIN_SHARD_BYTES
    config = _llama_config(shape, tokenizer)
    weight_bytes = sum(math.prod(shape) for shape in _tensor_shapes(config).values()) * 2
    # the checkpoint, its bf16 merge, the disk-speed file, and room for the rest
    needed = 2 * weight_bytes + plan["disk_test_bytes"] + GiB
    free = shutil.disk_usage(plan["work"]).free
    if free < needed:
        raise PartFailed(f"needs {needed / 1e9:.1f} GB free under {plan['work']}, {free / 1e9:.1f} GB is")
    started = time.perf_counter()
    written = _write_random_checkpoint(_checkpoint_7b(plan), config, dataset / "tokenizer", cuda=plan["cuda"],
                                       max_shard_size=shard_bytes)
    seconds = time.perf_counter() - started
    record(parameters=written // 2, bytes=written, seconds=seconds, vocab_size=config.vocab_size)
    shapes = "architecture, tiny" if plan["dry_run"] else "shapes"
    return (f"{_amount(written // 2)} parameters (Llama-2-7B's {shapes}; vocabulary {config.vocab_size}, the data "
            f"set's), {_amount(written)}B of random bf16 written in {seconds:.1f} s ({_amount(written / seconds)}B/s)")


def _merge_7b_figures(plan: dict, base: Path, adapter: Path, merged: Path) -> dict:
    """merge_7b.py's merge phase, timed: in a fresh process (its peak RSS is the merge's alone), or in this one on
    a dry run."""
    import merge_7b

    if not plan["dry_run"]:
        return merge_7b.in_child("merge", base, adapter, merged)
    from measure import peak_rss

    started = time.perf_counter()
    merge_7b.run_merge(base, adapter, merged)
    return {"seconds": time.perf_counter() - started, "peak_rss": peak_rss()}


def part_merge_7b(plan: dict, record: Callable[..., None]) -> str:
    """benchmarks/merge_7b.py's merge phase on the checkpoint, against the disk's speed measured just before."""
    import torch
    from transformers import AutoConfig

    import merge_7b
    from tuneline.modeling import QuantSpec

    base, work = _checkpoint_7b(plan), Path(plan["work"])
    adapter, merged = work / "adapter-7b", work / "merged-7b"
    config = AutoConfig.from_pretrained(base)
    merge_7b.build_adapter(adapter, config, torch.Generator().manual_seed(0))
    train = yaml.safe_load((PROJECT / "params.yaml").read_text())["train"]
    compute_dtype = _resolved_train_choices(train)["compute_dtype"]
    QuantSpec("nf4", True, compute_dtype).save(adapter)  # as the train stage would have saved it here
    disk = merge_7b.disk_speed(work, plan["disk_test_bytes"])
    record(disk=disk, compute_dtype=compute_dtype)
    merge_7b.drop_from_page_cache(list(base.glob("*.safetensors")))
    figures = _merge_7b_figures(plan, base, adapter, merged)
    result = merge_7b.phase_result(figures, merge_7b.files_size(base, "*.safetensors")
                                   + merge_7b.files_size(adapter, "*.safetensors"),
                                   merge_7b.files_size(merged, "*.safetensors"), disk)
    shutil.rmtree(merged)
    line = merge_7b.report_line("merge", result)
    print(line, flush=True)
    record(**result, report=line)
    return (f"{result['seconds']:.1f} s, read {result['read_bytes'] / 1e9:.2f} + wrote "
            f"{result['written_bytes'] / 1e9:.2f} GB, {result['disk_share']:.0%} of the disk's speed (write "
            f"{disk['write'] / 1e6:.0f}, read {disk['read'] / 1e6:.0f} MB/s); peak RSS {_gib(result['peak_rss'])}")


@contextmanager
def _sft_trainer_restored() -> Iterator[None]:
    """SFTTrainer's compute_loss and train as they were before the block: train_throughput's meter wraps them for
    good, which in the dry run's one process would wrap the next run's meter around this one's."""
    from trl import SFTTrainer

    saved = SFTTrainer.compute_loss, SFTTrainer.train
    try:
        yield
    finally:
        SFTTrainer.compute_loss, SFTTrainer.train = saved


def _throughput_run(plan: dict, run: str, spec: dict, work: Path, log: Path) -> dict:
    """One run of train_throughput.py (its child(), which resolves `auto` and records peak memory): in a fresh
    process, or in this one on a dry run."""
    import train_throughput as tt

    spec_file, result_file = work / f"{run}-spec.json", work / f"{run}-result.json"
    spec_file.write_text(json.dumps(spec))
    if plan["dry_run"]:
        with _output_to(log, f"the {run} run"), _sft_trainer_restored():
            tt.child(run, spec_file, result_file)
    else:
        _run_logged([sys.executable, str(BENCHMARKS / "train_throughput.py"), "--child", run, str(spec_file),
                     str(result_file)], log, what=f"the {run} run")
    return json.loads(result_file.read_text())


def _throughput_data_set(name: str, plan: dict, work: Path) -> tuple[str, Path]:
    """(title, folder) of train_throughput's data set `name`: the docstring chats (built here) or the pipeline's."""
    import train_throughput as tt

    dataset, count = Path(plan["dataset"]), plan["throughput"]["chat_examples"]
    if name == "pipeline":
        return f"pipeline data set ({dataset})", dataset
    title = f"chat data set ({count} standard-library docstring chats, before cleaning)"
    return title, tt.build_chat_dataset(tokenizer_dir=dataset / "tokenizer", out=work / "chat", count=count)


def _throughput_summary(name: str, runs: dict[str, dict]) -> str:
    import train_throughput as tt

    ours, plain = runs["ours"], runs["plain"]
    return (f"{name}: ours {tt.tokens_per_second(ours):.0f} real tok/s, plain {tt.tokens_per_second(plain):.0f} "
            f"({tt.tokens_per_second(ours) / tt.tokens_per_second(plain):.2f}x); peak GPU "
            f"{_gib(ours['peak_gpu'])} / {_gib(plain['peak_gpu'])}; loss/token "
            f"{tt.loss_per_token(ours):.3f} / {tt.loss_per_token(plain):.3f}; same examples "
            f"{'yes' if ours['batches'] == plain['batches'] else 'NO'}")


def part_throughput_7b(plan: dict, record: Callable[..., None]) -> str:
    """train_throughput.py's ours-vs-plain comparison on the 7B-shaped checkpoint, with params.yaml's train
    section (`auto` resolved in each run): ours first, so that a run cut short by the budget still has the
    pipeline's own figure."""
    import train_throughput as tt

    work, options = Path(plan["work"]) / "throughput", plan["throughput"]
    work.mkdir()
    summaries, results = [], {}
    for name in options["sets"]:
        title, dataset_dir = _throughput_data_set(name, plan, work)
        spec = tt.train_spec(_checkpoint_7b(plan), dataset_dir, options["steps"], options["batch_size"])
        runs = {}
        for run in ("ours", "plain"):
            runs[run] = _throughput_run(plan, run, spec, work, _logs(plan) / f"throughput-{name}-{run}.log")
            results[name] = {"runs": runs}
            record(sets=results, batch_size=spec["train"]["batch_size"], steps=options["steps"])
        runs = {"plain": runs["plain"], "ours": runs["ours"]}  # report()'s order
        lines = tt.report(title, dataset_dir, runs)
        print("\n".join(lines), flush=True)
        results[name] = {**tt.set_result(title, dataset_dir, runs), "report": lines}
        record(sets=results)
        summaries.append(_throughput_summary(name, runs))
    return (f"{_steps(options['steps'])} of {spec['train']['batch_size']} in {_choices(runs['ours'])}; "
            + "; ".join(summaries))


# ------------------------------------------------------------------------------------------- 5: CUDA only


def part_paged_optimizer(plan: dict, record: Callable[..., None]) -> str:
    """bitsandbytes' PagedAdamW8bit (train.optim paged_adamw_8bit) steps a layer and keeps its state in paged
    memory; and how much of the train stage's LoRA state is large enough to be paged at all."""
    import bitsandbytes as bnb
    import torch
    from transformers import LlamaConfig

    import merge_7b
    from tuneline.modeling import layer_features, meta_model, quantized_layers

    layer = torch.nn.Linear(4096, 4096, device="cuda", dtype=torch.bfloat16)
    before = layer.weight.detach().clone()
    optimizer = bnb.optim.PagedAdamW8bit(layer.parameters(), lr=1e-3)
    for _ in range(3):
        layer(torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.cuda.synchronize()
    state = optimizer.state[layer.weight]  # the moments (state1, state2) are paged; absmax and qmap never are
    paged = {key: bool(getattr(state[key], "is_paged", False)) for key in ("state1", "state2") if key in state}
    dtypes = {key: str(state[key].dtype) for key in paged}
    rank = yaml.safe_load((PROJECT / "params.yaml").read_text())["train"]["lora_r"]
    pageable = {}
    for label, shape in (("SmolLM2-135M", SMOLLM2_135M), ("Llama-2-7B", merge_7b.LLAMA2_7B)):
        sizes = [rank * features for layer_ in quantized_layers(meta_model(LlamaConfig(**shape))).values()
                 for features in layer_features(layer_)]  # lora_A: r x in, lora_B: out x r
        pageable[label] = {"tensors": len(sizes), "paged": sum(size >= PAGED_MIN_ELEMENTS for size in sizes)}
    record(state_paged=paged, state_dtypes=dtypes, weights_moved=not torch.equal(before, layer.weight),
           lora_state_pageable=pageable, lora_r=rank)
    if len(paged) != 2 or not all(paged.values()):
        raise PartFailed(f"optimizer state not paged: {paged}")
    if torch.equal(before, layer.weight):
        raise PartFailed("three steps left the weights unchanged")
    return (f"PagedAdamW8bit: {', '.join(f'{key} {dtypes[key]}' for key in paged)} paged, weights moved; LoRA "
            f"r{rank} state tensors large enough to page (>= {PAGED_MIN_ELEMENTS:,} elements): "
            + ", ".join(f"{label} {count['paged']} of {count['tensors']}" for label, count in pageable.items()))


def part_nccl(plan: dict, record: Callable[..., None]) -> str:
    """torch.distributed with the nccl backend in one process (world size 1): init, all_reduce, barrier."""
    import torch
    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.perf_counter()
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        tensor = torch.arange(1024, device="cuda", dtype=torch.float32)
        dist.all_reduce(tensor)
        dist.barrier()
        torch.cuda.synchronize()
        correct = torch.equal(tensor.cpu(), torch.arange(1024, dtype=torch.float32))
    finally:
        dist.destroy_process_group()
    version = torch.cuda.nccl.version()  # a tuple in recent torch, an int in older ones
    version = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    record(nccl_version=version, all_reduce_correct=correct, seconds=time.perf_counter() - started)
    if not correct:
        raise PartFailed("all_reduce over one process changed the tensor")
    return f"NCCL {version}: init, all_reduce of 1024 floats and barrier in one process"


def part_nf4_cuda(plan: dict, record: Callable[..., None]) -> str:
    """bitsandbytes' NF4 quantize -> dequantize on the GPU: its error, the merge's rate through dequantized_nf4,
    and whether the CPU backend gives the same weights (merge on one, train on the other)."""
    import bitsandbytes as bnb
    import torch

    from tuneline.merging import dequantized_nf4
    from tuneline.modeling import QuantSpec

    functional = bnb.functional
    generator = torch.Generator("cuda").manual_seed(0)
    weight = torch.randn(11008, 4096, generator=generator, device="cuda", dtype=torch.bfloat16)  # 7B's largest
    packed, state = functional.quantize_4bit(weight, compress_statistics=True, quant_type="nf4")
    back = functional.dequantize_4bit(packed, state)
    error = ((back.float() - weight.float()).abs().mean() / weight.float().abs().mean()).item()
    # The merge's compute as it streams: a host tensor in, quantized, dequantized, fp32 (merging.dequantized_nf4).
    host, spec = weight.cpu(), QuantSpec("nf4", True, "bfloat16")
    dequantized_nf4(host, spec)
    torch.cuda.synchronize()  # the kernels are asynchronous: time them to the end
    started = time.perf_counter()
    for _ in range(5):
        dequantized_nf4(host, spec)
    torch.cuda.synchronize()
    rate = 5 * host.numel() / (time.perf_counter() - started)
    rows = host[:1024]
    on_cpu = functional.dequantize_4bit(*functional.quantize_4bit(rows, compress_statistics=True, quant_type="nf4"))
    on_gpu = functional.dequantize_4bit(*functional.quantize_4bit(rows.cuda(), compress_statistics=True,
                                                                  quant_type="nf4")).cpu()
    cpu_gpu_max_diff = (on_cpu.float() - on_gpu.float()).abs().max().item()
    record(relative_error=error, parameters_per_second=rate, cpu_gpu_max_abs_diff=cpu_gpu_max_diff,
           cpu_gpu_identical=cpu_gpu_max_diff == 0)
    if not math.isfinite(error) or error > NF4_MAX_ERROR:
        raise PartFailed(f"NF4 round trip's relative error {error:.3f} (expected <= {NF4_MAX_ERROR})")
    agreement = "identical" if cpu_gpu_max_diff == 0 else f"differ by up to {cpu_gpu_max_diff:.2e}"
    return (f"NF4 round trip: relative error {error:.3f}; dequantized_nf4 {rate / 1e6:.0f} M params/s (host tensor "
            f"in); CPU and GPU weights {agreement}")


# ------------------------------------------------------------------------------------------- the parts


@dataclass(frozen=True)
class Part:
    number: str  # issue 17's part
    label: str
    run: Callable[[dict, Callable[..., None]], str]
    budget_s: int  # on the H200, full shapes (each a guess with room: the first device run will tell)
    needs: tuple[str, ...] = ()
    cuda_only: bool = False


PARTS = {
    "environment": Part("", "environment", part_environment, 90),
    "train": Part("2", "train stage, SmolLM2-135M shape", part_train, 150),
    "merge": Part("2", "merge stage + fidelity", part_merge, 120, needs=("train",)),
    "evaluate": Part("2", "evaluate stage", part_evaluate, 100, needs=("merge",)),
    "checkpoint_7b": Part("3", "Llama-2-7B-shaped checkpoint", part_checkpoint_7b, 150),
    "throughput_7b": Part("3", "train 7B: ours vs plain TRL", part_throughput_7b, 300, needs=("checkpoint_7b",)),
    "merge_7b": Part("4", "merge 7B, streaming", part_merge_7b, 180, needs=("checkpoint_7b",)),
    "paged_optimizer": Part("5", "paged optimizer state", part_paged_optimizer, 45, cuda_only=True),
    "nccl": Part("5", "nccl, one process", part_nccl, 45, cuda_only=True),
    "nf4_cuda": Part("5", "NF4 quantize/dequantize", part_nf4_cuda, 45, cuda_only=True),
}
# After the environment part: the quick and certain first; the 7B training, the longest and least predictable, last
# with what time is left.
RUN_ORDER = ("nf4_cuda", "paged_optimizer", "nccl", "train", "merge", "evaluate", "checkpoint_7b",
             "merge_7b", "throughput_7b")


def _run_recorded(key: str, plan: dict, result_file: Path) -> None:
    """Run one part; its status and figures go to `result_file` as they come, its traceback to the output."""
    result = {"status": "running", "figures": {}}

    def record(**figures) -> None:
        result["figures"].update(figures)
        write_json(result_file, result)

    record()
    try:
        result.update(status="ok", summary=PARTS[key].run(plan, record))
    except Exception as error:  # any failure is this part's finding; the traceback goes to its log
        traceback.print_exc()
        result.update(status="failed", reason=_first_line(error))
    write_json(result_file, result)


def part_child(key: str, plan_file: Path, result_file: Path) -> None:
    """Run one part in this process, started by _run_part (this script's --part)."""
    _run_recorded(key, json.loads(plan_file.read_text()), result_file)


def _run_part(key: str, plan_file: Path, work: Path, env: dict, timeout: float) -> dict:
    """One part in its own process group, killed with everything it started if it outlasts `timeout`. A group, not
    a session: the device tool ends what a command leaves behind, except processes in a session of their own."""
    result_file, log = work / f"{key}.result.json", work / "logs" / f"{key}.log"
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, __file__, "--part", key, str(plan_file), str(result_file)],
                                   cwd=PROJECT, env=env, stdout=out, stderr=subprocess.STDOUT, process_group=0)
        try:
            returncode, timed_out = process.wait(timeout), False
        except subprocess.TimeoutExpired:
            returncode, timed_out = None, True
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the part itself on a timeout; what it left running, always
        except ProcessLookupError:
            pass
        process.wait()
    result = json.loads(result_file.read_text()) if result_file.is_file() else {"figures": {}}
    if timed_out and result.get("status") == "ok":
        result["note"] = f"its process outlived the part's end and was killed at {timeout:.0f} s"
    elif timed_out:
        result.update(status="failed", reason=f"over its {timeout:.0f} s budget: killed (figures so far kept)")
    elif result.get("status") not in ("ok", "failed"):
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        result.update(status="failed", reason=f"its process exited with {returncode}: "
                                              f"{lines[-1] if lines else 'no output'}")
    return {**result, "seconds": time.perf_counter() - started, "budget_s": timeout}


def _run_part_here(key: str, plan: dict, work: Path) -> dict:
    """One part in this process, its output in its log (a dry run: no budget enforced, nothing to kill)."""
    result_file, log = work / f"{key}.result.json", work / "logs" / f"{key}.log"
    started = time.perf_counter()
    with log.open("w") as out, redirect_stdout(out), redirect_stderr(out):
        _run_recorded(key, plan, result_file)
    return {**json.loads(result_file.read_text()), "seconds": time.perf_counter() - started}


def _import_stack_here(work: Path) -> None:
    """Ready this process for a dry run's parts: the parts' environment, dvclive's stand-in where dvclive is
    missing, and the stack imported once, before any output is redirected (libraries that log bind their handlers
    to the stderr of their import, which a part's log would close under them)."""
    os.environ.update(QUIET_ENV)
    sys.path.extend(_stand_ins(work))
    import merge_7b  # noqa: F401  (torch, transformers, peft, bitsandbytes, tuneline.merging)
    import train_throughput  # noqa: F401
    import tuneline.scoring  # noqa: F401
    import tuneline.training  # noqa: F401  (trl, datasets)


# ------------------------------------------------------------------------------------------- the run


def _with_needs(keys) -> set[str]:
    """The parts `keys` name and every part they need, transitively."""
    selected = set()
    pending = list(keys)
    while pending:
        key = pending.pop()
        if key not in selected:
            selected.add(key)
            pending.extend(PARTS[key].needs)
    return selected


def _plan(args: argparse.Namespace, cuda: bool, work: Path) -> dict:
    """Every setting the parts read: changes to params.yaml (a dry run's; `auto` stays params.yaml's), the
    throughput flags, sizes."""
    return {
        "dry_run": args.dry_run, "cuda": cuda, "work": str(work), "dataset": str(args.dataset.resolve()),
        "params": DRY_RUN_PARAMS if args.dry_run else {},
        "throughput": {"sets": args.sets, "steps": args.steps or (1 if args.dry_run else 20),
                       "batch_size": args.batch_size or (2 if args.dry_run else None),
                       "chat_examples": args.chat_examples or (20 if args.dry_run else 400)},
        "disk_test_bytes": 16 * 2**20 if args.dry_run else 4 * GiB,  # merge_7b.disk_speed's blocks are 16 MiB
    }


def _stand_ins(work: Path) -> list[str]:
    """The folder of dvclive's no-op stand-in, written under `work`, where dvclive cannot be imported; else none."""
    if find_spec("dvclive") is not None:
        return []
    stand_ins = work / "stand-ins"
    (stand_ins / "dvclive").mkdir(parents=True, exist_ok=True)
    (stand_ins / "dvclive" / "__init__.py").write_text(DVCLIVE_STAND_IN)
    return [str(stand_ins)]


def _child_env(work: Path) -> dict[str, str]:
    """The parts' environment: tuneline importable, offline, and dvclive's stand-in where dvclive is missing."""
    paths = [str(PROJECT), *_stand_ins(work), *filter(None, [os.environ.get("PYTHONPATH")])]
    return dict(os.environ, **QUIET_ENV, PYTHONPATH=os.pathsep.join(paths))


def _default_work() -> Path:
    """A new folder, stamped with this process's id, where there is the most free disk: the system's temporary
    folder or, on the device machine where that may be small, the repository's (the 7B parts need about 33 GB).
    The folders of runs that were killed before their cleanup (their process is gone) are deleted first: on a warm
    device machine, one of them would leave too little disk for the next run."""
    roots = [Path(tempfile.gettempdir()), PROJECT]
    for stale in (folder for root in roots for folder in root.glob("gpu-check-*-*") if folder.is_dir()):
        pid = stale.name.split("-")[2]
        if pid.isdigit() and not _is_running(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    root = max(roots, key=lambda path: shutil.disk_usage(path).free)  # the first on a tie
    return Path(tempfile.mkdtemp(prefix=f"gpu-check-{os.getpid()}-", dir=root))


def _progress(started: float, key: str, result: dict) -> None:
    print(f"[{time.perf_counter() - started:5.0f} s] {PARTS[key].label}: {result['status']}"
          + (f" ({result['reason']})" if result.get("reason") else ""), flush=True)


def _table(results: dict, header: str) -> list[str]:
    lines = [header, f"{'':2} {'part':<32}{'seconds':>8}  result"]
    for key, part in PARTS.items():
        result = results[key]
        seconds = f"{result['seconds']:.1f}" if result.get("seconds") is not None else "-"
        text = {"ok": f"ok: {result.get('summary', '')}"}.get(result["status"],
                                                               f"{result['status']}: {result.get('reason')}")
        if result.get("note"):
            text += f" ({result['note']})"
        lines.append(f"{part.number:>2} {part.label:<32}{seconds:>8}  {text}")
    return lines


def _header(environment: dict, args: argparse.Namespace, elapsed: float) -> str:
    device = environment.get("figures", {}).get("device", {})
    versions = environment.get("figures", {}).get("versions", {})
    where = f"{device['name']} (CUDA {device['torch_cuda']})" if device.get("cuda") else "the CPU"
    return (f"gpu_check{' --dry-run (tiny shapes, one process)' if args.dry_run else ''} on {where}, torch "
            f"{versions.get('torch')}, {device.get('cpu_count')} CPU cores: {elapsed:.0f} s of the {args.budget:.0f} s "
            f"budget")


def _write_logs(path: Path, logs: Path) -> None:
    """Every part's log (and its stages' and runs'), the last 20,000 characters of each, in one file."""
    with path.open("w") as out:
        for log in sorted(logs.glob("*.log"), key=lambda file: file.stat().st_mtime):
            out.write(f"===== {log.name}\n{log.read_text(errors='replace')[-20_000:]}\n")


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes, one step, the parts in one process: the CPU run CI makes")
    parser.add_argument("--dataset", type=Path, default=PROJECT / "data" / "dataset",
                        help="the dataset stage's output (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="where gpu_check.json and gpu_check_logs.txt go (default: $OUT; "
                                                 f"without it, {RESULTS.relative_to(PROJECT)} for a full run)")
    parser.add_argument("--work", type=Path, help="the work folder, a new one (default: made where the disk is "
                                                  "freest); deleted at the end unless --keep")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all parts together")
    # benchmarks/train_throughput.py's flags, for part 3
    parser.add_argument("--sets", nargs="+", choices=("pipeline", "chat"), default=["chat"])
    parser.add_argument("--steps", type=int, help="part 3's steps (default: 20; 1 with --dry-run)")
    parser.add_argument("--batch-size", type=int, help="part 3's batch (default: params.yaml's; 2 with --dry-run)")
    parser.add_argument("--chat-examples", type=int, help="part 3's docstring chats (default: 400; 20 with --dry-run)")
    parser.add_argument("--only", nargs="+", choices=[key for key in PARTS if key != "environment"],
                        help="run these parts (and the parts they need) alone, e.g. on a rerun after a timeout")
    parser.add_argument("--part", nargs=3, help=argparse.SUPPRESS)
    return parser.parse_args()


def _start_work(args: argparse.Namespace) -> Path:
    """The new work folder with its logs/ (or an exit in one line when the data set or --work will not do)."""
    missing = [name for name in ("train.parquet", "eval.parquet", "tokenizer") if not (args.dataset / name).exists()]
    if missing:
        sys.exit(f"gpu_check: {args.dataset} lacks {', '.join(missing)}; build it (dvc repro dataset) or carry it")
    if args.work and args.work.exists():
        sys.exit(f"gpu_check: --work {args.work} exists; name a new folder (the check deletes it at the end)")
    work = args.work or _default_work()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    return work


def _skip_reason(key: str, results: dict, plan: dict, selected: set[str], left: float) -> str | None:
    """Why part `key` is not run, or None to run it."""
    part = PARTS[key]
    blocked = [need for need in part.needs if results[need]["status"] != "ok"]
    if key not in selected:
        return "not in --only"
    if part.cuda_only and not plan["cuda"]:
        told = results["environment"].get("figures", {}).get("device")
        return "no CUDA" if told else "the environment part could not tell whether there is CUDA"
    if blocked:
        return f"needs {', '.join(blocked)}"
    if left < MIN_PART_S:
        return f"out of time ({left:.0f} s of the budget left)"
    return None


def _run_parts(args: argparse.Namespace, work: Path, started: float) -> tuple[dict, dict]:
    """The environment part in a process of its own (it says whether there is CUDA, which the plan follows), then
    the others in RUN_ORDER: each in its own process, or on a dry run all in this one. Returns (plan, results)."""
    env, plan_file = _child_env(work), work / "plan.json"
    plan_file.write_text(json.dumps({"work": str(work), "dry_run": args.dry_run}))
    results = {"environment": _run_part("environment", plan_file, work, env, PARTS["environment"].budget_s)}
    _progress(started, "environment", results["environment"])
    device = results["environment"].get("figures", {}).get("device")
    plan = _plan(args, bool(device and device["cuda"]), work)
    plan_file.write_text(json.dumps(plan, indent=2))
    if args.dry_run:
        _import_stack_here(work)
    selected = _with_needs(args.only or RUN_ORDER)
    for key in RUN_ORDER:
        left = args.budget - (time.perf_counter() - started)
        reason = _skip_reason(key, results, plan, selected, left)
        if reason:
            results[key] = {"status": "skipped", "reason": reason}
        elif args.dry_run:
            results[key] = _run_part_here(key, plan, work)
        else:
            results[key] = _run_part(key, plan_file, work, env, min(PARTS[key].budget_s, left))
        _progress(started, key, results[key])
    return plan, results


def _write_results(args: argparse.Namespace, plan: dict, results: dict, table: list[str], elapsed: float,
                   work: Path) -> None:
    """gpu_check.json and gpu_check_logs.txt under --out or $OUT (a full run without either: RESULTS alone)."""
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    json_file = out / "gpu_check.json" if out else (None if args.dry_run else RESULTS)
    if json_file:
        write_json(json_file, {"dry_run": args.dry_run, "budget_s": args.budget, "seconds": elapsed,
                               "device": results["environment"].get("figures", {}).get("device"),
                               "plan": plan, "parts": results, "table": table})
        print(f"results: {json_file}")
    if out:
        _write_logs(out / "gpu_check_logs.txt", work / "logs")


def main() -> None:
    args = _parse_args()
    if args.part:
        return part_child(args.part[0], Path(args.part[1]), Path(args.part[2]))
    started = time.perf_counter()
    work = _start_work(args)
    plan, results = _run_parts(args, work, started)
    elapsed = time.perf_counter() - started
    table = _table(results, _header(results["environment"], args, elapsed))
    print("\n" + "\n".join(table), flush=True)
    _write_results(args, plan, results, table, elapsed, work)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if any(result["status"] == "failed" for result in results.values()) else 0)


if __name__ == "__main__":
    main()
