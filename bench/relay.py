"""Relay throughput: a local-path input on a pool whose agents relay through the server,
next to the same job on a pool whose agents read and write the files themselves.

    python bench/relay.py [--rows 400000] [--row-bytes 256] [--batch-size 5000] [--workers 2]

Both pools run on this machine: the relay pool is the ``test`` provider with
``relay: true`` (its agents run with SKYBATCH_RELAY=1, as an SSH or Ray provider's
do), so every batch's input is served by the server over HTTP and every part is
uploaded to it. The job copies one field of each row (JSONL in, JSONL out).

Reports, for each pool: MB/s of input (input size over the job's wall time, warm
pool), the ratio relay/direct in the same run, and the server's peak RSS during the
job (sampled every 50 ms) next to the batch's size, to show what the relay holds.
Results are printed and written to bench/out/relay.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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


def make_input(path: Path, rows: int, row_bytes: int) -> None:
    pad = "x" * max(0, row_bytes - 40)
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": i, "text": f"{i:012d}{pad}"}) + "\n")


class PeakRss:
    """Samples a process's RSS every 50 ms; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_job(pool: str, data: Path, out: Path, batch_size: int) -> float:
    start = time.perf_counter()
    skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        copy_field,
        pool_name=pool,
        batch_size=batch_size,
        stream=False,
        output=skybatch.JsonWriter(str(out)),
        overwrite=True,
    ).wait()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--row-bytes", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="skybatch-bench-relay-"))
    os.environ["SKYBATCH_HOME"] = str(tmp / "home")
    os.environ["SKYBATCH_TEST_PROVIDERS"] = "1"  # the server inherits it: the test provider
    from skybatch.client.api import close_clients
    from skybatch.client.launcher import stop_server
    from skybatch.config import home, read_server_info

    try:
        data = tmp / "data.jsonl"
        make_input(data, args.rows, args.row_bytes)
        size_mb = data.stat().st_size / 1e6
        pools = {"direct": "provider: local\n", "relay": "provider: {type: test, relay: true}\n"}
        for name, provider in pools.items():
            yaml = tmp / f"{name}.yaml"
            yaml.write_text(f"pool:\n  workers: {args.workers}\n{provider}")
            skybatch.pool_apply(str(yaml), name)
        small = tmp / "small.jsonl"
        make_input(small, 100, args.row_bytes)
        info = read_server_info(home())
        assert info is not None

        results: dict[str, Any] = {
            "rows": args.rows,
            "input_mb": round(size_mb, 1),
            "batch_size": args.batch_size,
            "batch_mb": round(size_mb / -(-args.rows // args.batch_size), 2),
            "workers": args.workers,
            "cpus": os.cpu_count(),
        }
        outputs = {}
        for name in pools:
            run_job(name, small, tmp / f"warm-{name}.jsonl", 10)  # warm the runners
            with PeakRss(info.pid) as rss:
                before = rss.peak
                seconds = run_job(name, data, tmp / f"out-{name}.jsonl", args.batch_size)
            outputs[name] = (tmp / f"out-{name}.jsonl").read_bytes()
            results[name] = {
                "job_s": round(seconds, 2),
                "mb_per_s": round(size_mb / seconds, 1),
                "server_rss_before_mb": round(before / 1e6, 1),
                "server_peak_rss_mb": round(rss.peak / 1e6, 1),
            }
        results["relay_to_direct"] = round(
            results["relay"]["mb_per_s"] / results["direct"]["mb_per_s"], 2
        )
        results["outputs_identical"] = outputs["relay"] == outputs["direct"]
        print(json.dumps(results, indent=2))
        out_dir = Path(__file__).parent / "out"
        out_dir.mkdir(exist_ok=True)
        (out_dir / "relay.json").write_text(json.dumps(results, indent=2) + "\n")
        for name in pools:
            skybatch.pool_down(name)
    finally:
        close_clients()
        stop_server()


if __name__ == "__main__":
    main()
