"""The master's event seam: one emitter for the events (`master.events`), and gates.

The master's parts do not call each other. Whatever happens — tasks taken in,
queued on the board, dispatched, answered, a device freed, a worker lost, the
master stopping — is emitted once as an event, and every part that cares
subscribes to it (in the spirit of dramatiq's middleware hooks and supervisor's
`notify`). Protections and metrics plug in the same way.

Handlers run synchronously, in subscription order, on the master's loop; a
handler with I/O to do starts a job (`master.jobs.Jobs`) and returns. A
handler that raises is logged and skipped: one bad subscriber never stops
dispatch or the other subscribers.

Parts never subscribe or add a gate themselves: each lists its `subscriptions()`
and exposes its `gate`, and the master (`master.app`) wires them, the gates in one
explicit order.

Gates are asked, in order, whether a task may be dispatched now, right before it
goes to a worker: `Go`, `Hold` (keep it queued and ask again later; it uses no
attempt) or `Drop` (take it off the board with a reason, e.g. expired).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Protocol, TypeVar

from loguru import logger

from sendscript.models import Task

# -- gates --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Go:
    pass


@dataclass(frozen=True, slots=True)
class Hold:
    """Not now: the task stays queued, uses no attempt; asked again after `retry_s`.
    `gate`: the gate that said it, filled in by `Bus.admit` (for traces)."""

    reason: str
    retry_s: float = 1.0
    gate: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class Drop:
    """Never: the task leaves the board; subscribers of TasksWithdrawn act on it."""

    reason: str
    gate: str = field(default="", compare=False)


Verdict = Go | Hold | Drop
GO = Go()


class Gate(Protocol):
    def admit(self, task: Task, now: datetime) -> Verdict: ...


Subscription = tuple[type, Callable[[Any], None]]


class Subscriber(Protocol):
    def subscriptions(self) -> list[Subscription]: ...


# -- the emitter ------------------------------------------------------------------------

E = TypeVar("E")


@dataclass
class Bus:
    _handlers: dict[type, list[Callable[[Any], None]]] = field(
        default_factory=lambda: defaultdict(list))
    gates: list[Gate] = field(default_factory=list)
    emitted: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def subscribe(self, kind: type[E], handler: Callable[[E], None]) -> None:
        self._handlers[kind].append(handler)

    def attach(self, *parts: Subscriber) -> None:
        """Subscribe each part's handlers, in the order given."""
        for part in parts:
            for kind, handler in part.subscriptions():
                self.subscribe(kind, handler)

    def add_gate(self, gate: Gate) -> None:
        self.gates.append(gate)

    def emit(self, event: object) -> None:
        self.emitted[type(event).__name__] += 1
        for handler in self._handlers.get(type(event), ()):
            try:
                handler(event)
            except Exception:
                logger.exception("subscriber {} failed on {}", _name(handler),
                                 type(event).__name__)

    def admit(self, task: Task, now: datetime) -> Verdict:
        """The first gate that does not say Go decides; a failing gate holds the task."""
        for gate in self.gates:
            try:
                verdict = gate.admit(task, now)
            except Exception:
                logger.exception("gate {} failed on task {}", type(gate).__name__, task.id)
                return Hold(f"gate {type(gate).__name__} failed")
            if not isinstance(verdict, Go):
                return verdict if verdict.gate else replace(verdict, gate=type(gate).__name__)
        return GO


def _name(handler: Callable[..., Any]) -> str:
    return getattr(handler, "__qualname__", repr(handler))
