"""Output claims: one spelling per location. Conflicts between jobs' claims are part of
the store contract (tests/contract/test_store.py)."""

from __future__ import annotations

import os
from pathlib import Path

from skybatch.io import storage
from skybatch.server.store import output_key, overlap


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
