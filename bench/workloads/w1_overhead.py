"""Workload 1, overhead: a mapper that copies one field of small JSONL rows, so what is measured
is each tool's own cost per row and per batch (read, hand over, write, coordinate)."""

from __future__ import annotations

import multiprocessing
import shutil
from pathlib import Path
from typing import Any

import orjson

import skybatch
from bench.common import (
    Env,
    PeakRss,
    equal_outputs,
    interleaved,
    rate,
    ratio,
    skybatch_map,
    target,
    write_rows,
)

NUMBER = 1
TITLE = "Overhead: copy a field of small JSONL rows"
BATCH_SIZE = 1000
WORKERS = 2
POOL = "bench-2"


@skybatch.remote_function
def copy_field() -> None:
    for batch in skybatch.load():
        skybatch.save_results([{"out": row["text"]} for row in batch])


def make_input(path: Path, rows: int) -> Path:
    return write_rows(path, ({"id": i, "text": f"sample text number {i}"} for i in range(rows)))


def loop(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for line in fin:
            fout.write(orjson.dumps({"out": orjson.loads(line)["text"]}) + b"\n")


def _mp_chunk(lines: list[bytes]) -> bytes:
    return b"".join(orjson.dumps({"out": orjson.loads(line)["text"]}) + b"\n" for line in lines)


def _chunks(path: Path, size: int) -> Any:
    with open(path, "rb") as f:
        chunk: list[bytes] = []
        for line in f:
            chunk.append(line)
            if len(chunk) == size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


def mp(src: Path, dst: Path) -> None:
    """What a careful user would write by hand: batches of lines to a Pool(2), in order."""
    with multiprocessing.Pool(WORKERS) as pool, open(dst, "wb") as fout:
        for part in pool.imap(_mp_chunk, _chunks(src, BATCH_SIZE), chunksize=4):
            fout.write(part)


def skybatch_job(src: Path, dst: Path, batch_size: int = BATCH_SIZE) -> skybatch.Job:
    return skybatch_map(copy_field, src, dst, POOL, batch_size)


def _ray_copy(batch: dict[str, Any]) -> dict[str, Any]:
    return {"out": batch["text"]}


def ray_job(src: Path, dst: Path) -> None:
    import ray.data

    if dst.exists():  # Ray would mix the last run's files into this one's output
        shutil.rmtree(dst)
    ds = ray.data.read_json(str(src))
    ds = ds.map_batches(
        _ray_copy, batch_size=BATCH_SIZE, compute=ray.data.TaskPoolStrategy(size=WORKERS)
    )
    ds.write_json(str(dst))


def run(env: Env) -> dict[str, Any]:
    rows = 20_000 if env.smoke else 1_000_000
    work = env.scratch("w1")
    src = make_input(work / "input.jsonl", rows)
    outputs = {
        "loop": work / "loop.jsonl",
        "mp": work / "mp.jsonl",
        "skybatch": work / "skybatch.jsonl",
        "ray": work / "ray",
    }
    metrics: dict[str, Any] = {"input_mb": round(src.stat().st_size / 1e6, 1)}

    def setup_ray() -> Any:
        env.ray()
        return lambda: ray_job(src, outputs["ray"])

    pids: dict[str, list[int]] = {}
    if "skybatch" in env.contenders:
        session = env.skybatch()
        session.pool(POOL, WORKERS)
        # A user's second job finds the workers ready and the runner's imports cached.
        skybatch_job(make_input(work / "warm.jsonl", 100), work / "warm-out.jsonl", 10)
        pids = session.pids()
    # Sampled through every round: the skybatch processes idle while the others run.
    with PeakRss(pids) as rss:
        results = interleaved(
            env,
            {
                "loop": lambda: lambda: loop(src, outputs["loop"]),
                "mp": lambda: lambda: mp(src, outputs["mp"]),
                "skybatch": lambda: lambda: skybatch_job(src, outputs["skybatch"]),
                "ray": setup_ray,
            },
            rows,
        )
    peak_mb = None
    if "seconds" in results.get("skybatch", {}):
        peak_mb = metrics["skybatch_peak_rss_mb"] = rss.total_mb
        metrics["skybatch_peak_rss_mb_by_process"] = rss.peak_mb
    ran = {name: path for name, path in outputs.items() if "seconds" in results.get(name, {})}
    equal = equal_outputs(ran, rows)
    sky = rate(results, "skybatch")
    return {
        "number": NUMBER,
        "title": TITLE,
        "size": {"rows": rows, "batch_size": BATCH_SIZE, "workers": WORKERS},
        "results": results,
        "metrics": {
            **metrics,
            "skybatch/ray": ratio(sky, rate(results, "ray")),
            "skybatch/mp": ratio(sky, rate(results, "mp")),
            "skybatch/loop": ratio(sky, rate(results, "loop")),
        },
        "targets": [
            target("skybatch/ray rows/s", ratio(sky, rate(results, "ray")), ">=", 2),
            target("skybatch/mp rows/s", ratio(sky, rate(results, "mp")), ">=", 1),
            target("skybatch peak RSS MB (all processes)", peak_mb, "<=", 400),
        ],
        "equal_outputs": equal,
    }
