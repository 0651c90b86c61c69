"""tuneline/merging.py: the dequantize-then-merge, streamed, and its fidelity against the QLoRA model."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig

from tuneline.errors import TunelineError
from tuneline.params import MergeParams


def safetensors_keys(model_dir: Path) -> set[str]:
    keys = set()
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as file:
            keys.update(file.keys())
    return keys

# -------------------------------------------------------------------------------------------------- merge


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_model_dir, perturbed_adapter, tiny_dataset_dir) -> tuple[Path, dict]:
    from tuneline.merging import merge

    out = tmp_path_factory.mktemp("merge") / "merged"
    out.mkdir()
    params = MergeParams(dtype="float32", max_shard_size="2GB", num_prompts=4)
    metrics = merge(base_dir=tiny_model_dir, adapter_dir=perturbed_adapter, dataset_dir=tiny_dataset_dir,
                    params=params, out_dir=out)
    return out, metrics


class TestMerge:
    def test_too_little_free_disk_stops_before_writing(self, tmp_path, tiny_model_dir, perturbed_adapter,
                                                       tiny_dataset_dir, monkeypatch):
        from tuneline.merging import merge
        from tuneline.modeling import weight_bytes

        usage = shutil.disk_usage(tmp_path)
        needed = weight_bytes(AutoConfig.from_pretrained(tiny_model_dir), "float32")
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=needed // 2))
        out = tmp_path / "merged"
        out.mkdir()
        params = MergeParams(dtype="float32", max_shard_size="2GB", num_prompts=4)
        with pytest.raises(TunelineError) as error:
            merge(base_dir=tiny_model_dir, adapter_dir=perturbed_adapter, dataset_dir=tiny_dataset_dir,
                  params=params, out_dir=out)
        assert f"needs about {needed / 1e9:.2f} GB but {needed / 2e9:.2f} GB is free" in str(error.value)
        assert list(out.iterdir()) == []

    def test_fidelity(self, merged):
        _, metrics = merged
        assert set(metrics) >= {"kl", "top1_agreement", "kl_merge_into_4bit", "top1_merge_into_4bit",
                                "kl_merge_into_original", "top1_merge_into_original"}
        assert metrics["prompts"] == 4 and metrics["positions"] > 0
        assert metrics["kl"] <= 1e-3
        assert metrics["top1_agreement"] >= 0.999
        assert metrics["kl"] < metrics["kl_merge_into_4bit"]
        assert metrics["kl"] < metrics["kl_merge_into_original"]
        assert metrics["top1_merge_into_original"] <= metrics["top1_agreement"]

    def test_merged_dir_is_a_plain_model(self, merged, tiny_model_dir):
        from transformers import AutoModelForCausalLM

        out, _ = merged
        config = json.loads((out / "config.json").read_text())
        assert "quantization_config" not in config
        assert config["dtype"] == "float32"
        assert not (out / "adapter_config.json").exists()
        assert safetensors_keys(out) == safetensors_keys(tiny_model_dir)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert type(model).__name__ == "LlamaForCausalLM"
        assert all(type(m).__module__.split(".")[0] not in ("peft", "bitsandbytes") for m in model.modules())
        assert (out / "tokenizer.json").exists()

    def test_streamed_merge_is_bitwise_the_qlora_models_dequantized_weights_plus_delta(
        self, merged, tiny_model_dir, perturbed_adapter
    ):
        """The merge never loads the model; this rebuilds the merged weights from the QLoRA model as loaded for
        training (peft on the 4-bit base) and requires every tensor to be equal, bit for bit."""
        import bitsandbytes as bnb
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        from tuneline.modeling import QuantSpec, load_quantized_model

        model = PeftModel.from_pretrained(
            load_quantized_model(tiny_model_dir, QuantSpec.load(perturbed_adapter)), perturbed_adapter
        ).get_base_model()
        expected = {}
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                layer = module.get_base_layer()
                weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
                delta = module.lora_B["default"].weight.float() @ module.lora_A["default"].weight.float()
                expected[f"{name}.weight"] = weight + delta * module.scaling["default"]
        for name, param in model.named_parameters():
            clean = name.replace(".base_layer", "")
            if "lora_" not in name and clean not in expected:
                expected[clean] = param.detach().float()
        written = load_file(merged[0] / "model.safetensors")
        assert set(written) == set(expected)
        assert len([name for name in expected if name.endswith("proj.weight")]) == 7 * 2  # 2 layers, 7 adapted linears
        unequal = [name for name in expected if not torch.equal(written[name], expected[name])]
        assert unequal == []

    def test_merged_weights_differ_from_base_by_the_delta(self, merged, tiny_model_dir):
        out, _ = merged
        merged_weights = load_file(out / "model.safetensors")
        base = load_file(tiny_model_dir / "model.safetensors")
        # non-quantized tensors (embeddings, norms, lm_head) are copied unchanged
        for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            assert torch.equal(merged_weights[name], base[name])
        # adapted linears moved well beyond NF4 rounding
        name = "model.layers.0.self_attn.q_proj.weight"
        assert (merged_weights[name] - base[name]).abs().max() > 0.01
