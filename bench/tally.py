"""The read-back tally every benchmark ends with: each submitted task read back from
Mongo, so no figure rests on an assumed status.

A task is named by what its producer knew when it submitted it: its id (SDK
submits, tasks stored by the benchmark) or, for raw JSON specs pushed onto the
ready list (the master gives them their ids), a key the benchmark put in the
spec, such as `script.args.n`. The tally says how many of them were read back
terminal (by status), how many are stored but not terminal (unfinished), how many
were never stored (lost) and how many keys were stored more than once
(duplicates). A benchmark prints `line()` and exits 1 unless `ok`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Mapping
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
    duplicates: int = 0  # keys stored more than once (extra documents)

    @property
    def terminal(self) -> int:
        return sum(n for s, n in self.statuses.items() if s in TERMINAL_NAMES)

    @property
    def unfinished(self) -> int:
        return sum(n for s, n in self.statuses.items() if s not in TERMINAL_NAMES)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.unfinished == 0 and self.duplicates == 0

    def line(self) -> str:
        statuses = " ".join(f"{k}={v}" for k, v in sorted(self.statuses.items())) or "none"
        return (f"read back from Mongo: {self.terminal} of {self.submitted} submitted "
                f"task(s) terminal ({statuses}); lost {self.lost}, unfinished "
                f"{self.unfinished}, duplicates {self.duplicates}")

    def as_dict(self) -> dict[str, Any]:
        return {"submitted": self.submitted, "statuses": dict(self.statuses),
                "terminal": self.terminal, "lost": self.lost, "unfinished": self.unfinished,
                "duplicates": self.duplicates, "ok": self.ok}


def count(submitted: Iterable[Hashable], found: Iterable[tuple[Hashable, str]]) -> Tally:
    """The tally of `submitted` keys from the (key, status) pairs read back. Pure."""
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
    tally.statuses = dict(statuses)
    tally.lost = len(wanted) - len(seen)
    return tally


def by_ids(db: Any, ids: Iterable[str]) -> Tally:
    """Tasks submitted with known ids, read back `CHUNK` ids a query."""
    wanted = list(dict.fromkeys(ids))
    found: list[tuple[Hashable, str]] = []
    for start in range(0, len(wanted), CHUNK):
        found += [(d["_id"], d["status"]) for d in db[TASKS].find(
            {"_id": {"$in": wanted[start:start + CHUNK]}}, {"status": 1})]
    return count(wanted, found)


def by_key(db: Any, submitted: Iterable[Hashable], match: Mapping[str, Any],
           key: str) -> Tally:
    """Tasks submitted as raw specs, named by the dotted field `key` (e.g.
    `script.args.n`) among the documents `match` selects, read back in one pass."""
    path = key.split(".")

    def value(doc: Mapping[str, Any]) -> Hashable:
        for part in path:
            doc = doc.get(part) if isinstance(doc, Mapping) else None  # type: ignore[assignment]
        return doc  # type: ignore[return-value]

    cursor = db[TASKS].find(dict(match), {key: 1, "status": 1}, batch_size=5000)
    return count(submitted, ((value(d), d["status"]) for d in cursor))
