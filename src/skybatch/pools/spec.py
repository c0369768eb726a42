"""The pool YAML: what each worker needs, validated with pydantic.

::

    pool:
      workers: 2            # how many workers (a fixed size), or instead:
      # min_workers: 0      # autoscaling: never fewer (default 0)
      # max_workers: 4      # never more; one worker per waiting batch up to this
      # idle_timeout: 60    # seconds a worker idles (holds no lease) before it stops
    resources:
      cpus: 1+              # per worker: "2" exactly, "2+" at least
      memory: 8+            # GB per worker, same forms
      accelerators: L4:1    # GPU type and count per worker
    setup: pip install vllm # runs once per worker, cached by its text
    envs: {HF_HOME: /data}  # environment of setup and mapper
    workdir: ./src          # copied to each worker; the mapper can import from it
    provider: local         # where workers run (local is the default), or a mapping
                            # {type: NAME, ...} with the provider's own fields
    name: my-pool           # the pool's name when `pool apply` is given no --pool
    file_mounts:            # {target: local source} copied to each worker after workdir
      data/vocab.txt: ./vocab.txt

Errors name the file, the line, the field and what is allowed.

A SkyPilot task's fields are accepted so that a Sky Batch pool YAML ports as it is
(``_skypilot``): ``num_nodes`` is ``pool.workers``; ``run`` and the fields that pick or
provision machines (``resources.cloud``, ``infra``, ``use_spot``, ...) are dropped with a
one-line warning each, in :attr:`PoolSpec.warnings`, since skybatch runs on machines that
exist. A ``file_mounts`` target is a path on the worker: relative to the worker's
directory (where the mapper runs); on the local provider ``~/`` means that directory
too, and an absolute target is refused (it would write outside the pool on this
machine); on SSH hosts ``~/`` is the host user's home and an absolute path is used as
given. A bucket source or SkyPilot's storage form is dropped with a warning.

Autoscaling (``min_workers``/``max_workers``, exclusive with ``workers``): the server
grows the pool while batches wait, to one worker per waiting or running batch (at
least one while a job is still being indexed), up to ``max_workers``; a ready worker
that has held no lease for ``idle_timeout`` seconds is stopped while the pool is above
what its queue needs, down to ``min_workers``. A worker holding a lease is never
stopped for idleness: it is marked stopped in the transaction that finds it holds
none, so no lease reaches it afterwards. The pool is READY once ``min_workers`` of
its workers are (at once for a pool of min 0), DEGRADED when it falls below that
after being ready; a job on a pool of 0 makes it grow. ``workers: N`` is the same as
``min_workers: N, max_workers: N``, without ``idle_timeout``.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    field_validator,
    model_validator,
)

from skybatch.errors import ConfigError, PoolSpecError
from skybatch.pools import registry

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "MAX_JOB_NAME",
    "PoolSpec",
    "check_pool_name",
    "job_name_error",
    "load_pool_file",
    "mount_target",
    "parse_pool_spec",
    "validate_pool_spec",
]

# Names end up in paths, log lines and one-line tables: fullmatch, since `$` would
# also match before a trailing newline.
_POOL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
MAX_JOB_NAME = 200


def _shown(name: str) -> str:
    return repr(name) if len(name) <= 60 else f"{name[:40]!r}... ({len(name)} characters)"


def check_pool_name(name: str) -> None:
    if not _POOL_NAME.fullmatch(name):
        raise ConfigError(
            f"invalid pool name {_shown(name)}: use letters, digits, '-', '_' or '.', "
            "starting with a letter or digit (at most 63 characters)"
        )


def job_name_error(name: str) -> str | None:
    """Why ``name`` cannot name a job, or None: 1-200 printable characters, one line."""
    if not 1 <= len(name) <= MAX_JOB_NAME or not name.isprintable():
        return (
            f"a job name is 1-{MAX_JOB_NAME} printable characters on one line, got "
            f"{_shown(name)}; pass a shorter name= to ds.map"
        )
    return None


_AMOUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(\+?)\s*$")
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:GB|gb|G|g)?\s*(\+?)\s*$")
_ACCEL = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_-]*)\s*(?::\s*(\d+))?\s*$")


def _amount(value: Any, pattern: re.Pattern[str], example: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected {example}, got {value!r}")
    m = pattern.match(str(value))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"expected {example}, got {value!r}")
    number = m.group(1)
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number + m.group(2)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: Seconds an autoscaled pool's worker idles before it may be stopped, unless given.
DEFAULT_IDLE_TIMEOUT = 60.0

_SIZE_HINT = "give pool.workers (a fixed size) or pool.min_workers/max_workers (autoscaling)"


class PoolSection(_Strict):
    # Fields are validated in this order: each validator sees the ones above it.
    workers: int | None = Field(None, ge=1, le=4096, description="number of workers")
    min_workers: int | None = Field(None, ge=0, le=4096)
    max_workers: int | None = Field(None, ge=1, le=4096, validate_default=True)
    idle_timeout: float | None = Field(None, gt=0, le=86400)

    @field_validator("min_workers")
    @classmethod
    def _min(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and info.data.get("workers") is not None:
            raise ValueError(f"not with pool.workers: {_SIZE_HINT}, not both")
        return v

    @field_validator("max_workers")
    @classmethod
    def _max(cls, v: int | None, info: ValidationInfo) -> int | None:
        workers, low = info.data.get("workers"), info.data.get("min_workers")
        if v is None and low is not None:
            raise ValueError("missing: an autoscaled pool needs pool.max_workers")
        if v is not None and workers is not None:
            raise ValueError(f"not with pool.workers: {_SIZE_HINT}, not both")
        if v is not None and low is not None and low > v:
            raise ValueError(
                f"{v} is less than pool.min_workers ({low}); make max_workers at least min_workers"
            )
        return v

    @field_validator("idle_timeout")
    @classmethod
    def _idle(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and info.data.get("workers") is not None:
            raise ValueError(
                "only for an autoscaled pool: use pool.min_workers/max_workers "
                "instead of pool.workers, or drop idle_timeout"
            )
        return v

    @model_validator(mode="after")
    def _sized(self) -> PoolSection:
        if self.workers is None and self.max_workers is None:
            raise ValueError(f"no size: {_SIZE_HINT}")
        return self

    @property
    def autoscaled(self) -> bool:
        return self.workers is None

    @property
    def low(self) -> int:
        """The fewest workers: ``workers``, or ``min_workers`` (default 0)."""
        return self.workers if self.workers is not None else self.min_workers or 0

    @property
    def high(self) -> int:
        """The most workers: ``workers``, or ``max_workers``."""
        size = self.workers if self.workers is not None else self.max_workers
        assert size is not None  # the validators require one of them
        return size

    @property
    def idle_after(self) -> float:
        return self.idle_timeout if self.idle_timeout is not None else DEFAULT_IDLE_TIMEOUT


class Resources(_Strict):
    cpus: str | None = None
    memory: str | None = None
    accelerators: str | None = None

    @field_validator("cpus", mode="before")
    @classmethod
    def _cpus(cls, v: Any) -> str | None:
        return _amount(v, _AMOUNT, "a CPU count such as 2 (exactly) or 2+ (at least)")

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, v: Any) -> str | None:
        return _amount(v, _MEMORY, "memory in GB such as 16 (exactly) or 16+ (at least)")

    @field_validator("accelerators", mode="before")
    @classmethod
    def _accelerators(cls, v: Any) -> str | None:
        if v is None:
            return None
        if isinstance(v, dict) and len(v) == 1:
            ((name, count),) = v.items()
            v = f"{name}:{count}"
        m = _ACCEL.match(str(v)) if isinstance(v, (str, dict)) else None
        if not m or (m.group(2) is not None and int(m.group(2)) < 1):
            raise ValueError(f"expected a GPU type and count such as L4:1 or A100:8, got {v!r}")
        return f"{m.group(1)}:{m.group(2) or 1}"

    def accelerator_count(self) -> int:
        return int(self.accelerators.split(":")[1]) if self.accelerators else 0


class PoolSpec(_Strict):
    """A validated pool description."""

    pool: PoolSection
    resources: Resources = Resources()
    setup: str | None = None
    envs: dict[str, str] = {}
    workdir: str | None = None
    # Each provider validates its own fields (registry.parse_config); SerializeAsAny
    # dumps them too, so the server re-validates exactly what the client checked.
    provider_config: Annotated[
        SerializeAsAny[registry.ProviderConfig],
        WrapValidator(lambda value, _: registry.parse_config(value)),
    ] = Field("local", alias="provider", validate_default=True)

    name: str | None = None
    file_mounts: dict[str, str] = {}
    # What the YAML asked for that this spec ignores, one line each; never sent.
    _warnings: tuple[str, ...] = PrivateAttr(default=())

    model_config = ConfigDict(validate_by_name=True, serialize_by_alias=True)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                check_pool_name(v)
            except ConfigError as e:
                raise ValueError(str(e).replace("invalid pool name", "invalid", 1)) from None
        return v

    @field_validator("file_mounts", mode="before")
    @classmethod
    def _file_mounts(cls, v: Any, info: ValidationInfo) -> dict[str, str]:
        if v is None:
            return {}
        provider = info.data.get("provider_config")
        if not isinstance(v, dict):
            raise ValueError("expected a mapping of target path on the worker to local path")
        for target, source in v.items():
            if not isinstance(target, str) or not target.strip():
                raise ValueError(f"{target!r} is not a path")
            if ".." in Path(target).parts:
                raise ValueError(f"{target}: a target may not contain '..'")
            if not isinstance(source, str) or not source:
                raise ValueError(f"{target}: expected a local path, got {source!r}")
            local = provider is not None and provider.type in _MOUNTS_IN_WORKER_DIR
            if local and os.path.isabs(target):
                raise ValueError(
                    f"{target} is absolute; a local pool writes only inside each "
                    "worker's directory: give a relative target (or ~/...), which lands "
                    "there, where the mapper runs"
                )
        return v

    @property
    def warnings(self) -> tuple[str, ...]:
        """One ``Warning: ...`` line per field of the YAML that this pool ignores."""
        return self._warnings

    @field_validator("envs", mode="before")
    @classmethod
    def _envs(cls, v: Any) -> dict[str, str]:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise ValueError("expected a mapping of variable name to value")
        out = {}
        for key, value in v.items():
            if not isinstance(key, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
            if isinstance(value, (dict, list)):
                raise ValueError(f"value of {key} must be a string or number")
            out[key] = "" if value is None else str(value)
        return out

    @property
    def workers(self) -> int:
        """The most workers the pool runs at once: its size, or ``max_workers``."""
        return self.pool.high

    @property
    def min_workers(self) -> int:
        return self.pool.low

    @property
    def autoscaled(self) -> bool:
        return self.pool.autoscaled

    def size_text(self) -> str:
        """``3`` for a fixed pool, ``0-4`` for an autoscaled one."""
        return f"{self.pool.low}-{self.pool.high}" if self.autoscaled else str(self.pool.high)

    @property
    def provider(self) -> str:
        """The provider's name (``type``)."""
        return self.provider_config.type

    def setup_hash(self) -> str:
        """Identifies the setup a worker ran: same text and envs, no re-run."""
        text = (self.setup or "") + "\0" + repr(sorted(self.envs.items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def runtime_key(self) -> dict[str, Any]:
        """Everything but the worker count: if it changes, workers restart."""
        return self.model_dump(exclude={"pool", "name"})


#: Providers whose workers share the server's machine: file_mounts stay in the worker's
#: directory there.
_MOUNTS_IN_WORKER_DIR = ("local", "test")
#: Providers that copy file_mounts to each worker.
_MOUNTS_COPIED = (*_MOUNTS_IN_WORKER_DIR, "ssh")


def mount_target(target: str) -> str:
    """A local pool's ``file_mounts`` target, relative to the worker's directory."""
    return "." if target == "~" else target.removeprefix("~/")


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at ``loc`` (or of its nearest parent)."""
    node, line = root, None
    for key in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == str(key):
                line = k.start_mark.line + 1
                node = v
                break
        else:
            break
    if line is None and root is not None:
        line = root.start_mark.line + 1
    return line


def _fields(model: Any) -> dict[str, Any]:
    """A model's fields by the names YAML spells them (aliases)."""
    fields = getattr(model, "model_fields", {})
    return {field.alias or name: field for name, field in fields.items()}


def _allowed(loc: tuple[Any, ...], data: Any) -> list[str]:
    if loc[:-1] == ("provider",):
        try:
            return list(_fields(registry.provider_class(data["provider"]["type"]).config_model))
        except (ValueError, KeyError, TypeError, ValidationError):
            return []
    model: Any = PoolSpec
    for key in loc[:-1]:
        field = _fields(model).get(str(key))
        if field is None or not isinstance(field.annotation, type):
            return []
        model = field.annotation
    return list(_fields(model))


def _format(e: ValidationError, source: str, root: yaml.Node | None, data: Any) -> str:
    messages = []
    for err in e.errors():
        loc = tuple(err["loc"])
        field = ".".join(str(p) for p in loc) or "(top level)"
        line = _line_of(root, loc)
        where = f"{source} line {line}" if line else source
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed(loc, data))
            messages.append(f"{where}: unknown field '{field}'; allowed here: {allowed}")
        elif err["type"] == "missing":
            messages.append(f"{where}: missing required field '{field}'")
        elif err["type"] == "literal_error":
            messages.append(f"{where}: {field}: {err['msg']}")
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            messages.append(f"{where}: {field}: {msg}")
    return "; ".join(messages)


_MACHINES = (
    "skybatch does not provision machines; launch them with `sky launch` and list them "
    "as SSH hosts (provider: {type: ssh, hosts: [...]})"
)
#: SkyPilot task fields that choose or provision machines: skybatch runs on what exists.
_SKYPILOT_RESOURCES = (
    "cloud", "infra", "region", "zone", "instance_type", "use_spot", "disk_size",
    "disk_tier", "network_tier", "local_disk", "ephemeral_storage", "image_id", "ports",
    "labels", "max_hourly_cost", "job_recovery", "autostop", "priority", "priority_class",
    "accelerator_args", "volumes", "any_of", "ordered",
)  # fmt: skip
#: SkyPilot task fields skybatch has no counterpart for, and why.
_SKYPILOT_TOP = {
    "run": "a pool's workers run the mappers that ds.map submits; put per-worker commands in setup",
    "event_callback": "skybatch has no event callbacks; follow a job with `skybatch jobs logs`",
    "inputs": "skybatch has no counterpart; the dataset names the input",
    "outputs": "skybatch has no counterpart; ds.map's output= names it",
    "volumes": _MACHINES,
    "volume_mounts": _MACHINES,
    "config": "skybatch reads no SkyPilot config",
}


class _Skypilot:
    """A SkyPilot task's fields in a pool YAML: mapped to skybatch's, or dropped with a
    warning line each."""

    def __init__(self, source: str, root: yaml.Node | None) -> None:
        self.source, self.root = source, root
        self._warnings: list[tuple[int, str]] = []

    @property
    def warnings(self) -> list[str]:
        """In the YAML's order."""
        return [text for _, text in sorted(self._warnings, key=lambda w: w[0])]

    def where(self, *loc: str) -> str:
        line = _line_of(self.root, loc)
        return f"{self.source} line {line}" if line else self.source

    def warn(self, loc: tuple[str, ...], why: str) -> None:
        line = _line_of(self.root, loc) or 0
        text = f"Warning: {self.where(*loc)}: {'.'.join(loc)} is ignored: {why}"
        self._warnings.append((line, text))

    def translate(self, data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        for key, why in _SKYPILOT_TOP.items():
            if key in data:
                self.warn((key,), why)
                del data[key]
        resources = data.get("resources")
        if isinstance(resources, dict):
            resources = dict(resources)
            for key in _SKYPILOT_RESOURCES:
                if key in resources:
                    self.warn(("resources", key), _MACHINES)
                    del resources[key]
            data["resources"] = resources
        if "num_nodes" in data:
            data = self._num_nodes(data, data.pop("num_nodes"))
        mounts = data.get("file_mounts")
        if isinstance(mounts, dict):
            data["file_mounts"] = {
                target: src for target, src in mounts.items() if self._local(str(target), src)
            }
        return data

    def _local(self, target: str, src: Any) -> bool:
        if isinstance(src, dict) or (isinstance(src, str) and "://" in src):
            self.warn(
                ("file_mounts", target),
                "skybatch copies local paths only; read the bucket from the mapper "
                "(or make it the dataset's input)",
            )
            return False
        return True

    def _num_nodes(self, data: dict[str, Any], n: Any) -> dict[str, Any]:
        where = self.where("num_nodes")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 4096:
            raise PoolSpecError(
                f"{where}: num_nodes: expected a number of workers from 1 to 4096, got {n!r}"
            )
        pool = data.get("pool")
        if pool is None:
            data["pool"] = {"workers": n}
        elif isinstance(pool, dict):
            if "min_workers" in pool or "max_workers" in pool:
                raise PoolSpecError(
                    f"{where}: num_nodes: a fixed size, not with pool.min_workers/max_workers; "
                    "drop num_nodes for an autoscaled pool"
                )
            workers = pool.get("workers")
            if workers is not None and workers != n:
                raise PoolSpecError(
                    f"{where}: num_nodes: {n}, but pool.workers is {workers!r}; "
                    "they are the same setting: give one of them"
                )
            data["pool"] = {**pool, "workers": n}
        return data

    def resolve_mounts(self, spec: PoolSpec, base_dir: str | None) -> PoolSpec:
        """Local sources as absolute paths, checked; dropped with a warning where the
        provider does not copy them."""
        if not spec.file_mounts:
            return spec
        if spec.provider not in _MOUNTS_COPIED:
            self.warn(
                ("file_mounts",),
                f"provider {spec.provider} does not copy file_mounts; put the files in "
                "workdir, which it copies to each worker",
            )
            return spec.model_copy(update={"file_mounts": {}})
        mounts = {}
        for target, src in spec.file_mounts.items():
            path = Path(os.path.expanduser(src))
            if not path.is_absolute():
                path = Path(base_dir or os.getcwd()) / path
            if not path.exists():
                raise PoolSpecError(
                    f"{self.where('file_mounts', target)}: file_mounts.{target}: {path} does "
                    "not exist; name a local file or directory to copy to each worker"
                )
            mounts[target] = str(path.resolve())
        return spec.model_copy(update={"file_mounts": mounts})


def validate_pool_spec(data: Any, source: str = "pool spec") -> PoolSpec:
    """A pool spec that came as data (the API's body): errors name the field, no line."""
    try:
        return PoolSpec.model_validate(data)
    except ValidationError as e:
        raise PoolSpecError(_format(e, source, None, data)) from None


def parse_pool_spec(text: str, source: str = "pool YAML", base_dir: str | None = None) -> PoolSpec:
    """Validate YAML text; relative ``workdir`` and ``file_mounts`` sources resolve
    against ``base_dir``. What it ignores is in the spec's ``warnings``."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source} line {mark.line + 1}" if mark else source
        problem = getattr(e, "problem", None) or str(e)
        raise PoolSpecError(f"{where}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise PoolSpecError(
            f"{source}: expected a mapping with at least `pool: {{workers: N}}`, got "
            f"{type(data).__name__}"
        )
    skypilot = _Skypilot(source, root)
    data = skypilot.translate(data)
    try:
        spec = PoolSpec.model_validate(data)
    except ValidationError as e:
        raise PoolSpecError(_format(e, source, root, data)) from None
    spec = skypilot.resolve_mounts(spec, base_dir)
    if spec.workdir is not None:
        path = Path(os.path.expanduser(spec.workdir))
        if not path.is_absolute():
            path = Path(base_dir or os.getcwd()) / path
        if not path.is_dir():
            line = _line_of(root, ("workdir",))
            raise PoolSpecError(
                f"{source} line {line}: workdir: {path} is not a directory; "
                "name a directory to copy to each worker"
            )
        spec = spec.model_copy(update={"workdir": str(path.resolve())})
    spec._warnings = tuple(skypilot.warnings)
    return spec


def load_pool_file(path: str | os.PathLike[str]) -> PoolSpec:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise PoolSpecError(f"{p}: no such file") from None
    except OSError as e:
        raise PoolSpecError(f"{p}: cannot read ({e.strerror})") from None
    return parse_pool_spec(text, str(p), str(p.resolve().parent))
