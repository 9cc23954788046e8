"""Client options chosen from the Mongo URL (sendscript/connect.py)."""

from __future__ import annotations

import pytest

from sendscript import connect
from sendscript.settings import Settings


@pytest.mark.parametrize(("url", "expected"), [
    ("mongodb://127.0.0.1:27017/", False),  # standalone or embedded: no retryable writes
    ("mongodb://mongo/sendscript", False),
    ("mongodb://a:1,b:2/sendscript", True),  # several hosts: a replica set
    ("mongodb://mongo/sendscript?replicaSet=rs0", True),
    ("mongodb+srv://cluster.example.com/sendscript", True),
    ("mongodb://mongo/?retryWrites=true", None),  # the URL says: the driver reads it
    ("mongodb://mongo/?retrywrites=false", None),
])
def test_retry_writes_follow_the_url(url: str, expected: bool | None) -> None:
    assert connect.retry_writes(url) is expected


def test_a_standalone_client_sends_no_retryable_writes() -> None:
    client = connect.mongo_sync(Settings(mongo_url="mongodb://127.0.0.1:1/"))
    try:
        assert client.options.retry_writes is False
    finally:
        client.close()


def test_a_replica_set_client_keeps_them() -> None:
    client = connect.mongo_sync(Settings(mongo_url="mongodb://127.0.0.1:1/?replicaSet=rs0"))
    try:
        assert client.options.retry_writes is True
    finally:
        client.close()
