"""SkyPilot's `sky jobs pool ...` / `sky jobs ...` habits on `skybatch pool|jobs ...`: the
lines and exit codes a script ported from Sky Batch relies on."""

from __future__ import annotations

from pathlib import Path

import skybatch
from tests.helpers import Deployment, wait_for, write_jsonl


@skybatch.remote_function
def slow_copy():
    import time

    for batch in skybatch.load():
        time.sleep(0.5)
        skybatch.save_results([{"i": item["i"]} for item in batch])


def test_pool_apply_resize_status_and_down_all(deployment: Deployment, tmp_path: Path) -> None:
    assert deployment.cli("-h").stdout.startswith("Usage: ")
    assert deployment.cli("pool", "apply", "-h").stdout.startswith("Usage: ")
    yaml = tmp_path / "pool.yaml"
    yaml.write_text("pool:\n  workers: 3\nresources:\n  cpus: 1+\n")

    # The YAML's size overridden, then the pool resized without its YAML.
    made = deployment.cli("pool", "apply", str(yaml), "-p", "a", "--workers", "1", "-y")
    assert made.stdout.splitlines() == [
        "Applying pool 'a' (1 workers); waiting for setup...",
        "Successfully created pool 'a'.",
        "Pool 'a' is READY: 1/1 workers ready.",
    ]
    grown = deployment.cli("pool", "apply", "-p", "a", "--workers", "2", "-y")
    assert grown.stdout.splitlines()[1:] == [
        "Successfully updated pool 'a'.",
        "Pool 'a' is READY: 2/2 workers ready.",
    ]
    neither = deployment.cli("pool", "apply", "-p", "a", "-y", check=False)
    assert neither.returncode == 1
    assert neither.stderr == "Error: give pool 'a' a YAML file, or --workers N to resize it\n"
    deployment.cli("pool", "apply", str(yaml), "--pool", "b", "--workers", "1", "-y")

    status = deployment.cli("pool", "status", "a", "b").stdout.splitlines()
    assert status[0].split() == ["POOL", "STATUS", "READY", "PROVIDER", "RESOURCES", "JOBS"]
    assert [line.split()[:3] for line in status[1:3]] == [
        ["a", "READY", "2/2"],
        ["b", "READY", "1/1"],
    ]
    assert "Pool 'a':" in status and "Pool 'b':" in status  # each one's workers follow
    assert [
        line.split()[0] for line in deployment.cli("pool", "status").stdout.splitlines()[1:]
    ] == [
        "a",
        "b",
    ]

    # Without -y (and no terminal to answer) nothing is torn down; the prompt names both.
    asked = deployment.cli("pool", "down", "--all", check=False)
    assert asked.returncode == 1 and "Tear down pool(s) 'a', 'b'?" in asked.stdout
    both = deployment.cli("pool", "down", "-a", "-y")
    assert both.stdout == "Pool 'a' is down.\nPool 'b' is down.\n"
    assert deployment.cli("pool", "down", "--all", "-y").stdout == "No pools to tear down.\n"
    assert deployment.cli("pool", "down", "a", "--all", "-y", check=False).returncode == 2


def test_jobs_queue_cancel_and_logs(deployment: Deployment, tmp_path: Path) -> None:
    deployment.pool("p", workers=1, tmp=tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", [{"i": i} for i in range(40)])

    def submit() -> str:
        job = skybatch.Dataset(skybatch.JsonReader(str(data))).map(
            slow_copy, pool_name="p", batch_size=1, stream=False
        )
        return job.job_id

    first = submit()
    wait_for(lambda: skybatch.Job(first).info().committed_batches >= 1, message="a batch done")
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
    row = queue[1].split()
    assert row[:4] == [first, "slow_copy", "p", "RUNNING"]
    done, total = row[4].split("/")
    assert 1 <= int(done) < 40 and total == "40"
    assert "secs ago" in queue[1] or "min ago" in queue[1]

    # A bulk cancel asks first; with -y it cancels, and again it reports and exits 0.
    asked = deployment.cli("jobs", "cancel", "--pool", "p", check=False)
    assert asked.returncode == 1 and f"Cancel job(s) {first}?" in asked.stdout
    assert deployment.cli("jobs", "cancel", "--pool", "p", "-y").stdout == (
        f"Job {first} cancelled.\n"
    )
    again = deployment.cli("jobs", "cancel", first, "-y")
    assert again.stdout == f"Job {first} already CANCELLED; nothing to cancel.\n"
    assert deployment.cli("jobs", "cancel", "--all", "-y").stdout == "No running jobs to cancel.\n"
    missing = deployment.cli("jobs", "cancel", "999", check=False)
    assert missing.returncode == 1 and missing.stderr.startswith("Error: ")

    second, third = submit(), submit()
    both = deployment.cli("jobs", "cancel", second, third, "-y")
    assert both.stdout == f"Job {second} cancelled.\nJob {third} cancelled.\n"
    assert deployment.cli("jobs", "cancel", "-y", check=False).returncode == 2

    # Logs follow by default: on a finished job that returns at once, as --no-follow does.
    followed = deployment.cli("jobs", "logs", first, timeout=60)
    assert followed.stdout == deployment.cli("jobs", "logs", first, "--no-follow").stdout
