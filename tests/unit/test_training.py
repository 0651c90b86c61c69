"""tuneline/training.py: QLoRA training of the tiny model, its checks, the adapter it writes, padding-free batches
that train exactly like padded ones, the launcher's command and complete checkpoints."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tuneline.errors import TunelineError
from tuneline.params import TrainParams

STAGE_ARGS = ["models/base", "data/dataset", "models/adapter", "metrics/train.json", "dvclive/train",
              "checkpoints/train"]



class TestTrain:
    def test_check_target_modules(self, tiny_model_dir):
        from tuneline.training import check_target_modules
        from tuneline.modeling import load_full_model

        model = load_full_model(tiny_model_dir)
        check_target_modules(model, "all-linear")
        check_target_modules(model, ["q_proj", "v_proj", "down_proj"])
        with pytest.raises(TunelineError) as error:
            check_target_modules(model, ["q_proj", "no_such_module"])
        message = str(error.value)
        assert "train.target_modules" in message and "'no_such_module'" in message
        assert "q_proj" in message  # lists the layers that exist

    def test_train_writes_adapter(self, trained_adapter, tiny_params):
        adapter_dir, metrics, live_dir = trained_adapter
        for name in ("adapter_config.json", "adapter_model.safetensors", "tuneline_quantization.json"):
            assert (adapter_dir / name).is_file(), name
        spec = json.loads((adapter_dir / "tuneline_quantization.json").read_text())
        train = tiny_params["train"]
        # params.yaml's `auto` resolved for the CPU, and recorded in the spec, the metrics and the lineage
        assert train["compute_dtype"] == "auto" and train["optim"] == "auto"
        assert spec == {"quant_type": train["quant_type"], "double_quant": train["double_quant"],
                        "compute_dtype": "float32"}
        assert (metrics["compute_dtype"], metrics["optim"]) == ("float32", "adamw_torch")
        lineage = json.loads((adapter_dir / "tuneline_lineage.json").read_text())
        assert (lineage["train"]["compute_dtype"], lineage["train"]["optim"]) == ("float32", "adamw_torch")
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        assert config["r"] == train["lora_r"] and config["lora_alpha"] == train["lora_alpha"]
        assert metrics["steps"] == 3
        assert all(math.isfinite(metrics[key]) for key in ("train_loss", "first_loss", "final_loss"))
        assert metrics["trainable_parameters"] > 0
        weights = load_file(adapter_dir / "adapter_model.safetensors")
        assert any("lora_A" in name for name in weights) and any("lora_B" in name for name in weights)
        # adapters stay in the compute dtype (float32), not TRL's bf16
        assert {t.dtype for t in weights.values()} == {torch.float32}
        # nothing beside the adapter but the live dir and the run's checkpoints (the trainer saves the last
        # step too; the stage's main() deletes them once the adapter is written)
        assert sorted(p.name for p in adapter_dir.parent.iterdir()) == ["adapter", "checkpoints", "live"]
        assert [p.name for p in (adapter_dir.parent / "checkpoints").glob("checkpoint-*")] == ["checkpoint-3"]
        assert (live_dir / "plots" / "metrics" / "loss.tsv").is_file()

    def test_missing_quant_spec_is_named(self, tmp_path):
        from tuneline.modeling import QuantSpec

        with pytest.raises(TunelineError, match="tuneline_quantization.json: missing"):
            QuantSpec.load(tmp_path)

    @staticmethod
    def run_train(tmp_path: Path, tiny_model_dir: Path, train_params: dict, dataset_dir: Path) -> Path:
        """train() into tmp_path/models/adapter; returns tmp_path/models (the adapter's parent)."""
        from dvclive import Live

        from tuneline.training import train

        params = TrainParams(**{**train_params, "max_steps": 1})
        root = tmp_path / "models"
        root.mkdir(exist_ok=True)
        with Live(dir=str(tmp_path / "live"), dvcyaml=None, save_dvc_exp=False) as live:
            train(base_dir=tiny_model_dir, dataset_dir=dataset_dir, params=params, adapter_dir=root / "adapter", live=live,
                  run_dir=tmp_path / "checkpoints")
        return root

    @pytest.mark.parametrize("cuda, bf16, expected", [
        (False, False, ("float32", "adamw_torch")),
        (True, True, ("bfloat16", "paged_adamw_8bit")),
        (True, False, ("float16", "paged_adamw_8bit")),
    ])
    def test_auto_defaults_follow_the_device(self, tiny_params, monkeypatch, cuda, bf16, expected):
        """The CUDA rows stand in for a GPU this machine lacks; benchmarks/gpu_check.py checks them on a real one."""
        from tuneline.training import resolve_device_defaults

        if cuda:
            monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
            monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
        params = TrainParams(**tiny_params["train"])
        resolved = resolve_device_defaults(params)
        assert (resolved.compute_dtype, resolved.optim) == expected
        explicit = TrainParams(**{**tiny_params["train"], "compute_dtype": "float16", "optim": "adamw_torch"})
        assert resolve_device_defaults(explicit) == explicit

    @pytest.mark.parametrize("key, value", [("optim", "adamw_typo"), ("lr_scheduler", "cosinus")])
    def test_unknown_trainer_choice_is_a_tuneline_error(self, tmp_path, tiny_model_dir, tiny_params, tiny_dataset_dir, key, value):
        with pytest.raises(TunelineError) as error:
            self.run_train(tmp_path, tiny_model_dir, {**tiny_params["train"], key: value}, tiny_dataset_dir)
        assert f"train.{key}" in str(error.value) and value in str(error.value)
        assert list((tmp_path / "models").iterdir()) == []

    def test_a_batch_too_big_for_memory_stops_before_loading_the_model(self, tmp_path, tiny_model_dir, tiny_params,
                                                                        tiny_dataset_dir, monkeypatch):
        import tuneline.training

        monkeypatch.setattr(tuneline.training, "load_quantized_model", lambda *args: pytest.fail("model was loaded"))
        with pytest.raises(TunelineError) as error:
            self.run_train(tmp_path, tiny_model_dir, {**tiny_params["train"], "batch_size": 10**6}, tiny_dataset_dir)
        assert str(error.value).startswith("params.yaml: train.batch_size: 1000000 sequences of ")
        assert "tokens (the longest in train.parquet) need about " in str(error.value)

    def test_failure_during_training_leaves_no_scratch_dir(self, tmp_path, tiny_model_dir, tiny_params, tiny_dataset_dir,
                                                           monkeypatch):
        import tuneline.training

        def crash(self, *args, **kwargs):
            raise RuntimeError("killed mid-training")

        monkeypatch.setattr(tuneline.training.SFTTrainer, "train", crash)
        with pytest.raises(RuntimeError, match="killed mid-training"):
            self.run_train(tmp_path, tiny_model_dir, tiny_params["train"], tiny_dataset_dir)
        assert list((tmp_path / "models").iterdir()) == []

    def test_failure_building_the_trainer_leaves_no_scratch_dir(self, tmp_path, tiny_model_dir, tiny_params,
                                                                tiny_dataset_dir, monkeypatch):
        import tuneline.training

        def crash(*args, **kwargs):
            raise RuntimeError("could not build the trainer")

        monkeypatch.setattr(tuneline.training, "SFTTrainer", crash)
        with pytest.raises(RuntimeError, match="could not build the trainer"):
            self.run_train(tmp_path, tiny_model_dir, tiny_params["train"], tiny_dataset_dir)
        assert list((tmp_path / "models").iterdir()) == []


# ------------------------------------------------------------------------------------------- padding-free


@pytest.fixture(scope="module")
def tiny_trainer(tmp_path_factory, tiny_model_dir, tiny_params, tiny_dataset_dir):
    """The train stage's SFTTrainer on the tiny 4-bit model, its adapter made to matter (LoRA B non-zero)."""
    from datasets import Dataset

    from tuneline.training import build_trainer, resolve_device_defaults
    from tuneline.modeling import QuantSpec, load_quantized_model, load_tokenizer

    params = resolve_device_defaults(TrainParams(**tiny_params["train"]))
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


def test_a_model_whose_attention_cannot_take_packed_rows_trains_padded_and_says_so(tiny_model_dir, tiny_dataset_dir,
                                                                                  tiny_params, tmp_path, capsys):
    """A model whose attention does not go through transformers' interface keeps its own, and one transformers
    refuses sdpa for cannot switch: packed examples would attend to each other, so train says so in one line and
    trains on padded batches."""
    from types import SimpleNamespace

    from datasets import Dataset

    from tuneline.modeling import QuantSpec, load_quantized_model, load_tokenizer
    from tuneline.training import build_trainer, use_packed_attention

    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="eager"),
                            set_attn_implementation=lambda name: None)
    assert use_packed_attention(model) == "its attention does not use transformers' attention interface"

    def refuse(name):
        raise ValueError("LlamaForCausalLM does not support an attention implementation through sdpa.\nMore")

    spec = QuantSpec("nf4", True, "float32")
    model = load_quantized_model(tiny_model_dir, spec)
    model.set_attn_implementation = refuse
    empty = Dataset.from_dict({"input_ids": [[1, 2]], "labels": [[-100, 2]]})
    trainer = build_trainer(model=model, tokenizer=load_tokenizer(tiny_dataset_dir / "tokenizer"), split=empty,
                            params=TrainParams(**tiny_params["train"]), run_dir=tmp_path, callbacks=[])
    assert trainer.args.padding_free is False
    assert capsys.readouterr().out == (
        "train: LlamaForCausalLM cannot take packed rows (LlamaForCausalLM does not support an attention "
        "implementation through sdpa.); training on padded batches (train.padding_free is ignored for this model)\n")


# ------------------------------------------------------------------------------------------- the launcher


@pytest.mark.parametrize("launcher, expected", [
    ("torchrun", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]),
    ("accelerate", ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no"]),
])
def test_the_launcher_command_for_two_processes(tiny_params, launcher, expected):
    from tuneline.training import launcher_command

    params = TrainParams(**{**tiny_params["train"], "launcher": launcher, "num_processes": 2})
    assert launcher_command(params, STAGE_ARGS) == [sys.executable, *expected, "-m", "stages.train", *STAGE_ARGS]


def test_processes_without_a_launcher_are_one_line_naming_the_key(tiny_params):
    from tuneline.training import check_launcher
    from tuneline.errors import TunelineError

    with pytest.raises(TunelineError, match=r"^params.yaml: train.num_processes: 2 processes need a launcher; set "
                                            r"train.launcher: torchrun or accelerate$"):
        check_launcher(TrainParams(**{**tiny_params["train"], "num_processes": 2}))


def test_a_checkpoint_of_two_processes_is_complete_with_both_rng_states(tmp_path):
    """A kill between the main process's trainer_state.json and the other's RNG state leaves a checkpoint that
    looks whole to one process: resuming must skip it."""
    from tuneline.training import CHECKPOINT_FILES, last_complete_checkpoint

    for step, ranks in ((1, [0, 1]), (2, [0])):
        checkpoint = tmp_path / f"checkpoint-{step}"
        checkpoint.mkdir()
        for name in [*CHECKPOINT_FILES, *(f"rng_state_{rank}.pth" for rank in ranks)]:
            (checkpoint / name).touch()
    assert last_complete_checkpoint(tmp_path, world_size=2) == tmp_path / "checkpoint-1"
    assert not (tmp_path / "checkpoint-2").exists()
