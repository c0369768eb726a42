"""What every workload gets: the run's `Env`, a skybatch deployment, a local Ray, measuring tools.

A workload module (`bench/workloads/wN_*.py`) defines `NUMBER`, `TITLE` and
`run(env) -> dict` (the shape is in `bench/run.py`'s docstring). It runs each
contender through `contenders(env, {...})`, so a contender that cannot run here
(Ray not installed) is recorded as `{"skipped": why}` instead of failing the run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil
import yaml

ALL_CONTENDERS = ("skybatch", "ray", "loop", "mp")


class Unavailable(Exception):
    """A contender cannot run on this machine (a missing extra); the message says why."""


@dataclass
class Env:
    tmp: Path
    smoke: bool
    repeats: int
    contenders: set[str]
    keep: bool = False
    _skybatch: SkybatchSession | None = field(default=None, repr=False)
    _ray_started: bool = field(default=False, repr=False)
    _ray_tmp: Path | None = field(default=None, repr=False)

    def skybatch(self) -> SkybatchSession:
        """The run's deployment (a server in `tmp/home`), started on first use, and made the
        current one again (a workload may have made a session of its own)."""
        if self._skybatch is None:
            self._skybatch = SkybatchSession(self.tmp / "home")
        self._skybatch.activate()
        return self._skybatch

    def ray(self) -> None:
        """Local Ray (2 CPUs, 127.0.0.1, no dashboard): started on first use, stopped by `close`."""
        if self._ray_started:
            return
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        # Ray Data's per-dataset INFO lines would interleave with the tables.
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
        try:
            import ray
            import ray.data
        except ImportError as e:
            raise Unavailable(
                f"Ray Data is not installed ({e}): pip install 'skybatch[bench]'"
            ) from e
        # A short directory of its own: Ray's socket paths must fit in 107 bytes.
        self._ray_tmp = Path(tempfile.mkdtemp(prefix="sbray-", dir="/tmp"))
        ray.init(
            # "local": a new cluster even where `ray start` left one for ray.init() to join.
            address="local",
            _temp_dir=str(self._ray_tmp),
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            configure_logging=False,
        )
        logging.getLogger("ray").setLevel(logging.WARNING)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        self._ray_started = True

    def scratch(self, name: str) -> Path:
        """A fresh directory under tmp for one workload's files."""
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def stop_ray(self) -> None:
        """Stop the local Ray, if started: its daemons and the driver's threads take CPU
        even when idle (a third of a core here), which must not weigh on the other
        contenders. The next `ray()` starts it again."""
        if self._ray_started:
            import ray

            ours = psutil.Process().children(recursive=True)
            ray.shutdown()
            self._ray_started = False
            # Ray's daemons outlive shutdown() a moment and write into their temp dir:
            # removed before they end, it would come back.
            psutil.wait_procs(ours, timeout=15)
        if self._ray_tmp is not None and not self.keep:
            shutil.rmtree(self._ray_tmp, ignore_errors=True)
            self._ray_tmp = None

    def close(self) -> None:
        try:
            if self._skybatch is not None:
                self._skybatch.stop()
                self._skybatch = None
        finally:
            self.stop_ray()


class SkybatchSession:
    """A deployment in its own SKYBATCH_HOME, driven through the public API only."""

    def __init__(self, home: Path) -> None:
        self.home = home
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._applied: dict[str, tuple[int, str]] = {}
        self.activate()

    def activate(self) -> None:
        """Makes this the deployment that the public API (`skybatch.Dataset`, `pool_apply`...)
        talks to: it reads SKYBATCH_HOME at each connect. The session's own methods do it."""
        os.environ["SKYBATCH_HOME"] = str(self.home)

    def pool(self, name: str, workers: int, **extra: Any) -> None:
        """`pool apply` (local provider) unless already applied with this size and extras; waits
        until every worker is READY. `extra` are top-level pool YAML keys (`setup`, `envs`, ...)."""
        import skybatch

        self.activate()
        spec = yaml.safe_dump({"pool": {"workers": workers}, **extra})
        if self._applied.get(name) == (workers, spec):
            return
        path = self.home.parent / f"pool-{name}.yaml"
        path.write_text(spec)
        skybatch.pool_apply(str(path), name)
        self._applied[name] = (workers, spec)

    def down(self, name: str) -> None:
        """Stops a pool, so that its workers do not weigh on the workloads after it."""
        import skybatch

        if self._applied.pop(name, None) is not None:
            self.activate()
            skybatch.pool_down(name)

    def pids(self) -> dict[str, list[int]]:
        """The live processes: the server, every pool's agents, their children (runners)."""
        import skybatch
        from skybatch.config import home as current_home
        from skybatch.config import read_server_info

        self.activate()
        info = read_server_info(current_home())
        agents = [w.pid for p in skybatch.pool_status() for w in p.worker_list if w.pid]
        runners: list[int] = []
        for pid in agents:
            with contextlib.suppress(psutil.Error):  # it stopped since the listing
                runners += [c.pid for c in psutil.Process(pid).children(recursive=True)]
        return {"server": [info.pid] if info else [], "agents": agents, "runners": runners}

    def stop(self) -> None:
        import skybatch
        from skybatch.client.api import close_clients
        from skybatch.client.launcher import stop_server

        self.activate()
        try:
            for name in list(self._applied):
                skybatch.pool_down(name)
        finally:
            self._applied.clear()
            close_clients()
            stop_server()


def skybatch_map(mapper: Any, src: Path, dst: Path, pool: str, batch_size: int) -> Any:
    """A JSONL → JSONL job through the public API, submit to published, returns the finished Job."""
    import skybatch

    job = skybatch.Dataset(skybatch.JsonReader(str(src))).map(
        mapper,
        pool_name=pool,
        batch_size=batch_size,
        stream=False,
        output=skybatch.JsonWriter(str(dst)),
        overwrite=True,
    )
    job.wait()
    return job


def repeat(n: int, fn: Callable[..., Any], *a: Any, **kw: Any) -> list[float]:
    """The seconds of n calls."""
    return [timed(fn, *a, **kw)[0] for _ in range(n)]


def interleaved(
    env: Env,
    setups: dict[str, Callable[[], Callable[[], Any]]],
    rows: int | None = None,
    repeats: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Sets up each selected contender (its setup returns the call to time; one that raises
    `Unavailable` is recorded as skipped), then times the calls in rounds, one of each contender
    per round, so that the load of whatever else runs on the machine weighs on all of them
    alike; Ray's repeats come after the others' rounds, with Ray stopped after them (its idle
    daemons would slow the others); returns each contender's `result`."""
    results: dict[str, dict[str, Any]] = {}
    # Ray alone runs after the others' rounds, and is stopped then (see Env.stop_ray).
    for group in ([n for n in setups if n != "ray"], [n for n in setups if n == "ray"]):
        calls: dict[str, Callable[[], Any]] = {}
        for name in group:
            if name not in env.contenders:
                continue
            try:
                calls[name] = setups[name]()
                results[name] = {}
            except Unavailable as e:
                results[name] = {"skipped": str(e)}
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(repeats or env.repeats):
            for name, call in calls.items():
                times[name].append(timed(call)[0])
        for name in calls:
            results[name] = result(times[name], rows)
    env.stop_ray()
    return results


def contenders(
    env: Env, runners: dict[str, Callable[[], dict[str, Any]]]
) -> dict[str, dict[str, Any]]:
    """Runs each selected contender in order; one that is `Unavailable` is recorded as skipped."""
    results: dict[str, dict[str, Any]] = {}
    for name, fn in runners.items():
        if name not in env.contenders:
            continue
        try:
            results[name] = fn()
        except Unavailable as e:
            results[name] = {"skipped": str(e)}
        if name == "ray":
            env.stop_ray()
    return results


def result(times: list[float], rows: int | None = None, **more: Any) -> dict[str, Any]:
    """One contender's entry: the median, every repeat, and rows/s at the median."""
    med = median(times)
    out: dict[str, Any] = {"seconds": round(med, 4), "all": [round(t, 4) for t in times]}
    if rows is not None:
        out["rows_per_s"] = round(rows / med, 1) if med > 0 else None
    out.update(more)
    return out


def rate(results: dict[str, dict[str, Any]], name: str, key: str = "rows_per_s") -> float | None:
    """A contender's number, None when it was skipped or not selected."""
    value = results.get(name, {}).get(key)
    return float(value) if value is not None else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def target(name: str, value: float | None, op: str, bound: float) -> dict[str, Any]:
    """A target line: `op` is ">=" or "<="; `met` is None when the value could not be measured."""
    met = None if value is None else (value >= bound if op == ">=" else value <= bound)
    return {"name": name, "value": value, "target": f"{op} {bound:g}", "met": met}


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def timed(fn: Callable[..., Any], *a: Any, **kw: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn(*a, **kw)
    return time.perf_counter() - start, value


class PeakRss:
    """Samples every 50 ms the RSS of groups of processes and their children (found anew at each
    sample, so runners started later count); keeps each group's peak sum and the peak of the total.

        with PeakRss(session.pids()) as rss: ...
        rss.peak_mb["server"], rss.total_mb
    """

    def __init__(self, groups: dict[str, list[int]] | Iterable[int]) -> None:
        self.groups = dict(groups) if isinstance(groups, dict) else {"all": list(groups)}
        self.peak = dict.fromkeys(self.groups, 0)
        self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        # A process counts once, in the group of its nearest listed ancestor: the server's
        # children are the agents, and theirs the runners.
        listed = {pid for pids in self.groups.values() for pid in pids}
        total = 0
        for name, pids in self.groups.items():
            group = 0
            todo = list(pids)
            while todo:
                try:
                    proc = psutil.Process(todo.pop())
                    group += proc.memory_info().rss
                    todo += [c.pid for c in proc.children() if c.pid not in listed]
                except psutil.Error:  # it ended between the listing and the read
                    continue
            self.peak[name] = max(self.peak[name], group)
            total += group
        self.total = max(self.total, total)

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(0.05):
                return

    @property
    def peak_mb(self) -> dict[str, float]:
        return {k: round(v / 1e6, 1) for k, v in self.peak.items()}

    @property
    def total_mb(self) -> float:
        return round(self.total / 1e6, 1)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def write_rows(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    with open(path, "wb") as f:
        for row in rows:
            f.write(orjson.dumps(row) + b"\n")
    return path


def rows_of(path: Path) -> list[dict[str, Any]]:
    """Every row of a JSONL file, or of every `*.json*` file in a directory (Ray's output)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.json*") if p.is_file())
    rows: list[dict[str, Any]] = []
    for f in files:
        with open(f, "rb") as fh:
            rows += [orjson.loads(line) for line in fh if line.strip()]
    return rows


def equal_outputs(outputs: dict[str, Path], rows: int) -> bool | None:
    """Whether every contender's output holds the same `rows` rows; None with fewer than two."""
    if len(outputs) < 2:
        return None
    paths = list(outputs.values())
    reference = rows_of(paths[0])
    return len(reference) == rows and all(same_rows(reference, rows_of(p)) for p in paths[1:])


def same_rows(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """Equal as multisets of rows: Ray reorders blocks, so order is not compared."""
    if len(a) != len(b):
        return False

    def key(rows: list[dict[str, Any]]) -> list[bytes]:
        return sorted(orjson.dumps(r, option=orjson.OPT_SORT_KEYS) for r in rows)

    return key(a) == key(b)
