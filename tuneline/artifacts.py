"""Artifact I/O: atomic outputs, JSON files, hashes, sizes and free space.

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
from pathlib import Path

from tuneline.errors import TunelineError


_UMASK = os.umask(0)
os.umask(_UMASK)


def _temp_prefix(path: Path) -> str:
    return f"{path.name}.tmp-{os.getpid()}-"


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Delete the temporaries beside `path` that killed runs left behind (their PID no longer runs)."""
    for stale in path.parent.glob(f"{glob.escape(path.name)}.tmp-*"):
        pid = stale.name[len(f"{path.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and not _is_running(int(pid)):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`; on success it replaces `path` whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
    tmp.chmod(0o777 & ~_UMASK)  # mkdtemp makes it private; the artifact gets the usual permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_path(tmp, path)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; on success it replaces `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o666 & ~_UMASK)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _replace_path(src: Path, dst: Path) -> None:
    """Move `src` onto `dst`; an existing directory at `dst` is moved aside first, then removed."""
    if dst.is_dir() and not dst.is_symlink():
        old = dst.with_name(f"{_temp_prefix(dst)}old")
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
