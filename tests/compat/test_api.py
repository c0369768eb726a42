"""Sky Batch's API as its users write it, ported by the rename rule (``sky.batch.`` →
``skybatch.``): the validation cases of its unit tests (exception types and the key
words of its messages), and the keywords and types its scripts rely on.

Where skybatch deliberately differs, the test says so and checks skybatch's side.
Tests that need a server are marked ``e2e``, like every test under ``tests/e2e/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import skybatch
from tests.helpers import Deployment, read_jsonl, write_jsonl

# --- Remote function validation (Sky Batch's tests/unit_tests/test_batch_validation.py) ---


def test_function_with_no_external_references() -> None:
    @skybatch.remote_function
    def valid():
        for batch in skybatch.load():
            results = [{"output": item["text"] * 2} for item in batch]
            skybatch.save_results(results)

    assert skybatch.remote.is_remote_function(valid)


def test_function_with_internal_imports() -> None:
    @skybatch.remote_function
    def valid():
        import json

        for batch in skybatch.load():
            results = [json.loads(item["data"]) for item in batch]
            skybatch.save_results(results)

    assert skybatch.remote.is_remote_function(valid)


def test_function_with_internal_helper() -> None:
    @skybatch.remote_function
    def valid():
        def helper(x):
            return x * 2

        for batch in skybatch.load():
            results = [{"value": helper(item["x"])} for item in batch]
            skybatch.save_results(results)

    assert skybatch.remote.is_remote_function(valid)


def test_function_loading_model_internally() -> None:
    @skybatch.remote_function
    def valid():
        def load_model():
            return {"type": "dummy"}

        model = load_model()
        for batch in skybatch.load():
            results = [{"pred": f"model_{model['type']}"} for item in batch]
            skybatch.save_results(results)

    assert skybatch.remote.is_remote_function(valid)


def test_function_with_literals() -> None:
    @skybatch.remote_function
    def valid():
        for batch in skybatch.load():
            skybatch.save_results([{"value": item["x"] * 2} for item in batch])

    assert skybatch.remote.is_remote_function(valid)


def test_closure_over_variable() -> None:
    external_var = 42
    with pytest.raises(ValueError, match=r"references external variables.*external_var"):

        @skybatch.remote_function
        def invalid():
            for batch in skybatch.load():
                skybatch.save_results([{"value": item["x"] * external_var} for item in batch])


def test_closure_over_function() -> None:
    def helper(x: int) -> int:
        return x * 2

    with pytest.raises(ValueError, match=r"references external variables.*helper"):

        @skybatch.remote_function
        def invalid():
            for batch in skybatch.load():
                skybatch.save_results([{"value": helper(item["x"])} for item in batch])


def test_closure_over_module() -> None:
    import numpy as np

    with pytest.raises(ValueError, match=r"references external variables.*np"):

        @skybatch.remote_function
        def invalid():
            for batch in skybatch.load():
                skybatch.save_results([{"mean": np.mean([item["x"]])} for item in batch])


def test_multiple_closures() -> None:
    var1 = 1
    var2 = 2
    with pytest.raises(ValueError, match=r"references external variables.*(var1|var2)"):

        @skybatch.remote_function
        def invalid():
            for batch in skybatch.load():
                skybatch.save_results([{"value": item["x"] * var1 + var2} for item in batch])


def test_closure_error_message_suggests_fix() -> None:
    model = {"type": "dummy"}
    with pytest.raises(ValueError) as exc_info:

        @skybatch.remote_function
        def invalid():
            for batch in skybatch.load():
                skybatch.save_results([{"pred": model} for item in batch])

    error_msg = str(exc_info.value)
    assert "model" in error_msg
    assert "external variables" in error_msg.lower()
    assert "clean namespace" in error_msg.lower()
    assert "To fix" in error_msg or "Move" in error_msg
    assert "\n" not in error_msg  # skybatch's rule: one line


def test_error_shows_function_name() -> None:
    x = 42
    with pytest.raises(ValueError) as exc_info:

        @skybatch.remote_function
        def my_special_function():
            return x

    assert "my_special_function" in str(exc_info.value)


def test_decorator_marks_function() -> None:
    @skybatch.remote_function
    def func():
        pass

    assert hasattr(func, "_is_remote_function")
    assert func._is_remote_function is True


def test_is_remote_function_helper() -> None:
    @skybatch.remote_function
    def remote_func():
        pass

    def regular_func():
        pass

    assert skybatch.remote.is_remote_function(remote_func)
    assert not skybatch.remote.is_remote_function(regular_func)
    # Also at the top level, beside remote_function.
    assert skybatch.is_remote_function(remote_func)
    assert not skybatch.is_remote_function(regular_func)
    assert skybatch.remote.remote_function is skybatch.remote_function


def test_decorator_keeps_the_function() -> None:
    """Documented difference: Sky Batch returns the function itself (``decorated is
    original``); skybatch returns a checked wrapper that keeps its name, docstring and
    ``__wrapped__``, and refuses a direct call with the way to run it."""

    def original():
        """Original docstring."""

    decorated = skybatch.remote_function(original)
    assert decorated.__wrapped__ is original
    assert decorated.__name__ == "original"
    assert decorated.__doc__ == "Original docstring."


def test_function_with_no_body() -> None:
    @skybatch.remote_function
    def valid():
        pass

    assert skybatch.remote.is_remote_function(valid)


def test_function_with_class_definition() -> None:
    @skybatch.remote_function
    def valid():
        class Helper:
            def process(self, x):
                return x * 2

        helper = Helper()
        for batch in skybatch.load():
            skybatch.save_results([{"value": helper.process(item["x"])} for item in batch])

    assert skybatch.remote.is_remote_function(valid)


def test_function_with_nested_function() -> None:
    @skybatch.remote_function
    def valid():
        def outer():
            def inner(x):
                return x * 2

            return inner

        helper = outer()
        for batch in skybatch.load():
            skybatch.save_results([{"value": helper(item["x"])} for item in batch])

    assert skybatch.remote.is_remote_function(valid)


def test_function_with_exception_handling() -> None:
    @skybatch.remote_function
    def valid():
        for batch in skybatch.load():
            results = []
            for item in batch:
                try:
                    value = int(item["x"]) * 2
                except (ValueError, KeyError):
                    value = 0
                results.append({"value": value})
            skybatch.save_results(results)

    assert skybatch.remote.is_remote_function(valid)


# --- Dataset.map and the formats' argument checks (Sky Batch's dataset.py, io_formats.py) ---


@skybatch.remote_function
def upper():
    for batch in skybatch.load():
        skybatch.save_results([{"text": item["text"].upper()} for item in batch])


@pytest.mark.parametrize("batch_size", [0, -1])
def test_batch_size_must_be_positive(tmp_path: Path, batch_size: int) -> None:
    ds = skybatch.Dataset(skybatch.JsonReader(str(tmp_path / "in.jsonl")))
    with pytest.raises(ValueError, match="batch_size must be"):
        ds.map(upper, pool_name="pool", batch_size=batch_size, output=None)


@pytest.mark.parametrize(
    "make",
    [
        lambda: skybatch.JsonReader(""),
        lambda: skybatch.JsonWriter(""),
        lambda: skybatch.ImageWriter(""),
        lambda: skybatch.CsvReader(""),
        lambda: skybatch.CsvWriter(""),
        lambda: skybatch.ParquetReader(""),
        lambda: skybatch.ParquetWriter(""),
    ],
    ids=["JsonReader", "JsonWriter", "ImageWriter", "CsvReader", "CsvWriter", "Parquet", "PqW"],
)
def test_empty_path_is_a_value_error(make: Any) -> None:
    with pytest.raises(skybatch.ConfigError, match=r"path cannot be empty") as e:
        make()
    assert isinstance(e.value, ValueError)
    assert "\n" not in str(e.value)


def test_resume_and_resume_from_together_are_refused(tmp_path: Path) -> None:
    ds = skybatch.Dataset(skybatch.JsonReader(str(tmp_path / "in.jsonl")))
    with pytest.raises(skybatch.ConfigError, match="both resume= and resume_from=") as e:
        ds.map(upper, pool_name="pool", batch_size=2, resume="1", resume_from=1)
    assert "\n" not in str(e.value)


# --- Error types: the built-in ones Sky Batch raises in the same situation ---


@pytest.mark.parametrize(
    ("error", "builtins"),
    [
        (skybatch.ConfigError, (ValueError,)),
        (skybatch.PoolSpecError, (ValueError,)),
        (skybatch.MapperError, (ValueError,)),
        (skybatch.InputError, (ValueError,)),
        (skybatch.ConflictError, (ValueError,)),
        (skybatch.NotFoundError, (ValueError, RuntimeError)),
        (skybatch.OutputError, (RuntimeError,)),
        (skybatch.PoolError, (RuntimeError,)),
        (skybatch.ServerError, (RuntimeError,)),
        (skybatch.AuthError, (RuntimeError,)),
        (skybatch.JobError, (RuntimeError,)),
        (skybatch.JobFailedError, (RuntimeError,)),
        (skybatch.JobCancelledError, (RuntimeError,)),
    ],
)
def test_errors_are_the_builtin_types_sky_batch_raises(
    error: type[Exception], builtins: tuple[type[Exception], ...]
) -> None:
    assert issubclass(error, skybatch.SkyBatchError)
    for builtin in (ValueError, RuntimeError):
        assert issubclass(error, builtin) == (builtin in builtins), builtin


# --- The Job that ds.map returns stands for the job id, as Sky Batch's int does ---


def test_job_is_usable_as_its_id() -> None:
    job = skybatch.Job(5)
    assert int(job) == 5
    assert str(job) == "5"
    assert f"job {job}" == "job 5"
    assert f"{job:>3}" == "  5"
    assert "%d" % job == "5"  # noqa: UP031 (old scripts format ids so)
    assert job == 5 and job == "5"
    assert 5 == job and "5" == job  # noqa: SIM300 (the reflected comparison is the point)
    assert job != 6 and job != "6"
    assert job == skybatch.Job("5")
    assert len({job, skybatch.Job(5), 5}) == 1
    assert {5: "found"}[job] == "found"
    assert repr(job) == "Job('5')"


# --- With a server ---


@skybatch.remote_function
def breaks_on_bad():
    for batch in skybatch.load():
        if any(item["text"] == "bad" for item in batch):
            raise RuntimeError("cannot handle 'bad'")
        skybatch.save_results([{"text": item["text"].upper()} for item in batch])


@pytest.mark.e2e
def test_resume_from_finishes_a_failed_job(shared: Deployment, tmp_path: Path) -> None:
    rows = [{"text": "bad" if i == 7 else f"r{i}"} for i in range(12)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    ds = skybatch.Dataset(skybatch.JsonReader(str(data)))
    out = tmp_path / "out.jsonl"
    # Sky Batch's scripts catch RuntimeError around a job that fails.
    with pytest.raises(RuntimeError, match="cannot handle 'bad'") as failed:
        ds.map(
            breaks_on_bad,
            pool_name="pool",
            batch_size=3,
            output=skybatch.JsonWriter(str(out)),
            max_retries=0,
            retry_backoff=0.05,
        )
    assert isinstance(failed.value, skybatch.JobFailedError)
    job_id = failed.value.job_id
    assert job_id is not None

    job_id = ds.map(
        upper,
        pool_name="pool",
        batch_size=3,
        output=skybatch.JsonWriter(str(out)),
        resume_from=int(job_id),
    )
    assert int(job_id) == int(failed.value.job_id)  # skybatch resumes the same job
    assert read_jsonl(out) == [{"text": str(r["text"]).upper()} for r in rows]
    assert f"{job_id}" == str(failed.value.job_id)


@pytest.mark.e2e
def test_missing_pool_and_missing_job_are_caught_as_sky_batch_does(
    shared: Deployment, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": "a"}])
    ds = skybatch.Dataset(skybatch.JsonReader(str(data)))
    # Sky Batch: RuntimeError for a pool that does not exist ...
    with pytest.raises(RuntimeError, match="no-such-pool"):
        ds.map(upper, pool_name="no-such-pool", batch_size=1)
    # ... and ValueError for a job to resume from that does not exist.
    with pytest.raises(ValueError, match="999999"):
        ds.map(upper, pool_name="pool", batch_size=1, resume_from=999999)
