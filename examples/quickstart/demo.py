"""A demo job on the embedded default: a local pool, generated local data.

    python examples/quickstart/demo.py

Starts the skybatch server if needed (in SKYBATCH_HOME, default ~/.skybatch),
brings up a 2-worker local pool named "demo", doubles the text of 10,000
generated rows, shows the first lines of the output and the job queue, then
takes the pool down again. Everything it writes lands in ./skybatch-demo/.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import skybatch


@skybatch.remote_function
def double_text():
    for batch in skybatch.load():
        skybatch.save_results([{"output": item["text"] * 2} for item in batch])


def main() -> int:
    work = Path("skybatch-demo").resolve()
    work.mkdir(exist_ok=True)
    data = work / "data.jsonl"
    with open(data, "w") as f:
        for i in range(10_000):
            f.write(json.dumps({"text": f"row{i}-"}) + "\n")
    (work / "pool.yaml").write_text(
        'pool:\n  workers: 2\nresources:\n  cpus: 1+\nsetup: echo "Setup complete!"\n'
    )
    print(f"1. pool apply {work / 'pool.yaml'} --pool demo")
    view = skybatch.pool_apply(str(work / "pool.yaml"), "demo")
    print(f"   pool 'demo' is {view.status} with {view.ready} workers")
    print("2. ds.map(double_text, batch_size=500) over 10,000 rows")
    ds = skybatch.Dataset(skybatch.JsonReader(str(data)))
    job = ds.map(
        double_text,
        pool_name="demo",
        batch_size=500,
        output=skybatch.JsonWriter(str(work / "out.jsonl")),
        overwrite=True,
    )
    lines = (work / "out.jsonl").read_text().splitlines()
    print(f"3. {work / 'out.jsonl'}: {len(lines)} lines, the first three:")
    for line in lines[:3]:
        print(f"   {line}")
    info = job.info()
    print(
        f"4. job {job.job_id}: {info.status}, {info.committed_rows} rows in "
        f"{info.committed_batches} batches"
    )
    skybatch.pool_down("demo")
    print("5. pool 'demo' is down. The server keeps running: `skybatch server stop` stops it.")
    ok = len(lines) == 10_000 and lines[0] == '{"output":"row0-row0-"}'
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
