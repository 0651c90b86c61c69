"""The `tuneline` command.

    tuneline check               validate params.yaml and the inputs without running anything heavy: every
                                 section, the fetch source, the dataset's files under data/sources/, and (once
                                 models/base exists) the LoRA target modules and training's memory needs
    tuneline dataset preview     the first rendered examples of each dataset source, trained tokens in ⟦ ⟧
    tuneline retrain [REPO_DIR]  run the Prefect retrain flow once (ephemeral Prefect unless PREFECT_API_URL is set)
    tuneline serve --cron CRON [REPO_DIR]
                                 serve the retrain flow on a schedule from the Prefect server at PREFECT_API_URL
    tuneline deploy --pool NAME --cron CRON [REPO_DIR]
                                 deploy it on a schedule to a work pool of that server; a worker of the pool
                                 (`prefect worker start --pool NAME`, maybe on another machine) runs it in its
                                 clone at REPO_DIR
    tuneline audit PATH|SHA256|GIT-REV [--json]
                                 which weights, data, params and code produced a model, and its metrics
    tuneline chat [MODEL] [--prompt TEXT] [--params params.yaml]
                                 talk to the merged model (or a .gguf file) with its chat template, the training
                                 data's system prompt and evaluate.generation's decoding: one answer with --prompt,
                                 else one per line of stdin, history kept (/reset clears it, /exit ends)
"""

import argparse
import json
import sys
from pathlib import Path

from tuneline.errors import TunelineError
from tuneline.params import (
    PARAMS_FILE, SECTIONS, DatasetParams, ExportParams, TrainParams, load_section, read_params_file, validate_section,
)
from tuneline.pipeline import model_path, stage_paths

CRON_HELP = 'a cron schedule, e.g. "0 3 * * 1" (Mondays 03:00)'


def check(params_file: Path, model_dir: Path, data_dir: Path | None = None) -> None:
    """The mistakes found before `dvc repro`; each stage runs its own share of the same checks again. The data
    files are looked for beside `params_file`, in the folder the dataset stage reads, unless `data_dir` says."""
    from tuneline.exporting import check_types
    from tuneline.sources import check_source

    params = read_params_file(params_file)
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise TunelineError(
            f"{params_file}: unknown section(s) {', '.join(unknown)}; sections are: {', '.join(SECTIONS)}"
        )
    sections = {name: validate_section(name, params.get(name), params_file) for name in SECTIONS}
    check_source(sections["fetch"].source)
    check_types(sections["export"].types)
    _check_dataset_files(sections["dataset"], data_dir or params_file.parent / _stage_path("dataset", 0))
    print(f"{params_file}: ok ({', '.join(SECTIONS)})")
    print(_check_model_fit(sections["train"], sections["dataset"], sections["export"], model_dir))


def _check_model_fit(train: TrainParams, dataset: DatasetParams, export: ExportParams, model_dir: Path) -> str:
    """LoRA targets present in the model's config, training's memory estimate within what is free, and a GGUF
    layout for the family when the export stage is to write one."""
    if not (model_dir / "config.json").is_file():
        return (f"{model_dir}: not converted yet; the train stage checks target modules and memory itself "
                "(or run `dvc repro convert` and check again)")
    from transformers import AutoConfig

    from tuneline.exporting import export_family
    from tuneline.modeling import available_memory, check_family, meta_model
    from tuneline.training import check_target_modules, check_training_memory

    config = AutoConfig.from_pretrained(model_dir)
    shapes = meta_model(config)
    check_family(shapes)
    if export.types:
        export_family(config)
    check_target_modules(shapes, train.target_modules)
    needed = check_training_memory(shapes, train, dataset.max_length, "dataset.max_length")
    return (f"{model_dir}: target modules present; training needs about {needed / 2**30:.1f} GiB at batch "
            f"{train.batch_size} x {dataset.max_length} tokens, {available_memory() / 2**30:.1f} GiB is free")


def _check_dataset_files(dataset: DatasetParams, data_dir: Path) -> None:
    """Each file source's path or glob matches files under the data folder (sklearn: and hf:// load later)."""
    from tuneline.data import resolve_files

    for index, source in enumerate(dataset.sources):
        if not source.path.startswith(("sklearn:", "hf://")):
            resolve_files(index, source, data_dir)


def _stage_path(stage: str, position: int) -> Path:
    """The `position`-th path dvc.yaml passes `stage` (in the pipeline at the working directory): the default
    of an option that names one of the pipeline's folders."""
    return Path(stage_paths(Path("."), stage)[position])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tuneline", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check_parser = commands.add_parser("check", help="validate params.yaml")
    check_parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    check_parser.add_argument("--model", type=Path, default=None,
                              help="the converted base (default: the one the convert stage writes)")
    check_parser.add_argument("--data", type=Path, default=None,
                              help="the sources' folder (default: the dataset stage's, beside --params)")
    dataset_parser = commands.add_parser("dataset", help="look at the data as the model will see it")
    dataset_commands = dataset_parser.add_subparsers(dest="dataset_command", required=True)
    preview_parser = dataset_commands.add_parser("preview", help="render the first examples of every source")
    preview_parser.add_argument("-n", "--count", type=int, default=3, help="examples per source (default 3)")
    preview_parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    preview_parser.add_argument("--data", type=Path, default=None,
                                help="the sources' folder (default: the one the dataset stage reads)")
    preview_parser.add_argument("--tokenizer", type=Path, default=None,
                                help="a tokenizer directory (default: the one the convert stage writes)")
    retrain_parser = commands.add_parser("retrain", help="run the Prefect retrain flow")
    retrain_parser.add_argument("repo_dir", type=Path, nargs="?", default=Path("."))
    retrain_parser.add_argument("--no-commit", action="store_true", help="leave the run's records uncommitted")
    serve_parser = commands.add_parser("serve", help="serve the retrain flow on a schedule (needs a Prefect server)")
    serve_parser.add_argument("--cron", required=True, help=CRON_HELP)
    serve_parser.add_argument("repo_dir", type=Path, nargs="?", default=Path("."))
    deploy_parser = commands.add_parser("deploy", help="deploy the retrain flow to a Prefect work pool, on a schedule")
    deploy_parser.add_argument("--pool", required=True,
                               help="the work pool (create it: prefect work-pool create NAME --type process)")
    deploy_parser.add_argument("--cron", required=True, help=CRON_HELP)
    deploy_parser.add_argument("repo_dir", type=Path, nargs="?", default=Path("."),
                               help="the clone's path on the worker's machine (default: .)")
    audit_parser = commands.add_parser("audit", help="what produced a model: weights, data, params, code, metrics")
    audit_parser.add_argument("target", help="a model directory or file, a sha256, or a git revision")
    audit_parser.add_argument("--json", action="store_true", help="the same facts as JSON")
    audit_parser.add_argument("--repo", type=Path, default=Path("."), help="the pipeline's repository (default: .)")
    chat_parser = commands.add_parser("chat", help="talk to the merged model, as the evaluate stage prompts it")
    chat_parser.add_argument("model", type=Path, nargs="?", default=None,
                             help="a merged model directory or a .gguf file (default: dvc.yaml's tuneline-model)")
    chat_parser.add_argument("--prompt", default=None, help="answer this one message, then exit (for scripts)")
    chat_parser.add_argument("--params", type=Path, default=PARAMS_FILE,
                             help="decoding from its evaluate.generation (default: params.yaml; missing: greedy)")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            check(args.params, args.model or _stage_path("convert", 1), args.data)
        elif args.command == "dataset":
            from tuneline.data import preview

            params = load_section("dataset", args.params)
            print(preview(params=params, data_dir=args.data or _stage_path("dataset", 0),
                          tokenizer_dir=args.tokenizer or _stage_path("dataset", 1), count=args.count))
        elif args.command == "retrain":
            from flows.retrain import retrain

            result = retrain(args.repo_dir, commit=not args.no_commit)
            print(result["note"])
        elif args.command == "serve":
            from flows.retrain import serve

            serve(args.repo_dir, args.cron)
        elif args.command == "deploy":
            from flows.retrain import deploy

            print(deploy(args.repo_dir, args.pool, args.cron))
        elif args.command == "audit":
            from tuneline.audit import audit, format_report

            facts = audit(args.target, args.repo)
            print(json.dumps(facts, indent=2) if args.json else format_report(facts))
        elif args.command == "chat":
            from tuneline.chat import chat

            chat(args.model or Path(model_path(Path("."))), args.prompt, args.params, sys.stdin, sys.stdout,
                 sys.stderr)
    except TunelineError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
