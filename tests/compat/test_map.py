"""``skybatch.map``: the Runhouse way of running a plain function of one item on many
machines, and what a function may use from its script.

The Runhouse + SkyPilot post's ``word_counts`` runs unmodified from its own module
(tests/compat/runhouse_word_counts.py) and again defined in a job script beside a
helper, over pages served by a local HTTP server (the post fetches public URLs).
"""

from __future__ import annotations

import http.server
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import skybatch
from skybatch.client.fmap import _mapper_source
from tests.compat.runhouse_word_counts import word_counts
from tests.helpers import Deployment, read_jsonl

PAGES = {
    "a.html": "<html><body><p>the cat saw the dog</p></body></html>",
    "b.html": "<html><head><title>hello</title></head><body>hello world</body></html>",
    "c.html": "<html><body><ul><li>x</li><li>x</li><li>y</li></ul></body></html>",
}


@pytest.fixture
def site(tmp_path: Path) -> Iterator[list[str]]:
    """The pages on 127.0.0.1, in a thread of this process, stopped at the end."""
    root = tmp_path / "site"
    root.mkdir()
    for name, html in PAGES.items():
        (root / name).write_text(html)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        # Each page twice, so that order shows.
        yield [f"http://127.0.0.1:{server.server_port}/{n}" for n in [*PAGES, *PAGES]]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def expected(urls: list[str]) -> list[dict[str, int]]:
    import requests  # the test's own side: the counts word_counts gives locally
    from bs4 import BeautifulSoup

    out = []
    for url in urls:
        words = BeautifulSoup(requests.get(url).text, "html.parser").get_text().split()
        out.append({w: words.count(w) for w in words})
    return out


def test_word_counts_from_its_own_module(deployment: Deployment, site: list[str]) -> None:
    deployment.pool("pool", workers=2)
    counts = skybatch.map(word_counts, site, pool_name="pool", batch_size=2)
    assert counts == expected(site)
    assert counts[0] == {"the": 2, "cat": 1, "saw": 1, "dog": 1}

    # stream=False: the job, which stands for its id; .get() waits and gives the results.
    job = skybatch.map(word_counts, site[:3], pool_name="pool", stream=False)
    assert isinstance(job, skybatch.MapJob) and int(job) > 0
    assert job.get(timeout=120) == expected(site[:3])


def test_word_counts_beside_its_helper_in_a_script(
    deployment: Deployment, site: list[str], tmp_path: Path
) -> None:
    deployment.pool("pool", workers=2)
    out = tmp_path / "counts.jsonl"
    script = tmp_path / "job.py"
    # No `if __name__ == "__main__":` guard: workers never import the script.
    script.write_text(
        textwrap.dedent(
            f"""
            import json
            import sys

            import requests
            from bs4 import BeautifulSoup

            import skybatch

            PARSER = "html.parser"
            STOP = ("the",)


            def page_words(url):
                soup = BeautifulSoup(requests.get(url).text, PARSER)
                return [w for w in soup.get_text().split() if w not in STOP]


            class Counter:
                def __init__(self, words):
                    self.words = words

                def counts(self):
                    return {{w: self.words.count(w) for w in self.words}}


            def word_counts(url):
                return Counter(page_words(url)).counts()


            urls = {site!r}
            counts = skybatch.map(word_counts, urls, pool_name="pool", batch_size=3)
            print(json.dumps(counts))
            writer = skybatch.JsonWriter({str(out)!r})
            skybatch.map(word_counts, urls, pool_name="pool", output=writer)
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, str(script)],
        env=deployment.env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    want = [{w: n for w, n in c.items() if w != "the"} for c in expected(site)]
    import json

    assert json.loads(proc.stdout.splitlines()[-1]) == want
    # With output=, a dict result is the row itself.
    assert read_jsonl(out) == want


def halve(x):
    if x == 3:
        raise ValueError(f"cannot halve {x}")
    return x / 2


def test_results_in_order_and_errors_name_the_item(deployment: Deployment, tmp_path: Path) -> None:
    deployment.pool("pool", workers=3)
    items = [0, 1, 2, 4, 5, 6, 7, 8, 9, 10]
    assert skybatch.map(halve, items, pool_name="pool", batch_size=3) == [x / 2 for x in items]

    with pytest.raises(skybatch.JobFailedError) as e:
        skybatch.map(halve, [0, 1, 2, 3, 4], pool_name="pool", batch_size=2, max_retries=0)
    assert "item 3: halve(3) raised ValueError: cannot halve 3" in str(e.value)

    # Poison isolation as in ds.map: the bad item is set aside, the rest come back.
    errors = skybatch.JsonWriter(str(tmp_path / "errors.jsonl"))
    got = skybatch.map(
        halve,
        [0, 1, 2, 3, 4],
        pool_name="pool",
        batch_size=2,
        max_retries=0,
        max_failed_rows=1,
        errors=errors,
    )
    assert got == [0.0, 0.5, 1.0, None, 2.0]
    (bad,) = read_jsonl(tmp_path / "errors.jsonl")
    assert "item 3" in str(bad)

    # A library's function is imported on the workers, not shipped by its source.
    assert skybatch.map(textwrap.dedent, ["  a\n  b", " c"], pool_name="pool") == ["a\nb", "c"]

    # No items: nothing to run, so no job; where a job is asked for, a refusal.
    assert skybatch.map(halve, [], pool_name="pool") == []
    for kwargs in ({"stream": False}, {"output": skybatch.JsonWriter(str(tmp_path / "o.jsonl"))}):
        with pytest.raises(
            skybatch.ConfigError, match=r"^skybatch\.map got no items; with output="
        ):
            skybatch.map(halve, [], pool_name="pool", **kwargs)


@pytest.mark.parametrize("label", ["plain", "a{b}c", "q'\"x", "line\nbreak", "DICT_ROWS"])
def test_the_generated_mapper_takes_any_function_name_as_data(label: str) -> None:
    source = _mapper_source(label, dict_rows=False)
    namespace: dict[str, Any] = {}
    exec(compile(source, "<test>", "exec"), namespace)
    consts = namespace["__skybatch_map__"].__code__.co_consts
    assert label in consts and False in consts


def test_refusals_are_one_line_with_the_fix(tmp_path: Path) -> None:
    factor = 3

    def scale(x):
        return x * factor

    with pytest.raises(skybatch.MapperError) as e:
        skybatch.map(scale, [1], pool_name="pool")
    line = scale.__code__.co_firstlineno
    assert str(e.value) == (
        f"skybatch.map function 'scale' ({__file__}:{line}) references external variables "
        "'factor' of an enclosing function (a closure); workers run it in a clean namespace: "
        "define it at the top level of its script and pass the values in the items"
    )

    module = tmp_path / "uses_file.py"
    module.write_text("LOG = open(__file__)\n\n\ndef log_item(x):\n    return LOG.name + x\n")
    namespace: dict[str, object] = {"__name__": "uses_file", "__file__": str(module)}
    exec(compile(module.read_text(), str(module), "exec"), namespace)
    try:
        with pytest.raises(skybatch.MapperError) as e:
            skybatch.map(namespace["log_item"], ["a"], pool_name="pool")  # type: ignore[arg-type]
        assert str(e.value) == (
            f"skybatch.map function 'log_item' ({module}:4) uses the module-level name 'LOG' "
            f"(an open file {str(module)!r}), which cannot be shipped to workers; create 'LOG' "
            "inside the function body"
        )
    finally:
        namespace["LOG"].close()  # type: ignore[attr-defined]
