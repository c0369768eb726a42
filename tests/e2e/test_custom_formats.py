"""Readers and writers of the user's own: from the script, from the pool's workdir, Sky Batch's."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import skybatch
from skybatch.errors import ConfigError
from tests.helpers import Deployment, read_jsonl


@dataclass
class RangeReader(skybatch.InputReader):
    """The range reader of the Sky Batch docs: rows {"index": i}, no file at all."""

    count: int

    def __len__(self) -> int:
        return self.count

    def download_batch(self, start_idx: int, end_idx: int, cache_dir: str) -> list[dict[str, Any]]:
        return [{"index": i} for i in range(start_idx, end_idx + 1)]


@skybatch.remote_function
def double_index():
    for batch in skybatch.load():
        skybatch.save_results([{"index": r["index"], "double": r["index"] * 2} for r in batch])


def test_sky_batch_range_reader(shared: Deployment, tmp_path: Path) -> None:
    job = skybatch.Dataset(RangeReader(count=23)).map(
        double_index, pool_name="pool", batch_size=5,
        output=skybatch.JsonWriter(str(tmp_path / "o.jsonl")),
    )  # fmt: skip
    assert read_jsonl(tmp_path / "o.jsonl") == [{"index": i, "double": 2 * i} for i in range(23)]
    assert job.info().total_batches == 5


def test_reader_and_writer_from_the_pools_workdir(deployment: Deployment, tmp_path: Path) -> None:
    # A module the workers can import (the pool's workdir), and a script that uses it.
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "myformats.py").write_text(
        textwrap.dedent('''
        import skybatch

        class Squares(skybatch.InputReader):
            def __init__(self, n):
                self.n = n

            def __len__(self):
                return self.n

            def download_batch(self, start_idx, end_idx, cache_dir):
                return [{"x": i * i} for i in range(start_idx, end_idx + 1)]

        class Lines(skybatch.OutputWriter):
            """One value per line, then a total line."""

            def __init__(self, path, column):
                self.path = path
                self.column = column

            def write_batch(self, rows):
                return "".join(f"{r[self.column]}\\n" for r in rows).encode()

            def reduce(self, parts, out):
                total = 0
                for part in parts:
                    data = part.read()
                    total += sum(int(v) for v in data.split())
                    out.write(data)
                out.write(f"total {total}\\n".encode())
    ''')
    )
    (tmp_path / "pool.yaml").write_text(
        "pool:\n  workers: 2\nresources:\n  cpus: 1+\nworkdir: lib\n"
    )
    (tmp_path / "job.py").write_text(
        textwrap.dedent(f"""
        import sys
        sys.path.insert(0, "lib")
        import skybatch
        from myformats import Lines, Squares

        @skybatch.remote_function
        def plus_one():
            for batch in skybatch.load():
                skybatch.save_results([{{"y": r["x"] + 1}} for r in batch])

        skybatch.pool_apply("pool.yaml", "libpool")
        skybatch.Dataset(Squares(6)).map(
            plus_one, pool_name="libpool", batch_size=4,
            output=Lines({str(tmp_path / "out.txt")!r}, "y"),
        )
    """)
    )
    proc = subprocess.run(
        [sys.executable, "job.py"], cwd=tmp_path, env=deployment.env(),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out.txt").read_text() == "1\n2\n5\n10\n17\n26\ntotal 61\n"


class Unshippable(skybatch.InputReader):
    def __init__(self) -> None:
        self.handle = object()

    def __len__(self) -> int:
        return 1

    def download_batch(self, start_idx: int, end_idx: int, cache_dir: str) -> list[dict[str, Any]]:
        return [{}]


class NoMethods(skybatch.InputReader):
    pass


class HalfWriter(skybatch.OutputWriter):
    def __init__(self, path: str) -> None:
        self.path = path


def test_custom_classes_that_cannot_work_are_refused_early(
    shared: Deployment, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"Unshippable: its attributes must be JSON values"):
        skybatch.Dataset(Unshippable())
    with pytest.raises(ConfigError, match=r"NoMethods must implement download_batch"):
        skybatch.Dataset(NoMethods()).map(
            double_index, pool_name="pool", batch_size=1,
            output=skybatch.JsonWriter(str(tmp_path / "o.jsonl")),
        )  # fmt: skip
    with pytest.raises(ConfigError, match=r"HalfWriter must implement write_batch\(rows\)"):
        skybatch.Dataset(RangeReader(count=2)).map(
            double_index, pool_name="pool", batch_size=1,
            output=HalfWriter(str(tmp_path / "h.txt")),
        )  # fmt: skip


def test_a_script_reader_using_a_module_level_name_is_refused_at_once(tmp_path: Path) -> None:
    (tmp_path / "job.py").write_text(
        textwrap.dedent("""
        import skybatch

        LIMIT = range(10)

        class Capped(skybatch.InputReader):
            def __len__(self):
                return len(LIMIT)

            def download_batch(self, start_idx, end_idx, cache_dir):
                return [{"i": i} for i in range(start_idx, end_idx + 1)]

        try:
            skybatch.Dataset(Capped())
        except skybatch.ConfigError as e:
            print(e)
    """)
    )
    proc = subprocess.run(
        [sys.executable, "job.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.stdout.strip() == (
        "reader Capped.__len__ uses the module-level name 'LIMIT', which is not sent to the "
        "server and workers (only imports and plain constants are); import it at the top of "
        "the module, or define it inside the method"
    )
