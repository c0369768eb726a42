"""The agent's side of a runner: start it under ``activate_env``, feed it batches."""

from __future__ import annotations

import collections
import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skybatch.runner import main as runner_script
from skybatch.runner.main import read_frame, write_frame

__all__ = ["Outcome", "RunnerProcess"]

RUNNER_PATH = runner_script.__file__

#: What a spare runner may print before it has a job (kept for that job's log).
LOG_LIMIT_UNTIL_STARTED = 1 << 20
#: How long a runner taken over by the next job may take to finish the last one.
END_WAIT = 30.0
#: How long a spare no job wants may take to start (and so to exit) before it is killed.
RETIRE_WAIT = 600.0


@dataclass
class Outcome:
    """What became of one batch in the runner."""

    parts: list[bytes] | None = None  # one per writer, on success
    error: str | None = None
    traceback: str | None = None
    mapper_caused: bool = True
    signal: int | None = None  # the signal that killed the runner, if one did
    #: A line of the batch's input (from 0) that is not a JSON object: the input's fault.
    input_line: int | None = None

    @property
    def ok(self) -> bool:
        return self.parts is not None

    @property
    def kind(self) -> str:
        """What the server is told caused the failure."""
        if self.signal is not None:
            return "signal"
        if self.input_line is not None:
            return "input"
        return "mapper" if self.mapper_caused else "system"


class Output:
    """A job's runner output on this worker, held in memory until the agent ships it.

    Never on the worker's disk: a mapper's print must not fail (or fill the disk)
    because the worker's file system is full. Bounded: past ``limit`` bytes the
    oldest output is dropped and counted (like the server's rotation, the latest
    output is what is kept), and the agent puts a marker line where the gap is.
    """

    TAIL = 3000  # bytes kept for error messages (a crash, a timeout)

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._dropped = 0
        self._tail = b""

    def add(self, data: bytes) -> None:
        with self._lock:
            self._tail = (self._tail + data)[-self.TAIL :]
            self._chunks.append(data)
            self._size += len(data)
            if self._size <= self.limit:
                return
            while self._size > self.limit:
                first = self._chunks.popleft()
                self._size -= len(first)
                self._dropped += len(first)
            # Start what is kept at a line, not in the middle of one.
            first = self._chunks[0] if self._chunks else b""
            cut = first.find(b"\n") + 1
            if 0 < cut < len(first):
                self._chunks[0] = first[cut:]
                self._size -= cut
                self._dropped += cut

    def take(self, size: int) -> tuple[bytes, int]:
        """The count of bytes dropped since the last call, if any (they come first);
        else up to ``size`` bytes to ship."""
        with self._lock:
            if self._dropped:
                dropped, self._dropped = self._dropped, 0
                return b"", dropped
            out: list[bytes] = []
            taken = 0
            while self._chunks and taken < size:
                chunk = self._chunks.popleft()
                if taken + len(chunk) > size:
                    self._chunks.appendleft(chunk[size - taken :])
                    chunk = chunk[: size - taken]
                out.append(chunk)
                taken += len(chunk)
            self._size -= taken
            return b"".join(out), 0

    def lose(self, count: int) -> None:
        """Shipping ``count`` bytes (the oldest held) failed: count them as dropped."""
        with self._lock:
            self._dropped += count

    def empty(self) -> bool:
        with self._lock:
            return not self._chunks and not self._dropped

    def tail(self) -> str:
        with self._lock:
            return self._tail.decode(errors="replace").strip()


class _OutputPipe:
    """Copies a runner's stdout and stderr from a pipe into its job's :class:`Output`."""

    def __init__(self, fd: int, output: Output) -> None:
        self.fd = fd
        self.output = output
        self._lock = threading.Lock()  # a drain and the reader never split one read
        os.set_blocking(fd, False)
        self._eof = False
        threading.Thread(target=self._read_loop, name="runner-output", daemon=True).start()

    def _read_once(self) -> bool:
        """Read what the pipe holds now; False at its end (the runner and its children exited)."""
        with self._lock:
            while not self._eof:
                try:
                    data = os.read(self.fd, 65536)
                except BlockingIOError:
                    return True
                except OSError:
                    data = b""
                if not data:
                    self._eof = True
                    os.close(self.fd)
                    break
                self.output.add(data)
            return False

    def _read_loop(self) -> None:
        while not self._eof:
            with contextlib.suppress(OSError, ValueError):
                select.select([self.fd], [], [], 1.0)
            if not self._read_once():
                return

    def drain(self) -> None:
        """Take in everything written so far (the runner wrote it before its last frame)."""
        self._read_once()

    def adopt(self, output: Output, keep_held: bool) -> None:
        """From now on copy into ``output``; ``keep_held``: what the one until now holds
        (a spare's, before it had a job) goes first into the new one."""
        with self._lock:
            held, self.output = self.output, output
            while keep_held:
                data, _ = held.take(1 << 20)
                if not data:
                    break
                output.add(data)


def _command(activate_env: str | None) -> list[str]:
    if not activate_env:
        return [sys.executable, "-u", RUNNER_PATH]
    # A function, so that a multi-line activate_env that fails is caught as a whole.
    script = (
        "__skybatch_activate() {\n"
        f"{activate_env}\n"
        "}\n"
        '__skybatch_activate || { code=$?; echo "skybatch: activate_env failed with exit code '
        '$code" >&2; exit 97; }\n'
        'if command -v python >/dev/null 2>&1; then exec python -u "$SKYBATCH_RUNNER"; '
        'else exec python3 -u "$SKYBATCH_RUNNER"; fi\n'
    )
    return ["bash", "-c", script]


#: How to hide the home from runners here, found once per agent: "" where nothing works.
_hiding: str | None = None

#: Run with the home as $0 and the worker directory (relative to it, or "") as $1, in
#: the worker directory: an empty tmpfs goes over the whole home (its token, server.json,
#: state.db: a mapper that can rewrite server.json can send the user's next client call,
#: token and all, to a listener of its own), then the worker directory is bound back at
#: its path, reached through the cwd ("." still names it; not canonicalized, as its path
#: names the tmpfs by then), and entered through the bind, so that ".." leads into the
#: empty tmpfs and not back into the home. The namespace ends with the runner.
_MASK = (
    'mount -t tmpfs -o mode=0700,size=1m skybatch-home "$0" && '
    'if [ -n "$1" ]; then mkdir -p "$0/$1" && '
    'mount --no-canonicalize --bind . "$0/$1" && cd "$0/$1"; fi && '
    "shift && exec "
)


def _hiding_commands() -> dict[str, list[str]]:
    return {
        # root: a private mount namespace is enough.
        "root": [
            "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _MASK + '"$@"'
        ],
        # Others: mount needs root in a user namespace of its own; the runner then goes
        # into a nested one that maps our uid back, so the mapper runs as itself (and,
        # holding no capability over the mount namespace, cannot unmount the mask).
        "user": [
            "unshare",
            "--map-root-user",
            "--mount",
            "--",
            "sh",
            "-c",
            _MASK + f'unshare --user --map-user={os.getuid()} --map-group={os.getgid()} -- "$@"',
        ],
    }  # fmt: skip


def _hiding_prefix(home: Path, worker_dir: Path) -> list[str] | None:
    """A command prefix that runs the rest, in ``worker_dir``, in a private mount
    namespace where ``home`` is empty but for ``worker_dir``; None where the kernel or
    the tools do not allow it."""
    global _hiding
    commands = _hiding_commands()
    try:
        inside = str(worker_dir.resolve().relative_to(home.resolve()))
    except ValueError:
        inside = ""  # a worker directory elsewhere stays where it is
    if inside == ".":
        inside = ""
    if _hiding is None:
        kind = "root" if os.geteuid() == 0 else "user"
        try:
            probe = subprocess.run(
                [*commands[kind], str(home), inside, "true"],
                cwd=worker_dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=10,
                check=False,
            )
            _hiding = kind if probe.returncode == 0 else ""
        except (OSError, subprocess.TimeoutExpired):
            _hiding = ""
    if not _hiding:
        return None
    return [*commands[_hiding], str(home), inside]


class RunnerProcess:
    """One runner for one job on one worker; it lives across that job's batches.

    Started before its job is known (a *spare*: the agent keeps one ready, so that a
    job's first batch does not wait for a Python to start), then given its job by
    :meth:`start`."""

    def __init__(self, activate_env: str | None, worker_dir: Path) -> None:
        self.activate_env = activate_env
        self.job_id: int | None = None
        self.init: dict[str, Any] | None = None
        self.ended = False  # its job's mapper has returned; it waits for another job
        self.generation = 0  # the job's generation this runner's mapper belongs to
        self.killed = False
        # Until it has a job, what it prints (an activate_env's chatter) waits here.
        output = Output(LOG_LIMIT_UNTIL_STARTED)
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        env = dict(os.environ)
        # User code has no business with the server's token, nor with where it lies.
        env.pop("SKYBATCH_TOKEN", None)
        home = env.pop("SKYBATCH_HOME", None)
        env.update(
            SKYBATCH_RUNNER_FDS=f"{to_r},{from_w}",
            SKYBATCH_RUNNER=RUNNER_PATH,
            PYTHONUNBUFFERED="1",
        )
        command = _command(activate_env)
        if home and os.path.isdir(home):
            prefix = _hiding_prefix(Path(home), worker_dir)
            if prefix is None:
                output.add(
                    f"skybatch: warning: cannot hide {home} from the mapper (no mount "
                    "namespace here), so it can read the server's token and rewrite "
                    "server.json\n".encode()
                )
            command = (prefix or []) + command
        out_r, out_w = os.pipe()
        self.proc = subprocess.Popen(
            command,
            cwd=worker_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out_w,
            stderr=subprocess.STDOUT,
            pass_fds=(to_r, from_w),
            start_new_session=True,  # so that a kill reaches what the mapper spawned
        )
        os.close(to_r)
        os.close(from_w)
        os.close(out_w)
        self._output = _OutputPipe(out_r, output)
        self._to = os.fdopen(to_w, "wb")
        self._from = os.fdopen(from_r, "rb")
        self.start_error: str | None = None

    def start(self, job_id: int, init: dict[str, Any], output: Output) -> None:
        """Give the runner its job: the mapper to load, and where its output goes."""
        self.job_id = job_id
        self.init = init
        self._output.adopt(output, keep_held=True)
        try:
            write_frame(self._to, {"type": "init", **init})
            msg = read_frame(self._from)
        except OSError:
            msg = None
        if msg is None:
            code = self.proc.wait()
            self.start_error = (
                f"the runner exited at start with code {code}: {self._tail() or '(no output)'}"
            )
        elif msg[0]["type"] != "ready":
            self.start_error = f"the mapper could not be loaded: {msg[0].get('traceback')}"
            self.close()

    def finish(self) -> bool:
        """End the job's mapper (its loop returns; what it held is freed; what it does
        after the loop is that job's, in its log): the runner then waits, its imports
        loaded, for a next job with this init. False if it did not get there (killed)."""
        try:
            write_frame(self._to, {"type": "end"})
            answered = select.select([self._from], [], [], END_WAIT)[0]
            msg = read_frame(self._from) if answered else None
        except OSError:
            msg = None
        self._output.drain()
        if msg is None or msg[0]["type"] != "ended":
            self.kill()
            return False
        self.ended = True
        return True

    def next_job(self, job_id: int, output: Output) -> bool:
        """Serve another job whose init is this one's, ending the last one's mapper first
        if it still runs (see :meth:`finish`): a fresh mapper, in a new namespace, takes
        the new job's batches; the process and its imports stay, so a short job starts
        no Python. False if the runner did not get there: use another."""
        if not self.ended and not self.finish():
            return False
        self.ended = False
        self.job_id = job_id
        self._output.adopt(output, keep_held=False)  # the old job's stays its own
        return True

    def alive(self) -> bool:
        return self.start_error is None and self.proc.poll() is None

    def run(
        self, index: int, row_start: int, payload: bytes, nwriters: int, timeout: float | None
    ) -> Outcome:
        if self.start_error is not None:
            return Outcome(error=self.start_error)
        try:
            write_frame(
                self._to, {"type": "batch", "index": index, "row_start": row_start}, payload
            )
            if timeout is not None and not select.select([self._from], [], [], timeout)[0]:
                self.kill()
                self.proc.wait()
                return Outcome(
                    error=f"batch {index} ran longer than batch_timeout={timeout:g}s; "
                    "its runner was killed",
                    traceback=self._tail(),
                )
            msg = read_frame(self._from)
        except OSError:
            msg = None
        if msg is None:
            return self._died(index)
        header, data = msg
        # The runner flushed its output before this frame: take it in, so that it is
        # shipped with (before) the batch's commit.
        self._output.drain()
        if header["type"] == "result":
            parts, pos = [], 0
            for size in header["sizes"]:
                parts.append(data[pos : pos + size])
                pos += size
            assert len(parts) == nwriters
            return Outcome(parts=parts)
        return Outcome(
            error=header.get("error"),
            traceback=header.get("traceback"),
            input_line=header.get("line"),
        )

    def _died(self, index: int) -> Outcome:
        code = self.proc.wait()
        tail = self._tail()
        if code < 0 and not self.killed:
            # Killed by a signal the agent did not send: from outside (OOM killer, an
            # operator), or the mapper crashed its process (SIGSEGV). The server tells
            # them apart by whether the same batch dies again.
            number = -code
            name = (
                signal.Signals(number).name
                if number in signal.Signals._value2member_map_
                else "a signal"
            )
            return Outcome(
                error=f"the runner was killed by {name} (signal {number}) during batch {index}",
                traceback=tail,
                mapper_caused=False,
                signal=number,
            )
        return Outcome(
            error=f"the runner exited with code {code} during batch {index} "
            "(the mapper crashed or called os._exit)",
            traceback=tail,
        )

    def _tail(self) -> str:
        self._output.drain()
        return self._output.output.tail()

    def kill(self) -> None:
        self.killed = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def stop(self, grace: float) -> None:
        """SIGTERM now (the mapper may clean up), SIGKILL if it still runs after ``grace``."""
        self.killed = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGTERM)

        def kill_if_running() -> None:
            if self.proc.poll() is None:
                self.kill()

        timer = threading.Timer(grace, kill_if_running)
        timer.daemon = True
        timer.start()

    def retire(self) -> None:
        """A spare not wanted: its input ends, so it exits once started (an
        ``activate_env`` in progress, an install say, is not cut short)."""
        with contextlib.suppress(OSError):
            self._to.close()

        def reap() -> None:
            try:
                self.proc.wait(timeout=RETIRE_WAIT)
            except subprocess.TimeoutExpired:
                self.kill()
                self.proc.wait()
            with contextlib.suppress(OSError):
                self._from.close()

        threading.Thread(target=reap, name="retire-runner", daemon=True).start()

    def close(self, grace: float = 3.0) -> None:
        """Let the runner finish (end of input), then kill it if it lingers."""
        with contextlib.suppress(OSError):
            self._to.close()
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
        with contextlib.suppress(OSError):
            self._from.close()
