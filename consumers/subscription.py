"""The task-log subscription, and how it gets past the embedded broker's refusals.

pulsar-lite (the embedded broker) keys a subscription's consumers by the id the
client gives them and keeps the consumer of a connection that ended with a reset
until it restarts; it then refuses a new consumer under that id, saying so only by
dropping the connection. `ClientSignals` hears the refusal in the client's own log;
`Subscriber` subscribes past it by taking another consumer id. A real Pulsar broker
never refuses one so (the slot stays 0)."""

from __future__ import annotations

import asyncio
import logging

import pulsar
import pulsar.asyncio as apulsar
from loguru import logger

from sendscript.settings import Settings

# How the C++ client says the broker refused a consumer it was creating.
REFUSED_CONSUMER = "creating consumer"
# Throw-away readers before the subscription: at most this many (see Subscriber).
MAX_SLOT = 64


class ClientSignals:
    """What one Pulsar client's own log tells the consumer, handed to the event loop.

    pulsar-lite (the embedded broker) refuses a subscription whose consumer id is
    already in the subscription, and says so only by dropping the connection; the
    client then logs "Temporary error in creating consumer" and retries until its
    operation timeout. Seen here, the refusal ends the try at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.refused = asyncio.Event()

    def __call__(self, level: int, message: str) -> None:  # on a client thread
        if level >= logging.WARNING and REFUSED_CONSUMER in message:
            try:
                self.loop.call_soon_threadsafe(self.refused.set)
            except RuntimeError:  # the loop is closed: the process is ending
                pass


class Subscriber:
    """Subscribes the consumer named `consumer_name` to the task-log topic (Shared)."""

    def __init__(self, settings: Settings, consumer_name: str) -> None:
        self.settings = settings
        self.consumer_name = consumer_name
        # How many consumer ids this process skips before its subscription's; grows
        # each time the broker refuses the subscription.
        self.slot = 0

    def next_slot(self) -> None:
        self.slot = (self.slot + 1) % MAX_SLOT
        logger.warning(
            "consumer: the broker refused subscription {!r}; trying again with consumer id "
            "{} (pulsar-lite keeps a consumer whose connection ended with a reset and "
            "refuses any other with its id)", self.settings.task_log_subscription, self.slot)

    def _slot_topic(self) -> str:
        namespace = self.settings.task_log_topic.split("://", 1)[-1].rsplit("/", 1)[0]
        return f"non-persistent://{namespace}/{self.settings.key_prefix}-consumer-slots"

    async def subscribe(self, client: apulsar.Client) -> apulsar.Consumer:
        """Subscribe, first opening and closing `self.slot` throw-away readers.

        pulsar-lite keys a subscription's consumers by the id the client gives
        them, which counts from 0 in every client, and keeps the consumer of a
        connection that ended with a reset (a process killed with deliveries still
        unread in its socket) until it restarts. Each reader takes the next id, so
        after a refusal the next try subscribes under an id no dead consumer holds.
        A real Pulsar broker keys consumers by connection and never refuses one so
        (slot stays 0)."""
        s = self.settings
        for _ in range(self.slot):
            reader = await client.create_reader(self._slot_topic(), pulsar.MessageId.latest)
            await reader.close()
        return await client.subscribe(
            s.task_log_topic, s.task_log_subscription,
            consumer_type=pulsar.ConsumerType.Shared,
            consumer_name=self.consumer_name,
            negative_ack_redelivery_delay_ms=s.consumer_nack_delay_ms,
            initial_position=pulsar.InitialPosition.Earliest,
            # Prefetch half a batch: with the batch in hand and the next one
            # buffered (see the consumer's loop), that is all one consumer holds unacknowledged,
            # which is what waits when it dies (pulsar-lite also keeps delivering
            # up to this many to a consumer it failed to drop).
            receiver_queue_size=max(10, s.consumer_batch // 2),
            # A log no consumer can get past (it is nacked or kills its consumer every
            # time) stops being redelivered: the client sends it to the dead letters.
            dead_letter_policy=pulsar.ConsumerDeadLetterPolicy(
                s.pulsar_max_redeliveries, s.redelivery_dlq_topic,
                f"{s.task_log_subscription}-dlq") if s.pulsar_max_redeliveries else None,
        )
