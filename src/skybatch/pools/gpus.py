"""GPUs: what a machine has, which a pool's workers may take, and who holds which.

The parsing and picking are pure (``nvidia-smi`` text in, a choice out), so a
provider for remote hosts runs the same query over its own connection and
decides the same way; :func:`local_gpus` is the thin wrapper for this machine.
One :class:`GpuLedger` per server knows which GPUs every live worker holds, per
host, whatever its pool or provider.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from skybatch.errors import PoolError, PoolSpecError

__all__ = [
    "NVIDIA_SMI_QUERY",
    "Gpu",
    "GpuLedger",
    "Held",
    "check_fits",
    "cuda_env",
    "describe",
    "local_gpus",
    "matches",
    "parse_nvidia_smi",
    "pick",
]

#: The query, as an argument list; ``nounits`` makes memory a bare MiB count.
NVIDIA_SMI_QUERY = (
    "nvidia-smi",
    "--query-gpu=index,name,memory.total,uuid",
    "--format=csv,noheader,nounits",
)

#: GPU index → the pool of the worker holding it, per host.
Held = Mapping[str, Mapping[int, str]]

_TOKEN = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    #: MiB, or None where nvidia-smi says [N/A].
    memory_mib: int | None
    uuid: str


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """The GPUs in ``nvidia-smi --query-gpu=index,name,memory.total,uuid --format=csv,noheader``
    output (with or without ``nounits``); ValueError names a line that is not such a row."""
    gpus = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 4 or not fields[0].isdigit():
            raise ValueError(f"unexpected nvidia-smi output line {line.strip()!r}")
        # A name with a comma in it stays whole: index first, memory and uuid last.
        index, name, memory, uuid = fields[0], ", ".join(fields[1:-2]), fields[-2], fields[-1]
        amount = memory.removesuffix("MiB").strip()
        gpus.append(Gpu(int(index), name, int(amount) if amount.isdigit() else None, uuid))
    return sorted(gpus, key=lambda g: g.index)


def matches(name: str, wanted: str) -> bool:
    """Whether the GPU called ``name`` is of the type ``wanted``, case-insensitively.

    Each word of ``wanted`` must be one or more adjacent words of the name: ``L4``
    is "NVIDIA L4" but not "NVIDIA L40S"; ``A100-80GB`` is "NVIDIA A100-SXM4-80GB";
    ``RTX4090`` is "NVIDIA GeForce RTX 4090".
    """
    words = _TOKEN.findall(name.lower())
    wanted_words = _TOKEN.findall(wanted.lower())
    return bool(wanted_words) and all(_is_run(words, w) for w in wanted_words)


def _is_run(words: list[str], wanted: str) -> bool:
    """Whether adjacent ``words`` make ``wanted``: a run stops growing as soon as it is no
    prefix of it, so a long name (a host's nvidia-smi says what it likes) costs little."""
    for i in range(len(words)):
        run = ""
        for word in words[i:]:
            run += word
            if run == wanted:
                return True
            if not wanted.startswith(run):
                break
    return False


def _size(gpu: Gpu) -> str:
    return f"{round(gpu.memory_mib / 1024)} GiB" if gpu.memory_mib is not None else "? GiB"


def describe(gpus: Sequence[Gpu], held: Mapping[int, str]) -> str:
    """Each GPU in one line: ``0: NVIDIA L4 (22 GiB, free), 1: NVIDIA L4 (22 GiB, pool a)``."""
    if not gpus:
        return "no GPU"
    return ", ".join(
        f"{g.index}: {g.name} ({_size(g)}, "
        f"{'free' if g.index not in held else 'pool ' + held[g.index]})"
        for g in gpus
    )


def _split(accelerators: str) -> tuple[str, int]:
    kind, _, count = accelerators.partition(":")
    return kind, int(count or 1)


def _free(gpus: Sequence[Gpu], held: Mapping[int, str], kind: str) -> list[Gpu]:
    return [g for g in gpus if matches(g.name, kind) and g.index not in held]


def check_fits(
    gpus: Sequence[Gpu], held: Mapping[int, str], accelerators: str, workers: int, where: str
) -> None:
    """Raise PoolSpecError, one line listing what ``where`` has, unless ``workers`` workers
    of ``accelerators`` (``L4:2``) fit in the GPUs no other pool holds."""
    kind, count = _split(accelerators)
    if not gpus:
        raise PoolSpecError(
            f"pool asks for {kind} GPUs but {where} has no GPU that nvidia-smi lists; "
            "drop resources.accelerators or run the pool where the GPUs are"
        )
    if not any(matches(g.name, kind) for g in gpus):
        raise PoolSpecError(
            f"pool asks for {kind} GPUs but {where} has none: {describe(gpus, held)}; "
            "set resources.accelerators to a type it has"
        )
    free = _free(gpus, held, kind)
    if len(free) < workers * count:
        raise PoolSpecError(
            f"pool asks for {workers} worker{'s' if workers != 1 else ''} × {kind}:{count} "
            f"but {where} has {len(free)} {kind} GPU{'s' if len(free) != 1 else ''} free: "
            f"{describe(gpus, held)}; lower pool.workers or the count in resources.accelerators"
        )


def pick(gpus: Sequence[Gpu], held: Mapping[int, str], accelerators: str, where: str) -> list[int]:
    """The indices of one worker's GPUs: the lowest free ones of the type, so that a
    replaced worker gets back what its predecessor held. PoolError lists what is there."""
    kind, count = _split(accelerators)
    free = _free(gpus, held, kind)
    if len(free) < count:
        raise PoolError(
            f"a worker needs {kind}:{count} but {where} has {len(free)} {kind} "
            f"GPU{'s' if len(free) != 1 else ''} free: {describe(gpus, held)}"
        )
    return [g.index for g in free[:count]]


def cuda_env(indices: Sequence[int]) -> dict[str, str]:
    """A worker's GPU environment. nvidia-smi numbers GPUs by PCI bus, CUDA by default
    fastest first: the order is set so that the indices mean the same GPUs to both."""
    return {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in indices),
    }


def local_gpus(where: str = "this machine") -> list[Gpu]:
    """This machine's GPUs ([] without nvidia-smi). A ``CUDA_VISIBLE_DEVICES`` that the
    server was started with bounds them: the user kept the others out of skybatch's hands.
    PoolError when nvidia-smi is there but fails (no driver, say)."""
    try:
        done = subprocess.run(
            NVIDIA_SMI_QUERY, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError:
        return []
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PoolError(f"nvidia-smi could not run on {where}: {e}") from None
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        raise PoolError(
            f"nvidia-smi failed on {where} (exit code {done.returncode}): "
            f"{why[0] if why else 'no output'}"
        )
    try:
        gpus = parse_nvidia_smi(done.stdout)
    except ValueError as e:
        raise PoolError(f"nvidia-smi on {where}: {e}") from None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return gpus
    allowed = {v.strip() for v in visible.split(",") if v.strip()}
    return [g for g in gpus if str(g.index) in allowed or g.uuid in allowed]


class GpuLedger:
    """Which GPUs each live worker holds, per host: one per server, for every provider.

    A provider claims a worker's GPUs in its launch (under this ledger's lock, so
    workers launched at once never share one); the server brings the ledger in
    line with the store before each launch and check (:meth:`sync`): the claims of
    workers no longer live go, and those of workers launched by an earlier server
    come back from their handles.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: worker id → (pool, host, GPU indices)
        self._claims: dict[int, tuple[str, str, tuple[int, ...]]] = {}

    def sync(self, live: Iterable[tuple[int, str, Mapping[str, Any]]]) -> None:
        """``live``: every live worker's (id, pool, handle); an empty handle is a launch
        under way, whose claim stays."""
        with self._lock:
            claims = {}
            for worker_id, pool, handle in live:
                if handle.get("host") is not None and handle.get("gpus"):
                    claims[worker_id] = (pool, str(handle["host"]), tuple(handle["gpus"]))
                elif worker_id in self._claims:
                    claims[worker_id] = self._claims[worker_id]
            self._claims = claims

    def held(self, exclude_pool: str | None = None) -> dict[str, dict[int, str]]:
        """host → GPU index → the pool holding it (leaving out ``exclude_pool``'s workers)."""
        with self._lock:
            out: dict[str, dict[int, str]] = {}
            for pool, host, indices in self._claims.values():
                if pool != exclude_pool:
                    out.setdefault(host, {}).update(dict.fromkeys(indices, pool))
            return out

    def claim(
        self,
        worker_id: int,
        pool: str,
        host: str,
        gpus: Sequence[Gpu],
        accelerators: str,
        where: str,
    ) -> list[int]:
        """Pick and hold one worker's GPUs on ``host`` (see :func:`pick`)."""
        with self._lock:
            self._claims.pop(worker_id, None)
            held: dict[int, str] = {}
            for other, other_host, indices in self._claims.values():
                if other_host == host:
                    held.update(dict.fromkeys(indices, other))
            chosen = pick(gpus, held, accelerators, where)
            self._claims[worker_id] = (pool, host, tuple(chosen))
            return chosen
