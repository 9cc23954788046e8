"""When a schedule fires: cron expressions and fixed intervals, and misfires. Pure.

Cron takes five fields (minute resolution) or six with seconds first, as NestJS
`@Cron` and Quartz write them (`*/5 * * * * *` = every five seconds), in the
schedule's time zone. Intervals count from the schedule's anchor time, so every
master computes the same fire times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

Misfire = Literal["fire_once", "skip"]
MAX_FIRES_COUNTED = 100_000  # a window longer than this is reported, not walked


@dataclass(frozen=True)
class Rule:
    cron: str | None
    interval_s: float | None
    timezone: str
    anchor: datetime

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.interval_s is None):
            raise ValueError("a schedule needs exactly one of a cron expression or an interval")
        if self.interval_s is not None and self.interval_s < 0.1:
            raise ValueError("an interval must be at least 0.1 s")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {self.timezone!r}") from exc
        if self.cron is not None:
            fields = self.cron.split()
            if len(fields) not in (5, 6) or not croniter.is_valid(
                self.cron, second_at_beginning=len(fields) == 6
            ):
                raise ValueError(f"invalid cron expression {self.cron!r}")

    def next_fire(self, after: datetime) -> datetime:
        """The first fire time strictly after `after` (UTC, millisecond precision)."""
        if self.interval_s is not None:
            step_ms = round(self.interval_s * 1000)
            since_ms = math.floor((after - self.anchor).total_seconds() * 1000)
            k = max(0, since_ms // step_ms + 1)
            return self.anchor + timedelta(milliseconds=k * step_ms)
        assert self.cron is not None
        zone = ZoneInfo(self.timezone)
        six = len(self.cron.split()) == 6
        it = croniter(self.cron, after.astimezone(zone), second_at_beginning=six)
        return it.get_next(datetime).astimezone(UTC)


@dataclass(frozen=True)
class Plan:
    fires: list[datetime]  # fire times to create tasks for now
    next_fire_at: datetime  # the first fire time still in the future
    missed: int  # fire times that were due, late beyond grace
    # Those fire times (a catch-up may fire the last of them); not part of equality:
    # what a plan fires and counts is what compares.
    late: tuple[datetime, ...] = field(default=(), compare=False)


def plan(rule: Rule, next_fire_at: datetime, now: datetime, misfire: Misfire,
         grace_s: float, online_since: datetime | None = None) -> Plan:
    """What to fire at `now` for a schedule whose next fire time is `next_fire_at`.

    A due fire time was missed if it passed before this master came online
    (`online_since`: no master fired it in time) or is more than `grace_s` late.
    The others are on time and fire. Of the missed ones, `fire_once` fires one run
    for the whole window (at its latest fire time); `skip` fires none.
    """
    if next_fire_at > now:
        return Plan([], next_fire_at, 0)
    due = [next_fire_at]
    while len(due) < MAX_FIRES_COUNTED:
        t = rule.next_fire(due[-1])
        if t > now:
            break
        due.append(t)
    upcoming = rule.next_fire(max(due[-1], now))

    def missed(t: datetime) -> bool:
        late = (now - t).total_seconds() > grace_s
        return late or (online_since is not None and t < online_since)

    late = [t for t in due if missed(t)]
    on_time = [t for t in due if not missed(t)]
    catch_up = [late[-1]] if late and misfire == "fire_once" else []
    return Plan(catch_up + on_time, upcoming, len(late), tuple(late))
