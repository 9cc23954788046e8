"""Mongo failovers: which errors pass with the primary's election, and riding them out.

During a replica-set failover (a step-down, an election, a primary lost) the driver
answers with network errors, "not writable primary", "primary stepped down",
"interrupted due to a replica-set state change" or a server-selection timeout. None
says anything about the write itself: they pass once a primary is elected (seconds).
`is_transient` tells them from errors that do not pass (a duplicate key, a bad
document, a refused command). Pure: it reads only the exception.

An error may come after the server applied a write (the answer was lost, or the
write concern was not met): a transient error leaves the write *unknown*, not
failed. So what is retried here is only what may run twice with the effect of once:
a compare-and-set (the second run matches nothing if the first landed), an insert by
a minted id (the second run finds its own document), a claim whose winner is read
back by its token (sendscript/store.py). `ride_out` retries such a step with backoff
for as long as a failover may take (SENDSCRIPT_MONGO_FAILOVER_S), then gives up with
the last error, as any other failure of that step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    OperationFailure,
    PyMongoError,
    WriteConcernError,
)

from sendscript.backoff import OutageLog, exponential_delay
from sendscript.refusals import TRANSIENT_CODES

T = TypeVar("T")

# Beyond the store's transient codes: what a majority read may answer while a new
# primary has not yet committed in its term.
READ_CONCERN_MAJORITY_NOT_AVAILABLE_YET = 134
FAILOVER_CODES = TRANSIENT_CODES | {READ_CONCERN_MAJORITY_NOT_AVAILABLE_YET}
# Labels a server (or the driver) puts on an error a retry can cure.
TRANSIENT_LABELS = ("RetryableWriteError", "TransientTransactionError",
                    "RetryableError", "NetworkError")


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` is a failover's or an outage's, which a later try can pass."""
    if isinstance(exc, BulkWriteError):
        # Per-document errors and the write concern's: a batch is transient if any
        # part is (a duplicate among them is answered by the retry itself).
        details = exc.details or {}
        if details.get("writeConcernErrors"):
            return True
        return any(e.get("code") in FAILOVER_CODES for e in details.get("writeErrors", []))
    if isinstance(exc, ConnectionFailure):  # network errors, NotPrimaryError, selection
        return True
    if isinstance(exc, WriteConcernError):  # applied maybe, not yet where it was asked
        return True
    if isinstance(exc, PyMongoError) and any(exc.has_error_label(label)
                                             for label in TRANSIENT_LABELS):
        return True
    if isinstance(exc, OperationFailure):
        return exc.code in FAILOVER_CODES
    return False


def describe(exc: BaseException) -> str:
    """One line for a log: the class and, for a server error, its code."""
    code = getattr(exc, "code", None)
    return f"{type(exc).__name__}" + (f" (code {code})" if code is not None else "") + \
        f": {str(exc)[:200]}"


# Said once per outage per process, however many steps ride it out.
FAILOVER_LOG = OutageLog("mongo: transient errors (failover?); steps retried in place")


async def ride_out(step: Callable[[], Awaitable[T]], window_s: float, *,
                   base_s: float = 0.1, cap_s: float = 2.0,
                   log: OutageLog | None = FAILOVER_LOG) -> T:
    """Run `step` (safe to run twice: see the module's doc) until it ends without a
    transient error, for up to `window_s`; the last error past that. A non-transient
    error is raised at once."""
    deadline = time.monotonic() + window_s
    tries = 0
    while True:
        try:
            result = await step()
        except Exception as exc:
            left = deadline - time.monotonic()
            if not is_transient(exc) or left <= 0:
                raise
            tries += 1
            if log is not None:
                log.failed(describe(exc))
            await asyncio.sleep(min(left, exponential_delay(tries, base_s=base_s,
                                                            cap_s=cap_s)))
            continue
        if tries and log is not None:
            log.ok()
        return result
