"""Sky Batch's format registries (``sky.utils.registry``), for ported custom formats::

    from skybatch.utils import registry

    @registry.OUTPUT_WRITER_REGISTRY.type_register(name="text")
    @dataclass
    class TextWriter(io_formats.OutputWriter): ...

skybatch does not need a class registered to run it: a reader or writer of your
own travels by its class (``io/custom.py``). Registering names it, so that
``from_str(name)`` finds it; the built-in formats are found by their spec
``kind`` (``jsonl``, ``csv``, ``parquet``, ``image``) and by Sky Batch's names
(``json``). A name registered again (a script run twice in one process, or its
class loaded again on the server) now means the later class.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from skybatch.io import registry as formats
from skybatch.io.base import InputReader, OutputWriter

__all__ = ["INPUT_READER_REGISTRY", "OUTPUT_WRITER_REGISTRY", "Registry"]

T = TypeVar("T", bound=type)

#: Sky Batch's names of built-in formats that skybatch spells otherwise.
_ALIASES = {"json": "jsonl"}


class Registry(Generic[T]):
    """Names to reader or writer classes."""

    def __init__(self, what: str, base: type) -> None:
        self._what = what
        self._base = base
        self._classes: dict[str, Any] = {}
        self._lock = threading.Lock()

    def type_register(self, name: str) -> Callable[[T], T]:
        """A class decorator that registers the class under ``name``."""

        def register(cls: T) -> T:
            if not (isinstance(cls, type) and issubclass(cls, self._base)):
                raise TypeError(
                    f"{self._what} {name!r}: {cls!r} is not a subclass of "
                    f"skybatch.{self._base.__name__}"
                )
            with self._lock:
                self._classes[name.lower()] = cls
            return cls

        return register

    def from_str(self, name: str | None) -> Any:
        """The class registered as ``name``, or the built-in format of that name; None
        for an unknown name (as in Sky Batch)."""
        if name is None:
            return None
        key = name.lower()
        with self._lock:
            found = self._classes.get(key)
        if found is not None:
            return found
        try:
            if self._base is InputReader:
                return formats.reader_class(_ALIASES.get(key, key))
            return formats.writer_class(_ALIASES.get(key, key))
        except ValueError:
            return None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.from_str(name) is not None

    def items(self) -> list[tuple[str, Any]]:
        """The registered names and classes (built-in formats are not listed)."""
        with self._lock:
            return list(self._classes.items())

    def keys(self) -> list[str]:
        return [name for name, _ in self.items()]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())


INPUT_READER_REGISTRY: Registry[type[InputReader]] = Registry("input reader", InputReader)
OUTPUT_WRITER_REGISTRY: Registry[type[OutputWriter]] = Registry("output writer", OutputWriter)
