"""The benchmark of issue 13: every contender on the same data, in the same run.

    python -m bench [--smoke] [--workloads 1,2,...] [--contenders skybatch,ray,loop,mp]
                    [--repeats N] [--out bench/out/bench.json] [--keep]

Each workload (`bench/workloads/wN_*.py`: `NUMBER`, `TITLE`, `run(env) -> dict`) returns

    {"number": 1, "title": "...", "size": {...what was run...},
     "results": {contender: {"seconds": median, "all": [...], "rows_per_s": ..., ...}
                            | {"skipped": "why"}},
     "metrics": {name: value, ...},
     "targets": [{"name": ..., "value": ..., "target": ">= 2", "met": True | False | None}],
     "equal_outputs": True | False | None}

to which the harness adds "wall_seconds" (the workload's whole time, setup included).

A workload that raises is recorded with its traceback under "error" and the run goes on.
The tables are printed as each workload ends; the JSON (machine, arguments, workloads,
summary) is written at the end. Speed is reported, never asserted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import platform
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson

if not __package__:  # run as `python bench/run.py`: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ALL_CONTENDERS, Env

DEFAULT_OUT = Path(__file__).parent / "out" / "bench.json"


def workload_modules() -> dict[int, ModuleType]:
    import bench.workloads

    found: dict[int, ModuleType] = {}
    for info in pkgutil.iter_modules(bench.workloads.__path__):
        if re.fullmatch(r"w\d+_\w+", info.name):
            module = importlib.import_module(f"bench.workloads.{info.name}")
            found[module.NUMBER] = module
    return dict(sorted(found.items()))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="small sizes: proves the harness works"
    )
    parser.add_argument("--workloads", default="", help="comma-separated numbers (default: all)")
    parser.add_argument("--contenders", default=",".join(ALL_CONTENDERS))
    parser.add_argument("--repeats", type=int, default=None, help="default 3, or 1 with --smoke")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    unknown = set(args.contenders.split(",")) - set(ALL_CONTENDERS)
    if unknown:
        parser.error(
            f"unknown contenders {sorted(unknown)}; choose from {','.join(ALL_CONTENDERS)}"
        )
    if args.repeats is None:
        args.repeats = 1 if args.smoke else 3
    return args


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(report: dict[str, Any]) -> str:
    lines = [
        f"\n== {report['number']}. {report['title']}  {fmt(report.get('size'))}"
        f"  ({report['wall_seconds']} s in all)"
    ]
    if "error" in report:
        return "\n".join([*lines, report["error"]])
    columns = ["seconds", "rows_per_s"]
    for entry in report["results"].values():
        columns += [k for k in entry if k not in columns and k not in ("all", "skipped")]
    lines.append(f"{'contender':<10} " + " ".join(f"{c:>14}" for c in columns))
    for name, entry in report["results"].items():
        if "skipped" in entry:
            lines.append(f"{name:<10} skipped: {entry['skipped']}")
        else:
            lines.append(f"{name:<10} " + " ".join(f"{fmt(entry.get(c)):>14}" for c in columns))
    for name, value in report.get("metrics", {}).items():
        lines.append(f"  {name}: {fmt(value)}")
    if report.get("equal_outputs") is not None:
        lines.append(f"  equal outputs: {fmt(report['equal_outputs'])}")
    for t in report.get("targets", []):
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        lines.append(f"  target {t['name']}: {fmt(t['value'])} (want {t['target']}) {verdict}")
    return "\n".join(lines)


def summary(reports: list[dict[str, Any]]) -> dict[str, Any]:
    targets = [dict(t, workload=r["number"]) for r in reports for t in r.get("targets", [])]
    return {
        "met": sum(t["met"] is True for t in targets),
        "missed": [f"{t['workload']}: {t['name']}" for t in targets if t["met"] is False],
        "not_measured": [f"{t['workload']}: {t['name']}" for t in targets if t["met"] is None],
        "errors": [r["number"] for r in reports if "error" in r],
        "unequal_outputs": [r["number"] for r in reports if r.get("equal_outputs") is False],
    }


def machine() -> dict[str, Any]:
    import skybatch

    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "skybatch": skybatch.__version__,
    }
    try:
        from importlib.metadata import version

        info["ray"] = version("ray")
    except Exception:  # not installed: the Ray contender records why it was skipped
        info["ray"] = None
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modules = workload_modules()
    wanted = [int(n) for n in args.workloads.split(",") if n] or list(modules)
    missing = [n for n in wanted if n not in modules]
    if missing:
        sys.exit(f"no workload {missing}; there are {sorted(modules)}")
    tmp = Path(tempfile.mkdtemp(prefix="skybatch-bench-"))
    env = Env(
        tmp=tmp,
        smoke=args.smoke,
        repeats=args.repeats,
        contenders=set(args.contenders.split(",")),
        keep=args.keep,
    )
    reports: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        for number in wanted:
            module = modules[number]
            begun = time.perf_counter()
            try:
                report = module.run(env)
            except Exception:  # one broken workload must not lose the others' numbers
                report = {"number": number, "title": module.TITLE, "error": traceback.format_exc()}
            # Setup included (data, pools, Ray's start): what a --smoke budget is spent on.
            report["wall_seconds"] = round(time.perf_counter() - begun, 1)
            reports.append(report)
            print(table(report), flush=True)
    finally:
        env.close()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "machine": machine(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seconds": round(time.perf_counter() - started, 1),
        "workloads": reports,
        "summary": summary(reports),
    }
    s = summary(reports)
    print(
        f"\ntargets: {s['met']} met, {len(s['missed'])} missed {s['missed']},"
        f" {len(s['not_measured'])} not measured; errors in {s['errors'] or 'none'};"
        f" unequal outputs in {s['unequal_outputs'] or 'none'}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"written to {args.out}")
    return 1 if s["errors"] or s["unequal_outputs"] else 0


if __name__ == "__main__":
    sys.exit(main())
