"""Who is trusted: a home, a token or a parent another user made is refused; ours is
closed to others; mappers cannot reach the token; state.db deleted under a running
server comes back.

A second unix user is created for a test (useradd) and removed after it (userdel).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import skybatch
from skybatch.client.api import close_clients
from skybatch.config import Home
from skybatch.errors import ConfigError
from skybatch.server.daemon import read_server_info
from tests.conftest import Deployment, deployment_at, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creating a second user needs root")

FIX_HOME = "remove it or set SKYBATCH_HOME to a directory of your own"


@pytest.fixture
def other_user() -> Iterator[tuple[str, int]]:
    name = f"sbt{secrets.token_hex(4)}"
    subprocess.run(
        ["useradd", "--no-create-home", "--shell", "/bin/sh", name],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        yield name, pwd.getpwnam(name).pw_uid
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True, timeout=30)


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory both users can write, sticky like /tmp (pytest's tmp_path is root's)."""
    path = Path(tempfile.mkdtemp(prefix="skybatch-trust-", dir="/tmp"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_user(name: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", name, "--", *cmd],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=30,
    )


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "skybatch.cli", *args],
        env={**os.environ, "SKYBATCH_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def server_direct(home: Path) -> subprocess.CompletedProcess[str]:
    """The server started by hand, not through a client's checks."""
    return subprocess.run(
        [sys.executable, "-m", "skybatch.server", "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def stop_by_pid(home: Path) -> None:
    """Stop a server a failing test may have started in a home the client now refuses."""
    info = read_server_info(Home(home))
    if info is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(info.pid, signal.SIGTERM)
    with contextlib.suppress(psutil.Error):
        psutil.Process(info.pid).wait(timeout=30)


def test_a_home_another_user_made_is_refused(other_user: tuple[str, int], base: Path) -> None:
    name, uid = other_user
    home = base / "home"
    made = as_user(
        name,
        "sh",
        "-c",
        f"mkdir -m 0777 {home} && echo planted > {home}/token && chmod 0600 {home}/token",
    )
    assert made.returncode == 0, made.stderr
    expected = f"SKYBATCH_HOME {home} is owned by uid {uid}, not you (uid 0); {FIX_HOME}"
    try:
        for args in (
            ("server", "start"),
            ("pool", "status"),
            ("jobs", "queue"),
            ("server", "status"),
            ("server", "stop"),
        ):
            proc = cli(home, *args)
            assert (proc.returncode, proc.stderr) == (1, f"Error: {expected}\n"), args
        direct = server_direct(home)
        assert (direct.returncode, direct.stderr) == (1, f"Error: {expected}\n")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SKYBATCH_HOME", str(home))
            with pytest.raises(ConfigError) as err:
                skybatch.jobs_queue()
            assert str(err.value) == expected
        # No server came up with the planted token; nothing of ours was written there.
        assert sorted(os.listdir(home)) == ["token"]
        assert (home / "token").read_text() == "planted\n"
    finally:
        close_clients()
        stop_by_pid(home)


def test_a_home_inside_another_users_directory_is_refused(
    other_user: tuple[str, int], base: Path
) -> None:
    name, uid = other_user
    theirs = base / "theirs"
    assert as_user(name, "mkdir", "-m", "0755", str(theirs)).returncode == 0
    home = theirs / "home"
    try:
        proc = cli(home, "server", "start")
        assert proc.returncode == 1
        assert proc.stderr == (
            f"Error: SKYBATCH_HOME {home} lies inside {theirs}, which uid {uid} owns, not you "
            "(uid 0); set SKYBATCH_HOME to a directory of your own\n"
        )
        assert not home.exists()
    finally:
        stop_by_pid(home)


def test_a_token_we_did_not_make_is_refused(other_user: tuple[str, int], base: Path) -> None:
    _, uid = other_user
    home = base / "home"
    home.mkdir(mode=0o700)
    token = home / "token"
    token.write_text("planted")
    os.chown(token, uid, uid)
    token.chmod(0o600)
    try:
        owned = (
            f"Error: token file {token} is owned by uid {uid}, not you (uid 0); remove it; "
            "the server makes a new one when it starts\n"
        )
        for proc in (cli(home, "server", "start"), server_direct(home)):
            assert (proc.returncode, proc.stderr) == (1, owned)
        assert not (home / "server.json").exists()

        os.chown(token, 0, 0)
        token.chmod(0o644)
        proc = cli(home, "jobs", "queue")
        assert (proc.returncode, proc.stderr) == (
            1,
            f"Error: token file {token} is open to others (mode 0644), so it may not be yours "
            "alone; remove it and restart the server (`skybatch server stop`, then any command)\n",
        )
        assert not (home / "server.json").exists()

        token.unlink()
        assert cli(home, "server", "start").returncode == 0
        assert token.read_text() != "planted"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
    finally:
        stop_by_pid(home)


@skybatch.remote_function
def double():
    for batch in skybatch.load():
        skybatch.save_results([{"n": r["n"] * 2} for r in batch])


def test_our_home_left_open_is_closed_to_others(
    other_user: tuple[str, int], base: Path, tmp_path: Path
) -> None:
    name, _ = other_user
    with deployment_at(base / "home") as d:
        d.pool("p", workers=1, tmp=tmp_path)
        job = skybatch.Dataset.from_items([{"n": 1}, {"n": 2}]).map(
            double, pool_name="p", batch_size=1
        )
        assert job.results() == [{"n": 2}, {"n": 4}]
        (results,) = d.root.glob("jobs/*/results.jsonl")
        d.stop()
        # As an older skybatch (or a umask of 022) left it: readable by everyone.
        for path in (d.root, d.root / "logs", results.parent.parent, results.parent):
            path.chmod(0o755)
        for path in (d.home.db, d.home.server_log, results):
            path.chmod(0o644)
        assert as_user(name, "cat", str(d.home.db)).returncode == 0  # the leak, before

        d.cli("server", "start")
        assert stat.S_IMODE(d.root.stat().st_mode) == 0o700
        assert stat.S_IMODE((d.root / "logs").stat().st_mode) == 0o700
        for path in (d.home.token_file, d.home.db, d.home.server_log):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        for path in (d.home.db, d.home.token_file, d.home.server_log, results):
            read = as_user(name, "cat", str(path))
            assert read.returncode == 1 and "Permission denied" in read.stderr, path
        assert as_user(name, "ls", str(d.root)).returncode != 0
        # Nothing was lost on the way.
        assert skybatch.Job(job.job_id).results() == [{"n": 2}, {"n": 4}]


@skybatch.remote_function
def snoop():
    import os

    for batch in skybatch.load():
        out = []
        for row in batch:
            seen = {"environ": repr(sorted(os.environ.items()))}
            paths = {
                "home_env": os.path.join(os.environ.get("SKYBATCH_HOME", "/nonexistent"), "token"),
                "given": row["token_path"],
                "parent_environ": f"/proc/{os.getppid()}/environ",
                "relative": "../../../token",
            }
            for label, path in paths.items():
                try:
                    with open(path, "rb") as f:
                        seen[label] = f.read().decode(errors="replace")
                except OSError as e:
                    seen[label] = f"{type(e).__name__}"
            out.append(seen)
        skybatch.save_results(out)


def test_the_mapper_cannot_read_the_token(deployment: Deployment, tmp_path: Path) -> None:
    deployment.pool("p", workers=1, tmp=tmp_path)
    token = deployment.home.token_file.read_text()
    path = str(deployment.home.token_file)
    rows = (
        skybatch.Dataset.from_items([{"token_path": path}] * 2)
        .map(snoop, pool_name="p", batch_size=1)
        .results()
    )
    assert len(rows) == 2
    for row in rows:
        assert token not in json.dumps(row), row
        assert row["home_env"] == "FileNotFoundError"  # SKYBATCH_HOME is not set for it
        assert row["given"] == "" and row["relative"] == ""  # /dev/null lies over the token
        assert "SKYBATCH_WORKER_INDEX" in row["parent_environ"]  # it did read the agent's
    logs = "".join(p.read_text() for p in (deployment.root / "logs").rglob("*.log"))
    assert "cannot hide" not in logs and token not in logs


@skybatch.remote_function
def slow_double():
    import time

    for batch in skybatch.load():
        time.sleep(0.2)
        skybatch.save_results([{"n": r["n"] * 2} for r in batch])


def test_state_db_deleted_under_a_running_server_comes_back(
    deployment: Deployment, tmp_path: Path
) -> None:
    deployment.pool("p", workers=1, tmp=tmp_path)
    job = skybatch.Dataset.from_items([{"n": n} for n in range(20)]).map(
        slow_double, pool_name="p", batch_size=1, stream=False
    )
    wait_for(lambda: skybatch.jobs_queue()[0].committed_batches >= 3, message="a few commits")
    db = deployment.home.db
    before = db.stat().st_ino
    db.unlink()
    wait_for(db.exists, timeout=10, message="state.db to be restored")
    assert db.stat().st_ino != before
    job.wait(timeout=60)
    assert job.results() == [{"n": n * 2} for n in range(20)]
    log = deployment.home.server_log.read_text()
    assert f"{db} was deleted while the server ran; restored it from the open database" in log

    # A restart reads the restored file: the job and the pool are still there.
    server = deployment.server_pid()
    deployment.cli("server", "stop")
    assert server is not None
    wait_for(lambda: not psutil.pid_exists(server), message="server to exit")
    (view,) = skybatch.jobs_queue()
    assert (view.id, view.status, view.committed_rows) == (int(job.job_id), "SUCCEEDED", 20)
    wait_for(lambda: skybatch.pool_status("p")[0].status == "READY", message="pool back")
    assert skybatch.Job(job.job_id).results() == [{"n": n * 2} for n in range(20)]
