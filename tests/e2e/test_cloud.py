"""Object storage for real: S3 (SeaweedFS) and GCS (fake-gcs-server), no mocks."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import psutil
import pytest

import skybatch
from skybatch.errors import InputError, JobFailedError, SkyBatchError
from skybatch.io import storage
from tests.e2e.storage_servers import GcsServer, S3Server
from tests.helpers import REPO, Deployment, deployment_at

EXAMPLE = REPO / "examples" / "quickstart"


@skybatch.remote_function
def copy_id():
    for batch in skybatch.load():
        skybatch.save_results([{"id": item["id"], "src": item["src"]} for item in batch])


@skybatch.remote_function
def length_only():
    for batch in skybatch.load():
        skybatch.save_results([{"n": len(item["text"])} for item in batch])


@skybatch.remote_function
def fails_on_37():
    for batch in skybatch.load():
        if any(item["id"] == 37 for item in batch):
            raise ValueError("row 37 is bad")
        skybatch.save_results([{"id": item["id"]} for item in batch])


@skybatch.remote_function
def blow_up():
    for batch in skybatch.load():
        # About 100 kB of output per input row.
        skybatch.save_results([{"id": item["id"], "blob": "x" * 100_000} for item in batch])


@pytest.fixture(scope="module")
def cloud(
    s3_server: S3Server, gcs_server: GcsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """A deployment started after the storage servers, so it inherits their environment."""
    with deployment_at(tmp_path_factory.mktemp("cloud") / "home") as d:
        d.pool("pool", workers=4)
        yield d


def new_bucket(scheme: str) -> tuple[Any, str]:
    """A fresh, empty place to work: the filesystem and a unique prefix's URL.

    One bucket per scheme with a prefix per test, since SeaweedFS allocates
    volumes for every bucket it sees.
    """
    fs = fsspec.filesystem(scheme, skip_instance_cache=True)
    if not fs.exists("sb-tests"):
        fs.mkdir("sb-tests")
    return fs, f"{scheme}://sb-tests/{uuid.uuid4().hex[:12]}"


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def objects(fs: Any, prefix: str) -> list[str]:
    fs.invalidate_cache()
    root = prefix.split("://")[1]
    return sorted(p[len(root) + 1 :] for p in fs.find(root))


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_quickstart_on_object_storage(cloud: Deployment, tmp_path: Path, scheme: str) -> None:
    fs, bucket = new_bucket(scheme)
    fs.put_file(str(EXAMPLE / "data.jsonl"), f"{bucket}/data.jsonl")
    # The quickstart script, with its paths pointed at the bucket, run as a user would.
    script = (EXAMPLE / "my_script.py").read_text()
    script = script.replace('"data.jsonl"', f'"{bucket}/data.jsonl"')
    script = script.replace('"out.jsonl"', f'"{bucket}/results/out.jsonl"')
    script = script.replace('"my-pool"', '"pool"')
    (tmp_path / "my_script.py").write_text(script)
    run = subprocess.run(
        [sys.executable, "my_script.py"],
        cwd=tmp_path,
        env=cloud.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert fs.cat_file(f"{bucket}/results/out.jsonl") == (
        b'{"output":"hellohello"}\n{"output":"worldworld"}\n'
        b'{"output":"skysky"}\n{"output":"batchbatch"}\n'
    )
    # The staging area (parts, probes) is gone: only the input and the output remain.
    assert objects(fs, bucket) == ["data.jsonl", "results/out.jsonl"]


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_sharded_input_by_prefix_glob_and_gzip(cloud: Deployment, scheme: str) -> None:
    fs, bucket = new_bucket(scheme)
    sizes = [5, 12, 7]
    shards, next_id = [], 0
    for i, n in enumerate(sizes):
        rows = [{"id": next_id + j, "src": i} for j in range(n)]
        next_id += n
        shards.append(rows)
    fs.pipe_file(f"{bucket}/in/part-0.jsonl", jsonl(shards[0]))
    fs.pipe_file(f"{bucket}/in/part-1.jsonl.gz", gzip.compress(jsonl(shards[1])))
    fs.pipe_file(f"{bucket}/in/part-2.jsonl", jsonl(shards[2]))
    # Files a prefix skips: markers and hidden files, as Spark and Hive write them.
    fs.pipe_file(f"{bucket}/in/_SUCCESS", b"")
    fs.pipe_file(f"{bucket}/in/.part-0.jsonl.crc", b"junk")

    # The whole prefix, in sorted order, the gzip shard included.
    skybatch.Dataset(skybatch.JsonReader(f"{bucket}/in/")).map(
        copy_id, pool_name="pool", batch_size=4, output=skybatch.JsonWriter(f"{bucket}/all.jsonl")
    )
    got = [json.loads(line) for line in fs.cat_file(f"{bucket}/all.jsonl").splitlines()]
    assert got == [{"id": i, "src": src} for src, rows in enumerate(shards) for i in
                   (r["id"] for r in rows)]  # fmt: skip

    # A glob picks the plain shards only.
    skybatch.Dataset(skybatch.JsonReader(f"{bucket}/in/*.jsonl")).map(
        copy_id, pool_name="pool", batch_size=4, output=skybatch.JsonWriter(f"{bucket}/g.jsonl")
    )
    got = [json.loads(line)["id"] for line in fs.cat_file(f"{bucket}/g.jsonl").splitlines()]
    assert got == [r["id"] for r in shards[0] + shards[2]]
    # The gzip shard's scratch chunks went away with the job's staging area.
    assert objects(fs, bucket) == sorted(
        ["all.jsonl", "g.jsonl", "in/.part-0.jsonl.crc", "in/_SUCCESS", "in/part-0.jsonl",
         "in/part-1.jsonl.gz", "in/part-2.jsonl"]
    )  # fmt: skip


def _rchar(pid: int) -> int:
    return int(psutil.Process(pid).io_counters().read_chars)


def test_each_worker_reads_only_its_byte_ranges(cloud: Deployment) -> None:
    fs, bucket = new_bucket("s3")
    rows = [{"text": f"{i:07d}" + "y" * 2000} for i in range(20_000)]  # about 40 MB
    fs.pipe_file(f"{bucket}/big.jsonl", jsonl(rows))
    size = fs.info(f"{bucket}/big.jsonl")["size"]
    fs.pipe_file(f"{bucket}/warm.jsonl", jsonl(rows[:50]))
    ds_warm = skybatch.Dataset(skybatch.JsonReader(f"{bucket}/warm.jsonl"))
    # A first small job makes every agent import s3fs, so only the job's reads count below.
    for _ in range(2):
        warm_out = skybatch.JsonWriter(f"{bucket}/warm-out.jsonl")
        ds_warm.map(length_only, pool_name="pool", batch_size=1, output=warm_out, overwrite=True)
    pids = [w.pid for w in skybatch.pool_status("pool")[0].worker_list if w.pid]
    assert len(pids) == 4
    before = {pid: _rchar(pid) for pid in pids}
    skybatch.Dataset(skybatch.JsonReader(f"{bucket}/big.jsonl")).map(
        length_only, pool_name="pool", batch_size=100,
        output=skybatch.JsonWriter(f"{bucket}/lengths.jsonl"),
    )  # fmt: skip
    read = {pid: _rchar(pid) - before[pid] for pid in pids}
    # Every worker took part, none read anything like the whole input, and all of
    # them together read it about once (plus HTTP headers and the small results).
    assert all(0 < n < 0.75 * size for n in read.values()), (size, read)
    assert sum(read.values()) < 1.3 * size, (size, read)
    lines = fs.cat_file(f"{bucket}/lengths.jsonl").splitlines()
    assert len(lines) == 20_000 and json.loads(lines[-1]) == {"n": 2007}


def test_failed_job_publishes_no_final_object(cloud: Deployment) -> None:
    fs, bucket = new_bucket("s3")
    fs.pipe_file(f"{bucket}/in.jsonl", jsonl([{"id": i} for i in range(100)]))
    ds = skybatch.Dataset(skybatch.JsonReader(f"{bucket}/in.jsonl"))
    outputs = [skybatch.JsonWriter(f"{bucket}/a.jsonl"), skybatch.JsonWriter(f"{bucket}/b.jsonl")]
    with pytest.raises(JobFailedError, match="row 37 is bad"):
        ds.map(fails_on_37, pool_name="pool", batch_size=10, output=outputs, max_retries=0)
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/a.jsonl") and not fs.exists(f"{bucket}/b.jsonl")


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_staged_output_is_invisible_until_published(
    s3_server: S3Server, gcs_server: GcsServer, scheme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Parts of 5 MiB, doubling every 2 parts: the growth that keeps a huge output
    # under S3's 10,000 parts, exercised on a small one.
    monkeypatch.setattr(storage, "PART_SIZE", 5 * 2**20)
    monkeypatch.setattr(storage, "PARTS_PER_SIZE", 2)
    fs, bucket = new_bucket(scheme)
    url = f"{bucket}/out/big.bin"
    chunk = bytes(range(256)) * 4096  # 1 MiB
    staged = storage.StagedFile(url, None)
    with staged.open() as f:
        for _ in range(40):  # 40 MiB: several parts already uploaded
            f.write(chunk)
    fs.invalidate_cache()
    assert not fs.exists(url)
    staged.publish()
    fs.invalidate_cache()
    assert fs.info(url)["size"] == 40 * len(chunk)
    for mib in (0, 5, 13, 29, 39):
        start = mib * len(chunk) + 7
        assert fs.cat_file(url, start=start, end=start + 300) == (chunk * 2)[7 : 7 + 300]

    # A discarded upload leaves nothing: no object, and on S3 no pending multipart upload.
    dropped = storage.StagedFile(f"{bucket}/out/dropped.bin", None)
    with dropped.open() as f:
        for _ in range(20):
            f.write(chunk)
    dropped.discard()
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/out/dropped.bin")
    if scheme == "s3":
        assert fs.list_multipart_uploads("sb-tests") == []


def _refused(reader: skybatch.JsonReader, writer: skybatch.JsonWriter) -> str:
    before = len(skybatch.jobs_queue())
    with pytest.raises(SkyBatchError) as e:
        skybatch.Dataset(reader).map(copy_id, pool_name="pool", batch_size=1, output=writer)
    assert len(skybatch.jobs_queue()) == before  # refused at submit: no job, no worker
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_submit_validates_object_storage(cloud: Deployment, s3_server: S3Server) -> None:
    fs, bucket = new_bucket("s3")
    fs.pipe_file(f"{bucket}/in.jsonl", jsonl([{"id": 1, "src": 0}]))
    good_in = skybatch.JsonReader(f"{bucket}/in.jsonl")
    good_out = skybatch.JsonWriter(f"{bucket}/out.jsonl")
    wrong = {**s3_server.storage_options(), "secret": "not-the-secret"}
    closed = {**s3_server.storage_options(), "endpoint_url": "http://127.0.0.1:9"}

    msg = _refused(skybatch.JsonReader("s3://no-such-bucket-sb/in.jsonl"), good_out)
    assert msg == (
        "bucket 'no-such-bucket-sb' of s3://no-such-bucket-sb/in.jsonl does not exist; "
        "create it or fix the URL"
    )
    msg = _refused(skybatch.JsonReader(f"{bucket}/missing.jsonl"), good_out)
    assert msg == f"cannot read input {bucket}/missing.jsonl: no such key"
    msg = _refused(skybatch.JsonReader(f"{bucket}/nothing-*.jsonl"), good_out)
    assert msg == f"no input files match {bucket}/nothing-*.jsonl; check the pattern"
    msg = _refused(skybatch.JsonReader(f"{bucket}/in.jsonl", storage_options=wrong), good_out)
    assert msg.startswith(f"cannot read input {bucket}/in.jsonl: access denied; check the creden")
    msg = _refused(skybatch.JsonReader(f"{bucket}/in.jsonl", storage_options=closed), good_out)
    assert msg.startswith(f"cannot read input {bucket}/in.jsonl: cannot reach the storage endpoint")
    assert "endpoint_url" in msg

    msg = _refused(good_in, skybatch.JsonWriter("s3://no-such-bucket-sb/out.jsonl"))
    assert msg == (
        "bucket 'no-such-bucket-sb' of s3://no-such-bucket-sb/out.jsonl does not exist; "
        "create it or fix the URL"
    )
    msg = _refused(good_in, skybatch.JsonWriter(f"{bucket}/out.jsonl", storage_options=wrong))
    assert "access denied" in msg and f"{bucket}/" in msg
    # Secrets never reach the message.
    assert "not-the-secret" not in msg
    fs.invalidate_cache()
    assert objects(fs, bucket) == ["in.jsonl"]  # no probe or staging object left behind


def test_submit_validates_gcs(cloud: Deployment) -> None:
    _, bucket = new_bucket("gs")
    good_out = skybatch.JsonWriter(f"{bucket}/out.jsonl")
    msg = _refused(skybatch.JsonReader("gs://no-such-bucket-sb/in.jsonl"), good_out)
    assert msg == (
        "bucket 'no-such-bucket-sb' of gs://no-such-bucket-sb/in.jsonl does not exist; "
        "create it or fix the URL"
    )
    msg = _refused(skybatch.JsonReader(f"{bucket}/missing.jsonl"), good_out)
    assert msg == f"cannot read input {bucket}/missing.jsonl: no such key"


def test_missing_extra_names_the_pip_install(tmp_path: Path) -> None:
    # A Python without s3fs, as after a plain `pip install skybatch`.
    code = (
        "import sys; sys.modules['s3fs'] = None\n"
        "from skybatch.io import storage\n"
        "try:\n    storage.filesystem('s3://bucket/data.jsonl')\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == (
        "SkyBatchError cannot open s3://bucket/data.jsonl: s3:// support is not installed; "
        "pip install 'skybatch[s3]'"
    )


def _peak_rss(pid: int) -> int:
    """Peak resident memory since the last reset, in bytes (Linux's VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_200mb_output_reduces_with_bounded_server_memory(cloud: Deployment) -> None:
    fs, bucket = new_bucket("s3")
    fs.pipe_file(f"{bucket}/in.jsonl", jsonl([{"id": i} for i in range(2000)]))
    server = cloud.server_pid()
    assert server is not None
    with open(f"/proc/{server}/clear_refs", "w") as f:
        f.write("5")  # reset the peak to now
    base = psutil.Process(server).memory_info().rss
    job = skybatch.Dataset(skybatch.JsonReader(f"{bucket}/in.jsonl")).map(
        blow_up, pool_name="pool", batch_size=50, output=skybatch.JsonWriter(f"{bucket}/big.jsonl")
    )
    assert job.info().status == "SUCCEEDED"
    size = fs.info(f"{bucket}/big.jsonl")["size"]
    assert size > 200_000_000
    peak = _peak_rss(server) - base
    # The output went through the server in 16 MiB parts: its memory grew by a few
    # parts, not by the output's 200 MB.
    assert peak < 80 * 2**20, f"server grew by {peak / 2**20:.0f} MiB reducing {size / 1e6:.0f} MB"
    with fs.open(f"{bucket}/big.jsonl", "rb") as f:
        first = json.loads(f.readline())
    assert first == {"id": 0, "blob": "x" * 100_000}
    tail = fs.cat_file(f"{bucket}/big.jsonl", start=size - 200_000)
    assert json.loads(tail.splitlines()[-1])["id"] == 1999


def test_local_directory_and_glob_inputs(cloud: Deployment, tmp_path: Path) -> None:
    data = tmp_path / "shards"
    data.mkdir()
    (data / "b.jsonl").write_bytes(jsonl([{"id": 3, "src": 1}, {"id": 4, "src": 1}]))
    (data / "a.jsonl.gz").write_bytes(gzip.compress(jsonl([{"id": i, "src": 0} for i in range(3)])))
    (data / "_SUCCESS").write_bytes(b"")
    skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        copy_id,
        pool_name="pool",
        batch_size=2,
        output=skybatch.JsonWriter(str(tmp_path / "o.jsonl")),
    )
    got = [json.loads(line)["id"] for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert got == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl", "shards"]  # no scratch left
    skybatch.Dataset(skybatch.JsonReader(str(data / "*.gz"))).map(
        copy_id,
        pool_name="pool",
        batch_size=2,
        output=skybatch.JsonWriter(str(tmp_path / "g.jsonl")),
    )
    assert len((tmp_path / "g.jsonl").read_text().splitlines()) == 3
    shutil.rmtree(data)
    with pytest.raises(InputError, match="no such file or directory"):
        skybatch.Dataset(skybatch.JsonReader(str(data))).map(
            copy_id, pool_name="pool", batch_size=2, output=skybatch.JsonWriter(str(tmp_path / "x"))
        )


@skybatch.remote_function
def always_fails():
    for _batch in skybatch.load():
        raise RuntimeError("nothing works")


def test_resume_of_a_compressed_input_whose_scratch_is_gone(
    cloud: Deployment, tmp_path: Path
) -> None:
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(jsonl([{"id": i} for i in range(5)])))
    ds = skybatch.Dataset(skybatch.JsonReader(str(tmp_path / "d.jsonl.gz")))
    out = skybatch.JsonWriter(str(tmp_path / "out.jsonl"))
    with pytest.raises(JobFailedError, match="nothing works") as e:
        ds.map(always_fails, pool_name="pool", batch_size=10, output=out, max_retries=0)
    # Nothing committed, so the job's staging area (the decompressed chunks with
    # it) is gone, and resuming says so instead of failing on missing chunks.
    assert not (tmp_path / ".skybatch").exists()
    with pytest.raises(SkyBatchError) as again:
        ds.map(copy_id, pool_name="pool", batch_size=10, output=out, resume=e.value.job_id)
    assert str(again.value) == (
        f"job {e.value.job_id}'s decompressed input was removed with its staging area "
        "(nothing had committed); submit a new job"
    )


@skybatch.remote_function
def draw_and_measure():
    from PIL import Image

    for batch in skybatch.load():
        skybatch.save_results(
            [{"id": int(r["id"]), "image": Image.new("RGB", (8, 8), (int(r["id"]), 0, 0)),
              "name": r["name"]} for r in batch]
        )  # fmt: skip


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_every_format_on_object_storage(cloud: Deployment, scheme: str) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    fs, bucket = new_bucket(scheme)
    fs.pipe_file(f"{bucket}/in.csv", b'id,name\n0,"a, b"\n1,"multi\nline"\n2,c\n3,d\n4,e\n')
    skybatch.Dataset(skybatch.CsvReader(f"{bucket}/in.csv")).map(
        draw_and_measure, pool_name="pool", batch_size=2,
        output=[
            skybatch.ImageWriter(f"{bucket}/img/"),
            skybatch.ParquetWriter(f"{bucket}/out.parquet"),
            skybatch.CsvWriter(f"{bucket}/out.csv", column=["id", "name"]),
            skybatch.JsonWriter(f"{bucket}/shards", shards=True),
        ],
    )  # fmt: skip
    names = [f"{i:08d}.png" for i in range(5)]
    assert objects(fs, f"{bucket}/img") == names
    img = Image.open(io.BytesIO(fs.cat_file(f"{bucket}/img/00000003.png")))
    assert img.getpixel((0, 0)) == (3, 0, 0)
    table = pq.read_table(io.BytesIO(fs.cat_file(f"{bucket}/out.parquet")))
    assert table.to_pylist()[1] == {"id": 1, "image": "00000001.png", "name": "multi\nline"}
    assert table.schema.field("id").type == pa.int64()
    assert fs.cat_file(f"{bucket}/out.csv") == (
        b'id,name\n0,"a, b"\n1,"multi\nline"\n2,c\n3,d\n4,e\n'
    )
    assert objects(fs, f"{bucket}/shards") == [f"part-{i:05d}.jsonl" for i in range(3)]
    # Parquet back in, from the bucket: only the row groups and columns asked for.
    skybatch.Dataset(skybatch.ParquetReader(f"{bucket}/out.parquet", columns=["id"])).map(
        copy_parquet_id, pool_name="pool", batch_size=2,
        output=skybatch.JsonWriter(f"{bucket}/ids.jsonl"),
    )  # fmt: skip
    assert fs.cat_file(f"{bucket}/ids.jsonl") == b"".join(
        f'{{"id":{i}}}\n'.encode() for i in range(5)
    )
    # Nothing staged is left anywhere in the bucket.
    assert not [p for p in objects(fs, bucket) if ".skybatch" in p]


@skybatch.remote_function
def copy_parquet_id():
    for batch in skybatch.load():
        skybatch.save_results([{"id": r["id"]} for r in batch])
