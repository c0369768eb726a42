"""Partial results, resume after cancel or failure, batch_timeout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import skybatch
from tests.helpers import Deployment, read_jsonl, wait_for, write_jsonl

FAST = {"retry_backoff": 0.05}


@skybatch.remote_function
def slow_marked():
    import time

    for batch in skybatch.load():
        time.sleep(batch[0]["sleep"])
        print(f"ran batch at row {batch[0]['i']}", flush=True)
        skybatch.save_results([{"i": item["i"], "text": item["text"].upper()} for item in batch])


@skybatch.remote_function
def breaks_on_bad():
    for batch in skybatch.load():
        if any(item["text"] == "bad" for item in batch):
            raise RuntimeError("cannot handle 'bad'")
        skybatch.save_results([{"i": item["i"], "text": item["text"].upper()} for item in batch])


@skybatch.remote_function
def fixed():
    for batch in skybatch.load():
        skybatch.save_results([{"i": item["i"], "text": item["text"].upper()} for item in batch])


@skybatch.remote_function
def hangs_on_zero():
    import time

    for batch in skybatch.load():
        if batch[0]["i"] == 0:
            time.sleep(60)
        skybatch.save_results([{"i": item["i"]} for item in batch])


def expected(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    return [{"i": r["i"], "text": str(r["text"]).upper()} for r in rows]


def ds(path: Path) -> skybatch.Dataset:
    return skybatch.Dataset(skybatch.JsonReader(str(path)))


def test_resume_after_cancel_runs_only_missing_batches(shared: Deployment, tmp_path: Path) -> None:
    rows = [{"i": i, "text": f"r{i}", "sleep": 0.15} for i in range(60)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    writer = skybatch.JsonWriter(str(tmp_path / "out.jsonl"))
    job = ds(data).map(slow_marked, pool_name="pool", batch_size=3, output=writer, stream=False)
    wait_for(lambda: job.info().committed_batches >= 4, message="some progress")
    job.cancel()
    with pytest.raises(skybatch.JobCancelledError, match=f"skybatch jobs resume {job.job_id}"):
        job.wait(timeout=30)
    # What committed before the cancel, and what did not.
    partial = writer.reduce_results(job_id=job.job_id)
    missing = {i for first, last in partial["missing"] for i in range(first, last + 1)}
    done_before = {r["i"] for r in read_jsonl(tmp_path / "out.jsonl")}
    assert done_before and missing and done_before | missing == set(range(60))

    proc = shared.cli("jobs", "resume", job.job_id)
    assert f"Job {job.job_id} succeeded." in proc.stdout
    assert read_jsonl(tmp_path / "out.jsonl") == expected(rows)
    assert not (tmp_path / ".skybatch").exists()
    logs = job.logs()
    for start in range(0, 60, 3):
        runs = len(re.findall(rf"ran batch at row {start}\n", logs))
        if start in done_before:
            assert runs == 1, f"batch at row {start} committed before the cancel but ran again"
        else:
            assert runs >= 1


def test_resume_after_failure_with_a_fixed_mapper(shared: Deployment, tmp_path: Path) -> None:
    rows = [{"i": i, "text": "bad" if i == 13 else f"r{i}"} for i in range(40)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out.jsonl"
    with pytest.raises(skybatch.JobFailedError) as e:
        ds(data).map(
            breaks_on_bad,
            pool_name="pool",
            batch_size=5,
            output=skybatch.JsonWriter(str(out)),
            **FAST,
        )
    job_id = e.value.job_id
    assert f'resume="{job_id}"' in str(e.value)
    assert not out.exists()
    job = ds(data).map(
        fixed, pool_name="pool", batch_size=5, output=skybatch.JsonWriter(str(out)), resume=job_id
    )
    assert job.job_id == job_id
    assert read_jsonl(out) == expected(rows)
    assert job.status() is skybatch.JobStatus.SUCCEEDED


def test_resume_refuses_another_batch_size_input_or_a_finished_job(
    shared: Deployment, tmp_path: Path
) -> None:
    rows = [{"i": i, "text": "bad" if i == 2 else f"r{i}"} for i in range(10)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = skybatch.JsonWriter(str(tmp_path / "out.jsonl"))
    with pytest.raises(skybatch.JobFailedError) as e:
        ds(data).map(breaks_on_bad, pool_name="pool", batch_size=5, output=out, max_retries=0)
    job_id = e.value.job_id
    with pytest.raises(
        skybatch.ConfigError, match=r"ran with batch_size=5; resume it with the same"
    ):
        ds(data).map(fixed, pool_name="pool", batch_size=4, output=out, resume=job_id)
    other = write_jsonl(tmp_path / "other.jsonl", rows)
    with pytest.raises(skybatch.ConfigError, match=r"resume it with\s+the same input"):
        ds(other).map(fixed, pool_name="pool", batch_size=5, output=out, resume=job_id)
    with open(data, "a") as f:
        f.write('{"i": 10, "text": "late"}\n')
    with pytest.raises(skybatch.ConfigError, match=r"changed since job .* ran"):
        ds(data).map(fixed, pool_name="pool", batch_size=5, output=out, resume=job_id)
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"i": 0, "text": "a"}])
    done = ds(ok).map(
        fixed,
        pool_name="pool",
        batch_size=1,
        output=skybatch.JsonWriter(str(tmp_path / "ok-out.jsonl")),
    )
    with pytest.raises(skybatch.ConflictError, match="already succeeded"):
        done.resume()


def test_batch_timeout_kills_the_runner_and_counts_as_failure(
    shared: Deployment, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", [{"i": i} for i in range(4)])
    with pytest.raises(skybatch.JobFailedError) as e:
        ds(data).map(
            hangs_on_zero,
            pool_name="pool",
            batch_size=2,
            max_retries=1,
            batch_timeout=1.0,
            output=skybatch.JsonWriter(str(tmp_path / "o.jsonl")),
            **FAST,
        )
    assert "batch 0 ran longer than batch_timeout=1s; its runner was killed" in str(e.value)
    assert "failed 2 times" in str(e.value)


@skybatch.remote_function
def poisoned():
    for batch in skybatch.load():
        for item in batch:
            if "POISON" in item["text"]:
                raise ValueError(f"poisoned row {item['i']}")
        skybatch.save_results([{"i": item["i"]} for item in batch])


def test_poison_rows_are_isolated_into_the_errors_file(shared: Deployment, tmp_path: Path) -> None:
    bad = {7, 23, 24, 61}
    rows = [{"i": i, "text": f"POISON {i}" if i in bad else f"ok {i}"} for i in range(80)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out.jsonl"
    job = ds(data).map(
        poisoned,
        pool_name="pool",
        batch_size=10,
        max_retries=1,
        max_failed_rows=4,
        output=skybatch.JsonWriter(str(out)),
        **FAST,
    )
    assert read_jsonl(out) == [{"i": i} for i in range(80) if i not in bad]
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert [e["row"] for e in errors] == sorted(bad)
    assert [e["input"] for e in errors] == [rows[i] for i in sorted(bad)]
    assert errors[0]["error"] == "ValueError: poisoned row 7"
    assert "raise ValueError(f\"poisoned row {item['i']}\")" in errors[0]["traceback"]
    assert job.info().failed_rows == 4 and job.status() is skybatch.JobStatus.SUCCEEDED


def test_too_many_poison_rows_fail_the_job(shared: Deployment, tmp_path: Path) -> None:
    rows = [{"i": i, "text": "POISON" if i % 5 == 0 else "ok"} for i in range(20)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out.jsonl"
    errors = skybatch.JsonWriter(str(tmp_path / "bad-rows.jsonl"))
    with pytest.raises(skybatch.JobFailedError, match=r"more than max_failed_rows=2 rows failed"):
        ds(data).map(
            poisoned,
            pool_name="pool",
            batch_size=4,
            max_retries=0,
            max_failed_rows=2,
            errors=errors,
            output=skybatch.JsonWriter(str(out)),
            **FAST,
        )
    assert not out.exists() and not (tmp_path / "bad-rows.jsonl").exists()
