"""Staging and publishing: deployments sharing an output directory, a server killed
during the reduce, a reduce onto a full disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil
import pytest

import skybatch
from skybatch.client.api import close_clients
from tests.helpers import Deployment, deployment_at, read_jsonl, tmpfs, wait_for, write_jsonl


@skybatch.remote_function
def upper():
    import time

    for batch in skybatch.load():
        time.sleep(batch[0].get("sleep", 0))
        skybatch.save_results([{"i": r["i"], "text": r["text"].upper()} for r in batch])


@skybatch.remote_function
def breaks_on_bad():
    for batch in skybatch.load():
        if any(r["text"] == "bad" for r in batch):
            raise RuntimeError("cannot handle 'bad'")
        skybatch.save_results([{"i": r["i"], "text": r["text"].upper()} for r in batch])


@skybatch.remote_function
def waits_then_breaks():
    import os
    import time

    for batch in skybatch.load():
        if any(r["text"] == "bad" for r in batch):
            # Fail only once the test has removed the staging area.
            deadline = time.monotonic() + 60
            while not os.path.exists(batch[0]["go"]) and time.monotonic() < deadline:
                time.sleep(0.05)
            raise RuntimeError("cannot handle 'bad'")
        skybatch.save_results([{"i": r["i"], "text": r["text"].upper()} for r in batch])


def rows_of(n: int, bad: int | None = None, sleep: float = 0.0) -> list[dict[str, Any]]:
    return [{"i": i, "text": "bad" if i == bad else f"r{i}", "sleep": sleep} for i in range(n)]


def expected(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"i": r["i"], "text": str(r["text"]).upper()} for r in rows]


def ds(path: Path) -> skybatch.Dataset:
    return skybatch.Dataset(skybatch.JsonReader(str(path)))


@pytest.fixture
def two_homes(tmp_path: Path) -> Iterator[tuple[Deployment, Deployment]]:
    with deployment_at(tmp_path / "home-a") as a, deployment_at(tmp_path / "home-b") as b:
        yield a, b


def use(d: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``d`` the deployment of the calls that follow (as its user's shell would)."""
    monkeypatch.setenv("SKYBATCH_HOME", str(d.root))


def test_two_deployments_share_an_output_directory(
    two_homes: tuple[Deployment, Deployment], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = two_homes
    shared = tmp_path / "shared"
    shared.mkdir()
    for d in (a, b):
        use(d, monkeypatch)
        d.pool("pool", workers=2, tmp=tmp_path)

    # B's job 1 runs while A's job 1 fails with batches committed.
    use(b, monkeypatch)
    rows_b = rows_of(60, sleep=0.2)
    writer_b = skybatch.JsonWriter(str(shared / "b.jsonl"))
    job_b1 = ds(write_jsonl(tmp_path / "b.jsonl", rows_b)).map(
        upper, pool_name="pool", batch_size=3, output=writer_b, stream=False
    )
    wait_for(lambda: job_b1.info().committed_batches >= 1, 60, "B's first commit")
    use(a, monkeypatch)
    rows_a = rows_of(60, bad=45)
    data_a = write_jsonl(tmp_path / "a.jsonl", rows_a)
    writer_a = skybatch.JsonWriter(str(shared / "a.jsonl"))
    job_a1 = ds(data_a).map(
        breaks_on_bad, pool_name="pool", batch_size=3, output=writer_a, stream=False,
        max_retries=0,
    )  # fmt: skip
    assert job_a1.job_id == job_b1.job_id == "1"
    with pytest.raises(skybatch.JobFailedError) as failed:
        job_a1.wait(timeout=60)
    info_a1 = job_a1.info()
    assert info_a1.committed_batches > 0
    assert (
        f"{info_a1.committed_batches} of {info_a1.total_batches} batches "
        f"({info_a1.committed_rows} of 60 rows) committed and kept" in str(failed.value)
    )
    job_b1.wait(timeout=60)
    assert read_jsonl(shared / "b.jsonl") == expected(rows_b)
    # B's user cleans up after B's job 1: A's job 1 keeps its parts.
    use(b, monkeypatch)
    writer_b.cleanup(job_id="1")

    # The "kept" claim holds: A recovers exactly what committed.
    use(a, monkeypatch)
    partial = writer_a.reduce_results(job_id=job_a1.job_id)
    got = read_jsonl(shared / "a.jsonl")
    assert partial["rows"] == len(got) == info_a1.committed_rows
    missing = {i for first, last in partial["missing"] for i in range(first, last + 1)}
    assert {r["i"] for r in got} == set(range(60)) - missing
    assert got == [r for r in expected(rows_a) if r["i"] not in missing]

    # B's job 2 runs while A's job 2 fails before committing anything (and cleans up).
    use(b, monkeypatch)
    writer_d = skybatch.JsonWriter(str(shared / "d.jsonl"))
    job_b2 = ds(write_jsonl(tmp_path / "d.jsonl", rows_b)).map(
        upper, pool_name="pool", batch_size=3, output=writer_d, stream=False
    )
    wait_for(lambda: job_b2.info().committed_batches >= 2, 60, "B's job 2 commits")
    use(a, monkeypatch)
    job_a2 = ds(write_jsonl(tmp_path / "c.jsonl", rows_of(3, bad=0))).map(
        breaks_on_bad, pool_name="pool", batch_size=3, stream=False, max_retries=0,
        output=skybatch.JsonWriter(str(shared / "c.jsonl")),
    )  # fmt: skip
    assert job_a2.job_id == job_b2.job_id == "2"
    with pytest.raises(skybatch.JobFailedError, match="No batch committed"):
        job_a2.wait(timeout=60)
    job_b2.wait(timeout=60)
    assert read_jsonl(shared / "d.jsonl") == expected(rows_b)
    assert not (shared / "c.jsonl").exists()

    # A's job 1 resumes (the fix: a mapper that handles 'bad') and completes exactly.
    ds(data_a).map(upper, pool_name="pool", batch_size=3, output=writer_a, resume="1")
    assert read_jsonl(shared / "a.jsonl") == expected(rows_a)
    assert sorted(os.listdir(shared)) == ["a.jsonl", "b.jsonl", "d.jsonl"]


def test_recovery_hint_says_when_the_parts_were_removed(
    deployment: Deployment, tmp_path: Path
) -> None:
    deployment.pool("one", workers=1, tmp=tmp_path)
    out = tmp_path / "out" / "out.jsonl"
    out.parent.mkdir()
    go = tmp_path / "go"
    rows = [{**r, "go": str(go)} for r in rows_of(30, bad=20)]
    job = ds(write_jsonl(tmp_path / "in.jsonl", rows)).map(
        waits_then_breaks, pool_name="one", batch_size=5, max_retries=0,
        output=skybatch.JsonWriter(str(out)), stream=False,
    )  # fmt: skip
    wait_for(lambda: job.info().committed_batches == 4, 60, "the batches before the bad one")
    # Someone else's `rm -rf` of the staging area, then the job fails.
    shutil.rmtree(out.parent / ".skybatch")
    go.touch()
    with pytest.raises(skybatch.JobFailedError) as failed:
        job.wait(timeout=60)
    message = str(failed.value)
    assert "committed and kept" not in message
    staging = out.parent / ".skybatch" / f"{deployment.home.read_deployment_id()}-1" / "out.jsonl"
    assert (
        "4 of 6 batches had committed, but their parts in "
        f"{staging} were removed by something other than this job, so nothing can be "
        "recovered; submit the job again"
    ) in message


@dataclass
class SlowReduceWriter(skybatch.OutputWriter):
    """JSON Lines whose reduce takes a while: time to kill the server during it."""

    path: str

    def write_batch(self, rows: list[dict[str, Any]]) -> bytes:
        return b"".join(json.dumps(r).encode() + b"\n" for r in rows)

    def reduce(self, parts: Iterator[IO[bytes]], out: IO[bytes]) -> None:
        for part in parts:
            shutil.copyfileobj(part, out)
            out.flush()
            time.sleep(0.3)


def test_server_killed_during_the_reduce(deployment: Deployment, tmp_path: Path) -> None:
    deployment.pool("pool", workers=2, tmp=tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rows = rows_of(40)
    job = ds(write_jsonl(tmp_path / "in.jsonl", rows)).map(
        upper, pool_name="pool", batch_size=2,
        output=SlowReduceWriter(str(out_dir / "out.jsonl")), stream=False,
    )  # fmt: skip

    def temp_files() -> list[str]:
        return [n for n in os.listdir(out_dir) if n.endswith(".tmp")]

    wait_for(lambda: job.info().status == "REDUCING" and temp_files(), 90, "the reduce's temp file")
    pid = deployment.server_pid()
    assert pid is not None
    server = psutil.Process(pid)
    os.kill(pid, signal.SIGKILL)
    server.wait(timeout=10)
    close_clients()
    assert temp_files() and not (out_dir / "out.jsonl").exists()

    # Any client call starts the server again; it finishes the reduce.
    assert skybatch.Job(job.job_id).wait(timeout=90).info().status == "SUCCEEDED"
    assert read_jsonl(out_dir / "out.jsonl") == expected(rows)
    assert sorted(os.listdir(out_dir)) == ["out.jsonl"]


def test_a_reduce_that_server_restarts_keep_cutting_short_is_given_up(
    deployment: Deployment, tmp_path: Path
) -> None:
    deployment.pool("pool", workers=2, tmp=tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rows = rows_of(40)
    job_id = ds(write_jsonl(tmp_path / "in.jsonl", rows)).map(
        upper, pool_name="pool", batch_size=2,
        output=SlowReduceWriter(str(out_dir / "out.jsonl")), stream=False,
    ).job_id  # fmt: skip

    def job() -> skybatch.Job:
        return skybatch.Job(job_id)  # anew after each kill: the old client is closed

    def temp_stamp() -> tuple[int, int] | None:
        names = [n for n in os.listdir(out_dir) if n.endswith(".tmp")]
        if not names:
            return None
        st = os.stat(out_dir / names[0])
        return st.st_ino, st.st_ctime_ns

    left: tuple[int, int] | None = None  # the temp file as the last killed reduce left it
    for _ in range(2):  # the reduce's first run, then the one after the first restart
        # A reduce is running once the temp file changes from what the killed one left
        # (an inode alone may be reused for the file made anew).
        wait_for(
            lambda gone=left: (
                job().info().status == "REDUCING" and temp_stamp() not in (None, gone)
            ),
            90,
            "a reduce writing its temp file",
        )
        pid = deployment.server_pid()
        assert pid is not None
        server = psutil.Process(pid)
        os.kill(pid, signal.SIGKILL)
        server.wait(timeout=10)
        close_clients()
        left = temp_stamp()

    # The third start does not run the reduce again: the job fails, saying why.
    with pytest.raises(skybatch.JobFailedError) as failed:
        job().wait(timeout=90)
    assert str(failed.value).splitlines()[0] == (
        f"job {job_id} ({job().info().name}) could not publish its output: the reduce was "
        "interrupted by server restarts 2 times, so it is not started again"
    )
    assert sorted(os.listdir(out_dir)) == [".skybatch"]  # the temp file is gone

    # The committed batches were kept: a resume (after the cause is fixed) publishes.
    job().resume(stream=False)
    assert job().wait(timeout=90).info().status == "SUCCEEDED"
    assert read_jsonl(out_dir / "out.jsonl") == expected(rows)
    assert sorted(os.listdir(out_dir)) == ["out.jsonl"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs, unmounted afterwards."""
    with tmpfs(tmp_path / "small", "2m") as mnt:
        yield mnt


def test_reduce_onto_a_full_disk(deployment: Deployment, tmp_path: Path, small_disk: Path) -> None:
    deployment.pool("pool", workers=2, tmp=tmp_path)
    out = small_disk / "out.jsonl"
    # 1.2 MB of parts fit on the 2 MB disk; the merged copy beside them does not.
    rows = [{"i": i, "text": "x" * 4000} for i in range(300)]
    job = ds(write_jsonl(tmp_path / "in.jsonl", rows)).map(
        upper, pool_name="pool", batch_size=30, output=skybatch.JsonWriter(str(out)),
        stream=False,
    )  # fmt: skip
    with pytest.raises(skybatch.JobFailedError) as failed:
        job.wait(timeout=90)
    first_line = str(failed.value).splitlines()[0]
    assert first_line == (
        f"job {job.job_id} could not publish its output: cannot write {out}: "
        "no space left on device"
    )
    assert f"skybatch jobs resume {job.job_id}" in str(failed.value)
    # Nothing partial is published, and no temp file is left.
    assert sorted(os.listdir(small_disk)) == [".skybatch"]

    # The committed batches were kept: with room, a resume publishes the output.
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    job.resume(stream=False)
    assert job.wait(timeout=90).info().status == "SUCCEEDED"
    assert read_jsonl(out) == expected(rows)
    assert sorted(os.listdir(small_disk)) == ["out.jsonl"]


def test_a_link_planted_at_the_reduce_temp_name_is_not_written_through(
    deployment: Deployment, tmp_path: Path
) -> None:
    deployment.pool("pool", workers=1, tmp=tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # a directory everyone writes (not sticky)
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    precious.chmod(0o600)
    # Another user knows the deployment id (from an earlier job's staging area) and
    # plants the reduce's temporary name as a link to our file.
    dep = deployment.home.read_deployment_id()
    os.symlink(precious, shared / f".out.jsonl.skybatch-{dep}-1.tmp")
    rows = rows_of(6)
    job = ds(write_jsonl(tmp_path / "in.jsonl", rows)).map(
        upper, pool_name="pool", batch_size=2, stream=False,
        output=skybatch.JsonWriter(str(shared / "out.jsonl")),
    )  # fmt: skip
    assert job.wait(timeout=60).info().status == "SUCCEEDED"
    assert precious.read_text() == "keep me"
    assert not (shared / "out.jsonl").is_symlink()
    assert read_jsonl(shared / "out.jsonl") == expected(rows)
    assert sorted(os.listdir(shared)) == ["out.jsonl"]
