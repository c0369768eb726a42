"""The function of the Runhouse + SkyPilot post ("Parallel batch processing with Runhouse
and SkyPilot"), as written there; only ``import runhouse as rh`` is left out, since
skybatch takes its place. tests/compat/test_map.py runs it with ``skybatch.map``."""

# ruff: noqa: I001 - the post's imports, in its order

from bs4 import BeautifulSoup
import requests


def word_counts(url):
    response = requests.get(url)
    soup = BeautifulSoup(response.text, "html.parser")
    words = soup.get_text().split()
    return {word: words.count(word) for word in words}
