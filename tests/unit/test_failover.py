"""Which Mongo errors a failover explains (sendscript/failover.py), the concerns chosen
per topology (sendscript/connect.py), and riding a step through transient errors."""

from __future__ import annotations

import asyncio

import pytest
from pymongo.errors import (
    AutoReconnect,
    BulkWriteError,
    ConfigurationError,
    DuplicateKeyError,
    NetworkTimeout,
    NotPrimaryError,
    OperationFailure,
    ServerSelectionTimeoutError,
    WriteConcernError,
)

from sendscript import connect
from sendscript.failover import is_transient, ride_out
from sendscript.settings import Settings


@pytest.mark.parametrize("exc", [
    NotPrimaryError("not primary", {"code": 10107}),
    AutoReconnect("connection closed"),
    NetworkTimeout("timed out"),
    ServerSelectionTimeoutError("No primary available for writes"),
    OperationFailure("stepped down", 189),
    OperationFailure("interrupted", 11602),
    OperationFailure("shutting down", 91),
    OperationFailure("majority not yet", 134),
    OperationFailure("labelled", 999, {"errorLabels": ["RetryableWriteError"]}),
    WriteConcernError("waiting for replication timed out", 64, {}),
    BulkWriteError({"writeErrors": [], "writeConcernErrors": [{"code": 64}]}),
    BulkWriteError({"writeErrors": [{"index": 0, "code": 10107}], "writeConcernErrors": []}),
    BulkWriteError({"writeErrors": [{"index": 0, "code": 11000}, {"index": 1, "code": 189}]}),
], ids=repr)
def test_failover_errors_are_transient(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize("exc", [
    DuplicateKeyError("E11000", 11000),
    OperationFailure("bad update", 9),  # FailedToParse: the request's fault
    OperationFailure("unauthorized", 13),
    OperationFailure("too large", 10334),
    BulkWriteError({"writeErrors": [{"index": 0, "code": 11000}], "writeConcernErrors": []}),
    BulkWriteError({"writeErrors": [{"index": 0, "code": 121}]}),  # validation
    ConfigurationError("bad option"),
    ValueError("not a server error"),
    RuntimeError("dedupe keys kept changing hands"),
], ids=repr)
def test_other_errors_are_not(exc: BaseException) -> None:
    assert not is_transient(exc)


@pytest.mark.parametrize(("url", "w", "read", "retry"), [
    ("mongodb://127.0.0.1:27017/", None, None, False),
    ("mongodb://mongo/sendscript?replicaSet=rs0", "majority", "majority", True),
    ("mongodb://a:1,b:2,c:3/sendscript", "majority", "majority", True),
    ("mongodb+srv://cluster.example.com/sendscript", "majority", "majority", True),
    ("mongodb://mongo/?replicaSet=rs0&retryWrites=false", "majority", "majority", None),
])
def test_auto_concerns_follow_the_topology(url: str, w: str | None, read: str | None,
                                           retry: bool | None) -> None:
    concerns = connect.mongo_concerns(url)
    assert (concerns.w, concerns.read_concern, concerns.retry_writes) == (w, read, retry)
    assert concerns.journal


def test_explicit_concerns_win() -> None:
    one = connect.mongo_concerns("mongodb://mongo/?replicaSet=rs0", "1", "local", False)
    assert (one.w, one.read_concern, one.journal) == (1, "local", False)
    assert connect.mongo_concerns("mongodb://mongo/", "majority", "majority").kwargs() == {
        "w": "majority", "journal": True, "readConcernLevel": "majority",
        "retryWrites": False}


def test_the_settings_reach_the_client() -> None:
    client = connect.mongo_sync(Settings(mongo_url="mongodb://127.0.0.1:1/?replicaSet=rs0"))
    try:
        assert client.write_concern.document == {"w": "majority", "j": True}
        assert client.read_concern.level == "majority"
    finally:
        client.close()
    client = connect.mongo_sync(Settings(mongo_url="mongodb://127.0.0.1:1/",
                                         mongo_journal=False))
    try:
        assert client.write_concern.document == {}  # the server's default, as before
    finally:
        client.close()


@pytest.mark.parametrize("bad", ["two", "-1", "majority;j"])
def test_a_write_concern_no_server_knows_is_refused_at_start(bad: str) -> None:
    with pytest.raises(ValueError, match="mongo_write_concern"):
        Settings(mongo_write_concern=bad)


def test_ride_out_retries_transient_errors_then_answers() -> None:
    calls: list[int] = []

    async def step() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise NotPrimaryError("not primary", {"code": 10107})
        return "done"

    assert asyncio.run(ride_out(step, 5.0, base_s=0.001, log=None)) == "done"
    assert len(calls) == 3


def test_ride_out_raises_other_errors_at_once_and_transient_ones_past_the_window() -> None:
    calls: list[int] = []

    async def refused() -> None:
        calls.append(1)
        raise DuplicateKeyError("E11000", 11000)

    with pytest.raises(DuplicateKeyError):
        asyncio.run(ride_out(refused, 5.0, base_s=0.001, log=None))
    assert len(calls) == 1

    async def down() -> None:
        calls.append(1)
        raise AutoReconnect("connection refused")

    with pytest.raises(AutoReconnect):
        asyncio.run(ride_out(down, 0.05, base_s=0.001, cap_s=0.01, log=None))
    assert len(calls) > 2
