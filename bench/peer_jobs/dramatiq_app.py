"""The job as a Dramatiq actor (Redis broker).

    dramatiq bench.peer_jobs.dramatiq_app -p 2 -t 8
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from bench.peer_jobs.job import run_job

broker = RedisBroker(url=os.environ.get("PEER_REDIS_URL", "redis://127.0.0.1:6379/0"),
                     namespace="peers-dramatiq")
dramatiq.set_broker(broker)


@dramatiq.actor(max_retries=3, queue_name="peers")
def run(task_id: str, device_id: str, n: int) -> None:
    run_job(task_id, device_id, n)
