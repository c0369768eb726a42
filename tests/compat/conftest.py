"""The compat suite's fixtures: the e2e deployments. A test that runs a server (one that
uses them) is marked ``e2e`` like the tests under tests/e2e/."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import deployment, shared

__all__ = ["deployment", "shared"]

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The hook sees the whole session's items, not only this directory's.
    for item in items:
        if item.path.is_relative_to(_HERE) and {"deployment", "shared"} & set(
            getattr(item, "fixturenames", ())
        ):
            item.add_marker(pytest.mark.e2e)
