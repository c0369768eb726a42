"""A reader and a writer of your own: rows from a SQLite table, results as a Markdown table.

    python examples/custom_formats/run.py

Creates ./skybatch-custom/books.db with 12 books, brings up a 2-worker local pool
"custom", maps a function over the table in batches of 5 and writes
./skybatch-custom/books.md. Both classes live in this script; skybatch ships
their source to the server and the workers, as it does the mapper.
"""

from __future__ import annotations

import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

import skybatch


@dataclass
class SqliteReader(skybatch.InputReader):
    """Rows of one SQLite table, in rowid order: the Sky Batch reader interface."""

    path: str
    table: str

    def __len__(self) -> int:
        with sqlite3.connect(self.path) as db:
            return db.execute(f"SELECT COUNT(*) FROM {self.table}").fetchone()[0]

    def download_batch(self, start_idx: int, end_idx: int, cache_dir: str) -> list[dict]:
        with sqlite3.connect(self.path) as db:
            db.row_factory = sqlite3.Row
            rows = db.execute(
                f"SELECT * FROM {self.table} ORDER BY rowid LIMIT ? OFFSET ?",
                (end_idx - start_idx + 1, start_idx),
            ).fetchall()
        return [dict(r) for r in rows]


class MarkdownWriter(skybatch.OutputWriter):
    """Results as a Markdown table: one line per row, a header from the columns."""

    def __init__(self, path: str, columns: list[str]) -> None:
        self.path = str(Path(path).resolve())
        self.columns = columns

    def write_batch(self, rows: list[dict]) -> bytes:
        lines = ("| " + " | ".join(str(r[c]) for c in self.columns) + " |\n" for r in rows)
        return "".join(lines).encode()

    def reduce(self, parts, out) -> None:
        out.write(("| " + " | ".join(self.columns) + " |\n").encode())
        out.write(("|" + "---|" * len(self.columns) + "\n").encode())
        for part in parts:
            out.write(part.read())


@skybatch.remote_function
def summarize():
    for batch in skybatch.load():
        skybatch.save_results(
            [
                {"title": b["title"], "words": len(b["title"].split()), "year": b["year"]}
                for b in batch
            ]
        )


def main() -> int:
    work = Path("skybatch-custom").resolve()
    work.mkdir(exist_ok=True)
    db_path = work / "books.db"
    db_path.unlink(missing_ok=True)
    with sqlite3.connect(db_path) as db:
        db.execute("CREATE TABLE books (title TEXT, year INTEGER)")
        db.executemany(
            "INSERT INTO books VALUES (?, ?)",
            [(f"The Book of Things {i}", 1990 + i) for i in range(12)],
        )
    (work / "pool.yaml").write_text("pool:\n  workers: 2\nresources:\n  cpus: 1+\n")
    skybatch.pool_apply(str(work / "pool.yaml"), "custom")
    ds = skybatch.Dataset(SqliteReader(str(db_path), "books"))
    ds.map(
        summarize,
        pool_name="custom",
        batch_size=5,
        output=MarkdownWriter(str(work / "books.md"), ["title", "words", "year"]),
        overwrite=True,
    )
    print((work / "books.md").read_text(), end="")
    skybatch.pool_down("custom")
    return 0


if __name__ == "__main__":
    sys.exit(main())
