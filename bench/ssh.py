"""SSH pool figures: apply to ready, lease+commit through the tunnel, relay throughput.

    python bench/ssh.py [--batches 300] [--rows 200000] [--row-bytes 256]

Needs root and openssh-server: it makes two test hosts (network namespaces with their
own sshd, ``tests/e2e/hosts.py``) and removes them afterwards. The pool uses the
test venv's interpreter (``python:``), as the e2e tests do. Reports:

- ``apply_to_ready_s``: ``pool_apply`` of 2 workers on 2 hosts until both are READY
  (setup not cached: fresh directories); ``replaced_ready_s``: both agents SIGKILLed,
  until both replacements are READY in the same directories (setup cached).
- ``per_batch_ms``: wall time per batch of a job of ``--batches`` 1-row batches with a
  trivial mapper on a 1-worker pool, SSH (every lease and commit through the tunnel)
  next to local (loopback): the lease+commit round trip dominates such a batch.
- ``relay_mb_per_s``: a local-path JSONL input of ``--rows`` rows on the 2-worker SSH
  pool (batches served by the server, parts uploaded to it), input MB over job time.

Printed and written to bench/out/ssh.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.hosts import Hosts, ssh_hosts  # noqa: E402

import skybatch  # noqa: E402


@skybatch.remote_function
def copy_field():
    for batch in skybatch.load():
        skybatch.save_results([{"out": item["text"]} for item in batch])


def make_input(path: Path, rows: int, row_bytes: int) -> None:
    pad = "x" * max(0, row_bytes - 40)
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": i, "text": f"{i:012d}{pad}"}) + "\n")


def run_job(pool: str, data: Path, out: Path, batch_size: int) -> float:
    start = time.perf_counter()
    skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        copy_field, pool_name=pool, batch_size=batch_size, stream=False,
        output=skybatch.JsonWriter(str(out)), overwrite=True,
    ).wait()  # fmt: skip
    return time.perf_counter() - start


def ssh_yaml(hosts: Hosts, path: Path, workers: int, remote: Path) -> Path:
    section = {
        "type": "ssh",
        "hosts": [h.alias for h in hosts.hosts][:workers],
        "ssh_config": str(hosts.ssh_config),
        "python": sys.executable,
        "remote_dir": str(remote),
    }
    path.write_text(
        f"pool: {{workers: {workers}}}\nsetup: echo set up\nprovider: {json.dumps(section)}\n"
    )
    return path


def agents(hosts: Hosts) -> list[int]:
    found = []
    for h in hosts.hosts:
        for p in hosts.processes(h):
            with contextlib.suppress(psutil.Error):  # gone, or a zombie, meanwhile
                if "skybatch.agent" in " ".join(p.cmdline()):
                    found.append(p.pid)
    return found


def wait_ready(pool: str, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if skybatch.pool_status(pool)[0].ready == count:
            return
        time.sleep(0.02)
    raise RuntimeError(f"pool {pool} not ready within {timeout}s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--row-bytes", type=int, default=256)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="skybatch-bench-ssh-"))
    os.environ["SKYBATCH_HOME"] = str(tmp / "home")
    from skybatch.client.api import close_clients
    from skybatch.client.launcher import stop_server

    results: dict[str, Any] = {"cpus": os.cpu_count()}
    try:
        with ssh_hosts(tmp / "hosts", 2) as hosts:
            remote = tmp / "remote"
            start = time.perf_counter()
            skybatch.pool_apply(str(ssh_yaml(hosts, tmp / "ssh2.yaml", 2, remote)), "ssh2")
            results["apply_to_ready_s"] = round(time.perf_counter() - start, 2)
            before = agents(hosts)
            start = time.perf_counter()
            for pid in before:
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while not (len(now := agents(hosts)) == 2 and not set(now) & set(before)):
                if time.monotonic() > deadline:
                    raise RuntimeError("agents not replaced")
                time.sleep(0.02)
            wait_ready("ssh2", 2)
            results["replaced_ready_s"] = round(time.perf_counter() - start, 2)

            # Lease+commit round trips: 1-row batches, one worker, warm runners.
            one = tmp / "one.jsonl"
            make_input(one, args.batches, 64)
            local = tmp / "local1.yaml"
            local.write_text("pool: {workers: 1}\n")
            skybatch.pool_apply(str(local), "local1")
            skybatch.pool_apply(str(ssh_yaml(hosts, tmp / "ssh1.yaml", 1, remote)), "ssh1")
            per_batch = {}
            for pool in ("local1", "ssh1"):
                run_job(pool, one, tmp / f"warm-{pool}.jsonl", 1)
                seconds = run_job(pool, one, tmp / f"rt-{pool}.jsonl", 1)
                per_batch[pool] = seconds / args.batches * 1000
            results["per_batch_ms"] = {
                "local_loopback": round(per_batch["local1"], 2),
                "ssh_tunnel": round(per_batch["ssh1"], 2),
                "batches": args.batches,
            }
            skybatch.pool_down("ssh1")
            skybatch.pool_down("local1")

            data = tmp / "data.jsonl"
            make_input(data, args.rows, args.row_bytes)
            size_mb = data.stat().st_size / 1e6
            run_job("ssh2", one, tmp / "warm.jsonl", 50)
            seconds = run_job("ssh2", data, tmp / "relayed.jsonl", 5000)
            rows = (tmp / "relayed.jsonl").read_bytes().count(b"\n")
            assert rows == args.rows, rows
            results["relay"] = {
                "input_mb": round(size_mb, 1),
                "job_s": round(seconds, 2),
                "mb_per_s": round(size_mb / seconds, 1),
                "workers": 2,
                "batch_size": 5000,
            }
            skybatch.pool_down("ssh2")
    finally:
        close_clients()
        stop_server()
    print(json.dumps(results, indent=2))
    out_dir = Path(__file__).parent / "out"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "ssh.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
