"""Sky Batch's simple example (examples/batch/simple/double_text.py), ported to skybatch.

Ported by the rename rule (``sky.batch.`` → ``skybatch.``), with two differences:

- the data lives in a local directory (``SKY_BATCH_DIR``) in place of an S3 bucket, so the
  example runs without cloud credentials; an ``s3://`` or ``gs://`` prefix works the same;
- ``ensure_pool`` uses skybatch's ``pool_status``/``pool_apply``: Sky Batch's goes through
  SkyPilot's own SDK (``sky.jobs.pool_status``, ``sky.Task.from_yaml``, ``serve_utils``),
  which the rename rule does not cover.

Usage: ``skybatch pool apply -p test-batch-pool pool.yaml -y`` (optional: the script
creates the pool if it is missing), then ``python double_text.py``.
"""

import os

import skybatch
from skybatch import utils


@skybatch.remote_function
def double_text():
    """Double each text string of each batch; runs on the workers."""
    for batch in skybatch.load():
        print(f"Processing batch: {batch}")
        results = []
        for item in batch:
            text = item.get("text", "")
            results.append({"text": text, "output": text * 2})
        skybatch.save_results(results)


def ensure_pool(pool_name: str, pool_yaml: str) -> None:
    """Create the pool if it does not exist yet."""
    if any(p.name == pool_name for p in skybatch.pool_status()):
        print(f"Pool {pool_name} already exists, skipping pool apply.")
        return
    print(f"Pool {pool_name} not found. Creating from {pool_yaml}...")
    skybatch.pool_apply(pool_yaml, pool_name)
    print(f"Pool {pool_name} is ready.")


def main():
    data_dir = os.environ.get("SKY_BATCH_DIR", os.path.join(os.getcwd(), "sky-batch-simple"))
    print(f"Using directory: {data_dir}  (override with SKY_BATCH_DIR env var)")

    input_path = os.path.join(data_dir, "test.jsonl")
    output_path = os.path.join(data_dir, "output.jsonl")
    pool_name = os.environ.get("BATCH_POOL_NAME", "test-batch-pool")
    pool_yaml = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pool.yaml")

    ds = skybatch.Dataset(skybatch.JsonReader(input_path))
    ensure_pool(pool_name, pool_yaml)

    print(f"Processing dataset {input_path} on pool {pool_name}...")
    ds.map(
        double_text,
        pool_name=pool_name,
        batch_size=2,
        output=skybatch.JsonWriter(output_path),
    )
    print(f"Done! Results written to {output_path}")

    print("\n" + "=" * 60)
    print("RESULTS:")
    print("=" * 60)
    try:
        results = utils.load_jsonl_from_cloud(output_path)
        for i, result in enumerate(results, 1):
            print(f"{i}. {result}")
        print("=" * 60)
        print(f"Total results: {len(results)}")
    except Exception as e:
        print(f"Error loading results: {e}")
        print(f"You can manually download the results from: {output_path}")


if __name__ == "__main__":
    main()
