"""Tensor I/O in bounded memory: lazy readers for safetensors and torch checkpoints, a streaming safetensors writer.

The readers parse only what describes the tensors (a safetensors header; a torch file's pickle, whose tensor
data they never unpickle) and return `LazyTensor`s that read their own bytes when asked, mergekit-style. The
writer plans every shard's header from the tensors' shapes before writing, then streams each tensor to disk as
it comes. So converting or merging a model holds one tensor at a time, never the model or a whole shard.
Nothing is memory-mapped: mapped pages of a file read through would count against the process until it closes
the file, which for a 10 GB shard is 10 GB of resident memory.
"""

import json
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch
from tqdm import tqdm

from tuneline.errors import TunelineError

SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
# The storage classes a torch file's pickle names, by the dtype of their elements.
TORCH_STORAGE_DTYPES = {
    "BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16, "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}


@dataclass(frozen=True)
class LazyTensor:
    """A tensor's shape and dtype, and how to read it; nothing is read until `load()`."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize

    def load(self) -> torch.Tensor:
        return self.read()


def loaded_in_order(tensors: dict[str, LazyTensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield each tensor loaded, in order, reading the next one in a thread while the caller works on this one:
    the disk reads while the caller computes or writes, for the memory of one more tensor."""
    items = list(tensors.items())
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(items[0][1].load) if items else None
        for index, (name, _) in enumerate(items):
            tensor = pending.result()
            if index + 1 < len(items):
                pending = reader.submit(items[index + 1][1].load)
            yield name, tensor


def read_bytes(path: Path, offset: int, size: int) -> torch.Tensor:
    """`size` bytes of `path` from `offset`, read straight into a fresh uint8 tensor."""
    buffer = torch.empty(size, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    with path.open("rb", buffering=0) as file:
        file.seek(offset)
        done = 0
        while done < size:
            count = file.readinto(view[done:])
            if not count:
                raise TunelineError(f"{path}: ends at byte {offset + done}, before the tensor data it describes "
                                    "(truncated?); fetch or convert it again")
            done += count
    return buffer


def _bytes_tensor(path: Path, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> LazyTensor:
    """A lazy tensor stored contiguously at `offset` of `path`."""
    def read() -> torch.Tensor:
        return read_bytes(path, offset, prod(shape) * dtype.itemsize).view(dtype).reshape(shape)

    return LazyTensor(tuple(shape), dtype, read)


def read_safetensors(path: Path) -> dict[str, LazyTensor]:
    """The tensors of a safetensors file, in file order, from its header alone."""
    try:
        with path.open("rb") as file:
            (header_size,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(header_size))
        header.pop("__metadata__", None)
        entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
        return {name: _bytes_tensor(path, 8 + header_size + entry["data_offsets"][0],
                                   SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]))
                for name, entry in entries}
    except (struct.error, ValueError, KeyError, TypeError, AttributeError, MemoryError, OverflowError) as error:
        raise TunelineError(f"{path}: not a readable safetensors file ({type(error).__name__}: {error}); "
                            "fetch or convert it again") from None


def read_checkpoint(model_dir: Path) -> dict[str, LazyTensor]:
    """Every tensor of a Hugging Face model directory's safetensors shard(s), shard by shard in file order."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = sorted(path.name for path in model_dir.glob("*.safetensors"))
    if not shards:
        raise TunelineError(f"{model_dir}: no *.safetensors weights; run the convert stage first (dvc repro convert)")
    tensors: dict[str, LazyTensor] = {}
    for shard in shards:
        tensors.update(read_safetensors(model_dir / shard))
    return tensors


class _LazyStorage:
    """Where one storage of a torch zip file lies: its bytes are read only when a tensor asks for them."""

    def __init__(self, path: Path, offset: int, dtype: torch.dtype, numel: int) -> None:
        self.path, self.offset, self.dtype, self.numel = path, offset, dtype, numel


def _rebuild_lazy_tensor(storage: _LazyStorage, storage_offset: int, size, stride, *_) -> LazyTensor:
    """Stands in for torch._utils._rebuild_tensor_v2: describes the tensor instead of building it."""
    shape, itemsize = tuple(size), storage.dtype.itemsize
    if tuple(stride) == tuple(torch.empty(shape, device="meta").stride()):
        return _bytes_tensor(storage.path, storage.offset + storage_offset * itemsize, storage.dtype, shape)

    def read_strided() -> torch.Tensor:
        whole = read_bytes(storage.path, storage.offset, storage.numel * itemsize).view(storage.dtype)
        return torch.as_strided(whole, shape, tuple(stride), storage_offset).clone()

    return LazyTensor(shape, storage.dtype, read_strided)


class _LazyUnpickler(pickle.Unpickler):
    """Unpickle a state dict's structure only; refuse anything a plain state dict does not hold, like
    torch.load(weights_only=True)."""

    def __init__(self, file, path: Path, data_offsets: dict[str, int]) -> None:
        super().__init__(file)
        self.path, self.data_offsets = path, data_offsets

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_lazy_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, requires_grad, backward_hooks, *_: data
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in TORCH_STORAGE_DTYPES:
            return TORCH_STORAGE_DTYPES[name]  # persistent_load receives it as the storage's type
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: not part of a plain state dict")

    def persistent_load(self, saved_id):
        _, dtype, key, _, numel = saved_id
        return _LazyStorage(self.path, self.data_offsets[str(key)], dtype, numel)


def _zip_data_offsets(archive: zipfile.ZipFile, path: Path) -> dict[str, int]:
    """Byte offset in the file of each storage's data (`<archive>/data/<key>`, stored uncompressed)."""
    offsets = {}
    with path.open("rb") as file:
        for info in archive.infolist():
            folder, _, key = info.filename.rpartition("/")
            if not folder.endswith("data") or info.compress_type != zipfile.ZIP_STORED:
                continue
            file.seek(info.header_offset + 26)  # the local header's file name and extra field lengths
            name_length, extra_length = struct.unpack("<HH", file.read(4))
            offsets[key] = info.header_offset + 30 + name_length + extra_length
    return offsets


def read_torch_file(path: Path) -> dict[str, LazyTensor]:
    """The tensors of a torch.save'd state dict (pytorch_model*.bin, consolidated.*.pth), without their data."""
    if not zipfile.is_zipfile(path):
        raise TunelineError(f"{path}: not a torch checkpoint in the zip format of torch >= 1.6; load it with "
                            "torch.load and save it again with torch.save")
    try:
        with zipfile.ZipFile(path) as archive:
            pickle_name = next(name for name in archive.namelist() if name.endswith("data.pkl"))
            data_offsets = _zip_data_offsets(archive, path)
            with archive.open(pickle_name) as file:
                state = _LazyUnpickler(file, path, data_offsets).load()
    except (pickle.UnpicklingError, StopIteration, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise TunelineError(f"{path}: not a readable torch state dict ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or not all(isinstance(value, LazyTensor) for value in state.values()):
        raise TunelineError(f"{path}: holds no plain state dict of tensors")
    return dict(state)


def plan_shards(shapes: dict[str, tuple[int, ...]], itemsize: int, max_shard_size: int) -> list[list[str]]:
    """Split tensors, in order, into shards of at most `max_shard_size` bytes (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = prod(shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _shard_name(index: int, count: int) -> str:
    return "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


class ShardedSafetensorsWriter:
    """Stream tensors into Hugging Face style safetensors shards, holding none of them beyond the one written.

    The shapes of every tensor, in the order they will come, are given up front: each shard's header is known
    before its first tensor, so tensors go to disk one by one. Shards are model-0000i-of-0000N.safetensors (or
    model.safetensors when there is one) with model.safetensors.index.json, written last: an unfinished writer
    leaves no index. Write into a temporary directory (tuneline.artifacts.atomic_dir).
    """

    def __init__(self, out_dir: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, max_shard_size: int,
                 metadata: dict[str, str] | None = None, description: str = "writing") -> None:
        self.out_dir, self.shapes, self.dtype = out_dir, shapes, dtype
        self.metadata = metadata or {"format": "pt"}
        self.shards = plan_shards(shapes, dtype.itemsize, max_shard_size)
        self.order = [name for shard in self.shards for name in shard]
        self.shard_of = {name: index for index, names in enumerate(self.shards) for name in names}
        self.written = 0
        self.file = None
        self.total_bytes = sum(prod(shape) for shape in shapes.values()) * dtype.itemsize
        self.progress = tqdm(total=self.total_bytes, unit="B", unit_scale=True, desc=description)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Cast `tensor` to the writer's dtype and append it to its shard; tensors must come in planned order."""
        expected = self.order[self.written] if self.written < len(self.order) else None
        if name != expected or tuple(tensor.shape) != self.shapes[name]:
            raise ValueError(f"expected {expected} {self.shapes.get(expected)}, got {name} {tuple(tensor.shape)}")
        shard = self.shard_of[name]
        if self.shards[shard][0] == name:
            self._open_shard(shard)
        data = tensor.to(self.dtype).contiguous().reshape(-1).view(torch.uint8)
        self.file.write(memoryview(data.numpy()))
        self.progress.update(data.numel())
        self.written += 1
        if self.shards[shard][-1] == name:
            self._close_shard()

    def _open_shard(self, index: int) -> None:
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for name in self.shards[index]:
            nbytes = prod(self.shapes[name]) * self.dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_NAMES[self.dtype], "shape": list(self.shapes[name]),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors itself writes
        self.file = (self.out_dir / _shard_name(index, len(self.shards))).open("wb")
        self.file.write(struct.pack("<Q", len(encoded)) + encoded)

    def _close_shard(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())  # on disk before the stage can report success
        self.file.close()
        self.file = None

    def close(self) -> None:
        """Write the index once every planned tensor is on disk."""
        self.progress.close()
        if self.written != len(self.order):
            raise ValueError(f"{len(self.order) - self.written} planned tensors were never written, "
                             f"the first: {self.order[self.written]}")
        if len(self.shards) > 1:
            weight_map = {name: _shard_name(index, len(self.shards))
                          for index, names in enumerate(self.shards) for name in names}
            index_json = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index_json, indent=2))

    def __enter__(self) -> "ShardedSafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self.file is not None:
            self.file.close()
        if exc_type is None:
            self.close()
        else:
            self.progress.close()


def write_safetensors(out_dir: Path, shapes: dict[str, tuple[int, ...]], tensors: Iterable[tuple[str, torch.Tensor]],
                      dtype: torch.dtype, max_shard_size: int, metadata: dict[str, str] | None = None,
                      description: str = "writing") -> None:
    """Stream `tensors` (in the order of `shapes`) into safetensors shards in `out_dir`."""
    with ShardedSafetensorsWriter(out_dir, shapes, dtype, max_shard_size, metadata, description) as writer:
        for name, tensor in tensors:
            writer.write(name, tensor)
