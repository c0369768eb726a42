"""``@remote_function``: ship a mapper as source, with what it uses as it is at submit.

The mapper runs on workers in another process and maybe another Python, where
the user's script is never imported (so a script without an
``if __name__ == "__main__":`` guard is fine). What the mapper uses from its
script or notebook travels with it, as the worker rebuilds it
(``runner/main.py``'s ``_rebuild_globals``):

- functions and classes of that script or notebook (or of the mapped
  function's own module): by their source, and what they use in turn;
- modules, and functions or classes of other modules: as imports;
- plain constants (int, float, str, bytes, bool, None, and tuples, lists,
  sets and dicts of those): by value.

Anything else (an open file, a lock, a live client) is refused when the job is
submitted, with its name and the fix: that beats a NameError on every worker an
hour into a job. A closure over a local variable is refused at decoration.
"""

from __future__ import annotations
import __future__

import ast
import builtins
import functools
import inspect
import io
import linecache
import sys
import textwrap
import types
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

from skybatch.codecheck import global_names
from skybatch.codecheck import plain_constant as _plain
from skybatch.errors import MapperError, SkyBatchError

__all__ = [
    "RemoteFunction",
    "Shipment",
    "is_remote_function",
    "load",
    "remote_function",
    "save_results",
]

#: A constant's ``repr`` past this would bloat every job spec: load it inside the function.
MAX_CONSTANT_CHARS = 1 << 20


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


def _describe(value: Any) -> str:
    """What an unshippable value is, in a few words."""
    if isinstance(value, io.IOBase):
        name = getattr(value, "name", None)
        return f"an open file {name!r}" if name is not None else "an open file"
    kind = type(value)
    return f"a {kind.__module__}.{kind.__qualname__} object".replace("a builtins.", "a ")


def _importable(value: Any) -> tuple[str, str] | None:
    """(module, qualname) from which a worker can import ``value`` itself, if any."""
    module = getattr(value, "__module__", None)
    qualname = getattr(value, "__qualname__", None) or getattr(value, "__name__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return None
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return (module, qualname) if obj is value else None


def _future_flags(env: dict[str, Any]) -> int:
    # ``from __future__ import annotations`` binds ``annotations`` in the module: shipped
    # sources compile as they did there (annotations stay strings, not global loads).
    feature = __future__.annotations
    return feature.compiler_flag if env.get("annotations") is feature else 0


def _class_lines(cls: type) -> tuple[list[str], int, str]:
    """A class's source lines, first line number and file; also for notebook cells, whose
    classes ``inspect`` cannot place (their module, ``__main__``, has no file)."""
    try:
        lines, first = inspect.getsourcelines(cls)
        return lines, first, inspect.getsourcefile(cls) or inspect.getfile(cls)
    except (OSError, TypeError):
        pass
    files: list[str] = []
    for member in vars(cls).values():
        member = getattr(member, "__func__", getattr(member, "fget", member))
        code = getattr(member, "__code__", None)
        if code is not None:
            files.append(code.co_filename)
    files += [f for f in reversed(list(linecache.cache)) if f not in files]
    for filename in files:
        text = "".join(linecache.getlines(filename))
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        for node in reversed(tree.body):
            if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                assert node.end_lineno is not None
                return text.splitlines(keepends=True)[start - 1 : node.end_lineno], start, filename
    raise OSError("its source is in no file or notebook cell this process has run")


class Shipment:
    """The names a function uses, gathered so that a worker rebuilds them.

    ``aliases`` are skybatch's own names (rebuilt from the runner's shim);
    ``entries`` the rest, in an order a worker can run them: what a definition uses
    comes before it.
    """

    def __init__(self, home_module: str | None) -> None:
        #: Whose functions and classes travel by source: the script or notebook
        #: (``__main__``) and the shipped function's own module.
        self.home = {"__main__", home_module}
        self.aliases: dict[str, str] = {}
        self._entries: list[dict[str, Any]] = []
        # Second names of shipped definitions: bound once every definition has run.
        self._late: list[dict[str, Any]] = []
        self._bound: dict[str, Any] = {}
        self._done: set[int] = set()

    @property
    def entries(self) -> list[dict[str, Any]]:
        return self._entries + self._late

    def add_names(
        self,
        names: Iterable[tuple[str, str]],
        env: dict[str, Any],
        where: str,
        allow_global_store: bool = False,
    ) -> None:
        for op, name in names:
            if op not in ("LOAD_GLOBAL", "LOAD_NAME"):
                if allow_global_store:
                    # A helper's `global cache`: the worker's own copy of the name changes.
                    if name in env and _plain(env[name]):
                        self.add(name, env[name], where)
                    continue
                raise MapperError(
                    f"{where} assigns the module-level name {name!r} (`global {name}`); "
                    "workers cannot change your script's globals: keep state in local variables"
                )
            if name == "__name__":
                continue  # class bodies read it; the runner's namespace defines it
            if name in env:
                self.add(name, env[name], where)
            elif not hasattr(builtins, name):
                raise MapperError(
                    f"{where} uses {name!r}, which is neither a builtin nor defined in its "
                    f"script; define or import {name!r} there or inside the function body"
                )

    def add(self, name: str, value: Any, where: str) -> None:
        if name in self._bound:
            old = self._bound[name]
            if old is not value and not (_plain(old) and _plain(value) and old == value):
                raise MapperError(
                    f"{where} uses {name!r}, which another shipped function binds to something "
                    "else; rename one of them"
                )
            return
        self._bound[name] = value
        alias = _skybatch_alias(value)
        if alias is not None:
            self.aliases[name] = alias
        elif isinstance(value, types.ModuleType):
            self._entries.append({"kind": "import", "name": name, "module": value.__name__})
        elif isinstance(value, (types.FunctionType, type)) and value.__module__ in self.home:
            self.add_source(name, value, where)
        elif _plain(value):
            self._add_value(name, value, where)
        elif (found := _importable(value)) is not None and found[0] not in self.home:
            self._entries.append(
                {"kind": "from", "name": name, "module": found[0], "attr": found[1]}
            )
        else:
            raise MapperError(
                f"{where} uses the module-level name {name!r} ({_describe(value)}), which cannot "
                f"be shipped to workers; create {name!r} inside the function body"
            )

    def _add_value(self, name: str, value: Any, where: str) -> None:
        text = repr(value)
        try:
            same = ast.literal_eval(text) == value
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            same = False
        if not same:  # nan, inf: no literal spells them
            raise MapperError(
                f"{where} uses the module-level constant {name!r} = {text[:40]}, which cannot be "
                f"shipped by value; compute {name!r} inside the function body"
            )
        if len(text) > MAX_CONSTANT_CHARS:
            raise MapperError(
                f"{where} uses the module-level constant {name!r} ({len(text)} characters), too "
                f"large to ship with the job; load it inside the function body from a file"
            )
        self._entries.append({"kind": "value", "name": name, "repr": text})

    def add_source(
        self, name: str, obj: types.FunctionType | type, where: str, top: bool = False
    ) -> None:
        """Ship a function or class of the user's script by its source, and what it uses;
        ``top``: ``obj`` is what the user shipped, whom ``where`` names."""
        kind = "class" if isinstance(obj, type) else "function"
        here = f"{kind} {obj.__qualname__!r}"
        if "<locals>" in obj.__qualname__ or "." in obj.__qualname__:
            raise MapperError(
                f"{where} uses {name!r}, {here} defined inside another function or class, which "
                f"workers cannot rebuild; define {obj.__name__!r} at the top level of its script"
            )
        if obj.__name__ == "<lambda>":
            raise MapperError(
                f"{where} uses {name!r}, a lambda, which workers cannot rebuild from source; "
                f"define it with `def {name}(...)`"
            )
        if id(obj) in self._done:
            self._alias_entry(name, obj)
            return
        self._done.add(id(obj))
        try:
            if isinstance(obj, type):
                lines, first, filename = _class_lines(obj)
                module = sys.modules.get(obj.__module__)
                env = vars(module) if module is not None else {}
                for member in vars(obj).values():
                    member = getattr(member, "__func__", getattr(member, "fget", member))
                    if isinstance(member, types.FunctionType):
                        env = member.__globals__
                        break
            else:
                if obj.__code__.co_freevars:
                    raise MapperError(
                        f"{where} uses {name!r}, a closure over "
                        f"{', '.join(repr(n) for n in obj.__code__.co_freevars)}; workers cannot "
                        "rebuild it: define it at the top level of its script"
                    )
                lines, first = inspect.getsourcelines(obj)
                filename = obj.__code__.co_filename
                env = obj.__globals__
        except (OSError, TypeError) as e:
            raise MapperError(
                f"{where} uses {here}, whose source cannot be read ({e}); define it in a .py "
                "file or a notebook cell"
            ) from None
        text = textwrap.dedent("".join(lines))
        flags = _future_flags(env)
        at = where if top else f"{here} ({filename}:{first})"
        code = compile(text, filename, "exec", flags=flags, dont_inherit=True)
        # What it uses comes first: a class body or decorator runs as it is defined.
        self.add_names(global_names(code), env, at, allow_global_store=True)
        self._entries.append(
            {
                "kind": "source",
                "name": name,
                "defines": obj.__name__,
                "source": "\n" * (first - 1) + text,  # tracebacks show the user's line numbers
                "filename": filename,
                "flags": flags,
            }
        )

    def _alias_entry(self, name: str, obj: Any) -> None:
        if name != obj.__name__:
            self._late.append({"kind": "alias", "name": name, "defines": obj.__name__})


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
        self._where = where
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
                "input with `for batch in skybatch.load():` (for a function of one item, "
                "use skybatch.map(fn, items, ...))"
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

    def shipment(self) -> Shipment:
        """What the mapper uses, gathered now rather than at decoration: a helper defined
        below the mapper, a constant set under ``if __name__ == "__main__":`` and a notebook
        cell run again all ship as they are when the job is submitted."""
        shipment = Shipment(self.fn.__module__)
        shipment._bound[self.name] = self.fn  # the mapper itself: its own source
        shipment._done.add(id(self.fn))
        shipment.add_names(global_names(self.fn.__code__), self.fn.__globals__, self._where)
        return shipment

    @property
    def aliases(self) -> dict[str, str]:
        return self.shipment().aliases

    @property
    def globals(self) -> list[dict[str, Any]]:
        return self.shipment().entries

    def to_spec(self) -> dict[str, Any]:
        shipment = self.shipment()
        return {
            "name": self.name,
            "source": self.source,
            "filename": self.filename,
            "aliases": shipment.aliases,
            "globals": shipment.entries,
            "flags": _future_flags(self.fn.__globals__),
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
    ``skybatch.save_results()`` once per batch. What it uses from its script or
    notebook travels with it, as it is when the job is submitted (see this module's
    docstring); what cannot is refused then, a closure here.
    """
    return RemoteFunction(fn)


def is_remote_function(fn: Any) -> bool:
    """Whether ``fn`` was decorated with ``@remote_function`` (Sky Batch's helper of that name)."""
    return getattr(fn, "_is_remote_function", False) is True
