"""Recurring scripts: the schedule document, and building the tasks of one fire.

A fire's tasks have ids derived from (schedule, fire time, device), and the dedupe
key `schedule:{name}:{fire time}:{device}`: however many masters try to create a
fire, each task is stored once.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sendscript import tracing
from sendscript.cron import Misfire, Rule
from sendscript.models import Task, TaskSpec, TaskTemplate, id_from_tag, utcnow

NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,100}$"


class Schedule(BaseModel):
    """One document of `schedules` (its `_id` is the name)."""

    model_config = ConfigDict(populate_by_name=True)

    name: str = Field(alias="_id", pattern=NAME_PATTERN)
    cron: str | None = None
    interval_s: float | None = Field(None, ge=0.1)
    timezone: str = "UTC"
    template: TaskTemplate
    device_ids: list[str] | None = None
    group: str | None = None
    enabled: bool = True
    misfire: Misfire = "fire_once"
    anchor: datetime = Field(default_factory=utcnow)
    next_fire_at: datetime | None = None
    last_fire_at: datetime | None = None
    fires: int = 0
    missed: int = 0
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)

    @field_validator("device_ids")
    @classmethod
    def _devices(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or any(not d.strip() for d in value)):
            raise ValueError("device_ids must be a non-empty list of non-empty names")
        return value

    @model_validator(mode="after")
    def _valid(self) -> Schedule:
        if (self.device_ids is None) == (self.group is None):
            raise ValueError("target exactly one of: devices, or a group")
        if self.template.debounce_s is not None:
            raise ValueError("a schedule's template takes no debounce_s: each fire has its "
                             "own time and its own dedupe key")
        rule = self.rule()  # raises on a bad expression, interval or zone
        if self.next_fire_at is None:
            self.next_fire_at = rule.next_fire(utcnow())
        return self

    def rule(self) -> Rule:
        return Rule(self.cron, self.interval_s, self.timezone, self.anchor)

    def to_doc(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)


def fire_stamp(fire_at: datetime) -> str:
    """A fire time as it appears in its tasks' ids, dedupe keys and batch id."""
    return fire_at.isoformat(timespec="milliseconds")


def fire_batch_id(schedule: str, fire_at: datetime, prefix: str) -> str:
    """The batch id the tasks of one fire share."""
    return id_from_tag(prefix, f"schedule:{schedule}:{fire_stamp(fire_at)}")


def fire_tasks(schedule: Schedule, fire_at: datetime, devices: list[str], prefix: str,
               master_id: str | None, now: datetime) -> list[Task]:
    """The tasks of one fire, one per device, with ids every master derives alike."""
    stamp = fire_stamp(fire_at)
    batch_id = fire_batch_id(schedule.name, fire_at, prefix)
    # One fire, one trace (as a fan-out): its tasks share the fire's span.
    trace = tracing.entry_span("sendscript.schedule_fire", None, {
        "sendscript.schedule": schedule.name, "sendscript.batch_id": batch_id,
        "sendscript.devices": len(devices)})
    tasks = []
    for device in devices:
        key = f"schedule:{schedule.name}:{stamp}:{device}"
        spec = TaskSpec(device_id=device,
                        **schedule.template.model_dump(exclude={"run_at", "dedupe_key"}),
                        run_at=fire_at, dedupe_key=key)
        task = Task.from_spec(spec, task_id=id_from_tag(prefix, key), now=now,
                              batch_id=batch_id)
        task.schedule = schedule.name
        task.master = master_id
        task.trace = trace
        tasks.append(task)
    return tasks
