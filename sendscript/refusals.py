"""Which store errors retrying can cure, and which refuse one document for good.

A document the server (or the BSON encoder) refuses for what it *is* — too
large, a key or value Mongo cannot hold — is a poison pill: retrying its batch
fails the same way forever. Such a document is refused with the reason and the
rest of its batch goes on. Only errors of the *server* (down, timing out, not
primary, shutting down) hold a batch for a retry.

What the servers answer, checked on SecantusDB 0.7 (the embedded server): a
document over 16 MiB is a write error of code 10334 ("object to insert too large.
size in bytes: N, max size: 16777216") and the rest of an unordered batch is
stored; a document failing a collection validator is code 121. Keys with `$` or
dots inside a script are stored as they are (as MongoDB 5+ does). An int beyond 8
bytes, a lone surrogate or a NUL in a key never reaches the server: the BSON
encoder raises for the whole insert_many, hence `encoding_refusal` before a write.
"""

from __future__ import annotations

from typing import Any

import bson
from bson.errors import BSONError
from pymongo.errors import BulkWriteError

MAX_BSON_BYTES = 16 * 1024 * 1024  # MongoDB's document limit
DUPLICATE_KEY = 11000
# Server error codes a later try can succeed after (MongoDB's transient and
# network codes); every other per-document write error is the document's fault.
TRANSIENT_CODES = frozenset({
    6,      # HostUnreachable
    7,      # HostNotFound
    50,     # MaxTimeMSExpired
    64,     # WriteConcernFailed
    89,     # NetworkTimeout
    91,     # ShutdownInProgress
    112,    # WriteConflict
    133,    # FailedToSatisfyReadPreference
    189,    # PrimarySteppedDown
    262,    # ExceededTimeLimit
    9001,   # SocketException
    10107,  # NotWritablePrimary
    11600,  # InterruptedAtShutdown
    11602,  # InterruptedDueToReplStateChange
    13435,  # NotPrimaryNoSecondaryOk
    13436,  # NotPrimaryOrSecondary
})


def encoding_refusal(doc: dict[str, Any], max_bytes: int = MAX_BSON_BYTES) -> str | None:
    """Why `doc` cannot be stored as it is, or None. Checked before a write so that
    one bad document never fails the batch it travels in."""
    try:
        size = len(bson.encode(doc))
    except (BSONError, OverflowError, ValueError) as exc:  # ValueError: bad UTF-8
        return f"cannot be stored: {type(exc).__name__}: {exc}"[:500]
    if size > max_bytes:
        return f"document of {size} bytes is over the store's limit of {max_bytes} bytes"
    return None


def permanent_write_errors(exc: BulkWriteError) -> dict[int, str]:
    """Index -> the server's reason, for documents refused for good (not duplicates)."""
    out: dict[int, str] = {}
    for err in exc.details.get("writeErrors", []):
        code = err.get("code")
        if code == DUPLICATE_KEY or code in TRANSIENT_CODES:
            continue
        out[err["index"]] = f"refused by the store (code {code}): {err.get('errmsg', '')}"[:500]
    return out


def transient_write_errors(exc: BulkWriteError) -> bool:
    """True when any part of the failure is the server's, so the batch must be retried."""
    if exc.details.get("writeConcernErrors"):
        return True
    return any(e.get("code") in TRANSIENT_CODES for e in exc.details.get("writeErrors", []))
