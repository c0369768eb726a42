"""Failover: time from a worker's death to its batch running on another worker (local provider).

    python bench/failover.py [--trials 5]

Each trial runs a job whose batches take 3 s, SIGKILLs the agent that holds a
lease, and reads from the server's state (SQLite, read-only) when that batch
was leased again. Prints each trial and the median.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import skybatch


@skybatch.remote_function
def slow():
    import time

    for batch in skybatch.load():
        time.sleep(3)
        skybatch.save_results([{"i": item["i"]} for item in batch])


def leases(db: Path, job: int) -> list[tuple[int, int, float, str]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute(
            "SELECT a.batch, w.idx, a.leased_at, a.status FROM attempts a "
            "JOIN workers w ON w.id = a.worker_id WHERE a.job_id=? ORDER BY a.id",
            (job,),
        ).fetchall()
    finally:
        con.close()


def trial(tmp: Path, n: int) -> float:
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(4)))
    job = skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        slow,
        pool_name="failover",
        batch_size=1,
        stream=False,
        output=skybatch.JsonWriter(str(tmp / f"out{n}.jsonl")),
    )
    db = Path(os.environ["SKYBATCH_HOME"]) / "state.db"
    while not leases(db, int(job.job_id)):
        time.sleep(0.01)
    batch, index, _, _ = leases(db, int(job.job_id))[0]
    pid = next(w.pid for w in skybatch.pool_status("failover")[0].worker_list if w.index == index)
    assert pid is not None
    killed = time.time()
    os.killpg(pid, signal.SIGKILL)
    while True:
        again = [r for r in leases(db, int(job.job_id)) if r[0] == batch and r[2] > killed]
        if again:
            delay = again[0][2] - killed
            break
        time.sleep(0.005)
    job.wait()
    # Let the pool heal before the next trial.
    while skybatch.pool_status("failover")[0].ready < 3:
        time.sleep(0.1)
    return delay


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="skybatch-failover-"))
    os.environ["SKYBATCH_HOME"] = str(tmp / "home")
    from skybatch.client.api import close_clients
    from skybatch.client.launcher import stop_server

    try:
        (tmp / "pool.yaml").write_text("pool:\n  workers: 3\n")
        skybatch.pool_apply(str(tmp / "pool.yaml"), "failover")
        delays = []
        for n in range(args.trials):
            delays.append(trial(tmp, n))
            print(f"trial {n}: batch re-leased {delays[-1]:.3f}s after its worker was killed")
        print(
            json.dumps(
                {"median_s": round(statistics.median(delays), 3), "max_s": round(max(delays), 3)}
            )
        )
        skybatch.pool_down("failover")
    finally:
        close_clients()
        stop_server()


if __name__ == "__main__":
    main()
