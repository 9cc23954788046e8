"""The job as a Celery task (Redis broker, no result backend).

    celery -A bench.peer_jobs.celery_app worker -P prefork -c 2
"""

from __future__ import annotations

import os

from celery import Celery

from bench.peer_jobs.job import run_job

app = Celery("peers", broker=os.environ.get("PEER_REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(task_ignore_result=True, worker_prefetch_multiplier=4, task_acks_late=True,
                broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)


@app.task(name="peers.run")
def run(task_id: str, device_id: str, n: int) -> None:
    run_job(task_id, device_id, n)
