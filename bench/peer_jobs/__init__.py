"""The seed-003 job written plainly for peer task queues (Celery, Dramatiq, plain
processes), for `python -m bench.peers`: lock the device, the 8 document writes of
seed 003, POST to central-control, free the device."""
