"""Train: QLoRA fine-tune of the base on the train split, with TRL's SFTTrainer.

    python -m stages.train BASE_DIR DATASET_DIR ADAPTER_DIR METRICS_FILE LIVE_DIR CHECKPOINTS_DIR

The base's linear layers are loaded in 4-bit (bitsandbytes NF4 by default, double quantization) and
computed in `train.compute_dtype`; LoRA adapters from the `train` params are trained on the dataset stage's
tokenized split as it is: its labels already hold the loss mask (assistant turns only), so nothing is
re-tokenized or truncated here. Writes the adapter (adapter_config.json, adapter_model.safetensors and the
quantization spec that merge must rebuild, and the lineage: the base's source and the data's, with these
params), train metrics, and the loss curve through DVCLive.

With `train.padding_free` (the default) each batch's examples are concatenated into one row, positions
restarting at 0 for each, so nothing is computed on padding: TRL's padding-free collator keeps our labels (and
masks each example's first token, so no loss spans two examples) and passes the examples' bounds, and attention
runs example by example within the row (tuneline/training.py's packed sdpa), so no token attends to another
example. tests/unit/test_training.py checks that a packed batch gives the logits and loss of its examples run one
by one.

Runs on the CPU through bitsandbytes' CPU backend and on CUDA unchanged.

Every `train.save_steps` the trainer checkpoints the adapter, optimizer, scheduler and RNG states into
CHECKPOINTS_DIR/<inputs key>/, the key being a hash of everything that decides the result (base, data, params,
and code: this stage's import closure, the files dvc.yaml lists as its code deps). A killed run, rerun by
`dvc repro`, resumes from the newest complete checkpoint under the same key and ends with the same adapter;
checkpoints of other inputs are never used. They are deleted when a run ends. The checkpoints live outside the
stage's outs on purpose: DVC deletes outs before it runs a stage, and `persist: true` outs would switch off its
run-cache.

With `train.launcher` (torchrun or accelerate) and `train.num_processes` > 1, the stage replaces itself with
the launcher, which starts that many copies of it; transformers' Trainer then runs DDP (nccl on CUDA, one GPU
and one 4-bit copy of the base per process; gloo on CPU). Each process trains on its own `train.batch_size`
examples of every step and all end a step with the same adapter; only the main one writes the adapter,
metrics and loss curve, and a checkpoint is complete once every process's RNG state is in it.
"""

import shutil
import sys
from pathlib import Path

from dvclive import Live

from tuneline.artifacts import atomic_dir, write_json
from tuneline.errors import exit_on_error
from tuneline.params import TrainParams, load_section
from tuneline.pipeline import import_closure
from tuneline.training import inputs_key, is_main_process, launch, launched_worker, train

ROOT = Path(__file__).resolve().parent.parent


@exit_on_error
def main() -> None:
    if len(sys.argv) != 7:
        sys.exit("usage: python -m stages.train BASE_DIR DATASET_DIR ADAPTER_DIR METRICS_FILE LIVE_DIR CHECKPOINTS_DIR")
    params: TrainParams = load_section("train")
    if params.launcher != "none" and params.num_processes > 1 and not launched_worker():
        launch(params, sys.argv[1:])
    base_dir, dataset_dir, adapter_dir, metrics_file, live_dir, checkpoints_dir = map(Path, sys.argv[1:])
    code = [ROOT / path for path in import_closure("stages.train", ROOT)]
    run_dir = checkpoints_dir / inputs_key(base_dir, dataset_dir, params, code=code)
    if not is_main_process():
        train(base_dir=base_dir, dataset_dir=dataset_dir, params=params, adapter_dir=None, live=None, run_dir=run_dir)
        return
    with atomic_dir(adapter_dir) as adapter_tmp, atomic_dir(live_dir) as live_tmp:
        with Live(dir=str(live_tmp), dvcyaml=None, save_dvc_exp=False) as live:
            metrics = train(
                base_dir=base_dir, dataset_dir=dataset_dir, params=params, adapter_dir=adapter_tmp, live=live,
                run_dir=run_dir,
            )
        write_json(metrics_file, metrics)
    shutil.rmtree(run_dir, ignore_errors=True)  # the run is finished: its checkpoints are of no more use
    if checkpoints_dir.is_dir() and not any(checkpoints_dir.iterdir()):
        checkpoints_dir.rmdir()
    print(f"train: loss {metrics['first_loss']} -> {metrics['final_loss']} in {metrics['steps']} steps "
          f"({metrics['seconds_per_step']} s/step on {metrics['device']})")


if __name__ == "__main__":
    main()
