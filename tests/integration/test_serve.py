"""Scheduled retraining against a real Prefect server (SQLite, loopback port), as a user would run it.

`prefect server start` in the background, `tuneline serve --cron ...` registers the flow with its schedule
and waits for work; the test triggers runs through the server's REST API, as a schedule or the UI would,
and checks that they complete and what the promotion gate decided. Both processes are stopped at the end.
The work-pool way: `prefect work-pool create`, `tuneline deploy --pool ... --cron ...`, a run triggered through
the API and picked up by `prefect worker start --pool ...`, as on another machine.

Each test's repo is a copy of the run's reproduced tiny pipeline (conftest): a flow run finds every stage up to
date and promotes the model there; training reruns only where a test changes params.
"""

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import VENV_BIN, commit_all, copy_pipeline_repo, describe, subprocess_env

CRON = "0 3 * * 1"
POOL = "tuneline-pool"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, check, timeout: float, logs: list[Path]):
    """Poll `check()` until it returns something truthy; fail with the processes' logs after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except httpx.HTTPError:
            pass
        time.sleep(1)
    tails = "\n".join(f"--- {log.name} ---\n{log.read_text()[-4000:]}" for log in logs if log.exists())
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n{tails}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class RetryWhenBusy(httpx.HTTPTransport):
    """Retry what the server answers 503 (its SQLite busy, under load), as Prefect's own client does."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for _ in range(9):
            response = super().handle_request(request)
            if response.status_code != 503:
                return response
            response.close()
            time.sleep(1)
        return super().handle_request(request)


@pytest.fixture
def prefect_server(tmp_path):
    """A real Prefect server on a free loopback port, its state in a private PREFECT_HOME (SQLite)."""
    port = free_port()
    env = subprocess_env(prefect_home=tmp_path / "prefect-home")
    env |= {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false"}
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen([str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                   str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)
    api = httpx.Client(base_url=env["PREFECT_API_URL"], timeout=30, transport=RetryWhenBusy())
    try:
        wait_for("the Prefect server", lambda: api.get("/health").status_code == 200, 180, [log])
        yield api, env, log
    finally:
        api.close()
        stop(server)


def trigger(api: httpx.Client, deployment_id: str) -> dict:
    return api.post(f"/deployments/{deployment_id}/create_flow_run", json={}).raise_for_status().json()


def wait_until_completed(api: httpx.Client, run: dict, logs: list[Path]) -> dict:
    def finished():
        state = api.get(f"/flow_runs/{run['id']}").raise_for_status().json()["state"]
        return state if state and state["type"] in TERMINAL else None

    state = wait_for(f"flow run {run['id']}", finished, 600, logs)
    assert state["type"] == "COMPLETED", state
    return run


def summary_of(api: httpx.Client, flow_run_id: str) -> str:
    artifacts = api.post("/artifacts/filter", json={
        "artifacts": {"flow_run_id": {"any_": [flow_run_id]}, "key": {"any_": ["tuneline-retrain-summary"]}},
    }).raise_for_status().json()
    assert len(artifacts) == 1, artifacts
    return artifacts[0]["data"]


def test_served_flow_runs_on_the_server_and_gates_promotion(prefect_server, tmp_path, reproduced_template, report):
    api, env, server_log = prefect_server
    repo = copy_pipeline_repo(reproduced_template, tmp_path / "repo")  # reproduced, nothing promoted yet
    serve_log = tmp_path / "serve.log"
    logs = [server_log, serve_log]
    with serve_log.open("w") as out:
        served = subprocess.Popen([sys.executable, "-m", "tuneline.cli", "serve", "--cron", CRON, str(repo)],
                                  cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        def deployment_registered():
            response = api.get("/deployments/name/tuneline-retrain/tuneline-retrain")
            return response.status_code == 200 and response.json()

        deployment = wait_for("the served deployment", deployment_registered, 180, logs)
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == [CRON]
        assert deployment["parameters"]["repo_dir"] == str(repo)

        # First run: nothing promoted yet, so the first model is promoted as v1.
        first = wait_until_completed(api, trigger(api, deployment["id"]), logs)
        registry = json.loads((repo / "registry.json").read_text())
        assert registry["promoted"]["version"] == 1
        assert "**promoted**: no model promoted yet" in summary_of(api, first["id"])
        # one retraining at a time: the flow made (and holds, while it runs) a one-slot global limit
        limit = api.get("/v2/concurrency_limits/tuneline-retrain").raise_for_status().json()
        assert (limit["limit"], limit["active_slots"]) == (1, 0)

        # After a committed change that retrains, with a margin no model can clear, two runs at once: one
        # retrains and is rejected (its run still committed and listed in the registry); the other waits for
        # the concurrency slot, then finds nothing changed (run side by side, DVC's lock would fail it).
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["train"]["seed"] = 7
        params["promote"]["margin"] = 1.0
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        commit_all(repo, "retrain with another seed, promote only a model better by 1.0")
        pair = [trigger(api, deployment["id"]), trigger(api, deployment["id"])]
        summaries = sorted(summary_of(api, wait_until_completed(api, run, logs)["id"]) for run in pair)
        assert "Nothing changed" in summaries[0] and "| train | skipped (unchanged) |" in summaries[0]
        assert "**rejected**" in summaries[1] and "| train | ran |" in summaries[1]
        registry = json.loads((repo / "registry.json").read_text())
        assert [entry["decision"] for entry in registry["history"]] == ["promoted", "rejected"]
        assert registry["promoted"] == registry["history"][0]
        rejected = registry["history"][1]
        assert "does not beat" in rejected["reason"] and "same eval split" in rejected["reason"]
        assert subprocess.run(["git", "cat-file", "-e", rejected["commit"]], cwd=repo).returncode == 0
        assert served.poll() is None, "the served process must keep waiting for scheduled runs"
        report("concurrent flows: 2 retrain runs triggered at once on the Prefect server: one retrained "
               "(rejected, commit kept), the other waited for the tuneline-retrain slot and found nothing changed; "
               "registry.json intact with 2 decisions")
    finally:
        stop(served)


def tuneline(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuneline.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 1, describe(result)
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(expected)


def test_deployed_flow_runs_on_a_work_pool_worker(prefect_server, tmp_path, reproduced_template):
    api, env, server_log = prefect_server
    repo = copy_pipeline_repo(reproduced_template, tmp_path / "repo")
    deploy = ["deploy", "--pool", POOL, "--cron", CRON, str(repo)]
    assert_one_line_error(tuneline(env, *deploy), f"error: work pool '{POOL}' does not exist on the Prefect server; "
                                                  f"create it with `prefect work-pool create {POOL} --type process`")
    created = subprocess.run([str(VENV_BIN / "prefect"), "work-pool", "create", POOL, "--type", "process"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, describe(created)
    deployed = tuneline(env, *deploy)
    assert deployed.returncode == 0, describe(deployed)
    assert f"prefect worker start --pool {POOL}" in deployed.stdout

    deployment = api.get("/deployments/name/tuneline-retrain/tuneline-retrain").raise_for_status().json()
    assert (deployment["work_pool_name"], deployment["entrypoint"]) == (POOL, "flows.retrain.retrain")
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == [CRON]
    assert deployment["parameters"]["repo_dir"] == str(repo)
    run = trigger(api, deployment["id"])
    # The worker starts elsewhere than the repo, as on another machine: the run finds the repo by repo_dir.
    worker_log = tmp_path / "worker.log"
    with worker_log.open("w") as out:
        worker = subprocess.Popen([str(VENV_BIN / "prefect"), "worker", "start", "--pool", POOL], cwd=tmp_path,
                                  env=env | {"PREFECT_WORKER_QUERY_SECONDS": "1"}, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        wait_until_completed(api, run, [server_log, worker_log])
    finally:
        stop(worker)
    assert "**promoted**: no model promoted yet" in summary_of(api, run["id"])
    assert json.loads((repo / "registry.json").read_text())["promoted"]["version"] == 1


@pytest.mark.parametrize("command", [["serve"], ["deploy", "--pool", POOL]], ids=["serve", "deploy"])
@pytest.mark.parametrize(
    ("cron", "api_url", "expected"),
    [
        (CRON, None, "error: PREFECT_API_URL is not set: Prefect cannot schedule on its ephemeral server"),
        ("0 3 * * 8", "http://127.0.0.1:9/api", "error: --cron: '0 3 * * 8' is not a cron schedule"),
    ],
)
def test_serve_or_deploy_without_a_server_or_with_a_bad_cron_is_one_line(tmp_path, command, cron, api_url,
                                                                          expected):
    env = subprocess_env(prefect_home=tmp_path / "prefect-home")
    if api_url:
        env["PREFECT_API_URL"] = api_url
    assert_one_line_error(tuneline(env, *command, "--cron", cron, str(tmp_path)), expected)
