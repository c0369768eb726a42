"""Bad input gets a clear error and loses nothing: no partial output, no wedged server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import skybatch
from tests.helpers import Deployment, read_jsonl, write_jsonl


@skybatch.remote_function
def echo():
    for batch in skybatch.load():
        skybatch.save_results([dict(item) for item in batch])


def run(data: Path, out: Path, **kwargs: object) -> skybatch.Job:
    options: dict[str, object] = {"pool_name": "pool", "batch_size": 2}
    options.update(kwargs)
    return skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        echo,
        output=skybatch.JsonWriter(str(out)),
        **options,  # type: ignore[arg-type]
    )


def assert_server_still_serves(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "ok-in.jsonl", [{"a": 1}, {"a": 2}, {"a": 3}])
    run(data, tmp_path / "ok.jsonl")
    assert read_jsonl(tmp_path / "ok.jsonl") == [{"a": 1}, {"a": 2}, {"a": 3}]


def test_missing_input(shared: Deployment, tmp_path: Path) -> None:
    with pytest.raises(skybatch.InputError) as e:
        run(tmp_path / "nope.jsonl", tmp_path / "out.jsonl")
    assert str(e.value) == f"cannot read input {tmp_path / 'nope.jsonl'}: no such file or directory"
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / ".skybatch").exists()
    assert_server_still_serves(tmp_path)


def test_malformed_line_names_file_and_line(shared: Deployment, tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"a": 1}\n{"a": 2}\n{"a": \n{"a": 4}\n')
    with pytest.raises(skybatch.JobFailedError) as e:
        run(data, tmp_path / "out.jsonl")
    assert str(e.value).startswith(f"{data} line 3: not valid JSON")
    assert not (tmp_path / "out.jsonl").exists()
    assert_server_still_serves(tmp_path)


def test_line_that_is_not_an_object(shared: Deployment, tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(skybatch.JobFailedError, match=r"line 2: expected a JSON object"):
        run(data, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_empty_input_succeeds_with_empty_output(shared: Deployment, tmp_path: Path) -> None:
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    job = run(data, tmp_path / "out.jsonl")
    assert job.status() is skybatch.JobStatus.SUCCEEDED
    assert (tmp_path / "out.jsonl").read_bytes() == b""
    info = job.info()
    assert (info.total_batches, info.total_rows) == (0, 0)


def test_blank_lines_are_not_rows(shared: Deployment, tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('\n{"a": 1}\n\n  \n{"a": 2}\n{"a": 3}')  # no final newline either
    run(data, tmp_path / "out.jsonl")
    assert read_jsonl(tmp_path / "out.jsonl") == [{"a": 1}, {"a": 2}, {"a": 3}]


def test_unknown_pool(shared: Deployment, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"a": 1}])
    with pytest.raises(skybatch.NotFoundError) as e:
        run(data, tmp_path / "out.jsonl", pool_name="gpu-pool")
    assert "no pool named 'gpu-pool' (pools: pool)" in str(e.value)
    assert "skybatch pool apply pool.yaml --pool gpu-pool" in str(e.value)
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("size", [0, -1, 2.5, True])
def test_bad_batch_size(shared: Deployment, tmp_path: Path, size: object) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"a": 1}])
    before = len(skybatch.jobs_queue())
    with pytest.raises(skybatch.ConfigError, match="batch_size must be an integer of at least 1"):
        run(data, tmp_path / "out.jsonl", batch_size=size)
    assert len(skybatch.jobs_queue()) == before, "no job may be created"


def test_existing_output_needs_overwrite(shared: Deployment, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"a": 1}])
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    with pytest.raises(skybatch.OutputError, match="already exists; pass overwrite=True"):
        run(data, out)
    assert out.read_text() == "precious\n"
    run(data, out, overwrite=True)
    assert read_jsonl(out) == [{"a": 1}]


def test_output_not_writable(shared: Deployment, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"a": 1}])
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(skybatch.OutputError) as e:
        run(data, blocker / "out.jsonl")
    assert str(e.value).startswith(f"cannot create {blocker}")
    with pytest.raises(skybatch.OutputError):
        run(data, Path("/proc/skybatch-test/out.jsonl"))
    assert_server_still_serves(tmp_path)


def test_output_directory_is_refused(shared: Deployment, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"a": 1}])
    with pytest.raises(skybatch.OutputError, match="is a directory; name a file"):
        run(data, tmp_path)


def test_two_active_jobs_cannot_write_one_output(shared: Deployment, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"a": i, "sleep": 0.2} for i in range(20)])
    out = tmp_path / "out.jsonl"
    first = skybatch.Dataset(skybatch.JsonReader(str(data))).map(
        slow_echo,
        pool_name="pool",
        batch_size=1,
        stream=False,
        output=skybatch.JsonWriter(str(out)),
    )
    with pytest.raises(skybatch.ConflictError, match=f"job {first.job_id} is already writing"):
        run(data, out)
    first.wait(timeout=120)
    assert [r["a"] for r in read_jsonl(out)] == list(range(20))


@skybatch.remote_function
def slow_echo():
    import time

    for batch in skybatch.load():
        time.sleep(batch[0]["sleep"])
        skybatch.save_results([{"a": item["a"]} for item in batch])


def test_plain_function_and_bad_output_arguments(shared: Deployment, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"a": 1}])
    ds = skybatch.Dataset(skybatch.JsonReader(str(data)))
    with pytest.raises(skybatch.ConfigError, match="output must be a writer"):
        ds.map(echo, pool_name="pool", batch_size=1, output="out.jsonl")  # type: ignore[arg-type]
    with pytest.raises(skybatch.ConfigError, match="output must be a writer"):
        ds.map(echo, pool_name="pool", batch_size=1, output=[])
    with pytest.raises(skybatch.ConfigError, match="Dataset needs a reader"):
        skybatch.Dataset("data.jsonl")  # type: ignore[arg-type]


def test_load_outside_a_worker_says_how_to_use_it() -> None:
    with pytest.raises(skybatch.SkyBatchError, match="only inside a mapper running on a worker"):
        skybatch.load()
    with pytest.raises(skybatch.MapperError, match=r"runs on a pool's workers; run it with ds.map"):
        echo()


def test_a_malformed_line_inside_a_batch_fails_at_once_naming_it(
    shared: Deployment, tmp_path: Path
) -> None:
    # Full batches of a plain file are indexed unparsed; the runner's parse finds the
    # line, and the job fails as if the indexer had: file and line, and no retry spent.
    lines = [json.dumps({"a": i}) for i in range(40)]
    lines[25] = '{"a": 25, "b": '
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(skybatch.JobFailedError) as e:
        run(data, tmp_path / "out.jsonl", batch_size=10, max_retries=3)
    assert str(e.value).startswith(f"{data} line 26: not valid JSON (")
    assert "; fix or remove the line" in str(e.value)
    assert e.value.job_id is not None
    assert skybatch.Job(e.value.job_id).info().retries == 0
    assert not (tmp_path / "out.jsonl").exists()
