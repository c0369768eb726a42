"""Each example in examples/, run as a user runs it, on small data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.helpers import REPO, Deployment, read_jsonl

EXAMPLES = REPO / "examples"


def run(d: Deployment, cwd: Path, *args: str, timeout: float = 180) -> str:
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=d.env(), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def copy_example(name: str, dst: Path) -> Path:
    shutil.copytree(EXAMPLES / name, dst / name)
    return dst / name


def test_images_example(deployment: Deployment, tmp_path: Path) -> None:
    work = copy_example("images", tmp_path)
    deployment.cli("pool", "apply", "pool.yaml", "--pool", "image-pool", "-y", cwd=work)
    run(deployment, work, "generate_cpu.py")
    prompts = read_jsonl(work / "prompts.jsonl")
    manifest = read_jsonl(work / "manifest.jsonl")
    assert manifest == [
        {"prompt": p["prompt"], "image": f"{i:08d}.png"} for i, p in enumerate(prompts)
    ]
    assert sorted(p.name for p in (work / "images").iterdir()) == [m["image"] for m in manifest]
    with Image.open(work / "images" / manifest[0]["image"]) as img:
        assert img.size == (256, 256) and img.format == "PNG"
    # The GPU variant at least parses, and uses the same outputs.
    sd = (work / "generate_sd.py").read_text()
    compile(sd, "generate_sd.py", "exec")
    assert 'skybatch.ImageWriter("images/", column="image")' in sd


def test_custom_formats_example(deployment: Deployment, tmp_path: Path) -> None:
    out = run(deployment, tmp_path, str(EXAMPLES / "custom_formats" / "run.py"))
    lines = out.splitlines()
    assert lines[:3] == [
        "| title | words | year |",
        "|---|---|---|",
        "| The Book of Things 0 | 5 | 1990 |",
    ]
    assert lines[-1] == "| The Book of Things 11 | 5 | 2001 |" and len(lines) == 14


def test_word_counts_example(deployment: Deployment, tmp_path: Path) -> None:
    pages = []
    for i, body in enumerate(["one two three", "<script>var x = 1;</script>four five", "six"]):
        page = tmp_path / f"page{i}.html"
        page.write_text(
            f"<html><head><style>p {{}}</style></head><body><p>{body}</p></body></html>"
        )
        pages.append(page.as_uri())
    out = run(deployment, tmp_path, str(EXAMPLES / "word_counts" / "count_words.py"), *pages)
    assert [line.split() for line in out.splitlines()] == [
        ["3", pages[0]], ["2", pages[1]], ["1", pages[2]]
    ]  # fmt: skip


@pytest.mark.slow
def test_embeddings_example(deployment: Deployment, tmp_path: Path) -> None:
    work = copy_example("embeddings", tmp_path)
    deployment.cli("pool", "apply", "pool.yaml", "--pool", "embed-pool", "-y", cwd=work)
    run(deployment, work, "embed.py", timeout=300)
    table = pq.read_table(work / "embeddings.parquet")
    rows = table.to_pylist()
    corpus = read_jsonl(work / "corpus.jsonl")
    assert [(r["id"], r["text"]) for r in rows] == [(c["id"], c["text"]) for c in corpus]
    assert all(len(r["embedding"]) == 384 for r in rows)

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))  # normalized embeddings

    e = [r["embedding"] for r in rows]
    # The model is real: paraphrases are closer than unrelated sentences.
    assert cos(e[0], e[1]) > cos(e[0], e[2]) + 0.2
    assert cos(e[2], e[3]) > cos(e[2], e[4]) + 0.2
    assert json.dumps(rows[0]["id"]) == "0"
