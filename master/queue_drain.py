"""When the ready queue was last drained: every item waiting at that moment taken.

The orphan sweep pushes again a pending task that no master holds once it is older
than the grace, for its producer may have died between storing it and pushing its
id. But a task whose id still waits in a deep ready queue is no orphan: pushed again
every grace, such a backlog grows by its own copies and each copy costs a write.
So the sweep takes as orphans only tasks older than the grace *before the moment
the queue was last drained*: a task stored and pushed before that moment had its
item taken by a master (which holds the task, or quarantined or finished it).

The queue's own counter says when: `{prefix}:queue:seq` is raised once for every
item a master takes (sendscript/queue.py, TAKE). Read with the items waiting
(the ready list and the masters' staging lists), it gives the count the counter
must reach for all of them to be taken; reached, the moment it was read is the
moment drained. A queue found empty is drained at once. Pure: the reads are the
caller's (`Recovery.queue_position`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass
class QueueDrain:
    drained_at: datetime | None = None  # None: not known yet (a new leader)
    # The sequence when the mark was set, the sequence that takes all then waiting,
    # and when it was set.
    mark: tuple[int, int, datetime] | None = None

    def observe(self, now: datetime, seq: int, waiting: int) -> datetime | None:
        """One reading of the counter and the items waiting; answers `drained_at`."""
        if self.mark is not None:
            base, target, at = self.mark
            if seq < base:  # the counter went back (a Redis flush): mark again
                self.mark = None
            elif seq >= target:
                self.drained_at = at
                self.mark = None
        if waiting <= 0:
            self.drained_at, self.mark = now, None
        elif self.mark is None:
            self.mark = (seq, seq + waiting, now)
        return self.drained_at
