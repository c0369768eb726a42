"""Output claims: one spelling per location, and no job writes inside another's output."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from skybatch.io import storage
from skybatch.server.sqlite import SqliteStore
from skybatch.server.store import OutputClaimed, output_key, overlap

SPEC = {"max_retries": 3, "retry_backoff": 2.0, "writers": []}


def test_resolve_reads_file_urls_as_the_paths_they_name(tmp_path: Path) -> None:
    # Before: file://localhost/... named <cwd>/localhost/...
    assert storage.resolve("file://localhost/tmp/x/a.jsonl") == "/tmp/x/a.jsonl"
    assert storage.resolve("file:///tmp/x/a.jsonl") == "/tmp/x/a.jsonl"
    assert storage.resolve("local:///tmp/x/a.jsonl") == "/tmp/x/a.jsonl"
    assert storage.resolve("s3://b/k") == "s3://b/k"


def test_output_key_spells_each_location_once(tmp_path: Path) -> None:
    real = tmp_path / "o"
    real.mkdir()
    os.symlink(real, tmp_path / "olink")
    out = str(real / "out.jsonl")
    # Before: each spelling was claimed on its own, so two jobs wrote one file.
    for spelling in (
        out,
        str(tmp_path / "olink" / "out.jsonl"),
        f"local://{out}",
        f"file://{out}",
        f"file://localhost{out}",
        str(real) + "//out.jsonl",
    ):
        assert output_key(spelling) == out, spelling
    # Components that do not exist yet keep their names.
    assert output_key(str(tmp_path / "olink" / "new" / "x.csv")) == str(real / "new" / "x.csv")
    assert output_key("s3://bucket/dir/") == "s3://bucket/dir"
    assert output_key("s3a://bucket/k") == "s3://bucket/k"
    assert output_key("gcs://bucket/k") == "gs://bucket/k"


def test_overlap_is_a_directory_and_what_it_holds() -> None:
    assert overlap("/x/out", "/x/out") == "/x/out"
    assert (
        overlap("/x/out", "/x/out/part-00000.jsonl")
        == "/x/out, which holds /x/out/part-00000.jsonl"
    )
    assert overlap("/x/out/a", "/x/out") == "/x/out/a, inside /x/out"
    assert overlap("/x/out", "/x/out2") is None
    assert overlap("/x/out2", "/x/out") is None


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    return SqliteStore(tmp_path / "state.db")


@pytest.mark.parametrize(
    ("held", "wanted", "message"),
    [
        (
            "/x/sh/out",
            "/x/sh/out/part-00000.jsonl",
            "/x/sh/out, which holds /x/sh/out/part-00000.jsonl",
        ),
        ("/x/sh/out/part-00000.jsonl", "/x/sh", "/x/sh/out/part-00000.jsonl, inside /x/sh"),
        ("/x/a.jsonl", "/x/a.jsonl", "/x/a.jsonl"),
        ("s3://b/dir", "s3://b/dir/k.jsonl", "s3://b/dir, which holds s3://b/dir/k.jsonl"),
    ],
)
def test_a_claim_conflicts_with_what_holds_it_or_lies_inside(
    store: SqliteStore, held: str, wanted: str, message: str
) -> None:
    first = store.create_job("a", "p", SPEC, now=0, outputs=[held])
    # Before: only the same string conflicted; a shards directory and a file in it
    # were both accepted, and the first publish removed the second's staging area.
    with pytest.raises(OutputClaimed) as e:
        store.create_job("b", "p", SPEC, now=1, outputs=[wanted])
    assert str(e.value) == f"job {first} is already writing {message}"
    assert [j.id for j in store.list_jobs()] == [first]  # the refused job was not recorded


@pytest.mark.parametrize(
    ("held", "wanted"),
    [
        ("/x/a_b", "/x/aXb/out.jsonl"),  # LIKE would read _ as any character
        ("/x/a%", "/x/abc/out.jsonl"),  # and % as any run of them
        ("/x/out", "/x/out2/a.jsonl"),
        ("/x/out.jsonl", "/x/out.jsonl.bak"),
        ("s3://b/dir", "s3://b/dir2/k"),
    ],
)
def test_siblings_and_similar_names_do_not_conflict(
    store: SqliteStore, held: str, wanted: str
) -> None:
    store.create_job("a", "p", SPEC, now=0, outputs=[held])
    store.create_job("b", "p", SPEC, now=1, outputs=[wanted])


def test_a_job_keeps_its_own_claims_when_reopened(store: SqliteStore) -> None:
    from skybatch.states import JobStatus

    job = store.create_job("a", "p", SPEC, now=0, outputs=["/x/out", "/x/errors.jsonl"])
    store.set_job_status(job, JobStatus.CANCELLED, now=1)
    other = store.create_job("b", "p", SPEC, now=2, outputs=["/x/out/part-00000.jsonl"])
    with pytest.raises(OutputClaimed) as e:
        store.reopen_job(job, "p", SPEC, now=3, outputs=["/x/out", "/x/errors.jsonl"])
    assert (e.value.job_id, e.value.path) == (other, "/x/out/part-00000.jsonl")
    assert store.get_job(job).status is JobStatus.CANCELLED
    store.set_job_status(other, JobStatus.CANCELLED, now=4)
    assert store.reopen_job(job, "p", SPEC, now=5, outputs=["/x/out", "/x/errors.jsonl"])
