"""tuneline/modeling.py: the quantization spec, the layers 4-bit loading quantizes, padding and model loading."""

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from tuneline.errors import TunelineError
from tuneline.modeling import (
    QuantSpec, end_token_ids, is_transposed, layer_features, load_full_model, load_quantized_model, load_tokenizer,
    meta_model, pad_batch, quantized_layers, read_split, weight_bytes,
)


def test_quant_spec_round_trips_through_the_adapter_dir(tmp_path: Path) -> None:
    spec = QuantSpec("nf4", True, "float32")
    spec.save(tmp_path)
    assert QuantSpec.load(tmp_path) == spec
    config = spec.bnb_config()
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant


def test_quantized_layers_are_every_linear_but_the_output_head(tiny_model_dir: Path) -> None:
    config = AutoConfig.from_pretrained(tiny_model_dir)
    layers = quantized_layers(meta_model(config))
    per_block = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {name.rsplit(".", 1)[1] for name in layers} == per_block
    assert len(layers) == len(per_block) * config.num_hidden_layers
    assert "lm_head" not in layers


def quantized_by_4bit_loading(model_dir: Path) -> set[str]:
    import bitsandbytes as bnb

    model = load_quantized_model(model_dir, QuantSpec("nf4", True, "float32"))
    return {name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}


def test_the_4bit_model_quantizes_exactly_the_quantized_layers(tiny_model_dir: Path) -> None:
    assert quantized_by_4bit_loading(tiny_model_dir) == set(quantized_layers(load_full_model(tiny_model_dir)))


def test_gpt2_conv1d_layers_are_quantized_layers_in_their_transposed_shape(tmp_path: Path) -> None:
    """GPT-2 computes with Conv1D, whose weight is (in, out): 4-bit loading quantizes it all the same, so LoRA
    may target it, and its features are read the right way round."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(tmp_path)
    layers = quantized_layers(meta_model(AutoConfig.from_pretrained(tmp_path)))
    assert set(layers) == quantized_by_4bit_loading(tmp_path) == {
        "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj"}
    features = [layer_features(layers[f"transformer.h.0.{name}"]) for name in ("attn.c_attn", "mlp.c_fc", "mlp.c_proj")]
    assert features == [(32, 96), (32, 128), (128, 32)]
    assert is_transposed(layers["transformer.h.0.attn.c_attn"])


def test_a_config_that_is_not_a_causal_lm_is_one_line_naming_its_family() -> None:
    from transformers import ViTConfig

    with pytest.raises(TunelineError) as error:
        meta_model(ViTConfig(num_hidden_layers=1))  # an image classifier's config.json
    message = str(error.value)
    assert message.startswith("model family 'vit': transformers cannot build it as a causal language model (")
    assert message.endswith("); tuneline fine-tunes the families AutoModelForCausalLM builds") and "\n" not in message


def test_weight_bytes_counts_every_parameter_in_the_dtype(tiny_model_dir: Path) -> None:
    config = AutoConfig.from_pretrained(tiny_model_dir)
    parameters = sum(p.numel() for p in load_full_model(tiny_model_dir).parameters())
    assert weight_bytes(config, "bfloat16") == 2 * parameters
    assert weight_bytes(config, "float32") == 4 * parameters


def test_end_token_ids_are_eos_and_the_end_of_turn_tokens_the_vocabulary_has(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    assert end_token_ids(tokenizer) == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_left_padding_numbers_positions_from_the_first_real_token() -> None:
    batch = pad_batch([[5, 6, 7], [8]], pad_id=0, side="left")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    right = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["input_ids"].dtype == torch.long


def test_a_missing_split_says_which_stage_writes_it(tmp_path: Path) -> None:
    with pytest.raises(TunelineError, match="run the dataset stage first"):
        read_split(tmp_path / "train.parquet")
