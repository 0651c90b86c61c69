"""Training: QLoRA on a 4-bit base with TRL's SFTTrainer, for the train stage (stages/train.py tells its story).

The checks that fail before anything loads (LoRA targets, memory, optimizer and scheduler names, launcher),
packed attention for padding-free batches, the launcher that relaunches the stage in several processes, the
checkpoints a killed run resumes from, and `train()`, which trains and saves the adapter with its lineage.
"""

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch
from datasets import Dataset
from dvclive import Live
from peft import LoraConfig, get_peft_model_state_dict
from transformers import (
    AttentionInterface, AutoConfig, PreTrainedTokenizerBase, SchedulerType, TrainerCallback, set_seed,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.training_args import OptimizerNames
from trl import SFTConfig, SFTTrainer

from tuneline.artifacts import write_json
from tuneline.errors import TunelineError
from tuneline.lineage import ADAPTER_LINEAGE_FILE, BASE_SOURCE_FILE, LINEAGE_FILE, tree_sha256
from tuneline.modeling import (
    DTYPES, QuantSpec, auto_compute_dtype, available_memory, check_family, layer_features, load_quantized_model,
    load_tokenizer, meta_model, quantized_layers, read_split,
)
from tuneline.params import TrainParams
from tuneline.token_loss import has_plain_logits, score_trained_tokens_only


class _LiveLossCurve(TrainerCallback):
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


_PACKED_SDPA = "tuneline_packed_sdpa"


def _packed_sdpa_attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, cu_seq_lens_q: torch.Tensor | None = None, **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa, example by example on a packed row (TRL's padding-free batches carry the examples'
    bounds as cu_seq_lens_q). With the block-diagonal mask, sdpa would also compute every example's attention to
    all the others of its batch, only to mask it out. A layer with sliding-window attention (Mistral, Gemma's
    local layers) sees, as at inference, only the last `sliding_window` tokens. Any other batch goes to sdpa as
    it is."""
    if cu_seq_lens_q is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    window = kwargs.get("sliding_window")
    bounds = cu_seq_lens_q.tolist()
    outputs = []
    for start, end in zip(bounds, bounds[1:]):
        mask = _sliding_causal_mask(end - start, window, query.device) if window and end - start > window else None
        outputs.append(sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end],
                                              value[:, :, start:end], mask, is_causal=mask is None, **kwargs)[0])
    return torch.cat(outputs, dim=1), None


def _sliding_causal_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """True where a query may attend: itself and the window - 1 tokens before it (transformers' rule)."""
    query = torch.arange(length, device=device)[:, None]
    key = torch.arange(length, device=device)[None, :]
    return (key <= query) & (query - key < window)


# Its mask is sdpa's: built from the restarting position ids (block-diagonal) but unused on a packed row.
AttentionInterface.register(_PACKED_SDPA, _packed_sdpa_attention)
AttentionMaskInterface.register(_PACKED_SDPA, sdpa_mask)


def check_target_modules(model: torch.nn.Module, target_modules: list[str] | str) -> None:
    """Fail early, naming the module, when a LoRA target matches no layer that 4-bit loading quantizes."""
    if target_modules == "all-linear":
        return
    linear_names = {name.rsplit(".", 1)[-1] for name in quantized_layers(model)}
    for target in target_modules:
        if target not in linear_names:
            raise TunelineError(
                f"params.yaml: train.target_modules: '{target}' matches no linear layer of the model; "
                f"its linear layers are: {', '.join(sorted(linear_names))} (or use all-linear)"
            )


# What a token of a batch adds to the peak: per layer and hidden unit (at 16 bit), and per vocabulary entry in TRL's
# chunked LM head on CUDA (fp32 logits, exponentials and log-probabilities, recomputed with their gradient in the
# backward; off CUDA, tuneline/token_loss.py holds a fixed chunk of logits instead, and this overestimates).
# Korthikanti et al. (2022) count 34 bytes a hidden unit for a plain transformer; QLoRA keeps more (fp32 norms,
# every adapter's dropped-out input, sdpa's mask on padded rows). Measured on SmolLM2-135M (all-linear LoRA,
# dropout 0.05, fp32 on CPU): the peak grew by 4.5 MB a token with padded batches, 3.1 MB packed; these give 4.7.
_ACTIVATION_BYTES_PER_HIDDEN = 108
_LOGIT_BYTES = 20


def _training_memory_bytes(model: torch.nn.Module, params: TrainParams, seq_len: int) -> int:
    """A deliberately generous estimate of QLoRA training's peak memory for `model` (on the meta device).

    4-bit linear weights (~0.55 byte/param with the quantization constants), the rest in the compute dtype;
    LoRA weights, gradients and two AdamW moments in fp32 (16 bytes/param); activations per token and layer
    (_ACTIVATION_BYTES_PER_HIDDEN, scaled to the compute dtype; with gradient checkpointing, one layer's plus the
    input of every other); the LM head's logits (_LOGIT_BYTES); a padding-free batch's block-diagonal mask (one
    byte per pair of its tokens); 20 % and 0.5 GiB for the allocator and the runtime. A batch is costed at
    batch_size examples of `seq_len` tokens, padded or packed alike.
    """
    config = model.config
    compute_bytes = DTYPES[params.compute_dtype].itemsize
    linears = quantized_layers(model)
    targeted = [module for name, module in linears.items()
                if params.target_modules == "all-linear" or name.rsplit(".", 1)[-1] in params.target_modules]
    linear_params = sum(module.weight.numel() for module in linears.values())
    other_params = sum(param.numel() for param in model.parameters()) - linear_params
    lora_params = sum(params.lora_r * sum(layer_features(module)) for module in targeted)
    tokens = params.batch_size * seq_len
    hidden, layers = config.hidden_size, config.num_hidden_layers
    layer_activations = tokens * _ACTIVATION_BYTES_PER_HIDDEN * hidden * compute_bytes / 2
    if params.gradient_checkpointing:
        activations = layers * tokens * hidden * compute_bytes + layer_activations
    else:
        activations = layers * layer_activations
    logits = tokens * config.vocab_size * _LOGIT_BYTES
    packed_mask = tokens**2 if params.padding_free else 0
    total = (linear_params * 0.55 + other_params * compute_bytes + lora_params * 16 + activations + logits
             + packed_mask)
    return int(total * 1.2 + 2**29)


def _processes_per_memory(params: TrainParams) -> int:
    """How many training processes share the memory `available_memory` reports: all of them in RAM, one per GPU."""
    return 1 if params.launcher == "none" or torch.cuda.is_available() else params.num_processes


def check_training_memory(model: torch.nn.Module, params: TrainParams, seq_len: int, length_from: str) -> int:
    """Stop before loading anything when training cannot fit in the memory at hand; return the estimate."""
    params = resolve_device_defaults(params)
    sharing = _processes_per_memory(params)
    needed, available = _training_memory_bytes(model, params, seq_len) * sharing, available_memory()
    if needed > available:
        in_processes = f" in {sharing} processes" if sharing > 1 else ""
        raise TunelineError(
            f"params.yaml: train.batch_size: {params.batch_size} sequences of {seq_len} tokens ({length_from}) need "
            f"about {needed / 2**30:.1f} GiB to train{in_processes}, and {available / 2**30:.1f} GiB is free; "
            "lower train.batch_size (raise train.gradient_accumulation_steps to keep the effective batch), lower "
            "dataset.max_length, or "
            "set train.gradient_checkpointing: true"
        )
    return needed


def resolve_device_defaults(params: TrainParams) -> TrainParams:
    """`params` with `auto` resolved for the device training runs on: compute dtype as auto_compute_dtype, and
    paged 8-bit AdamW on CUDA (its state pages out to the CPU instead of failing when the GPU is full), plain
    AdamW on the CPU. Explicit values pass unchanged, and so do resolved params: each function here that reads
    either value resolves its params first."""
    resolved = {}
    if params.compute_dtype == "auto":
        resolved["compute_dtype"] = auto_compute_dtype()
    if params.optim == "auto":
        resolved["optim"] = "paged_adamw_8bit" if torch.cuda.is_available() else "adamw_torch"
    return params.model_copy(update=resolved)


def check_trainer_choices(params: TrainParams) -> None:
    """Name the key when the optimizer or scheduler is not one transformers knows."""
    params = resolve_device_defaults(params)
    choices = {"optim": (params.optim, OptimizerNames), "lr_scheduler": (params.lr_scheduler, SchedulerType)}
    for key, (value, names) in choices.items():
        known = [name.value for name in names]
        if value not in known:
            raise TunelineError(f"params.yaml: train.{key}: unknown '{value}'; choose one of: "
                                f"{'auto, ' if key == 'optim' else ''}{', '.join(known)}")


def check_launcher(params: TrainParams) -> None:
    """Name the key when the processes asked for cannot run: no launcher, or more processes than GPUs."""
    if params.num_processes > 1 and params.launcher == "none":
        raise TunelineError(f"params.yaml: train.num_processes: {params.num_processes} processes need a launcher; "
                            "set train.launcher: torchrun or accelerate")
    if torch.cuda.is_available() and params.num_processes > torch.cuda.device_count():
        raise TunelineError(f"params.yaml: train.num_processes: {params.num_processes} processes, one per GPU, and "
                            f"this machine has {torch.cuda.device_count()}")


def _sort_target_modules(adapter_config: Path) -> None:
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


def launched_worker() -> bool:
    """Whether torchrun or accelerate started this process (they set RANK and LOCAL_RANK)."""
    return "RANK" in os.environ or "LOCAL_RANK" in os.environ


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# What a resume needs from a checkpoint; the main process writes trainer_state.json last, so a checkpoint a kill
# cut short lacks it, or (with several processes) lacks another process's RNG state.
CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")


def _checkpoint_files(world_size: int) -> tuple[str, ...]:
    """The files of a complete checkpoint: the trainer saves one RNG state per process."""
    rng_states = ["rng_state.pth"] if world_size == 1 else [f"rng_state_{rank}.pth" for rank in range(world_size)]
    return (*CHECKPOINT_FILES, *rng_states)


def inputs_key(base_dir: Path, dataset_dir: Path, params: TrainParams, *, code: list[Path]) -> str:
    """A hash of everything that decides the trained adapter: the base, the data the train stage reads, the code
    (`code`: the files the stage runs, in sorted order, the same set dvc.yaml lists as its code deps) and the
    params as resolved for this device (all but the checkpointing ones). Checkpoints are kept under it."""
    digest = hashlib.sha256()
    for path in (base_dir, dataset_dir / "train.parquet", dataset_dir / "tokenizer", dataset_dir / LINEAGE_FILE):
        digest.update(tree_sha256(path).encode() if path.exists() else b"-")
    for path in code:
        digest.update(path.read_bytes())
    resolved = resolve_device_defaults(params)
    digest.update(resolved.model_dump_json(exclude={"save_steps", "keep_checkpoints"}).encode())
    return digest.hexdigest()[:16]


def last_complete_checkpoint(run_dir: Path, world_size: int) -> Path | None:
    """The newest checkpoint holding every file a resume needs; the main process deletes those a kill cut short
    (every process picks the same one: nothing writes checkpoints before all of them train)."""
    complete = []
    for checkpoint in run_dir.glob("checkpoint-*"):
        if all((checkpoint / name).is_file() for name in _checkpoint_files(world_size)):
            complete.append(checkpoint)
        elif is_main_process():
            shutil.rmtree(checkpoint, ignore_errors=True)
    return max(complete, key=lambda path: int(path.name.rsplit("-", 1)[1]), default=None)


def _distributed_args() -> dict:
    """TrainingArguments for DDP in a launched process: nccl between GPUs; gloo on CPU, where accelerate only
    runs DDP when told the run is on the CPU. Every adapter takes part in every forward: DDP need not look for
    unused ones."""
    if not launched_worker():
        return {}
    backend = {"ddp_backend": "nccl"} if torch.cuda.is_available() else {"ddp_backend": "gloo", "use_cpu": True}
    return {**backend, "ddp_find_unused_parameters": False}


def _training_config(params: TrainParams, run_dir: Path, padding_free: bool) -> SFTConfig:
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
        padding_free=padding_free,
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
        **_distributed_args(),
    )


def use_packed_attention(model: torch.nn.Module) -> str | None:
    """Switch the model's attention to _packed_sdpa_attention, so that packed examples attend only to themselves.
    Returns why not, leaving the model as it was, when the family's attention cannot switch: its code does not go
    through transformers' attention interface, or transformers refuses sdpa for it (Gemma2's logit soft-capping)."""
    try:
        model.set_attn_implementation(_PACKED_SDPA)
    except ValueError as error:
        return str(error).strip().splitlines()[0]
    if model.config._attn_implementation != _PACKED_SDPA:
        return "its attention does not use transformers' attention interface"
    return None


def build_trainer(
    *, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, split: Dataset, params: TrainParams,
    run_dir: Path, callbacks: list[TrainerCallback],
) -> SFTTrainer:
    """TRL's SFTTrainer with LoRA adapters from the params on `model`, training on `split` as it is: packed rows
    with `train.padding_free` where the family's attention can take them, else padded batches (said in one line)."""
    params = resolve_device_defaults(params)
    padding_free = params.padding_free
    if padding_free and (reason := use_packed_attention(model)):
        if is_main_process():
            print(f"train: {type(model).__name__} cannot take packed rows ({reason}); training on padded batches "
                  "(train.padding_free is ignored for this model)", flush=True)
        padding_free = False
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
        args=_training_config(params, run_dir, padding_free),
        train_dataset=split,
        processing_class=tokenizer,
        peft_config=lora_config,
        callbacks=callbacks,
    )
    keep_adapters_in_compute_dtype(trainer.model, params.compute_dtype)
    causal_lm = trainer.model.get_base_model()
    if causal_lm.device.type != "cuda" and has_plain_logits(causal_lm.config):  # CUDA keeps TRL's Triton kernel
        score_trained_tokens_only(causal_lm)
    return trainer


# accelerate's name for the compute dtype; TrainingArguments' bf16/fp16 flags decide anyway.
_MIXED_PRECISION = {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}


def launcher_command(params: TrainParams, stage_args: list[str]) -> list[str]:
    """The command that runs the train stage (`python -m stages.train`) with `stage_args` in `train.num_processes`
    processes under `train.launcher` (torchrun, or accelerate launch, through this interpreter, so the venv's own)."""
    processes = str(params.num_processes)
    params = resolve_device_defaults(params)
    if params.launcher == "torchrun":
        launcher = ["torch.distributed.run", "--standalone", "--nproc_per_node", processes]
    else:
        # --multi_gpu is accelerate's switch for torchrun-style DDP; on a CPU-only machine it runs gloo processes.
        launcher = ["accelerate.commands.launch", "--multi_gpu", "--num_processes", processes, "--num_machines", "1",
                    "--main_process_port", "0", "--mixed_precision", _MIXED_PRECISION[params.compute_dtype],
                    "--dynamo_backend", "no"]
    return [sys.executable, "-m", *launcher, "-m", "stages.train", *stage_args]


def launch(params: TrainParams, stage_args: list[str]) -> NoReturn:
    """Become the launcher: it starts the processes, and its exit status is the stage's (a kill reaches it)."""
    command = launcher_command(params, stage_args)
    print(f"train: {params.launcher} runs {params.num_processes} processes: {' '.join(command)}", flush=True)
    os.execv(command[0], command)


def _adapter_digest(model: torch.nn.Module) -> str:
    """sha256 of the adapter weights as save_pretrained writes them: equal in every process when DDP works."""
    digest = hashlib.sha256()
    for _, tensor in sorted(get_peft_model_state_dict(model).items()):
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _save_adapter(
    *, trainer: SFTTrainer, adapter_dir: Path, spec: QuantSpec, base_dir: Path, dataset_dir: Path, params: TrainParams,
    final_loss: float,
) -> None:
    """The adapter, the quantization spec merge rebuilds, and the lineage: base, data, params, training."""
    trainer.model.save_pretrained(adapter_dir)
    _sort_target_modules(adapter_dir / "adapter_config.json")
    spec.save(adapter_dir)
    write_json(adapter_dir / ADAPTER_LINEAGE_FILE, {
        "base": _read_optional_json(base_dir / BASE_SOURCE_FILE),
        "dataset": _read_optional_json(dataset_dir / LINEAGE_FILE),
        "train": params.model_dump(mode="json"),
        "training": {"steps": trainer.state.global_step, "final_loss": round(final_loss, 4)},
    })


def train(
    *, base_dir: Path, dataset_dir: Path, params: TrainParams, adapter_dir: Path | None, live: Live | None,
    run_dir: Path,
) -> dict:
    """Train LoRA adapters on the 4-bit base and return the train metrics; the main process saves them to
    `adapter_dir` and logs the loss curve to `live` (both None in the other processes of a launched run).
    Checkpoints go to `run_dir`; training resumes from the newest complete one there. `auto` params are resolved
    for this device first; the adapter's lineage and the metrics record what they resolved to."""
    params = resolve_device_defaults(params)
    check_trainer_choices(params)
    check_launcher(params)
    split = read_split(dataset_dir / "train.parquet")[["input_ids", "labels"]]  # labels hold the loss mask
    shapes = meta_model(AutoConfig.from_pretrained(base_dir))
    check_family(shapes)
    check_target_modules(shapes, params.target_modules)
    check_training_memory(shapes, params, int(split["input_ids"].map(len).max()), "the longest in train.parquet")
    set_seed(params.seed)
    tokenizer = load_tokenizer(dataset_dir / "tokenizer")  # the one the data were tokenized with
    spec = QuantSpec(params.quant_type, params.double_quant, params.compute_dtype)
    if launched_worker() and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # the base loads on the current GPU: this process's
    model = load_quantized_model(base_dir, spec)
    trainer = build_trainer(
        model=model, tokenizer=tokenizer, split=Dataset.from_pandas(split), params=params, run_dir=run_dir,
        callbacks=[_LiveLossCurve(live)] if live else [],
    )
    world_size = trainer.args.world_size
    # The adapter is wrapped once, here; a resume loads the checkpoint's adapter weights into it (no second
    # LoRA on top) along with the optimizer, scheduler, RNG states and the step to go on from.
    checkpoint = last_complete_checkpoint(run_dir, world_size) if run_dir.is_dir() else None
    if checkpoint and is_main_process():
        print(f"train: resuming from {checkpoint} (a run of the same inputs was interrupted)", flush=True)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.perf_counter() - started
    trainer.accelerator.wait_for_everyone()  # every process has written its part of the last checkpoint
    if world_size > 1:
        print(f"train: rank {trainer.args.process_index} of {world_size}: {trainer.state.global_step} steps, "
              f"adapter sha256 {_adapter_digest(trainer.model)}", flush=True)
    # The logged losses; a run shorter than train.logging_steps logged none, only its mean.
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry] or [result.training_loss]
    if adapter_dir is not None:
        _save_adapter(trainer=trainer, adapter_dir=adapter_dir, spec=spec, base_dir=base_dir,
                      dataset_dir=dataset_dir, params=params, final_loss=losses[-1])
    resumed_from = int(checkpoint.name.rsplit("-", 1)[1]) if checkpoint else 0
    return {
        **_train_loss(trainer.state.log_history, result.training_loss, resumed_from, trainer.state.global_step),
        "first_loss": round(losses[0], 4),
        "final_loss": round(losses[-1], 4),
        "steps": trainer.state.global_step,
        "resumed_from_step": resumed_from,
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(trainer.state.global_step, 1), 2),
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "batches": "packed" if trainer.args.padding_free else "padded",
        "device": str(model.device),
        "compute_dtype": params.compute_dtype,
        "optim": params.optim,
        "world_size": world_size,
    }


def _train_loss(log_history: list[dict], trainer_loss: float, resumed_from: int, steps: int) -> dict:
    """The mean training loss over every step of the run. The trainer's own figure covers only the steps since a
    resume; the logged losses (restored with the checkpoint) each cover the steps since the previous log, so
    when they reach the last step they give every step's. When they do not, the trainer's figure is labelled."""
    if not resumed_from:
        return {"train_loss": round(trainer_loss, 4)}
    total, previous = 0.0, 0
    for entry in (entry for entry in log_history if "loss" in entry):
        total += entry["loss"] * (entry["step"] - previous)
        previous = entry["step"]
    if previous == steps:
        return {"train_loss": round(total / steps, 4)}
    return {"train_loss": round(trainer_loss, 4), "train_loss_covers": f"steps {resumed_from + 1}-{steps}"}


def _read_optional_json(path: Path) -> dict | None:
    """A lineage file of an input; None for inputs made outside the pipeline (the adapter then says so)."""
    return json.loads(path.read_text()) if path.is_file() else None
