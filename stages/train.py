"""Train: QLoRA fine-tune of the base on the train split, with TRL's SFTTrainer.

    python -m stages.train BASE_DIR DATASET_DIR ADAPTER_DIR METRICS_FILE LIVE_DIR CHECKPOINTS_DIR

The base's linear layers are loaded in 4-bit (bitsandbytes NF4 by default, double quantization) and
computed in `train.compute_dtype`; LoRA adapters from the `train` params are trained on the dataset stage's
tokenized split as it is: its labels already hold the loss mask (assistant turns only), so nothing is
re-tokenized or truncated here. Writes the adapter (adapter_config.json, adapter_model.safetensors and the
quantization spec that merge must rebuild, and the lineage: the base's source and the data's, with these
params), train metrics, and the loss curve through DVCLive.
Runs on the CPU through bitsandbytes' CPU backend and on CUDA unchanged.

Every `train.save_steps` the trainer checkpoints the adapter, optimizer, scheduler and RNG states into
CHECKPOINTS_DIR/<inputs key>/, the key being a hash of everything that decides the result (base, data, code,
params). A killed run, rerun by `dvc repro`, resumes from the newest complete checkpoint under the same key and
ends with the same adapter; checkpoints of other inputs are never used. They are deleted when a run ends.
The checkpoints live outside the stage's outs on purpose: DVC deletes outs before it runs a stage, and
`persist: true` outs would switch off its run-cache.
"""

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from dvclive import Live
from peft import LoraConfig
from transformers import AutoConfig, SchedulerType, TrainerCallback, set_seed
from transformers.training_args import OptimizerNames
from trl import SFTConfig, SFTTrainer

from tuneline.artifacts import atomic_dir, write_json
from tuneline.errors import TunelineError, exit_on_error
import tuneline
from tuneline.lineage import ADAPTER_LINEAGE_FILE, BASE_SOURCE_FILE, LINEAGE_FILE, tree_sha256
from tuneline.modeling import (
    DTYPES, QuantSpec, available_memory, linear_layers, load_quantized_model, load_tokenizer, meta_model, read_split,
)
from tuneline.params import TrainParams, load_section


class LiveLossCurve(TrainerCallback):
    """Log loss and learning rate against the optimizer step, so `dvc plots show` draws the true curve."""

    def __init__(self, live: Live) -> None:
        self.live = live

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        """On resume, log the checkpoint's loss history first: the curve reads as one uninterrupted run."""
        for logs in state.log_history:
            if "loss" in logs:
                self.live.step = logs["step"]
                self.live.log_metric("loss", logs["loss"])
                self.live.log_metric("learning_rate", logs["learning_rate"])

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if logs and "loss" in logs:
            self.live.step = state.global_step
            self.live.log_metric("loss", logs["loss"])
            self.live.log_metric("learning_rate", logs["learning_rate"])


def check_target_modules(model: torch.nn.Module, target_modules: list[str] | str) -> None:
    """Fail early, naming the module, when a LoRA target matches no linear layer of the model."""
    if target_modules == "all-linear":
        return
    linear_names = {name.rsplit(".", 1)[-1] for name in linear_layers(model)}
    for target in target_modules:
        if target not in linear_names:
            raise TunelineError(
                f"params.yaml: train.target_modules: '{target}' matches no linear layer of the model; "
                f"its linear layers are: {', '.join(sorted(linear_names))} (or use all-linear)"
            )


def training_memory_bytes(model: torch.nn.Module, params: TrainParams, seq_len: int) -> int:
    """A deliberately generous estimate of QLoRA training's peak memory for `model` (on the meta device).

    4-bit linear weights (~0.55 byte/param with the quantization constants), the rest in the compute dtype;
    LoRA weights, gradients and two AdamW moments in fp32 (16 bytes/param); activations per layer after
    Korthikanti et al. (2022), s*b*h*(34 + 5*a*s/h) bytes at 16 bit (scaled to the compute dtype; with
    gradient checkpointing, 2*s*b*h per layer plus one whole layer); the logits, their softmax and gradient
    in fp32; 20 % and 0.5 GiB for the allocator and the runtime.
    """
    config = model.config
    compute_bytes = DTYPES[params.compute_dtype].itemsize
    linears = linear_layers(model)
    targeted = [module for name, module in linears.items()
                if params.target_modules == "all-linear" or name.rsplit(".", 1)[-1] in params.target_modules]
    linear_params = sum(module.weight.numel() for module in linears.values())
    other_params = sum(param.numel() for param in model.parameters()) - linear_params
    lora_params = sum(params.lora_r * (module.in_features + module.out_features) for module in targeted)
    tokens = params.batch_size * seq_len
    hidden, heads, layers = config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    layer_activations = tokens * (34 * hidden + 5 * heads * seq_len) * compute_bytes / 2
    if params.gradient_checkpointing:
        activations = layers * tokens * hidden * compute_bytes + layer_activations
    else:
        activations = layers * layer_activations
    logits = tokens * config.vocab_size * 4 * 3
    total = linear_params * 0.55 + other_params * compute_bytes + lora_params * 16 + activations + logits
    return int(total * 1.2 + 2**29)


def check_training_memory(model: torch.nn.Module, params: TrainParams, seq_len: int, length_from: str) -> int:
    """Stop before loading anything when training cannot fit in the memory at hand; return the estimate."""
    needed, available = training_memory_bytes(model, params, seq_len), available_memory()
    if needed > available:
        raise TunelineError(
            f"params.yaml: train.batch_size: {params.batch_size} sequences of {seq_len} tokens ({length_from}) need "
            f"about {needed / 2**30:.1f} GiB to train, and {available / 2**30:.1f} GiB is free; lower train.batch_size "
            "(raise train.gradient_accumulation_steps to keep the effective batch), lower dataset.max_length, or "
            "set train.gradient_checkpointing: true"
        )
    return needed


def check_trainer_choices(params: TrainParams) -> None:
    """Name the key when the optimizer or scheduler is not one transformers knows."""
    choices = {"optim": (params.optim, OptimizerNames), "lr_scheduler": (params.lr_scheduler, SchedulerType)}
    for key, (value, names) in choices.items():
        known = [name.value for name in names]
        if value not in known:
            raise TunelineError(f"params.yaml: train.{key}: unknown '{value}'; choose one of: {', '.join(known)}")


def sort_target_modules(adapter_config: Path) -> None:
    """peft writes the resolved target modules in set order, which changes from process to process; sort
    them so that identical training gives a byte-identical adapter and DVC skips the stages after it."""
    config = json.loads(adapter_config.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def keep_adapters_in_compute_dtype(model: torch.nn.Module, compute_dtype: str) -> None:
    """Undo TRL's cast of QLoRA adapters to bf16 when computing in another dtype.

    TRL stores the adapters of a 4-bit model in bf16 (the QLoRA paper's choice). With fp32 compute, as on
    CPU, updates below bf16's resolution are then rounded away: at lr 2e-4 about a fifth of lora_A's
    entries never moved in 4 steps, and at TRL's default lr 2e-5 nine in ten, leaving the loss flat.
    """
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(DTYPES[compute_dtype])


# What a resume needs from a checkpoint; the trainer writes trainer_state.json last, so a checkpoint a kill
# cut short lacks it.
CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth")
TRAINER_STATE = "trainer_state.json"


def inputs_key(base_dir: Path, dataset_dir: Path, params: TrainParams) -> str:
    """A hash of everything that decides the trained adapter: the base, the data this stage reads, the code
    and the params (all but the checkpointing ones). Checkpoints are kept under it."""
    digest = hashlib.sha256()
    for path in (base_dir, dataset_dir / "train.parquet", dataset_dir / "tokenizer", dataset_dir / LINEAGE_FILE):
        digest.update(tree_sha256(path).encode() if path.exists() else b"-")
    for code in [Path(__file__), *sorted(Path(tuneline.__file__).parent.glob("*.py"))]:
        digest.update(code.read_bytes())
    digest.update(params.model_dump_json(exclude={"save_steps", "keep_checkpoints"}).encode())
    return digest.hexdigest()[:16]


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint holding every file a resume needs; checkpoints a kill cut short are deleted."""
    complete = []
    for checkpoint in run_dir.glob("checkpoint-*"):
        if all((checkpoint / name).is_file() for name in (*CHECKPOINT_FILES, TRAINER_STATE)):
            complete.append(checkpoint)
        else:
            shutil.rmtree(checkpoint)
    return max(complete, key=lambda path: int(path.name.rsplit("-", 1)[1]), default=None)


def training_config(params: TrainParams, run_dir: Path) -> SFTConfig:
    return SFTConfig(
        output_dir=str(run_dir),
        seed=params.seed,
        learning_rate=params.learning_rate,
        lr_scheduler_type=params.lr_scheduler,
        warmup_steps=params.warmup_steps,
        weight_decay=params.weight_decay,
        optim=params.optim,
        per_device_train_batch_size=params.batch_size,
        gradient_accumulation_steps=params.gradient_accumulation_steps,
        max_steps=params.max_steps if params.max_steps > 0 else -1,
        num_train_epochs=params.num_epochs,
        max_length=None,  # the dataset stage already fit every example to dataset.max_length
        gradient_checkpointing=params.gradient_checkpointing,
        # Non-reentrant checkpointing lets gradients reach the adapters behind the frozen 4-bit layers.
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=params.compute_dtype == "bfloat16",
        fp16=params.compute_dtype == "float16",
        logging_steps=params.logging_steps,
        save_strategy="steps" if params.save_steps else "no",
        save_steps=params.save_steps or 500,  # unused when save_strategy is "no"
        save_total_limit=params.keep_checkpoints,
        report_to="none",
        dataloader_num_workers=0,
    )


def train(
    *, base_dir: Path, dataset_dir: Path, params: TrainParams, adapter_dir: Path, live: Live, run_dir: Path
) -> dict:
    """Train LoRA adapters on the 4-bit base; save them to `adapter_dir` and return the train metrics.
    Checkpoints go to `run_dir`; training resumes from the newest complete one there."""
    check_trainer_choices(params)
    split = read_split(dataset_dir / "train.parquet")[["input_ids", "attention_mask", "labels"]]
    shapes = meta_model(AutoConfig.from_pretrained(base_dir))
    check_target_modules(shapes, params.target_modules)
    check_training_memory(shapes, params, int(split["input_ids"].map(len).max()), "the longest in train.parquet")
    set_seed(params.seed)
    tokenizer = load_tokenizer(dataset_dir / "tokenizer")  # the one the data were tokenized with
    spec = QuantSpec(params.quant_type, params.double_quant, params.compute_dtype)
    model = load_quantized_model(base_dir, spec)
    lora_config = LoraConfig(
        r=params.lora_r,
        lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout,
        target_modules=params.target_modules,
        use_rslora=params.use_rslora,
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model,
        args=training_config(params, run_dir),
        # input_ids, attention_mask and labels as the dataset stage wrote them (labels hold the loss mask)
        train_dataset=Dataset.from_pandas(split),
        processing_class=tokenizer,
        peft_config=lora_config,
        callbacks=[LiveLossCurve(live)],
    )
    keep_adapters_in_compute_dtype(trainer.model, params.compute_dtype)
    # The adapter is wrapped once, here; a resume loads the checkpoint's adapter weights into it (no second
    # LoRA on top) along with the optimizer, scheduler, RNG states and the step to go on from.
    checkpoint = last_complete_checkpoint(run_dir) if run_dir.is_dir() else None
    if checkpoint:
        print(f"train: resuming from {checkpoint} (a run of the same inputs was interrupted)", flush=True)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.perf_counter() - started
    trainer.model.save_pretrained(adapter_dir)
    sort_target_modules(adapter_dir / "adapter_config.json")
    spec.save(adapter_dir)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    write_json(adapter_dir / ADAPTER_LINEAGE_FILE, {
        "base": read_optional_json(base_dir / BASE_SOURCE_FILE),
        "dataset": read_optional_json(dataset_dir / LINEAGE_FILE),
        "train": params.model_dump(mode="json"),
        "training": {"steps": trainer.state.global_step, "final_loss": round(losses[-1], 4)},
    })
    return {
        "train_loss": round(result.training_loss, 4),
        "first_loss": round(losses[0], 4),
        "final_loss": round(losses[-1], 4),
        "steps": trainer.state.global_step,
        "resumed_from_step": int(checkpoint.name.rsplit("-", 1)[1]) if checkpoint else 0,
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(trainer.state.global_step, 1), 2),
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "device": str(model.device),
    }


def read_optional_json(path: Path) -> dict | None:
    """A lineage file of an input; None for inputs made outside the pipeline (the adapter then says so)."""
    return json.loads(path.read_text()) if path.is_file() else None


@exit_on_error
def main() -> None:
    if len(sys.argv) != 7:
        sys.exit("usage: python -m stages.train BASE_DIR DATASET_DIR ADAPTER_DIR METRICS_FILE LIVE_DIR CHECKPOINTS_DIR")
    params: TrainParams = load_section("train")
    base_dir, dataset_dir, adapter_dir, metrics_file, live_dir, checkpoints_dir = map(Path, sys.argv[1:])
    run_dir = checkpoints_dir / inputs_key(base_dir, dataset_dir, params)
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
