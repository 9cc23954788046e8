"""Device groups: named lists of devices, targets of fan-outs and schedules."""

from __future__ import annotations

import re
from typing import Any

GROUP_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")


def check_name(name: str) -> str:
    if not GROUP_NAME.match(name):
        raise ValueError(f"invalid group name {name!r}: letters, digits, _ . : - (1-200)")
    return name


def devices_of(docs: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Group name -> its devices, from `device_groups` documents."""
    return {d["_id"]: list(d.get("devices", [])) for d in docs}
