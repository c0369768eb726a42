"""Chaos: agents, runners and the server killed at random mid-job; nothing lost, nothing twice."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from pathlib import Path

import psutil

import skybatch
from tests.helpers import Deployment, wait_for, write_jsonl

ROWS = 20_000


@skybatch.remote_function
def digest():
    import hashlib

    for batch in skybatch.load():
        out = []
        for item in batch:
            h = item["text"].encode()
            for _ in range(500):
                h = hashlib.sha256(h).digest()
            out.append({"i": item["i"], "digest": h.hex()[:16]})
        skybatch.save_results(out)


class Killer(threading.Thread):
    """SIGKILLs a busy agent first, then a random agent or runner every 0.2-1 s; once, after
    1 s, the server (then restarts it)."""

    def __init__(self, deployment: Deployment, seed: int) -> None:
        super().__init__(daemon=True)
        self.deployment = deployment
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.kills: list[str] = []
        self.server_killed_at: float | None = None

    def _targets(self) -> list[tuple[str, int]]:
        targets = []
        for w in skybatch.pool_status("pool")[0].worker_list:
            if w.pid is None or w.status != "READY":
                continue
            targets.append(("agent", w.pid))
            with contextlib.suppress(psutil.Error):
                targets += [("runner", c.pid) for c in psutil.Process(w.pid).children()]
        return targets

    def run(self) -> None:
        started = time.monotonic()
        while not self.stop.wait(self.rng.uniform(0.2, 1.0)):
            if self.server_killed_at is None and time.monotonic() - started > 1.0:
                pid = self.deployment.server_pid()
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                self.kills.append(f"server {pid}")
                self.server_killed_at = time.monotonic()
                time.sleep(0.5)
                self.deployment.cli("server", "start")
                continue
            try:
                targets = self._targets()
            except skybatch.SkyBatchError:
                continue  # the server is restarting
            if not any(k.startswith("agent") for k in self.kills):
                # The first kill takes a busy agent (it has a runner): its lease is lost for
                # sure, however short the job, so the job's record must show it.
                busy = {pid for kind, pid in targets if kind == "runner"}
                targets = [
                    (kind, pid)
                    for kind, pid in targets
                    if kind == "agent" and busy & _children(pid)
                ]
            if not targets:
                continue
            kind, pid = self.rng.choice(targets)
            with contextlib.suppress(ProcessLookupError):
                if kind == "agent":
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
                self.kills.append(f"{kind} {pid}")


def _children(pid: int) -> set[int]:
    with contextlib.suppress(psutil.Error):
        return {c.pid for c in psutil.Process(pid).children()}
    return set()


def run_job(tmp_path: Path, name: str) -> skybatch.Job:
    return skybatch.Dataset(skybatch.JsonReader(str(tmp_path / "data.jsonl"))).map(
        digest,
        pool_name="pool",
        batch_size=100,
        stream=False,
        output=skybatch.JsonWriter(str(tmp_path / f"{name}.jsonl")),
    )


def test_chaos_output_is_identical_to_a_clean_run(deployment: Deployment, tmp_path: Path) -> None:
    seed = int(os.environ.get("SKYBATCH_CHAOS_SEED", random.randrange(1 << 30)))
    print(f"chaos seed: {seed} (rerun with SKYBATCH_CHAOS_SEED={seed})")
    write_jsonl(tmp_path / "data.jsonl", [{"i": i, "text": f"row {i}"} for i in range(ROWS)])
    deployment.pool("pool", workers=4, tmp=tmp_path)

    clean = run_job(tmp_path, "clean")
    started = time.monotonic()
    clean.wait(timeout=300)
    clean_s = time.monotonic() - started

    killer = Killer(deployment, seed)
    chaos = run_job(tmp_path, "chaos")
    killer.start()
    started = time.monotonic()
    try:
        chaos.wait(timeout=300)
    finally:
        killer.stop.set()
        killer.join()
    chaos_s = time.monotonic() - started
    print(
        f"clean run {clean_s:.1f}s, chaos run {chaos_s:.1f}s; "
        f"{len(killer.kills)} kills: {killer.kills}"
    )
    assert killer.server_killed_at is not None, "the job ended before the server was killed"
    clean_bytes = (tmp_path / "clean.jsonl").read_bytes()
    assert clean_bytes.count(b"\n") == ROWS
    assert (tmp_path / "chaos.jsonl").read_bytes() == clean_bytes
    info = chaos.info()
    assert info.status == "SUCCEEDED"
    assert info.lost > 0, "the job's record shows the batches it lost to kills"
    assert info.committed_rows == ROWS and info.committed_batches == ROWS // 100
    # The pool heals back to its size.
    wait_for(lambda: skybatch.pool_status("pool")[0].ready == 4, timeout=60, message="pool healed")
