"""``@remote_function``: ship a mapper as source, checked at decoration time.

The mapper runs on workers in another process and maybe another Python, so it
must be self-contained: no closures, no module-level names but skybatch
itself. Catching that here, with the name and the fix, beats a NameError on
every worker an hour into a job.
"""

from __future__ import annotations

import ast
import builtins
import functools
import inspect
import textwrap
import types
from collections.abc import Callable
from typing import Any, NoReturn

from skybatch.codecheck import global_names
from skybatch.errors import MapperError, SkyBatchError

__all__ = ["RemoteFunction", "is_remote_function", "load", "remote_function", "save_results"]


# The stubs ``skybatch.load`` and ``skybatch.save_results`` (the runner gives mappers the
# real ones): here, beside the check that recognises them, not in the package above.
def load() -> NoReturn:
    """Inside a mapper on a worker: yield the batches, each a list of dicts."""
    raise SkyBatchError(
        "skybatch.load() works only inside a mapper running on a worker; "
        "decorate the mapper with @skybatch.remote_function and pass it to ds.map(...)"
    )


def save_results(results: list[dict[str, Any]]) -> NoReturn:
    """Inside a mapper on a worker: save one dict per input row of the current batch."""
    raise SkyBatchError(
        "skybatch.save_results() works only inside a mapper running on a worker; "
        "pass the mapper to ds.map(...)"
    )


def _skybatch_alias(value: Any) -> str | None:
    """How a global bound to skybatch (the module, load, save_results) is rebuilt on workers."""
    # By name, not identity: the client sits below the public package and does not import it.
    if isinstance(value, types.ModuleType) and value.__name__ == "skybatch":
        return "module"
    if value is load:
        return "load"
    if value is save_results:
        return "save_results"
    return None


class RemoteFunction:
    """A mapper function made ready to run on workers. Create it with ``@remote_function``."""

    #: Sky Batch's mark of a decorated function, which ported code may test directly.
    _is_remote_function = True

    def __init__(self, fn: Callable[[], Any] | RemoteFunction) -> None:
        if isinstance(fn, RemoteFunction):
            fn = fn.fn
        if not isinstance(fn, types.FunctionType):
            raise MapperError(
                f"@remote_function needs a function defined with `def`, got {type(fn).__name__}"
            )
        self.fn: types.FunctionType = fn
        self.name = fn.__name__
        if self.name == "<lambda>":
            raise MapperError("@remote_function cannot ship a lambda; define the mapper with `def`")
        if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
            raise MapperError(f"mapper {self.name!r} is async; define it with plain `def`")
        where = f"mapper {self.name!r} ({fn.__code__.co_filename}:{fn.__code__.co_firstlineno})"
        self._check_signature(where)
        self._check_closure(where)
        self.aliases = self._check_globals(where)
        self.filename = fn.__code__.co_filename
        self.source = self._source(where)
        # Name, docstring and ``__wrapped__`` of the function, as Sky Batch's decorator keeps them.
        functools.update_wrapper(self, fn)

    def _check_signature(self, where: str) -> None:
        required = [
            p.name
            for p in inspect.signature(self.fn).parameters.values()
            if p.default is inspect.Parameter.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if required:
            raise MapperError(
                f"{where} takes parameters {required}; a mapper takes none and reads its "
                "input with `for batch in skybatch.load():`"
            )

    def _check_closure(self, where: str) -> None:
        free = self.fn.__code__.co_freevars
        if free:
            # Sky Batch's wording ("references external variables", "clean namespace"),
            # which ported code and tests match on.
            raise MapperError(
                f"{where} references external variables {', '.join(repr(n) for n in free)} "
                "of an enclosing function (a closure); workers run it in a clean namespace, "
                "so they cannot be shipped. Move their definitions inside the function body "
                "and define the mapper at module level"
            )

    def _check_globals(self, where: str) -> dict[str, str]:
        aliases: dict[str, str] = {}
        env = self.fn.__globals__
        for op, name in global_names(self.fn.__code__):
            if op != "LOAD_GLOBAL" and op != "LOAD_NAME":
                raise MapperError(
                    f"{where} assigns the module-level name {name!r} (`global {name}`); "
                    "workers cannot change your script's globals: keep state in local variables"
                )
            if name == "__name__":
                continue  # class bodies read it; the runner's namespace defines it
            if name in env:
                alias = _skybatch_alias(env[name])
                if alias is None:
                    raise MapperError(
                        f"{where} uses the module-level name {name!r}, which does not exist on "
                        f"workers; import or define {name!r} inside the function body "
                        f"(e.g. `import {name}` as its first line)"
                    )
                aliases[name] = alias
            elif not hasattr(builtins, name):
                raise MapperError(
                    f"{where} uses {name!r}, which is neither a builtin nor defined inside the "
                    f"function; import or define {name!r} inside the function body"
                )
        return aliases

    def _source(self, where: str) -> str:
        try:
            lines, first = inspect.getsourcelines(self.fn)
        except (OSError, TypeError) as e:
            raise MapperError(
                f"cannot read the source of {where} ({e}); define the mapper in a .py file "
                "or a notebook cell"
            ) from None
        text = textwrap.dedent("".join(lines))
        tree = ast.parse(text)
        node = tree.body[0]
        assert isinstance(node, ast.FunctionDef)
        body = text.splitlines(keepends=True)[node.lineno - 1 :]
        # Pad so that line numbers in workers' tracebacks match the user's file.
        return "\n" * (first - 1 + node.lineno - 1) + "".join(body)

    def to_spec(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "filename": self.filename,
            "aliases": self.aliases,
        }

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise MapperError(
            f"mapper {self.name!r} runs on a pool's workers; run it with "
            f"ds.map({self.name}, pool_name=..., batch_size=..., output=...)"
        )

    def __repr__(self) -> str:
        return f"<remote_function {self.name}>"


def remote_function(fn: Callable[[], Any]) -> RemoteFunction:
    """Mark ``fn`` as a mapper that runs on workers.

    ``fn`` takes no arguments, iterates ``skybatch.load()`` and calls
    ``skybatch.save_results()`` once per batch. It must import what it uses
    inside its body; module-level names other than skybatch are refused here.
    """
    return RemoteFunction(fn)


def is_remote_function(fn: Any) -> bool:
    """Whether ``fn`` was decorated with ``@remote_function`` (Sky Batch's helper of that name)."""
    return getattr(fn, "_is_remote_function", False) is True
