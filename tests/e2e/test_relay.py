"""The relay: local paths of the server's machine on workers that cannot see them.

The pool's agents run as an SSH or Ray provider's do (``SKYBATCH_RELAY=1``), and in
a mount namespace of their own where the test's directory (inputs, outputs and
SKYBATCH_HOME) lies under an empty tmpfs: an agent that read the input or wrote a
part itself, instead of through the server, would find nothing there and fail.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import signal
import socket
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pyarrow.parquet as pq
import pytest

import skybatch
from skybatch.pools.registry import TEST_PROVIDERS_ENV
from tests.e2e.test_full_disk import fill
from tests.helpers import (
    Deployment,
    deployment_at,
    read_jsonl,
    server,
    tmpfs,
    wait_for,
    write_jsonl,
)


@skybatch.remote_function
def describe():
    for batch in skybatch.load():
        skybatch.save_results([{"i": r["i"], "len": len(r["text"])} for r in batch])


@skybatch.remote_function
def slow_describe():
    import time

    for batch in skybatch.load():
        time.sleep(0.3)
        skybatch.save_results([{"i": r["i"], "len": len(r["text"])} for r in batch])


@skybatch.remote_function
def stuck():
    import time

    for _batch in skybatch.load():
        time.sleep(600)


@dataclass
class Generated(skybatch.InputReader):
    """A reader of the user's own: it makes its rows where it runs (on the worker)."""

    count: int

    def __len__(self) -> int:
        return self.count

    def download_batch(self, start_idx: int, end_idx: int, cache_dir: str) -> list[dict[str, Any]]:
        return [{"i": i, "text": "x" * (i % 37)} for i in range(start_idx, end_idx + 1)]


@dataclass
class Pairs(skybatch.OutputWriter):
    """A writer of the user's own: ``i:len`` lines, then a total line."""

    path: str

    def write_batch(self, rows: list[dict[str, Any]]) -> bytes:
        return "".join(f"{r['i']}:{r['len']}\n" for r in rows).encode()

    def reduce(self, parts: Any, out: Any) -> None:
        total = 0
        for part in parts:
            data = part.read()
            total += len(data.splitlines())
            out.write(data)
        out.write(f"total {total}\n".encode())


def _rows(n: int) -> list[dict[str, object]]:
    return [{"i": i, "text": "x" * (i % 37)} for i in range(n)]


def _expected(n: int) -> list[dict[str, int]]:
    return [{"i": i, "len": i % 37} for i in range(n)]


@pytest.fixture(scope="module")
def relayed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, Path]]:
    """A deployment with a 2-worker relay pool ``remote``, whose agents see nothing of
    the module's directory but their own worker directories; and a data directory."""
    root = tmp_path_factory.mktemp("relay")
    data = root / "data"
    data.mkdir()
    with pytest.MonkeyPatch.context() as mp, deployment_at(root / "home") as d:
        mp.setenv(TEST_PROVIDERS_ENV, "1")  # the client validates; the server inherits it
        d.pool(
            "remote",
            workers=2,
            extra=f"provider: {{type: test, relay: true, hide: [{str(root)!r}]}}\n",
        )
        yield d, data


def test_the_agents_cannot_see_the_files_they_work_on(
    relayed: tuple[Deployment, Path],
) -> None:
    """What makes the other tests prove the relay: the agents' view of the directory."""
    d, data = relayed
    write_jsonl(data / "seen.jsonl", [{"i": 0}])
    for w in skybatch.pool_status("remote")[0].worker_list:
        assert w.pid is not None
        agent = psutil.Process(w.pid)
        assert agent.environ()["SKYBATCH_RELAY"] == "1"
        # The files as the agent sees them (through its root, in its mount namespace):
        # of the module's directory only the way to its worker directory is left.
        seen = f"/proc/{w.pid}/root"
        cwd = agent.cwd()
        assert cwd.startswith(str(d.root / "pools" / "remote"))
        assert os.path.isdir(seen + cwd)
        assert os.listdir(seen + str(data.parent)) == ["home"]
        assert os.listdir(seen + str(d.root)) == ["pools"]
        assert not os.path.exists(seen + str(data / "seen.jsonl"))
    log = (d.home.root / "logs" / "pools" / "remote" / "worker-0.log").read_text()
    assert "local paths of the server are relayed through it (SKYBATCH_RELAY=1)" in log


def test_a_local_jsonl_input_into_jsonl_csv_and_parquet_outputs(
    relayed: tuple[Deployment, Path],
) -> None:
    _, data = relayed
    n = 2000
    write_jsonl(data / "in.jsonl", _rows(n))
    job = skybatch.Dataset(skybatch.JsonReader(str(data / "in.jsonl"))).map(
        describe,
        pool_name="remote",
        batch_size=64,
        stream=False,
        output=[
            skybatch.JsonWriter(str(data / "out.jsonl")),
            skybatch.CsvWriter(str(data / "out.csv")),
            skybatch.ParquetWriter(str(data / "out.parquet")),
        ],
    )
    job.wait(timeout=120)  # raises unless it succeeded
    assert read_jsonl(data / "out.jsonl") == _expected(n)
    with open(data / "out.csv", newline="") as f:
        assert [{"i": int(r["i"]), "len": int(r["len"])} for r in csv.DictReader(f)] == (
            _expected(n)
        )
    assert pq.read_table(data / "out.parquet").to_pylist() == _expected(n)
    assert not (data / ".skybatch").exists()  # the staging area went with the job


def test_a_csv_input_and_a_compressed_jsonl_input(relayed: tuple[Deployment, Path]) -> None:
    """CSV batches carry their header; a gzip input's spill chunks are local too."""
    import gzip

    _, data = relayed
    n = 300
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["i", "text"])
    writer.writeheader()
    writer.writerows(_rows(n))
    (data / "in.csv").write_text(buf.getvalue())
    with gzip.open(data / "in.jsonl.gz", "wt") as f:
        f.writelines(f'{{"i": {r["i"]}, "text": "{r["text"]}"}}\n' for r in _rows(n))

    @skybatch.remote_function
    def length():
        for batch in skybatch.load():
            skybatch.save_results([{"i": int(r["i"]), "len": len(r["text"])} for r in batch])

    for name, reader in [
        ("csv", skybatch.CsvReader(str(data / "in.csv"))),
        ("gz", skybatch.JsonReader(str(data / "in.jsonl.gz"))),
    ]:
        out = data / f"from-{name}.jsonl"
        skybatch.Dataset(reader).map(
            length,
            pool_name="remote",
            batch_size=50,
            stream=False,
            output=skybatch.JsonWriter(str(out)),
        ).wait(timeout=120)
        assert read_jsonl(out) == _expected(n), name


def test_from_items_and_results(relayed: tuple[Deployment, Path]) -> None:
    """The items lie in the server's home, and so do the results: both relayed."""
    job = skybatch.Dataset.from_items(_rows(250)).map(
        describe, pool_name="remote", batch_size=16, stream=False
    )
    job.wait(timeout=120)
    assert job.results() == _expected(250)


def test_an_agent_killed_mid_job_loses_nothing(relayed: tuple[Deployment, Path]) -> None:
    _, data = relayed
    n = 400
    write_jsonl(data / "kill.jsonl", _rows(n))
    job = skybatch.Dataset(skybatch.JsonReader(str(data / "kill.jsonl"))).map(
        slow_describe,
        pool_name="remote",
        batch_size=20,
        stream=False,
        output=skybatch.JsonWriter(str(data / "kill-out.jsonl")),
    )

    def busy_agent() -> int | None:
        # An agent with a runner is in the middle of a batch (it holds a lease).
        for w in skybatch.pool_status("remote")[0].worker_list:
            if w.pid is not None and w.status == "READY":
                with contextlib.suppress(psutil.Error):
                    if psutil.Process(w.pid).children():
                        return w.pid
        return None

    wait_for(lambda: job.info().committed_batches >= 3, 60, "three committed batches")
    pid = wait_for(busy_agent, 30, "an agent in the middle of a batch")
    os.killpg(pid, signal.SIGKILL)
    job.wait(timeout=180)
    view = job.info()
    assert view.lost >= 1  # the killed agent's lease was put back
    assert read_jsonl(data / "kill-out.jsonl") == _expected(n)
    wait_for(
        lambda: (
            sum(w.status == "READY" for w in skybatch.pool_status("remote")[0].worker_list) == 2
        ),
        60,
        "the pool replaced the killed worker",
    )


def test_a_part_outside_the_attempts_own_is_refused(
    relayed: tuple[Deployment, Path],
) -> None:
    """Real HTTP with the agents' token: the attempt's own part path is the only one."""
    d, data = relayed
    write_jsonl(data / "held.jsonl", _rows(4))
    job = skybatch.Dataset(skybatch.JsonReader(str(data / "held.jsonl"))).map(
        stuck,
        pool_name="remote",
        batch_size=2,
        stream=False,
        output=skybatch.JsonWriter(str(data / "held-out.jsonl")),
    )
    try:

        def leased() -> tuple[int, int, int] | None:
            db = sqlite3.connect(f"file:{d.home.db}?mode=ro", uri=True)
            try:
                row = db.execute(
                    "SELECT id, job_id, batch FROM attempts WHERE status='LEASED' AND job_id=?",
                    (int(job.job_id),),
                ).fetchone()
            finally:
                db.close()
            return tuple(row) if row else None

        attempt, job_id, batch = wait_for(leased, 60, "a leased attempt")
        url, headers, _ = server(d)
        deployment = d.home.read_deployment_id()
        own = data / ".skybatch" / f"{deployment}-{job_id}" / "held-out.jsonl"
        own_part = own / f"{batch:08d}.{attempt}.jsonl"
        outside = [
            str(data / "evil.jsonl"),  # beside the output
            str(own / ".." / ".." / ".." / "evil.jsonl"),  # out of the staging area by ..
            str(own / f"{batch + 1:08d}.{attempt}.jsonl"),  # another batch's name
            str(d.home.token_file),  # the server's own files
        ]
        with httpx.Client(base_url=url, headers=headers) as client:
            for path in outside:
                r = client.post(
                    f"/v1/agent/attempts/{attempt}/part",
                    params={"job": job_id, "batch": batch, "path": path},
                    content=b'{"i": 666}\n',
                )
                assert r.status_code == 403, (path, r.text)
                message = r.json()["error"]["message"]
                assert message.startswith(f"refused to write {path!r}: it is not a part of "), (
                    message
                )
                assert f"its parts go to {own_part}" in message
            assert not (data / "evil.jsonl").exists()
            assert d.home.token_file.read_text().strip() == headers["Authorization"][7:]
            assert not (own / f"{batch + 1:08d}.{attempt}.jsonl").exists()

            # An attempt that holds no lease may neither write nor read.
            r = client.post(
                f"/v1/agent/attempts/{attempt + 1000}/part",
                params={"job": job_id, "batch": batch, "path": str(own_part)},
                content=b"{}\n",
            )
            assert r.status_code == 409
            assert r.json()["error"]["message"] == (
                f"attempt {attempt + 1000} does not hold batch {batch} of job {job_id} "
                "(revoked, finished or never leased)"
            )
            r = client.get(
                f"/v1/agent/jobs/{job_id}/batches/{batch}/input",
                params={"attempt": attempt + 1000},
            )
            assert r.status_code == 409
            # An upload abandoned halfway leaves no half part and no traceback.
            parsed = httpx.URL(url)
            with socket.create_connection((parsed.host, parsed.port), timeout=10) as raw:
                query = httpx.QueryParams({"job": job_id, "batch": batch, "path": str(own_part)})
                raw.sendall(
                    f"POST /v1/agent/attempts/{attempt}/part?{query} HTTP/1.1\r\n"
                    f"Host: {parsed.host}:{parsed.port}\r\n"
                    f"Authorization: {headers['Authorization']}\r\n"
                    "Content-Length: 1000000\r\n\r\n".encode()
                    + b'{"i": 1}\n' * 10
                )
            wait_for(
                lambda: "part upload of job" in d.home.server_log.read_text(),
                30,
                "the abandoned upload logged",
            )
            assert "Traceback" not in d.home.server_log.read_text()
            assert not own_part.exists()
            # The attempt's own input and part path are served and written.
            r = client.get(
                f"/v1/agent/jobs/{job_id}/batches/{batch}/input", params={"attempt": attempt}
            )
            assert r.status_code == 200
            lines = (data / "held.jsonl").read_bytes().splitlines(keepends=True)
            assert r.content == b"".join(lines[2 * batch : 2 * batch + 2])
            r = client.post(
                f"/v1/agent/attempts/{attempt}/part",
                params={"job": job_id, "batch": batch, "path": str(own_part)},
                content=b'{"i": 1}\n',
            )
            assert r.status_code == 200, r.text
            assert own_part.read_bytes() == b'{"i": 1}\n'
    finally:
        job.cancel()
    wait_for(lambda: job.status().finished, 60, "the cancel")
    assert job.status().value == "CANCELLED"


def test_formats_of_the_users_own(relayed: tuple[Deployment, Path]) -> None:
    """A custom writer's write_batch runs on the worker and its part goes up; a custom
    reader reads where it runs (the worker), never relayed."""
    _, data = relayed
    out = data / "pairs.txt"
    skybatch.Dataset(Generated(count=130)).map(
        describe, pool_name="remote", batch_size=20, stream=False, output=Pairs(str(out))
    ).wait(timeout=120)
    assert out.read_text() == "".join(f"{i}:{i % 37}\n" for i in range(130)) + "total 130\n"


def test_without_the_relay_the_hidden_input_is_out_of_reach(
    relayed: tuple[Deployment, Path],
) -> None:
    """The control: the same hiding without SKYBATCH_RELAY=1 leaves agents without input."""
    d, data = relayed
    write_jsonl(data / "control.jsonl", _rows(10))
    d.pool(
        "blind",
        workers=1,
        extra=f"provider: {{type: test, hide: [{str(data.parent)!r}]}}\n",
    )
    try:
        job = skybatch.Dataset(skybatch.JsonReader(str(data / "control.jsonl"))).map(
            describe,
            pool_name="blind",
            batch_size=10,
            stream=False,
            max_retries=0,
            output=skybatch.JsonWriter(str(data / "control-out.jsonl")),
        )
        with pytest.raises(skybatch.JobFailedError) as failed:
            job.wait(timeout=120)
        assert f"cannot read {data / 'control.jsonl'}: no such file or directory" in str(
            failed.value
        )
    finally:
        skybatch.pool_down("blind")


def test_a_full_disk_under_a_relayed_output_holds_the_job_until_space_returns(
    relayed: tuple[Deployment, Path],
) -> None:
    """The server's disk, full: the agent keeps its lease and says so, as with its own."""
    _, data = relayed
    source = write_jsonl(data / "wide.jsonl", [{"i": i, "text": "w" * 20_000} for i in range(40)])
    with tmpfs(data / "full", "8m", mode=0o700, busy_wait=10) as outdir:
        out = outdir / "o.jsonl"
        job = skybatch.Dataset(skybatch.JsonReader(str(source))).map(
            slow_describe,
            pool_name="remote",
            batch_size=2,
            stream=False,
            output=skybatch.JsonWriter(str(out)),
        )
        wait_for(lambda: job.info().committed_batches >= 2, 60, "first commits")
        filler = fill(outdir)
        health = wait_for(
            lambda: "no space left" in (job.info().health or "") and job.info().health,
            timeout=10,
            message=f"a health line saying the output has no space left: {job.info()}",
        )
        assert f"cannot write {out}: no space left on device" in health, health
        view = job.info()
        assert view.status == "RUNNING" and view.retries == 0 and view.failed_batches == 0
        filler.unlink()
        job.wait(timeout=60)
        view = job.info()
        assert view.health is None and view.retries == 0 and view.failed_batches == 0
        assert read_jsonl(out) == [{"i": i, "len": 20_000} for i in range(40)]
