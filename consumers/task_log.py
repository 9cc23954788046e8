"""The task-log consumer: applies device results from Pulsar and frees devices.

Shared subscription, messages taken in batches. For a batch: validate each
message (a bad one goes to the dead-letter topic with its reason, then is
acked), save every log, release the device locks of the results by fence (newest
fence per device) and publish device-free events, apply SUCCESS / ERROR /
SYSTEM_ERROR to the task and its exec record by compare-and-set, then ack. Any
failure before the acks negatively acknowledges the batch; applying a redelivered
message again changes nothing, because every write is a CAS or an insert keyed by
the log's identity.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import pulsar
import pulsar.asyncio as apulsar
from loguru import logger
from pydantic import ValidationError

from sendscript import connect, roundtrips
from sendscript.backoff import Backoff
from sendscript.locks import DeviceLocks
from sendscript.models import (
    RESULT_TYPES,
    LogType,
    TaskLogMessage,
    describe_error,
    parse_json_object,
    utcnow,
)
from sendscript.pulsar_log import pulsar_logger
from sendscript.retry import Decision, decide, failure_cas, log_retryable
from sendscript.settings import Settings
from sendscript.status import RecordStatus, TaskStatus, record_cas, task_cas
from sendscript.store import LogStore, RecordStore, TaskStore

# A result for attempt k applies while the task is still on attempt k. SUCCESS
# also applies to a task put back after its worker died mid-send: the device did
# run it, so running it again would be the mistake.
APPLIES_TO = {
    LogType.SUCCESS: frozenset({TaskStatus.RUNNING, TaskStatus.SENT, TaskStatus.PENDING,
                                TaskStatus.RETRY_WAITING}),
    LogType.ERROR: frozenset({TaskStatus.RUNNING, TaskStatus.SENT}),
    LogType.SYSTEM_ERROR: frozenset({TaskStatus.RUNNING, TaskStatus.SENT}),
}
OPEN_RECORD = frozenset({RecordStatus.RUNNING, RecordStatus.SENT})


def parse_message(data: bytes) -> TaskLogMessage:
    """A task-log message, or ValueError with the reason it is refused."""
    obj = parse_json_object(data)
    try:
        return TaskLogMessage.model_validate(obj)
    except ValidationError as exc:
        raise ValueError(describe_error(exc)) from None


@dataclass
class BatchResult:
    saved: int = 0
    applied: int = 0
    dead_lettered: int = 0
    released: int = 0
    retries: int = 0
    unknown_records: list[str] = field(default_factory=list)


@dataclass
class ResultWrites:
    """What a batch of result logs changes."""

    tasks: list[tuple[dict, dict]] = field(default_factory=list)  # in message order
    # Which of `tasks` end a failed attempt: (index, task id, waits for a retry). They
    # are applied one by one, so a retry is queued only where the task did move.
    failures: list[tuple[int, str, bool]] = field(default_factory=list)
    records: list[tuple[dict, dict]] = field(default_factory=list)
    releases: list[tuple[str, int]] = field(default_factory=list)

    @property
    def retries(self) -> list[str]:
        """Tasks to queue for a retry, if their update applies."""
        return [task_id for _, task_id, retry in self.failures if retry]

    def successes(self) -> list[tuple[dict, dict]]:
        failed = {i for i, _, _ in self.failures}
        return [u for i, u in enumerate(self.tasks) if i not in failed]


def result_updates(
    results: Sequence[TaskLogMessage],
    records: dict[str, Any],
    tasks: dict[str, dict[str, Any]],
    settings: Settings,
    now: datetime,
) -> ResultWrites:
    """CAS updates for tasks and records, locks to release and retries, for result logs.

    `tasks` holds the retry fields (max_retries, queue, retry_base_s) of the tasks
    with a failed result; a task missing there is failed without a retry.
    """
    out = ResultWrites()
    for msg in results:
        record = records.get(msg.record_id)
        if record is None:
            continue
        out.releases.append((record.device_id, record.lock_value))
        if msg.log_type == LogType.SUCCESS:
            out.tasks.append(task_cas(record.task_id, APPLIES_TO[msg.log_type],
                                      TaskStatus.SUCCESS, now, attempt=record.attempt))
            out.records.append(record_cas(msg.record_id, OPEN_RECORD, RecordStatus.SUCCESS, now))
            continue
        error = f"{msg.log_type}{f' [{msg.code}]' if msg.code else ''}: {msg.message}"[:1000]
        task = tasks.get(record.task_id)
        if task is None:
            decision = Decision(False, error)
        else:
            policy = settings.retry_policy(task.get("max_retries", 0),
                                           task.get("queue", "default"),
                                           task.get("retry_base_s"))
            retryable = log_retryable(msg.log_type, msg.code, settings.final_error_codes)
            decision = decide(policy, record.attempt, retryable, error, now)
        out.failures.append((len(out.tasks), record.task_id, decision.retry))
        out.tasks.append(failure_cas(record.task_id, APPLIES_TO[msg.log_type], record.attempt,
                                     decision, now))
        out.records.append(record_cas(msg.record_id, OPEN_RECORD, RecordStatus.FAILED, now,
                                      set_={"error": error}))
    return out


class TaskLogConsumer:
    def __init__(self, settings: Settings) -> None:
        settings.require("redis_url", "mongo_url", "pulsar_url")
        self.settings = settings
        self.stop_event = asyncio.Event()
        self.totals = BatchResult()
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.backoff = Backoff(base_s=0.2, cap_s=5.0)

    async def run(self) -> int:
        s = self.settings
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        self.redis = connect.redis_async(s)
        self.mongo = connect.mongo_async(s)
        db = connect.database(self.mongo)
        self.tasks, self.records, self.logs = TaskStore(db), RecordStore(db), LogStore(db)
        self.locks = DeviceLocks(self.redis, s.keys)
        backoff = Backoff(base_s=0.5, cap_s=10.0)
        while not self.stop_event.is_set():
            try:
                await self._consume()
                backoff.succeeded("pulsar")
            except Exception as exc:
                await backoff.failed("pulsar", exc)
        await self._flush_counters()
        try:
            await self.redis.hdel(self.settings.keys.consumers, self.name)
        except Exception:
            pass
        await self.redis.aclose()
        await self.mongo.close()
        logger.info("consumer stopped: {}", self.totals)
        return 0

    def request_stop(self, why: str = "stop") -> None:
        if not self.stop_event.is_set():
            logger.info("consumer stopping ({})", why)
            self.stop_event.set()

    async def _consume(self) -> None:
        s = self.settings
        client = apulsar.Client(
            s.pulsar_url,
            operation_timeout_seconds=int(s.pulsar_timeout_s),
            connection_timeout_ms=int(s.pulsar_timeout_s * 1000),
            logger=pulsar_logger("consumer"),
        )
        try:
            consumer = await client.subscribe(
                s.task_log_topic, s.task_log_subscription,
                consumer_type=pulsar.ConsumerType.Shared,
                negative_ack_redelivery_delay_ms=s.consumer_nack_delay_ms,
                initial_position=pulsar.InitialPosition.Earliest,
                receiver_queue_size=max(1000, s.consumer_batch * 2),
            )
            self.dlq = await client.create_producer(s.dlq_topic)
            logger.info("consuming {} as {}", s.task_log_topic, s.task_log_subscription)
            await self._loop(consumer)
            await consumer.close()
        finally:
            await client.close()

    async def _loop(self, consumer: apulsar.Consumer) -> None:
        """Receive continuously into a buffer; process what has arrived as one batch."""
        buffer: asyncio.Queue[pulsar.Message] = asyncio.Queue()
        receiver = asyncio.create_task(self._receive(consumer, buffer))
        flusher = asyncio.create_task(self._flush_counters_forever())
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
                await self._process_with_nack(consumer, batch)
        finally:
            for task in (receiver, flusher, stop):
                task.cancel()

    async def _receive(self, consumer: apulsar.Consumer,
                       buffer: asyncio.Queue[pulsar.Message]) -> None:
        while True:
            buffer.put_nowait(await consumer.receive())

    async def _process_with_nack(self, consumer: apulsar.Consumer,
                                 batch: list[pulsar.Message]) -> None:
        try:
            result = await self.process(batch)
        except Exception as exc:
            for msg in batch:
                await consumer.negative_acknowledge(msg)
            # Redelivery comes back soon; wait longer each time a server stays away.
            await self.backoff.failed("consumer: apply task logs (batches negatively acked)",
                                      exc)
            return
        self.backoff.succeeded("consumer: apply task logs (batches negatively acked)")
        for msg in batch:
            await consumer.acknowledge(msg)
        self._add(result)

    async def process(self, batch: Sequence[pulsar.Message]) -> BatchResult:
        """Apply one batch. Raises if anything failed; then nothing is acked."""
        now = utcnow()
        result = BatchResult()
        good: list[TaskLogMessage] = []
        for msg in batch:
            try:
                good.append(parse_message(msg.data()))
            except ValueError as exc:
                await self._dead_letter(msg, str(exc))
                result.dead_lettered += 1
        if result.dead_lettered:
            await self.redis.hincrby(self.settings.keys.stats, "dead_lettered",
                                     result.dead_lettered)
        if not good:
            return result
        finals = [m for m in good if m.log_type in RESULT_TYPES]
        result.saved, records = await asyncio.gather(
            self.logs.insert_many([m.to_doc(now) for m in good]),
            self.records.find_many({m.record_id for m in finals}),
        )
        if finals:
            result.unknown_records = [m.record_id for m in finals if m.record_id not in records]
            failed_tasks = {records[m.record_id].task_id for m in finals
                            if m.record_id in records and m.log_type != LogType.SUCCESS}
            tasks = await self.tasks.retry_fields(failed_tasks)
            writes = result_updates(finals, records, tasks, self.settings, now)
            # The device has finished: free it first, so its next task starts while
            # we write. A crash before the writes leaves them to the redelivery.
            result.released = await self.locks.release_many(writes.releases)
            result.applied, _ = await asyncio.gather(
                self.tasks.run_updates(writes.successes()),
                self.records.run_updates(writes.records),
            )
            retries = []
            for index, task_id, retry in writes.failures:
                if await self.tasks.cas(*writes.tasks[index]):
                    result.applied += 1
                    if retry:
                        retries.append(task_id)
            if retries:  # any master takes them and fires them at their time
                await self.redis.lpush(self.settings.keys.ready,
                                       *[json.dumps({"task_id": t}) for t in retries])
                result.retries += len(retries)
        if result.unknown_records:
            logger.warning("results for unknown exec records (saved, not applied): {}",
                           result.unknown_records[:10])
        return result

    async def _dead_letter(self, msg: pulsar.Message, reason: str) -> None:
        data = msg.data()
        payload = {
            "reason": reason,
            "data": data.decode("utf-8", "replace"),
            "message_id": str(msg.message_id()),
            "topic": msg.topic_name(),
        }
        await self.dlq.send(json.dumps(payload).encode(), properties={"reason": reason[:500]})
        logger.warning("dead-lettered task log {!r}: {}", data[:200], reason)

    def _add(self, r: BatchResult) -> None:
        t = self.totals
        t.saved += r.saved
        t.applied += r.applied
        t.dead_lettered += r.dead_lettered
        t.released += r.released
        t.retries += r.retries

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
            pipe.hset(keys.consumers, self.name, json.dumps(status))
            pipe.set(keys.consumer_alive(self.name), now,
                     px=int(self.settings.heartbeat_ttl_s * 1000))
            await pipe.execute()
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
    return asyncio.run(TaskLogConsumer(settings).run())
