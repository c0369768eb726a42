"""Every format end to end: CSV, Parquet, JSONL shards, images, multi-output, value types."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import skybatch
from skybatch.errors import JobFailedError
from tests.helpers import Deployment, read_jsonl, write_jsonl


@skybatch.remote_function
def describe_row():
    for batch in skybatch.load():
        skybatch.save_results(
            [{"id": int(r["id"]), "len": len(r["text"]), "tags": [r["id"]], "none": None}
             for r in batch]
        )  # fmt: skip


@skybatch.remote_function
def typed_values():
    import numpy as np

    for batch in skybatch.load():
        skybatch.save_results(
            [
                {
                    "i": r["i"],
                    "f": np.float32(r["i"]) / 2,
                    "s": r["s"],
                    "blob": r["blob"],
                    "vec": np.arange(3, dtype=np.int64) + r["i"],
                    "point": {"x": r["i"], "label": r["s"]},
                    "maybe": r["maybe"],
                    "items": r["items"],
                }
                for r in batch
            ]
        )


@skybatch.remote_function
def numpy_to_json():
    import numpy as np

    for batch in skybatch.load():
        skybatch.save_results(
            [{"i": np.int64(r["i"]), "emb": np.ones(2, dtype=np.float32) * r["i"]} for r in batch]
        )


@skybatch.remote_function
def bytes_to_json():
    for batch in skybatch.load():
        skybatch.save_results([{"i": r["i"], "raw": b"\x00"} for r in batch])


@skybatch.remote_function
def draw_prompts():
    from PIL import Image, ImageDraw

    for batch in skybatch.load():
        out = []
        for r in batch:
            img = Image.new("RGB", (64, 32), (r["i"] * 10 % 256, 0, 0))
            ImageDraw.Draw(img).text((2, 2), r["prompt"], fill=(255, 255, 255))
            out.append({"prompt": r["prompt"], "image": img, "slug": f"p{r['i']}"})
        skybatch.save_results(out)


@skybatch.remote_function
def image_is_a_string():
    for batch in skybatch.load():
        skybatch.save_results([{"prompt": r["prompt"], "image": "not an image"} for r in batch])


@skybatch.remote_function
def mixed_types():
    for batch in skybatch.load():
        # Row 5 onwards gives "v" as a string: batches disagree on the column's type.
        skybatch.save_results([{"i": r["i"], "v": r["i"] if r["i"] < 5 else "x"} for r in batch])


def test_csv_in_csv_out(shared: Deployment, tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    rows = [{"id": str(i), "text": ["a,b", 'say "hi"', "two\nlines", ""][i % 4]} for i in range(30)]
    with open(src, "w", newline="") as f:
        w = csv.DictWriter(f, ["id", "text"])
        w.writeheader()
        w.writerows(rows)
    skybatch.Dataset(skybatch.CsvReader(str(src))).map(
        describe_row, pool_name="pool", batch_size=4,
        output=skybatch.CsvWriter(str(tmp_path / "out.csv")),
    )  # fmt: skip
    text = (tmp_path / "out.csv").read_text()
    assert text.splitlines()[:3] == ["id,len,tags,none", '0,3,"[""0""]",', '1,8,"[""1""]",']
    with open(tmp_path / "out.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert [(r["id"], r["len"]) for r in got] == [(r["id"], str(len(r["text"]))) for r in rows]


def test_parquet_round_trip_keeps_types(shared: Deployment, tmp_path: Path) -> None:
    n = 23
    table = pa.table(
        {
            "i": pa.array(range(n), pa.int64()),
            "s": [f"row {i}" for i in range(n)],
            "blob": [bytes([i]) * 3 for i in range(n)],
            "maybe": [None if i % 3 else i * 1.5 for i in range(n)],
            "items": [[f"t{i}", "u"] for i in range(n)],
            "unused": [0] * n,
        }
    )
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=5)
    reader = skybatch.ParquetReader(
        str(tmp_path / "in.parquet"), columns=["i", "s", "blob", "maybe", "items"]
    )
    skybatch.Dataset(reader).map(
        typed_values, pool_name="pool", batch_size=4,
        output=[skybatch.ParquetWriter(str(tmp_path / "out.parquet")),
                skybatch.ParquetWriter(str(tmp_path / "shards"), shards=True)],
    )  # fmt: skip
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.schema.field("i").type == pa.int64()
    assert out.schema.field("f").type == pa.float64()
    assert out.schema.field("blob").type == pa.binary()
    assert out.schema.field("vec").type == pa.list_(pa.int64())
    assert out.schema.field("point").type == pa.struct([("x", pa.int64()), ("label", pa.string())])
    assert out.schema.field("maybe").type == pa.float64()  # null in some batches, float in others
    rows = out.to_pylist()
    assert rows[7] == {
        "i": 7, "f": 3.5, "s": "row 7", "blob": b"\x07\x07\x07", "vec": [7, 8, 9],
        "point": {"x": 7, "label": "row 7"}, "maybe": None, "items": ["t7", "u"],
    }  # fmt: skip
    assert [r["i"] for r in rows] == list(range(n))
    assert rows[9]["maybe"] == 13.5
    shards = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert shards == [f"part-{k:05d}.parquet" for k in range(6)]
    assert pq.read_table(tmp_path / "shards").column("i").to_pylist() == list(range(n))


def test_jsonl_shards_output(shared: Deployment, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"i": i} for i in range(10)])
    skybatch.Dataset(skybatch.JsonReader(str(tmp_path / "in.jsonl"))).map(
        numpy_to_json, pool_name="pool", batch_size=3,
        output=skybatch.JsonWriter(str(tmp_path / "out"), shards=True),
    )  # fmt: skip
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl", "part-00003.jsonl"]
    rows = [r for name in names for r in read_jsonl(tmp_path / "out" / name)]
    # numpy scalars and arrays became JSON numbers and lists.
    assert rows[4] == {"i": 4, "emb": [4.0, 4.0]}
    assert [r["i"] for r in rows] == list(range(10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out"]


def test_bytes_in_a_json_output_is_a_clear_error(shared: Deployment, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"i": i} for i in range(3)])
    with pytest.raises(JobFailedError) as e:
        skybatch.Dataset(skybatch.JsonReader(str(tmp_path / "in.jsonl"))).map(
            bytes_to_json, pool_name="pool", batch_size=3, max_retries=0,
            output=skybatch.JsonWriter(str(tmp_path / "o.jsonl")),
        )  # fmt: skip
    assert (
        "result 0 (input row 0) key 'raw': bytes cannot be written to JSON; decode them to str, "
        "or write them with skybatch.ParquetWriter" in str(e.value)
    )


def test_images_with_a_manifest(shared: Deployment, tmp_path: Path) -> None:
    prompts = [{"i": i, "prompt": f"a cat number {i}"} for i in range(7)]
    write_jsonl(tmp_path / "prompts.jsonl", prompts)
    skybatch.Dataset(skybatch.JsonReader(str(tmp_path / "prompts.jsonl"))).map(
        draw_prompts, pool_name="pool", batch_size=3,
        output=[
            skybatch.ImageWriter(str(tmp_path / "images"), column="image"),
            skybatch.JsonWriter(str(tmp_path / "manifest.jsonl"), column=["prompt", "image"]),
        ],
    )  # fmt: skip
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert names == [f"{i:08d}.png" for i in range(7)]
    manifest = read_jsonl(tmp_path / "manifest.jsonl")
    assert manifest[3] == {"prompt": "a cat number 3", "image": "00000003.png"}
    with Image.open(tmp_path / "images" / manifest[3]["image"]) as img:
        assert img.size == (64, 32) and img.getpixel((60, 30)) == (30, 0, 0)

    # name= takes each file's stem from a column; format= picks JPEG.
    skybatch.Dataset(skybatch.JsonReader(str(tmp_path / "prompts.jsonl"))).map(
        draw_prompts, pool_name="pool", batch_size=3,
        output=[
            skybatch.ImageWriter(str(tmp_path / "jpegs"), name="slug", format="jpeg"),
            skybatch.JsonWriter(str(tmp_path / "m2.jsonl"), column=["slug", "image"]),
        ],
    )  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "jpegs").iterdir()) == sorted(
        f"p{i}.jpg" for i in range(7)
    )
    assert read_jsonl(tmp_path / "m2.jsonl")[6] == {"slug": "p6", "image": "p6.jpg"}
    with Image.open(tmp_path / "jpegs" / "p6.jpg") as img:
        assert img.format == "JPEG"


def test_a_non_image_in_the_image_column_names_the_row(shared: Deployment, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "p.jsonl", [{"i": i, "prompt": "x"} for i in range(4)])
    with pytest.raises(JobFailedError) as e:
        skybatch.Dataset(skybatch.JsonReader(str(tmp_path / "p.jsonl"))).map(
            image_is_a_string, pool_name="pool", batch_size=2, max_retries=0,
            output=[skybatch.ImageWriter(str(tmp_path / "img")),
                    skybatch.JsonWriter(str(tmp_path / "m.jsonl"))],
        )  # fmt: skip
    assert "result 0 (input row " in str(e.value)
    assert "column 'image': expected a PIL image, got str" in str(e.value)
    assert not (tmp_path / "m.jsonl").exists()
    assert not (tmp_path / "img").exists()  # made at submit, removed as nothing was published


def test_outputs_publish_together_or_not_at_all(shared: Deployment, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"i": i} for i in range(10)])
    with pytest.raises(JobFailedError, match=r"batches disagree on a column's type"):
        skybatch.Dataset(skybatch.JsonReader(str(tmp_path / "in.jsonl"))).map(
            mixed_types, pool_name="pool", batch_size=5,
            output=[skybatch.JsonWriter(str(tmp_path / "a.jsonl")),
                    skybatch.ParquetWriter(str(tmp_path / "b.parquet"))],
        )  # fmt: skip
    # The JSON output could have been written; it is not, since the Parquet one failed.
    assert not (tmp_path / "a.jsonl").exists() and not (tmp_path / "b.parquet").exists()
    # The parts stay for reduce_results: the JSON output alone can still be recovered.
    assert (
        json.loads(
            json.dumps(
                skybatch.JsonWriter(str(tmp_path / "a.jsonl")).reduce_results(job_id=_last_job())
            )
        )["rows"]
        == 10
    )
    assert len(read_jsonl(tmp_path / "a.jsonl")) == 10


def _last_job() -> str:
    return str(skybatch.jobs_queue()[-1].id)


@skybatch.remote_function
def fails_on_row_7():
    for batch in skybatch.load():
        if any(r["i"] == 7 for r in batch):
            raise ValueError("row 7")
        skybatch.save_results([{"i": r["i"]} for r in batch])


def test_partial_shards_then_resume(shared: Deployment, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"i": i} for i in range(10)])
    ds = skybatch.Dataset(skybatch.JsonReader(str(tmp_path / "in.jsonl")))
    out = skybatch.JsonWriter(str(tmp_path / "out"), shards=True)
    with pytest.raises(JobFailedError) as e:
        ds.map(fails_on_row_7, pool_name="pool", batch_size=5, output=out, max_retries=0)
    job_id = e.value.job_id
    # reduce_results publishes what committed (rows 0-4) and keeps the parts...
    result = out.reduce_results(job_id=job_id)
    missing = {i for first, last in result["missing"] for i in range(first, last + 1)}
    assert 7 in missing
    published = [r for p in sorted((tmp_path / "out").iterdir()) for r in read_jsonl(p)]
    assert [r["i"] for r in published] == [i for i in range(10) if i not in missing]
    # ...so a resume with a fixed mapper still publishes the whole output.
    ds.map(numpy_to_json, pool_name="pool", batch_size=5, output=out, resume=job_id)
    rows = [r for p in sorted((tmp_path / "out").iterdir()) for r in read_jsonl(p)]
    assert [r["i"] for r in rows] == list(range(10))
