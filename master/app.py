"""The master process: builds its parts, wires them to the event seam, runs, stops.

Parts never call each other: each emits what happened on the bus (`master.bus`,
events in `master.events`) and lists what it reacts to (`subscriptions()`); none
subscribes or adds a gate itself. Here, and only here, they are built, wired in one
order, run and stopped; nothing is decided here. Intake, the delay heap, schedules
and recovery hand over due tasks (`TasksTaken`); the dispatcher puts them on the
device board and sends them to workers past the gates (`Master.gates`, one
ordered list); the pool's answers, lost workers and capacity, device-free events
and the fallback lock check come back as events too. A part that reads another's
state gets a small read-only view (the leader lease's `is_leading`, the pause
gate's `quota`, the board and heap behind `Backlog`).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from loguru import logger

from master.adaptive import AdaptiveLimits
from master.alerts import Alerting
from master.backpressure import Backlog, Backpressure
from master.board import DeviceBoard
from master.breaker import CircuitBreakerPart
from master.bus import Bus, Gate
from master.delays import DelayedTasks
from master.device_free import DeviceFreeListener, LockChecker
from master.device_health import Benching
from master.dispatch import Dispatcher
from master.droprate import DropRate
from master.events import MasterStopping, TasksTaken
from master.expiry import Expiry
from master.heartbeat import Heartbeat
from master.identity import IdentityTaken, MasterIdentity
from master.intake import Intake
from master.jobs import Jobs
from master.leadership import leader_lease
from master.limits import RateLimits
from master.lost_work import LostWork
from master.metering import Metering
from master.pauses import Pausing
from master.pool import WorkerPool
from master.queue_caps import QueueCaps
from master.quota import QuotaSignal
from master.reconcile import HeldTasks
from master.recovery import Recovery
from master.retention import Retention
from master.scheduler import Scheduler
from master.search_upkeep import SearchUpkeep
from master.sharing import WorkSharing
from master.sweeper import Sweeper
from master.tracing import TaskTraces
from master.watches import Watches
from sendscript import connect
from sendscript.backoff import Backoff
from sendscript.counts import CountKeeper
from sendscript.health import HealthServer, master_checks
from sendscript.models import Task, utcnow
from sendscript.queue import Entry, IntakeQueue
from sendscript.replicas import NotReplicated, ReplicaWait
from sendscript.settings import Settings
from sendscript.status import TaskStatus
from sendscript.store import GROUPS, RecordStore, TaskStore, ensure_indexes


class Loop(Protocol):
    async def run(self, stop: asyncio.Event) -> Any: ...


class Master:
    def __init__(self, settings: Settings) -> None:
        settings.require("redis_url", "mongo_url", "central_url")
        self.settings = settings
        self.bus = Bus()
        self.jobs = Jobs()
        self.board = DeviceBoard(settings.queues, settings.queue_weights)
        self.stop_event = asyncio.Event()
        self.started_at = utcnow()
        self._background: dict[str, asyncio.Task[Any]] = {}

    # -- building and wiring -------------------------------------------------------------
    def _build(self) -> None:
        """Build every part; none subscribes or adds a gate itself (`_wire` does)."""
        s, bus = self.settings, self.bus
        self.redis = connect.redis_async(s)
        self.mongo = connect.mongo_async(s)
        self.db = connect.database(self.mongo)
        self.tasks = TaskStore(self.db)
        self.queue = IntakeQueue(self.redis, s.keys, s.master_id, ReplicaWait.of(s))
        self.groups = self.db[GROUPS]
        self.lease = leader_lease(s, self.redis)  # read by the leader's duties
        self.pool = WorkerPool(s, bus)
        self.dispatcher = Dispatcher(bus, self.board, self.pool, s.queue_max_wait)
        # The leader's sweeps write only while the lease holds its token (its fence).
        self.recovery = Recovery(s, self.redis, self.tasks, RecordStore(self.db), self.lease)
        self.lost_work = LostWork(bus, self.recovery, self.jobs, self.stop_event)
        self.expiry = Expiry(s, bus, self.tasks, self.redis, self.jobs)
        self.benching = Benching(s, bus, self.redis)
        self.alerting = Alerting(s, self.redis)
        self.watches = Watches(s, bus, self.redis, self.pool, self.lease.is_leading)
        self.pausing = Pausing(s, bus, self.redis, self.groups, self.jobs)
        self.delayed = DelayedTasks(s, self.tasks, self.recovery.dead_peers,
                                    self._taken("delayed"))
        self.backpressure = Backpressure(s, bus, Backlog(self.board, self.delayed))
        self.breaker = CircuitBreakerPart(s, bus, self.redis, self.pool.inflight)
        self.drop_rate = DropRate(s, bus, self.redis)
        self.quota = QuotaSignal(s, self.redis, self.jobs, self.pausing.gate)
        self.rate_limits = RateLimits(s, self.redis, self.groups)
        self.queue_caps = QueueCaps(s, bus, self.redis)
        self.adaptive = AdaptiveLimits(s, self.redis, self.rate_limits)
        self.intake = self._intake(self.queue, "intake")
        self.sharing = WorkSharing(s, self.board, self.pool.free_capacity,
                                   self.recovery.live_peers)
        # Only the ready list's intake waits: the memory bound, then the peers' share.
        self.intake.throttles = [self.backpressure, self.sharing]
        self.listener = DeviceFreeListener(self.redis, s.keys.device_free_channel, bus)
        self.checker = LockChecker(self.recovery.locks, self.board.waiting_on_locks, bus,
                                   self.jobs, s.free_check_interval_s)
        self.sweeper = Sweeper(s, self.redis, self.recovery, self._ingest_for, self.lease)
        self.scheduler = Scheduler(s, self.db, self.tasks, self._taken("schedule"),
                                   self.started_at)
        self.held = HeldTasks(s, self.redis, self.tasks, self.board.holds,
                              self._taken("reconcile"))
        self.heartbeat = Heartbeat(self.redis, s, self.report, self.started_at)
        self.identity = MasterIdentity(self.redis, s, self.request_stop)
        self.metering = Metering(s, self.redis)
        self.traces = TaskTraces()  # subscribes to nothing with tracing off
        self.counts = CountKeeper(s, self.redis, self.db, self.lease.is_leading,
                                  self.lease.guard)
        self.retention = Retention(s, self.db, self.lease.is_leading, self.lease)
        self.search_upkeep = SearchUpkeep(s, self.db, self.lease.is_leading)
        if s.master_health_port:
            self.health = HealthServer(s.health_host, s.master_health_port,
                                       master_checks(self), "master")
        self._wire()

    def gates(self) -> list[Gate]:
        """The dispatch gates in the order they are asked; the first that does not say Go
        decides. tests/unit/test_gate_order.py pins the order and shows why."""
        ordered: list[Gate | None] = [
            self.expiry.gate,  # drops what is past its deadline, whoever else would hold it
            self.benching.gate,  # a sick device's task: held before any permit is spent
            self.pausing.gate,  # paused: held before the breaker's probe permits
            self.queue_caps.gate,  # a queue at its cap: held before permits and tokens
            self.breaker.gate,  # may spend a probe permit: after every gate that holds
            self.rate_limits.gate,  # spends rate tokens: last (None without limits)
        ]
        return [gate for gate in ordered if gate is not None]

    def _wire(self) -> None:
        """Subscriptions in this order (handlers of one event run in it), then the gates."""
        self.bus.attach(
            self.dispatcher, self.lost_work, self.expiry, self.benching, self.alerting,
            self.watches, self.pausing, self.backpressure, self.sharing, self.breaker,
            self.drop_rate,
            self.quota, self.queue_caps, self.rate_limits, self.adaptive, self.delayed,
            self.metering, self.checker, self.traces)
        for gate in self.gates():
            self.bus.add_gate(gate)
        # Every part with a loop of its own; each runs until the stop event is set.
        self.loops: dict[str, Loop] = {
            "intake": self.intake, "device-free": self.listener, "lock-check": self.checker,
            "heartbeat": self.heartbeat, "identity": self.identity, "delayed": self.delayed,
            "scheduler": self.scheduler, "reconcile": self.held, "expiry": self.expiry,
            "leader": self.lease,
            "sweeper": self.sweeper,
            "alerts": self.alerting, "watches": self.watches,
            "pausing": self.pausing, "benching": self.benching,
            "backpressure": self.backpressure, "sharing": self.sharing,
            "rate-limits": self.rate_limits,
            "queue-caps": self.queue_caps, "adaptive-limits": self.adaptive,
            "breaker": self.breaker, "drop-rate": self.drop_rate,
            "metrics": self.metering, "counts": self.counts,
            "retention": self.retention, "search-upkeep": self.search_upkeep,
        }
        if self.settings.master_health_port:
            self.loops["health"] = self.health

    def _taken(self, source: str) -> Callable[[list[Task]], None]:
        return lambda tasks: self.bus.emit(TasksTaken(tasks, source))

    def _intake(self, queue: IntakeQueue, source: str) -> Intake:
        return Intake(self.settings, queue, self.tasks, self.groups, self._taken(source),
                      self.delayed.offer, self._count)

    def _ingest_for(self, dead_id: str) -> Callable[[list[Entry]], Awaitable[None]]:
        """Store a dead master's queue items as ours, acknowledging them on its list."""
        return self._intake(IntakeQueue(self.redis, self.settings.keys, dead_id),
                            "recovery").ingest

    async def _count(self, name: str, n: int) -> None:
        await self.redis.hincrby(self.settings.keys.stats, name, n)

    # -- lifecycle -----------------------------------------------------------------------
    async def run(self) -> int:
        s = self.settings
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        self._build()
        try:  # first of all: no other live process runs under our master_id
            claimed = await self._until_ok("master_id claim", self.identity.claim)
        except IdentityTaken as exc:
            logger.error("master refused to start: {}", exc)
            await self.redis.aclose()
            await self.mongo.close()
            return 2
        log_retention = max(s.retention_success_s, s.retention_failed_s)
        # Alive at once: a restart slower than the heartbeat TTL is not taken for a death
        # by another master's sweep.
        if claimed and await self._until_ok("first heartbeat", self.heartbeat.beat) and \
                await self._until_ok("mongo indexes",
                                     lambda: ensure_indexes(self.db, log_retention)):
            logger.info("master {} starting {} worker(s) x {} tasks", s.master_id, s.workers,
                        s.worker_concurrency)
            self.pool.start()
            if await self._until_ok("restore held tasks", self._restore):
                self._start_background()
                await self.stop_event.wait()
        await self._shutdown()
        return 0

    def _start_background(self) -> None:
        self._background = {name: asyncio.create_task(part.run(self.stop_event), name=name)
                            for name, part in self.loops.items()}

    def request_stop(self, why: str = "stop") -> None:
        if not self.stop_event.is_set():
            logger.info("master {} stopping ({})", self.settings.master_id, why)
            self.stop_event.set()
            self.bus.emit(MasterStopping(why))

    async def _restore(self) -> None:
        """Tasks this master held queued when it last stopped or died, and those its
        workers then held that provably were never sent (`return_unsent_attempts`:
        back to pending at once, ours again); one that may have been sent waits for
        its result or its result timeout."""
        me = self.settings.master_id
        inflight = await self.recovery.return_unsent_attempts(
            me, skip_workers={slot.name for slot in self.pool.slots.values()})
        await self.tasks.adopt(inflight.released, me)
        held = await self.tasks.held_by(me, TaskStatus.PENDING)
        if held:
            logger.info("restoring {} queued task(s) held before restart", len(held))
            self.bus.emit(TasksTaken(held, "restore"))

    async def _until_ok(self, what: str, step: Callable[[], Awaitable[Any]]) -> bool:
        """Retry `step` until it succeeds (True) or the master is asked to stop (False)."""
        backoff = Backoff(base_s=0.2, cap_s=5.0)
        while not self.stop_event.is_set():
            try:
                await step()
                backoff.succeeded(what)
                return True
            except IdentityTaken:
                raise
            except Exception as exc:
                await backoff.failed(what, exc, self.stop_event)
        return False

    async def _shutdown(self) -> None:
        grace = self.settings.shutdown_grace_s
        if "intake" in self._background:  # it stores what it has taken, then returns
            await asyncio.wait([self._background["intake"]], timeout=grace)
        self.dispatcher.stop_dispatching()
        try:
            await asyncio.wait_for(self.dispatcher.idle.wait(), grace)
        except TimeoutError:
            logger.warning("{} task(s) still in flight after {}s", self.pool.inflight(), grace)
        # Delayed tasks we hold stay ours in Mongo: a restart loads them again, and
        # once our heartbeat is gone the leader hands them to the others. Releasing
        # them one by one here would make a stop as slow as the heap is large.
        self.delayed.stop()
        await self._hand_back(self.dispatcher.drain())
        await self.pool.stop(grace)
        for task in self._background.values():
            task.cancel()
        await asyncio.gather(*self._background.values(), return_exceptions=True)
        await self.jobs.settle(min(grace, 5.0))
        try:
            await asyncio.wait_for(self.heartbeat.remove(), self.settings.redis_timeout_s)
        except Exception as exc:
            logger.warning("heartbeat not removed: {!r}", exc)
        try:  # a restart under our id need not wait for the claim to lapse
            await asyncio.wait_for(self.identity.release(), self.settings.redis_timeout_s)
        except Exception as exc:
            logger.warning("master_id claim not released: {!r}", exc)
        await self.redis.aclose()
        await self.mongo.close()
        logger.info("master {} stopped", self.settings.master_id)

    async def _hand_back(self, queued: list[Task]) -> None:
        """Queued tasks go back to the ready list for any master; ours in Mongo until then."""
        if not queued:
            return
        ids = [t.id for t in queued]
        try:
            try:
                await self.queue.hand_back(ids)
            except NotReplicated as exc:  # disowned all the same: the orphan sweep
                logger.warning("{}", exc)  # pushes them again if a failover loses them
            await self.tasks.disown(ids, self.settings.master_id)
            logger.info("handed {} queued task(s) back to the ready queue", len(ids))
        except Exception as exc:  # they stay ours in Mongo; a restart restores them
            logger.warning("could not hand back {} task(s): {!r}", len(ids), exc)

    def report(self) -> dict[str, Any]:
        """The parts' own reports, composed: the core's side by side, each protection's
        under its name."""
        report: dict[str, Any] = {"events": dict(self.bus.emitted)}
        for part in (self.pool, self.dispatcher, self.intake, self.metering, self.listener,
                     self.checker, self.delayed, self.scheduler, self.held, self.expiry,
                     self.sweeper, self.traces):
            report.update(part.report())
        report.update({
            "benching": self.benching.report(),
            "pauses": self.pausing.report(),
            "alerts": {**self.alerting.report(), **self.watches.report()},
            "backpressure": {**self.backpressure.report(), **self.sharing.report()},
            "rate_limits": {**self.rate_limits.report(), "adaptive": self.adaptive.report()},
            "queue_caps": self.queue_caps.report(),
            "breaker": {**self.breaker.report(), "drop_rate": self.drop_rate.report(),
                        "quota": self.quota.report()},
        })
        return report

def run(settings: Settings) -> int:
    from sendscript import runtime, tracing

    runtime.setup(settings, "master")
    try:
        return asyncio.run(Master(settings).run())
    finally:
        tracing.shutdown()
