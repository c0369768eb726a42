"""``skybatch.map(fn, items, ...)``: a plain function of one item, run over a list on a pool.

Built on ``Dataset.from_items`` and ``Dataset.map``, so it has their retries,
poison-row isolation, progress bar and resume: each item travels as the row
``{"i": index, "item": item}`` (JSON, so a tuple comes back a list), and a
generated mapper calls ``fn`` on each row's item. ``fn`` and what it uses from
its script or notebook ship as ``@remote_function`` ships a mapper's.

Result rows: without ``output=``, ``{"result": value}``, unwrapped into the list
returned (or by ``MapJob.results()``); with ``output=``, the dict ``fn``
returned is the row itself, any other value the row ``{"result": value}``.
"""

from __future__ import annotations

import inspect
import site
import sys
import sysconfig
import types
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from skybatch import defaults
from skybatch.client.dataset import Dataset, Job
from skybatch.client.remote import RemoteFunction, Shipment, _importable
from skybatch.errors import ConfigError, MapperError
from skybatch.io.base import OutputWriter

__all__ = ["MapJob", "map"]

#: What the generated mapper calls ``fn`` by: no name of the user's script can clash.
_FN = "__skybatch_fn__"
_FILENAME = "<skybatch.map>"

_MAPPER = '''\
def __skybatch_map__():
    import skybatch

    FN_NAME = NAME_LITERAL

    class ItemError(Exception):
        """fn failed on one item; the message names the item's index."""

    for batch in skybatch.load():
        out = []
        for row in batch:
            try:
                value = __skybatch_fn__(row["item"])
            except Exception as e:
                raise ItemError(
                    f"item {row['i']}: {FN_NAME}({row['item']!r:.80}) raised "
                    f"{type(e).__name__}: {e}"
                ) from e
            if DICT_ROWS:
                out.append(value if isinstance(value, dict) else {"result": value})
            else:
                out.append({"i": row["i"], "result": value})
        skybatch.save_results(out)
'''


class MapJob(Job):
    """The job of ``skybatch.map(..., stream=False)``: ``results()`` gives fn's values."""

    def results(self) -> list[Any]:
        """fn's return values in the items' order (a job without ``output=``); None
        for an item isolated as poison (``max_failed_rows``), whose error is in ``errors=``."""
        rows = super().results()
        if all(row.get("i") == n for n, row in enumerate(rows)):
            return [row.get("result") for row in rows]
        values: list[Any] = [None] * self.info().total_rows
        for row in rows:
            values[row["i"]] = row.get("result")
        return values

    def get(self, timeout: float | None = None) -> list[Any]:
        """Wait for the job, then its results: Runhouse-style ``fn.map(...).get()``."""
        self.wait(timeout=timeout)
        return self.results()


class _GeneratedMapper(RemoteFunction):
    """The mapper that calls fn on each item: already checked, so no decoration; its
    shipment is gathered by ``skybatch.map`` itself, just before it submits."""

    def __init__(self, label: str, source: str, shipment: Shipment) -> None:
        self.name = label
        self.source = source
        self.filename = _FILENAME
        self._gathered = shipment

    def shipment(self) -> Shipment:
        return self._gathered

    def to_spec(self) -> dict[str, Any]:
        return {
            "name": "__skybatch_map__",
            "source": self.source,
            "filename": self.filename,
            "aliases": self._gathered.aliases,
            "globals": self._gathered.entries,
            "flags": 0,
        }


def _mapper_source(label: str, dict_rows: bool) -> str:
    # The name as a literal, substituted last: no name can break the generated source.
    return _MAPPER.replace("DICT_ROWS", repr(dict_rows)).replace("NAME_LITERAL", repr(label))


def _installed(module: str) -> bool:
    """Whether ``module`` is Python's own or an installed package's, which a worker's
    environment imports by name: the pool installs packages, never the user's files."""
    found = sys.modules.get(module)
    if found is None:
        return False
    file = getattr(found, "__file__", None)
    if file is None:
        return True  # built into the interpreter
    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots.update(site.getsitepackages())
    path = Path(file).resolve()
    return any(path.is_relative_to(Path(root).resolve()) for root in roots)


def _shipment(fn: Any) -> Shipment:
    name = getattr(fn, "__name__", type(fn).__name__)
    if isinstance(fn, types.FunctionType):
        if fn.__name__ == "<lambda>":
            raise MapperError(
                "skybatch.map cannot ship a lambda: workers rebuild functions from their source; "
                "define it with `def`"
            )
        if inspect.iscoroutinefunction(fn) or inspect.isgeneratorfunction(fn):
            raise MapperError(f"skybatch.map: {name!r} must be a plain `def` returning a value")
    where = f"skybatch.map function {name!r}"
    code = getattr(fn, "__code__", None)
    if code is not None:
        where += f" ({code.co_filename}:{code.co_firstlineno})"
    if isinstance(fn, types.FunctionType) and fn.__code__.co_freevars:
        free = ", ".join(repr(n) for n in fn.__code__.co_freevars)
        raise MapperError(
            f"{where} references external variables {free} of an enclosing function (a closure); "
            "workers run it in a clean namespace: define it at the top level of its script "
            "and pass the values in the items"
        )
    module = getattr(fn, "__module__", None)
    importable = (
        _importable(fn) is not None
        and isinstance(module, str)
        and module != "__main__"
        and _installed(module)
    )
    if isinstance(fn, types.FunctionType) and not importable:
        # The script's, the notebook's or a module of the user's own: by its source.
        shipment = Shipment(module)
        shipment.add_source(_FN, fn, where, top=True)
    elif _importable(fn) is not None:
        shipment = Shipment(None)  # a library's function: imported on the worker
        shipment.add(_FN, fn, where)
    else:
        raise MapperError(
            f"skybatch.map needs a function defined with `def` or importable from a module, got "
            f"{fn!r}; wrap it in a `def` at the top level of the script"
        )
    return shipment


def map(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    pool_name: str,
    batch_size: int = 1,
    output: OutputWriter | Sequence[OutputWriter] | None = None,
    activate_env: str | None = None,
    stream: bool = True,
    *,
    overwrite: bool = False,
    max_retries: int = defaults.MAX_RETRIES,
    retry_backoff: float = defaults.RETRY_BACKOFF,
    batch_timeout: float | None = None,
    max_failed_rows: int | None = None,
    errors: OutputWriter | None = None,
    name: str | None = None,
    resume: str | int | None = None,
    resume_from: str | int | None = None,
) -> list[Any] | MapJob:
    """Call ``fn(item)`` for each item on pool ``pool_name``, ``batch_size`` items per batch.

    Returns fn's results in the items' order when it waits (``stream=True``, no
    ``output=``); the :class:`MapJob` with ``stream=False`` (``job.get()`` waits and
    gives the results) or with ``output=`` (the rows written by the writers). A
    failing item fails its batch, whose error names the item's index; the other
    keywords are ``Dataset.map``'s (retries, ``max_failed_rows`` poison isolation, resume).
    """
    if isinstance(items, (str, bytes, dict)) or not isinstance(items, Iterable):
        raise ConfigError(f"skybatch.map needs a list of items, got {type(items).__name__}")
    rows = [{"i": i, "item": item} for i, item in enumerate(items)]
    shipment = _shipment(fn)
    if not rows:
        if stream and output is None:
            return []
        # A job of no rows would have nothing to write, and no job to return.
        raise ConfigError(
            "skybatch.map got no items; with output= or stream=False it needs at least one"
        )
    label = str(getattr(fn, "__name__", "fn"))
    mapper = _GeneratedMapper(label, _mapper_source(label, output is not None), shipment)
    job = Dataset.from_items(rows).map(
        mapper,
        pool_name=pool_name,
        batch_size=batch_size,
        output=output,
        activate_env=activate_env,
        stream=False,
        overwrite=overwrite,
        max_retries=max_retries,
        retry_backoff=retry_backoff,
        batch_timeout=batch_timeout,
        max_failed_rows=max_failed_rows,
        errors=errors,
        name=name or label,
        resume=resume,
        resume_from=resume_from,
    )
    mjob = MapJob(job.job_id, job._client)
    if not stream:
        return mjob
    try:
        mjob.wait(progress=True)
    except KeyboardInterrupt:
        print(
            f"\njob {mjob.job_id} keeps running on the pool; follow it with "
            f"`skybatch jobs queue`, stop it with `skybatch jobs cancel {mjob.job_id}`",
            file=sys.stderr,
        )
        raise
    return mjob.results() if output is None else mjob
