"""The task-log consumer: applies device results from Pulsar and frees devices.

Shared subscription, messages taken in batches. For a batch: validate each
message (a bad one goes to the dead-letter topic with its reason, then is
acked), save every log, apply SUCCESS / ERROR / SYSTEM_ERROR to the task and its
exec record by compare-and-set, then release the device locks of the results by
fence (newest fence per device) and publish device-free events, then ack. A log
the store refuses for what it is (a value BSON cannot hold, a document over the
size limit) is dead-lettered like a malformed one and the rest of its batch goes
on; only a failure retrying can cure (a server down or slow) negatively
acknowledges the batch. Applying a redelivered message again changes nothing,
because every write is a CAS or an insert keyed by the log's identity.

The pure rules (parsing, log documents, dead letters, result writes) are in
`consumers/rules.py`; the subscription and its way past the embedded broker's
refusals in `consumers/subscription.py`. This module is the runtime: the loop,
heartbeats, counters, stopping.

Every wait of the consumer ends when it is told to stop: connecting, subscribing,
backing off, and a batch in flight gets the shutdown grace, then is abandoned
(unacknowledged, so redelivered).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import time
from collections.abc import Awaitable, Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any, TypeVar

import pulsar
import pulsar.asyncio as apulsar
from loguru import logger
from pymongo.errors import BulkWriteError

from consumers.rules import (
    BatchResult,
    dead_letter_payload,
    log_document,
    parse_message,
    result_updates,
    safe_text,
)
from consumers.subscription import ClientSignals, Subscriber
from consumers.traces import result_spans
from sendscript import connect, device_health, fleet, metrics, roundtrips, tracing
from sendscript.backoff import Backoff, stopped_within
from sendscript.failover import ride_out
from sendscript.health import start_health
from sendscript.heartbeat import add_beat
from sendscript.locks import DeviceLocks
from sendscript.models import (
    RESULT_TYPES,
    LogType,
    TaskLogMessage,
    utcnow,
)
from sendscript.pulsar_log import pulsar_logger
from sendscript.queue import push_refs
from sendscript.refusals import (
    permanent_write_errors,
    transient_write_errors,
)
from sendscript.replicas import NotReplicated, ReplicaWait
from sendscript.settings import Settings
from sendscript.store import DEVICES, LogStore, RecordStore, TaskStore

T = TypeVar("T")


class TaskLogConsumer:
    def __init__(self, settings: Settings) -> None:
        settings.require("redis_url", "mongo_url", "pulsar_url")
        self.settings = settings
        self.stop_event = asyncio.Event()
        self.totals = BatchResult()
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        # The name the broker knows this consumer by: unique, so that a dead one's
        # leftovers are never mistaken for ours.
        self.consumer_name = f"sendscript-{self.name}-{secrets.token_hex(3)}"
        self.backoff = Backoff(base_s=0.2, cap_s=5.0)
        self.subscriber = Subscriber(settings, self.consumer_name)
        self._stop_at: float | None = None
        self.metrics = metrics.setup("consumer", self.name)
        self.subscribed = False
        self.fleet_written = fleet.WrittenThisHour()
        self.fleet_held = fleet.FleetBuffer(settings.fleet_write_interval_s)
        self.fleet_lock = asyncio.Lock()  # one write at a time: a device's last result last

    async def run(self) -> int:
        s = self.settings
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        self.redis = connect.redis_async(s)
        self.mongo = connect.mongo_async(s)
        db = connect.database(self.mongo)
        self.tasks, self.records, self.logs = TaskStore(db), RecordStore(db), LogStore(db)
        self.devices = db[DEVICES]
        self.locks = DeviceLocks(self.redis, s.keys)
        health = start_health(self)  # /healthz, /readyz when a port is set
        backoff = Backoff(base_s=0.5, cap_s=10.0)
        while not self.stop_event.is_set():
            try:
                refused = await self._consume()
            except Exception as exc:
                await backoff.failed("consumer: pulsar", exc, stop=self.stop_event)
                continue
            backoff.succeeded("consumer: pulsar")
            if refused:
                self.subscriber.next_slot()
                await stopped_within(self.stop_event, 0.2)
        await self._close()
        await health.stop()
        logger.info("consumer stopped: {}", self.totals)
        return 0

    def request_stop(self, why: str = "stop") -> None:
        if not self.stop_event.is_set():
            logger.info("consumer stopping ({})", why)
            self._stop_at = time.monotonic()
            self.stop_event.set()

    def _left_s(self, at_least: float = 0.2) -> float:
        """Seconds left of the shutdown grace (all of the timeout before a stop)."""
        if self._stop_at is None:
            return self.settings.pulsar_timeout_s
        left = self._stop_at + self.settings.shutdown_grace_s - time.monotonic()
        return max(at_least, min(left, self.settings.pulsar_timeout_s))

    async def _until_stopped(self, aw: Awaitable[T], timeout_s: float,
                             *also: asyncio.Event) -> T | None:
        """What `aw` gives; None if the consumer is told to stop (or an event of `also`
        is set) first; TimeoutError after `timeout_s`. `aw` is cancelled if it lost."""
        task = asyncio.ensure_future(aw)
        waiters = [asyncio.ensure_future(e.wait()) for e in (self.stop_event, *also)]
        try:
            done, _ = await asyncio.wait([task, *waiters], timeout=timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if task in done:
            return task.result()
        task.cancel()
        if done:
            return None
        raise TimeoutError(f"no answer within {timeout_s:.0f}s")

    async def _quietly(self, aw: Awaitable[Any], what: str) -> None:
        """Wait for a closing call within what is left of the grace; its failure is
        only logged (what it closes is gone either way)."""
        try:
            await asyncio.wait_for(aw, self._left_s())
        except Exception as exc:
            logger.debug("consumer: {} failed: {!r}", what, exc)

    async def _consume(self) -> bool:
        """One client: subscribe, consume until stopped or failed. True if the broker
        refused the subscription (the next try takes another consumer id)."""
        s = self.settings
        signals = ClientSignals(asyncio.get_running_loop())
        # A fresh client per try: a client left retrying a refused or lost
        # subscription on its own would hold connections and consumers we no
        # longer know of.
        client = apulsar.Client(
            s.pulsar_url, **connect.pulsar_kwargs(s),
            logger=pulsar_logger("consumer", signals),
        )
        try:
            consumer = await self._until_stopped(self.subscriber.subscribe(client),
                                                 s.pulsar_timeout_s, signals.refused)
            if consumer is None:
                return signals.refused.is_set() and not self.stop_event.is_set()
            try:
                dlq = await self._until_stopped(client.create_producer(s.dlq_topic),
                                                s.pulsar_timeout_s)
                if dlq is None:
                    return False
                self.dlq = dlq
                logger.info("consuming {} as {} ({}, consumer id {})", s.task_log_topic,
                            s.task_log_subscription, self.consumer_name,
                            self.subscriber.slot)
                self.subscribed = True
                await self._loop(consumer)
            finally:
                self.subscribed = False
                await self._quietly(consumer.close(), "closing the consumer")
            return False
        finally:
            await self._quietly(client.close(), "closing the Pulsar client")

    async def _close(self) -> None:
        """Flush and close within what is left of the grace, whatever is down."""
        await self._quietly(self._write_fleet(), "writing the fleet view")
        await self._quietly(self._flush_counters(), "flushing counters")
        await self._quietly(self.redis.hdel(self.settings.keys.consumers, self.name),
                            "removing the heartbeat")
        await self._quietly(self.redis.aclose(), "closing Redis")
        await self._quietly(self.mongo.close(), "closing Mongo")

    async def _loop(self, consumer: apulsar.Consumer) -> None:
        """Receive continuously into a buffer; process what has arrived as one batch.
        The buffer holds one batch: receiving beyond it would only take messages
        from other consumers and leave more unacknowledged if this one dies."""
        buffer: asyncio.Queue[pulsar.Message] = asyncio.Queue(self.settings.consumer_batch)
        receiver = asyncio.create_task(self._receive(consumer, buffer))
        flusher = asyncio.create_task(self._flush_counters_forever())
        fleet_writer = asyncio.create_task(self._write_fleet_forever())
        stop = asyncio.create_task(self.stop_event.wait())
        try:
            while not self.stop_event.is_set():
                first = asyncio.create_task(buffer.get())
                await asyncio.wait([first, stop, receiver], return_when=asyncio.FIRST_COMPLETED)
                if receiver.done():
                    first.cancel()
                    receiver.result()  # re-raise why receiving stopped
                if not first.done():
                    first.cancel()
                    break
                batch = [first.result()]
                await asyncio.sleep(self.settings.consumer_batch_wait_ms / 1000)
                while len(batch) < self.settings.consumer_batch and not buffer.empty():
                    batch.append(buffer.get_nowait())
                await self._process_within_grace(consumer, batch, stop)
        finally:
            for task in (receiver, flusher, fleet_writer, stop):
                task.cancel()

    async def _process_within_grace(self, consumer: apulsar.Consumer,
                                    batch: list[pulsar.Message], stop: asyncio.Task) -> None:
        """Process a batch; told to stop meanwhile, give it the shutdown grace (less a
        little to close with), then abandon it: unacknowledged, it is redelivered."""
        work = asyncio.create_task(self._process_with_nack(consumer, batch))
        await asyncio.wait([work, stop], return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            work.result()
            return
        grace = self.settings.shutdown_grace_s
        done, _ = await asyncio.wait([work], timeout=max(0.0, grace - min(5.0, grace / 3)))
        if work in done:
            work.result()
            return
        work.cancel()
        logger.warning("consumer: a batch of {} task logs did not finish within the shutdown "
                       "grace; left unacknowledged, it will be delivered again", len(batch))

    async def _receive(self, consumer: apulsar.Consumer,
                       buffer: asyncio.Queue[pulsar.Message]) -> None:
        while True:
            message = await consumer.receive()
            await buffer.put(message)

    async def _process_with_nack(self, consumer: apulsar.Consumer,
                                 batch: list[pulsar.Message]) -> None:
        what = "consumer: apply task logs (batches negatively acked)"
        try:
            # Through a Mongo failover the batch is applied again in place rather than
            # negatively acknowledged: a redelivery would count towards the client's
            # dead-letter policy, and a result dead-lettered by a failover would cost
            # its task an attempt. Applying again is safe (logs by id, compare-and-
            # sets), and every Mongo step comes before the batch's Redis and Pulsar ones.
            result = await ride_out(lambda: self.process(batch),
                                    self.settings.mongo_failover_s)
        except Exception as exc:
            for msg in batch:
                await consumer.negative_acknowledge(msg)
            # Redelivery comes back soon; wait longer each time a server stays away.
            await self.backoff.failed(what, exc, stop=self.stop_event)
            return
        self.backoff.succeeded(what)
        for msg in batch:
            await consumer.acknowledge(msg)
        self._add(result)

    async def process(self, batch: Sequence[pulsar.Message]) -> BatchResult:
        """Apply one batch. Raises if a failure retrying can cure happened; then
        nothing is acked. A log refused for what it is goes to the dead letters."""
        now = utcnow()
        started_ns = time.time_ns() if tracing.ON else 0
        result = BatchResult()
        good: list[tuple[pulsar.Message, TaskLogMessage, dict[str, Any]]] = []
        refused: list[tuple[pulsar.Message, str]] = []
        for msg in batch:
            try:
                parsed = parse_message(msg.data())
                doc = log_document(parsed, now, self.settings.task_log_max_message_chars)
            except ValueError as exc:
                refused.append((msg, str(exc)))
                continue
            good.append((msg, parsed, doc))
        if good:
            result.saved, records, store_refused = await self._save(good)
            refused += [(good[i][0], reason) for i, reason in store_refused.items()]
            kept = [m for i, (_, m, _) in enumerate(good) if i not in store_refused]
            await self._apply([m for m in kept if m.log_type in RESULT_TYPES], records, now,
                              result)
            if tracing.ON:
                result_spans(good, store_refused, records, started_ns)
        for msg, reason in refused:
            await self._dead_letter(msg, reason)
        result.dead_lettered = len(refused)
        if refused:
            await self.redis.hincrby(self.settings.keys.stats, "dead_lettered", len(refused))
        if result.unknown_records:
            logger.warning("results for unknown exec records (saved, not applied): {}",
                           result.unknown_records[:10])
        return result

    async def _save(self, good: Sequence[tuple[pulsar.Message, TaskLogMessage, dict[str, Any]]]
                    ) -> tuple[int, dict[str, Any], dict[int, str]]:
        """Insert the logs and read the exec records of the results, together. How many
        logs are new, the records, and index -> reason of the logs the store refused."""
        finals = {m.record_id for _, m, _ in good if m.log_type in RESULT_TYPES}
        saved, records = await asyncio.gather(
            self.logs.insert_many([doc for _, _, doc in good]),
            self.records.find_many(finals),
            return_exceptions=True,
        )
        if isinstance(records, BaseException):
            raise records
        if not isinstance(saved, BaseException):
            return saved, records, {}
        if not isinstance(saved, BulkWriteError) or transient_write_errors(saved):
            raise saved
        store_refused = permanent_write_errors(saved)
        return int(saved.details.get("nInserted", 0)), records, store_refused

    async def _apply(self, finals: Sequence[TaskLogMessage], records: dict[str, Any],
                     now: datetime, result: BatchResult) -> None:
        """Apply the results to tasks and exec records, then free their devices."""
        if not finals:
            return
        result.unknown_records = [m.record_id for m in finals if m.record_id not in records]
        failed_tasks = {records[m.record_id].task_id for m in finals
                        if m.record_id in records and m.log_type != LogType.SUCCESS}
        tasks = await self.tasks.retry_fields(failed_tasks)
        writes = result_updates(finals, records, tasks, self.settings, now)
        # The exec records first, then the tasks: a task's status is what its readers
        # wait on, so once it says done its record says so too. A crash between the
        # two leaves the tasks to the redelivery (a record's CAS then matches nothing).
        # Results before the devices: freeing a device starts its next task, and a task
        # its dead worker left pending must be marked done before that, or it would be
        # sent again. A crash between the two leaves the locks to the redelivery (or
        # the orphan-lock sweep).
        await self.records.run_updates(writes.records)
        result.applied, _ = await asyncio.gather(
            self.tasks.run_updates(writes.successes()),
            self._keep_fleet(finals, records, now),
        )
        succeeded = result.applied
        retries = []
        for index, task_id, retry in writes.failures:
            if await self.tasks.cas(*writes.tasks[index]):
                result.applied += 1
                if retry:
                    retries.append(task_id)
        # Streaks, benches and late results, one Redis call for the batch; before the
        # devices are freed, so a device benched now gets no next task meanwhile.
        metrics.observe_results(self.metrics, finals, records, now, succeeded=succeeded,
                                failed=result.applied - succeeded - len(retries),
                                retried=len(retries))
        await device_health.record_results(self.redis, self.settings, finals, records, now)
        result.released = await self.locks.release_many(writes.releases)
        if retries:  # any master takes them and fires them at their time
            try:
                await push_refs(self.redis, self.settings.keys.ready, retries,
                                ReplicaWait.of(self.settings))
            except NotReplicated as exc:  # retry_waiting in Mongo: the masters'
                logger.warning("{}", exc)  # delayed loader claims them if it is lost
            result.retries += len(retries)

    async def _keep_fleet(self, finals: Sequence[TaskLogMessage], records: dict[str, Any],
                          now: datetime) -> None:
        """The devices' last results and hourly counts (sendscript/fleet.py): held, and
        written with the results of the last few seconds (`FleetBuffer`) by the timer,
        not here: a batch that paid for seconds of results would hold its devices'
        locks that much longer. With no interval, written with each batch."""
        self.fleet_held.add(fleet.device_results(finals, records), now, time.monotonic())
        if self.fleet_held.interval_s <= 0 and self.fleet_held.due(time.monotonic()):
            await self._write_fleet()

    async def _write_fleet(self) -> None:
        """The held results: one bulk write (one an hour they span) and one ZADD. A
        view, not a decision: a failure here is logged, not a reason to deliver a batch
        again (its tasks are applied), and the view misses those results."""
        async with self.fleet_lock:
            for at, results in self.fleet_held.take():
                try:
                    await asyncio.gather(
                        fleet.write_results(self.devices, results, at, self.fleet_written),
                        fleet.note(self.redis, self.settings.keys,
                                   [r.device_id for r in results]))
                except Exception as exc:
                    logger.warning("consumer: the fleet view missed {} results: {!r}",
                                   len(results), exc)

    async def _write_fleet_forever(self) -> None:
        """Write what is held once it is due (or too much is held)."""
        while True:
            await asyncio.sleep(min(0.5, self.fleet_held.interval_s) or 0.5)
            if self.fleet_held.due(time.monotonic()):
                await self._write_fleet()

    async def _dead_letter(self, msg: pulsar.Message, reason: str) -> None:
        data = msg.data()
        payload = dead_letter_payload(data, reason, str(msg.message_id()), msg.topic_name())
        await self.dlq.send(payload, properties={"reason": safe_text(reason)[:500]})
        logger.warning("dead-lettered task log {!r}: {}", data[:200], safe_text(reason))

    def _add(self, r: BatchResult) -> None:
        t = self.totals
        t.saved += r.saved
        t.applied += r.applied
        t.dead_lettered += r.dead_lettered
        t.released += r.released
        t.retries += r.retries
        metrics.add_batch(self.metrics, r.saved, r.dead_lettered)

    async def _flush_counters_forever(self) -> None:
        while True:
            await self._beat()
            await self._flush_counters()
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def _beat(self) -> None:
        keys, now = self.settings.keys, utcnow().isoformat()
        status = {"name": self.name, "updated_at": now, **asdict(self.totals)}
        status.pop("unknown_records", None)
        try:
            pipe = self.redis.pipeline(transaction=False)
            add_beat(pipe, keys.consumers, self.name, keys.consumer_alive(self.name), status,
                     self.settings.heartbeat_ttl_s)
            await pipe.execute()
            await metrics.beat(self.metrics, self.redis, f"{self.settings.keys.prefix}:metrics")
        except Exception as exc:
            logger.debug("consumer heartbeat failed: {!r}", exc)

    async def _flush_counters(self) -> None:
        try:
            await roundtrips.flush(self.redis, self.settings.keys.roundtrips, "consumer")
        except Exception as exc:
            logger.debug("round-trip counters not flushed: {!r}", exc)


def run(settings: Settings) -> int:
    from sendscript import runtime

    runtime.setup(settings, "consumer")
    try:
        return asyncio.run(TaskLogConsumer(settings).run())
    finally:
        tracing.shutdown()
