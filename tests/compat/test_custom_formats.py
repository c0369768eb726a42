"""Sky Batch's custom formats guide, ported by the rename rule (``sky.batch`` →
``skybatch``, ``sky.utils.registry`` → ``skybatch.utils.registry``): its complete
example on a real deployment, and the ``sky.batch.utils`` helpers it uses.

The one change beyond renaming: ``BUCKET`` is a local directory (the helpers take
any URL skybatch's storage does), and the pool is a local one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from skybatch import utils
from tests.helpers import Deployment

# The guide's "Complete example", renamed; BUCKET is filled in by the test.
_EXAMPLE = """
from dataclasses import dataclass
from typing import Any, Dict, List

import skybatch
from skybatch import io_formats
from skybatch import utils
from skybatch.utils import registry


@registry.INPUT_READER_REGISTRY.type_register(name='range')
@dataclass
class RangeReader(io_formats.InputReader):
    count: int

    def __len__(self) -> int:
        return self.count

    def download_batch(self, start_idx: int, end_idx: int,
                       cache_dir: str) -> List[Dict[str, Any]]:
        return [{'index': i} for i in range(start_idx, end_idx + 1)]


@registry.OUTPUT_WRITER_REGISTRY.type_register(name='text')
@dataclass
class TextWriter(io_formats.OutputWriter):
    column: str

    def upload_batch(self, results: List[Dict[str, Any]], start_idx: int,
                     end_idx: int, job_id: str) -> str:
        output_dir = self.path.rstrip('/')
        for i, result in enumerate(results):
            global_idx = start_idx + i
            text = str(result.get(self.column, ''))
            utils.upload_bytes_to_cloud(
                text.encode('utf-8'), f'{output_dir}/{global_idx:08d}.txt')
        return output_dir

    def reduce_results(self, job_id: str) -> None:
        pass

    def cleanup(self, job_id: str) -> None:
        pass


@registry.OUTPUT_WRITER_REGISTRY.type_register(name='yaml')
@dataclass
class YamlWriter(io_formats.OutputWriter):
    column: str

    def upload_batch(self, results: List[Dict[str, Any]], start_idx: int,
                     end_idx: int, job_id: str) -> str:
        batch_path = utils.get_batch_path(self.path, start_idx, end_idx, job_id)
        filtered = [{self.column: r.get(self.column)} for r in results]
        utils.save_jsonl_to_cloud(filtered, batch_path)
        return batch_path

    def reduce_results(self, job_id: str) -> None:
        import yaml
        all_items: List[Dict[str, Any]] = []
        for batch_path in utils.list_batch_files(self.path, job_id):
            all_items.extend(utils.load_jsonl_from_cloud(batch_path))
        yaml_bytes = yaml.dump(all_items, default_flow_style=False).encode()
        utils.upload_bytes_to_cloud(yaml_bytes, self.path)

    def cleanup(self, job_id: str) -> None:
        utils.delete_batch_files(self.path, job_id)
        utils.delete_input_batch_files(self.path, job_id)


@skybatch.remote_function
def process_items():
    import random

    for batch in skybatch.load():
        results = []
        for item in batch:
            idx = item['index']
            tokens = [f'token_{j}' for j in range(idx, idx + 5)]
            text = f'Item {idx}: ' + ' | '.join(tokens)
            metadata = {
                'id': idx,
                'squared': idx ** 2,
                'tag': random.choice(['alpha', 'beta', 'gamma']),
            }
            results.append({'text': text, 'metadata': metadata})
        skybatch.save_results(results)


BUCKET = @BUCKET@
POOL_NAME = 'custom-fmt-pool'

ds = skybatch.Dataset(RangeReader(path='', count=20))

ds.map(
    process_items,
    pool_name=POOL_NAME,
    batch_size=5,
    output=[
        TextWriter(f'{BUCKET}/output/texts/', column='text'),
        YamlWriter(f'{BUCKET}/output/metadata.yaml', column='metadata'),
    ],
)
"""


def test_the_complete_custom_formats_example(deployment: Deployment, tmp_path: Path) -> None:
    deployment.pool("custom-fmt-pool", workers=2, tmp=tmp_path)
    bucket = tmp_path / "bucket"
    script = tmp_path / "process_range.py"
    script.write_text(_EXAMPLE.replace("@BUCKET@", repr(str(bucket))))
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=deployment.env(),
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = bucket / "output"
    # 20 .txt files and one metadata.yaml; no staging or temporary batch files left.
    assert sorted(p.name for p in out.iterdir()) == ["metadata.yaml", "texts"]
    texts = out / "texts"
    assert sorted(p.name for p in texts.iterdir()) == [f"{i:08d}.txt" for i in range(20)]
    for i in range(20):
        tokens = " | ".join(f"token_{j}" for j in range(i, i + 5))
        assert (texts / f"{i:08d}.txt").read_text() == f"Item {i}: {tokens}"
    items = yaml.safe_load((out / "metadata.yaml").read_text())
    tags = [item["metadata"]["tag"] for item in items]
    assert set(tags) <= {"alpha", "beta", "gamma"}
    expected = [{"metadata": {"id": i, "squared": i * i, "tag": tag}} for i, tag in enumerate(tags)]
    assert len(items) == 20
    assert (out / "metadata.yaml").read_text() == yaml.dump(expected, default_flow_style=False)


# A Sky Batch writer that appends, and whose second upload fails once; it reads a
# module-level constant, as ported formats often do (shipped by value with the class).
_FLAKY_WRITER = """
import json
import os
from dataclasses import dataclass

import skybatch
from skybatch import io_formats

MARK = @MARK@


@dataclass
class AppendWriter(io_formats.OutputWriter):
    def upload_batch(self, results, start_idx, end_idx, job_id):
        if start_idx == 2 and not os.path.exists(MARK):
            open(MARK, 'w').close()
            raise RuntimeError('transient')
        with open(self.path, 'a') as f:
            for r in results:
                f.write(json.dumps(r) + '\\n')


def ident(row):
    return row


job = skybatch.map(ident, [{'x': i} for i in range(5)], pool_name='pool', batch_size=2,
                   output=AppendWriter(@OUT@), stream=False)
print(job.job_id)
try:
    job.wait()
except skybatch.JobFailedError as e:
    print(e)
job.resume(stream=False).wait()
"""


def test_a_failed_upload_batch_resumes_after_the_batches_it_accepted(
    deployment: Deployment, tmp_path: Path
) -> None:
    deployment.pool("pool", workers=2, tmp=tmp_path)
    out = tmp_path / "out" / "rows.jsonl"
    out.parent.mkdir()
    script = tmp_path / "append.py"
    code = _FLAKY_WRITER.replace("@MARK@", repr(str(tmp_path / "failed-once")))
    script.write_text(code.replace("@OUT@", repr(str(out))))
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=deployment.env(),
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id, *failure = proc.stdout.splitlines()
    assert failure == [
        f"job {job_id} could not publish its output: AppendWriter.upload_batch(rows 2-3) "
        "failed: RuntimeError: transient",
        f"Its committed batches are kept; fix that, then `skybatch jobs resume {job_id}` "
        "(job.resume()) publishes the output; upload_batch continues after the last batch "
        "it accepted",
    ]
    # Every row once, in order: the resume did not upload rows 0-1 again.
    assert out.read_text().splitlines() == [f'{{"x": {i}}}' for i in range(5)]
    assert sorted(p.name for p in out.parent.iterdir()) == ["rows.jsonl"]


# --- sky.batch.utils, on local paths ---------------------------------------------------


def test_batch_files_round_trip(tmp_path: Path) -> None:
    output = str(tmp_path / "out" / "result.jsonl")
    first = utils.get_batch_path(output, 0, 4, "7")
    second = utils.get_batch_path(output, 5, 9, "7")
    assert first == str(tmp_path / "out" / ".sky_batch_tmp" / "7" / "batch_00000000-00000004.jsonl")
    # Written out of order: listing sorts by first row, numerically.
    utils.save_jsonl_to_cloud([{"i": 5}, {"i": 6}], second)
    utils.save_jsonl_to_cloud([{"i": 0}], first)
    utils.upload_bytes_to_cloud(b"x", utils.get_input_batch_path(output, 0, 4, "7"))
    assert utils.list_batch_files(output, "7") == [first, second]
    assert utils.load_jsonl_from_cloud(second) == [{"i": 5}, {"i": 6}]
    assert utils.cloud_path_exists(first)

    utils.concatenate_batches_to_output(output, "7")
    assert Path(output).read_text() == '{"i": 0}\n{"i": 5}\n{"i": 6}\n'

    utils.delete_batch_files(output, "7")
    assert utils.list_batch_files(output, "7") == []
    utils.delete_input_batch_files(output, "7")
    # Nothing left beside the output, not even empty directories.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["result.jsonl"]
    assert not utils.cloud_path_exists(first)


def test_helpers_that_need_a_job_id_refuse_none(tmp_path: Path) -> None:
    output = str(tmp_path / "o.jsonl")
    for helper in (
        utils.delete_batch_files,
        utils.delete_input_batch_files,
        utils.concatenate_batches_to_output,
    ):
        with pytest.raises(ValueError, match="job_id is required"):
            helper(output, None)


def test_files_up_and_down(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"\x00\x01" * 1000)
    utils.upload_file_to_cloud(str(src), str(tmp_path / "a" / "b.bin"))
    utils.download_from_cloud(str(tmp_path / "a" / "b.bin"), str(tmp_path / "c.bin"))
    assert (tmp_path / "c.bin").read_bytes() == src.read_bytes()
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n\nnot json\n')
    with pytest.raises(ValueError, match="line 3"):
        utils.load_jsonl_from_cloud(str(tmp_path / "bad.jsonl"))
