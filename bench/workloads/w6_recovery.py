"""Workload 6: recovery. A job on 4 workers, run clean and then with one worker's agent
SIGKILLed (with its runner: the whole worker dies) about halfway through; the wall time the
kill adds, next to one batch's duration.

Each batch sleeps a fixed time, so the 2 cores are not what limits 4 workers and the added
time is the recovery's own: noticing the death, running its lost batches again, and the
pool's replacement worker starting. Both runs must publish the same rows (exactly once).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import skybatch
from bench.common import Env, median, rows_of, same_rows, target, write_rows

NUMBER = 6
TITLE = "Recovery: SIGKILL one of 4 workers mid-job"

POOL = "w6"
WORKERS = 4


@skybatch.remote_function
def sleepy() -> None:
    import time

    for batch in skybatch.load():
        time.sleep(batch[0]["sleep"])
        skybatch.save_results([{"i": item["i"]} for item in batch])


def sizes(smoke: bool) -> dict[str, Any]:
    if smoke:
        return {"batches": 40, "batch_size": 10, "sleep": 0.3, "workers": WORKERS}
    return {"batches": 80, "batch_size": 10, "sleep": 1.0, "workers": WORKERS}


def wait_ready(timeout: float = 60.0) -> None:
    """Until the pool is whole again (the killed worker replaced)."""
    deadline = time.monotonic() + timeout
    while skybatch.pool_status(POOL)[0].ready < WORKERS:
        if time.monotonic() > deadline:
            raise TimeoutError(f"pool {POOL} not back to {WORKERS} ready workers in {timeout}s")
        time.sleep(0.1)


def one_run(data: Path, out: Path, size: dict[str, Any], kill: bool) -> dict[str, Any]:
    wait_ready()
    start = time.perf_counter()
    job = skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        sleepy,
        pool_name=POOL,
        batch_size=size["batch_size"],
        output=skybatch.JsonWriter(str(out)),
        stream=False,
        overwrite=True,
    )
    killed: dict[str, Any] = {}
    if kill:
        deadline = time.monotonic() + 600
        while job.info().committed_batches < size["batches"] // 2:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job} did not reach half its batches")
            time.sleep(0.02)
        # A worker busy on a batch, so that the kill loses work.
        busy = [w for w in skybatch.pool_status(POOL)[0].worker_list if w.job == int(job) and w.pid]
        victim = busy[0]
        assert victim.pid is not None
        os.killpg(victim.pid, signal.SIGKILL)
        killed = {"at_s": round(time.perf_counter() - start, 2), "worker": victim.index}
    job.wait()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "lost": job.info().lost, **killed}


def run(env: Env) -> dict[str, Any]:
    size = sizes(env.smoke)
    report: dict[str, Any] = {"number": NUMBER, "title": TITLE, "size": size}
    if "skybatch" not in env.contenders:
        report.update(results={}, metrics={}, targets=[], equal_outputs=None)
        return report
    scratch = env.scratch("w6")
    rows = size["batches"] * size["batch_size"]
    data = write_rows(scratch / "in.jsonl", ({"i": i, "sleep": size["sleep"]} for i in range(rows)))
    session = env.skybatch()
    session.pool(POOL, WORKERS)
    clean, killed = [], []
    equal = True
    expected = [{"i": i} for i in range(rows)]
    for n in range(env.repeats):
        clean.append(one_run(data, scratch / f"clean{n}.jsonl", size, kill=False))
        killed.append(one_run(data, scratch / f"killed{n}.jsonl", size, kill=True))
        equal = equal and same_rows(rows_of(scratch / f"clean{n}.jsonl"), expected)
        # Exactly once: the killed run's rows are all there, none twice.
        equal = equal and same_rows(rows_of(scratch / f"killed{n}.jsonl"), expected)
    clean_s = median([r["seconds"] for r in clean])
    killed_s = median([r["seconds"] for r in killed])
    added = killed_s - clean_s
    # A batch's duration as run: the clean run's wall time spread over its batches.
    batch_s = clean_s * WORKERS / size["batches"]
    report["results"] = {
        "skybatch": {
            "seconds": round(clean_s, 3),
            "all": [round(r["seconds"], 3) for r in clean],
            "killed_seconds": round(killed_s, 3),
            "killed_all": [round(r["seconds"], 3) for r in killed],
            "rows_per_s": round(rows / clean_s, 1),
        }
    }
    report["metrics"] = {
        "added_s": round(added, 3),
        "batch_s": round(batch_s, 3),
        "killed_at_s": [r["at_s"] for r in killed],
        "batches_lost": [r["lost"] for r in killed],
    }
    report["targets"] = [
        target("added wall time (s)", round(added, 3), "<=", round(batch_s + 1, 3))
    ]
    report["equal_outputs"] = equal
    return report
