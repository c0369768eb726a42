"""Indexing cannot take the server down: endless lines, cancels, restarts mid-index."""

from __future__ import annotations

import os
import signal
import time
from functools import partial
from pathlib import Path

import httpx
import psutil
import pytest

import skybatch
from skybatch.config import read_server_info
from tests.helpers import Deployment, wait_for

MB = 1024 * 1024
LIMIT = 32 * MB


@skybatch.remote_function
def echo():
    for batch in skybatch.load():
        skybatch.save_results([dict(item) for item in batch])


def submit(data: str, out: Path) -> skybatch.Job:
    return skybatch.Dataset(skybatch.JsonReader(data)).map(
        echo,
        pool_name="pool",
        batch_size=10,
        stream=False,
        output=skybatch.JsonWriter(str(out)),
    )


def too_long(url: str, line: int, byte: int) -> str:
    return (
        f"{url} line {line} (byte {byte}) is longer than the limit of {LIMIT} bytes; check "
        "that the file is JSON Lines (one object per line), or raise the limit: set "
        "SKYBATCH_MAX_LINE_BYTES in the server's environment and restart the server"
    )


def watch_until_finished(deployment: Deployment, job: skybatch.Job) -> tuple[int, float]:
    """Sample the server's RSS and /v1/health's answer time until the job ends:
    (peak RSS, slowest health answer). A server past the bound is killed, by PID, at once."""
    info = read_server_info(deployment.home)
    assert info is not None
    server = psutil.Process(info.pid)
    peak, slowest = 0, 0.0
    deadline = time.monotonic() + 90
    with httpx.Client(base_url=info.url, timeout=5) as http:
        while time.monotonic() < deadline:
            peak = max(peak, server.memory_info().rss)
            if peak > LIMIT + 150 * MB:
                os.kill(info.pid, signal.SIGKILL)  # keep the machine alive; the test fails below
                break
            started = time.monotonic()
            assert http.get("/v1/health").status_code == 200
            slowest = max(slowest, time.monotonic() - started)
            if job.status().finished:
                break
            time.sleep(0.05)
    return peak, slowest


def test_endless_lines_fail_the_job_while_the_server_stays_small_and_responsive(
    deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SKYBATCH_MAX_LINE_BYTES", str(LIMIT))  # read by the server it starts
    deployment.pool("pool", workers=1, tmp=tmp_path)
    big = tmp_path / "big.jsonl"
    head = b'{"i": 0}\n{"i": 1}\n\n{"i": 2}\n'
    try:
        with open(big, "wb") as f:
            f.write(head + b'{"text": "')
            f.truncate(300 * MB)  # sparse: one 300 MB line of NUL bytes, no newline
        # /dev/zero has no size to check: it is accepted, and fails at the limit like a file.
        for data, line, byte in [("/dev/zero", 1, 0), (str(big), 5, len(head))]:
            job = submit(data, tmp_path / "out.jsonl")
            peak, slowest = watch_until_finished(deployment, job)
            print(f"{data}: server peak RSS {peak / MB:.0f} MB, slowest health {slowest:.3f}s")
            assert peak < LIMIT + 150 * MB, f"server RSS reached {peak / MB:.0f} MB"
            assert slowest < 1.0
            info = job.info()
            assert info.status == "FAILED"
            assert info.error is not None
            assert info.error.splitlines()[0] == too_long(data, line, byte)
            assert not (tmp_path / "out.jsonl").exists()
            assert not (tmp_path / ".skybatch").exists()
    finally:
        big.unlink(missing_ok=True)


def blank_lines(path: Path) -> Path:
    """An input of 100 MB of blank lines: indexing that finds no batch for many seconds."""
    with open(path, "wb") as f:
        for _ in range(100):
            f.write(b"\n" * MB)
    return path


def server_reads(deployment: Deployment, path: Path) -> bool:
    """Whether the server has ``path`` open: it is indexing it."""
    pid = deployment.server_pid()
    assert pid is not None
    try:
        return any(f.path == str(path) for f in psutil.Process(pid).open_files())
    except psutil.NoSuchProcess:
        return False


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_cancel_stops_indexing_that_finds_no_batch(deployment: Deployment, tmp_path: Path) -> None:
    deployment.pool("pool", workers=1, tmp=tmp_path)
    data = blank_lines(tmp_path / "data.jsonl")
    job = submit(str(data), tmp_path / "out.jsonl")
    wait_for(lambda: server_reads(deployment, data), timeout=30, message="indexing under way")
    cancelled_at = time.monotonic()
    job.cancel()
    assert job.status() is skybatch.JobStatus.CANCELLED
    # The server stops reading the input (before: it read on, for minutes).
    wait_for(lambda: not server_reads(deployment, data), timeout=5, message="indexing to stop")
    print(f"indexing stopped {time.monotonic() - cancelled_at:.2f}s after the cancel")
    info = job.info()
    assert (info.status, info.total_batches) == ("CANCELLED", 0)


def test_indexing_interrupted_by_restarts_is_not_started_again(
    deployment: Deployment, tmp_path: Path
) -> None:
    deployment.pool("pool", workers=1, tmp=tmp_path)
    data = blank_lines(tmp_path / "data.jsonl")
    job = submit(str(data), tmp_path / "out.jsonl")
    # The server dies while indexing finds no batch, as it would of a line too big for
    # its memory; twice.
    for _ in range(2):
        wait_for(lambda: server_reads(deployment, data), timeout=30, message="indexing")
        pid = deployment.server_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(partial(gone, pid), timeout=10, message="the server to die")
        deployment.cli("server", "start")
    wait_for(lambda: job.status().finished, timeout=30, message="the job to end")
    info = job.info()
    assert info.status == "FAILED"
    assert info.error is not None
    assert info.error.splitlines()[0] == (
        f"job {job.job_id} ({info.name}) failed: indexing its input {data} was interrupted by "
        "server restarts 2 times without finding a new batch, so it is not started again; "
        "check the input and submit a new job, or resume this one "
        f"(`skybatch jobs resume {job.job_id}`) if the restarts had another cause"
    )
    assert not server_reads(deployment, data)


def test_a_compressed_input_in_one_huge_batch_keeps_the_server_small(
    deployment: Deployment, tmp_path: Path
) -> None:
    import gzip

    deployment.pool("pool", workers=1, tmp=tmp_path)
    rows = 64 * 1024
    pad = "p" * 1000
    data = tmp_path / "data.jsonl.gz"
    with gzip.open(data, "wb", compresslevel=1) as f:  # 64 MB plain, 0.4 MB compressed
        for start in range(0, rows, 1024):
            f.write(
                "".join(
                    f'{{"i": {i}, "pad": "{pad}"}}\n' for i in range(start, start + 1024)
                ).encode()
            )
    info = read_server_info(deployment.home)
    assert info is not None
    server = psutil.Process(info.pid)
    baseline = server.memory_info().rss
    out = tmp_path / "out.jsonl"
    job = skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        echo, pool_name="pool", batch_size=10**9, stream=False, output=skybatch.JsonWriter(str(out))
    )
    peak = baseline
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not job.status().finished:
        peak = max(peak, server.memory_info().rss)
        time.sleep(0.02)
    print(f"server RSS {baseline / MB:.0f} MB before, peak {peak / MB:.0f} MB")
    # Before, the spill held the whole decompressed batch and copied it: +149 MB here, and
    # as much as the input held (300 MB plain: 799 MB) whatever the line limit.
    assert peak - baseline < 48 * MB, f"server RSS grew by {(peak - baseline) / MB:.0f} MB"
    job_info = job.info()
    assert (job_info.status, job_info.total_batches) == ("SUCCEEDED", 1)
    with open(out, "rb") as f:
        assert sum(1 for _ in f) == rows
    assert not (tmp_path / ".skybatch").exists()
