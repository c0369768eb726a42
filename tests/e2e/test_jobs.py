"""Jobs end to end: client, server, local provider, agents, runners, JSONL in and out."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import skybatch
from tests.helpers import Deployment, read_jsonl, wait_for, write_jsonl

FAST = {"retry_backoff": 0.05}


@skybatch.remote_function
def double_text():
    for batch in skybatch.load():
        skybatch.save_results([{"output": item["text"] * 2} for item in batch])


@skybatch.remote_function
def tag_with_pid():
    import os

    for batch in skybatch.load():
        skybatch.save_results([{"i": item["i"], "pid": os.getpid()} for item in batch])


@skybatch.remote_function
def raises_on_seven():
    for batch in skybatch.load():
        for item in batch:
            if item["i"] == 7:
                raise ValueError(f"cannot handle row {item['i']}")
        skybatch.save_results([{"i": item["i"]} for item in batch])


@skybatch.remote_function
def one_result_short():
    for batch in skybatch.load():
        skybatch.save_results([{"i": item["i"]} for item in batch][:-1])


@skybatch.remote_function
def returns_a_set():
    for batch in skybatch.load():
        skybatch.save_results([{"i": item["i"], "tags": {1, 2}} for item in batch])


@skybatch.remote_function
def slow_copy():
    import time

    for batch in skybatch.load():
        time.sleep(batch[0].get("sleep", 0.05))
        skybatch.save_results([{"i": item["i"]} for item in batch])


@skybatch.remote_function
def waits_for_go_on_last_row():
    import os
    import time

    for batch in skybatch.load():
        if any(item["i"] == item["last"] for item in batch):
            deadline = time.monotonic() + 60
            while not os.path.exists(batch[0]["go"]) and time.monotonic() < deadline:
                time.sleep(0.02)
        skybatch.save_results([{"i": item["i"]} for item in batch])


@skybatch.remote_function
def counts_its_setups():
    import builtins
    import os

    # Module state lives as long as the runner's process; the mapper's setup (this
    # function's body before the loop) runs once per job.
    builtins.skybatch_setups = getattr(builtins, "skybatch_setups", 0) + 1
    print(f"setup {builtins.skybatch_setups} in {os.getpid()}")
    for batch in skybatch.load():
        skybatch.save_results(
            [
                {"i": item["i"], "pid": os.getpid(), "setup": builtins.skybatch_setups}
                for item in batch
            ]
        )


@skybatch.remote_function
def prints_and_copies():
    for batch in skybatch.load():
        print(f"processing rows from {batch[0]['i']}")
        skybatch.save_results([{"i": item["i"]} for item in batch])


def rows(n: int, **extra: object) -> list[dict[str, object]]:
    return [{"i": i, "text": f"t{i}", **extra} for i in range(n)]


def test_quickstart_output_exact(shared: Deployment, tmp_path: Path) -> None:
    data = write_jsonl(
        tmp_path / "data.jsonl", [{"text": t} for t in ["hello", "world", "sky", "batch"]]
    )
    ds = skybatch.Dataset(skybatch.JsonReader(str(data)))
    job = ds.map(
        double_text,
        pool_name="pool",
        batch_size=2,
        output=skybatch.JsonWriter(str(tmp_path / "out.jsonl")),
    )
    assert (tmp_path / "out.jsonl").read_text() == (
        '{"output":"hellohello"}\n{"output":"worldworld"}\n'
        '{"output":"skysky"}\n{"output":"batchbatch"}\n'
    )
    assert job.status() is skybatch.JobStatus.SUCCEEDED
    assert not (tmp_path / ".skybatch").exists(), "staging area left behind after success"


def test_ten_thousand_rows_over_three_workers_in_order(shared: Deployment, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", rows(10_000))
    out = tmp_path / "out.jsonl"
    skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        tag_with_pid, pool_name="pool", batch_size=100, output=skybatch.JsonWriter(str(out))
    )
    result = read_jsonl(out)
    assert [r["i"] for r in result] == list(range(10_000))
    assert len({r["pid"] for r in result}) == 3, "all three workers should have taken batches"
    info = skybatch.jobs_queue()[-1]
    assert (info.committed_batches, info.total_batches, info.committed_rows) == (100, 100, 10_000)


def test_relative_paths_resolve_against_the_callers_cwd(
    shared: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", [{"text": "a"}])
    skybatch.Dataset(skybatch.JsonReader("data.jsonl")).map(
        double_text, pool_name="pool", batch_size=1, output=skybatch.JsonWriter("rel.jsonl")
    )
    assert read_jsonl(tmp_path / "rel.jsonl") == [{"output": "aa"}]


def test_column_selection(shared: Deployment, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", rows(5))
    out = tmp_path / "out.jsonl"
    skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        tag_with_pid,
        pool_name="pool",
        batch_size=2,
        output=skybatch.JsonWriter(str(out), column="i"),
    )
    assert read_jsonl(out) == [{"i": i} for i in range(5)]


def test_selected_column_missing_is_an_error_naming_it(shared: Deployment, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", rows(3))
    with pytest.raises(skybatch.JobFailedError) as e:
        skybatch.Dataset(skybatch.JsonReader(str(data))).map(
            tag_with_pid,
            pool_name="pool",
            batch_size=3,
            max_retries=0,
            output=skybatch.JsonWriter(str(tmp_path / "o.jsonl"), column=["i", "score"]),
        )
    assert "has no column 'score'" in str(e.value)
    assert "batch 0" in str(e.value)


def test_mapper_error_fails_job_with_traceback_after_retries(
    shared: Deployment, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", rows(20))
    out = tmp_path / "out.jsonl"
    with pytest.raises(skybatch.JobFailedError) as e:
        skybatch.Dataset(skybatch.JsonReader(str(data))).map(
            raises_on_seven,
            pool_name="pool",
            batch_size=5,
            output=skybatch.JsonWriter(str(out)),
            **FAST,
        )
    message = str(e.value)
    job_id = e.value.job_id
    assert f"job {job_id} (raises_on_seven) failed: batch 1 (rows 5-9) failed 4 times" in message
    assert "First failure (try 1" in message and "Last failure (try 4" in message
    assert "ValueError: cannot handle row 7" in message
    assert "raise ValueError(f\"cannot handle row {item['i']}\")" in message  # the user's line
    assert f'reduce_results(job_id="{job_id}")' in message
    assert not out.exists(), "a failed job must not publish a final output"
    assert skybatch.Job(job_id).status() is skybatch.JobStatus.FAILED


def test_partial_results_recovered_after_failure(shared: Deployment, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", rows(20))
    out = tmp_path / "out.jsonl"
    writer = skybatch.JsonWriter(str(out))
    with pytest.raises(skybatch.JobFailedError) as e:
        skybatch.Dataset(skybatch.JsonReader(str(data))).map(
            raises_on_seven, pool_name="pool", batch_size=5, output=writer, **FAST
        )
    job = skybatch.Job(e.value.job_id)
    # Batches after the failed one may or may not have committed before the job failed.
    committed = job.info().committed_rows
    result = writer.reduce_results(job_id=e.value.job_id)
    assert result["missing"][0] == [5, 9]
    assert result["rows"] == committed
    got = [r["i"] for r in read_jsonl(out)]
    assert got[:5] == [0, 1, 2, 3, 4] and 7 not in got and got == sorted(got)
    writer.cleanup(job_id=e.value.job_id)
    assert not (tmp_path / ".skybatch").exists()


def test_wrong_result_count_names_the_batch(shared: Deployment, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", rows(4))
    with pytest.raises(skybatch.JobFailedError) as e:
        skybatch.Dataset(skybatch.JsonReader(str(data))).map(
            one_result_short,
            pool_name="pool",
            batch_size=2,
            output=skybatch.JsonWriter(str(tmp_path / "o.jsonl")),
            **FAST,
        )
    pattern = r"batch (0 \(rows 0-1\)|1 \(rows 2-3\)): save_results\(\) got 1 results for 2 input"
    assert re.search(pattern, str(e.value))
    assert not (tmp_path / "o.jsonl").exists()


def test_non_json_result_names_key_and_type(shared: Deployment, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", rows(2))
    with pytest.raises(skybatch.JobFailedError) as e:
        skybatch.Dataset(skybatch.JsonReader(str(data))).map(
            returns_a_set,
            pool_name="pool",
            batch_size=2,
            max_retries=0,
            output=skybatch.JsonWriter(str(tmp_path / "o.jsonl")),
        )
    assert "key 'tags': a set cannot be written to JSON; use str, int" in str(e.value)


def test_two_jobs_at_once_share_the_pool(shared: Deployment, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", rows(60, sleep=0.02))
    jobs = [
        skybatch.Dataset(skybatch.JsonReader(str(data))).map(
            slow_copy,
            pool_name="pool",
            batch_size=5,
            stream=False,
            output=skybatch.JsonWriter(str(tmp_path / f"out{k}.jsonl")),
        )
        for k in range(2)
    ]
    for job in jobs:
        job.wait(timeout=120)
    for k in range(2):
        assert [r["i"] for r in read_jsonl(tmp_path / f"out{k}.jsonl")] == list(range(60))


def test_cancel_stops_job_and_pool_serves_next(shared: Deployment, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", rows(200, sleep=0.2))
    out = tmp_path / "out.jsonl"
    job = skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        slow_copy,
        pool_name="pool",
        batch_size=2,
        stream=False,
        output=skybatch.JsonWriter(str(out)),
    )
    wait_for(lambda: job.info().committed_batches >= 3, message="some batches to commit")
    skybatch.cancel(job.job_id)
    assert job.status() is skybatch.JobStatus.CANCELLED
    with pytest.raises(skybatch.JobCancelledError):
        job.wait(timeout=10)
    done = job.info().committed_batches
    assert done < 100
    assert not out.exists()
    # The pool is untouched and takes the next job at once.
    pool = skybatch.pool_status("pool")[0]
    assert pool.status == "READY" and pool.ready == 3
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": "x"}])
    skybatch.Dataset(skybatch.JsonReader(str(small))).map(
        double_text,
        pool_name="pool",
        batch_size=1,
        output=skybatch.JsonWriter(str(tmp_path / "next.jsonl")),
    )
    assert read_jsonl(tmp_path / "next.jsonl") == [{"output": "xx"}]
    assert job.info().committed_batches == done, "a cancelled job committed more batches"


def test_stream_false_returns_at_once_then_wait(shared: Deployment, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", rows(10))
    job = skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        double_text,
        pool_name="pool",
        batch_size=3,
        stream=False,
        output=skybatch.JsonWriter(str(tmp_path / "o.jsonl")),
    )
    assert job.status() in (
        skybatch.JobStatus.PENDING,
        skybatch.JobStatus.RUNNING,
        skybatch.JobStatus.REDUCING,
        skybatch.JobStatus.SUCCEEDED,
    )
    job.wait(timeout=60)
    assert job.status() is skybatch.JobStatus.SUCCEEDED
    assert len(read_jsonl(tmp_path / "o.jsonl")) == 10


def test_job_logs_hold_the_mappers_output(shared: Deployment, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", rows(4))
    job = skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        prints_and_copies,
        pool_name="pool",
        batch_size=2,
        output=skybatch.JsonWriter(str(tmp_path / "o.jsonl")),
    )

    def both_lines() -> str | None:
        text = shared.cli("jobs", "logs", job.job_id, "--no-follow").stdout
        ok = "processing rows from 0" in text and "processing rows from 2" in text
        return text if ok else None

    text = wait_for(both_lines, message="both batches' prints in the job log")
    assert "(worker-" in text


def test_worker_death_hands_batch_to_another(shared: Deployment, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", rows(120, sleep=0.1))
    out = tmp_path / "out.jsonl"
    job = skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        slow_copy,
        pool_name="pool",
        batch_size=2,
        stream=False,
        output=skybatch.JsonWriter(str(out)),
    )
    wait_for(lambda: job.info().committed_batches >= 4, message="progress before the kill")
    victim = skybatch.pool_status("pool")[0].worker_list[0]
    assert victim.pid is not None
    os.killpg(victim.pid, signal.SIGKILL)
    job.wait(timeout=120)
    assert [r["i"] for r in read_jsonl(out)] == list(range(120))
    # The pool replaces the lost worker and gets back to its size.
    wait_for(lambda: skybatch.pool_status("pool")[0].ready == 3, message="replacement worker")
    assert victim.pid not in {w.pid for w in skybatch.pool_status("pool")[0].worker_list}


def test_activate_env_runs_mapper_in_venv_without_skybatch(
    shared: Deployment, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    check = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import skybatch"], capture_output=True
    )
    assert check.returncode != 0, "the test venv must not have skybatch"
    data = write_jsonl(tmp_path / "data.jsonl", rows(4))
    out = tmp_path / "out.jsonl"
    skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        which_python,
        pool_name="pool",
        batch_size=2,
        output=skybatch.JsonWriter(str(out)),
        activate_env=f"source {venv}/bin/activate",
    )
    prefixes = {r["prefix"] for r in read_jsonl(out)}
    assert prefixes == {str(venv)}


@skybatch.remote_function
def which_python():
    import sys

    for batch in skybatch.load():
        skybatch.save_results([{"prefix": sys.prefix} for _ in batch])


def test_ctrl_c_free_concurrent_submits(shared: Deployment, tmp_path: Path) -> None:
    """Several threads submitting at once each get their own correct output."""
    data = write_jsonl(tmp_path / "data.jsonl", rows(30))
    errors: list[BaseException] = []

    def submit(k: int) -> None:
        try:
            skybatch.Dataset(skybatch.JsonReader(str(data))).map(
                tag_with_pid,
                pool_name="pool",
                batch_size=4,
                stream=False,
                output=skybatch.JsonWriter(str(tmp_path / f"c{k}.jsonl"), column="i"),
            ).wait(timeout=120)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=submit, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k in range(3):
        assert read_jsonl(tmp_path / f"c{k}.jsonl") == [{"i": i} for i in range(30)]


def test_failing_activate_env_fails_the_job_saying_so(shared: Deployment, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", rows(2))
    with pytest.raises(skybatch.JobFailedError) as e:
        skybatch.Dataset(skybatch.JsonReader(str(data))).map(
            double_text,
            pool_name="pool",
            batch_size=2,
            max_retries=1,
            output=skybatch.JsonWriter(str(tmp_path / "o.jsonl")),
            activate_env="source /nonexistent/venv/bin/activate",
            **FAST,
        )
    message = str(e.value)
    assert "the runner exited at start with code 97" in message
    assert "activate_env failed" in message and "/nonexistent/venv/bin/activate" in message


def test_logs_follow_until_the_job_ends(shared: Deployment, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", rows(12, sleep=0.1))
    job = skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        prints_slowly,
        pool_name="pool",
        batch_size=2,
        stream=False,
        output=skybatch.JsonWriter(str(tmp_path / "o.jsonl")),
    )
    proc = shared.cli("jobs", "logs", job.job_id, "--follow", timeout=60)
    assert job.status() is skybatch.JobStatus.SUCCEEDED, "--follow returns when the job ends"
    for start in range(0, 12, 2):
        assert f"slow batch from {start}" in proc.stdout
    worker_zero = shared.cli("jobs", "logs", job.job_id, "--worker", "0").stdout
    # Followed, the workers' lines interleave as they come; each keeps its tag and order.
    followed_zero = [
        line.removeprefix("(worker-0) ")
        for line in proc.stdout.splitlines()
        if line.startswith("(worker-0) ")
    ]
    assert "(worker-" not in worker_zero and worker_zero.splitlines() == followed_zero


@skybatch.remote_function
def prints_slowly():
    import time

    for batch in skybatch.load():
        time.sleep(batch[0]["sleep"])
        print(f"slow batch from {batch[0]['i']}", flush=True)
        skybatch.save_results([{"i": item["i"]} for item in batch])


def cut_first_part(tmp_path: Path, go: Path) -> tuple[skybatch.Job, Path]:
    """A 3-batch job whose last batch waits for ``go``, once its first two committed and
    batch 0's part was cut short, as a machine crash before writeback would leave it."""
    data = write_jsonl(
        tmp_path / "data.jsonl", [{"i": i, "last": 29, "go": str(go)} for i in range(30)]
    )
    out = tmp_path / "out.jsonl"
    job = skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        waits_for_go_on_last_row,
        pool_name="pool",
        batch_size=10,
        stream=False,
        output=skybatch.JsonWriter(str(out)),
    )
    wait_for(lambda: job.info().committed_batches == 2, message="two batches committed")
    staging = tmp_path / ".skybatch"
    # The first lease of a job is one batch: batch 0's part is a segment of its own.
    segments = [p for p in staging.rglob("segment.*.jsonl") if p.is_file()]
    first = [p for p in segments if p.read_bytes().startswith(b'{"i":0}')]
    assert len(first) == 1, sorted(staging.rglob("*"))
    with open(first[0], "r+b") as f:
        f.truncate(5)
    return job, out


def test_a_committed_part_lost_before_the_reduce_runs_its_batch_again(
    shared: Deployment, tmp_path: Path
) -> None:
    # Parts are not synced (a machine crash may lose them): the reduce checks each one
    # against the size its agent wrote, and runs a batch whose part is short again.
    go = tmp_path / "go"
    try:
        job, out = cut_first_part(tmp_path, go)
    finally:
        go.touch()
    job.wait(timeout=60)
    assert [r["i"] for r in read_jsonl(out)] == list(range(30))
    assert not (tmp_path / ".skybatch").exists()
    log = shared.home.server_log.read_text()
    assert (
        f"job {job.job_id}: the parts of 1 committed batches are missing or short (lost in a "
        "machine crash before they reached the disk?); they run again"
    ) in log
    assert job.info().committed_batches == 3


def test_jobs_of_one_mapper_in_a_row_share_a_runner_each_with_its_setup(
    deployment: Deployment, tmp_path: Path
) -> None:
    deployment.pool("one", workers=1)
    data = write_jsonl(tmp_path / "data.jsonl", rows(6))
    outs, logs = [], []
    for n in range(3):
        out = tmp_path / f"out{n}.jsonl"
        job = skybatch.Dataset(skybatch.JsonReader(str(data))).map(
            counts_its_setups,
            pool_name="one",
            batch_size=2,
            output=skybatch.JsonWriter(str(out)),
        )
        outs.append(read_jsonl(out))
        logs.append(job.logs())
    # One Python for the three jobs; the mapper called afresh for each.
    pids = {r["pid"] for rows_ in outs for r in rows_}
    assert len(pids) == 1
    pid = pids.pop()
    for n, rows_ in enumerate(outs):
        assert rows_ == [{"i": i, "pid": pid, "setup": n + 1} for i in range(6)]
        assert f"setup {n + 1} in {pid}" in logs[n]
        assert f"setup {n + 2} in" not in logs[n]


def test_reduce_results_leaves_out_a_lost_part_and_says_its_rows_are_missing(
    shared: Deployment, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    try:
        job, out = cut_first_part(tmp_path, go)
        job.cancel()
        result = skybatch.JsonWriter(str(out)).reduce_results(job_id=job.job_id)
    finally:
        go.touch()
    assert result == {"path": str(out), "rows": 10, "missing": [[0, 9], [20, 29]]}
    assert [r["i"] for r in read_jsonl(out)] == list(range(10, 20))


@skybatch.remote_function
def reports_threads():
    import os

    for batch in skybatch.load():
        skybatch.save_results([{"omp": os.environ.get("OMP_NUM_THREADS")} for _ in batch])


def test_workers_share_the_cores_for_numeric_threads(shared: Deployment, tmp_path: Path) -> None:
    # Left alone, each of the 3 workers' torch would take every core of the machine.
    data = write_jsonl(tmp_path / "data.jsonl", rows(3))
    out = tmp_path / "out.jsonl"
    skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        reports_threads, pool_name="pool", batch_size=1, output=skybatch.JsonWriter(str(out))
    )
    share = str(max(1, (os.cpu_count() or 1) // 3))
    assert read_jsonl(out) == [{"omp": share}] * 3
