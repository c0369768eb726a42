"""Which global names a piece of code uses: the early check on code that travels
(mappers, custom readers and writers) to processes that lack the user's globals."""

from __future__ import annotations

import dis
import types
from collections.abc import Iterator
from typing import Any

__all__ = ["global_names", "plain_constant"]


def global_names(code: types.CodeType) -> Iterator[tuple[str, str]]:
    """(opname, name) for every global load or store in ``code`` and nested code."""
    instructions = list(dis.get_instructions(code))
    # A class body inside the mapper loads its own names with LOAD_NAME: not globals.
    own = {str(i.argval) for i in instructions if i.opname == "STORE_NAME"}
    for ins in instructions:
        if ins.opname in ("LOAD_GLOBAL", "STORE_GLOBAL", "DELETE_GLOBAL") or (
            ins.opname == "LOAD_NAME" and ins.argval not in own
        ):
            yield ins.opname, str(ins.argval)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from global_names(const)


def plain_constant(value: Any) -> bool:
    """A value that travels by its ``repr``: int, float, str, bytes, bool, None, and
    tuples, lists, sets and dicts of those."""
    if value is None or type(value) in (bool, int, float, str, bytes):
        return True
    if type(value) in (tuple, list, set, frozenset):
        return all(plain_constant(v) for v in value)
    if type(value) is dict:
        return all(plain_constant(k) and plain_constant(v) for k, v in value.items())
    return False
