"""Staged files: durable, deterministic temp names, write errors that name the output;
the deployment id that names staging areas."""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from skybatch.config import Home
from skybatch.errors import OutputError
from skybatch.io import storage
from skybatch.io.jsonl import JsonWriter


def test_staged_file_is_synced_before_the_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    staged = storage.StagedFile(str(tmp_path / "out.jsonl"), None, "d-1")
    with staged.open() as out:
        out.write(b"{}\n")
    staged.publish()
    assert events == ["fsync file", "rename", "fsync dir"]
    assert (tmp_path / "out.jsonl").read_bytes() == b"{}\n"


def test_a_restarted_reduce_reuses_and_removes_its_predecessors_temp_file(
    tmp_path: Path,
) -> None:
    url = str(tmp_path / "out.jsonl")
    first = storage.StagedFile(url, None, "d-7")
    assert first.tmp == str(tmp_path / ".out.jsonl.skybatch-d-7.tmp")
    with first.open() as out:
        out.write(b"half of a big output")  # ... and the server is killed here
    again = storage.StagedFile(url, None, "d-7")
    with again.open() as out:
        out.write(b"x")
    again.discard()
    assert os.listdir(tmp_path) == []


def test_a_failed_write_names_the_output_not_the_part_being_read() -> None:
    with open("/dev/full", "wb", buffering=0) as full:
        out = storage._Output(full, "/data/out.jsonl")
        with (
            pytest.raises(OutputError) as e,
            storage.translate_errors("/data/part", "read part", OutputError),
        ):
            out.write(b"row\n")
    assert str(e.value) == "cannot write /data/out.jsonl: no space left on device"


def test_part_writes_are_synced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[bool] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    writer = JsonWriter(str(tmp_path / "out.jsonl"))
    writer._staging = "d"
    os.makedirs(writer.staging_dir(3))
    writer.write_part(3, 0, 1, b"{}\n")
    assert synced == [False, True]  # the part, then its directory
    assert writer.part_path(3, 0, 1) == str(
        tmp_path / ".skybatch" / "d-3" / "out.jsonl" / "00000000.1.jsonl"
    )


def test_deployment_id_is_made_once_private_and_shared(tmp_path: Path) -> None:
    home = Home(tmp_path)
    assert home.read_deployment_id() is None
    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(lambda _: home.deployment_id(), range(16)))
    assert len(ids) == 1
    assert ids == {home.read_deployment_id()}
    assert stat.S_IMODE(home.deployment_file.stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["deployment"]
