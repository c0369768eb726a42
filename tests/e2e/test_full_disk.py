"""A full disk never stalls a job silently: the job says which path has no space
left within seconds, keeps its batches (no retries burned), and finishes exactly
once space returns. SKYBATCH_HOME or the output sit on small tmpfs mounts made
here (root only), filled by the test with a filler file."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import skybatch
from tests.helpers import Deployment, deployment_at, read_jsonl, tmpfs, wait_for, write_jsonl


def fill(directory: Path) -> Path:
    """Fill ``directory``'s file system to the last byte with one file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1024 * 1024, 4096, 1):
            block = b"\0" * size
            for _ in range(100_000):
                try:
                    f.write(block)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    break
    return filler


@skybatch.remote_function
def slow_and_chatty() -> None:
    import time

    for batch in skybatch.load():
        print(f"batch from {batch[0]['i']}: " + "log " * 2000)
        time.sleep(0.3)
        skybatch.save_results([{"i": item["i"], "text": item["text"]} for item in batch])


def rows(n: int, width: int = 10) -> list[dict[str, object]]:
    return [{"i": i, "text": f"{i:0{width}d}"} for i in range(n)]


def _health(job: skybatch.Job) -> str:
    return job.info().health or ""


def test_full_home_shows_on_the_job_and_the_job_finishes_when_space_returns(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    with tmpfs(home, "8m", mode=0o700, busy_wait=10), deployment_at(home) as d:
        d.pool("p", workers=1, tmp=tmp_path)
        data = write_jsonl(tmp_path / "d.jsonl", rows(40))
        out = tmp_path / "o.jsonl"
        job = skybatch.Dataset(skybatch.JsonReader(str(data))).map(
            slow_and_chatty,
            pool_name="p",
            batch_size=2,
            stream=False,
            output=skybatch.JsonWriter(str(out)),
        )
        wait_for(lambda: job.info().committed_batches >= 2, message="first commits")
        filler = fill(home)
        filled_at = time.monotonic()
        health = wait_for(
            lambda: "no space left" in _health(job).lower() and _health(job),
            timeout=10,
            message="a health line saying the home has no space left",
        )
        assert str(home) in health, health
        assert time.monotonic() - filled_at < 10
        queue = d.cli("jobs", "queue").stdout
        assert f"Job {job.job_id}: " in queue and "no space left" in queue.lower(), queue
        assert job.info().status == "RUNNING"
        time.sleep(2)  # a while on a full disk: nothing may give up meanwhile

        filler.unlink()
        job.wait(timeout=60)
        view = job.info()
        assert view.status == "SUCCEEDED" and view.health is None
        assert view.retries == 0 and view.failed_batches == 0
        assert read_jsonl(out) == rows(40)
        logs = job.logs()
        # What could not be stored while the disk was full is said, not silently lost.
        assert "bytes of this worker's output were dropped here" in logs
        assert "batch from 38: " in logs


def test_full_output_shows_on_the_job_and_the_job_finishes_when_space_returns(
    deployment: Deployment, tmp_path: Path
) -> None:
    deployment.pool("p", workers=2, tmp=tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", rows(40, width=20_000))  # 40 KB parts
    with tmpfs(tmp_path / "out", "8m", mode=0o700, busy_wait=10) as outdir:
        out = outdir / "o.jsonl"
        job = skybatch.Dataset(skybatch.JsonReader(str(data))).map(
            slow_and_chatty,
            pool_name="p",
            batch_size=2,
            stream=False,
            output=skybatch.JsonWriter(str(out)),
        )
        wait_for(lambda: job.info().committed_batches >= 2, message="first commits")
        filler = fill(outdir)
        filled_at = time.monotonic()
        health = wait_for(
            lambda: "no space left" in _health(job).lower() and _health(job),
            timeout=10,
            message="a health line saying the output has no space left",
        )
        assert str(outdir) in health, health
        assert time.monotonic() - filled_at < 10
        queue = deployment.cli("jobs", "queue").stdout
        assert f"Job {job.job_id}: " in queue and "no space left" in queue.lower(), queue
        stalled = job.info()
        time.sleep(3)  # writers keep retrying; nothing is failed or retried meanwhile
        view = job.info()
        assert view.status == "RUNNING" and view.committed_batches == stalled.committed_batches
        assert view.retries == 0 and view.failed_batches == 0 and view.health

        filler.unlink()
        job.wait(timeout=60)
        view = job.info()
        assert view.status == "SUCCEEDED" and view.health is None
        assert view.retries == 0 and view.failed_batches == 0
        assert read_jsonl(out) == rows(40, width=20_000)
        deployment.stop()  # its processes, by PID, before the mount goes
