"""Workload 4, latency: a 100-row job on a warm pool, submit to done (output published),
median of 20. The other contenders' numbers are for reference: what the same 100 rows cost
there, a process pool's start or a Ray Data plan included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import Env, interleaved, skybatch_map, target
from bench.workloads import w1_overhead as w1

NUMBER = 4
TITLE = "Latency: a 100-row job on a warm pool"
ROWS = 100
BATCH_SIZE = 10


def run(env: Env) -> dict[str, Any]:
    times_n = 5 if env.smoke else 20
    work = env.scratch("w4")
    src = w1.make_input(work / "input.jsonl", ROWS)

    def job(dst: Path) -> None:
        skybatch_map(w1.copy_field, src, dst, w1.POOL, BATCH_SIZE)

    def setup_skybatch() -> Any:
        env.skybatch().pool(w1.POOL, w1.WORKERS)
        job(work / "warm.jsonl")
        return lambda: job(work / "skybatch.jsonl")

    def setup_ray() -> Any:
        env.ray()
        return lambda: w1.ray_job(src, work / "ray")

    results = interleaved(
        env,
        {
            "skybatch": setup_skybatch,
            "loop": lambda: lambda: w1.loop(src, work / "loop.jsonl"),
            "mp": lambda: lambda: w1.mp(src, work / "mp.jsonl"),
            "ray": setup_ray,
        },
        ROWS,
        repeats=times_n,
    )
    sky = results.get("skybatch", {}).get("seconds")
    return {
        "number": NUMBER,
        "title": TITLE,
        "size": {"rows": ROWS, "batch_size": BATCH_SIZE, "workers": w1.WORKERS, "runs": times_n},
        "results": results,
        "metrics": {},
        "targets": [target("skybatch median seconds", sky, "<=", 0.05)],
        "equal_outputs": None,
    }
