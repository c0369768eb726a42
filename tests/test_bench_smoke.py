"""`python -m bench --smoke` runs end to end and writes its JSON (issue 13).

Timings are never asserted: only that each workload measured each contender, that the
contenders agreed on the rows, and that the numbers are positive. Ray's start alone takes
5-15 s on a busy 2-core machine, so the main run leaves Ray out, and a second, shorter run
(workload 1, Ray against the loop) proves the Ray contender works where Ray Data is installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import Deployment

ROOT = Path(__file__).resolve().parent.parent


def run_bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "b.json"
    # The benchmark's scratch directory (its SKYBATCH_HOME included) goes under tmp_path.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("SKYBATCH_HOME", None)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench", "--smoke", *args, "--out", str(out)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=150,
            stdin=subprocess.DEVNULL,
        )
    finally:
        # A run killed by the timeout leaves its server and agents: stop them by their pids.
        for home in tmp_path.glob("skybatch-bench-*/home"):
            Deployment(home).stop()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def check_results(report: dict[str, Any], workloads: list[int], contenders: list[str]) -> None:
    by_number = {w["number"]: w for w in report["workloads"]}
    assert sorted(by_number) == workloads
    for number in workloads:
        w = by_number[number]
        assert "error" not in w, w.get("error")
        for name in contenders:
            entry = w["results"][name]
            assert "skipped" not in entry, entry
            assert entry["seconds"] > 0 and all(t > 0 for t in entry["all"])
            assert entry["rows_per_s"] > 0
        for t in w["targets"]:
            # A ratio to a contender that did not run is not measured, never failed.
            absent = {"skybatch", "ray", "loop", "mp"} - set(contenders)
            unmeasured = any(f"/{c}" in t["name"] for c in absent)
            assert (t["value"] is None and t["met"] is None) if unmeasured else t["value"] > 0, t


def test_smoke_run_measures_every_contender(tmp_path: Path) -> None:
    contenders = ["skybatch", "loop", "mp"]
    report = run_bench(tmp_path, "--contenders", ",".join(contenders), "--workloads", "1,2,4")
    check_results(report, [1, 2, 4], contenders)
    w1, w2, _ = report["workloads"]
    assert w1["equal_outputs"] is True
    assert w2["equal_outputs"] is True
    assert w1["metrics"]["skybatch_peak_rss_mb"] > 0
    assert report["summary"]["errors"] == []
    assert list(tmp_path.glob("skybatch-bench-*")) == []  # the scratch directory was removed


def test_smoke_run_with_ray_data(tmp_path: Path) -> None:
    report = run_bench(tmp_path, "--contenders", "ray,loop", "--workloads", "1")
    w1 = report["workloads"][0]
    for name in ("ray", "loop"):
        assert w1["results"][name]["rows_per_s"] > 0
    assert w1["equal_outputs"] is True
    # skybatch did not run, so its targets could not be judged (and are not failed).
    assert all(t["met"] is None for t in w1["targets"])
