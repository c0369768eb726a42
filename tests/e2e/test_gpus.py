"""GPU placement on the local provider, with a fake ``nvidia-smi`` on the server's PATH
(the one stand-in allowed: no GPU here). Workers, runners and the server are real."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

import skybatch
from skybatch.errors import PoolSpecError
from tests.helpers import Deployment, read_jsonl, wait_for, write_jsonl

_FAKE_NVIDIA_SMI = """#!{python}
import os
import sys

# What nvidia-smi prints for --query-gpu=FIELDS --format=csv[,noheader][,nounits].
GPUS = {gpus!r}
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
fields = args["--query-gpu"].split(",")
options = args["--format"].split(",")
assert options[0] == "csv", options
units = "nounits" not in options
if "noheader" not in options:
    print(", ".join(f + (" [MiB]" if f == "memory.total" and units else "") for f in fields))
# Each test host is a network namespace: its GPUs get UUIDs of their own, as real ones
# do, and one host named two ways shows the same UUIDs.
machine = int(os.readlink("/proc/self/ns/net").strip("net:[]"))
for i, (name, mib) in enumerate(GPUS):
    values = {{
        "index": str(i),
        "name": name,
        "memory.total": f"{{mib}} MiB" if units else str(mib),
        "uuid": f"GPU-{{i:08d}}-0000-0000-0000-{{machine:012d}}",
    }}
    print(", ".join(values[f] for f in fields))
"""

L4 = ("NVIDIA L4", 23034)
L4_ROW = "NVIDIA L4 (22 GiB, {})"


@pytest.fixture
def four_l4(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with four L4s, as nvidia-smi tells the server started after this."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text(_FAKE_NVIDIA_SMI.format(python=sys.executable, gpus=[L4] * 4))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def pool_yaml(tmp_path: Path, name: str, workers: int, accelerators: str | None) -> str:
    path = tmp_path / f"{name}.yaml"
    gpus = f"  accelerators: {accelerators}\n" if accelerators else ""
    path.write_text(f"pool:\n  workers: {workers}\nresources:\n  cpus: 1+\n{gpus}")
    return str(path)


@skybatch.remote_function
def visible_gpus():
    import os
    import time

    for batch in skybatch.load():
        time.sleep(0.05)  # long enough that every worker takes batches
        skybatch.save_results(
            [
                {
                    "i": item["i"],
                    "gpus": os.environ["CUDA_VISIBLE_DEVICES"],
                    "order": os.environ.get("CUDA_DEVICE_ORDER"),
                }
                for item in batch
            ]
        )


def run_job(tmp_path: Path, pool: str, n: int) -> list[dict[str, object]]:
    data = write_jsonl(tmp_path / f"{pool}.in.jsonl", [{"i": i} for i in range(n)])
    out = tmp_path / f"{pool}.out.jsonl"
    skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        visible_gpus, pool_name=pool, batch_size=1, output=skybatch.JsonWriter(str(out))
    )
    rows = read_jsonl(out)
    assert [r["i"] for r in rows] == list(range(n))
    return rows


def gpus_by_index(pool: str) -> dict[int, list[int]]:
    return {w.index: w.gpus for w in skybatch.pool_status(pool)[0].worker_list}


def test_workers_get_disjoint_gpus_and_pool_status_shows_them(
    deployment: Deployment, tmp_path: Path, four_l4: None
) -> None:
    view = skybatch.pool_apply(pool_yaml(tmp_path, "p", 2, "L4:2"), "p")
    # Workers start at once: which takes which pair is a race, but pairs they are.
    assert sorted(w.gpus for w in view.worker_list) == [[0, 1], [2, 3]]
    assert {(w.host, w.provider) for w in view.worker_list} == {("localhost", "local")}
    gpus = {w.index: ",".join(map(str, w.gpus)) for w in view.worker_list}
    rows = run_job(tmp_path, "p", 40)
    # The runners saw their worker's GPUs, numbered as nvidia-smi numbers them.
    assert {r["gpus"] for r in rows} == {"0,1", "2,3"}
    assert {r["order"] for r in rows} == {"PCI_BUS_ID"}

    out = deployment.cli("pool", "status", "p").stdout.splitlines()
    table = out[out.index("") + 1 :]
    assert table[0].split() == [
        "WORKER", "STATUS", "PID", "PROVIDER", "HOST", "GPUS", "JOB", "BATCH", "DONE", "HEARTBEAT"
    ]  # fmt: skip
    pids = {w.index: w.pid for w in skybatch.pool_status("p")[0].worker_list}
    done = []
    for index, line in enumerate(table[1:]):
        cells = line.split()
        assert cells[:8] == [
            str(index), "READY", str(pids[index]), "local", "localhost", gpus[index], "-", "-",
        ]  # fmt: skip
        done.append(int(cells[8]))
        assert cells[10] == "ago" and cells[9].endswith("s")
    assert len(done) == 2 and sum(done) == 40
    assert [sum(r["gpus"] == gpus[i] for r in rows) for i in (0, 1)] == done

    # A pool that asks for no GPU sees none (and the GPU pool's stay its own).
    skybatch.pool_apply(pool_yaml(tmp_path, "cpu", 1, None), "cpu")
    assert {r["gpus"] for r in run_job(tmp_path, "cpu", 3)} == {""}
    assert skybatch.pool_status("cpu")[0].worker_list[0].gpus == []


def test_over_asking_is_refused_listing_the_gpus(
    deployment: Deployment, tmp_path: Path, four_l4: None
) -> None:
    free = ", ".join(f"{i}: {L4_ROW.format('free')}" for i in range(4))
    with pytest.raises(PoolSpecError) as e:
        skybatch.pool_apply(pool_yaml(tmp_path, "big", 3, "L4:2"), "big")
    assert str(e.value) == (
        f"pool asks for 3 workers × L4:2 but this machine has 4 L4 GPUs free: {free}; "
        "lower pool.workers or the count in resources.accelerators"
    )
    with pytest.raises(PoolSpecError) as e:
        skybatch.pool_apply(pool_yaml(tmp_path, "a100", 1, "A100:1"), "a100")
    assert str(e.value) == (
        f"pool asks for A100 GPUs but this machine has none: {free}; "
        "set resources.accelerators to a type it has"
    )
    assert skybatch.pool_status() == [], "a refused pool is not created"

    # A second pool cannot take the GPUs the first holds.
    skybatch.pool_apply(pool_yaml(tmp_path, "a", 1, "L4:2"), "a")
    with pytest.raises(PoolSpecError) as e:
        skybatch.pool_apply(pool_yaml(tmp_path, "b", 2, "L4:2"), "b")
    held = ", ".join(f"{i}: {L4_ROW.format('pool a' if i < 2 else 'free')}" for i in range(4))
    assert str(e.value) == (
        f"pool asks for 2 workers × L4:2 but this machine has 2 L4 GPUs free: {held}; "
        "lower pool.workers or the count in resources.accelerators"
    )
    skybatch.pool_apply(pool_yaml(tmp_path, "b", 1, "L4:2"), "b")
    assert gpus_by_index("a") == {0: [0, 1]} and gpus_by_index("b") == {0: [2, 3]}
    # Applying a pool again counts its own GPUs as its own.
    skybatch.pool_apply(pool_yaml(tmp_path, "a", 1, "L4:2"), "a")
    assert gpus_by_index("a") == {0: [0, 1]}


def test_a_replaced_worker_gets_its_gpus_back(
    deployment: Deployment, tmp_path: Path, four_l4: None
) -> None:
    skybatch.pool_apply(pool_yaml(tmp_path, "p", 2, "L4:1"), "p")
    skybatch.pool_apply(pool_yaml(tmp_path, "q", 1, "L4:1"), "q")
    before = gpus_by_index("p")
    assert sorted(before.values()) == [[0], [1]] and gpus_by_index("q") == {0: [2]}
    victim = skybatch.pool_status("p")[0].worker_list[0]
    assert victim.pid is not None
    os.killpg(victim.pid, signal.SIGKILL)  # the agent leads its session: runners too

    def replaced() -> bool:
        workers = skybatch.pool_status("p")[0].worker_list
        return any(w.index == 0 and w.pid != victim.pid and w.status == "READY" for w in workers)

    wait_for(replaced, timeout=60, message="worker 0 replaced")
    assert gpus_by_index("p") == before and gpus_by_index("q") == {0: [2]}
    assert {r["gpus"] for r in run_job(tmp_path, "p", 20)} == {"0", "1"}
