"""The lock-fence epoch: what keeps fences increasing when Redis loses writes.

A Redis that persists with `appendfsync everysec` (the usual setting), killed and
restarted, may come back without its last second of writes, and `INCR {prefix}:lock:fence`
would hand out again fences it handed out before. Data can only be lost across
a restart, and every restart gives Redis a new run id; so when the lock scripts
see a run id they have not adopted yet, the client takes a new epoch from here
(Mongo, durable: an atomic `$inc`, never a set) and raises the fence counter to
at least `epoch << EPOCH_SHIFT` before any fence is handed out on that run.

Each epoch is taken after the restart it answers was seen, so it is above every
epoch adopted on an earlier run, and the floor it gives is above every fence
handed out before (as long as one run hands out fewer than 2**EPOCH_SHIFT
fences). Fences stay plain integers within 2**53 (exact as Lua numbers).

Mongo collection `lock_epochs`: one document per key prefix, `{_id: prefix, epoch}`.
"""

from __future__ import annotations

from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError
from pymongo.write_concern import WriteConcern

EPOCHS = "lock_epochs"
EPOCH_SHIFT = 32
# Lua numbers are doubles: a fence must stay below 2**53 to be exact in the scripts.
MAX_EPOCH = 2 ** (53 - EPOCH_SHIFT) - 1


class EpochExhausted(RuntimeError):
    """The epoch has grown past what keeps fences exact; fences cannot rise further."""


def fence_floor(epoch: int) -> int:
    """The lowest fence counter value that epoch allows: above every earlier epoch's fences."""
    if not 0 <= epoch <= MAX_EPOCH:
        raise EpochExhausted(f"fence epoch {epoch} outside 0..{MAX_EPOCH}")
    return epoch << EPOCH_SHIFT


class MongoEpochs:
    """The fence epoch of one key prefix, kept in Mongo and only ever bumped."""

    def __init__(self, db: AsyncDatabase, prefix: str) -> None:
        # Acknowledged by a majority and journaled: an epoch that a Mongo failover
        # could forget would let the next bump hand out the same floor again.
        self.col = db.get_collection(EPOCHS, write_concern=WriteConcern(w="majority", j=True))
        self.prefix = prefix

    async def bump(self) -> int:
        """A new epoch, above every epoch this prefix was given before.

        Off the hot path (once per Redis restart per acquiring process), so the
        atomic read-your-increment is worth its cost here."""
        for _ in range(2):
            doc = await self.col.find_one_and_update(
                {"_id": self.prefix}, {"$inc": {"epoch": 1}}, return_document=ReturnDocument.AFTER,
            )
            if doc is not None:
                epoch = int(doc["epoch"])
                fence_floor(epoch)  # refuse an epoch that would make fences inexact
                return epoch
            # The prefix's first epoch. Not an upsert: SecantusDB answers None to all
            # but one of concurrent upserts of one document. An insert that loses the
            # race changes nothing, and never lowers an epoch.
            try:
                await self.col.insert_one({"_id": self.prefix, "epoch": 0})
            except DuplicateKeyError:
                pass
        raise RuntimeError(f"lock epoch document {self.prefix!r} vanished while bumped")
