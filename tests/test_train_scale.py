"""Training at scale: padding-free batches that train exactly like padded ones, the throughput benchmark on the
tiny model, and DDP under a launcher (two CPU processes, gloo)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PROJECT, describe, subprocess_env, write_params
from tuneline.params import TrainParams

STAGE_ARGS = ["models/base", "data/dataset", "models/adapter", "metrics/train.json", "dvclive/train",
              "checkpoints/train"]


# ------------------------------------------------------------------------------------------- padding-free


@pytest.fixture(scope="module")
def tiny_trainer(tmp_path_factory, tiny_model_dir, tiny_params, tiny_dataset_dir):
    """The train stage's SFTTrainer on the tiny 4-bit model, its adapter made to matter (LoRA B non-zero)."""
    from datasets import Dataset

    from stages.train import build_trainer
    from tuneline.modeling import QuantSpec, load_quantized_model, load_tokenizer

    params = TrainParams(**tiny_params["train"])
    spec = QuantSpec(params.quant_type, params.double_quant, params.compute_dtype)
    model = load_quantized_model(tiny_model_dir, spec)
    empty = Dataset.from_dict({"input_ids": [[1, 2]], "labels": [[-100, 2]]})
    trainer = build_trainer(model=model, tokenizer=load_tokenizer(tiny_dataset_dir / "tokenizer"),
                            split=empty, params=params,
                            run_dir=tmp_path_factory.mktemp("run"), callbacks=[])
    torch.manual_seed(0)
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    trainer.model.eval()
    return trainer


def varied_examples(dataset_dir: Path, count: int = 4) -> list[dict]:
    """`count` train rows of different lengths, as the trainer's collator receives them."""
    from tuneline.modeling import read_split

    split = read_split(dataset_dir / "train.parquet")
    split = split.assign(length=split["input_ids"].map(len)).drop_duplicates("length").sort_values("length")
    rows = split.iloc[[round(i * (len(split) - 1) / (count - 1)) for i in range(count)]]
    return [{"input_ids": list(row.input_ids), "labels": list(row.labels)} for row in rows.itertuples()]


def logits_of(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{key: value for key, value in batch.items() if key != "labels"}).logits


def loss_of(trainer, batch: dict) -> tuple[float, int]:
    """The training loss of a batch (nats per trained token) and its number of trained tokens."""
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
    return loss.item(), int((batch["labels"][:, 1:] != -100).sum())


def test_a_packed_batch_trains_like_its_examples_one_by_one(tiny_trainer, tiny_dataset_dir):
    """The stage's collator packs a batch into one row; the model must score each example in it as if alone: if
    attention (or the loss) crossed examples, the logits and the loss would differ."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    examples = varied_examples(tiny_dataset_dir)
    assert len({len(example["input_ids"]) for example in examples}) == 4
    packed = tiny_trainer.data_collator(examples)
    assert packed["input_ids"].shape == (1, sum(len(example["input_ids"]) for example in examples))
    assert "attention_mask" not in packed
    alone = [tiny_trainer.data_collator([example]) for example in examples]

    alone_logits = torch.cat([logits_of(tiny_trainer.model, batch)[0] for batch in alone])
    assert (logits_of(tiny_trainer.model, packed)[0] - alone_logits).abs().max() < 1e-5
    # Without the examples' bounds, sdpa gets the block-diagonal mask transformers builds from the position ids.
    positions_only = {key: packed[key] for key in ("input_ids", "position_ids")}
    assert (logits_of(tiny_trainer.model, positions_only)[0] - alone_logits).abs().max() < 1e-5

    losses = [loss_of(tiny_trainer, batch) for batch in alone]
    one_by_one = sum(loss * tokens for loss, tokens in losses) / sum(tokens for _, tokens in losses)
    padded = DataCollatorForLanguageModeling(pad_token_id=tiny_trainer.processing_class.pad_token_id)(examples)
    assert loss_of(tiny_trainer, packed)[0] == pytest.approx(one_by_one, abs=1e-5)
    assert loss_of(tiny_trainer, padded)[0] == pytest.approx(one_by_one, abs=1e-5)

    # The control: the same row read as one sequence (attention across examples) scores differently.
    crossing = {"input_ids": packed["input_ids"]}
    assert (logits_of(tiny_trainer.model, crossing)[0] - alone_logits).abs().max() > 1e-2


def test_a_model_whose_attention_cannot_take_packed_rows_is_named(tiny_params):
    """A model whose attention does not go through transformers' interface keeps its own: packed examples would
    attend to each other, so the stage stops and names the key."""
    from types import SimpleNamespace

    from stages.train import use_packed_attention
    from tuneline.errors import TunelineError

    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="eager"),
                            set_attn_implementation=lambda name: None)
    with pytest.raises(TunelineError, match=r"^params.yaml: train.padding_free: SimpleNamespace cannot take packed "
                                            r"rows .*; set train.padding_free: false$"):
        use_packed_attention(model)


# ------------------------------------------------------------------------------------------- the benchmark

TABLE_ROW = re.compile(
    r"^\s+(?P<run>plain|ours)\s+(?P<steps>\d+)\s+(?P<real>[\d,]+)\s+(?P<computed>[\d,]+)\s+[\d.]+\s+[\d.]+"
    r"\s+[\d.]+ GiB\s+(?P<loss>[\d.]+)$",
    re.MULTILINE,
)


def test_the_throughput_benchmark_on_the_tiny_model(tiny_model_dir, tiny_dataset_dir):
    """What the benchmark's reader relies on: both runs train on the same tokens, ours computes fewer on varied
    lengths, the losses agree, and the table is printed."""
    result = subprocess.run(
        [sys.executable, "benchmarks/train_throughput.py", "--model", str(tiny_model_dir), "--dataset",
         str(tiny_dataset_dir), "--sets", "chat", "--chat-examples", "150", "--steps", "3", "--batch-size", "4"],
        cwd=PROJECT, env={**subprocess_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
    )
    assert result.returncode == 0, describe(result)
    out = result.stdout
    rows = {match["run"]: match for match in TABLE_ROW.finditer(out)}
    assert set(rows) == {"plain", "ours"}, out
    plain, ours = rows["plain"], rows["ours"]
    assert plain["steps"] == ours["steps"] == "3"
    assert plain["real"] == ours["real"]
    assert int(ours["computed"].replace(",", "")) < int(plain["computed"].replace(",", ""))
    assert float(ours["loss"]) == pytest.approx(float(plain["loss"]), rel=0.01)
    assert re.search(r"token ids and loss mask equal to the dataset stage's: (\d+)/\1 examples", out), out
    assert "same examples in every step: yes" in out
    assert re.search(r"ours/plain: speed [\d.]+x", out)
    assert re.search(r"target: ours >= 1.5x .*: [\d.]+x, (met|NOT met)", out)


# ------------------------------------------------------------------------------------------- the launcher


@pytest.mark.parametrize("launcher, expected", [
    ("torchrun", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]),
    ("accelerate", ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no"]),
])
def test_the_launcher_command_for_two_processes(tiny_params, launcher, expected):
    from stages.train import launcher_command

    params = TrainParams(**{**tiny_params["train"], "launcher": launcher, "num_processes": 2})
    assert launcher_command(params, STAGE_ARGS) == [sys.executable, *expected, "-m", "stages.train", *STAGE_ARGS]


def test_processes_without_a_launcher_are_one_line_naming_the_key(tiny_params):
    from stages.train import check_launcher
    from tuneline.errors import TunelineError

    with pytest.raises(TunelineError, match=r"^params.yaml: train.num_processes: 2 processes need a launcher; set "
                                            r"train.launcher: torchrun or accelerate$"):
        check_launcher(TrainParams(**{**tiny_params["train"], "num_processes": 2}))


def test_train_under_torchrun_in_two_cpu_processes_resumes_and_writes_once(tmp_path, params, tiny_model_dir,
                                                                           tiny_dataset_dir):
    """`python -m stages.train` relaunches itself in two gloo processes. Killed while they write their third
    checkpoint, it resumes from the second; both processes train every step in step, and the main one writes."""
    params["train"].update(launcher="torchrun", num_processes=2, max_steps=4, batch_size=2, save_steps=1)
    write_params(tmp_path, params)
    command = [sys.executable, "-m", "stages.train", str(tiny_model_dir), str(tiny_dataset_dir), "adapter",
               "metrics.json", "live", "checkpoints"]
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    kill = {"PYTHONPATH": str(PROJECT / "tests" / "faults"),
            "TUNELINE_KILL": "stages.train:transformers.trainer:Trainer._save_rng_state:3"}
    killed = subprocess.run(command, cwd=tmp_path, env={**env, **kill}, capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0 and "fault injection: SIGKILL" in killed.stderr, describe(killed)
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "metrics.json").exists()

    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, describe(result)
    assert "train: torchrun runs 2 processes" in result.stdout
    assert re.search(r"train: resuming from checkpoints/\w+/checkpoint-2 ", result.stdout), describe(result)
    digests = dict(re.findall(r"train: rank (\d) of 2: 4 steps, adapter sha256 (\w+)", result.stdout))
    assert set(digests) == {"0", "1"}, describe(result)  # both processes trained every step...
    assert digests["0"] == digests["1"]  # ...in step (DDP), and the adapter written is what each of them holds
    assert result.stdout.count("train: loss ") == 1  # only the main process reports

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 4 and metrics["resumed_from_step"] == 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter", "live", "metrics.json", "params.yaml"]
    assert saved_digest(load_file(tmp_path / "adapter" / "adapter_model.safetensors")) == digests["0"]
    assert (tmp_path / "live" / "plots" / "metrics" / "loss.tsv").is_file()

    from peft import PeftModel

    from tuneline.modeling import load_full_model

    PeftModel.from_pretrained(load_full_model(tiny_model_dir), tmp_path / "adapter")  # loadable


def saved_digest(weights: dict[str, torch.Tensor]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for _, tensor in sorted(weights.items()):
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def test_a_checkpoint_of_two_processes_is_complete_with_both_rng_states(tmp_path):
    """A kill between the main process's trainer_state.json and the other's RNG state leaves a checkpoint that
    looks whole to one process: resuming must skip it."""
    from stages.train import CHECKPOINT_FILES, last_complete_checkpoint

    for step, ranks in ((1, [0, 1]), (2, [0])):
        checkpoint = tmp_path / f"checkpoint-{step}"
        checkpoint.mkdir()
        for name in [*CHECKPOINT_FILES, *(f"rng_state_{rank}.pth" for rank in ranks)]:
            (checkpoint / name).touch()
    assert last_complete_checkpoint(tmp_path, world_size=2) == tmp_path / "checkpoint-1"
    assert not (tmp_path / "checkpoint-2").exists()
