"""The format registry: spec kinds to classes, codec tags the runner knows, pyarrow lazy."""

from __future__ import annotations

import subprocess
import sys

import pytest

from skybatch.io import registry
from skybatch.runner import codec

_PART_TAGS = {codec.JSONL, codec.CSV, codec.RECORDS, codec.IMAGE}


@pytest.mark.parametrize("kind", registry.known("reader"))
def test_each_reader_kind_names_its_class_and_a_tag_the_runner_decodes(kind: str) -> None:
    cls = registry.reader_class(kind)
    assert cls.kind == kind
    assert cls.payload_format in codec.DECODERS


@pytest.mark.parametrize("kind", registry.known("writer"))
def test_each_writer_kind_names_its_class_and_a_tag_the_runner_encodes(kind: str) -> None:
    cls = registry.writer_class(kind)
    assert cls.kind == kind
    assert cls.part_format in _PART_TAGS


def test_an_unknown_kind_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown reader kind 'image'; known: csv, jsonl, parquet"):
        registry.reader_from_spec({"kind": "image", "path": "x"})
    with pytest.raises(ValueError, match="unknown writer kind 'nope'; known: csv, image, jsonl"):
        registry.writer_from_spec({"kind": "nope"})


def test_the_server_and_agent_start_without_pyarrow() -> None:
    # pyarrow costs the server tens of MB of RSS: only a Parquet job may import it.
    code = (
        "import sys, skybatch, skybatch.server.app, skybatch.agent.agent\n"
        "from skybatch.io.registry import writer_class\n"
        "for kind in ('jsonl', 'csv', 'image'): writer_class(kind)\n"
        "assert 'pyarrow' not in sys.modules, 'pyarrow imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
