"""Training throughput: the train stage against a plain TRL SFTTrainer script, on the same data.

    python benchmarks/train_throughput.py                      # models/base; data/dataset and a chat set; 10 steps of 8
    python benchmarks/train_throughput.py --sets chat --steps 20 --batch-size 4

Two data sets: the pipeline's own (data/dataset, which `dvc repro` builds), and a chat set of varied lengths built
here, offline: questions about Python standard-library functions ("What does `json.dumps` do?") answered with their
docstrings, tokenised once by the dataset stage's own code. On each, two runs, each in its own process, back to back:

  ours   the train stage's train(): the dataset stage's tokens and loss mask, padding-free batches;
  plain  TRL's documented usage: a prompt/completion dataset that TRL tokenises, its default padding collator,
         completion-only loss.

Both use the same base, 4-bit QuantSpec, LoRA config, seed, optimizer, schedule, batch size and step count
(params.yaml's `train` section; --steps and --batch-size override it). The plain prompt is the chat template's
rendering of the system prompt (given explicitly) and the question, the completion the answer and the end-of-turn
token: the dataset stage's text, so both runs train on the same token ids under the same loss mask (checked and
printed). A conversational prompt/completion would not: the template's newline after the last end-of-turn would
be one more trained token per example. One deviation from TRL's defaults, in both runs: the LoRA weights stay in
the compute dtype (tuneline/training.py, keep_adapters_in_compute_dtype), so that the runs differ in batching only.

Each child measures itself with the same wrapper around SFTTrainer.compute_loss and .train: real (non-pad) tokens,
tokens computed (padding included), seconds in trainer.train(), peak RSS, loss per trained token over the run
(nats), and a hash of the examples of every step (both runs must see the same examples in the same steps). The
losses differ only by LoRA dropout's random masks, drawn on differently shaped batches: with lora_dropout 0 the two
runs give the same loss to 5 decimals. Target: ours >= 2x plain's real tokens/s on the chat set, same loss.

The figures also go to benchmarks/results/train_throughput.json when the run measures the pipeline's model (--model
left at its default; another model, such as a test's tiny one, writes no JSON unless --out names a file), from
which `python docs/figures.py` writes them into docs/performance.md and docs/pipeline.md.
"""

import argparse
import hashlib
import importlib
import inspect
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import yaml
from measure import peak_rss

if TYPE_CHECKING:  # transformers and torch are imported only by the functions that use them
    from transformers import PreTrainedTokenizerBase

PROJECT = Path(__file__).resolve().parent.parent
SPEED_TARGET = 2.0
CHAT_SYSTEM_PROMPT = "Answer questions about the Python standard library."
CHAT_MODULES = (
    "argparse", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv", "datetime", "decimal",
    "difflib", "fnmatch", "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "html", "inspect",
    "itertools", "json", "logging", "math", "operator", "os", "os.path", "pathlib", "random", "re", "secrets",
    "shlex", "shutil", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "typing",
    "urllib.parse", "uuid", "zipfile",
)
DOCSTRING_CHARS = (20, 900)  # answers from a few words to about 220 tokens: lengths vary as in real chat data
RESULTS = PROJECT / "benchmarks" / "results" / "train_throughput.json"


# ------------------------------------------------------------------------------------------- the chat set


def docstring_chats(count: int, seed: int) -> list[dict]:
    """Single-turn chats, "What does `module.name` do?" answered by its docstring, as a seeded sample."""
    chats = {}
    for module_name in CHAT_MODULES:
        module = importlib.import_module(module_name)
        for name, member in sorted(vars(module).items()):
            doc = inspect.getdoc(member) if callable(member) and not name.startswith("_") else None
            if doc and DOCSTRING_CHARS[0] <= len(doc) <= DOCSTRING_CHARS[1]:
                chats.setdefault(doc, f"{module_name}.{name}")  # one question per docstring: no near-duplicates
    questions = sorted((qualname, doc) for doc, qualname in chats.items())
    picked = random.Random(seed).sample(questions, min(count, len(questions)))
    return [
        {"messages": [{"role": "user", "content": f"What does `{qualname}` do?"},
                      {"role": "assistant", "content": doc}]}
        for qualname, doc in picked
    ]


def build_chat_dataset(*, tokenizer_dir: Path, out: Path, count: int) -> Path:
    """Write the chat set as messages JSONL and tokenise it through the dataset stage (its functions, the
    pipeline's dataset params with this source): train.parquet, lineage.json and tokenizer/ in `out`."""
    from transformers import AutoTokenizer

    from tuneline.data import build_dataset, write_outputs
    from tuneline.params import validate_section

    pipeline = yaml.safe_load((PROJECT / "params.yaml").read_text())["dataset"]
    chats = docstring_chats(count, pipeline["seed"])
    sources = out / "sources"
    sources.mkdir(parents=True)
    (sources / "chats.jsonl").write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    params = validate_section("dataset", {
        **pipeline, "sources": [{"path": "chats.jsonl", "format": "messages"}], "system_prompt": CHAT_SYSTEM_PROMPT,
        "balance": False, "eval_fraction": 0.1, "on_bad_row": "skip",
    })
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    built = build_dataset(params=params, data_dir=sources, tokenizer=tokenizer, tokenizer_dir=tokenizer_dir)
    dataset_dir = out / "dataset"
    dataset_dir.mkdir()
    write_outputs(built, params, tokenizer, tokenizer_dir, dataset_dir)
    return dataset_dir


# ------------------------------------------------------------------------------------------- measuring


@dataclass
class Meter:
    """What one run computed, counted on the batches SFTTrainer.compute_loss receives."""

    steps: int = 0
    real_tokens: int = 0  # tokens of the examples
    computed_tokens: int = 0  # positions the model ran: the examples plus any padding
    trained_tokens: int = 0  # positions with a loss
    loss_sum: float = 0.0  # nats, over the trained tokens
    seconds: float = 0.0  # in trainer.train()
    batches: str = ""  # a hash chain over the examples of every step, in order

    def record(self, inputs: dict, loss: float, normalizer: int) -> None:
        examples = examples_in(inputs)
        self.steps += 1
        self.real_tokens += sum(len(example) for example in examples)
        self.computed_tokens += inputs["input_ids"].numel()
        self.trained_tokens += int((inputs["labels"][:, 1:] != -100).sum())
        self.loss_sum += loss * normalizer
        self.batches = hashlib.sha256(f"{self.batches}{sorted(examples)}".encode()).hexdigest()[:16]


def examples_in(inputs: dict) -> list[tuple[int, ...]]:
    """The token ids of each example of a batch: padded rows cut to their mask, or a packed row cut where the
    position ids restart."""
    ids = inputs["input_ids"].cpu()
    if "attention_mask" in inputs:
        return [tuple(row[mask.bool()].tolist()) for row, mask in zip(ids, inputs["attention_mask"].cpu())]
    starts = (inputs["position_ids"][0].cpu() == 0).nonzero().flatten().tolist()
    return [tuple(ids[0, start:end].tolist()) for start, end in zip(starts, [*starts[1:], ids.size(1)])]


def install_meter(meter: Meter) -> None:
    """Count every training batch and time trainer.train(), the same way for both runs."""
    from trl import SFTTrainer

    compute_loss, train = SFTTrainer.compute_loss, SFTTrainer.train

    def metered_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            loss = result[0] if return_outputs else result
            trained = num_items_in_batch if num_items_in_batch is not None else (inputs["labels"][:, 1:] != -100).sum()
            meter.record(inputs, loss.item(), int(trained))  # the loss is the batch's nats / `trained`
        return result

    def timed_train(self, *args, **kwargs):
        started = time.perf_counter()
        result = train(self, *args, **kwargs)
        meter.seconds = time.perf_counter() - started
        return result

    SFTTrainer.compute_loss, SFTTrainer.train = metered_compute_loss, timed_train


# ------------------------------------------------------------------------------------------- the two runs


def run_ours(spec: dict, work: Path) -> dict:
    """The train stage's own function, as `dvc repro` runs it."""
    from dvclive import Live

    from tuneline.training import train
    from tuneline.params import TrainParams

    with Live(dir=str(work / "live"), dvcyaml=None, save_dvc_exp=False) as live:
        train(base_dir=Path(spec["model"]), dataset_dir=Path(spec["dataset"]), params=TrainParams(**spec["train"]),
              adapter_dir=work / "adapter", live=live, run_dir=work / "checkpoints")
    return {}


def plain_examples(dataset_dir: Path, tokenizer: "PreTrainedTokenizerBase") -> list[dict]:
    """prompt/completion text for each train row, as a TRL user writes it: the chat template over the system
    prompt and the question, with the generation prompt; the completion is the answer and end-of-turn."""
    split = pd.read_parquet(dataset_dir / "train.parquet")
    params = json.loads((dataset_dir / "lineage.json").read_text())["params"]
    examples = []
    for row in split.itertuples():
        system = params["sources"][row.source].get("system_prompt") or params["system_prompt"]
        turns = [{"role": "system", "content": system}] if system else []
        turns.append({"role": "user", "content": row.question})
        prompt = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        examples.append({"prompt": prompt, "completion": row.reference + tokenizer.eos_token})
    return examples


def same_tokens(trained_rows: Iterable[dict], dataset_dir: Path) -> int:
    """How many of TRL's tokenised rows have the dataset stage's token ids and loss mask."""
    split = pd.read_parquet(dataset_dir / "train.parquet")
    return sum(
        list(ours_ids) == row["input_ids"] and list(ours_labels) == row["labels"]
        for ours_ids, ours_labels, row in zip(split["input_ids"], split["labels"], trained_rows)
    )


def run_plain(spec: dict, work: Path) -> dict:
    """A plain TRL script: TRL tokenises prompt/completion text and pads each batch."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    from tuneline.training import keep_adapters_in_compute_dtype
    from tuneline.modeling import DTYPES, QuantSpec

    train = spec["train"]
    set_seed(train["seed"])
    tokenizer = AutoTokenizer.from_pretrained(Path(spec["dataset"]) / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(
        spec["model"], dtype=DTYPES[train["compute_dtype"]], device_map="auto",
        quantization_config=QuantSpec(train["quant_type"], train["double_quant"], train["compute_dtype"]).bnb_config(),
    )
    args = SFTConfig(
        output_dir=str(work / "out"), seed=train["seed"], learning_rate=train["learning_rate"],
        lr_scheduler_type=train["lr_scheduler"], warmup_steps=train["warmup_steps"],
        weight_decay=train["weight_decay"], optim=train["optim"], per_device_train_batch_size=train["batch_size"],
        gradient_accumulation_steps=train["gradient_accumulation_steps"], max_steps=train["max_steps"],
        gradient_checkpointing=train["gradient_checkpointing"], bf16=train["compute_dtype"] == "bfloat16",
        fp16=train["compute_dtype"] == "float16", logging_steps=train["logging_steps"], save_strategy="no",
        report_to="none",
    )
    lora = LoraConfig(r=train["lora_r"], lora_alpha=train["lora_alpha"], lora_dropout=train["lora_dropout"],
                      target_modules=train["target_modules"], use_rslora=train["use_rslora"], task_type="CAUSAL_LM")
    examples = Dataset.from_list(plain_examples(Path(spec["dataset"]), tokenizer))
    trainer = SFTTrainer(model=model, args=args, train_dataset=examples, processing_class=tokenizer, peft_config=lora)
    keep_adapters_in_compute_dtype(trainer.model, train["compute_dtype"])
    trainer.train()
    return {"same_tokens": same_tokens(trainer.train_dataset, Path(spec["dataset"])), "examples": len(examples)}


RUNS = {"plain": run_plain, "ours": run_ours}


def child(run: str, spec_file: Path, result_file: Path) -> None:
    """One run in this process, with params.yaml's `auto` resolved for this machine as the train stage resolves it;
    its figures go to `result_file` as JSON."""
    import torch

    from tuneline.params import TrainParams
    from tuneline.training import resolve_device_defaults

    spec = json.loads(spec_file.read_text())
    spec["train"] = resolve_device_defaults(TrainParams(**spec["train"])).model_dump()
    meter = Meter()
    install_meter(meter)
    with tempfile.TemporaryDirectory(prefix=f"throughput-{run}-") as work:
        extra = RUNS[run](spec, Path(work))
    peak_gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    result_file.write_text(json.dumps({**asdict(meter), **extra, "peak_rss": peak_rss(), "peak_gpu": peak_gpu,
                                       "compute_dtype": spec["train"]["compute_dtype"],
                                       "optim": spec["train"]["optim"]}))


def measure(run: str, spec: dict, work: Path) -> dict:
    """Run one child process and read its figures."""
    spec_file, result_file = work / f"{run}-spec.json", work / f"{run}-result.json"
    spec_file.write_text(json.dumps(spec))
    subprocess.run([sys.executable, __file__, "--child", run, str(spec_file), str(result_file)], check=True,
                   stdout=subprocess.DEVNULL)  # TRL's and transformers' warnings and progress bars go to stderr
    return json.loads(result_file.read_text())


# ------------------------------------------------------------------------------------------- the report


def token_lengths(dataset_dir: Path) -> pd.Series:
    return pd.read_parquet(dataset_dir / "train.parquet", columns=["input_ids"])["input_ids"].map(len)


def describe_lengths(dataset_dir: Path) -> str:
    lengths = token_lengths(dataset_dir)
    return f"{len(lengths)} train examples of {lengths.min()}-{lengths.max()} tokens (mean {lengths.mean():.0f})"


def tokens_per_second(run: dict) -> float:
    return run["real_tokens"] / run["seconds"]


def loss_per_token(run: dict) -> float:
    """Nats per trained token over the whole run."""
    return run["loss_sum"] / run["trained_tokens"]


def report(name: str, dataset_dir: Path, runs: dict[str, dict]) -> list[str]:
    """The table of one data set: a line per run, then ours against plain."""
    plain, ours = runs["plain"], runs["ours"]
    on_gpu = ours.get("peak_gpu") is not None
    lines = [
        f"{name}: {describe_lengths(dataset_dir)}",
        f"  plain run's token ids and loss mask equal to the dataset stage's: {plain['same_tokens']}/"
        f"{plain['examples']} examples; both in {ours['compute_dtype']} with {ours['optim']}",
        f"  {'run':<6}{'steps':>6}{'real tokens':>13}{'computed':>10}{'seconds':>9}{'real tok/s':>12}"
        f"{'peak RSS':>11}{'peak GPU' if on_gpu else '':>11}{'loss/token':>12}",
    ]
    for run_name, run in runs.items():
        gpu = f"{run['peak_gpu'] / 2**30:>7.2f} GiB" if on_gpu else ""
        lines.append(
            f"  {run_name:<6}{run['steps']:>6}{run['real_tokens']:>13,}{run['computed_tokens']:>10,}"
            f"{run['seconds']:>9.1f}{tokens_per_second(run):>12.1f}"
            f"{run['peak_rss'] / 2**30:>7.2f} GiB{gpu}{loss_per_token(run):>12.4f}"
        )
    loss_change = loss_per_token(ours) - loss_per_token(plain)
    gpu_ratio = f"peak GPU {ours['peak_gpu'] / plain['peak_gpu']:.2f}x, " if on_gpu else ""
    lines.append(
        f"  ours/plain: speed {tokens_per_second(ours) / tokens_per_second(plain):.2f}x, tokens computed "
        f"{ours['computed_tokens'] / plain['computed_tokens']:.2f}x, peak RSS "
        f"{ours['peak_rss'] / plain['peak_rss']:.2f}x, {gpu_ratio}loss per token {loss_change:+.4f} "
        f"({loss_change / loss_per_token(plain):+.2%}); same examples in every step: "
        f"{'yes' if ours['batches'] == plain['batches'] else 'NO'}"
    )
    return lines


def set_result(title: str, dataset_dir: Path, runs: dict[str, dict]) -> dict:
    """The figures of one data set, as the JSON results hold them: what report() prints, unrounded."""
    plain, ours = runs["plain"], runs["ours"]
    lengths = token_lengths(dataset_dir)
    return {
        "title": title, "examples": len(lengths),
        "tokens": {"min": int(lengths.min()), "max": int(lengths.max()), "mean": float(lengths.mean())},
        "runs": {name: {**run, "tokens_per_second": tokens_per_second(run), "loss_per_token": loss_per_token(run)}
                 for name, run in runs.items()},
        "ours_over_plain": {
            "speed": tokens_per_second(ours) / tokens_per_second(plain),
            "computed_tokens": ours["computed_tokens"] / plain["computed_tokens"],
            "peak_rss": ours["peak_rss"] / plain["peak_rss"],
            "peak_gpu": ours["peak_gpu"] / plain["peak_gpu"] if ours.get("peak_gpu") else None,
            "loss_change": loss_per_token(ours) - loss_per_token(plain),
            "same_examples": ours["batches"] == plain["batches"],
        },
    }


def train_spec(model: Path, dataset_dir: Path, steps: int, batch_size: int | None) -> dict:
    """What both runs of a data set share: params.yaml's train section with the run's length and batch."""
    train = yaml.safe_load((PROJECT / "params.yaml").read_text())["train"]
    train.update(max_steps=steps, batch_size=batch_size or train["batch_size"], save_steps=0, launcher="none",
                 num_processes=1)
    return {"model": str(model), "dataset": str(dataset_dir), "train": train}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=PROJECT / "models/base")
    parser.add_argument("--dataset", type=Path, default=PROJECT / "data/dataset",
                        help="the pipeline's data set; the chat set is tokenised with its tokenizer")
    parser.add_argument("--sets", nargs="+", choices=("pipeline", "chat"), default=["pipeline", "chat"])
    parser.add_argument("--chat-examples", type=int, default=400, help="docstring chats written, before cleaning")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, help="default: params.yaml's train.batch_size")
    parser.add_argument("--out", type=Path, help=f"where the figures go as JSON (default: {RESULTS} when --model is "
                                                 f"the pipeline's, else none)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:
        work = Path(tmp)
        builders = {
            "pipeline": lambda: (f"pipeline data set ({args.dataset})", args.dataset),
            "chat": lambda: (f"chat data set ({args.chat_examples} standard-library docstring chats, before cleaning)",
                             build_chat_dataset(tokenizer_dir=args.dataset / "tokenizer", out=work / "chat",
                                                count=args.chat_examples)),
        }
        results = {"steps": args.steps, "cpu_count": os.cpu_count(), "speed_target": SPEED_TARGET, "sets": {}}
        for name in args.sets:
            title, dataset_dir = builders[name]()
            spec = train_spec(args.model, dataset_dir, args.steps, args.batch_size)
            runs = {run: measure(run, spec, work) for run in RUNS}
            print("\n".join(report(title, dataset_dir, runs)), flush=True)
            results["batch_size"] = spec["train"]["batch_size"]
            results["sets"][name] = set_result(title, dataset_dir, runs)
            if name == "chat":
                speed = tokens_per_second(runs["ours"]) / tokens_per_second(runs["plain"])
                verdict = "met" if speed >= SPEED_TARGET else "NOT met"
                print(f"target: ours >= {SPEED_TARGET}x plain's real tokens/s on varied lengths: {speed:.2f}x, "
                      f"{verdict}")
    out = args.out or (RESULTS if args.model.resolve() == parser.get_default("model").resolve() else None)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results: {out}")


if __name__ == "__main__":
    main()
