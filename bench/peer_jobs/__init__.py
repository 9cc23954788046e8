"""The reference job written plainly for peer task queues (Celery, Dramatiq, plain
processes), for `python -m bench.peers`: lock the device, 8 document writes (the
task and its exec record through their states, the log), POST to central-control,
free the device."""
