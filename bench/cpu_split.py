"""CPU seconds of each kind of skybatch process for one workload-1 job on a warm pool.

    python bench/cpu_split.py [--rows 1000000] [--repeats 3]

The profile behind docs/benchmarks.md's "Optimizations": the server's, the agents'
(user and system) and the runners' CPU during one job, next to its wall time. The
runners are the job's own (children of the agents), measured just before they exit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import make_input, run_job


def _cpu(proc: psutil.Process) -> tuple[float, float]:
    t = proc.cpu_times()
    return t.user + t.system, t.system


def measure(server: psutil.Process, agents: list[psutil.Process], data: Path, out: Path) -> str:
    """One job, and the CPU each kind of process spent on it."""
    runners: dict[int, float] = {}
    done = threading.Event()

    def sample() -> None:
        # A runner's CPU as last seen: it may exit (or be taken over) with its job.
        while not done.wait(0.02):
            for agent in agents:
                for child in agent.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        runners[child.pid] = _cpu(child)[0]

    start = {c.pid: _cpu(c)[0] for a in agents for c in a.children(recursive=True)}
    before = {p.pid: _cpu(p) for p in [server, *agents]}
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    wall, _ = run_job(data, out, 1000)
    done.set()
    sampler.join()
    after = {p.pid: _cpu(p) for p in [server, *agents]}

    def used(pids: list[int], kind: int) -> float:
        return sum(after[pid][kind] - before[pid][kind] for pid in pids)

    ids = [a.pid for a in agents]
    runner_cpu = sum(v - start.get(pid, 0.0) for pid, v in runners.items())
    return (
        f"job {wall:.2f} s wall; CPU s: server {used([server.pid], 0):.2f} "
        f"(system {used([server.pid], 1):.2f}), agents {used(ids, 0):.2f} "
        f"(system {used(ids, 1):.2f}), runners {runner_cpu:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="skybatch-cpu-"))
    os.environ["SKYBATCH_HOME"] = str(tmp / "home")
    import skybatch
    from skybatch.client.launcher import stop_server
    from skybatch.config import home, read_server_info

    data = tmp / "in.jsonl"
    make_input(data, args.rows)
    (tmp / "pool.yaml").write_text("pool:\n  workers: 2\n")
    skybatch.pool_apply(str(tmp / "pool.yaml"), "bench")
    try:
        run_job(data, tmp / "warm.jsonl", 1000)
        info = read_server_info(home())
        assert info is not None
        server = psutil.Process(info.pid)
        agents = [psutil.Process(w.pid) for w in skybatch.pool_status("bench")[0].worker_list]
        for _ in range(args.repeats):
            print(measure(server, agents, data, tmp / "out.jsonl"))
    finally:
        stop_server()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
