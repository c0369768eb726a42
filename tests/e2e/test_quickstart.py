"""The README's quickstart, exactly as a user types it, through the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO, Deployment

EXAMPLE = REPO / "examples" / "quickstart"


def test_quickstart_through_the_cli(deployment: Deployment, tmp_path: Path) -> None:
    # The example's own files, as a user copies them.
    for name in ("pool.yaml", "data.jsonl", "my_script.py"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    proc = deployment.cli("pool", "apply", "pool.yaml", "--pool", "my-pool", "-y", cwd=tmp_path)
    assert "Pool 'my-pool' is READY: 2/2 workers ready." in proc.stdout
    run = subprocess.run(
        [sys.executable, "my_script.py"],
        cwd=tmp_path,
        env=deployment.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "4/4" in run.stderr and "100%" in run.stderr  # the progress bar
    assert (tmp_path / "out.jsonl").read_text() == (
        '{"output":"hellohello"}\n{"output":"worldworld"}\n'
        '{"output":"skysky"}\n{"output":"batchbatch"}\n'
    )
    queue = deployment.cli("jobs", "queue").stdout.splitlines()
    assert queue[0].split() == [
        "ID",
        "NAME",
        "POOL",
        "STATUS",
        "PROGRESS",
        "ROWS",
        "SUBMITTED",
        "DURATION",
    ]
    assert queue[1].split()[:6] == ["1", "double_text", "my-pool", "SUCCEEDED", "2/2", "4/4"]
    status = deployment.cli("pool", "status").stdout
    assert "my-pool" in status and "READY" in status and "2/2" in status
    assert "Pool 'my-pool' is down." in deployment.cli("pool", "down", "my-pool", "-y").stdout
    # Running the script again without overwrite is refused with one line, output intact.
    again = subprocess.run(
        [sys.executable, "my_script.py"],
        cwd=tmp_path,
        env=deployment.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 1
    assert "no pool named 'my-pool'" in again.stderr
    assert (tmp_path / "out.jsonl").read_text().count("\n") == 4
