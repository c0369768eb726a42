"""The server: token, loopback, side-by-side deployments, start/stop/status, no leaked secrets."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import httpx
import psutil

import skybatch
from tests.helpers import Deployment, deployment_at, read_jsonl, wait_for, write_jsonl


@skybatch.remote_function
def upper():
    for batch in skybatch.load():
        skybatch.save_results([{"text": item["text"].upper()} for item in batch])


def test_every_endpoint_but_health_needs_the_token(deployment: Deployment) -> None:
    deployment.cli("server", "start")
    info = json.loads(deployment.home.server_file.read_text())
    url = info["url"]
    assert url.startswith("http://127.0.0.1:")
    token = deployment.home.token_file
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert httpx.get(f"{url}/v1/health").status_code == 200
    for path in ("/v1/jobs", "/v1/pools", "/v1/server", "/v1/openapi.json", "/docs"):
        r = httpx.get(f"{url}{path}")
        assert r.status_code in (401, 404), path
        if r.status_code == 401:
            assert r.json()["error"]["type"] == "AuthError"
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.get(f"{url}/v1/jobs", headers=wrong).status_code == 401
    good = {"Authorization": f"Bearer {token.read_text()}"}
    assert httpx.get(f"{url}/v1/jobs", headers=good).json() == []
    schema = httpx.get(f"{url}/v1/openapi.json", headers=good).json()
    assert "/v1/jobs" in schema["paths"]
    # Only loopback: the server's listening socket is bound to 127.0.0.1.
    pid = info["pid"]
    listening = [
        c.laddr for c in psutil.Process(pid).net_connections() if c.status == psutil.CONN_LISTEN
    ]
    assert listening and all(a.ip == "127.0.0.1" for a in listening)


def test_two_deployments_side_by_side(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}])
    with deployment_at(tmp_path / "one") as one:
        one.pool("p", workers=1, tmp=tmp_path)
        url_one = json.loads(one.home.server_file.read_text())["url"]
        with deployment_at(tmp_path / "two") as two:
            two.pool("p", workers=1, tmp=tmp_path)
            url_two = json.loads(two.home.server_file.read_text())["url"]
            assert url_one != url_two
            skybatch.Dataset(skybatch.JsonReader(str(data))).map(
                upper,
                pool_name="p",
                batch_size=1,
                output=skybatch.JsonWriter(str(tmp_path / "two.jsonl")),
            )
            assert [j.id for j in skybatch.jobs_queue()] == [1]
        skybatch.Dataset(skybatch.JsonReader(str(data))).map(
            upper,
            pool_name="p",
            batch_size=1,
            output=skybatch.JsonWriter(str(tmp_path / "one.jsonl")),
        )
        assert [j.id for j in skybatch.jobs_queue()] == [1]
    assert read_jsonl(tmp_path / "one.jsonl") == read_jsonl(tmp_path / "two.jsonl")


def test_server_cli_start_status_stop(deployment: Deployment, tmp_path: Path) -> None:
    proc = deployment.cli("server", "status", check=False)
    assert proc.returncode == 1 and "not running" in proc.stdout
    assert "Server running at http://127.0.0.1:" in deployment.cli("server", "start").stdout
    assert "Server running" in deployment.cli("server", "status").stdout
    deployment.pool("p", workers=1, tmp=tmp_path)
    agent = skybatch.pool_status("p")[0].worker_list[0].pid
    server = deployment.server_pid()
    assert deployment.cli("server", "stop").stdout.strip() == "Server stopped."
    assert server is not None and agent is not None
    wait_for(lambda: not psutil.pid_exists(server), message="server to exit")
    wait_for(lambda: not psutil.pid_exists(agent), message="agents to stop with the server")
    assert deployment.cli("server", "stop").stdout.strip() == "Server was not running."
    # The next command starts it again, with the pool as it was.
    assert "READY" in deployment.cli("pool", "status").stdout or wait_for(
        lambda: skybatch.pool_status("p")[0].status == "READY", message="pool back"
    )


def test_token_never_reaches_the_logs(deployment: Deployment, tmp_path: Path) -> None:
    deployment.pool("p", workers=2, tmp=tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}] * 4)
    skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        leak_env, pool_name="p", batch_size=2, output=skybatch.JsonWriter(str(tmp_path / "o.jsonl"))
    )
    token = deployment.home.token_file.read_text()
    assert read_jsonl(tmp_path / "o.jsonl") == [{"token": None}] * 4, "mappers see no token"
    logs = list((deployment.root / "logs").rglob("*.log"))
    assert logs
    for path in logs:
        assert token not in path.read_text(), path


@skybatch.remote_function
def leak_env():
    import os

    for batch in skybatch.load():
        print(sorted(os.environ))
        skybatch.save_results([{"token": os.environ.get("SKYBATCH_TOKEN")} for _ in batch])
