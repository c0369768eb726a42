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

Errors name the file, the line, the field and what is allowed.

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

    model_config = ConfigDict(validate_by_name=True, serialize_by_alias=True)

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
        return self.model_dump(exclude={"pool"})


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


def validate_pool_spec(data: Any, source: str = "pool spec") -> PoolSpec:
    """A pool spec that came as data (the API's body): errors name the field, no line."""
    try:
        return PoolSpec.model_validate(data)
    except ValidationError as e:
        raise PoolSpecError(_format(e, source, None, data)) from None


def parse_pool_spec(text: str, source: str = "pool YAML", base_dir: str | None = None) -> PoolSpec:
    """Validate YAML text; relative ``workdir`` resolves against ``base_dir``."""
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
    try:
        spec = PoolSpec.model_validate(data)
    except ValidationError as e:
        raise PoolSpecError(_format(e, source, root, data)) from None
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
