"""tuneline/converting.py: fetched weights (safetensors, .bin, Meta .pth, GGUF) to a Hugging Face model."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tuneline.errors import TunelineError


def token_ids_for(model_dir: Path, text: str = "Measurements: worst radius 17.33. Is the tumour malignant?"):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(text, return_tensors="pt")["input_ids"]

def model_logits(model_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits

# ------------------------------------------------------------------------------------------------ convert


class TestConvert:
    @pytest.mark.parametrize(
        ("damage", "expected"),
        [("truncate", "bytes, the download had"), ("flip", "does not match the sha256"), ("delete", "is missing")],
    )
    def test_a_damaged_fetched_file_is_one_clear_line(self, tmp_path, tiny_model_dir, damage, expected):
        from tuneline.converting import convert
        from tuneline.sources import fetch

        fetched = tmp_path / "fetched"
        fetched.mkdir()
        manifest = fetch(source=f"file://{tiny_model_dir}", expected_sha256={}, out_dir=fetched, download_dir=tmp_path / "download")
        (fetched / "tuneline_manifest.json").write_text(json.dumps(manifest))
        weights = fetched / "model.safetensors"
        data = weights.read_bytes()
        if damage == "truncate":
            weights.write_bytes(data[: len(data) // 2])
        elif damage == "flip":
            weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        else:
            weights.unlink()
        out = tmp_path / "base"
        out.mkdir()
        with pytest.raises(TunelineError) as error:
            convert(src_dir=fetched, out_dir=out, tokenizer_dir=tmp_path / "tokenizer", dtype="float32",
                    max_shard_size=2 * 10**9, write_pth=False)
        assert str(error.value).startswith(f"{weights}: ")  # names the file
        assert expected in str(error.value) and "dvc repro --force fetch" in str(error.value)
        assert list(out.iterdir()) == []

    def test_too_little_free_disk_stops_before_writing(self, tmp_path, tiny_model_dir, monkeypatch):
        from tuneline.converting import convert

        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
        out = tmp_path / "base"
        out.mkdir()
        with pytest.raises(TunelineError, match=r"base: needs about 0\.\d\d GB but 0\.00 GB is free on its disk"):
            convert(src_dir=tiny_model_dir, out_dir=out, tokenizer_dir=tmp_path / "tokenizer", dtype="float32",
                    max_shard_size=2 * 10**9, write_pth=False)
        assert list(out.iterdir()) == []

    def test_hf_dir_round_trip_same_logits(self, tmp_path, tiny_model_dir):
        from tuneline.converting import convert

        out = tmp_path / "base"
        out.mkdir()
        fmt = convert(src_dir=tiny_model_dir, out_dir=out, tokenizer_dir=tmp_path / "tokenizer", dtype="float32", max_shard_size=2 * 10**9, write_pth=False)
        assert fmt == "huggingface"
        assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
        assert not (out / "model.pth").exists()
        assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
        ids = token_ids_for(tiny_model_dir)
        torch.testing.assert_close(model_logits(out, ids), model_logits(tiny_model_dir, ids), rtol=0, atol=1e-6)
        # the tokenizer and its chat template go to their own directory (the dataset stage depends on it
        # alone), not beside the weights
        from transformers import AutoTokenizer

        assert not (out / "tokenizer.json").exists() and not (out / "tokenizer_config.json").exists()
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "benign"}]
        assert AutoTokenizer.from_pretrained(tmp_path / "tokenizer").apply_chat_template(messages, tokenize=False) == (
            AutoTokenizer.from_pretrained(tiny_model_dir).apply_chat_template(messages, tokenize=False)
        )

    def test_sharded_bin_checkpoint_converts_bit_for_bit(self, tmp_path, tiny_model_dir):
        """pytorch_model-0000N-of-0000M.bin shards (read lazily, never unpickled whole) give the same weights."""
        from tuneline.converting import convert

        src = tmp_path / "bin"
        shutil.copytree(tiny_model_dir, src, ignore=shutil.ignore_patterns("*.safetensors*"))
        source = load_file(tiny_model_dir / "model.safetensors")
        names = list(source)
        halves = [names[: len(names) // 2], names[len(names) // 2 :]]
        for index, half in enumerate(halves):
            torch.save({name: source[name] for name in half}, src / f"pytorch_model-{index + 1:05d}-of-00002.bin")
        out = tmp_path / "base"
        out.mkdir()
        assert convert(src_dir=src, out_dir=out, tokenizer_dir=tmp_path / "tokenizer", dtype="float32",
                       max_shard_size=2 * 10**9, write_pth=False) == "huggingface"
        converted = load_file(out / "model.safetensors")
        assert list(converted) == names
        assert all(torch.equal(converted[name], tensor) for name, tensor in source.items())

    def test_small_shards_and_pth(self, tmp_path, tiny_model_dir):
        from tuneline.converting import PTH_FILE, convert

        out = tmp_path / "base"
        out.mkdir()
        convert(src_dir=tiny_model_dir, out_dir=out, tokenizer_dir=tmp_path / "tokenizer", dtype="float32", max_shard_size=60_000, write_pth=True)
        shards = sorted(out.glob("model-*-of-*.safetensors"))
        assert len(shards) > 2
        assert not (out / "model.safetensors").exists()
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == {p.name for p in shards}
        source = load_file(tiny_model_dir / "model.safetensors")
        assert set(index["weight_map"]) == set(source)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in source.values())
        state_dict = torch.load(out / PTH_FILE, weights_only=True)
        assert set(state_dict) == set(source)
        for name, tensor in source.items():
            assert torch.equal(state_dict[name], tensor)
        ids = token_ids_for(tiny_model_dir)
        torch.testing.assert_close(model_logits(out, ids), model_logits(tiny_model_dir, ids), rtol=0, atol=1e-6)

    def test_dtype_bfloat16(self, tmp_path, tiny_model_dir):
        from tuneline.converting import convert

        out = tmp_path / "base"
        out.mkdir()
        convert(src_dir=tiny_model_dir, out_dir=out, tokenizer_dir=tmp_path / "tokenizer", dtype="bfloat16", max_shard_size=2 * 10**9, write_pth=False)
        tensors = load_file(out / "model.safetensors")
        assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
        assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    def test_empty_dir_is_a_clear_error(self, tmp_path):
        from tuneline.converting import convert

        src = tmp_path / "empty"
        src.mkdir()
        with pytest.raises(TunelineError) as error:
            convert(src_dir=src, out_dir=tmp_path / "out", tokenizer_dir=tmp_path / "tokenizer", dtype="float32", max_shard_size=10**9, write_pth=False)
        assert str(src) in str(error.value) and "found: nothing" in str(error.value)

    def test_a_checkpoint_naming_its_quantized_weights_otherwise_is_refused_before_training(self, tmp_path,
                                                                                           tiny_model_dir):
        """The merge rebuilds the quantization by tensor name: a checkpoint whose names transformers would map on
        load (an older layout) is refused by convert, the first stage, naming the family and what to do."""
        from safetensors.torch import save_file

        from tuneline.converting import convert

        src = tmp_path / "src"
        shutil.copytree(tiny_model_dir, src)
        weights = load_file(src / "model.safetensors")
        weights["model.layers.0.self_attn.q.weight"] = weights.pop("model.layers.0.self_attn.q_proj.weight")
        save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
        (src / "tuneline_manifest.json").unlink(missing_ok=True)
        with pytest.raises(TunelineError) as error:
            convert(src_dir=src, out_dir=tmp_path / "out", tokenizer_dir=tmp_path / "tokenizer", dtype="float32",
                    max_shard_size=10**9, write_pth=False)
        assert str(error.value) == (
            f"convert: {src}: model family 'llama': the checkpoint holds no tensor "
            "model.layers.0.self_attn.q_proj.weight (it names its weights otherwise; transformers renames them on "
            "load); load it with transformers and save_pretrained, then fetch that folder")

    def test_the_converted_config_names_its_architecture(self, tmp_path, tiny_model_dir):
        """transformers' GGUF loader gives a config without `architectures`, which serving engines and llama.cpp's
        converter need: convert writes the class transformers builds."""
        from tuneline.converting import convert

        src = tmp_path / "src"
        shutil.copytree(tiny_model_dir, src)
        config = json.loads((src / "config.json").read_text())
        del config["architectures"]
        (src / "config.json").write_text(json.dumps(config))
        convert(src_dir=src, out_dir=tmp_path / "out", tokenizer_dir=tmp_path / "tokenizer", dtype="float32",
                max_shard_size=10**9, write_pth=False)
        assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]

    def test_config_without_weights_is_a_clear_error(self, tmp_path, tiny_model_dir):
        from tuneline.converting import convert

        src = tmp_path / "src"
        shutil.copytree(tiny_model_dir, src)
        (src / "model.safetensors").unlink()
        with pytest.raises(TunelineError, match=r"config\.json but no \*\.safetensors"):
            convert(src_dir=src, out_dir=tmp_path / "out", tokenizer_dir=tmp_path / "tokenizer", dtype="float32", max_shard_size=10**9, write_pth=False)

    @pytest.fixture
    def meta_checkpoint(self, tmp_path, tiny_model_dir) -> Path:
        """The tiny model re-exported as a 2-way model-parallel Meta checkpoint (consolidated.0N.pth)."""
        from tuneline.converting import META_CONCAT_DIM1, META_TO_HF

        config = json.loads((tiny_model_dir / "config.json").read_text())
        n_heads, n_kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        hf_to_meta = {}
        for meta_pattern, hf_pattern in META_TO_HF.items():
            for layer in range(config["num_hidden_layers"]):
                hf_to_meta[hf_pattern.format(i=layer)] = meta_pattern.format(i=layer)

        def unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:  # HF halves -> Meta interleaved pairs
            rows, cols = weight.shape
            return weight.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)

        parts: list[dict] = [{}, {}]
        for hf_name, tensor in load_file(tiny_model_dir / "model.safetensors").items():
            meta_name = hf_to_meta[hf_name]
            if meta_name.endswith("attention.wq.weight"):
                tensor = unpermute(tensor, n_heads)
            elif meta_name.endswith("attention.wk.weight"):
                tensor = unpermute(tensor, n_kv_heads)
            if tensor.dim() == 1:
                chunks = [tensor.clone(), tensor.clone()]
            else:
                dim = 1 if any(key in meta_name for key in META_CONCAT_DIM1) else 0
                chunks = [chunk.clone() for chunk in tensor.chunk(2, dim=dim)]
            for part, chunk in zip(parts, chunks):
                part[meta_name] = chunk
        src = tmp_path / "meta"
        src.mkdir()
        for index, part in enumerate(parts):
            torch.save(part, src / f"consolidated.{index:02d}.pth")
        (src / "params.json").write_text(json.dumps({
            "dim": config["hidden_size"], "n_layers": config["num_hidden_layers"], "n_heads": n_heads,
            "n_kv_heads": n_kv_heads, "norm_eps": config["rms_norm_eps"], "rope_theta": 10000.0,
        }))
        (src / "tokenizer.model").write_bytes(b"this is not a sentencepiece model")
        return src

    def test_meta_checkpoint_weights(self, tiny_model_dir, meta_checkpoint):
        """Model-parallel shards are joined and renamed, and q/k rotary rows un-interleaved, exactly.

        Checked below read_meta, so the tensors alone are compared with the Hugging Face weights, bit for
        bit (tests/unit/test_converting_meta.py runs the whole conversion with a real SentencePiece tokenizer).
        """
        from tuneline.converting import hf_named_meta_tensors, merge_meta_parts
        from tuneline.tensor_io import read_torch_file

        params = json.loads((meta_checkpoint / "params.json").read_text())
        shards = sorted(meta_checkpoint.glob("consolidated.*.pth"))
        assert len(shards) == 2
        parts = [read_torch_file(shard) for shard in shards]
        state = {name: merge_meta_parts(name, [part[name] for part in parts]) for name in parts[0]}
        converted = hf_named_meta_tensors(state, params["n_heads"], params["n_kv_heads"])
        original = load_file(tiny_model_dir / "model.safetensors")
        assert set(converted) == set(original)
        for name, tensor in original.items():
            assert converted[name].shape == tuple(tensor.shape), name  # known before any data is read
            assert torch.equal(converted[name].load(), tensor), name

    def test_meta_checkpoint_with_unreadable_tokenizer_is_an_error(self, tmp_path, meta_checkpoint):
        from tuneline.converting import convert

        out = tmp_path / "base"
        out.mkdir()
        with pytest.raises(TunelineError, match="tokenizer.model"):
            convert(src_dir=meta_checkpoint, out_dir=out, tokenizer_dir=tmp_path / "tokenizer", dtype="float32", max_shard_size=10**9, write_pth=False)
