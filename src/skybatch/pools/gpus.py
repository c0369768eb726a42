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
from dataclasses import dataclass, field
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


def _key(host: str, index: int, uuid: str) -> str:
    """What names one physical GPU in the ledger: its UUID, which no other name of its
    machine changes; host and index only where no UUID is known (a handle from before)."""
    if uuid and uuid != "[N/A]":
        return uuid
    return f"{host}\0{index}"


@dataclass(frozen=True)
class Held:
    """The GPUs that other workers hold, whatever their host was called: GPU key (see
    :func:`_key`) → pool."""

    pools: Mapping[str, str] = field(default_factory=dict)

    def on(self, host: str, gpus: Sequence[Gpu]) -> dict[int, str]:
        """Index → pool for those of ``host``'s ``gpus`` that are held (what
        :func:`check_fits`, :func:`pick` and :func:`describe` take)."""
        out = {}
        for g in gpus:
            pool = self.pools.get(_key(host, g.index, g.uuid)) or self.pools.get(
                _key(host, g.index, "")
            )
            if pool is not None:
                out[g.index] = pool
        return out


@dataclass(frozen=True)
class _Claim:
    pool: str
    host: str
    keys: tuple[str, ...]


class GpuLedger:
    """Which GPUs each live worker holds: one per server, for every provider.

    A GPU is held by its UUID, so one machine named two ways (``host``,
    ``root@host``) never hands a GPU out twice. A provider claims a worker's GPUs in
    its launch (under this ledger's lock, so workers launched at once never share
    one); the server brings the ledger in line with the store before each launch and
    check (:meth:`sync`): the claims of workers no longer live go, and those of
    workers launched by an earlier server come back from their handles (``gpus`` and
    ``gpu_uuids``; host and index for a handle without UUIDs).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: worker id → what it holds
        self._claims: dict[int, _Claim] = {}

    def sync(self, live: Iterable[tuple[int, str, Mapping[str, Any]]]) -> None:
        """``live``: every live worker's (id, pool, handle); an empty handle is a launch
        under way, whose claim stays."""
        with self._lock:
            claims = {}
            for worker_id, pool, handle in live:
                if handle.get("host") is not None and handle.get("gpus"):
                    host = str(handle["host"])
                    indices = [int(i) for i in handle["gpus"]]
                    uuids = [str(u) for u in handle.get("gpu_uuids") or []]
                    if len(uuids) != len(indices):
                        uuids = [""] * len(indices)
                    keys = tuple(_key(host, i, u) for i, u in zip(indices, uuids, strict=True))
                    claims[worker_id] = _Claim(pool, host, keys)
                elif worker_id in self._claims:
                    claims[worker_id] = self._claims[worker_id]
            self._claims = claims

    def held(self, exclude_pool: str | None = None) -> Held:
        """The GPUs held, leaving out ``exclude_pool``'s workers."""
        with self._lock:
            return Held(self._pools(exclude_pool))

    def _pools(self, exclude_pool: str | None = None) -> dict[str, str]:
        return {
            key: c.pool for c in self._claims.values() if c.pool != exclude_pool for key in c.keys
        }

    def claim(
        self,
        worker_id: int,
        pool: str,
        host: str,
        gpus: Sequence[Gpu],
        accelerators: str,
        where: str,
    ) -> list[Gpu]:
        """Pick and hold one worker's GPUs among ``host``'s ``gpus`` (see :func:`pick`)."""
        with self._lock:
            self._claims.pop(worker_id, None)
            held = Held(self._pools()).on(host, gpus)
            chosen = set(pick(gpus, held, accelerators, where))
            placed = [g for g in gpus if g.index in chosen]
            self._claims[worker_id] = _Claim(
                pool, host, tuple(_key(host, g.index, g.uuid) for g in placed)
            )
            return placed
