"""Write the figures that README.md and docs/*.md quote from the files the runs produced, never by hand.

    python docs/figures.py            # rewrite every figures block (make docs)
    python docs/figures.py --check    # exit 1, naming each block that differs from what the files say

A block is the text between `<!-- figures:NAME -->` and `<!-- /figures:NAME -->`. When the opening marker
ends its line, the block is whole lines (a table, a paragraph); otherwise it is a few words inside a sentence.
NAME is one of BLOCKS below, each a function of the files:
  metrics/eval.json, metrics/merge.json, metrics/train.json   the default run (`make run`, committed)
  lineage.json                                                 the default run's lineage (committed)
  benchmarks/results/<script>.json                             what benchmarks/<script>.py measured last
A benchmark that has not written its results yet gives a line saying which command fills the block.
"""

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ("README.md", "docs/*.md")
BLOCK = re.compile(r"<!-- figures:(?P<name>[\w-]+) -->(?P<body>.*?)<!-- /figures:(?P=name) -->", re.DOTALL)
OPENING = re.compile(r"<!-- /?figures:([\w-]+) -->")
GiB = 2**30

# The columns of metrics/eval.json's tables, in this order; any other model comes after them.
MODELS = {"base": "base", "qlora": "QLoRA", "merged": "merged", "logistic_regression": "logistic regression"}
EVAL_FIGURES = {
    "accuracy": "accuracy", "macro_f1": "macro-F1", "mcq_format_valid": "MCQ format valid",
    "mcq_key_accuracy": "MCQ key accuracy", "exact_match": "exact match", "rouge_l": "ROUGE-L F1",
    "answer_loss": "answer loss (nats per answer token)", "perplexity": "perplexity",
    "eval_loss": "eval loss (nats per answer token)",
}
LOSSES = {"eval_loss", "answer_loss", "perplexity"}


class Missing(Exception):
    """A results file that no run has written yet: the block says which command writes it."""


def _read_json(relative: str, command: str | None = None) -> dict:
    path = ROOT / relative
    if not path.is_file():
        if command:
            raise Missing(f"(run `{command}` to fill)")
        sys.exit(f"docs/figures.py: {relative} is missing; it is written by `make run`")
    return json.loads(path.read_text())


def _benchmark(name: str, command: str | None = None) -> dict:
    return _read_json(f"benchmarks/results/{name}.json", command or f"python benchmarks/{name}.py")


def _number(value: float) -> str:
    """Three significant figures; scientific below 1e-3 (a KL of 2.2e-11)."""
    return f"{value:.1e}" if 0 < abs(value) < 1e-3 else f"{value:.3g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


# ------------------------------------------------------------------------------------------- the default run


def eval_table() -> str:
    """Every model's figures in metrics/eval.json, one row per figure."""
    figures = _read_json("metrics/eval.json")
    rows = {key: value for key, value in figures.items() if key in EVAL_FIGURES and isinstance(value, dict)}
    models = [*MODELS, *sorted({model for value in rows.values() for model in value} - MODELS.keys())]
    models = [model for model in models if any(model in value for value in rows.values())]
    examples = ", ".join(f"{count} `{kind}`" for kind, count in figures["examples"].items())
    body = [[EVAL_FIGURES[key], *(("{:.3g}" if key in LOSSES else "{:.3f}").format(value[model])
                                  if model in value else "" for model in models)]
            for key, value in sorted(rows.items(), key=lambda item: list(EVAL_FIGURES).index(item[0]))]
    matches = str(figures.get("merged_matches_qlora", "not computed")).lower()
    return (_table([f"eval examples: {examples}", *(MODELS.get(model, model) for model in models)], body)
            + f"\n\n`merged_matches_qlora`: {matches}.")


def merge_table() -> str:
    """KL(QLoRA || merge) and top-1 agreement of tuneline's merge and the two usual ones, from metrics/merge.json."""
    merge = _read_json("metrics/merge.json")
    rows = [
        (f"tuneline: dequantized NF4 + delta, {merge['dtype']}", "kl", "top1_agreement"),
        ("peft `merge_and_unload` into the 4-bit model", "kl_merge_into_4bit", "top1_merge_into_4bit"),
        ("peft `merge_and_unload` into the original weights", "kl_merge_into_original", "top1_merge_into_original"),
    ]
    return (_table(["merge", "KL(QLoRA ‖ merge) per token", "top-1 agreement"],
                  [[label, _number(merge[kl]), f"{merge[top1]:.3f}"] for label, kl, top1 in rows])
            + f"\n\nOver {merge['positions']} token positions of {merge['prompts']} eval prompts.")


def export_table() -> str:
    """Each GGUF file of metrics/export.json: size, KL and top-1 against the merged model, greedy answers equal,
    as transformers reads the file and as llama.cpp runs it."""
    export = _read_json("metrics/export.json")
    rows = []
    for export_type, figures in export["files"].items():
        llama_cpp = figures.get("llama_cpp")
        by_llama_cpp = ([_number(llama_cpp["kl"]), f"{llama_cpp['top1_agreement']:.3f}",
                         f"{llama_cpp['greedy_equal']:.2f}"] if llama_cpp else ["", "", ""])
        within = f" (within {export_type} rounding)" if figures.get("within_rounding") else ""
        rows.append([f"`{figures['file']}`", f"{figures['size_bytes'] / 1e6:.0f} MB", _number(figures["kl"]) + within,
                     f"{figures['top1_agreement']:.3f}", f"{figures['greedy_equal']:.2f}", *by_llama_cpp])
    header = ["file", "size", "KL(merged ‖ file)", "top-1", "greedy equal", "llama.cpp: KL", "top-1", "greedy equal"]
    return (_table(header, rows) + f"\n\nOn {export['prompts']} held-out conversations (KL, top-1) and their prompts "
            "(greedy answers).")


def merge_into_4bit() -> str:
    merge = _read_json("metrics/merge.json")
    return (f"KL against the QLoRA model {_number(merge['kl_merge_into_4bit'])} nats per token, top-1 agreement "
            f"{merge['top1_merge_into_4bit']:.3f}")


def merge_into_original() -> str:
    merge = _read_json("metrics/merge.json")
    return f"KL {_number(merge['kl_merge_into_original'])}, top-1 agreement {merge['top1_merge_into_original']:.3f}"


def train_run() -> str:
    train = _read_json("metrics/train.json")
    return _table(["train (metrics/train.json)", "default run"], [
        ["steps", str(train["steps"])],
        ["seconds per step", f"{train['seconds_per_step']:.2f}"],
        ["training time", f"{train['seconds'] / 60:.1f} min"],
        ["trainable parameters (LoRA)", f"{train['trainable_parameters']:,}"],
        ["loss: first logged, final", f"{train['first_loss']:.3g}, {train['final_loss']:.3g}"],
        ["device, processes", f"{train['device']}, {train['world_size']}"],
        ["compute dtype, optimizer (`auto` resolved)", f"{train['compute_dtype']}, {train['optim']}"],
    ])


def dataset_counts() -> str:
    """The cleaning counts of the default run's dataset, from lineage.json."""
    counts = _read_json("lineage.json")["dataset"]["counts"]
    return _table(["count (`dataset_card.json`)", "default run"],
                 [[f"`{key}`", str(value)] for key, value in counts.items()])


def duplicates() -> str:
    return str(_read_json("lineage.json")["dataset"]["counts"]["duplicates"])


# ------------------------------------------------------------------------------------------- the benchmarks


def pipeline_budget() -> str:
    budget = _benchmark("pipeline_budget", "make benchmark")
    rows = [[f"`{stage}`", f"{seconds:.1f} s"] for stage, seconds in budget["stages"].items()]
    total, total_budget = budget["pipeline_seconds"], budget["pipeline_budget_seconds"]
    noop, noop_budget = budget["noop_seconds"], budget["noop_budget_seconds"]
    rows.append(["whole pipeline", f"{total:.1f} s = {total / 60:.1f} min ({total / total_budget:.0%} of the "
                                   f"{total_budget / 60:.0f} min budget)"])
    rows.append(["no-op `dvc repro`", f"{noop:.1f} s ({noop / noop_budget:.0%} of the {noop_budget} s budget)"])
    return _table([f"each stage forced, {budget['cpu_count']} CPU cores", "wall time"], rows)


def _phase(result: dict) -> str:
    speed = (result["read_bytes"] + result["written_bytes"]) / result["seconds"]
    return (f"{result['seconds']:.1f} s; {speed / 1e6:.0f} MB/s read + written = {result['disk_share']:.0%} of the "
            f"disk's own speed; peak RSS {result['peak_rss'] / GiB:.2f} GiB")


def merge_7b() -> str:
    bench = _benchmark("merge_7b")
    peft = bench["peft"]
    if peft["ran"]:
        peft_figures = (f"{peft['seconds']:.1f} s, not counting a save; peak RSS {peft['peak_rss'] / GiB:.2f} GiB "
                        f"(the weights alone are {peft['model_bytes'] / GiB:.1f} GiB)")
    else:
        peft_figures = (f"not run: needs {peft['needed_bytes'] / GiB:.1f} GiB in memory, "
                        f"{peft['available_bytes'] / GiB:.1f} GiB was free")
    targets, disk = bench["targets"], bench["disk"]
    model = (f"Llama-2-7B shapes{' (--small: sizes shrunk)' if bench['small'] else ''}, "
             f"{bench['parameters'] / 1e9:.2f} B parameters, {bench['cpu_count']} CPU cores")
    return _table([model, "figures"], [
        ["disk alone: sequential write (fsynced), read (page cache dropped)",
         f"{disk['write_bytes_per_second'] / 1e6:.0f} MB/s, {disk['read_bytes_per_second'] / 1e6:.0f} MB/s"],
        [f"convert: {bench['convert']['read_bytes'] / 1e9:.1f} GB of sharded `.bin` (bf16) → safetensors",
         _phase(bench["convert"])],
        [f"merge with a rank-{bench['lora_rank']} all-linear adapter: NF4 quantize → dequantize → + delta in fp32 → "
         "bf16 shards", _phase(bench["merge"])],
        ["peft `merge_and_unload` of the same model and adapter, bf16, in memory", peft_figures],
        ["targets", f"peak RSS ≤ {targets['peak_rss_bytes'] / GiB:.0f} GiB, ≥ {targets['disk_share']:.0%} of the "
                    "disk's speed"],
    ])


def merge_7b_limit() -> str:
    bench = _benchmark("merge_7b")
    nf4, merge = bench["nf4"], bench["merge"]
    return (f"In the last run, bitsandbytes' NF4 quantize + dequantize round trip did "
            f"{nf4['parameters_per_second'] / 1e6:.0f} M parameters/s on {nf4['threads']} threads, "
            f"{nf4['seconds']:.0f} s of the merge's {merge['seconds']:.0f} s for its "
            f"{nf4['quantized_parameters'] / 1e9:.2f} B quantized parameters, while reading and writing its "
            f"{(merge['read_bytes'] + merge['written_bytes']) / 1e9:.1f} GB would take the disk "
            f"{merge['disk_seconds']:.0f} s. The adapter is {bench['adapter_bytes'] / 1e9:.2f} GB.")


THROUGHPUT_SETS = {"pipeline": "the default data", "chat": "the chat set"}


def _lengths(result: dict) -> str:
    return f"{result['tokens']['min']}–{result['tokens']['max']} tokens"


def throughput() -> str:
    bench = _benchmark("train_throughput")
    rows = []
    for name, result in bench["sets"].items():
        ours, plain = result["runs"]["ours"], result["runs"]["plain"]
        ratio = result["ours_over_plain"]
        rows.append([f"{THROUGHPUT_SETS.get(name, name)}: {result['examples']} examples of {_lengths(result)}",
                     f"{ours['tokens_per_second']:.0f} vs {plain['tokens_per_second']:.0f} ({ratio['speed']:.2f}×)",
                     f"{ours['peak_rss'] / GiB:.2f} vs {plain['peak_rss'] / GiB:.2f} GiB ({ratio['peak_rss']:.2f}×)",
                     f"{ours['loss_per_token']:.4f} vs {plain['loss_per_token']:.4f}",
                     "yes" if ratio["same_examples"] else "NO"])
    return _table([f"{bench['steps']} steps of {bench['batch_size']}, {bench['cpu_count']} CPU cores: ours vs plain TRL",
                  "real tokens/s", "peak RSS", "loss per trained token", "same examples each step"], rows)


def throughput_summary() -> str:
    bench = _benchmark("train_throughput")
    sentences = []
    if chat := bench["sets"].get("chat"):
        ratio, runs = chat["ours_over_plain"], chat["runs"]
        sentences.append(
            f"On a chat set of varied lengths (standard-library docstrings as answers, {_lengths(chat)}) the stage "
            f"trained {ratio['speed']:.2f}× the real tokens per second in {ratio['peak_rss']:.2f}× the peak memory, "
            f"with a loss per token of {runs['ours']['loss_per_token']:.4f} against "
            f"{runs['plain']['loss_per_token']:.4f}.")
    if pipeline := bench["sets"].get("pipeline"):
        sentences.append(f"The default data's rows are {_lengths(pipeline)}, with little padding to save: the gain "
                         f"there ({pipeline['ours_over_plain']['speed']:.2f}×) is the loss head's, which scores only "
                         "the answers' few tokens.")
    return " ".join(sentences)


BLOCKS: dict[str, Callable[[], str]] = {
    "eval": eval_table,
    "merge": merge_table,
    "export": export_table,
    "merge-into-4bit": merge_into_4bit,
    "merge-into-original": merge_into_original,
    "train": train_run,
    "dataset-counts": dataset_counts,
    "duplicates": duplicates,
    "pipeline-budget": pipeline_budget,
    "merge-7b": merge_7b,
    "merge-7b-limit": merge_7b_limit,
    "throughput": throughput,
    "throughput-summary": throughput_summary,
}


# ------------------------------------------------------------------------------------------- the documents


def _figures(name: str) -> str:
    try:
        return BLOCKS[name]()
    except Missing as missing:
        return str(missing)


def _rewritten(text: str, where: str) -> tuple[str, list[str]]:
    """The text with every block rewritten, and the blocks whose text changed."""
    stale = []

    def rewrite(match: re.Match) -> str:
        name, body = match["name"], match["body"]
        if name not in BLOCKS:
            sys.exit(f"docs/figures.py: {where}: unknown block figures:{name}; the blocks are: {', '.join(BLOCKS)}")
        new = _figures(name)
        new = f"\n{new}\n" if body.startswith("\n") else new
        if new != body:
            stale.append(f"{where}: figures:{name}")
        return f"<!-- figures:{name} -->{new}<!-- /figures:{name} -->"

    result = BLOCK.sub(rewrite, text)
    unpaired = OPENING.findall(BLOCK.sub("", text))
    if unpaired:
        sys.exit(f"docs/figures.py: {where}: figures:{unpaired[0]} has no matching opening or closing marker")
    return result, stale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 naming each stale block")
    args = parser.parse_args()
    stale = []
    for path in sorted(path for pattern in DOCUMENTS for path in ROOT.glob(pattern)):
        where = str(path.relative_to(ROOT))
        text = path.read_text()
        new, changed = _rewritten(text, where)
        stale += changed
        if changed and not args.check:
            path.write_text(new)
            print(f"rewrote {', '.join(changed)}")
    if stale and args.check:
        print("stale figures (run `make docs`):\n  " + "\n  ".join(stale), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
