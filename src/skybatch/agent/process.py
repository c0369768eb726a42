"""The agent's side of a runner: start it under ``activate_env``, feed it batches."""

from __future__ import annotations

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

from skybatch.agent import runner as runner_module
from skybatch.agent.runner import read_frame, write_frame

__all__ = ["Outcome", "RunnerProcess"]

RUNNER_PATH = runner_module.__file__


@dataclass
class Outcome:
    """What became of one batch in the runner."""

    parts: list[bytes] | None = None  # one per writer, on success
    error: str | None = None
    traceback: str | None = None
    mapper_caused: bool = True

    @property
    def ok(self) -> bool:
        return self.parts is not None


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


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


class RunnerProcess:
    """One runner for one job on one worker; it lives across that job's batches."""

    def __init__(
        self,
        job_id: int,
        init: dict[str, Any],
        activate_env: str | None,
        worker_dir: Path,
        log_path: Path,
    ) -> None:
        self.job_id = job_id
        self.generation = 0  # the job's generation this runner's mapper belongs to
        self.log_path = log_path
        self.killed = False
        log_path.parent.mkdir(parents=True, exist_ok=True)
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        env = dict(os.environ)
        env.pop("SKYBATCH_TOKEN", None)  # user code has no business with the server's token
        env.update(
            SKYBATCH_RUNNER_FDS=f"{to_r},{from_w}",
            SKYBATCH_RUNNER=RUNNER_PATH,
            PYTHONUNBUFFERED="1",
        )
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                _command(activate_env),
                cwd=worker_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(to_r, from_w),
                start_new_session=True,  # so that a kill reaches what the mapper spawned
            )
        os.close(to_r)
        os.close(from_w)
        self._to = os.fdopen(to_w, "wb")
        self._from = os.fdopen(from_r, "rb")
        self.start_error: str | None = None
        try:
            write_frame(self._to, {"type": "init", **init})
            msg = read_frame(self._from)
        except OSError:
            msg = None
        if msg is None:
            code = self.proc.wait()
            self.start_error = (
                f"the runner exited at start with code {code}: {_tail(log_path) or '(no output)'}"
            )
        elif msg[0]["type"] != "ready":
            self.start_error = f"the mapper could not be loaded: {msg[0].get('traceback')}"
            self.close()

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
                    traceback=_tail(self.log_path),
                )
            msg = read_frame(self._from)
        except OSError:
            msg = None
        if msg is None:
            return self._died(index)
        header, data = msg
        if header["type"] == "result":
            parts, pos = [], 0
            for size in header["sizes"]:
                parts.append(data[pos : pos + size])
                pos += size
            assert len(parts) == nwriters
            return Outcome(parts=parts)
        return Outcome(error=header.get("error"), traceback=header.get("traceback"))

    def _died(self, index: int) -> Outcome:
        code = self.proc.wait()
        tail = _tail(self.log_path)
        if code < 0 and not self.killed:
            # Killed by a signal it did not send itself (OOM killer, an operator): not
            # the mapper's fault, so it costs no retry (up to a cap).
            name = (
                signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else code
            )
            return Outcome(
                error=f"the runner was killed by {name} during batch {index}",
                traceback=tail,
                mapper_caused=False,
            )
        return Outcome(
            error=f"the runner exited with code {code} during batch {index} "
            "(the mapper crashed or called os._exit)",
            traceback=tail,
        )

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
