"""Logs are bounded: a chatty mapper leaves at most the cap on disk, and reading the
log (``skybatch jobs logs``) streams it in pages with bounded memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import skybatch
from skybatch import defaults
from tests.helpers import Deployment, read_jsonl, write_jsonl

MiB = 1024 * 1024


@skybatch.remote_function
def prints_100_mb() -> None:
    import sys

    line = "x" * 999 + "\n"  # 1,000 bytes
    for batch in skybatch.load():
        first = batch[0]["i"]
        if first == 0:
            for n in range(100_000):
                sys.stdout.write(f"{n:09d} " + line[10:])
            print("last line of the big batch", flush=True)
        skybatch.save_results([{"i": item["i"]} for item in batch])


def _disk_bytes(root: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


def _peak_rss_of(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``cmd`` as the only child of a fresh Python; return its peak RSS and stdout."""
    probe = (
        "import resource, subprocess, sys\n"
        "proc = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)\n"
        "sys.stdout.buffer.write(proc.stdout)\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
        "sys.stderr.write(f'PEAK {peak} EXIT {proc.returncode}\\n')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe, *cmd],
        env=env,
        capture_output=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    marker = proc.stderr.decode().strip().splitlines()[-1].split()
    assert marker[0] == "PEAK" and marker[3] == "0", proc.stderr.decode()
    return int(marker[1]), proc.stdout.decode()


def test_a_100_mb_log_stays_under_the_cap_and_reads_in_bounded_memory(
    deployment: Deployment, tmp_path: Path
) -> None:
    deployment.pool("p", workers=1, tmp=tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", [{"i": i} for i in range(6)])
    out = tmp_path / "o.jsonl"
    job = skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        prints_100_mb, pool_name="p", batch_size=2, output=skybatch.JsonWriter(str(out))
    )
    assert read_jsonl(out) == [{"i": i} for i in range(6)]

    # On disk: the server's current file plus one rotated file at most; nothing of the
    # output on the worker's side (its directory is inside SKYBATCH_HOME here).
    cap = defaults.LOG_FILE_BYTES
    job_logs = deployment.root / "logs" / "jobs" / job.job_id
    assert _disk_bytes(job_logs) <= 2 * cap + 64 * 1024
    assert _disk_bytes(deployment.root) < 2 * cap + 8 * MiB

    peak, text = _peak_rss_of(
        [sys.executable, "-m", "skybatch.cli", "jobs", "logs", job.job_id], deployment.env()
    )
    # Before: the whole log in one reply (a 100 MB reply, a 442 MB CLI process).
    assert peak < 120 * MiB, f"peak RSS of `skybatch jobs logs`: {peak / MiB:.0f} MiB"
    lines = text.splitlines()
    dropped = [line for line in lines if "bytes of this worker's output were dropped" in line]
    assert dropped, "a line says how much was dropped"
    assert lines[-1] == "(worker-0) last line of the big batch", "the latest output is kept"
    kept = [line for line in lines if line.startswith("(worker-0) 0")]
    assert 5_000 < len(kept) <= 2 * cap // 1000
    numbers = [int(line.split()[1]) for line in kept]
    assert numbers == sorted(numbers), "pages come in order, each line once"
    assert numbers[-1] == 99_999
