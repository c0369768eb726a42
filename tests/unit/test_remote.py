"""@remote_function: what it ships, and what it refuses at decoration time."""

from __future__ import annotations

import json

import pytest

import skybatch
from skybatch import load as sb_load
from skybatch import save_results as sb_save

THRESHOLD = 3


def test_global_reference_is_refused_with_name_and_fix() -> None:
    def uses_global():
        for batch in skybatch.load():
            skybatch.save_results([{"x": THRESHOLD} for _ in batch])

    with pytest.raises(skybatch.MapperError) as e:
        skybatch.remote_function(uses_global)
    message = str(e.value)
    assert "uses the module-level name 'THRESHOLD'" in message
    assert "import or define 'THRESHOLD' inside the function body" in message
    assert __file__ in message


def test_imported_module_at_top_level_is_refused() -> None:
    def uses_json():
        for batch in skybatch.load():
            skybatch.save_results([{"x": json.dumps(b)} for b in batch])

    with pytest.raises(skybatch.MapperError, match="'json'"):
        skybatch.remote_function(uses_json)


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

    with pytest.raises(skybatch.MapperError, match="'procss', which is neither a builtin"):
        skybatch.remote_function(typo)


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
