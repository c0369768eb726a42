"""Count the words of web pages in parallel, results straight back: the Runhouse
blog's "parallelize my function over a list" example.

    python count_words.py URL [URL ...]

Brings up (or reuses) the local pool "word-pool" from pool.yaml beside this
script, fetches and counts each page on the workers, and prints one line per
URL in the order given. No output files: job.results() returns the rows.
"""

import sys
from pathlib import Path

import skybatch


@skybatch.remote_function
def count_words():
    import re
    import urllib.request
    from html.parser import HTMLParser

    class Text(HTMLParser):
        def __init__(self):
            super().__init__()
            self.parts, self.skip = [], 0

        def handle_starttag(self, tag, attrs):
            self.skip += tag in ("script", "style")

        def handle_endtag(self, tag):
            self.skip -= tag in ("script", "style") and self.skip > 0

        def handle_data(self, data):
            if not self.skip:
                self.parts.append(data)

    for batch in skybatch.load():
        results = []
        for item in batch:
            with urllib.request.urlopen(item["url"], timeout=30) as response:
                html = response.read().decode("utf-8", errors="replace")
            parser = Text()
            parser.feed(html)
            words = re.findall(r"[A-Za-z']+", " ".join(parser.parts))
            results.append({"url": item["url"], "words": len(words)})
        skybatch.save_results(results)


def main(urls: list[str]) -> int:
    if not urls:
        print(__doc__)
        return 2
    skybatch.pool_apply(str(Path(__file__).with_name("pool.yaml")), "word-pool")
    job = skybatch.Dataset.from_items([{"url": u} for u in urls]).map(
        count_words, pool_name="word-pool", batch_size=2
    )
    for row in job.results():
        print(f"{row['words']:>8}  {row['url']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
