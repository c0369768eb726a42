"""A job run from a Jupyter notebook, executed in a real kernel (nbclient + ipykernel):
the mapper uses a helper, a class, a constant and a module from earlier cells, and the
progress bar shows in the notebook's output."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import Deployment, read_jsonl

CELLS = [
    # Cell 1: imports and a constant.
    "import math\nimport skybatch\n\nSCALE = 3\nOUT = {out!r}",
    # Cell 2: a helper and a class using them.
    "def helper(x):\n    return math.floor(x * SCALE / 2)\n\n\n"
    "class Tag:\n    def __init__(self, prefix):\n        self.prefix = prefix\n\n"
    "    def __call__(self, x):\n        return f'{{self.prefix}}-{{x}}'",
    # Cell 3: the mapper, Sky Batch-style.
    "@skybatch.remote_function\ndef mapper():\n    tag = Tag('row')\n"
    "    for batch in skybatch.load():\n"
    "        skybatch.save_results([{{'y': helper(r['x']), 'tag': tag(r['x'])}} for r in batch])",
    # Cell 4: the job, streamed with its progress bar.
    "ds = skybatch.Dataset.from_items([{{'x': i}} for i in range(20)])\n"
    "job = ds.map(mapper, pool_name='pool', batch_size=4, output=skybatch.JsonWriter(OUT))\n"
    "print('job done', int(job))",
    # Cell 5: Runhouse-style, the helper itself over a list.
    "print(skybatch.map(helper, [1, 2, 3, 4], pool_name='pool', batch_size=2))",
]


@pytest.mark.timeout(300)
def test_notebook_job_uses_earlier_cells(deployment: Deployment, tmp_path: Path) -> None:
    deployment.pool("pool", workers=2)
    out = tmp_path / "out.jsonl"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c.format(out=str(out))) for c in CELLS]
    # The kernel inherits this process's environment, SKYBATCH_HOME included.
    NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    assert read_jsonl(out) == [{"y": (i * 3) // 2, "tag": f"row-{i}"} for i in range(20)]
    job_cell, map_cell = nb.cells[3], nb.cells[4]
    texts = {
        name: "".join(o.get("text", "") for o in job_cell.outputs if o.get("name") == name)
        for name in ("stdout", "stderr")
    }
    assert texts["stdout"].startswith("job done 1")
    # tqdm's bar, as text in the cell's stderr: "job 1 (mapper): 100%|...| 20/20 ..."
    assert "job 1 (mapper)" in texts["stderr"] and "20/20" in texts["stderr"], job_cell.outputs
    printed = "".join(o.get("text", "") for o in map_cell.outputs if o.get("name") == "stdout")
    assert printed.strip() == "[1, 3, 4, 6]"
