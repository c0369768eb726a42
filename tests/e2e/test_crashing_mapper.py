"""A mapper that kills its own process (SIGSEGV) on a batch every time uses up its retries."""

from __future__ import annotations

from pathlib import Path

import pytest

import skybatch
from tests.helpers import Deployment, write_jsonl


@skybatch.remote_function
def segfault_on_row_5():
    import os
    import resource
    import signal

    for batch in skybatch.load():
        if any(item["i"] == 5 for item in batch):
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the workdir
            os.kill(os.getpid(), signal.SIGSEGV)
        skybatch.save_results([dict(item) for item in batch])


@pytest.mark.parametrize("max_retries", [0, 1])
def test_a_mapper_that_segfaults_every_time_fails_the_job_naming_the_signal(
    deployment: Deployment, tmp_path: Path, max_retries: int
) -> None:
    deployment.pool("pool", workers=2, tmp=tmp_path)
    data = write_jsonl(tmp_path / "data.jsonl", [{"i": i} for i in range(30)])
    out = tmp_path / "out.jsonl"
    with pytest.raises(skybatch.JobFailedError) as e:
        skybatch.Dataset(skybatch.JsonReader(str(data))).map(
            segfault_on_row_5,
            pool_name="pool",
            batch_size=10,
            output=skybatch.JsonWriter(str(out)),
            max_retries=max_retries,
            retry_backoff=0.1,
        )
    lines = str(e.value).splitlines()
    job_id = e.value.job_id
    # The first death may be a kill from outside and is free; every one after costs a
    # retry (before: ten free deaths, then two more: "failed 12 times"). The message says
    # so: before, "failed 2 times (max_retries=0)" read as a contradiction.
    assert lines[0] == (
        f"job {job_id} (segfault_on_row_5) failed: batch 0 (rows 0-9) failed "
        f"{max_retries + 2} times (max_retries={max_retries}; the first death by a signal "
        "is free)."
    )
    assert lines.count("the runner was killed by SIGSEGV (signal 11) during batch 0") == 2
    info = skybatch.Job(job_id or "").info()
    assert (info.lost, info.retries) == (1, max_retries)
    assert not out.exists()
    print(e.value)
