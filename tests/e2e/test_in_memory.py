"""Dataset.from_items and jobs without output=: results come back to the caller."""

from __future__ import annotations

from pathlib import Path

import pytest

import skybatch
from skybatch.errors import ConfigError, ConflictError, JobFailedError, NotFoundError
from tests.helpers import Deployment, read_jsonl


@skybatch.remote_function
def square():
    import numpy as np

    for batch in skybatch.load():
        skybatch.save_results([{"n": r["n"], "sq": np.int64(r["n"]) ** 2} for r in batch])


@skybatch.remote_function
def fails_while_marked():
    import os

    for batch in skybatch.load():
        if any(r["n"] == 3 and os.path.exists(r["marker"]) for r in batch):
            raise RuntimeError("row 3 is marked")
        skybatch.save_results([{"n": r["n"]} for r in batch])


def test_items_in_results_out(shared: Deployment) -> None:
    ds = skybatch.Dataset.from_items([{"n": n} for n in range(25)])
    job = ds.map(square, pool_name="pool", batch_size=4)
    assert job.results() == [{"n": n, "sq": n * n} for n in range(25)]
    # Asking again gives the same rows: they stay with the job.
    assert job.results()[24] == {"n": 24, "sq": 576}


def test_results_removed_from_the_home_are_one_line_not_a_500(shared: Deployment) -> None:
    job = skybatch.Dataset.from_items([{"n": 1}]).map(square, pool_name="pool", batch_size=1)
    results = shared.root / "jobs" / str(job.job_id) / "results.jsonl"
    results.unlink()
    with pytest.raises(NotFoundError) as e:
        job.results()
    assert str(e.value) == (
        f"job {job.job_id}'s results are gone ({results} was removed, with the server's home "
        "or by hand); run the job again"
    )


def test_items_to_a_file_output_leave_no_staging(shared: Deployment, tmp_path: Path) -> None:
    ds = skybatch.Dataset.from_items([{"n": n} for n in range(5)])
    job = ds.map(square, pool_name="pool", batch_size=2,
                 output=skybatch.JsonWriter(str(tmp_path / "o.jsonl")))  # fmt: skip
    assert read_jsonl(tmp_path / "o.jsonl")[4] == {"n": 4, "sq": 16}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl"]
    with pytest.raises(ConfigError) as e:
        job.results()
    assert str(e.value) == (
        f"job {job.job_id} wrote its results to {tmp_path / 'o.jsonl'}; read them there "
        "(job.results() is for jobs without output=)"
    )


def test_bad_items_are_refused_before_submit(shared: Deployment) -> None:
    with pytest.raises(ConfigError, match=r"item 1 is a str; each item must be a dict"):
        skybatch.Dataset.from_items([{"a": 1}, "b"])
    with pytest.raises(ConfigError, match=r"item 0 cannot be sent as JSON"):
        skybatch.Dataset.from_items([{"a": {1, 2}}])
    with pytest.raises(ConfigError, match=r"got no items"):
        skybatch.Dataset.from_items([])


def test_failed_in_memory_job_resumes_to_full_results(shared: Deployment, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    marker.write_text("")
    items = [{"n": n, "marker": str(marker)} for n in range(8)]
    ds = skybatch.Dataset.from_items(items)
    with pytest.raises(JobFailedError, match="row 3 is marked") as e:
        ds.map(fails_while_marked, pool_name="pool", batch_size=2, max_retries=0)
    job = skybatch.Job(e.value.job_id)
    with pytest.raises(ConflictError, match=r"is FAILED; its results come back when it succeeds"):
        job.results()
    # Other items are another job.
    with pytest.raises(ConfigError, match=r"ran over other items"):
        skybatch.Dataset.from_items(items[:3]).map(
            fails_while_marked, pool_name="pool", batch_size=2, resume=e.value.job_id
        )
    marker.unlink()
    again = skybatch.Dataset.from_items(items).map(
        fails_while_marked, pool_name="pool", batch_size=2, resume=e.value.job_id
    )
    assert again.job_id == e.value.job_id
    assert again.results() == [{"n": n} for n in range(8)]
