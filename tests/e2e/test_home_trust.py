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
import sqlite3
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import skybatch
from skybatch.agent import process
from skybatch.client.api import close_clients
from skybatch.config import Home, read_server_info
from skybatch.errors import ConfigError
from tests.helpers import Deployment, deployment_at, wait_for

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
    import json
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
                "state": row["db_path"],
            }
            for label, path in paths.items():
                try:
                    with open(path, "rb") as f:
                        seen[label] = f.read().decode(errors="replace")
                except OSError as e:
                    seen[label] = f"{type(e).__name__}"
            seen["home"] = sorted(os.listdir(row["home"]))
            with open("mapper-was-here", "w") as f:
                f.write("in its worker directory")
            # The attack: point the user's next client call at a listener of ours.
            fake = {"pid": row["server_pid"], "url": "http://127.0.0.1:9", "port": 9}
            try:
                with open(row["server_json"], "w") as f:
                    json.dump(fake, f)
                seen["server_json"] = "written"
            except OSError as e:
                seen["server_json"] = type(e).__name__
            out.append(seen)
        skybatch.save_results(out)


def test_the_mapper_cannot_reach_the_home(deployment: Deployment, tmp_path: Path) -> None:
    deployment.pool("p", workers=1, tmp=tmp_path)
    home = deployment.home
    token = home.token_file.read_text()
    server_json = home.server_file.read_bytes()
    row = {
        "token_path": str(home.token_file),
        "db_path": str(home.db),
        "server_json": str(home.server_file),
        "server_pid": deployment.server_pid(),
        "home": str(home.root),
    }
    rows = skybatch.Dataset.from_items([row] * 2).map(snoop, pool_name="p", batch_size=1).results()
    assert len(rows) == 2
    for seen in rows:
        assert token not in json.dumps(seen), seen
        assert seen["home_env"] == "FileNotFoundError"  # SKYBATCH_HOME is not set for it
        # An empty tmpfs lies over the home: only the worker's own directory is there.
        for label in ("given", "relative", "state"):
            assert seen[label] == "FileNotFoundError", label
        # (server.json, once the runner's first batch wrote it into the tmpfs)
        assert set(seen["home"]) <= {"pools", "server.json"}
        assert seen["server_json"] == "written"  # root may: into its private tmpfs
        assert "SKYBATCH_WORKER_INDEX" in seen["parent_environ"]  # it did read the agent's
    assert home.server_file.read_bytes() == server_json
    # Its worker directory is the real one.
    (mark,) = (home.root / "pools" / "p").glob("*/mapper-was-here")
    assert mark.read_text() == "in its worker directory"
    (view,) = skybatch.jobs_queue()
    assert view.status == "SUCCEEDED"
    logs = "".join(p.read_text() for p in (deployment.root / "logs").rglob("*.log"))
    assert "cannot hide" not in logs and token not in logs


def test_the_mask_holds_for_a_mapper_of_another_user(
    other_user: tuple[str, int], base: Path
) -> None:
    """The unprivileged path (user namespaces), run as a second user through the shell
    (our Python lives where that user cannot read it)."""
    name, uid = other_user
    home = base / "home"
    worker = home / "pools" / "p" / "worker-0"
    worker.mkdir(parents=True)
    (home / "token").write_text("secret")
    (home / "server.json").write_text("{}")
    (worker / "mine").write_text("mine")
    for path in (home, *home.rglob("*")):
        os.chown(path, uid, uid)
    home.chmod(0o700)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "getuid", lambda: uid)
        mp.setattr(os, "getgid", lambda: pwd.getpwnam(name).pw_gid)
        prefix = process._hiding_commands()["user"]
    probe = as_user(name, "unshare", "--user", "--map-root-user", "true")
    if probe.returncode != 0:
        pytest.skip(f"no user namespaces for unprivileged users here: {probe.stderr.strip()}")
    attack = (
        "id -u; cat mine; cat ../../../token; cat $0/token; echo evil > $0/server.json; "
        "umount $0 2>/dev/null && echo unmounted; cat $0/token; echo ok > theirs"
    )
    mapper = ["sh", "-c", attack, str(home)]
    proc = subprocess.run(
        ["runuser", "-u", name, "--", *prefix, str(home), "pools/p/worker-0", *mapper],
        cwd=worker,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.stdout.splitlines() == [str(uid), "mine"], proc.stderr
    assert "secret" not in proc.stdout
    assert (home / "server.json").read_text() == "{}"
    assert (worker / "theirs").read_text() == "ok\n"  # its own directory is the real one


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


@skybatch.remote_function
def tag():
    for batch in skybatch.load():
        skybatch.save_results([{"n": r["n"], "by": "job"} for r in batch])


def test_a_staging_area_planted_by_another_user_is_refused(
    other_user: tuple[str, int], base: Path, tmp_path: Path
) -> None:
    name, uid = other_user
    shared = base / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"n": n}) + "\n" for n in range(4)))
    with deployment_at(base / "home") as d:
        d.pool("p", workers=1, tmp=tmp_path)
        dep = d.home.read_deployment_id()
        root = shared / ".skybatch" / f"{dep}-1"
        # Before the job exists, the other user makes its staging area, open to all.
        plant = f"mkdir -m 1777 {root.parent} && mkdir -m 0777 {root} {root}/out.jsonl"
        made = as_user(name, "sh", "-c", plant)
        assert made.returncode == 0, made.stderr
        with pytest.raises(skybatch.OutputError) as err:
            skybatch.Dataset(skybatch.JsonReader(str(data))).map(
                tag, pool_name="p", batch_size=2,
                output=skybatch.JsonWriter(str(shared / "out.jsonl")),
            )  # fmt: skip
        assert str(err.value) == (
            f"staging area {root} was made by uid {uid}, not you (uid 0), so its parts may be "
            "someone else's; remove it and submit the job again"
        )
        assert skybatch.jobs_queue() == []
        assert not (shared / "out.jsonl").exists()

        # Without it, our staging area is ours alone, in a sticky shared one.
        # (the refused submit's cleanup may have removed it already)
        shutil.rmtree(shared / ".skybatch", ignore_errors=True)
        job = skybatch.Dataset(skybatch.JsonReader(str(data))).map(
            tag, pool_name="p", batch_size=2, stream=False,
            output=skybatch.JsonWriter(str(shared / "out.jsonl")),
        )  # fmt: skip
        wait_for(lambda: (shared / ".skybatch").exists(), message="the staging area")
        assert job.wait(timeout=60).info().status == "SUCCEEDED"
        assert [json.loads(line) for line in (shared / "out.jsonl").read_text().splitlines()] == [
            {"n": n, "by": "job"} for n in range(4)
        ]


def test_the_home_deleted_under_a_running_server(deployment: Deployment, tmp_path: Path) -> None:
    deployment.pool("p", workers=1, tmp=tmp_path)
    job = skybatch.Dataset.from_items([{"n": 1}, {"n": 2}]).map(double, pool_name="p", batch_size=1)
    assert job.results() == [{"n": 2}, {"n": 4}]
    home = deployment.home
    token = home.token_file.read_text()
    server = deployment.server_pid()
    assert server is not None
    with sqlite3.connect(home.db) as db:
        handles = [json.loads(h) for (h,) in db.execute("SELECT handle FROM workers")]
    agents = [h["pid"] for h in handles]
    assert agents and all(psutil.pid_exists(pid) for pid in agents)
    close_clients()

    shutil.rmtree(home.root)
    # The server puts the home back, then stops with its agents.
    for pid in (server, *agents):
        wait_for(lambda pid=pid: not _running(pid), timeout=30, message=f"pid {pid} to exit")
    assert "state.db" in os.listdir(home.root)
    assert home.token_file.read_text() == token
    assert stat.S_IMODE(home.token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.root.stat().st_mode) == 0o700
    log = home.server_log.read_text()
    assert f"SKYBATCH_HOME {home.root} was deleted while the server ran; restored" in log

    # The next command starts a server from the restored state.
    queue = deployment.cli("jobs", "queue").stdout
    assert f"{job.job_id}" in queue and "SUCCEEDED" in queue, queue
    assert deployment.server_pid() not in (None, server)
    for path in (home.server_file, home.server_lock, home.start_lock):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    wait_for(lambda: skybatch.pool_status("p")[0].status == "READY", message="the pool back")


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
