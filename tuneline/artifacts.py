"""Artifact I/O: atomic outputs, hashes, and memory-bounded safetensors writing.

Every stage writes each of its outs into a temporary path beside it and renames it into place only when
the stage succeeded, so a killed stage leaves the out absent or complete, never half-written. Temporary
paths carry the writer's PID: the next writer of the same out removes those of processes no longer running.
"""

import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from tuneline.errors import TunelineError


_UMASK = os.umask(0)
os.umask(_UMASK)


def temp_prefix(path: Path) -> str:
    return f"{path.name}.tmp-{os.getpid()}-"


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporaries beside `path` that killed runs left behind (their PID no longer runs)."""
    for stale in path.parent.glob(f"{glob.escape(path.name)}.tmp-*"):
        pid = stale.name[len(f"{path.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and not is_running(int(pid)):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`; on success it replaces `path` whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), dir=path.parent))
    tmp.chmod(0o777 & ~_UMASK)  # mkdtemp makes it private; the artifact gets the usual permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_path(tmp, path)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; on success it replaces `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, name = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o666 & ~_UMASK)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def replace_path(src: Path, dst: Path) -> None:
    """Move `src` onto `dst`; an existing directory at `dst` is moved aside first, then removed."""
    if dst.is_dir() and not dst.is_symlink():
        old = dst.with_name(f"{temp_prefix(dst)}old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old)
    else:
        os.replace(src, dst)


def write_json(path: Path, data: object) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TunelineError(f"{path}: not found; run the stage that writes it first (dvc repro)") from None
    except json.JSONDecodeError as error:
        raise TunelineError(f"{path}: not valid JSON ({error}); delete it and rerun its stage") from None


def check_free_space(out: Path, needed: int) -> None:
    """Fail before writing when the disk that will hold `out` has less than `needed` bytes (+5 %) free."""
    free = shutil.disk_usage(out.parent if not out.exists() else out).free
    if free < needed * 1.05:
        raise TunelineError(
            f"{out}: needs about {needed / 1e9:.2f} GB but {free / 1e9:.2f} GB is free on its disk; "
            f"free some space (`dvc gc -w` drops cached artifacts no commit uses) and rerun"
        )


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str, key: str) -> int:
    """Parse a size such as "2GB" or "500MiB" into bytes; `key` names the param in the error."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B)\s*", text.upper())
    if not match:
        raise TunelineError(f"params.yaml: {key}: '{text}' is not a size; write it like 2GB or 500MB")
    return int(float(match[1]) * _SIZE_UNITS[match[2]])


@dataclass
class TensorWriter:
    """Write tensors into Hugging Face style safetensors shards, holding at most one shard in memory.

    Shards are named model-0000i-of-0000N.safetensors (or model.safetensors when there is one) with a
    model.safetensors.index.json; `finalize()` names them, so an unfinished writer leaves no index.
    """

    out_dir: Path
    max_shard_size: int
    metadata: dict[str, str] = field(default_factory=lambda: {"format": "pt"})
    current: dict[str, torch.Tensor] = field(default_factory=dict)
    current_size: int = 0
    shard_keys: list[list[str]] = field(default_factory=list)
    total_size: int = 0

    def save_tensor(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current and self.current_size + size > self.max_shard_size:
            self._flush()
        self.current[name] = tensor.contiguous()
        self.current_size += size
        self.total_size += size

    def _flush(self) -> None:
        save_file(self.current, self.out_dir / f"shard-{len(self.shard_keys)}.tmp", metadata=self.metadata)
        self.shard_keys.append(list(self.current))
        self.current, self.current_size = {}, 0

    def finalize(self) -> None:
        if self.current:
            self._flush()
        count = len(self.shard_keys)
        if count == 1:
            os.replace(self.out_dir / "shard-0.tmp", self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for index, keys in enumerate(self.shard_keys):
            name = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.out_dir / f"shard-{index}.tmp", self.out_dir / name)
            weight_map.update(dict.fromkeys(keys, name))
        index_json = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))

    def __enter__(self) -> "TensorWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        # Finalize only on success: a failed run must not write an index that makes it look complete.
        if exc_type is None:
            self.finalize()


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSON-lines file; a malformed line is an error naming the file and line."""
    rows = []
    with path.open() as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise TunelineError(f"{path}:{number}: not valid JSON ({error.msg}); fix or remove the line") from None
    return rows
