"""Sky Batch's quickstart, simple example and smoke tests (tests/smoke_tests/test_batch.py),
ported by the rename rule: ``sky.batch.`` → ``skybatch.``, ``sky jobs pool ...`` →
``skybatch pool ...``, ``sky jobs ...`` → ``skybatch jobs ...``.

Scripts run as files in a subprocess and the CLI runs in ``bash`` with its pipes and greps,
as a user (and SkyPilot's smoke tests) would. The differences every scenario shares:

- local files in place of ``s3://`` buckets (no cloud credentials here; the bucket's
  create and delete steps go with them);
- ``pool apply`` without ``--infra``: the provider comes from the pool YAML;
- Sky Batch's shell loops (``sleep 5`` up to N times) are ``wait_for`` with a deadline
  around the same ``skybatch jobs queue | grep/awk`` pipeline;
- the launcher's mapper sleeps per batch (``_DELAY``) where a scenario must catch the job
  mid-flight: local workers finish in a second what cloud workers take minutes for.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import skybatch
from tests.helpers import REPO, Deployment, wait_for, write_jsonl

_SIMPLE = REPO / "examples" / "skybatch_compat" / "simple"


@skybatch.remote_function
def double_text() -> None:
    for batch in skybatch.load():
        skybatch.save_results([{"text": r["text"], "output": r["text"] * 2} for r in batch])


def sh(
    d: Deployment, cmd: str, cwd: Path | None = None, check: bool = True, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """One smoke-test step: a bash command line with ``skybatch`` and ``python`` on PATH."""
    env = {**d.env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", "-c", cmd],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd!r} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@contextmanager
def background(
    d: Deployment, script: Path, log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``python script &``: stopped by its PID on the way out if still running."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(script)],
            env={**d.env(), **(env or {})},
            cwd=script.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def create_pool(d: Deployment, name: str, yaml: Path) -> None:
    # Sky Batch's step, less --infra: `s=$(sky jobs pool apply -p ...); grep "Successfully ..."`.
    sh(
        d,
        f's=$(skybatch pool apply -p {name} {yaml} -y); echo "$s"; '
        f'echo "$s" | grep "Successfully created pool"',
    )


def queue_line(d: Deployment, pool: str) -> str:
    return sh(d, f'skybatch jobs queue | grep "{pool}" | head -1', check=False).stdout


def completed(d: Deployment, pool: str) -> int:
    """Sky Batch's way to read progress: the first ``N/M`` on the pool's queue line."""
    progress = sh(
        d,
        f'skybatch jobs queue 2>/dev/null | grep "{pool}" | head -1 '
        f'| grep -oE "[0-9]+/[0-9]+" | head -1',
        check=False,
    ).stdout.strip()
    return int(progress.split("/")[0]) if progress else 0


def running_job(d: Deployment, pool: str) -> str:
    return sh(
        d,
        f'skybatch jobs queue 2>/dev/null | grep "{pool}" | '
        "awk '$1 ~ /^[0-9]+$/ && /RUNNING/ {print $1; exit}'",
        check=False,
    ).stdout.strip()


def job_status_is(d: Deployment, job_id: str, status: str) -> bool:
    cmd = f"skybatch jobs queue | awk -v id=\"{job_id}\" '$1 == id' | grep -q {status}"
    return sh(d, cmd, check=False).returncode == 0


# The smoke tests' launcher (a file, for the mapper's source), with resume_from from the
# environment. ``{delay}`` is this port's pacing sleep (see the module docstring).
_LAUNCHER = """\
import os, skybatch
pool_name = {pool!r}
input_path = {input!r}
output_path = {output!r}

@skybatch.remote_function
def double_text():
    import time
    for batch in skybatch.load():
        time.sleep({delay})
        results = [{{'text': item.get('text', ''),
                     'output': item.get('text', '') * 2}}
                    for item in batch]
        skybatch.save_results(results)

resume_from = os.environ.get('RESUME_FROM')
resume_from = int(resume_from) if resume_from else None
ds = skybatch.Dataset(skybatch.JsonReader(input_path))
ds.map(
    double_text,
    pool_name=pool_name,
    batch_size=2,
    output=skybatch.JsonWriter(output_path),
    resume_from=resume_from,
)
"""


def launcher(tmp: Path, pool: str, delay: float) -> Path:
    script = tmp / "launcher.py"
    script.write_text(
        _LAUNCHER.format(
            pool=pool,
            input=str(tmp / "test.jsonl"),
            output=str(tmp / "output.jsonl"),
            delay=delay,
        )
    )
    return script


def texts(n: int, prefix: str = "item_", start: int = 0) -> list[dict[str, str]]:
    return [{"text": f"{prefix}{i}"} for i in range(start, start + n)]


def assert_doubled(output: Path, expected: set[str]) -> None:
    # The smoke tests' PYEOF check: every line parses, has both keys, output == text * 2.
    results = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(results) == len(expected)
    for r in results:
        assert r["output"] == r["text"] * 2, r
    assert {r["text"] for r in results} == expected


# --- The docs' quickstart ---------------------------------------------------------------

_QUICKSTART = """\
import skybatch

# 1. Point to your input data
ds = skybatch.Dataset(skybatch.JsonReader("data.jsonl"))

# 2. Define your processing function
@skybatch.remote_function
def double_text():
    for batch in skybatch.load():
        results = [{"output": item["text"] * 2} for item in batch]
        skybatch.save_results(results)

# 3. Run it
ds.map(
    double_text,
    pool_name="my-pool",
    batch_size=2,
    output=skybatch.JsonWriter("output.jsonl"),
)
"""


def test_docs_quickstart(deployment: Deployment, tmp_path: Path) -> None:
    """The quickstart's three steps; ``data.jsonl``/``output.jsonl`` in place of s3:// URLs."""
    (tmp_path / "data.jsonl").write_text(
        '{"text": "hello"}\n{"text": "world"}\n{"text": "sky"}\n{"text": "batch"}\n'
    )
    (tmp_path / "pool.yaml").write_text(
        'pool:\n  workers: 2\n\nresources:\n  cpus: 1+\n\nsetup: echo "Setup complete!"\n'
    )
    sh(deployment, "skybatch pool apply pool.yaml --pool my-pool -y", cwd=tmp_path)
    (tmp_path / "my_script.py").write_text(_QUICKSTART)
    sh(deployment, "python my_script.py", cwd=tmp_path)
    assert (tmp_path / "output.jsonl").read_text() == (
        '{"output":"hellohello"}\n{"output":"worldworld"}\n'
        '{"output":"skysky"}\n{"output":"batchbatch"}\n'
    )


# --- test_batch_simple -------------------------------------------------------------------


def test_batch_simple(deployment: Deployment, tmp_path: Path) -> None:
    pool = "batch-smpl-pool"
    create_pool(deployment, pool, _SIMPLE / "pool.yaml")
    write_jsonl(tmp_path / "test.jsonl", texts(50, "word_", start=1))
    env = f"SKY_BATCH_DIR={tmp_path} BATCH_POOL_NAME={pool}"
    ran = sh(deployment, f"{env} python {_SIMPLE / 'double_text.py'}")
    assert "Total results: 50" in ran.stdout

    sh(deployment, "skybatch jobs queue | grep 'STATUS' | grep 'PROGRESS' | grep 'POOL'")
    sh(deployment, f'skybatch jobs queue | grep "{pool}" | grep SUCCEEDED')
    out = tmp_path / "output.jsonl"
    sh(deployment, f"test $(wc -l < {out}) -eq 50")
    for word in ("word_1word_1", "word_25word_25", "word_50word_50"):
        sh(deployment, f'grep "{word}" {out}')
    assert_doubled(out, {f"word_{i}" for i in range(1, 51)})


# --- test_batch_cancel and test_batch_resume --------------------------------------------


def test_batch_cancel_then_resume_from(deployment: Deployment, tmp_path: Path) -> None:
    """Cancel with ``-y`` once 5 batches are done, then ``resume_from=`` the cancelled job."""
    pool = "batch-rsm-pool"
    create_pool(deployment, pool, _SIMPLE / "pool.yaml")
    write_jsonl(tmp_path / "test.jsonl", texts(40))
    script = launcher(tmp_path, pool, delay=1.0)

    with background(deployment, script, tmp_path / "bg.log") as bg:
        job_id = wait_for(lambda: running_job(deployment, pool), 90, "a RUNNING job")
        wait_for(lambda: completed(deployment, pool) >= 5, 120, "5 batches done")
        sh(deployment, f"skybatch jobs cancel {job_id} -y")
        bg.wait(timeout=60)
    sh(deployment, f'skybatch jobs queue | grep "{pool}" | grep CANCELLED')
    assert completed(deployment, pool) < 20, "cancelled before the end"

    sh(deployment, f"RESUME_FROM={job_id} python {script}")
    sh(deployment, f'skybatch jobs queue | grep "{pool}" | grep SUCCEEDED')
    sh(deployment, f"test $(wc -l < {tmp_path / 'output.jsonl'}) -eq 40")
    assert_doubled(tmp_path / "output.jsonl", {f"item_{i}" for i in range(40)})


# --- test_batch_resume_failed -------------------------------------------------------------

_FAILING = """\
import os, skybatch
pool_name = {pool!r}
input_path = {input!r}
output_path = {output!r}

@skybatch.remote_function
def failing_mapper():
    for batch in skybatch.load():
        results = []
        for item in batch:
            text = item.get('text', '')
            if text.startswith('FAIL_'):
                raise RuntimeError('Deliberate failure')
            results.append({{'text': text, 'output': text * 2}})
        skybatch.save_results(results)

ds = skybatch.Dataset(skybatch.JsonReader(input_path))
ds.map(
    failing_mapper,
    pool_name=pool_name,
    batch_size=2,
    output=skybatch.JsonWriter(output_path),
)
"""


def test_batch_resume_failed(deployment: Deployment, tmp_path: Path) -> None:
    """A mapper that fails on rows 4-5 fails the job; a fixed one resumes it to the end."""
    pool = "batch-rsmf-pool"
    create_pool(deployment, pool, _SIMPLE / "pool.yaml")
    rows = [*texts(4), {"text": "FAIL_0"}, {"text": "FAIL_1"}, *texts(14, start=4)]
    write_jsonl(tmp_path / "test.jsonl", rows)
    fail = tmp_path / "fail_launcher.py"
    fail.write_text(
        _FAILING.format(
            pool=pool, input=str(tmp_path / "test.jsonl"), output=str(tmp_path / "output.jsonl")
        )
    )
    failed = sh(deployment, f"python {fail}", check=False)
    assert failed.returncode == 1
    assert "Deliberate failure" in failed.stderr
    job_id = sh(
        deployment,
        f"skybatch jobs queue | grep \"{pool}\" | awk '$1 ~ /^[0-9]+$/ {{print $1; exit}}'",
    ).stdout.strip()
    assert job_status_is(deployment, job_id, "FAILED")

    resume = launcher(tmp_path, pool, delay=0)
    sh(deployment, f"RESUME_FROM={job_id} python {resume}")
    sh(deployment, f'skybatch jobs queue | grep "{pool}" | grep SUCCEEDED')
    sh(deployment, f"test $(wc -l < {tmp_path / 'output.jsonl'}) -eq 20")
    assert_doubled(
        tmp_path / "output.jsonl", {f"item_{i}" for i in range(18)} | {"FAIL_0", "FAIL_1"}
    )


# --- test_batch_resume_running_guard ------------------------------------------------------


def test_batch_resume_running_guard(deployment: Deployment, tmp_path: Path) -> None:
    """Resuming a RUNNING job is refused; once cancelled, it resumes."""
    pool = "batch-rsgd-pool"
    create_pool(deployment, pool, _SIMPLE / "pool.yaml")
    write_jsonl(tmp_path / "test.jsonl", texts(20))
    script = launcher(tmp_path, pool, delay=2.0)

    with background(deployment, script, tmp_path / "bg.log"):
        job_id = wait_for(lambda: running_job(deployment, pool), 90, "a RUNNING job")
        refused = sh(deployment, f"RESUME_FROM={job_id} python {script}", check=False)
        assert refused.returncode != 0, "resume from RUNNING should have failed"
        # What a ported script catches: a ValueError naming the state and what resumes.
        ds = skybatch.Dataset(skybatch.JsonReader(str(tmp_path / "test.jsonl")))
        with pytest.raises(ValueError, match=r"is RUNNING; only a failed or cancelled job"):
            ds.map(double_text, pool_name=pool, batch_size=2, resume_from=int(job_id))
        assert "is RUNNING; only a failed or cancelled job resumes" in refused.stderr

        sh(deployment, f"skybatch jobs cancel {job_id} -y")
        wait_for(lambda: job_status_is(deployment, job_id, "CANCELLED"), 60, "CANCELLED")

    sh(deployment, f"RESUME_FROM={job_id} python {script}")
    sh(deployment, f'skybatch jobs queue | grep "{pool}" | grep SUCCEEDED')
    sh(deployment, f"test $(wc -l < {tmp_path / 'output.jsonl'}) -eq 20")
    assert_doubled(tmp_path / "output.jsonl", {f"item_{i}" for i in range(20)})


# --- test_batch_ha_kill_running -----------------------------------------------------------


def test_batch_controller_killed_mid_job(deployment: Deployment, tmp_path: Path) -> None:
    """SIGKILL the server (Sky Batch's jobs controller) mid-job: progress is kept, the job
    completes, and the script that streams it finishes as if nothing happened."""
    pool = "test-batch-pool"
    create_pool(deployment, pool, _SIMPLE / "pool.yaml")
    write_jsonl(tmp_path / "test.jsonl", texts(60, "word_", start=1))
    script = launcher(tmp_path, pool, delay=0.5)

    with background(deployment, script, tmp_path / "bg.log") as bg:
        wait_for(lambda: "RUNNING" in queue_line(deployment, pool), 180, "a RUNNING job")
        wait_for(lambda: completed(deployment, pool) >= 3, 120, "3 batches done")
        before = completed(deployment, pool)
        pid = deployment.server_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        # The next client call (this queue, or the streaming script) starts a new server.

        def settled() -> str | None:
            line = queue_line(deployment, pool)
            assert "FAILED" not in line, f"batch job FAILED after recovery: {line}"
            if "SUCCEEDED" in line:
                return line
            if "RUNNING" in line:
                assert completed(deployment, pool) >= before, "progress went backwards"
            return None

        wait_for(settled, 180, "SUCCEEDED after the kill")
        assert bg.wait(timeout=60) == 0, (tmp_path / "bg.log").read_text()
    assert deployment.server_pid() != pid
    sh(deployment, f"test $(wc -l < {tmp_path / 'output.jsonl'}) -eq 60")
    assert_doubled(tmp_path / "output.jsonl", {f"word_{i}" for i in range(1, 61)})
