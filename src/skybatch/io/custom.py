"""User-defined readers and writers: how their classes travel to the server and workers.

A reader or writer class from the user's own script (``__main__``) cannot be
imported by the server or an agent, so its spec carries the class's source,
the import statements of its module and the plain constants it uses, like a
mapper. A class from an importable module (an installed package, or the pool's ``workdir`` on the
workers) is imported by name first; the source is the fallback. The
instance's state is its ``__dict__``, which must be JSON values.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import importlib
import inspect
import sys
import textwrap
import threading
import types
from typing import Any

import orjson

from skybatch.codecheck import global_names, plain_constant
from skybatch.errors import ConfigError

__all__ = ["KIND", "custom_spec", "from_custom_spec"]

#: The ``kind`` of every user-defined reader and writer spec.
KIND = "custom"

#: A constant's ``repr`` past this would bloat every job spec (a mapper's limit too).
MAX_CONSTANT_CHARS = 1 << 20
_MISSING = object()

_loaded: dict[str, type] = {}
_lock = threading.Lock()


def _imported_names(imports: str) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(imports).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names.add((alias.asname or alias.name).split(".")[0])
    return names


def _constants(cls: type, source: str, imports: str, what: str, strict: bool) -> dict[str, str]:
    """The plain constants of the class's module that its body and methods use, by
    ``repr``, rebuilt where it is loaded (as for a mapper). ``strict`` (a class of the
    user's script): refuse, now, a method that uses any other module-level name, which
    the server and workers will not have."""
    allowed = _imported_names(imports) | {cls.__name__, "skybatch", "__name__", "__class__"}
    module = sys.modules.get(cls.__module__)
    env = vars(module) if module is not None else {}
    found: dict[str, str] = {}

    def ship(name: str) -> bool:
        value = env.get(name, _MISSING)
        if name.startswith("__") or value is _MISSING or not plain_constant(value):
            return False
        text = repr(value)
        try:
            same = ast.literal_eval(text) == value
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            same = False  # nan, inf: no literal spells them
        if not same or len(text) > MAX_CONSTANT_CHARS:
            return False
        found[name] = text
        return True

    try:
        code = compile(source, "<class>", "exec")
    except SyntaxError:
        code = None
    # The class body too (a dataclass field's default), which runs where it is loaded.
    for op, name in global_names(code) if code is not None else ():
        if op in ("LOAD_GLOBAL", "LOAD_NAME") and name not in allowed:
            ship(name)
    if not strict:
        return found
    source_file = inspect.getsourcefile(cls)
    for attr, value in vars(cls).items():
        fn = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
        # The user's own method under skybatch's wrapper (Sky Batch's writer protocol).
        fn = getattr(fn, "_skybatch_user", fn)
        if isinstance(fn, property):
            fn = fn.fget
        fcode = getattr(fn, "__code__", None)
        # Only methods written in the user's file: @dataclass generates others.
        if not isinstance(fcode, types.CodeType) or fcode.co_filename != source_file:
            continue
        for op, name in global_names(fcode):
            if name in allowed or (op == "LOAD_GLOBAL" and hasattr(builtins, name)):
                continue
            if op == "LOAD_NAME" and hasattr(builtins, name):
                continue
            if op == "LOAD_GLOBAL" and name in found:
                continue
            raise ConfigError(
                f"{what} {cls.__qualname__}.{attr} uses the module-level name {name!r}, which "
                "is not sent to the server and workers (only imports and plain constants "
                "are); import it at the top of the module, or define it inside the method"
            )
    return found


def _module_imports(cls: type) -> str:
    """The top-level import statements of the file that defines ``cls``."""
    try:
        path = inspect.getsourcefile(cls)
        if path is None:
            return ""
        with open(path, encoding="utf-8") as f:
            source = f.read()
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return ""
    lines = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            segment = ast.get_source_segment(source, node)
            if segment:
                lines.append(segment)
    return "\n".join(lines)


def _class_ref(cls: type, what: str) -> dict[str, Any]:
    shipped = cls.__dict__.get("_skybatch_ref")
    if shipped is not None:
        return dict(shipped)  # loaded from a spec here: send it on as it came
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        if cls.__module__ == "__main__":
            raise ConfigError(
                f"{what} {cls.__qualname__}: its source cannot be found (defined in an "
                "interactive session?); define it in a .py file or an importable module"
            ) from None
        source = None
    imports = _module_imports(cls) if source else ""
    constants = (
        _constants(cls, source, imports, what, strict=cls.__module__ == "__main__")
        if source
        else {}
    )
    return {
        "module": cls.__module__,
        "qualname": cls.__qualname__,
        "source": source,
        "imports": imports,
        "constants": constants,
        "file": inspect.getsourcefile(cls) if source else None,
    }


def custom_spec(obj: Any, what: str) -> dict[str, Any]:
    """The spec of a user-defined reader or writer: its class and its state."""
    cls = type(obj)
    state = dict(vars(obj))
    try:
        state = orjson.loads(orjson.dumps(state))
    except TypeError as e:
        raise ConfigError(
            f"{what} {cls.__qualname__}: its attributes must be JSON values (str, int, float, "
            f"bool, None, lists and dicts) to travel to the workers ({e})"
        ) from None
    return {"kind": KIND, "class": _class_ref(cls, what), "state": state}


def _import(ref: dict[str, Any]) -> type | None:
    if ref["module"] == "__main__" or "<locals>" in ref["qualname"]:
        return None
    try:
        obj: Any = importlib.import_module(ref["module"])
        for part in ref["qualname"].split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) else None


def _exec(ref: dict[str, Any], base: type, key: str) -> type:
    # A real module: @dataclass and pickle look the class's module up in sys.modules.
    module = types.ModuleType(f"_skybatch_custom_{key[:16]}")
    sys.modules[module.__name__] = module
    namespace = module.__dict__
    # The public package, for sources that name it without importing it. Looked up, not
    # imported: io sits below it, and it is always loaded before any of its modules.
    namespace["skybatch"] = sys.modules["skybatch"]
    for statement in (ref.get("imports") or "").splitlines():
        # The module's imports, each on its own: one the server lacks (torch, say)
        # only matters if the class uses it here.
        try:
            exec(statement, namespace)
        except Exception:
            continue
    for const, text in (ref.get("constants") or {}).items():
        namespace[const] = ast.literal_eval(text)  # plain values only (_constants)
    name = ref["qualname"].rsplit(".", 1)[-1]
    filename = ref.get("file") or f"<{name}>"
    try:
        exec(compile(ref["source"], filename, "exec"), namespace)
    except Exception as e:
        raise ConfigError(
            f"cannot load {name} from {filename}: {type(e).__name__}: {e}; readers and writers "
            "may use their module's imports, its plain constants and their own attributes, "
            "not other module-level names"
        ) from None
    cls = namespace.get(name)
    if not isinstance(cls, type) or not issubclass(cls, base):
        raise ConfigError(f"{filename}: {name} is not a subclass of skybatch.{base.__name__}")
    return cls


def load_class(ref: dict[str, Any], base: type) -> type:
    key = hashlib.sha256(orjson.dumps(ref, option=orjson.OPT_SORT_KEYS)).hexdigest()
    with _lock:
        cls = _loaded.get(key)
        if cls is None:
            imported = _import(ref)
            if imported is not None and issubclass(imported, base):
                cls = imported
            elif ref.get("source"):
                cls = _exec(ref, base, key)
            else:
                raise ConfigError(
                    f"cannot import {ref['module']}.{ref['qualname']} here, and its source was "
                    "not sent; install its module where the server and workers run"
                )
            cls._skybatch_ref = ref  # type: ignore[attr-defined]
            _loaded[key] = cls
    return cls


def from_custom_spec(spec: dict[str, Any], base: type) -> Any:
    cls: Any = load_class(spec["class"], base)
    obj = cls.__new__(cls)
    obj.__dict__.update(spec.get("state") or {})
    return obj
