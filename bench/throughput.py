"""Throughput and latency baseline: skybatch against a plain loop, in the same run.

    python bench/throughput.py [--rows 1000000] [--batch-size 1000] [--workers 2]

Measures, on a fresh deployment in a temporary SKYBATCH_HOME:

- rows/s of a job that copies one field of each row (JSONL in, JSONL out) on a
  warm pool, next to a single-process loop doing the same transformation;
- the wall time of a 100-row job on the warm pool (median of 5);
- the peak RSS of the server and of one agent (and its runner) during the big job.

Results are printed and written to bench/out/throughput.json. Speed is reported
as a ratio to the baseline measured in this same run, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

import skybatch


@skybatch.remote_function
def copy_field():
    for batch in skybatch.load():
        skybatch.save_results([{"out": item["text"]} for item in batch])


def make_input(path: Path, rows: int) -> None:
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": i, "text": f"sample text number {i}"}) + "\n")


def baseline(src: Path, dst: Path) -> float:
    """The same transformation in one process, with the same JSON library and format."""
    start = time.perf_counter()
    with open(src, "rb") as fin, open(dst, "w") as fout:
        for line in fin:
            row = json.loads(line)
            out = json.dumps({"out": row["text"]}, ensure_ascii=False, separators=(",", ":"))
            fout.write(out + "\n")
    return time.perf_counter() - start


class PeakRss:
    """Samples the RSS of some processes every 50 ms; keeps the peak of each."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for name, proc in self.procs.items():
                try:
                    rss = proc.memory_info().rss
                    if name == "agent":
                        rss_children = [c.memory_info().rss for c in proc.children()]
                        self.peak["runner"] = max(self.peak.get("runner", 0), *rss_children, 0)
                    self.peak[name] = max(self.peak[name], rss)
                except psutil.Error:
                    pass

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User plus system CPU of these processes themselves (not their children)."""
    total = 0.0
    for proc in procs:
        times = proc.cpu_times()
        total += times.user + times.system
    return total


def run_job(data: Path, out: Path, batch_size: int) -> tuple[float, skybatch.Job]:
    start = time.perf_counter()
    job = skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        copy_field,
        pool_name="bench",
        batch_size=batch_size,
        stream=False,
        output=skybatch.JsonWriter(str(out)),
        overwrite=True,
    )
    job.wait()
    return time.perf_counter() - start, job


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="skybatch-bench-"))
    os.environ["SKYBATCH_HOME"] = str(tmp / "home")
    from skybatch.config import home

    try:
        from skybatch.client.launcher import stop_server
        from skybatch.config import read_server_info
    except ImportError:  # an older checkout, before the layers were split (to compare)
        from skybatch.server.daemon import read_server_info, stop_server  # type: ignore

    try:
        data = tmp / "data.jsonl"
        make_input(data, args.rows)
        size_mb = data.stat().st_size / 1e6
        base_s = baseline(data, tmp / "baseline.jsonl")

        (tmp / "pool.yaml").write_text(f"pool:\n  workers: {args.workers}\n")
        skybatch.pool_apply(str(tmp / "pool.yaml"), "bench")
        # Warm the pool's runners once, as a user's second job would find them.
        small = tmp / "small.jsonl"
        make_input(small, 100)
        run_job(small, tmp / "warm.jsonl", 10)

        info = read_server_info(home())
        assert info is not None
        agent_pid = skybatch.pool_status("bench")[0].worker_list[0].pid
        assert agent_pid is not None
        workers = skybatch.pool_status("bench")[0].worker_list
        agents = [psutil.Process(w.pid) for w in workers if w.pid]
        server = psutil.Process(info.pid)
        cpu_before = {"server": cpu_seconds([server]), "agents": cpu_seconds(agents)}
        with PeakRss({"server": info.pid, "agent": agent_pid}) as rss:
            job_s, job = run_job(data, tmp / "out.jsonl", args.batch_size)
        cpu_after = {"server": cpu_seconds([server]), "agents": cpu_seconds(agents)}
        batches = -(-args.rows // args.batch_size)
        assert job.info().committed_rows == args.rows
        same = (tmp / "out.jsonl").read_bytes() == (tmp / "baseline.jsonl").read_bytes()

        small_times = [run_job(small, tmp / "small-out.jsonl", 10)[0] for _ in range(5)]

        results: dict[str, Any] = {
            "rows": args.rows,
            "input_mb": round(size_mb, 1),
            "batch_size": args.batch_size,
            "workers": args.workers,
            "cpus": os.cpu_count(),
            "baseline_rows_per_s": round(args.rows / base_s),
            "skybatch_rows_per_s": round(args.rows / job_s),
            "ratio_to_baseline": round(base_s / job_s, 2),
            "skybatch_job_s": round(job_s, 2),
            "outputs_identical": same,
            "job_100_rows_median_s": round(statistics.median(small_times), 3),
            # Control-plane CPU per batch: the server's and the agents' own (runners excluded).
            "cpu_ms_per_batch": {
                k: round((cpu_after[k] - cpu_before[k]) * 1000 / batches, 2) for k in cpu_after
            },
            "peak_rss_mb": {k: round(v / 1e6, 1) for k, v in rss.peak.items()},
        }
        print(json.dumps(results, indent=2))
        out_dir = Path(__file__).parent / "out"
        out_dir.mkdir(exist_ok=True)
        (out_dir / "throughput.json").write_text(json.dumps(results, indent=2) + "\n")
        skybatch.pool_down("bench")
    finally:
        from skybatch.client.api import close_clients

        close_clients()
        stop_server()


if __name__ == "__main__":
    main()
