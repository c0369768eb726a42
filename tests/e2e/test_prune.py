"""Retention: `skybatch jobs prune` and skybatch.prune_jobs forget finished jobs only."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import skybatch
from tests.helpers import Deployment, wait_for


@skybatch.remote_function
def double_or_fail():
    import time

    for batch in skybatch.load():
        print("batch of", len(batch))
        if any(r.get("fail") for r in batch):
            time.sleep(1)  # after the other batch committed, so that parts are kept
            raise RuntimeError("asked to fail")
        skybatch.save_results([{"n": r["n"] * 2} for r in batch])


@skybatch.remote_function
def sleepy():
    import time

    for batch in skybatch.load():
        time.sleep(0.5)
        skybatch.save_results(batch)


def _rows(db: Path, job_id: int) -> int:
    conn = sqlite3.connect(db)
    try:
        return sum(
            conn.execute(f"SELECT count(*) FROM {table} WHERE {col}=?", (job_id,)).fetchone()[0]
            for table, col in (("jobs", "id"), ("batches", "job_id"), ("attempts", "job_id"))
        )
    finally:
        conn.close()


def test_prune_forgets_finished_jobs_and_their_files(
    deployment: Deployment, tmp_path: Path
) -> None:
    deployment.pool("p", workers=2, tmp=tmp_path)
    done = [
        int(
            skybatch.Dataset.from_items([{"n": 1}, {"n": 2}])
            .map(double_or_fail, pool_name="p", batch_size=1)
            .job_id
        )
        for _ in range(2)
    ]
    failed_job = skybatch.Dataset.from_items([{"n": 1}, {"n": 2, "fail": True}]).map(
        double_or_fail,
        pool_name="p",
        batch_size=1,
        max_retries=0,
        output=skybatch.JsonWriter(str(tmp_path / "out" / "o.jsonl")),
        stream=False,
    )
    failed = int(failed_job.job_id)
    wait_for(lambda: failed_job.status().value == "FAILED", message="the job to fail")
    assert list((tmp_path / "out" / ".skybatch").iterdir()), "it kept its committed part"
    running_job = skybatch.Dataset.from_items([{"n": n} for n in range(100)]).map(
        sleepy, pool_name="p", batch_size=1, stream=False
    )
    running = int(running_job.job_id)
    wait_for(lambda: running_job.status().value == "RUNNING", message="the job to run")
    home = deployment.root
    for job_id in done:
        assert (home / "jobs" / str(job_id)).is_dir() and (
            home / "logs" / "jobs" / str(job_id)
        ).is_dir()

    asked = deployment.cli("jobs", "prune", check=False)  # no answer to the question: no
    assert asked.returncode == 1 and "Aborted!" in asked.stderr
    assert [j.id for j in skybatch.jobs_queue()] == [*done, failed, running]

    out = deployment.cli("jobs", "prune", "--keep", "1", "-y").stdout
    assert out == "Pruned 2 finished job(s).\n"
    assert [j.id for j in skybatch.jobs_queue()] == [failed, running]
    for job_id in done:
        assert not (home / "jobs" / str(job_id)).exists()
        assert not (home / "logs" / "jobs" / str(job_id)).exists()
        assert _rows(deployment.home.db, job_id) == 0

    assert deployment.cli("jobs", "prune", "--older-than", "1", "-y").stdout == (
        "No jobs to prune.\n"
    )
    assert skybatch.prune_jobs() == [failed]
    assert not (tmp_path / "out" / ".skybatch").exists(), "its kept parts went with it"
    assert [(j.id, j.status) for j in skybatch.jobs_queue()] == [(running, "RUNNING")]

    running_job.cancel()
    assert skybatch.prune_jobs(older_than_days=0) == [running]
    assert skybatch.jobs_queue() == []
