"""Pools: setup once per worker, resize, setup failure, workdir, YAML errors, down."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

import skybatch
from tests.helpers import Deployment, read_jsonl, wait_for, write_jsonl


@skybatch.remote_function
def copy_text():
    for batch in skybatch.load():
        skybatch.save_results([{"text": item["text"]} for item in batch])


@skybatch.remote_function
def shout_with_workdir_helper():
    import helper

    for batch in skybatch.load():
        skybatch.save_results([{"text": helper.shout(item["text"])} for item in batch])


def run_small_job(tmp_path: Path, pool: str, name: str, n: int = 6) -> list[dict[str, object]]:
    data = write_jsonl(tmp_path / f"{name}.in.jsonl", [{"text": f"r{i}"} for i in range(n)])
    out = tmp_path / f"{name}.jsonl"
    skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        copy_text, pool_name=pool, batch_size=1, output=skybatch.JsonWriter(str(out))
    )
    return read_jsonl(out)


def setup_yaml(tmp_path: Path, counter: Path, workers: int, marker: str = "v1") -> Path:
    path = tmp_path / "pool.yaml"
    path.write_text(
        f"pool:\n  workers: {workers}\nresources:\n  cpus: 1+\n"
        f"envs:\n  COUNTER: {counter}\n"
        f'setup: echo "$SKYBATCH_WORKER_INDEX {marker}" >> "$COUNTER"\n'
    )
    return path


def test_setup_runs_once_per_worker_across_jobs_and_restart(
    deployment: Deployment, tmp_path: Path
) -> None:
    counter = tmp_path / "setups.txt"
    skybatch.pool_apply(str(setup_yaml(tmp_path, counter, 2)), "p")
    assert sorted(counter.read_text().split("\n")[:-1]) == ["0 v1", "1 v1"]
    run_small_job(tmp_path, "p", "a")
    run_small_job(tmp_path, "p", "b")
    assert sorted(counter.read_text().split("\n")[:-1]) == ["0 v1", "1 v1"]
    # A server restart relaunches the agents, which find their setup done.
    deployment.cli("server", "stop")
    deployment.cli("server", "start")
    wait_for(lambda: skybatch.pool_status("p")[0].ready == 2, message="pool back after restart")
    assert run_small_job(tmp_path, "p", "c") == [{"text": f"r{i}"} for i in range(6)]
    assert sorted(counter.read_text().split("\n")[:-1]) == ["0 v1", "1 v1"]
    # Changing the setup text runs it again.
    skybatch.pool_apply(str(setup_yaml(tmp_path, counter, 2, marker="v2")), "p")
    lines = sorted(counter.read_text().split("\n")[:-1])
    assert lines == ["0 v1", "0 v2", "1 v1", "1 v2"]


def test_resize_up_and_down(deployment: Deployment, tmp_path: Path) -> None:
    counter = tmp_path / "setups.txt"
    skybatch.pool_apply(str(setup_yaml(tmp_path, counter, 2)), "p")
    first = {w.index: w.pid for w in skybatch.pool_status("p")[0].worker_list}
    view = skybatch.pool_apply(str(setup_yaml(tmp_path, counter, 3)), "p")
    assert (view.workers, view.ready) == (3, 3)
    now = {w.index: w.pid for w in view.worker_list}
    assert now[0] == first[0] and now[1] == first[1], "resizing must not restart workers"
    assert sorted(counter.read_text().split("\n")[:-1]) == ["0 v1", "1 v1", "2 v1"]
    view = skybatch.pool_apply(str(setup_yaml(tmp_path, counter, 1)), "p")
    assert (view.workers, view.ready) == (1, 1)
    assert [w.index for w in view.worker_list] == [0]
    for index in (1, 2):
        wait_for(lambda i=index: not psutil.pid_exists(now[i]), message=f"worker {index} to stop")
    assert run_small_job(tmp_path, "p", "after") == [{"text": f"r{i}"} for i in range(6)]


def test_setup_failure_reports_output_and_blocks_jobs(
    deployment: Deployment, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("pool:\n  workers: 1\nsetup: |\n  echo installing-things\n  exit 3\n")
    with pytest.raises(skybatch.PoolError) as e:
        skybatch.pool_apply(str(bad), "p")
    assert "setup failed on worker 0 with exit code 3 (last output: 'installing-things')" in str(
        e.value
    )
    assert "\n" not in str(e.value)
    log = deployment.root / "logs" / "pools" / "p" / "worker-0.log"
    assert str(log) in str(e.value) and "installing-things" in log.read_text()
    assert skybatch.pool_status("p")[0].status == "FAILED"
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    with pytest.raises(skybatch.PoolError, match="failed to set up"):
        skybatch.Dataset(skybatch.JsonReader(str(data))).map(
            copy_text,
            pool_name="p",
            batch_size=1,
            output=skybatch.JsonWriter(str(tmp_path / "o.jsonl")),
        )
    good = tmp_path / "good.yaml"
    good.write_text("pool:\n  workers: 1\nsetup: echo fixed\n")
    assert skybatch.pool_apply(str(good), "p").status == "READY"


def test_workdir_is_copied_and_importable(deployment: Deployment, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "helper.py").write_text("def shout(s):\n    return s.upper() + '!'\n")
    yaml_path = tmp_path / "pool.yaml"
    yaml_path.write_text("pool:\n  workers: 2\nworkdir: src\n")  # relative to the YAML file
    skybatch.pool_apply(str(yaml_path), "p")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hi"}, {"text": "yo"}])
    skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        shout_with_workdir_helper,
        pool_name="p",
        batch_size=1,
        output=skybatch.JsonWriter(str(tmp_path / "o.jsonl")),
    )
    assert read_jsonl(tmp_path / "o.jsonl") == [{"text": "HI!"}, {"text": "YO!"}]


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("pool:\n  worker: 2\n", "line 2: unknown field 'pool.worker'; allowed here: workers"),
        (
            "pool:\n  workers: 0\n",
            "line 2: pool.workers: Input should be greater than or equal to 1",
        ),
        (
            "pool:\n  workers: 1\nresources:\n  cpus: lots\n",
            "line 4: resources.cpus: expected a CPU count such as 2 (exactly) or 2+ (at least)",
        ),
        (
            "pool:\n  workers: 1\nresources:\n  accelerators: L4:zero\n",
            "line 4: resources.accelerators: expected a GPU type and count such as L4:1",
        ),
        ("pool: [\n", "not valid YAML"),
        ("resources:\n  cpus: 2\n", "missing required field 'pool'"),
        ("pool:\n  workers: 1\nworkdir: nowhere\n", "workdir: "),
    ],
)
def test_pool_yaml_errors_are_one_clear_line(
    deployment: Deployment, tmp_path: Path, yaml_text: str, expected: str
) -> None:
    path = tmp_path / "pool.yaml"
    path.write_text(yaml_text)
    proc = deployment.cli("pool", "apply", str(path), "--pool", "p", "-y", check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"Error: {path}")
    assert expected in proc.stderr
    assert proc.stderr.count("\n") == 1, "one line, no traceback"


def test_pool_down_stops_agents_and_forgets_pool(deployment: Deployment, tmp_path: Path) -> None:
    deployment.pool("p", workers=2, tmp=tmp_path)
    pids = [w.pid for w in skybatch.pool_status("p")[0].worker_list]
    proc = deployment.cli("pool", "down", "p", "-y")
    assert "Pool 'p' is down." in proc.stdout
    for pid in pids:
        assert pid is not None
        wait_for(lambda p=pid: not psutil.pid_exists(p), message=f"agent {pid} to exit")
    assert skybatch.pool_status() == []
    proc = deployment.cli("pool", "down", "p", "-y", check=False)
    assert proc.returncode == 1
    assert "Error: no pool named 'p'" in proc.stderr
