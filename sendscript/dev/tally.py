"""The read-back tally every benchmark ends with: each submitted task read back from
Mongo, so no figure rests on an assumed status.

A task is named by what its producer knew when it submitted it: its id (SDK
submits, tasks stored by the benchmark) or, for raw JSON specs pushed onto the
ready list (the master gives them their ids), a key the benchmark put in the
spec, such as `script.args.n`. The tally says how many of them were read back
terminal (by status), how many are stored but not terminal (unfinished), how many
were never stored (lost) and how many keys were stored more than once
(duplicates). A benchmark prints `line()` and exits 1 unless `ok`.

A benchmark that ends with most of its items still waiting in Redis (the ready
list) passes the keys it finds listed there too: those are `listed`, not lost, and
`accounted` says that every submitted key is stored or listed, none twice.
`wait_terminal` is the poll the benchmarks wait with before they read back.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sendscript.status import TERMINAL
from sendscript.store import TASKS

TERMINAL_NAMES = frozenset(str(s) for s in TERMINAL)
CHUNK = 1000  # ids per `$in` query


@dataclass
class Tally:
    submitted: int
    statuses: dict[str, int] = field(default_factory=dict)  # of the tasks read back
    lost: int = 0  # submitted, never stored
    duplicates: int = 0  # keys stored (or listed) more than once: the extra ones
    listed: int | None = None  # still waiting in Redis; None: the lists were not read

    @property
    def terminal(self) -> int:
        return sum(n for s, n in self.statuses.items() if s in TERMINAL_NAMES)

    @property
    def unfinished(self) -> int:
        return sum(n for s, n in self.statuses.items() if s not in TERMINAL_NAMES)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.unfinished == 0 and self.duplicates == 0

    @property
    def accounted(self) -> bool:
        """Every submitted key stored or still listed, none twice (finished or not)."""
        return self.lost == 0 and self.duplicates == 0

    def line(self) -> str:
        statuses = " ".join(f"{k}={v}" for k, v in sorted(self.statuses.items())) or "none"
        if self.listed is None:
            return (f"read back from Mongo: {self.terminal} of {self.submitted} submitted "
                    f"task(s) terminal ({statuses}); lost {self.lost}, unfinished "
                    f"{self.unfinished}, duplicates {self.duplicates}")
        stored = self.terminal + self.unfinished
        return (f"read back from Mongo and Redis: {stored} of {self.submitted} submitted "
                f"item(s) stored ({statuses}; {self.terminal} terminal), {self.listed} "
                f"still listed in Redis; lost {self.lost}, duplicates {self.duplicates}")

    def as_dict(self) -> dict[str, Any]:
        out = {"submitted": self.submitted, "statuses": dict(self.statuses),
               "terminal": self.terminal, "lost": self.lost, "unfinished": self.unfinished,
               "duplicates": self.duplicates, "ok": self.ok}
        if self.listed is not None:
            out |= {"listed": self.listed, "accounted": self.accounted}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Tally:
        return cls(d["submitted"], dict(d["statuses"]), d["lost"], d["duplicates"],
                   d.get("listed"))


def count(submitted: Iterable[Hashable], found: Iterable[tuple[Hashable, str]],
          listed: Iterable[Hashable] | None = None) -> Tally:
    """The tally of `submitted` keys from the (key, status) pairs read back and, when
    given, the keys still `listed` in Redis. Pure."""
    wanted = set(submitted)
    tally = Tally(submitted=len(wanted))
    seen: Counter[Hashable] = Counter()
    statuses: Counter[str] = Counter()
    for key, status in found:
        if key not in wanted:
            continue
        seen[key] += 1
        if seen[key] == 1:
            statuses[status] += 1
        else:
            tally.duplicates += 1
    if listed is not None:
        tally.listed = 0
        for key in listed:
            if key not in wanted:
                continue
            seen[key] += 1
            if seen[key] == 1:
                tally.listed += 1
            else:
                tally.duplicates += 1
    tally.statuses = dict(statuses)
    tally.lost = len(wanted) - len(seen)
    return tally


def by_ids(db: Any, ids: Iterable[str], collection: str = TASKS) -> Tally:
    """Tasks submitted with known ids, read back `CHUNK` ids a query from
    `collection` (a peer's job keeps its tasks in a collection of its own)."""
    wanted = list(dict.fromkeys(ids))
    found: list[tuple[Hashable, str]] = []
    for start in range(0, len(wanted), CHUNK):
        found += [(d["_id"], d["status"]) for d in db[collection].find(
            {"_id": {"$in": wanted[start:start + CHUNK]}}, {"status": 1})]
    return count(wanted, found)


def by_key(db: Any, submitted: Iterable[Hashable], match: Mapping[str, Any],
           key: str, listed: Iterable[Hashable] | None = None) -> Tally:
    """Tasks submitted as raw specs, named by the dotted field `key` (e.g.
    `script.args.n`) among the documents `match` selects, read back in one pass;
    `listed`: the keys of the specs still waiting in Redis, when they count."""
    cursor = db[TASKS].find(dict(match), {key: 1, "status": 1}, batch_size=5000)
    return count(submitted, ((field_of(d, key), d["status"]) for d in cursor), listed)


def field_of(doc: Any, key: str) -> Hashable:
    """The value at the dotted `key` of a document or spec; None when absent."""
    for part in key.split("."):
        doc = doc.get(part) if isinstance(doc, Mapping) else None
    return doc  # type: ignore[no-any-return]


def wait_terminal(db: Any, match: Mapping[str, Any], n: int, timeout_s: float,
                  dead: Callable[[], Sequence[str]] = tuple, interval_s: float = 1.0
                  ) -> str | None:
    """Poll until Mongo holds `n` terminal tasks among those `match` selects (one
    count a poll). None when it does; else why the wait ended: the timeout, or the
    processes `dead` names. What became of each task is the read-back's to say."""
    deadline = time.monotonic() + timeout_s
    terminal = {**match, "status": {"$in": sorted(TERMINAL_NAMES)}}
    while db[TASKS].count_documents(terminal) < n:
        if gone := dead():
            return f"exited during the run: {', '.join(gone)}"
        if time.monotonic() > deadline:
            return f"timed out after {timeout_s:.0f}s"
        time.sleep(interval_s)
    return None
