"""Workload 2, CPU-bound: ~1 ms of pure-Python work per row on 2 workers. Efficiency is a
contender's throughput over twice the single-process loop's: what is left of two cores."""

from __future__ import annotations

import multiprocessing
import shutil
import time
from pathlib import Path
from typing import Any

import orjson

import skybatch
from bench.common import (
    Env,
    equal_outputs,
    interleaved,
    rate,
    ratio,
    skybatch_map,
    target,
    write_rows,
)

NUMBER = 2
TITLE = "CPU-bound: ~1 ms of pure Python per row"
BATCH_SIZE = 100
WORKERS = 2
POOL = "bench-2"


def burn(n: int) -> int:
    """n steps of integer arithmetic: pure Python, holds the GIL, no allocation to speak of."""
    x = 0
    for i in range(n):
        x = (x * 31 + i) % 1_000_003
    return x


def steps_per_ms() -> int:
    """How many `burn` steps take 1 ms here (best of 5, so a busy moment does not inflate it)."""
    n = 100_000
    best = min(_seconds(burn, n) for _ in range(5))
    return max(1, round(n / best / 1000))


def _seconds(fn: Any, *a: Any) -> float:
    start = time.perf_counter()
    fn(*a)
    return time.perf_counter() - start


@skybatch.remote_function
def burn_rows() -> None:
    for batch in skybatch.load():
        skybatch.save_results([{"id": row["id"], "h": burn(row["n"])} for row in batch])


def loop(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for line in fin:
            row = orjson.loads(line)
            fout.write(orjson.dumps({"id": row["id"], "h": burn(row["n"])}) + b"\n")


def _mp_chunk(lines: list[bytes]) -> bytes:
    out = []
    for line in lines:
        row = orjson.loads(line)
        out.append(orjson.dumps({"id": row["id"], "h": burn(row["n"])}) + b"\n")
    return b"".join(out)


def mp(src: Path, dst: Path) -> None:
    lines = src.read_bytes().splitlines()
    chunks = [lines[i : i + BATCH_SIZE] for i in range(0, len(lines), BATCH_SIZE)]
    with multiprocessing.Pool(WORKERS) as pool, open(dst, "wb") as fout:
        for part in pool.imap(_mp_chunk, chunks):
            fout.write(part)


def _ray_burn(batch: dict[str, Any]) -> dict[str, Any]:
    return {"id": batch["id"], "h": [burn(int(n)) for n in batch["n"]]}


def ray_job(src: Path, dst: Path) -> None:
    import ray.data

    if dst.exists():
        shutil.rmtree(dst)
    ds = ray.data.read_json(str(src)).map_batches(
        _ray_burn, batch_size=BATCH_SIZE, compute=ray.data.TaskPoolStrategy(size=WORKERS)
    )
    ds.write_json(str(dst))


def run(env: Env) -> dict[str, Any]:
    rows = 2_000 if env.smoke else 20_000
    work = env.scratch("w2")
    steps = steps_per_ms()
    src = write_rows(work / "input.jsonl", ({"id": i, "n": steps} for i in range(rows)))
    outputs = {
        "loop": work / "loop.jsonl",
        "mp": work / "mp.jsonl",
        "skybatch": work / "skybatch.jsonl",
        "ray": work / "ray",
    }

    def setup_skybatch() -> Any:
        env.skybatch().pool(POOL, WORKERS)
        warm = write_rows(work / "warm.jsonl", ({"id": i, "n": 1} for i in range(10)))
        skybatch_map(burn_rows, warm, work / "warm-out.jsonl", POOL, BATCH_SIZE)
        return lambda: skybatch_map(burn_rows, src, outputs["skybatch"], POOL, BATCH_SIZE)

    def setup_ray() -> Any:
        env.ray()
        return lambda: ray_job(src, outputs["ray"])

    results = interleaved(
        env,
        {
            "loop": lambda: lambda: loop(src, outputs["loop"]),
            "mp": lambda: lambda: mp(src, outputs["mp"]),
            "skybatch": setup_skybatch,
            "ray": setup_ray,
        },
        rows,
    )
    base = rate(results, "loop")
    efficiency = {
        name: ratio(rate(results, name), 2 * base if base else None)
        for name in ("skybatch", "mp", "ray")
    }
    for name, value in efficiency.items():
        if name in results and "skipped" not in results[name]:
            results[name]["efficiency"] = value
    ran = {name: path for name, path in outputs.items() if "seconds" in results.get(name, {})}
    equal = equal_outputs(ran, rows)
    return {
        "number": NUMBER,
        "title": TITLE,
        "size": {
            "rows": rows,
            "steps_per_row": steps,
            "batch_size": BATCH_SIZE,
            "workers": WORKERS,
        },
        "results": results,
        "metrics": {f"{name} efficiency": value for name, value in efficiency.items()},
        "targets": [target("skybatch efficiency", efficiency["skybatch"], ">=", 0.9)],
        "equal_outputs": equal,
    }
