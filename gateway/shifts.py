"""Production summary of a station per shift: units, run time, downtime by status, availability, performance.

Pure and synchronous, like derived.py: the caller passes readings and the time (float seconds since the
epoch); nothing here reads a clock or does I/O. One ``ShiftTracker`` per station returns a summary for each
shift that ended (the body of ``{prefix}/stations/{asset_id}/shifts``; the caller adds gateway_id, asset_id,
asset_name, seq, event and ts). Its fields map one to one onto the KPI platform's production entry.

Rules:

* Shifts are the calendar's (``Calendar.shift_start``): a shift runs from its local start to the next local
  start, so its length is real elapsed time (the night across a DST change is 7 h or 9 h). A start time a
  DST jump skips is the moment of the jump; a shift that a jump leaves without any time is not reported.
* Observations: ``update`` (even without a reading of the station: its device answered) and ``device`` are
  observations at their ``now``, and readings count as taken then. ``tick`` is no observation: time passes.
* Every second of a shift goes to one status or is missing. The time between two observations goes to the
  status known at the first, unless they are more than ``max_gap`` apart: then the whole gap is missing
  (nobody knows when the status changed). Also missing: the shift before the tracker's first observation,
  the time the PLC is lost (``device(False)`` until ``device(True)`` or a good reading), the time the
  gateway was down (``restore``), and the time the status is unknown (a bad or uncertain status reading, a
  value that is no status, no status read yet, or not read again since a PLC loss or a restart). So a gap
  never passes for production or downtime, and run + downtime + other statuses + missing = shift length.
  Statuses in neither ``running`` nor ``downtime`` (idle) are outside availability: run / (run + downtime).
* A shift is closed at the first observation at or after its end. Without observations, a ``tick`` closes
  it once the gap since the last one exceeds ``max_gap`` (the gap is then missing time whatever comes
  next). So a summary goes out a poll after the boundary, at the latest ``max_gap`` after the last
  observation; ``next_boundary`` says when to tick. An early tick does nothing.
* Counters (the good-units ``counter``, ``rejects``, ``errors``; they share ``width`` and ``max_step``):
  the increase between consecutive good samples, by ``derived.counter_step`` (a wrap counts; a reset
  counts only a restart from 0, never a huge or negative number), goes to the shift in which the sample
  showing it arrives, across a boundary or a gap too. Units made while the counter was unreadable, the PLC
  lost or the gateway down are counted when the counter is read again: a total over shifts loses nothing.
  Bad and uncertain counter readings are skipped.
* Performance is units_produced / (target rate x run time), the target being the run-time weighted mean
  of the target tag over the run time it was known (a good reading above 0; a bad one makes it unknown).
  The target is a plan value: it is kept across a PLC loss and a restart.
* Restart: ``snapshot`` then ``restore`` at the time of the last call changes nothing. Restored later,
  the time since the last observation before the stop is missing, and the status unknown until read;
  the counters go on from their saved values. Shifts that ended meanwhile come out of the next call.
* Shifts that ended with nothing observed in them (the gateway down or the PLC lost across a boundary)
  are reported too, all missing: a row per station and shift, so a hole is explicit. Only those that
  ended more than ``BACKFILL`` before the time that closes them are not (a long stop, a clock far ahead).
* A wall clock stepped back: time stands still until it passes the latest time seen; readings meanwhile
  count as taken at that time. Stepped back by more than ``RESYNC`` (it had been set far ahead), the
  tracker starts over at the new time: the shift it was in is dropped (not reported), the counters go on.
* Rounding (the payload only; everything is computed and kept exact): hours and minutes to 3 decimals,
  missing_minutes rounded up (any missing time shows), availability and performance to 4 decimals.
  ``complete`` is from the exact missing time. downtime_total_minutes rounds the exact total, so it may
  differ from the sum of the rounded ``downtime_minutes`` in the last digit.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, TypeVar

from pydantic import BeforeValidator, Field, model_validator

from .derived import Calendar, CounterSpec, counter_step
from .fields import TagName, duration
from .model import Quality, Reading, iso_ms

SNAPSHOT_VERSION = 1
BACKFILL = 7 * 86400.0  # seconds; ended shifts older than this are not reported after a long stop
RESYNC = 86400.0  # seconds; a clock stepped back further starts the tracker over
MAX_COUNT = 2**63 - 1  # a shift's counts saturate here (a PLC presetting a 64-bit counter over and over)

N = TypeVar("N", int, float)
Gap = Annotated[float, BeforeValidator(duration), Field(ge=1, le=86400)]
Status = Annotated[str, Field(min_length=1)]


class ProductionSpec(CounterSpec):
    """An asset's ``production:`` section: which tags make its shift summaries. ``counter`` (good units),
    ``width`` and ``max_step`` are as a derived counter's, and apply to ``rejects`` and ``errors`` too."""

    rejects: TagName | None = Field(default=None, description="reject counter -> units_defective")
    status: TagName = "status"
    running: list[Status] = Field(default=["running"], min_length=1, description="statuses that are run time")
    downtime: list[Status] = Field(default=["paused", "error", "maintenance"], description="downtime statuses")
    target: TagName | None = Field(default=None, description="target rate in units/h -> performance")
    errors: TagName | None = Field(default=None, description="PLC error counter -> error_count")
    max_gap: Gap = Field(default=300.0, description="longer gaps between updates are missing time")

    @model_validator(mode="after")
    def _consistent(self) -> ProductionSpec:
        tags = [t for t in (self.counter, self.rejects, self.errors, self.status, self.target) if t is not None]
        if len(set(tags)) != len(tags):
            raise ValueError(f"counter, rejects, errors, status and target must be different tags: {tags}")
        for name, statuses in (("running", self.running), ("downtime", self.downtime)):
            if len(set(statuses)) != len(statuses):
                raise ValueError(f"{name} lists a status twice: {statuses}")
        if both := sorted(set(self.running) & set(self.downtime)):
            raise ValueError(f"statuses both running and downtime: {both}")
        return self

    def inputs(self) -> set[str]:
        """The tags this section reads (the tag map checks they exist)."""
        return {t for t in (self.counter, self.rejects, self.errors, self.status, self.target) if t is not None}


@dataclass
class _Shift:
    """Accumulators of one shift, all exact (seconds, units)."""

    start: float
    end: float
    seconds: dict[str, float] = field(default_factory=dict)  # per status
    missing: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)  # per counter role
    target_seconds: float = 0.0  # run time with a known target
    target_units: float = 0.0  # units the target asked for in that time

    def state(self) -> dict[str, object]:
        return {"start": self.start, "end": self.end, "seconds": dict(self.seconds), "missing": self.missing,
                "counts": dict(self.counts), "target_seconds": self.target_seconds, "target_units": self.target_units}

    @classmethod
    def load(cls, state: object) -> _Shift | None:
        if not isinstance(state, Mapping):
            return None
        start, end, missing = _float(state.get("start")), _float(state.get("end")), _float(state.get("missing"))
        ts, tu = _float(state.get("target_seconds")), _float(state.get("target_units"))
        seconds, counts = _numbers(state.get("seconds"), _float), _numbers(state.get("counts"), _int)
        if start is None or end is None or missing is None or ts is None or tu is None:
            return None
        if seconds is None or counts is None or not start < end or min(missing, ts, tu) < 0:
            return None
        return cls(start, end, seconds, missing, counts, ts, tu)


class _Counter:
    """Continuity of one counter tag: its last good raw value."""

    def __init__(self, role: str, tag: str, width: int, max_step: int) -> None:
        self.role, self.tag, self.width, self.max_step = role, tag, width, max_step
        self.last: int | None = None

    @property
    def key(self) -> str:
        return f"{self.tag}/{self.width}/{self.max_step}"

    def feed(self, r: Reading) -> int:
        """The increase a reading shows (0 for the first sample, a bad one or a reset to a new baseline)."""
        raw = _count(r.value, self.width) if r.quality is Quality.GOOD else None
        if raw is None:
            return 0
        last, self.last = self.last, raw
        return 0 if last is None else counter_step(last, raw, self.width, self.max_step)[0]


class ShiftTracker:
    """Shift summaries of one station (see the module's rules)."""

    def __init__(self, asset_id: str, spec: ProductionSpec, calendar: Calendar,
                 names: Sequence[str] | None = None) -> None:
        if names is not None and len(names) != len(calendar.shifts):
            raise ValueError(f"{len(names)} shift names for {len(calendar.shifts)} shifts")
        self.asset_id, self.spec, self.calendar = asset_id, spec, calendar
        self.names = tuple(names) if names is not None else None
        self._starts = [(int(s[:2]), int(s[3:])) for s in calendar.shifts]
        self._inputs = spec.inputs()
        roles = {"units": spec.counter, "rejects": spec.rejects, "errors": spec.errors}
        self._counters = {tag: _Counter(role, tag, spec.width, spec.step_limit)
                          for role, tag in roles.items() if tag is not None}
        self._fresh()

    def _fresh(self) -> None:
        self._shift: _Shift | None = None
        self._t = 0.0  # time accounted up to, in the current shift (none: 0)
        self._seen: float | None = None  # latest time given to any call
        self._last: float | None = None  # latest observation
        self._connected = True
        self._status: str | None = None  # None: unknown
        self._target: float | None = None
        self._pending: list[dict[str, object]] = []  # summaries closed by restore, out with the next call
        for c in self._counters.values():
            c.last = None

    # -- the caller's calls ----------------------------------------------------------------------
    def update(self, readings: Iterable[Reading], now: float) -> list[dict[str, object]]:
        """The station's readings at ``now`` (other assets' and tags are ignored); the shifts that ended."""
        mine = [r for r in readings if r.asset == self.asset_id and r.tag in self._inputs]
        self._observe(now)
        shift = self._shift
        assert shift is not None
        for r in mine:
            if r.quality is Quality.GOOD:
                self._connected = True  # the device answers
            if r.tag == self.spec.status:
                self._status = _status(r)
            elif r.tag == self.spec.target:
                self._target = _rate(r)
            else:
                counter = self._counters[r.tag]
                if increase := counter.feed(r):
                    shift.counts[counter.role] = min(shift.counts.get(counter.role, 0) + increase, MAX_COUNT)
        return self._take()

    def device(self, connected: bool, now: float) -> list[dict[str, object]]:
        """The station's PLC is lost (``False``) or answers again; the time it is lost is missing."""
        self._observe(now)
        if not connected:
            self._status = None  # not known again before it is read again
        self._connected = connected
        return self._take()

    def tick(self, now: float) -> list[dict[str, object]]:
        """Time passes without observations: the shifts that are known to have ended."""
        now = self._clamp(now)
        if self._shift is None:
            return self._take()
        if self._connected and self._last is not None and now <= self._last + self.spec.max_gap:
            return self._take()  # the next observation says where this time goes
        self._account(now, None)
        return self._take()

    def next_boundary(self) -> float | None:
        """When ``tick`` must be called next, if no observation comes first (None: not before one)."""
        if self._pending:
            return self._seen
        if self._shift is None:
            return None
        if self._connected and self._last is not None:
            return max(self._shift.end, math.nextafter(self._last + self.spec.max_gap, math.inf))
        return self._shift.end

    # -- restart -----------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, object]:
        """State to carry over a gateway restart (JSON-serialisable)."""
        return {
            "version": SNAPSHOT_VERSION,
            "calendar": [self.calendar.tz, list(self.calendar.shifts)],
            "shift": self._shift.state() if self._shift is not None else None,
            "t": self._t, "seen": self._seen, "last": self._last, "connected": self._connected,
            "status": self._status, "target": self._target, "pending": list(self._pending),
            "counters": {c.key: c.last for c in self._counters.values()},
        }

    def restore(self, state: object, now: float) -> None:
        """Continue from a snapshot taken before a stop; an unreadable one is ignored, and so are its
        shift times when the calendar changed (the counters still go on)."""
        if not isinstance(state, Mapping) or state.get("version") != SNAPSHOT_VERSION:
            return
        self._fresh()
        counters = state.get("counters")
        if isinstance(counters, Mapping):
            for c in self._counters.values():
                last = _int(counters.get(c.key))
                c.last = last if last is not None and last < 1 << c.width else None
        if not self._load(state):
            return
        seen = self._seen
        assert seen is not None
        if now > seen:  # the gateway was down: nothing is known of the time since the last observation
            self._account(now, None)
            self._last, self._seen, self._status = now, now, None

    def _load(self, state: Mapping[str, object]) -> bool:
        if state.get("calendar") != [self.calendar.tz, list(self.calendar.shifts)]:
            return False
        t, seen, last = _float(state.get("t")), _float(state.get("seen")), _float(state.get("last"))
        if state.get("shift") is None:  # nothing observed yet
            self._seen = seen
            return False
        shift = _Shift.load(state.get("shift"))
        connected, status, target = state.get("connected"), state.get("status"), state.get("target")
        pending = state.get("pending")
        if shift is None or t is None or seen is None or last is None:
            return False
        sound = (
            shift.start <= t < shift.end and last <= t <= seen and isinstance(connected, bool)
            and (status is None or isinstance(status, str)) and (target is None or _float(target) is not None)
            and isinstance(pending, list) and all(isinstance(p, dict) for p in pending)
            and self.calendar.shift_start(shift.start) == shift.start
            and _next_start(self.calendar, shift.start) == shift.end
        )
        if not sound:
            return False
        self._shift, self._t, self._seen, self._last, self._connected = shift, t, seen, last, connected is True
        self._status, self._target = status if isinstance(status, str) else None, _float(target)
        self._pending = [p for p in pending if isinstance(p, dict)] if isinstance(pending, list) else []
        return True

    # -- time ------------------------------------------------------------------------------------
    def _clamp(self, now: float) -> float:
        if self._shift is not None and now < self._t - RESYNC:
            self._shift, self._t, self._seen, self._last = None, 0.0, None, None
        if self._shift is not None:
            now = max(now, self._t)
        self._seen = now if self._seen is None else max(self._seen, now)
        return now

    def _observe(self, now: float) -> None:
        """Account the time up to an observation at ``now`` (closing the shifts it ends)."""
        now = self._clamp(now)
        if self._shift is None:
            start = self.calendar.shift_start(now)
            self._shift, self._t = _Shift(start, _next_start(self.calendar, start)), start
        gap = not self._connected or self._last is None or now > self._last + self.spec.max_gap
        self._account(now, None if gap else self._status)
        self._last = now

    def _account(self, until: float, status: str | None) -> None:
        """The time from the accounted one to ``until`` goes to ``status`` (None: missing)."""
        shift = self._shift
        assert shift is not None
        while True:
            stop = min(until, shift.end)
            if stop > self._t:
                self._add(shift, status, stop - self._t)
                self._t = stop
            if until < shift.end:
                return
            self._pending.append(self._summary(shift))
            start = shift.end
            if status is None and until - start > BACKFILL:
                start = self.calendar.shift_start(until - BACKFILL)
            shift = self._shift = _Shift(start, _next_start(self.calendar, start))
            self._t = start

    def _add(self, shift: _Shift, status: str | None, seconds: float) -> None:
        if status is None:
            shift.missing += seconds
            return
        shift.seconds[status] = shift.seconds.get(status, 0.0) + seconds
        if self._target is not None and status in self.spec.running:
            shift.target_seconds += seconds
            shift.target_units += self._target * seconds / 3600.0

    def _take(self) -> list[dict[str, object]]:
        out, self._pending = self._pending, []
        return out

    # -- the summary -------------------------------------------------------------------------------
    def _index(self, start: float) -> int:
        """Which of the calendar's shifts starts at ``start`` (a skipped start is at the jump, later)."""
        local = self.calendar.local(start)
        return (bisect_right(self._starts, (local.hour, local.minute)) - 1) % len(self._starts)

    def _summary(self, shift: _Shift) -> dict[str, object]:
        spec = self.spec
        run = sum(shift.seconds.get(s, 0.0) for s in spec.running)
        down = {s: shift.seconds.get(s, 0.0) for s in spec.downtime}
        known = run + sum(down.values())
        units = shift.counts.get("units", 0)
        performance = None
        if spec.target is not None and run > 0 and shift.target_seconds > 0 and shift.target_units > 0:
            performance = units / (shift.target_units * run / shift.target_seconds)
        index = self._index(shift.start)
        return {
            "shift_date": self.calendar.local(shift.start).date().isoformat(),
            "shift": self.names[index] if self.names is not None else index + 1,
            "start": iso_ms(shift.start),
            "end": iso_ms(shift.end),
            "duration_hours": _hours(shift.end - shift.start),
            "units_produced": units,
            "units_defective": shift.counts.get("rejects", 0) if spec.rejects is not None else None,
            "run_time_hours": _hours(run),
            "downtime_total_minutes": _minutes(sum(down.values())),
            "downtime_minutes": {s: _minutes(v) for s, v in down.items()},
            "availability": round(run / known, 4) if known > 0 else None,
            "performance": round(performance, 4) if performance is not None else None,
            "error_count": shift.counts.get("errors", 0) if spec.errors is not None else None,
            "missing_minutes": math.ceil(round(shift.missing / 60.0 * 1000, 6)) / 1000,
            "complete": shift.missing == 0,
        }


def _next_start(calendar: Calendar, start: float) -> float:
    """The start of the shift after the one starting at ``start``, with ``shift_start`` as the reference
    (starts lie a minute apart at least, or coincide where a DST jump swallowed a shift)."""
    lo, hi = start, start + 26 * 3600.0
    while calendar.shift_start(hi) == start:  # a day over 26 h: a zone that moved across the date line
        lo, hi = hi, hi + 26 * 3600.0
    while hi - lo > 1.0:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if calendar.shift_start(mid) == start else (lo, mid)
    return calendar.shift_start(hi)


def _hours(seconds: float) -> float:
    return round(seconds / 3600.0, 3)


def _minutes(seconds: float) -> float:
    return round(seconds / 60.0, 3)


def _status(r: Reading) -> str | None:
    value = r.value
    if r.quality is not Quality.GOOD or isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    return str(value)


def _rate(r: Reading) -> float | None:
    value = r.value
    if r.quality is not Quality.GOOD or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def _count(value: object, width: int) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and 0 <= value < 1 << width else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _numbers(value: object, parse: Callable[[object], N | None]) -> dict[str, N] | None:
    """A mapping of names to numbers of at least 0, or None if it is not all that."""
    if not isinstance(value, Mapping):
        return None
    out = {k: parse(v) for k, v in value.items()}
    clean = {k: v for k, v in out.items() if isinstance(k, str) and v is not None and v >= 0}
    return clean if len(clean) == len(out) else None


__all__ = ["BACKFILL", "RESYNC", "ProductionSpec", "ShiftTracker"]
