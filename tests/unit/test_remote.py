"""@remote_function: what it ships, gathered at submit, and what it refuses."""

from __future__ import annotations

import dataclasses
import json
import linecache
import math
import threading
from pathlib import Path
from typing import Any

import pytest

import skybatch
from skybatch import load as sb_load
from skybatch import save_results as sb_save
from skybatch.runner import main as runner

THRESHOLD = 3


def test_module_constants_and_modules_travel_by_value_and_import() -> None:
    def uses_globals():
        for batch in skybatch.load():
            skybatch.save_results([{"x": THRESHOLD, "j": json.dumps(b)} for b in batch])

    fn = skybatch.remote_function(uses_globals)
    assert fn.globals == [
        {"kind": "value", "name": "THRESHOLD", "repr": "3"},
        {"kind": "import", "name": "json", "module": "json"},
    ]


def test_closure_is_refused() -> None:
    factor = 2

    def closes_over():
        for batch in skybatch.load():
            skybatch.save_results([{"x": factor} for _ in batch])

    with pytest.raises(
        skybatch.MapperError,
        match="references external variables 'factor' of an enclosing function",
    ):
        skybatch.remote_function(closes_over)


def test_undefined_name_is_refused() -> None:
    def typo():
        for batch in skybatch.load():
            skybatch.save_results(procss(batch))  # type: ignore[name-defined]  # noqa: F821

    with pytest.raises(
        skybatch.MapperError, match="'procss', which is neither a builtin nor defined"
    ):
        skybatch.remote_function(typo).to_spec()


def test_a_helper_defined_below_the_mapper_and_a_constant_set_later_ship_as_at_submit(
    tmp_path: Path,
) -> None:
    # The usual script: the mapper first, its helper below, a setting under the main guard.
    code = (
        "import skybatch\n"
        "LIMIT = 1\n"
        "@skybatch.remote_function\n"
        "def mapper():\n"
        "    for batch in skybatch.load():\n"
        "        skybatch.save_results([{'y': process(r['x'])} for r in batch])\n"
        "def process(x):\n"
        "    return min(x, LIMIT)\n"
        "LIMIT = 5\n"
    )
    script = tmp_path / "job.py"
    script.write_text(code)
    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(code, str(script), "exec"), ns)
    mapper = ns["mapper"]
    spec = mapper.to_spec()
    assert {"kind": "value", "name": "LIMIT", "repr": "5"} in spec["globals"]
    assert _rebuild(spec)["process"](9) == 5
    ns["LIMIT"] = 7  # changed after decoration, before the next ds.map
    assert {"kind": "value", "name": "LIMIT", "repr": "7"} in mapper.to_spec()["globals"]


def test_parameters_lambda_and_async_are_refused() -> None:
    def takes(x):  # type: ignore[no-untyped-def]
        return x

    async def coro() -> None:
        return None

    with pytest.raises(skybatch.MapperError, match="takes parameters"):
        skybatch.remote_function(takes)
    with pytest.raises(skybatch.MapperError, match="cannot ship a lambda"):
        skybatch.remote_function(lambda: None)
    with pytest.raises(skybatch.MapperError, match="is async"):
        skybatch.remote_function(coro)


def test_skybatch_names_builtins_and_local_imports_are_fine() -> None:
    def good():
        import math

        class Scale:
            factor = 2
            double = factor * 2

        for batch in sb_load():
            sb_save([{"x": math.floor(len(str(b))) * Scale.double} for b in batch])
        for _ in skybatch.load():
            pass

    fn = skybatch.remote_function(good)
    assert fn.aliases == {"sb_load": "load", "sb_save": "save_results", "skybatch": "module"}
    spec = fn.to_spec()
    assert spec["name"] == "good"
    # Line numbers in workers' tracebacks match this file.
    lines = spec["source"].splitlines()
    first = good.__code__.co_firstlineno
    assert lines[first - 1].strip() == "def good():"
    assert "@" not in "".join(lines[: first - 1])


@skybatch.remote_function
def decorated():
    for batch in skybatch.load():
        skybatch.save_results(batch)


def test_decorated_source_drops_the_decorator() -> None:
    source = decorated.to_spec()["source"]
    assert "remote_function" not in source
    assert source.lstrip().startswith("def decorated():")


# --- What a mapper may use from its script, and what a worker rebuilds ---

LIMITS = {"low": (1, 2.5), "names": ["a", b"b", None, True]}
NAN = float("nan")
LOCK = threading.Lock()


def scale(x):
    return Scaler(THRESHOLD).apply(x) + _square(x)


def _square(x):
    return x * x if x < LIMITS["low"][1] else _square(x - 1)


@dataclasses.dataclass
class Scaler:
    factor: int

    def apply(self, x: int) -> float:
        return math.floor(self.factor * x)


again = scale


def uses_helpers():
    for batch in skybatch.load():
        skybatch.save_results([{"y": again(r["x"]) + scale(r["x"])} for r in batch])


def _rebuild(spec: dict[str, Any]) -> dict[str, Any]:
    """The worker's side, without a worker: the runner's own rebuild of the names."""
    namespace = runner.mapper_namespace()
    # The runner overlays shipped lines on linecache for tracebacks: here, in the client's
    # process, that would hide this file's real lines from later mappers' source reads.
    cached = dict(linecache.cache)
    try:
        runner._rebuild_globals(spec["globals"], namespace)
        exec(compile(spec["source"], spec["filename"], "exec", flags=spec["flags"]), namespace)
    finally:
        linecache.cache.clear()
        linecache.cache.update(cached)
    return namespace


def test_helpers_classes_constants_and_modules_are_rebuilt_on_workers() -> None:
    spec = skybatch.remote_function(uses_helpers).to_spec()
    kinds = [(e["kind"], e["name"]) for e in spec["globals"]]
    # What a definition uses comes before it; `again` is `scale` under another name.
    assert kinds.index(("source", "Scaler")) < kinds.index(("source", "again"))
    assert ("import", "math") in kinds and ("import", "dataclasses") in kinds
    assert ("value", "LIMITS") in kinds and ("alias", "scale") not in kinds
    ns = _rebuild(spec)
    assert ns["again"](4) == scale(4) and ns["scale"] is ns["again"]
    assert ns["LIMITS"] == LIMITS
    assert ns["Scaler"](2).apply(3) == 6
    # Helpers keep the user's file and lines for tracebacks.
    assert ns["_square"].__code__.co_filename == __file__
    assert ns["_square"].__code__.co_firstlineno == _square.__code__.co_firstlineno


def test_what_cannot_travel_is_refused_in_one_line_naming_it() -> None:
    def uses_lock():
        for _ in skybatch.load():
            with LOCK:
                pass

    def uses_nan():
        for batch in skybatch.load():
            skybatch.save_results([{"x": NAN} for _ in batch])

    with pytest.raises(skybatch.MapperError) as e:
        skybatch.remote_function(uses_lock).to_spec()
    assert "uses the module-level name 'LOCK' (a _thread.lock object), which cannot be " in str(
        e.value
    )
    assert "create 'LOCK' inside the function body" in str(e.value)
    with pytest.raises(skybatch.MapperError, match="constant 'NAN' = nan, which cannot be"):
        skybatch.remote_function(uses_nan).to_spec()


def _make_closure() -> Any:
    k = 2

    def times_k(x):
        return x * k

    return times_k


closure = _make_closure()
square_lambda = lambda x: x * x  # noqa: E731


@pytest.mark.parametrize(
    ("helper", "words"),
    [
        ("closure", "'_make_closure.<locals>.times_k' defined inside another function"),
        ("square_lambda", "a lambda, which workers cannot rebuild from source"),
    ],
)
def test_helpers_workers_cannot_rebuild_are_refused(
    helper: str, words: str, tmp_path: Path
) -> None:
    code = (
        f"def m():\n    for b in skybatch.load():\n        skybatch.save_results([{helper}(1)])\n"
    )
    script = tmp_path / "job.py"
    script.write_text(code)
    ns: dict[str, Any] = dict(globals())
    exec(compile(code, str(script), "exec"), ns)
    with pytest.raises(skybatch.MapperError, match=words):
        skybatch.remote_function(ns["m"]).to_spec()


def test_a_missing_module_on_the_worker_names_it_and_the_fix() -> None:
    entry = {"kind": "import", "name": "np", "module": "no_such_module_xyz"}
    with pytest.raises(ImportError, match=r"'np' \(no_such_module_xyz\).*install it in the pool"):
        runner._rebuild_globals([entry], {})
