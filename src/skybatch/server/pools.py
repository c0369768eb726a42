"""Pool lifecycle: apply (create, resize, restart), down, worker registration, monitoring."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from typing import Any

from skybatch import defaults
from skybatch.errors import ConflictError, NotFoundError, PoolError
from skybatch.pools.gpus import GpuLedger
from skybatch.pools.providers.base import Provider, ServerAccess, WorkerLaunch, provider_for
from skybatch.pools.registry import ProviderConfig, parse_config
from skybatch.pools.spec import PoolSpec, check_pool_name, validate_pool_spec
from skybatch.server.autoscale import Decision, decide
from skybatch.server.context import Context
from skybatch.server.jobs import JobService
from skybatch.server.store import PoolRecord, WorkerRecord
from skybatch.states import JobStatus, PoolStatus, WorkerStatus
from skybatch.wire import PoolView, ScalingView, WorkerView

__all__ = ["PoolService"]

log = logging.getLogger("skybatch.server")

#: A worker that dies this many times in a row before becoming ready fails its pool.
_MAX_EARLY_DEATHS = 3

#: Seconds before a worker whose launch failed is tried again: doubling up to the last.
_LAUNCH_BACKOFF = (1.0, 60.0)

#: Waiting batches counted per autoscaling decision (or max_workers, if more): enough to
#: size the pool, and a bounded read on the event loop however long the queue (0.3 ms).
_WAITING_CAP = 1000

#: Seconds a server stopping waits for the scaling steps under way (a launch can take
#: minutes: a Ray placement, an SSH host's venv) before it stops the live workers anyway.
_STOP_WAIT = 3.0

#: Liveness checks in flight at once: each holds a thread while it waits (on a network
#: round trip, for a remote provider), and the threads are shared with launches and stops.
_ALIVE_CHECKS = 8


class PoolService:
    def __init__(self, ctx: Context, jobs: JobService) -> None:
        self.ctx = ctx
        self.jobs = jobs
        # One provider per distinct `provider:` section, kept: the local one
        # remembers the agents it started, a remote one its connections.
        self._providers: dict[str, Provider] = {}
        self._early_deaths: dict[tuple[str, int], int] = defaultdict(int)
        # One lock per pool, held across its launches: one pool's slow provider (a Ray
        # placement, an SSH host) never holds up another pool, nor the monitor.
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # Set once the server stops: a launch that ends after it stops its own agent.
        self._closing = threading.Event()
        # Autoscaling: the step under way per pool, and each pool's last decision and when.
        self._scaling: dict[str, asyncio.Task[None]] = {}
        self._decisions: dict[str, tuple[str, float]] = {}
        # Pools with a worker whose launch failed: when to try again (the clock's time).
        self._retry_at: dict[str, float] = {}
        # Each pool's last failed launch, shown while the pool is short of it.
        self._launch_errors: dict[str, str] = {}
        # Pools with a worker that died, to replace in a scaling step of their own.
        self._replace: set[str] = set()
        # Who holds which GPUs, across pools and providers: launches claim from it.
        self._gpus = GpuLedger()

    def provider(self, config: ProviderConfig) -> Provider:
        key = config.model_dump_json()
        if key not in self._providers:
            provider = provider_for(config)
            provider.attach(
                ServerAccess(self.ctx.url, self.ctx.token, self.ctx.home, self.ctx.cert)
            )
            self._providers[key] = provider
        return self._providers[key]

    def get(self, name: str) -> PoolRecord:
        pool = self.ctx.store.get_pool(name)
        if pool is None:
            names = ", ".join(p.name for p in self.ctx.store.list_pools()) or "none"
            raise NotFoundError(
                f"no pool named {name!r} (pools: {names}); create it with "
                f"`skybatch pool apply pool.yaml --pool {name}`"
            )
        return pool

    def view(self, pool: PoolRecord) -> PoolView:
        spec = PoolSpec.model_validate(pool.spec)
        workers = self.ctx.store.list_workers(pool.name, live_only=True)
        failed = [
            w
            for w in self.ctx.store.list_workers(pool.name)
            if w.status is WorkerStatus.SETUP_FAILED
        ]
        shown = sorted(
            workers + (failed if pool.status is PoolStatus.FAILED else []),
            key=lambda w: (w.index, w.id),
        )
        scaling = self._scaling_view(pool.name, spec) if spec.autoscaled else None
        return PoolView(
            name=pool.name,
            status=pool.status.value,
            error=pool.error,
            workers=scaling.target if scaling else spec.workers,
            ready=sum(w.status is WorkerStatus.READY for w in workers),
            resources=spec.resources.model_dump(exclude_none=True),
            provider=spec.provider,
            worker_list=self._worker_views(pool.name, spec, shown),
            active_jobs=[
                j.id for j in self.ctx.store.list_jobs(active_only=True) if j.pool == pool.name
            ],
            scaling=scaling,
            spec=pool.spec,
        )

    def _scaling_view(self, name: str, spec: PoolSpec) -> ScalingView:
        decision = self._decide(name, spec)
        last, at = self._decisions.get(name, (None, None))
        return ScalingView(
            min_workers=spec.min_workers,
            max_workers=spec.workers,
            idle_timeout=spec.pool.idle_after,
            target=decision.target,
            waiting=decision.waiting,
            waiting_capped=decision.waiting_capped,
            busy=decision.busy,
            idle=decision.idle,
            reason=decision.reason,
            last_decision=last,
            decided_at=at,
        )

    def _worker_views(
        self, pool: str, spec: PoolSpec, workers: list[WorkerRecord]
    ) -> list[WorkerView]:
        leases = self.ctx.store.worker_leases(pool)
        now = self.ctx.clock()
        views = []
        for w in workers:
            held = leases.get(w.id, [])
            views.append(
                WorkerView(
                    id=w.id,
                    index=w.index,
                    status=w.status.value,
                    pid=w.handle.get("pid"),
                    error=w.error,
                    provider=spec.provider,
                    host=w.handle.get("host"),
                    gpus=w.handle.get("gpus") or [],
                    job=held[0][0] if held else None,
                    batch=held[0][1] if held else None,
                    leases=len(held),
                    batches_done=w.batches_done,
                    heartbeat_age=None if w.last_seen is None else max(0.0, now - w.last_seen),
                )
            )
        return views

    # -- apply and down ------------------------------------------------------------------

    async def apply(self, name: str, raw_spec: dict[str, Any]) -> PoolRecord:
        check_pool_name(name)
        spec = validate_pool_spec(raw_spec, "invalid pool spec")
        # Unreachable hosts, missing GPUs: refused before anything is stored or started.
        # Its own workers' GPUs count as free: the check asks whether the whole pool fits.
        held = self._synced_gpus().held(exclude_pool=name)
        await asyncio.to_thread(self.provider(spec.provider_config).check, spec, held)
        async with self._locks[name]:
            store = self.ctx.store
            old = store.get_pool(name)
            restart = (
                old is not None
                and PoolSpec.model_validate(old.spec).runtime_key() != spec.runtime_key()
            ) or (old is not None and old.status is PoolStatus.FAILED)
            store.put_pool(name, spec.model_dump(), self.ctx.clock())
            for key in [k for k in self._early_deaths if k[0] == name]:
                del self._early_deaths[key]
            if restart:
                log.info("pool %s changed: restarting its workers", name)
                await self._stop(store.list_workers(name, live_only=True), "pool spec changed")
            await self._reconcile(name)
        return self.get(name)

    async def down(self, name: str) -> list[str]:
        pool = self.get(name)
        for job in self.ctx.store.list_jobs(active_only=True):
            if job.pool == name and job.status is not JobStatus.REDUCING:
                await self.jobs.cancel(job.id, f"pool {name} was taken down")
        async with self._locks[name]:
            await self._stop(self.ctx.store.list_workers(name, live_only=True), "pool down")
            self.ctx.store.delete_pool(name)
            self._launch_errors.pop(name, None)
            self._retry_at.pop(name, None)
            self._replace.discard(name)
            spec = PoolSpec.model_validate(pool.spec)
            provider = self.provider(spec.provider_config)
            left = await asyncio.to_thread(provider.remove, name, self.ctx.home)
        self.ctx.notifier.notify(("pool-status", name))
        log.info("pool %s is down", name)
        return left

    async def stop_all(self) -> None:
        """On server shutdown: stop every agent; the next start relaunches them."""
        # Before the workers are listed: a launch that ends later stops its own agent
        # (see _launch), one that ended before has its handle listed here.
        self._closing.set()
        # A scaling step about to end may finish; a launch that takes minutes must not
        # keep the live agents running until the server is killed.
        scaling = list(self._scaling.values())
        if scaling:
            await asyncio.wait(scaling, timeout=_STOP_WAIT)
        await self._stop(self.ctx.store.list_workers(live_only=True), "server stopped")
        for provider in self._providers.values():
            try:
                await asyncio.to_thread(provider.close)
            except Exception:  # one provider's trouble must not keep the others open
                log.exception("closing provider %s failed", provider.config.type)

    async def start_all(self) -> None:
        """On server start: bring every pool back to its size (agents may have survived)."""
        store, now = self.ctx.store, self.ctx.clock()
        for w in store.list_workers(live_only=True):
            if w.status is WorkerStatus.STARTING and not w.handle:
                # A launch the last server never finished (it was killed meanwhile): no
                # agent of it will ever register, so its pool replaces it.
                store.set_worker(
                    w.id,
                    status=WorkerStatus.LOST,
                    error="the server stopped before this worker's launch finished",
                    now=now,
                )
        await asyncio.gather(
            *(
                self._reconcile_locked(pool.name)
                for pool in store.list_pools()
                if pool.status is not PoolStatus.FAILED
            )
        )

    async def _reconcile_locked(self, name: str) -> None:
        async with self._locks[name]:
            await self._reconcile(name)

    async def _reconcile(self, name: str) -> None:
        """Launch missing workers and stop extra ones, so the pool has its size: ``workers``,
        or for an autoscaled pool what its queue asks (``autoscale.decide``)."""
        store = self.ctx.store
        pool = store.get_pool(name)
        if pool is None or pool.status is PoolStatus.FAILED or self._closing.is_set():
            return  # a step that waited for its pool's lock while the server stopped
        spec = PoolSpec.model_validate(pool.spec)
        keep: dict[int, WorkerRecord] = {}
        extra = []
        for w in store.list_workers(name, live_only=True):
            if w.index >= spec.workers or w.index in keep:
                extra.append(w)
            else:
                keep[w.index] = w
        if extra:
            await self._stop(extra, "pool resized")
        missing = [i for i in range(spec.workers) if i not in keep]
        if spec.autoscaled:
            decision = self._decide(name, spec)
            stop = [w for w in keep.values() if w.id in decision.stop]
            stopped = await self._stop_idle(stop, spec.pool.idle_after)
            if decision.launch or stopped:
                self._decisions[name] = (decision.reason, self.ctx.clock())
                log.info("pool %s: %s", name, decision.reason)
            # The lowest free indices: a worker started again finds its directory and setup.
            missing = missing[: decision.launch]
        launched = await asyncio.gather(*(self._launch(name, i, spec) for i in missing))
        if all(launched):
            self._launch_errors.pop(name, None)
        self._update_status(name)

    def _decide(self, name: str, spec: PoolSpec) -> Decision:
        cap = max(_WAITING_CAP, spec.workers)
        load = self.ctx.store.pool_load(name, cap)
        return decide(
            low=spec.min_workers,
            high=spec.workers,
            idle_timeout=spec.pool.idle_after,
            waiting=load.waiting,
            waiting_capped=load.waiting >= cap,
            jobs=load.jobs,
            workers=load.workers,
            now=self.ctx.clock(),
        )

    async def _stop_idle(self, workers: list[WorkerRecord], idle_after: float) -> int:
        """Stop idle workers of an autoscaled pool: each only if the store, in the same
        transaction, finds it still holds no lease (one handed out since is kept). How
        many it stopped."""
        now = self.ctx.clock()
        reason = f"idle for {idle_after:g}s: pool scaled down"
        stopped = [
            w
            for w in workers
            if self.ctx.store.stop_idle_worker(w.id, now - idle_after, reason, now)
        ]
        await asyncio.gather(
            *(
                asyncio.to_thread(
                    self.provider(self._config_of(w)).terminate, w.handle, defaults.KILL_GRACE
                )
                for w in stopped
            )
        )
        for w in stopped:
            self.ctx.notifier.notify(("pool", w.pool))
        return len(stopped)

    def _autoscale(self) -> None:
        """Start a scaling step for each autoscaled pool whose queue asks for one; in a
        task of its own, so a slow launch never holds up the monitor's lease expiry."""
        for pool in self.ctx.store.list_pools():
            if pool.status is PoolStatus.FAILED or pool.name in self._scaling:
                continue
            spec = PoolSpec.model_validate(pool.spec)
            if not spec.autoscaled:
                continue
            decision = self._decide(pool.name, spec)
            # After a failed launch, growing waits for its backoff (_retry_launches starts
            # that step); scaling down does not.
            if decision.launch and pool.name in self._retry_at:
                continue
            if decision.changes:
                self._scaling[pool.name] = asyncio.create_task(self._scale(pool.name))

    async def _scale(self, name: str) -> None:
        try:
            await self._reconcile_locked(name)
        except Exception:  # the next tick tries again
            log.exception("scaling pool %s failed", name)
        finally:
            self._scaling.pop(name, None)

    async def _launch(self, pool: str, index: int, spec: PoolSpec) -> bool:
        """Start one worker; False if its launch failed (tried again after a backoff)."""
        store = self.ctx.store
        worker_id = store.add_worker(pool, index, self.ctx.clock())
        launch = WorkerLaunch(
            worker_id=worker_id,
            pool=pool,
            index=index,
            spec=spec,
            server_url=self.ctx.url,
            token=self.ctx.token,
            home=self.ctx.home,
            server_cert=self.ctx.cert,
            gpus=self._synced_gpus(),
        )
        provider = self.provider(spec.provider_config)

        def run() -> None:
            handle = provider.launch(launch)
            # Recorded from the launch's own thread: a server that stops meanwhile
            # cancels the task awaiting it, and must neither lose nor leave the agent.
            # Recorded before the check: stop_all sets _closing, then lists the workers.
            try:
                store.set_worker(worker_id, handle=handle, now=self.ctx.clock())
                if self._closing.is_set():
                    store.set_worker(
                        worker_id,
                        status=WorkerStatus.STOPPED,
                        error="server stopped",
                        now=self.ctx.clock(),
                    )
            finally:
                if self._closing.is_set():  # even if the store closed first
                    log.info("worker %d of pool %s started as the server stopped", index, pool)
                    provider.terminate(handle, defaults.KILL_GRACE)

        try:
            await asyncio.to_thread(run)
        except PoolError as e:  # the provider's one-line reason: no traceback to add
            log.warning("launching worker %d of pool %s failed: %s", index, pool, e)
            self._launch_failed(pool, index, worker_id, e)
            return False
        except Exception as e:
            log.exception("launching worker %d of pool %s failed", index, pool)
            self._launch_failed(pool, index, worker_id, e)
            return False
        return True

    def _launch_failed(self, pool: str, index: int, worker_id: int, error: Exception) -> None:
        """A launch that failed counts as an early death: tried again with backoff while
        the pool has a ready worker or tries left, the pool DEGRADED with the one-line
        error (naming the host, for a remote provider); FAILED once it has neither."""
        store, now = self.ctx.store, self.ctx.clock()
        store.set_worker(worker_id, status=WorkerStatus.LOST, error=str(error), now=now)
        key = (pool, index)
        self._early_deaths[key] += 1
        failures = self._early_deaths[key]
        message = f"could not start worker {index}: {error}"
        working = any(
            w.status is WorkerStatus.READY for w in store.list_workers(pool, live_only=True)
        )
        if failures >= _MAX_EARLY_DEATHS and not working:
            store.set_pool_status(pool, PoolStatus.FAILED, f"{message} ({failures} tries)", now)
            return
        delay = min(_LAUNCH_BACKOFF[0] * 2 ** (failures - 1), _LAUNCH_BACKOFF[1])
        self._retry_at[pool] = min(self._retry_at.get(pool, now + delay), now + delay)
        self._launch_errors[pool] = f"{message}; trying again in {delay:g}s"
        store.set_pool_status(pool, PoolStatus.DEGRADED, self._launch_errors[pool], now)

    def _retry_launches(self) -> None:
        """Launch again the workers of pools whose backoff after a failed launch is over;
        in a task, like a scaling step (and never beside one)."""
        now = self.ctx.clock()
        for name, at in list(self._retry_at.items()):
            if at > now or name in self._scaling:
                continue
            del self._retry_at[name]
            self._scaling[name] = asyncio.create_task(self._scale(name))

    def _replace_lost(self) -> None:
        """Replace the workers found dead, in a step per pool like a scaling step: the
        monitor never waits on a launch. A pool with a step under way waits its turn."""
        for name in list(self._replace):
            if name not in self._scaling:
                self._replace.discard(name)
                self._scaling[name] = asyncio.create_task(self._scale(name))

    async def _stop(self, workers: list[WorkerRecord], reason: str) -> None:
        if not workers:
            return
        store = self.ctx.store
        # Mark first, so the monitor does not mistake a stopping worker for a lost one.
        for w in workers:
            store.set_worker(w.id, status=WorkerStatus.STOPPED, error=reason, now=self.ctx.clock())
        await asyncio.gather(
            *(
                asyncio.to_thread(
                    self.provider(self._config_of(w)).terminate, w.handle, defaults.KILL_GRACE
                )
                for w in workers
            )
        )
        exhausted: list[tuple[int, int]] = []
        for w in workers:
            exhausted += store.release_worker(
                w.id,
                f"worker {w.index} stopped: {reason}",
                self.ctx.clock(),
                defaults.MAX_SYSTEM_FAILURES,
            )
            self.ctx.notifier.notify(("pool", w.pool))
        await self.jobs.handle_exhausted(exhausted)

    def _synced_gpus(self) -> GpuLedger:
        """The ledger, brought in line with the store: derived from it, so a worker stopped
        or lost by any path frees its GPUs, and one started by an earlier server holds them."""
        self._gpus.sync(
            (w.id, w.pool, w.handle) for w in self.ctx.store.list_workers(live_only=True)
        )
        return self._gpus

    def _config_of(self, worker: WorkerRecord) -> ProviderConfig:
        pool = self.ctx.store.get_pool(worker.pool)
        return PoolSpec.model_validate(pool.spec).provider_config if pool else parse_config("local")

    def _update_status(self, name: str) -> None:
        store = self.ctx.store
        pool = store.get_pool(name)
        if pool is None or pool.status is PoolStatus.FAILED:
            self.ctx.notifier.notify(("pool-status", name))
            return
        spec = PoolSpec.model_validate(pool.spec)
        ready = sum(
            w.status is WorkerStatus.READY for w in store.list_workers(name, live_only=True)
        )
        # Ready once the workers it always keeps are: all of a fixed pool, an autoscaled
        # pool's min_workers (at once for 0). Growing with the queue is not provisioning.
        if ready >= spec.min_workers:
            status = PoolStatus.READY
        elif pool.status in (PoolStatus.READY, PoolStatus.DEGRADED):
            status = PoolStatus.DEGRADED
        else:
            status = PoolStatus.PROVISIONING
        # A READY pool short of its target because a launch failed (an autoscaled pool
        # growing) says why; a pool that is not READY keeps its error while it recovers.
        launch_error = self._launch_errors.get(name)
        if status is PoolStatus.READY or status is not pool.status:
            error = launch_error
        else:
            error = pool.error
        if (status, error) != (pool.status, pool.error):
            store.set_pool_status(name, status, error, self.ctx.clock())
        self.ctx.notifier.notify(("pool-status", name))

    async def wait_settled(self, name: str, timeout: float) -> PoolRecord:
        """The pool once it is READY or FAILED, or as it is when ``timeout`` runs out."""
        pool = self.get(name)
        if pool.status in (PoolStatus.PROVISIONING, PoolStatus.DEGRADED):
            await self.ctx.notifier.wait(("pool-status", name), timeout)
            pool = self.get(name)
        return pool

    # -- agents --------------------------------------------------------------------------

    def live_worker(self, worker_id: int) -> WorkerRecord:
        w = self.ctx.store.get_worker(worker_id)
        if w is None or not w.status.live:
            raise ConflictError(f"worker {worker_id} is not part of a live pool; exit")
        return w

    def register(self, worker_id: int, pid: int) -> dict[str, Any]:
        w = self.live_worker(worker_id)
        pool = self.get(w.pool)
        spec = PoolSpec.model_validate(pool.spec)
        status = WorkerStatus.READY if w.status is WorkerStatus.READY else WorkerStatus.SETTING_UP
        self.ctx.store.set_worker(worker_id, status=status, now=self.ctx.clock())
        return {
            "pool": w.pool,
            "index": w.index,
            "setup": spec.setup,
            "setup_hash": spec.setup_hash(),
            "heartbeat_interval": defaults.HEARTBEAT_INTERVAL,
        }

    def ready(self, worker_id: int) -> None:
        w = self.live_worker(worker_id)
        self.ctx.store.set_worker(worker_id, status=WorkerStatus.READY, now=self.ctx.clock())
        self._early_deaths.pop((w.pool, w.index), None)
        self._update_status(w.pool)
        self.ctx.notifier.notify(("pool", w.pool))

    def setup_failed(self, worker_id: int, exit_code: int, output: str) -> None:
        w = self.live_worker(worker_id)
        message = (
            f"setup failed on worker {w.index} with exit code {exit_code} "
            f"(last output: {_last_line(output)!r}); fix `setup` in the pool YAML and apply it "
            f"again; full output in {self._log_of(w)}"
        )
        now = self.ctx.clock()
        self.ctx.store.set_worker(
            worker_id, status=WorkerStatus.SETUP_FAILED, error=message, now=now
        )
        self.ctx.store.set_pool_status(w.pool, PoolStatus.FAILED, message, now)
        self.ctx.notifier.notify(("pool-status", w.pool))

    def heartbeat(self, worker_id: int, attempts: list[int]) -> dict[str, Any]:
        w = self.live_worker(worker_id)
        revoked = self.ctx.store.heartbeat(
            worker_id, attempts, self.ctx.clock(), defaults.LEASE_TTL
        )
        return {"revoked": revoked, "active_jobs": self.ctx.store.active_job_ids(w.pool)}

    # -- monitoring ----------------------------------------------------------------------

    async def monitor_once(self) -> None:
        """Requeue expired leases; replace workers whose process died; scale autoscaled
        pools with their queues."""
        store = self.ctx.store
        pools, exhausted = store.expire_leases(self.ctx.clock(), defaults.MAX_SYSTEM_FAILURES)
        for pool_name in pools:
            self.ctx.notifier.notify(("pool", pool_name))
        await self.jobs.handle_exhausted(exhausted)
        for w in await self._dead_workers():
            await self._lost(w)
        self._replace_lost()
        self._retry_launches()
        self._autoscale()

    async def _dead_workers(self) -> list[WorkerRecord]:
        """Live workers whose provider says their agent is gone, asked off the event loop:
        a remote provider's check is a network round trip that would stall every lease."""
        workers = [w for w in self.ctx.store.list_workers(live_only=True) if w.handle]
        bound = asyncio.Semaphore(_ALIVE_CHECKS)

        async def alive(w: WorkerRecord) -> bool:
            provider = self.provider(self._config_of(w))
            async with bound:
                return await asyncio.to_thread(provider.is_alive, w.handle)

        verdicts = await asyncio.gather(*(alive(w) for w in workers))
        return [w for w, is_alive in zip(workers, verdicts, strict=True) if not is_alive]

    async def _lost(self, w: WorkerRecord) -> None:
        store = self.ctx.store
        current = store.get_worker(w.id)
        if current is None or not current.status.live:
            return  # stopped meanwhile
        log.warning("worker %d of pool %s (pid %s) died", w.index, w.pool, w.handle.get("pid"))
        now = self.ctx.clock()
        store.set_worker(w.id, status=WorkerStatus.LOST, error="agent process died", now=now)
        # The provider saw it die: its batches go back now, not when the lease expires.
        exhausted = store.release_worker(
            w.id, f"worker {w.index} died", now, defaults.MAX_SYSTEM_FAILURES
        )
        self.ctx.notifier.notify(("pool", w.pool))
        await self.jobs.handle_exhausted(exhausted)
        if current.status is not WorkerStatus.READY:
            key = (w.pool, w.index)
            self._early_deaths[key] += 1
            if self._early_deaths[key] >= _MAX_EARLY_DEATHS:
                if w.handle.get("log"):
                    # A remote worker's log is on its host: named, not read from here.
                    last = ""
                else:
                    last = f" (last output: {_last_line(_tail(self._log_of(w)))!r})"
                store.set_pool_status(
                    w.pool,
                    PoolStatus.FAILED,
                    f"worker {w.index} died {_MAX_EARLY_DEATHS} times before it was ready"
                    f"{last}; see {self._log_of(w)}",
                    now,
                )
                self.ctx.notifier.notify(("pool-status", w.pool))
                return
        self._replace.add(w.pool)

    def _log_of(self, w: WorkerRecord) -> str:
        """Where the worker's agent and setup output is: on its host for a remote worker
        (its handle's ``log``), else this server's worker log."""
        if w.handle.get("log"):
            host = w.handle.get("host")
            return f"{w.handle['log']} on host {host}" if host else str(w.handle["log"])
        return str(self.ctx.home.worker_log(w.pool, w.index))


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def _tail(path: Any, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return "(no log)"
