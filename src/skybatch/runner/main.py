"""The runner: runs the user's mapper in the user's environment.

Standard library only. The agent starts this file as a script under the job's
``activate_env`` (a venv with vLLM, say) where skybatch itself may not be
installed. It talks to the agent over two inherited pipes with framed messages;
its own stdout and stderr are the job's log. A crash, hang or ``sys.exit`` in
user code ends this process, never the agent.

Frame: 8 bytes (header length, payload length, big-endian), a JSON header, a payload.

agent -> runner: ``init`` (mapper source and output formats), ``batch`` (payload:
the batch's raw input), ``end`` (the job is over; the next batches are another job's
with the same init: the mapper is called again for them), end of file to stop.
runner -> agent: ``ready``, ``ended`` (after an ``end``: the mapper has returned),
``result`` (payload: one part per writer, concatenated, sizes in the header), ``error``
(message and traceback).
"""

from __future__ import annotations

import builtins
import json
import linecache
import os
import struct
import sys
import threading
import time
import traceback
import types
from typing import Any, BinaryIO

_HEAD = struct.Struct(">II")


def _load_codec() -> types.ModuleType:
    """codec.py, beside this file, loaded by path: putting skybatch/runner/ on
    sys.path would let its modules shadow the user's (``main``, ``codec``)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "codec.py")
    spec = importlib.util.spec_from_file_location("_skybatch_codec", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_codec = _load_codec()


def write_frame(stream: BinaryIO, header: dict[str, Any], payload: bytes = b"") -> None:
    head = json.dumps(header).encode()
    stream.write(_HEAD.pack(len(head), len(payload)) + head)
    if payload:
        stream.write(payload)
    stream.flush()


def _read_exact(stream: BinaryIO, n: int) -> bytes | None:
    data = stream.read(n)
    if data is None or len(data) < n:
        return None
    return data


def read_frame(stream: BinaryIO) -> tuple[dict[str, Any], bytes] | None:
    """The next frame, or None at end of stream."""
    raw = _read_exact(stream, _HEAD.size)
    if raw is None:
        return None
    head_len, payload_len = _HEAD.unpack(raw)
    head = _read_exact(stream, head_len)
    if head is None:
        return None
    payload = _read_exact(stream, payload_len) if payload_len else b""
    if payload is None:
        return None
    header: dict[str, Any] = json.loads(head)
    return header, payload


class MapperContractError(Exception):
    """The mapper broke the load()/save_results() contract."""


class InputLineError(Exception):
    """A line of the batch's input is not a JSON object: the input's fault, not the
    mapper's (the agent names the file and line; the job fails, with no retries)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


class _Batch:
    __slots__ = ("index", "row_start", "rows", "saved")

    def __init__(self, index: int, row_start: int, rows: list[dict[str, Any]]) -> None:
        self.index = index
        self.row_start = row_start
        self.rows = rows
        self.saved = False

    def label(self) -> str:
        last = self.row_start + len(self.rows) - 1
        return f"batch {self.index} (rows {self.row_start}-{last})"


class Session:
    """State shared by load() and save_results() within one runner."""

    def __init__(
        self,
        rfile: BinaryIO,
        wfile: BinaryIO,
        writers: list[dict[str, Any]],
        payload_format: str = _codec.JSONL,
    ) -> None:
        self.decode = _codec.DECODERS[payload_format]
        self.rfile = rfile
        self.wfile = wfile
        self.writers = writers
        self.current: _Batch | None = None
        self.pending: tuple[dict[str, Any], bytes] | None = None
        self.eof = False
        self.ended = False  # an ``end`` frame ended the mapper's loop
        self.loaded_any = False

    def next_message(self) -> tuple[dict[str, Any], bytes] | None:
        if self.pending is not None:
            msg, self.pending = self.pending, None
            return msg
        return read_frame(self.rfile)

    # -- the mapper's API ------------------------------------------------------------

    def load(self) -> Any:
        while True:
            cur = self.current
            if cur is not None and not cur.saved:
                raise MapperContractError(
                    f"{cur.label()}: load() was asked for the next batch before "
                    "save_results() was called for this one; call skybatch.save_results(results) "
                    "once per batch"
                )
            msg = self.next_message()
            if msg is None:
                self.eof = True
                return
            header, payload = msg
            if header["type"] == "end":
                # The job is over here and the next one has this same mapper: the
                # mapper's loop ends, and the next job's batches go to a fresh mapper.
                self.ended = True
                return
            try:
                rows = self.decode(payload)
            except _codec.BadLine as e:
                self.current = _Batch(header["index"], header["row_start"], [])
                raise InputLineError(e.line, str(e)) from None
            self.current = _Batch(header["index"], header["row_start"], rows)
            self.loaded_any = True
            yield rows

    def save_results(self, results: Any) -> None:
        cur = self.current
        if cur is None:
            raise MapperContractError(
                "save_results() was called before load() gave a batch; "
                "call it inside `for batch in skybatch.load():`"
            )
        if cur.saved:
            raise MapperContractError(
                f"{cur.label()}: save_results() was called twice; call it once per batch "
                "with one result per input row"
            )
        if not isinstance(results, (list, tuple)):
            raise MapperContractError(
                f"{cur.label()}: save_results() needs a list of dicts, got {type(results).__name__}"
            )
        if len(results) != len(cur.rows):
            raise MapperContractError(
                f"{cur.label()}: save_results() got {len(results)} results for "
                f"{len(cur.rows)} input rows; return exactly one dict per input row, in order"
            )
        for i, row in enumerate(results):
            if not isinstance(row, dict):
                raise MapperContractError(
                    f"{cur.label()}: result {i} is a {type(row).__name__}; "
                    "each result must be a dict of column to value"
                )
        try:
            names = {
                w["column"]: _codec.image_names(results, w, cur.row_start)
                for w in self.writers
                if w["format"] == _codec.IMAGE
            }
            parts = [_codec.encode_part(results, w, names) for w in self.writers]
        except _codec.ResultError as e:
            raise MapperContractError(
                f"{cur.label()}: result {e.row} (input row {cur.row_start + e.row}) {e}"
            ) from None
        cur.saved = True
        write_frame(
            self.wfile,
            {"type": "result", "index": cur.index, "sizes": [len(p) for p in parts]},
            b"".join(parts),
        )


def _user_traceback(exc: BaseException, mapper_file: str) -> str:
    """The traceback from the mapper's frame on: the runner's own frames say nothing."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != mapper_file:
        tb = tb.tb_next
    if isinstance(exc, MapperContractError):
        return f"skybatch: {exc}\n"
    return "".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__))


def _watch_parent() -> None:
    """Exit when the agent dies, even in the middle of a long batch."""
    parent = os.getppid()
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(70)


def _cache_source(filename: str, source: str) -> None:
    """Tracebacks show the user's lines even where the user's file does not exist.

    A mapper and its helpers from one script are shipped separately, each padded to
    its own lines: overlaid, they give the file's lines back."""
    lines = source.splitlines(keepends=True)
    entry: tuple[Any, ...] | None = linecache.cache.get(filename)
    if entry is not None and len(entry) == 4 and entry[1] is None:
        old = list(entry[2])
        old += ["\n"] * (len(lines) - len(old))
        new = lines + old[len(lines) :]
        lines = [mine if mine.strip() else prior for mine, prior in zip(new, old, strict=True)]
    linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)


class ShippedNameError(ImportError):
    """A name the mapper uses could not be rebuilt on this worker."""


def _rebuild_globals(entries: list[dict[str, Any]], namespace: dict[str, Any]) -> None:
    """The names the mapper uses from its script (client/remote.py's Shipment), in order."""
    import ast
    import importlib

    for e in entries:
        kind, name = e["kind"], e["name"]
        if kind in ("import", "from"):
            try:
                obj: Any = importlib.import_module(e["module"])
                for part in e.get("attr", "").split(".") if kind == "from" else ():
                    obj = getattr(obj, part)
            except (ImportError, AttributeError) as exc:
                what = e["module"] + ("." + e["attr"] if kind == "from" else "")
                raise ShippedNameError(
                    f"the mapper uses {name!r} ({what}), which this worker's Python cannot "
                    f"import ({exc}); install it in the pool's setup or activate_env"
                ) from None
            namespace[name] = obj
        elif kind == "value":
            namespace[name] = ast.literal_eval(e["repr"])
        elif kind == "source":
            _cache_source(e["filename"], e["source"])
            code = compile(e["source"], e["filename"], "exec", flags=e["flags"], dont_inherit=True)
            exec(code, namespace)
            namespace[name] = namespace[e["defines"]]
        elif kind == "alias":
            namespace[name] = namespace[e["defines"]]


def mapper_namespace() -> dict[str, Any]:
    """The globals of the mapper and its helpers: a module's, in ``sys.modules``, since
    code such as ``dataclasses`` looks up the module of the classes it is given."""
    module = types.ModuleType("__skybatch_mapper__")
    module.__builtins__ = builtins  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    return module.__dict__


def _compile_mapper(init: dict[str, Any], session: Session) -> tuple[Any, str]:
    filename = init["filename"]
    source = init["source"]
    shim = types.ModuleType("skybatch")
    shim.load = session.load  # type: ignore[attr-defined]
    shim.save_results = session.save_results  # type: ignore[attr-defined]
    shim.worker_index = int(os.environ.get("SKYBATCH_WORKER_INDEX", "0"))  # type: ignore[attr-defined]
    sys.modules["skybatch"] = shim
    namespace = mapper_namespace()
    for name, target in init.get("aliases", {}).items():
        namespace[name] = shim if target == "module" else getattr(shim, target)
    _rebuild_globals(init.get("globals", []), namespace)
    _cache_source(filename, source)
    code = compile(source, filename, "exec", flags=init.get("flags", 0), dont_inherit=True)
    exec(code, namespace)
    return namespace[init["name"]], filename


def main() -> int:
    rfd, wfd = (int(x) for x in os.environ["SKYBATCH_RUNNER_FDS"].split(","))
    rfile = os.fdopen(rfd, "rb")
    wfile = os.fdopen(wfd, "wb")
    # The runner lives in skybatch/runner/; the user's modules live in the worker dir.
    sys.path[0] = os.getcwd()
    threading.Thread(target=_watch_parent, daemon=True).start()
    first = read_frame(rfile)
    if first is None:
        return 0
    init = first[0]
    session = Session(rfile, wfile, init["writers"], init.get("payload_format", _codec.JSONL))
    try:
        fn, filename = _compile_mapper(init, session)
    except BaseException as e:
        write_frame(
            wfile, {"type": "init_error", "error": repr(e), "traceback": traceback.format_exc()}
        )
        return 1
    write_frame(wfile, {"type": "ready", "python": sys.version.split()[0], "pid": os.getpid()})

    def job_over(error: BaseException | None) -> None:
        """An ``end`` frame came: what the mapper did after its loop belongs to the job
        that ended (its log); the next job gets the mapper afresh, in a new namespace
        (the script's globals as shipped), and only the process and its imports stay."""
        nonlocal fn, filename
        if error is not None:
            traceback.print_exception(type(error), error, error.__traceback__)
        sys.stdout.flush()
        sys.stderr.flush()
        session.current = None
        fn, filename = _compile_mapper(init, session)
        write_frame(wfile, {"type": "ended"})
        # The new job's mapper starts (its setup prints) only once its first batch came,
        # which the agent sends after it points this runner's output at the new job.
        session.pending = read_frame(rfile)
        session.eof = session.pending is None

    while not session.eof:
        session.current = None
        session.loaded_any = False
        session.ended = False
        error: BaseException | None = None
        try:
            fn()
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            error = e
        sys.stdout.flush()
        sys.stderr.flush()
        if session.ended:
            job_over(error)
            continue
        cur = session.current
        if error is None and cur is not None and not cur.saved:
            error = MapperContractError(
                f"{cur.label()}: the mapper returned without calling save_results() for it"
            )
        if error is None and not session.eof and not session.loaded_any:
            # A mapper that never calls load() would otherwise spin forever.
            msg = session.next_message()
            if msg is None:
                break
            if msg[0]["type"] == "end":
                job_over(None)
                continue
            session.current = _Batch(msg[0]["index"], msg[0]["row_start"], [])
            error = MapperContractError(
                "the mapper returned without calling skybatch.load(); "
                "iterate `for batch in skybatch.load():` inside it"
            )
        if error is not None:
            cur = session.current
            if cur is None or cur.saved:
                # Failed before taking a batch (e.g. loading the model): charge the next one.
                msg = session.next_message()
                if msg is None:
                    traceback.print_exception(type(error), error, error.__traceback__)
                    return 1
                if msg[0]["type"] == "end":
                    job_over(error)  # no batch of that job left here to charge
                    continue
                cur = _Batch(msg[0]["index"], msg[0]["row_start"], [])
            if isinstance(error, InputLineError):
                write_frame(
                    wfile,
                    {"type": "error", "index": cur.index, "error": str(error), "line": error.line},
                )
                session.current = None
                continue
            tb = _user_traceback(error, filename)
            sys.stderr.write(tb)
            sys.stderr.flush()
            write_frame(
                wfile,
                {
                    "type": "error",
                    "index": cur.index,
                    "error": f"{type(error).__name__}: {error}",
                    "traceback": tb,
                },
            )
            session.current = None
    return 0


if __name__ == "__main__":
    sys.exit(main())
