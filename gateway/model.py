"""Core value types that flow from drivers to the publisher (no I/O, no protocol imports)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import NamedTuple


class Quality(StrEnum):
    GOOD = "good"
    UNCERTAIN = "uncertain"
    BAD = "bad"


class Reading(NamedTuple):
    """One value of one tag. A named tuple, not a frozen dataclass: drivers build one per value, and a
    frozen dataclass costs ~0.6 us to construct (an ``object.__setattr__`` per field), a tuple ~0.1 us.
    The hottest paths skip even ``__new__``'s argument handling:
    ``tuple.__new__(Reading, (asset, tag, value, quality, reason, source_ts, ts))``."""

    asset: str
    tag: str
    value: object
    quality: Quality
    reason: str | None
    source_ts: float | None  # seconds since the epoch, as the device reported it
    ts: float  # gateway time when the value was taken


@dataclass(frozen=True, slots=True)
class Transform:
    """Raw device value -> engineering value: enum lookup, or ``raw * scale + offset``."""

    scale: float = 1.0
    offset: float = 0.0
    enum: Mapping[int, str] | None = None

    def apply(self, raw: object) -> tuple[object, Quality, str | None]:
        if self.enum is not None:
            if isinstance(raw, bool) or not isinstance(raw, int):
                return None, Quality.BAD, f"enum tag got {type(raw).__name__}"
            name = self.enum.get(raw)
            if name is None:
                return raw, Quality.UNCERTAIN, f"code {raw} not in enum"
            return name, Quality.GOOD, None
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            return raw, Quality.GOOD, None
        if isinstance(raw, float) and not math.isfinite(raw):
            return None, Quality.BAD, f"not a finite number ({raw})"
        if self.scale == 1.0 and self.offset == 0.0:
            return raw, Quality.GOOD, None
        return raw * self.scale + self.offset, Quality.GOOD, None


def iso_ms(ts: float) -> str:
    """UTC ISO 8601 with milliseconds, as the MQTT contract requires."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
