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
from skybatch.io.formats.jsonl import JsonWriter


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


def test_a_part_write_returns_its_size_unsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Parts are checked by size at the reduce instead of synced (io/base.py write_part).
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    writer = JsonWriter(str(tmp_path / "out.jsonl"))
    writer._staging = "d"
    os.makedirs(writer.staging_dir(3))
    assert writer.write_part(3, 0, 1, b'{"a":1}\n') == 8
    assert synced == []
    part = tmp_path / ".skybatch" / "d-3" / "out.jsonl" / "00000000.1.jsonl"
    assert writer.part_path(3, 0, 1) == str(part)
    assert part.read_bytes() == b'{"a":1}\n'


def test_deployment_id_is_made_once_private_and_shared(tmp_path: Path) -> None:
    home = Home(tmp_path)
    assert home.read_deployment_id() is None
    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(lambda _: home.deployment_id(), range(16)))
    assert len(ids) == 1
    assert ids == {home.read_deployment_id()}
    assert stat.S_IMODE(home.deployment_file.stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["deployment"]


def test_a_link_planted_at_the_temp_name_is_replaced_not_written_through(
    tmp_path: Path,
) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    precious.chmod(0o600)
    url = str(tmp_path / "out.jsonl")
    staged = storage.StagedFile(url, None, "d-1")
    os.symlink(precious, staged.tmp)  # another user's, in a shared directory
    with staged.open() as out:
        out.write(b"{}\n")
    staged.publish()
    assert precious.read_text() == "keep me"
    assert not os.path.islink(url)
    assert Path(url).read_bytes() == b"{}\n"


def test_a_temp_name_taken_again_while_replaced_fails_the_reduce(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    url = str(tmp_path / "out.jsonl")
    staged = storage.StagedFile(url, None, "d-1")
    os.symlink(precious, staged.tmp)
    real_unlink = os.unlink

    def unlink_and_race(path: str) -> None:
        real_unlink(path)
        os.symlink(precious, path)  # the other user is quicker than our open

    monkeypatch.setattr(os, "unlink", unlink_and_race)
    with pytest.raises(OutputError) as e, staged.open() as out:
        out.write(b"{}\n")
    assert str(e.value) == (
        f"cannot write {url}: {staged.tmp} was created again by another process while "
        f"skybatch replaced it; check who else writes in {tmp_path}"
    )
    assert precious.read_text() == "keep me"


def test_a_part_is_never_written_through_a_planted_link(tmp_path: Path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    writer = JsonWriter(str(tmp_path / "out.jsonl"))
    writer._staging = "d"
    os.makedirs(writer.staging_dir(3))
    part = writer.part_path(3, 0, 1)
    os.symlink(precious, part)
    writer.write_part(3, 0, 1, b"{}\n")
    assert precious.read_text() == "keep me"
    assert not os.path.islink(part) and Path(part).read_bytes() == b"{}\n"
    writer.write_part(3, 0, 1, b"[]\n")  # the same attempt again (after a full disk)
    assert Path(part).read_bytes() == b"[]\n"


def test_a_new_staging_root_is_ours_alone_beside_a_sticky_shared_area(tmp_path: Path) -> None:
    writer = JsonWriter(str(tmp_path / "out.jsonl"))
    writer._staging = "d"
    writer.prepare(1, overwrite=False)
    area, root = tmp_path / ".skybatch", tmp_path / ".skybatch" / "d-1"
    assert stat.S_IMODE(area.stat().st_mode) == 0o1777
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    root.chmod(0o755)  # made by an older skybatch: ours, closed to writes; tightened
    writer.prepare(1, overwrite=True)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_a_staging_root_planted_by_someone_else_is_refused(tmp_path: Path) -> None:
    writer = JsonWriter(str(tmp_path / "out.jsonl"))
    writer._staging = "d"
    area, root = tmp_path / ".skybatch", tmp_path / ".skybatch" / "d-1"
    root.mkdir(parents=True)
    area.chmod(0o1777)
    os.chown(root, 4321, 4321)
    with pytest.raises(OutputError) as e:
        writer.prepare(1, overwrite=False)
    assert str(e.value) == (
        f"staging area {root} was made by uid 4321, not you (uid 0), so its parts may be "
        "someone else's; remove it and submit the job again"
    )
    os.chown(root, 0, 0)
    root.chmod(0o777)
    with pytest.raises(OutputError) as e:
        writer.prepare(1, overwrite=False)
    assert str(e.value) == (
        f"staging area {root} is writable by others (mode 0777), so its parts may have been "
        "changed; remove it and submit the job again"
    )
    root.rmdir()
    os.symlink(tmp_path, root)
    with pytest.raises(OutputError, match="is not a directory"):
        writer.prepare(1, overwrite=False)
    root.unlink()
    area.chmod(0o777)
    os.chown(area, 4321, 4321)
    with pytest.raises(OutputError) as e:
        writer.prepare(1, overwrite=False)
    assert str(e.value) == (
        f"staging directory {area} belongs to uid 4321, not you (uid 0), and is not sticky "
        "(mode 0777), so others could swap this job's staging area; remove it, or choose "
        "another output directory"
    )
    assert os.listdir(area) == []


def test_moved_parts_reach_the_disk_before_they_are_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Parts are written unsynced; a shard or image published by a rename must be synced
    # first, or a crash after the job's success could leave it empty.
    staging = tmp_path / "staging"
    (staging / "images").mkdir(parents=True)
    (staging / "a.jsonl").write_bytes(b'{"a":1}\n')
    (staging / "images" / "0.png").write_bytes(b"png")
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "out"
    moves = [
        (str(staging / "a.jsonl"), str(out / "part-00000.jsonl")),
        (str(staging / "images"), str(out / "images")),
    ]
    storage.StagedMoves(str(out), moves, None).publish()
    assert sorted(synced) == [str(staging / "a.jsonl"), str(staging / "images" / "0.png")]
    assert (out / "part-00000.jsonl").read_bytes() == b'{"a":1}\n'
    assert (out / "images" / "0.png").read_bytes() == b"png"
