"""The HTTP edge and submissions: Host and token before any body, body caps, one owner
per output, and malformed submissions refused as a 4xx that names the field."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

import skybatch
from tests.helpers import Deployment, deployment_at, read_jsonl, server, wait_for, write_jsonl

MiB = 1024 * 1024


@skybatch.remote_function
def echo():
    for batch in skybatch.load():
        skybatch.save_results([dict(item) for item in batch])


@skybatch.remote_function
def echo_after_go():
    import os
    import time

    for batch in skybatch.load():
        deadline = time.monotonic() + 60
        while not os.path.exists(batch[0]["go"]) and time.monotonic() < deadline:
            time.sleep(0.02)
        skybatch.save_results([dict(item) for item in batch])


@skybatch.remote_function
def sleepy():
    import time

    for batch in skybatch.load():
        time.sleep(30)  # holds its outputs' claims until the test cancels it
        skybatch.save_results([dict(item) for item in batch])


@skybatch.remote_function
def fails_on_5():
    for batch in skybatch.load():
        if any(item["i"] == 5 for item in batch):
            raise ValueError("row 5")
        skybatch.save_results([dict(item) for item in batch])


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A deployment with a one-worker pool named ``p``."""
    root = tmp_path_factory.mktemp("guard")
    with deployment_at(root / "home") as d:
        d.pool("p", workers=1, tmp=root)
        yield d


def peak_rss_growth(pid: int, action: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``action`` while sampling the server's RSS; (its result, peak growth in bytes)."""
    proc = psutil.Process(pid)
    base = proc.memory_info().rss
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        deadline = time.monotonic() + 120
        while not done.is_set() and time.monotonic() < deadline:
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = action()
        # The body may still be arriving after the answer: keep sampling a little.
        time.sleep(0.5)
    finally:
        done.set()
        sampler.join(timeout=10)
    peak = max(peak, proc.memory_info().rss)
    return result, peak - base


def error_of(r: httpx.Response) -> tuple[int, str, str]:
    body = r.json()["error"]
    return r.status_code, body["type"], body["message"]


def test_unauthenticated_big_bodies_are_refused_before_they_are_read(dep: Deployment) -> None:
    url, _, pid = server(dep)
    body = b"x" * (100 * MiB)

    def post_both() -> list[httpx.Response]:
        paths = ["/v1/jobs", "/v1/agent/workers/1/heartbeat"]
        with ThreadPoolExecutor(2) as pool:
            return list(
                pool.map(lambda p: httpx.post(f"{url}{p}", content=body, timeout=60), paths)
            )

    answers, growth = peak_rss_growth(pid, post_both)
    # Before the Guard the server read both bodies first: it grew by hundreds of MB.
    assert growth < 40 * MiB, f"server RSS grew by {growth / MiB:.0f} MiB"
    for r in answers:
        assert error_of(r) == (
            401,
            "AuthError",
            "missing or wrong token; clients read it from SKYBATCH_HOME/token",
        )


def test_invalid_body_without_token_is_401_not_422(dep: Deployment) -> None:
    url, _, _ = server(dep)
    for path in ("/v1/jobs", "/v1/pools/p"):
        r = httpx.post(
            f"{url}{path}",
            content=b"{not json",
            headers={"Content-Type": "application/json"},
            timeout=10,
        )
        assert r.status_code == 401, path
        assert r.json()["error"]["type"] == "AuthError"
    r = httpx.post(f"{url}/v1/jobs", content=b"{}", headers={"Authorization": "Bearer no"})
    assert r.status_code == 401


def test_oversized_bodies_get_413_naming_the_limit(dep: Deployment) -> None:
    url, auth, pid = server(dep)
    big = b'{"spec": "' + b"x" * (2 * MiB) + b'"}'

    def chunks() -> Iterator[bytes]:
        for _ in range(2 * 16):  # no Content-Length: counted as it arrives
            yield b"x" * (64 * 1024)

    cases = [
        ("/v1/pools/q", big, "POST /v1/pools/q takes at most 1 MiB (1048576 bytes)"),
        (
            "/v1/agent/workers/1/heartbeat",
            big,
            "POST /v1/agent/workers/1/heartbeat takes at most 1 MiB (1048576 bytes)",
        ),
        ("/v1/pools/q", chunks(), "POST /v1/pools/q takes at most 1 MiB (1048576 bytes)"),
    ]
    for path, content, limit in cases:
        r = httpx.post(f"{url}{path}", content=content, headers=auth, timeout=30)
        assert error_of(r) == (413, "ConfigError", f"request body too large: {limit}"), path
    # The connection is still good for the next request, and no pool appeared.
    assert httpx.get(f"{url}/v1/pools", headers=auth).json()[0]["name"] == "p"
    assert len(httpx.get(f"{url}/v1/pools", headers=auth).json()) == 1
    assert psutil.Process(pid).is_running()


def test_host_header_must_name_this_server(dep: Deployment) -> None:
    url, auth, _ = server(dep)
    port = url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"LOCALHOST:{port}"):
        r = httpx.get(f"{url}/v1/jobs", headers={**auth, "Host": host})
        assert r.status_code == 200, host
    expected = (
        f"this server answers only Host 127.0.0.1:{port}, localhost:{port} or [::1]:{port}, "
        "not {!r}; use the URL in SKYBATCH_HOME/server.json"
    )
    for host in (f"evil.example:{port}", "127.0.0.1:1", "localhost", f"127.0.0.1.nip.io:{port}"):
        for path in ("/v1/jobs", "/v1/health"):
            r = httpx.get(f"{url}{path}", headers={**auth, "Host": host})
            assert error_of(r) == (421, "ConfigError", expected.format(host)), (host, path)


@pytest.mark.parametrize("overwrite", [False, True])
def test_parallel_submits_of_one_output_one_wins(
    dep: Deployment, tmp_path: Path, overwrite: bool
) -> None:
    url, auth, _ = server(dep)
    # The job holds its output until every submit is answered: a job that had already
    # finished would rightly let a later submit with overwrite=True have the output.
    go = tmp_path / "go"
    rows = [{"i": i, "go": str(go)} for i in range(6)]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "out.jsonl"
    body = submit_body(data, out, overwrite=overwrite, mapper=echo_after_go.to_spec())
    before = {j.id for j in skybatch.jobs_queue()}
    start = threading.Barrier(20)

    def submit(_: int) -> httpx.Response:
        # One connection each, so the 20 submits reach the server together.
        with httpx.Client(headers=auth, timeout=60) as client:
            start.wait(timeout=30)
            return client.post(f"{url}/v1/jobs", json=body)

    try:
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(submit, range(20)))
    finally:
        go.touch()
    accepted = [r.json()["id"] for r in answers if r.status_code == 200]
    refused = [error_of(r) for r in answers if r.status_code != 200]
    # Before the claim: 5 (7 with overwrite=True) of 20 were accepted.
    assert len(accepted) == 1 and len(refused) == 19, [r.status_code for r in answers]
    owner = accepted[0]
    assert set(refused) == {
        (
            409,
            "ConflictError",
            f"job {owner} is already writing {out}; wait for it, cancel it "
            f"(`skybatch jobs cancel {owner}`), or choose another output",
        )
    }
    skybatch.Job(owner).wait(timeout=120)
    assert read_jsonl(out) == rows
    assert [p for p in out_dir.rglob("*") if not p.is_dir()] == [out]
    new = [j for j in skybatch.jobs_queue() if j.id not in before]
    assert [(j.id, j.status) for j in new] == [(owner, "SUCCEEDED")]


def submit_body(data: Path, out: Path, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "echo",
        "pool": "p",
        "reader": skybatch.JsonReader(str(data)).to_spec(),
        "writers": [skybatch.JsonWriter(str(out)).to_spec()],
        "mapper": echo.to_spec(),
        "batch_size": 2,
    }
    body.update(changes)
    return body


def test_malformed_submissions_are_refused_naming_the_field(
    dep: Deployment, tmp_path: Path
) -> None:
    url, auth, _ = server(dep)
    rows = [{"i": i} for i in range(3)]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    before = [j.id for j in skybatch.jobs_queue()]
    big = 10**30
    le = "Input should be less than or equal to"
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"errors": {"kind": "jsonl"}}, 400, "errors: invalid spec (missing key 'path')"),
        ({"errors": {"kind": "nope"}}, 400, "errors: invalid spec (ValueError: unknown writer"),
        ({"writers": [{"kind": "jsonl"}]}, 400, "writers[0]: invalid spec (missing key 'path')"),
        ({"reader": {"kind": "jsonl"}}, 400, "reader: invalid spec (missing key 'path')"),
        ({"batch_size": big}, 422, f"invalid request: batch_size: {le} 2147483647"),
        ({"max_retries": big}, 422, f"invalid request: max_retries: {le} 1000"),
        ({"max_failed_rows": big}, 422, f"invalid request: max_failed_rows: {le} 9223372036854"),
        ({"retry_backoff": 1e300}, 422, f"invalid request: retry_backoff: {le} 86400"),
        ({"name": "x" * MiB}, 422, "invalid request: name: a job name is 1-200 printable"),
        ({"name": "two\nlines"}, 422, "invalid request: name: a job name is 1-200 printable"),
        ({"name": ""}, 422, "invalid request: name: a job name is 1-200 printable"),
    ]
    for changes, status, message in cases:
        r = httpx.post(f"{url}/v1/jobs", json=submit_body(data, out, **changes), headers=auth)
        got = error_of(r)
        assert got[0] == status and got[1] == "ConfigError", (changes.keys(), got)
        assert got[2].startswith(message), (changes.keys(), got)
        assert "\n" not in got[2] and len(got[2]) < 400
    huge = 2**70
    for method, path in [
        ("GET", f"/v1/jobs/{huge}"),
        ("POST", f"/v1/jobs/{huge}/cancel"),
        ("GET", f"/v1/jobs/{huge}/logs"),
        ("POST", f"/v1/agent/workers/{huge}/ready"),
        ("GET", f"/v1/agent/jobs/{huge}"),
    ]:
        r = httpx.request(method, f"{url}{path}", headers=auth)
        status, kind, message = error_of(r)
        assert 400 <= status < 500 and kind == "ConfigError", (path, status, message)
        assert "job_id" in message or "worker" in message or "job" in message, message
    # Nothing was left behind: no job, and the output is free for the next submit.
    assert [j.id for j in skybatch.jobs_queue()] == before
    dep.cli("jobs", "queue")
    skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        echo, pool_name="p", batch_size=2, output=skybatch.JsonWriter(str(out))
    )
    assert read_jsonl(out) == rows


def test_names_are_one_printable_line(dep: Deployment, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", [{"i": 1}])
    before = [j.id for j in skybatch.jobs_queue()]
    with pytest.raises(skybatch.ConfigError) as e:
        skybatch.Dataset(skybatch.JsonReader(str(data))).map(
            echo, pool_name="p", batch_size=1, name="n" * MiB, stream=False
        )
    assert str(e.value) == (
        "invalid request: name: a job name is 1-200 printable characters on one line, got "
        f"'{'n' * 40}'... ({MiB} characters); pass a shorter name= to ds.map"
    )
    assert [j.id for j in skybatch.jobs_queue()] == before
    yaml_path = tmp_path / "pool.yaml"
    yaml_path.write_text("pool:\n  workers: 1\n")
    for bad in ("p\n", "p\t", " p", "-p"):
        with pytest.raises(skybatch.ConfigError) as e:
            skybatch.pool_apply(str(yaml_path), bad)
        assert str(e.value).startswith(f"invalid pool name {bad!r}: use letters"), bad
    url, auth, _ = server(dep)
    r = httpx.post(f"{url}/v1/pools/p%0A", json={"spec": {"pool": {"workers": 1}}}, headers=auth)
    assert error_of(r) == (
        400,
        "ConfigError",
        "invalid pool name 'p\\n': use letters, digits, '-', '_' or '.', starting with a "
        "letter or digit (at most 63 characters)",
    )
    assert [p.name for p in skybatch.pool_status()] == ["p"]


def read_until_closed(conn: socket.socket, timeout: float = 10) -> bytes:
    """What the server sends until it closes the connection (``timeout`` at most)."""
    got = b""
    deadline = time.monotonic() + timeout
    conn.settimeout(timeout)
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        while time.monotonic() < deadline:
            chunk = conn.recv(65536)
            if not chunk:
                break
            got += chunk
    return got


def raw_error(answer: bytes) -> tuple[bytes, str, str]:
    """(status line, error type, message) of a raw HTTP answer."""
    status, _, rest = answer.partition(b"\r\n")
    body = json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]
    return status, body["type"], body["message"]


def test_endless_request_heads_are_cut_off_without_a_token(dep: Deployment) -> None:
    url, _, pid = server(dep)
    port = int(url.rsplit(":", 1)[1])
    head = f"GET /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()

    def flood(one_value: bool) -> bytes:
        """20 MB of headers (or of one header's value), or less if the server hangs up."""
        piece = b"v" * 65536 if one_value else b"X-B: 1\r\n" * 8192
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.sendall(head + (b"X-Big: " if one_value else b""))
                for _ in range(20 * 16):
                    conn.sendall(piece)
            return read_until_closed(conn)

    health: list[float] = []

    def floods() -> list[bytes]:
        with ThreadPoolExecutor(3) as pool:
            sent = [pool.submit(flood, one_value) for one_value in (False, True, False)]
            deadline = time.monotonic() + 120
            while not all(f.done() for f in sent) and time.monotonic() < deadline:
                start = time.monotonic()
                assert httpx.get(f"{url}/v1/health", timeout=30).status_code == 200
                health.append(time.monotonic() - start)
                time.sleep(0.05)
            return [f.result(timeout=30) for f in sent]

    answers, growth = peak_rss_growth(pid, floods)
    # Before: the server read all 60 MB (RSS +250 MB or more) and never answered.
    for answer in answers:
        assert raw_error(answer) == (
            b"HTTP/1.1 431 Request Header Fields Too Large",
            "ConfigError",
            "request head too large: the request line and headers take at most 64 KiB "
            "(65536 bytes)",
        )
    assert growth < 30 * MiB, f"server RSS grew by {growth / MiB:.0f} MiB"
    assert health and max(health) < 2, health
    assert httpx.get(f"{url}/v1/health").status_code == 200


def test_more_than_one_host_header_is_400(dep: Deployment) -> None:
    url, auth, _ = server(dep)
    port = int(url.rsplit(":", 1)[1])
    for hosts in (["evil.example", f"127.0.0.1:{port}"], [f"127.0.0.1:{port}"] * 2):
        request = "GET /v1/jobs HTTP/1.1\r\n" + "".join(f"Host: {h}\r\n" for h in hosts)
        request += f"Authorization: {auth['Authorization']}\r\nConnection: close\r\n\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(request.encode())
            answer = read_until_closed(conn)
        # Before: the last Host counted, so a rebound page's first one went unseen (200).
        assert raw_error(answer) == (
            b"HTTP/1.1 400 Bad Request",
            "ConfigError",
            "more than one Host header; send exactly one",
        ), hosts


def _cancel(*job_ids: int) -> None:
    for job_id in job_ids:
        skybatch.Job(str(job_id)).cancel()

    def all_cancelled() -> bool:
        return all(skybatch.Job(str(j)).status() is skybatch.JobStatus.CANCELLED for j in job_ids)

    wait_for(all_cancelled, 30, f"jobs {job_ids} cancelled")


def test_one_location_is_claimed_once_however_spelled_or_nested(
    dep: Deployment, tmp_path: Path
) -> None:
    url, auth, _ = server(dep)
    data = write_jsonl(tmp_path / "in.jsonl", [{"i": i} for i in range(4)])
    real = Path(os.path.realpath(tmp_path))
    (real / "o").mkdir()
    (real / "olink").symlink_to(real / "o")
    out = real / "o" / "out.jsonl"
    shards = real / "sh" / "out"
    first = {"mapper": sleepy.to_spec(), "batch_size": 1}
    a = httpx.post(f"{url}/v1/jobs", json=submit_body(data, out, **first), headers=auth)
    b_writer = skybatch.JsonWriter(str(shards), shards=True).to_spec()
    b = httpx.post(
        f"{url}/v1/jobs", json=submit_body(data, out, writers=[b_writer], **first), headers=auth
    )
    owner_a, owner_b = a.json()["id"], b.json()["id"]
    try:
        conflicts: list[tuple[dict[str, Any], int, str]] = [
            ({"path": str(real / "olink" / "out.jsonl")}, owner_a, f"{out}"),
            ({"path": f"local://{out}"}, owner_a, f"{out}"),
            ({"path": f"file://localhost{out}"}, owner_a, f"{out}"),
            (
                {"path": str(shards / "part-00000.jsonl")},
                owner_b,
                f"{shards}, which holds {shards}/part-00000.jsonl",
            ),
            ({"path": str(real / "o"), "shards": True}, owner_a, f"{out}, inside {real / 'o'}"),
        ]
        for writer, owner, what in conflicts:
            body = submit_body(data, out, writers=[{"kind": "jsonl", **writer}])
            r = httpx.post(f"{url}/v1/jobs", json=body, headers=auth)
            # Before: each of these was accepted, and two jobs published over each other
            # (a shards publish removed the other job's staging area: 16 batches lost).
            assert error_of(r) == (
                409,
                "ConflictError",
                f"job {owner} is already writing {what}; wait for it, cancel it "
                f"(`skybatch jobs cancel {owner}`), or choose another output",
            ), writer
        inside = [
            skybatch.JsonWriter(str(real / "d"), shards=True).to_spec(),
            skybatch.JsonWriter(str(real / "d" / "x.jsonl")).to_spec(),
        ]
        r = httpx.post(f"{url}/v1/jobs", json=submit_body(data, out, writers=inside), headers=auth)
        assert error_of(r) == (
            400,
            "ConfigError",
            f"two outputs of this job overlap: {real / 'd'}, which holds {real / 'd'}/x.jsonl; "
            "give each its own path",
        )
    finally:
        _cancel(owner_a, owner_b)


def test_a_cancelled_shards_job_leaves_no_directory(dep: Deployment, tmp_path: Path) -> None:
    rows = [{"i": i} for i in range(4)]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    job = skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        sleepy,
        pool_name="p",
        batch_size=1,
        output=skybatch.JsonWriter(str(out), shards=True),
        stream=False,
    )
    assert out.is_dir()
    _cancel(int(job.job_id))
    # Before: the empty out.jsonl/ stayed, and the next submit failed "is a directory".
    assert not out.exists()
    skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        echo, pool_name="p", batch_size=2, output=skybatch.JsonWriter(str(out))
    )
    assert read_jsonl(out) == rows


def test_resume_does_not_overwrite_a_newer_jobs_output(dep: Deployment, tmp_path: Path) -> None:
    rows = [{"i": i} for i in range(6)]
    ds = skybatch.Dataset(skybatch.JsonReader(str(write_jsonl(tmp_path / "in.jsonl", rows))))
    out = tmp_path / "out.jsonl"
    with pytest.raises(skybatch.JobFailedError) as e:
        ds.map(fails_on_5, pool_name="p", batch_size=2, output=skybatch.JsonWriter(str(out)),
               max_retries=0)  # fmt: skip
    old = e.value.job_id
    newer = [{"i": i, "newer": True} for i in range(3)]
    skybatch.Dataset(skybatch.JsonReader(str(write_jsonl(tmp_path / "new.jsonl", newer)))).map(
        echo, pool_name="p", batch_size=2, output=skybatch.JsonWriter(str(out))
    )
    # Before: the resume forced overwrite=True and replaced the newer job's output.
    with pytest.raises(skybatch.OutputError) as refused:
        ds.map(echo, pool_name="p", batch_size=2, output=skybatch.JsonWriter(str(out)),
               resume=old)  # fmt: skip
    assert str(refused.value) == (
        f"output {out} already exists; pass overwrite=True to ds.map() to replace it, or "
        "choose another path"
    )
    assert read_jsonl(out) == newer
    ds.map(echo, pool_name="p", batch_size=2, output=skybatch.JsonWriter(str(out)),
           resume=old, overwrite=True)  # fmt: skip
    assert read_jsonl(out) == rows


def test_relative_local_paths_are_refused(dep: Deployment, tmp_path: Path) -> None:
    url, auth, _ = server(dep)
    rows = [{"i": i} for i in range(3)]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    hint = "is not an absolute path; send an absolute path or a URL such as s3://bucket/key"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"writers": [{"kind": "jsonl", "path": "rel.jsonl"}]}, "writers[0].path: 'rel.jsonl'"),
        ({"reader": {"kind": "jsonl", "path": "in.jsonl"}}, "reader.path: 'in.jsonl'"),
        ({"errors": {"kind": "jsonl", "path": "file://e.jsonl"}}, "errors.path: 'file://e.jsonl'"),
    ]
    before = [j.id for j in skybatch.jobs_queue()]
    for changes, message in cases:
        r = httpx.post(f"{url}/v1/jobs", json=submit_body(data, out, **changes), headers=auth)
        # Before: accepted, and resolved against the server's working directory.
        assert error_of(r) == (400, "ConfigError", f"{message} {hint}"), changes
    assert [j.id for j in skybatch.jobs_queue()] == before
    # file://localhost/ names a local path (before: <server cwd>/localhost/...).
    body = submit_body(data, out, writers=[{"kind": "jsonl", "path": f"file://localhost{out}"}])
    r = httpx.post(f"{url}/v1/jobs", json=body, headers=auth)
    assert r.status_code == 200, r.text
    skybatch.Job(str(r.json()["id"])).wait(timeout=120)
    assert read_jsonl(out) == rows
