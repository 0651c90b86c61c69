"""The lazy readers and the streaming safetensors writer behind convert and merge (tuneline/tensor_io.py)."""

import json
import pickle
import zipfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tuneline.errors import TunelineError
from tuneline.tensor_io import (
    ShardedSafetensorsWriter, read_checkpoint, read_safetensors, read_torch_file, write_safetensors,
)


def random_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tensors = {f"layer.{i}.weight": torch.randn(10, 10, generator=generator) for i in range(5)}  # 400 B each
    tensors["transposed"] = torch.randn(10, 10, generator=generator).T  # not contiguous
    tensors["big"] = torch.randn(40, 40, generator=generator)  # larger than a whole shard
    tensors["half"] = torch.randn(3, 5, generator=generator).to(torch.bfloat16)
    tensors["steps"] = torch.arange(7)
    return tensors


class TestWriter:
    def test_round_trip_sharded(self, tmp_path):
        tensors = random_tensors()
        shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
        write_safetensors(tmp_path, shapes, tensors.items(), torch.float32, max_shard_size=1000)
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        shard_files = sorted(path.name for path in tmp_path.glob("model-*.safetensors"))
        count = len(shard_files)
        assert count >= 4
        assert shard_files == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        assert set(index["weight_map"]) == set(tensors)
        assert index["metadata"]["total_size"] == sum(tensor.numel() * 4 for tensor in tensors.values())
        for shard in shard_files:  # read back by the safetensors library itself
            with safe_open(tmp_path / shard, framework="pt") as file:
                assert file.metadata() == {"format": "pt"}
            size = (tmp_path / shard).stat().st_size
            assert size < 1000 + 1000 or len(load_file(tmp_path / shard)) == 1  # over the limit: one big tensor
        for name, tensor in tensors.items():
            written = load_file(tmp_path / index["weight_map"][name])[name]
            assert written.dtype == torch.float32 and torch.equal(written, tensor.float())

    def test_single_shard_with_metadata_is_model_safetensors(self, tmp_path):
        tensors = {"a": torch.ones(3), "b": torch.zeros(2, 2)}
        write_safetensors(tmp_path, {"a": (3,), "b": (2, 2)}, tensors.items(), torch.bfloat16, 10**9,
                          metadata={"format": "pt", "lineage": "{}"})
        assert sorted(path.name for path in tmp_path.iterdir()) == ["model.safetensors"]
        with safe_open(tmp_path / "model.safetensors", framework="pt") as file:
            assert file.metadata() == {"format": "pt", "lineage": "{}"}
            assert file.get_tensor("b").dtype == torch.bfloat16

    def test_a_tensor_out_of_plan_is_refused(self, tmp_path):
        with pytest.raises(ValueError, match=r"expected a \(3,\), got b \(2, 2\)"):
            write_safetensors(tmp_path, {"a": (3,), "b": (2, 2)}, [("b", torch.zeros(2, 2))], torch.float32, 10**9)
        with pytest.raises(ValueError, match=r"expected b \(2, 2\), got b \(3,\)"):
            write_safetensors(tmp_path, {"a": (3,), "b": (2, 2)}, [("a", torch.ones(3)), ("b", torch.ones(3))],
                              torch.float32, 10**9)

    def test_an_interrupted_writer_leaves_no_index(self, tmp_path):
        shapes = {f"t{i}": (10, 10) for i in range(6)}
        with pytest.raises(RuntimeError, match="boom"):
            with ShardedSafetensorsWriter(tmp_path, shapes, torch.float32, max_shard_size=1000) as writer:
                for i in range(4):
                    writer.write(f"t{i}", torch.ones(10, 10))
                raise RuntimeError("boom")
        assert not (tmp_path / "model.safetensors.index.json").exists()
        with pytest.raises(ValueError, match="2 planned tensors were never written, the first: t4"):
            with ShardedSafetensorsWriter(tmp_path, shapes, torch.float32, max_shard_size=1000) as writer:
                for i in range(4):
                    writer.write(f"t{i}", torch.ones(10, 10))
        assert not (tmp_path / "model.safetensors.index.json").exists()


class TestReaders:
    def test_safetensors_reader_reads_what_the_library_wrote(self, tmp_path):
        tensors = {name: tensor.contiguous() for name, tensor in random_tensors().items()}
        save_file(tensors, tmp_path / "model.safetensors")
        lazy = read_safetensors(tmp_path / "model.safetensors")
        assert set(lazy) == set(tensors)
        for name, tensor in tensors.items():
            assert lazy[name].shape == tuple(tensor.shape) and lazy[name].dtype == tensor.dtype
            assert torch.equal(lazy[name].load(), tensor)

    def test_checkpoint_reader_follows_the_shard_index(self, tmp_path):
        tensors = random_tensors()
        shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
        write_safetensors(tmp_path, shapes, tensors.items(), torch.float32, max_shard_size=1000)
        lazy = read_checkpoint(tmp_path)
        assert list(lazy) == list(tensors)  # shard by shard, in file order
        assert all(torch.equal(lazy[name].load(), tensor.float()) for name, tensor in tensors.items())

    def test_torch_file_reader_matches_torch_load(self, tmp_path):
        tensors = random_tensors()
        base = torch.randn(6, 4)
        tensors["shares_storage_a"] = base[:3]
        tensors["shares_storage_b"] = base[3:]  # a view at an offset into the same storage
        tensors["column"] = base[:, 1]  # strided
        torch.save(tensors, tmp_path / "pytorch_model.bin")
        lazy = read_torch_file(tmp_path / "pytorch_model.bin")
        loaded = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
        assert list(lazy) == list(loaded)
        for name, tensor in loaded.items():
            assert lazy[name].shape == tuple(tensor.shape) and lazy[name].dtype == tensor.dtype
            assert torch.equal(lazy[name].load(), tensor), name

    def test_torch_file_with_code_in_its_pickle_is_refused(self, tmp_path):
        path = tmp_path / "pytorch_model.bin"
        torch.save({"weight": torch.ones(2)}, path)
        with zipfile.ZipFile(path) as archive:
            entries = {info.filename: archive.read(info) for info in archive.infolist()}
        pickle_name = next(name for name in entries if name.endswith("data.pkl"))
        entries[pickle_name] = pickle.dumps({"weight": print})  # any callable stands for code run on load
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
            for name, data in entries.items():
                archive.writestr(name, data)
        with pytest.raises(TunelineError, match=r"pytorch_model.bin: not a readable torch state dict .*builtins.print"):
            read_torch_file(path)

    def test_legacy_torch_file_is_one_clear_line(self, tmp_path):
        path = tmp_path / "consolidated.00.pth"
        torch.save({"weight": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
        with pytest.raises(TunelineError, match="consolidated.00.pth: not a torch checkpoint in the zip format"):
            read_torch_file(path)

    def test_truncated_safetensors_names_the_file(self, tmp_path):
        save_file({"weight": torch.ones(1000)}, tmp_path / "model.safetensors")
        data = (tmp_path / "model.safetensors").read_bytes()
        (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
        lazy = read_safetensors(tmp_path / "model.safetensors")  # the header is whole
        with pytest.raises(TunelineError, match=r"model.safetensors: ends at byte \d+, before the tensor data"):
            lazy["weight"].load()
        (tmp_path / "model.safetensors").write_bytes(data[:20])
        with pytest.raises(TunelineError, match="model.safetensors: not a readable safetensors file"):
            read_safetensors(tmp_path / "model.safetensors")
