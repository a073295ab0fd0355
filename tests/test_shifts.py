"""Tests for gateway/shifts.py: one summary per station and shift, through wraps, resets, gaps, DST and restarts."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from datetime import time as dtime
from itertools import pairwise
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

import jsonschema
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.derived import Calendar
from gateway.model import Quality, Reading
from gateway.shifts import BACKFILL, RESYNC, ProductionSpec, ShiftTracker

MADRID = "Europe/Madrid"
TZ = ZoneInfo(MADRID)
CAL = Calendar(MADRID, ("06:00", "14:00", "22:00"))
NAMES = ("morning", "afternoon", "night")
ASSET = "filling-1"
SPEC = ProductionSpec(counter="units_total", rejects="rejects_total", target="target_units_per_hour",
                      errors="error_count")
GOOD, UNCERTAIN, BAD = Quality.GOOD, Quality.UNCERTAIN, Quality.BAD
SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "gateway" / "schemas" / "shifts.json").read_text())
Summary = dict[str, object]


def at(wall: str, fold: int = 0) -> float:
    """Epoch of a Madrid wall time "YYYY-MM-DD HH:MM[:SS]"; fold=1 picks the second of a repeated hour."""
    return datetime.fromisoformat(wall).replace(tzinfo=TZ, fold=fold).timestamp()


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def good(tag: str, value: object) -> Reading:
    return Reading(ASSET, tag, value, GOOD, None, None, 0.0)


def bad(tag: str, reason: str = "timeout") -> Reading:
    return Reading(ASSET, tag, None, BAD, reason, None, 0.0)


def tracker(spec: ProductionSpec = SPEC, calendar: Calendar = CAL,
            names: Sequence[str] | None = NAMES) -> ShiftTracker:
    return ShiftTracker(ASSET, spec, calendar, names)


def num(summary: Summary, key: str) -> float:
    value = summary[key]
    assert isinstance(value, (int, float))
    return float(value)


def restarted(tr: ShiftTracker, now: float, spec: ProductionSpec = SPEC, calendar: Calendar = CAL,
              names: Sequence[str] | None = NAMES) -> ShiftTracker:
    """The gateway stops after its last call and starts again at ``now``: the state goes through JSON."""
    fresh = tracker(spec, calendar, names)
    fresh.restore(orjson.loads(orjson.dumps(tr.snapshot())), now)
    return fresh


# --------------------------------------------------------------------------------------------
# The spec (an asset's `production:` section)
# --------------------------------------------------------------------------------------------


def test_spec_defaults_and_inputs() -> None:
    spec = ProductionSpec(counter="units_total")
    assert (spec.width, spec.max_step, spec.step_limit, spec.status, spec.max_gap) == (32, None, 2**30, "status", 300.0)
    assert (spec.running, spec.downtime) == (["running"], ["paused", "error", "maintenance"])
    assert spec.inputs() == {"units_total", "status"}
    assert SPEC.inputs() == {"units_total", "rejects_total", "target_units_per_hour", "error_count", "status"}
    assert ProductionSpec.model_validate({"counter": "units_total", "max_gap": "2m", "width": 16}).max_gap == 120.0


@pytest.mark.parametrize(("fields", "fragment"), [
    ({"counter": "units_total", "window": "5m"}, "Extra inputs are not permitted"),
    ({"counter": "units_total", "width": 24}, "Input should be 16, 32 or 64"),
    ({"counter": "units_total", "width": 16, "max_step": 70000}, "exceeds the counter's range (2**16)"),
    ({"counter": "units_total", "max_step": 0}, "greater than or equal to 1"),
    ({"counter": "units_total", "max_gap": "fast"}, "'fast' is not a duration"),
    ({"counter": "units_total", "max_gap": "0.5s"}, "greater than or equal to 1"),
    ({"counter": "units_total", "rejects": "units_total"}, "must be different tags"),
    ({"counter": "status"}, "must be different tags"),
    ({"counter": "units_total", "running": []}, "at least 1 item"),
    ({"counter": "units_total", "running": [""]}, "at least 1 character"),
    ({"counter": "units_total", "downtime": ["error", "error"]}, "downtime lists a status twice"),
    ({"counter": "units_total", "running": ["running", "paused"]}, "both running and downtime: ['paused']"),
    ({"counter": "Units Total"}, "should match pattern"),
    ({}, "Field required"),
])
def test_spec_errors(fields: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(fragment)):
        ProductionSpec.model_validate(fields)


def test_names_must_match_the_shifts() -> None:
    with pytest.raises(ValueError, match="2 shift names for 3 shifts"):
        tracker(names=["day", "night"])


# --------------------------------------------------------------------------------------------
# A simulated station: one update a minute with all its tags
# --------------------------------------------------------------------------------------------


@dataclass
class Line:
    t: float
    units: int = 0
    rejects: int = 0
    errors: int = 0
    width: int = 32
    target: object = 3000
    out: list[Summary] = field(default_factory=list)

    def run(self, tr: ShiftTracker, minutes: int, status: object, *, rate: int = 40) -> None:
        """``minutes`` updates a minute apart in ``status``; what a minute makes shows at the next update."""
        for _ in range(minutes):
            self.update(tr, status)
            if status == "running":
                self.units, self.rejects = self.units + rate, self.rejects + 1
            if status == "error":
                self.errors += 1
            self.t += 60

    def update(self, tr: ShiftTracker, status: object) -> list[Summary]:
        readings = [good("units_total", self.units % 2**self.width), good("rejects_total", self.rejects),
                    good("error_count", self.errors), good("target_units_per_hour", self.target),
                    status if isinstance(status, Reading) else good("status", status)]
        out = tr.update(readings, self.t)
        self.out += out
        return out


DAY = [("running", 180), ("paused", 30), ("running", 90), ("error", 15), ("maintenance", 45), ("idle", 30),
       ("running", 90)]  # 06:00 to 14:00


@pytest.mark.parametrize("width", [16, 32])
def test_a_morning_shift(width: Literal[16, 32]) -> None:
    tr = tracker(SPEC.model_copy(update={"width": width}))
    line = Line(at("2026-05-12 06:00"), units=65_000, width=width)  # a 16-bit counter wraps in the morning
    for status, minutes in DAY:
        line.run(tr, minutes, status)
    assert line.out == []
    assert tr.tick(line.t) == []  # 14:00, an update a minute ago: it comes with the next update
    assert line.update(tr, "running") == [{
        "shift_date": "2026-05-12", "shift": "morning",
        "start": "2026-05-12T04:00:00.000Z", "end": "2026-05-12T12:00:00.000Z", "duration_hours": 8.0,
        "units_produced": 40 * 359,  # 13:59 to 14:00 shows at 14:00: the afternoon's
        "units_defective": 359, "run_time_hours": 6.0, "downtime_total_minutes": 90.0,
        "downtime_minutes": {"paused": 30.0, "error": 15.0, "maintenance": 45.0},
        "availability": 0.8, "performance": round(40 * 359 / (3000 * 6), 4), "error_count": 15,
        "missing_minutes": 0.0, "complete": True,
    }]


def test_optional_fields_and_index_names() -> None:
    spec = ProductionSpec(counter="units_total", downtime=[])
    tr = tracker(spec, names=None)
    line = Line(at("2026-05-12 22:00"))
    line.run(tr, 8 * 60, "running")
    (summary,) = line.update(tr, "running")
    assert (summary["shift"], summary["shift_date"], summary["duration_hours"]) == (3, "2026-05-12", 8.0)
    assert (summary["units_defective"], summary["error_count"], summary["performance"]) == (None, None, None)
    assert (summary["downtime_minutes"], summary["availability"], summary["units_produced"]) == ({}, 1.0, 40 * 479)


def test_no_status_no_availability_and_no_run_no_performance() -> None:
    tr = tracker()
    line = Line(at("2026-05-12 06:00"))
    line.run(tr, 8 * 60, "idle")
    (summary,) = line.update(tr, "idle")
    assert (summary["run_time_hours"], summary["availability"], summary["performance"]) == (0.0, None, None)
    assert summary["complete"] is True


def test_performance_uses_the_target_over_the_run_time() -> None:
    tr = tracker()
    line = Line(at("2026-05-12 06:00"))
    line.target = 2400
    line.run(tr, 120, "running")
    line.run(tr, 60, "paused")  # a target change while paused does not count
    line.target = 4800
    line.run(tr, 60, "paused")
    line.run(tr, 239, "running")
    line.target = -1  # no target for the last minute: the mean over the known time stands
    line.run(tr, 1, "running")
    (summary,) = line.update(tr, "running")
    mean = (2400 * 120 + 4800 * 239) / 359
    assert summary["performance"] == round(40 * 359 / (mean * 6), 4)


# --------------------------------------------------------------------------------------------
# Counters: wraps, resets, unreadable stretches, boundaries
# --------------------------------------------------------------------------------------------

COUNTS = [
    # counter readings a minute apart (None: bad), width, max_step, units_produced
    ([65530, 65535, 5, 20], 16, None, 26),  # a wrap past 65535
    ([2**32 - 3, 4], 32, None, 7),
    ([2**64 - 1, 0, 9], 64, None, 10),
    ([20000, 20010, 3, 10], 16, None, 20),  # the PLC restarted: 3 since, then 7 more
    ([20000, 20010, 0, 10], 16, None, 20),
    ([50000, 50010, 3, 10], 16, None, 15546),  # a drop of less than 3/4 of the range is a wrap
    ([4_000_000_000, 3_900_000_000, 3_900_000_050], 32, None, 50),  # set back: only a new baseline
    ([100, 40000, 40005], 16, None, 5),  # preset upwards: no 39900 units in a minute
    ([100, 40000, 40005], 16, 60000, 39905),  # unless max_step allows them
    ([60000, 100, 150], 16, 1000, 150),  # a tight max_step: a drop is a restart (100 since), not a wrap
    ([10, None, None, 30], 16, None, 20),  # unreadable a while: counted when read again
    ([10, -5, 12.0, "x", 15, True, 2**16], 16, None, 5),  # not counts: skipped
]


@pytest.mark.parametrize(("values", "width", "max_step", "units"), COUNTS)
def test_counters_through_wraps_and_resets(values: list[object], width: Literal[16, 32, 64], max_step: int | None,
                                           units: int) -> None:
    tr = tracker(ProductionSpec(counter="units_total", rejects="rejects_total", width=width, max_step=max_step))
    t = at("2026-05-12 06:00")
    for i, v in enumerate(values):
        counter = bad("units_total") if v is None else good("units_total", v)
        rejects = bad("rejects_total") if v is None else good("rejects_total", v)
        assert tr.update([good("status", "running"), counter, rejects], t + 60 * i) == []
    (summary,) = tr.tick(at("2026-05-12 14:00") + 301)
    assert (summary["units_produced"], summary["units_defective"]) == (units, units)


def test_an_increase_goes_to_the_shift_of_the_sample_showing_it() -> None:
    tr = tracker()
    tr.update([good("status", "running"), good("units_total", 100)], at("2026-05-12 13:59:00"))
    tr.update([bad("units_total")], at("2026-05-12 13:59:50"))
    (morning,) = tr.update([good("units_total", 150)], at("2026-05-12 14:00:00"))  # at the boundary: the new one
    tr.update([good("units_total", 170)], at("2026-05-12 14:00:30"))
    assert morning["units_produced"] == 0
    (afternoon,) = tr.tick(at("2026-05-12 22:00"))
    assert (afternoon["units_produced"], afternoon["shift"]) == (70, "afternoon")


def test_readings_of_other_assets_and_tags_are_ignored() -> None:
    tr = tracker()
    t = at("2026-05-12 06:00")
    tr.update([good("status", "running"), good("units_total", 0)], t)
    other = Reading("filling-2", "units_total", 5000, GOOD, None, None, 0.0)
    tr.update([other, Reading("filling-2", "status", "error", GOOD, None, None, 0.0), good("speed", 3)], t + 60)
    tr.update([good("units_total", 10)], t + 120)
    (summary,) = tr.tick(at("2026-05-12 14:00"))
    assert summary["units_produced"] == 10


# --------------------------------------------------------------------------------------------
# Missing time: gaps, unknown status, the PLC lost, the tracker new mid-shift
# --------------------------------------------------------------------------------------------


def feed(tr: ShiftTracker, events: list[tuple[str, object]]) -> list[Summary]:
    """Events at Madrid wall times of 2026-05-12. After readings and "back" the device answers every minute
    (an update without readings) until the next event; after "quiet" (an update), "lost" and "tick" nothing
    comes until the next event."""
    out: list[Summary] = []
    for (wall, what), (until, _) in zip(events, [*events[1:], ("23:59", None)], strict=True):
        t, end = at(f"2026-05-12 {wall}"), at(f"2026-05-12 {until}")
        if what == "lost":
            out += tr.device(False, t)
        elif what == "tick":
            out += tr.tick(t)
        elif what == "quiet":
            out += tr.update([], t)
        else:
            if what == "back":
                out += tr.device(True, t)
            else:
                assert isinstance(what, list)
                out += tr.update(what, t)
            while (t := t + 60) < end:
                out += tr.update([], t)
    return out


RUN = [good("status", "running")]
MISSING = [
    # events (see feed), run minutes, missing minutes: the morning shift's summary
    ([("06:00", RUN), ("14:00", [])], 480, 0),
    ([("06:00", RUN), ("13:55", "quiet"), ("14:00", [])], 480, 0),  # exactly max_gap apart: counted
    ([("06:00", RUN), ("13:54:59", "quiet"), ("14:00", [])], 474.983, 5.017),  # more: all of the gap missing
    ([("10:00", RUN), ("14:00", [])], 240, 240),  # the tracker started mid-shift
    ([("06:00", RUN), ("07:00", [bad("status")]), ("07:03", RUN), ("14:00", [])], 477, 3),  # status unknown
    ([("06:00", RUN), ("07:00", [Reading(ASSET, "status", 7, UNCERTAIN, "code 7 not in enum", None, 0.0)]),
      ("07:01", RUN), ("14:00", [])], 479, 1),
    ([("06:00", RUN), ("07:00", [good("status", 1.5)]), ("07:01", RUN), ("14:00", [])], 479, 1),  # no status
    ([("06:00", []), ("06:02", RUN), ("14:00", [])], 478, 2),  # no status read yet
    ([("06:00", RUN), ("08:00", "lost"), ("08:30", "back"), ("08:31", RUN), ("14:00", [])], 449, 31),
    ([("06:00", RUN), ("08:00", "lost"), ("08:30", RUN), ("14:00", [])], 450, 30),  # a good reading: it is back
    ([("06:00", RUN), ("08:00", "lost"), ("08:10", [bad("status")]), ("08:30", RUN), ("14:00", [])], 450, 30),
    ([("06:00", RUN), ("13:58", "lost"), ("14:00", "tick")], 478, 2),  # lost: closed at the boundary
    ([("06:00", RUN), ("13:00", "lost"), ("13:00", "back"), ("13:00", RUN), ("14:00", [])], 480, 0),
]


@pytest.mark.parametrize(("events", "run", "missing"), MISSING)
def test_missing_time(events: list[tuple[str, object]], run: float, missing: float) -> None:
    (summary, *_) = feed(tracker(), events)
    assert summary["shift"] == "morning"
    assert (summary["run_time_hours"], summary["missing_minutes"]) == (round(run / 60, 3), missing)
    assert summary["complete"] is (missing == 0)
    paused = [(w, [good("status", "paused")] if e == RUN else e) for w, e in events]
    (summary, *_) = feed(tracker(), paused)  # the same time as downtime
    assert (summary["downtime_total_minutes"], summary["run_time_hours"]) == (round(run, 3), 0.0)
    assert summary["downtime_minutes"] == {"paused": round(run, 3), "error": 0.0, "maintenance": 0.0}


def test_a_summary_goes_out_at_the_first_observation_after_the_boundary() -> None:
    tr = tracker()
    tr.update(RUN, at("2026-05-12 13:59:30"))
    assert tr.next_boundary() == pytest.approx(at("2026-05-12 14:04:30"))
    assert tr.tick(at("2026-05-12 14:00")) == []
    assert tr.tick(at("2026-05-12 14:04:30")) == []  # exactly max_gap: an update may still come
    (summary,) = tr.update([], at("2026-05-12 14:04:30"))
    assert (summary["missing_minutes"], summary["run_time_hours"]) == (479.5, 0.008)


def test_without_observations_the_tick_closes_the_shift_once_the_gap_is_missing() -> None:
    tr = tracker()
    assert (tr.next_boundary(), tr.tick(at("2026-05-12 14:00"))) == (None, [])
    Line(at("2026-05-12 06:00")).run(tr, 480, "running")  # the last update at 13:59
    boundary = tr.next_boundary()
    assert boundary is not None and at("2026-05-12 14:04") < boundary < at("2026-05-12 14:04:01")
    assert tr.tick(at("2026-05-12 14:04")) == []  # an update may still come and count the time
    (summary,) = tr.tick(boundary)
    assert (summary["missing_minutes"], summary["run_time_hours"], summary["complete"]) == (1.0, 7.983, False)
    assert tr.next_boundary() == at("2026-05-12 22:00")
    (afternoon,) = tr.tick(at("2026-05-12 22:00"))
    assert (afternoon["missing_minutes"], afternoon["complete"]) == (480.0, False)


def test_a_plc_lost_across_boundaries_reports_every_shift() -> None:
    tr = tracker()
    line = Line(at("2026-05-12 12:00"))
    line.run(tr, 60, "running")
    assert tr.device(False, line.t) == []  # 13:00
    assert tr.next_boundary() == at("2026-05-12 14:00")
    out = [s for wall in ("2026-05-12 14:00", "2026-05-12 22:00", "2026-05-13 06:00") for s in tr.tick(at(wall))]
    assert [(s["shift"], s["missing_minutes"], s["complete"]) for s in out] == [
        ("morning", 420.0, False), ("afternoon", 480.0, False), ("night", 480.0, False)]
    line.t, line.units = at("2026-05-13 07:00"), line.units + 1000  # made while the PLC was not read
    assert tr.device(True, line.t) == []
    line.run(tr, 7 * 60, "running")
    (morning,) = line.update(tr, "running")
    assert (morning["units_produced"], morning["missing_minutes"], morning["shift_date"]) == (
        40 + 1000 + 40 * 419, 60.0, "2026-05-13")  # 12:59 to 13:00, the outage and the morning


# --------------------------------------------------------------------------------------------
# Restarts
# --------------------------------------------------------------------------------------------


def test_a_restart_without_lost_time_changes_nothing() -> None:
    plain, line = tracker(), Line(at("2026-05-12 06:00"))
    for status, minutes in DAY:
        line.run(plain, minutes, status)
    line.update(plain, "running")
    tr, again = tracker(), Line(at("2026-05-12 06:00"))
    for status, minutes in DAY:
        again.run(tr, minutes, status)
        tr = restarted(tr, again.t - 60)  # right after the last update
    again.update(tr, "running")
    assert again.out == line.out and len(line.out) == 1


def test_a_restart_mid_shift_counts_the_lost_time_as_missing_and_keeps_the_units() -> None:
    tr, line = tracker(), Line(at("2026-05-12 06:00"))
    line.run(tr, 240, "running")  # to 10:00; the last update at 09:59
    line.units += 40 * 5  # the line runs on while the gateway restarts
    line.t += 5 * 60
    tr = restarted(tr, line.t - 30)  # up at 10:04:30, the first poll at 10:05
    line.run(tr, 235, "running")
    (summary,) = line.update(tr, "running")
    assert (summary["missing_minutes"], summary["complete"], summary["run_time_hours"]) == (6.0, False, 7.9)
    assert summary["units_produced"] == 40 * 479


def test_a_gateway_down_across_boundaries_reports_them_at_the_next_call() -> None:
    tr, line = tracker(), Line(at("2026-05-12 12:00"))
    line.run(tr, 60, "running")
    back = at("2026-05-13 07:00")
    tr = restarted(tr, back)
    assert tr.next_boundary() == back
    out = tr.tick(back)
    assert [(s["shift"], s["missing_minutes"], s["units_produced"]) for s in out] == [
        ("morning", 421.0, 40 * 59), ("afternoon", 480.0, 0), ("night", 480.0, 0)]
    assert tr.next_boundary() == at("2026-05-13 14:00")
    assert restarted(tr, back).snapshot() == tr.snapshot()


def test_a_long_stop_reports_the_last_week_only() -> None:
    tr, line = tracker(), Line(at("2026-05-12 12:00"))
    line.run(tr, 60, "running")
    back = at("2026-06-12 12:00")
    tr = restarted(tr, back)
    out = tr.update(RUN, back)
    assert out[0]["start"] == "2026-05-12T04:00:00.000Z"  # the shift the gateway stopped in
    rest = out[1:]
    assert len(rest) == 3 * 7
    assert rest[0]["start"] == datetime.fromtimestamp(CAL.shift_start(back - BACKFILL), UTC).strftime(
        "%Y-%m-%dT%H:%M:%S.000Z")
    assert all(a["end"] == b["start"] for a, b in pairwise(rest))
    assert rest[-1]["end"] == "2026-06-12T04:00:00.000Z"
    assert {(s["missing_minutes"], s["complete"]) for s in rest} == {(480.0, False)}


@pytest.mark.parametrize("state", [
    None, [], {}, {"version": 99},
    {"version": 1, "shift": "x", "counters": [1]},
    {"version": 1, "calendar": ["Europe/Madrid", ["06:00", "14:00", "22:00"]], "t": 0, "seen": 0, "last": 0,
     "connected": True, "status": None, "target": None, "pending": [],
     "shift": {"start": 0.0, "end": 1.0, "seconds": {}, "missing": 0, "counts": {}, "target_seconds": 0,
               "target_units": 0}},  # not a shift of the calendar
])
def test_restore_ignores_garbage(state: object) -> None:
    t0 = at("2026-05-12 06:00")
    restored, fresh = tracker(), tracker()
    restored.restore(state, t0)
    a, b = Line(t0), Line(t0)
    a.run(restored, 481, "running")
    b.run(fresh, 481, "running")
    assert a.out == b.out and len(a.out) == 1


def test_restore_ignores_mangled_parts() -> None:
    tr, line = tracker(), Line(at("2026-05-12 06:00"))
    line.run(tr, 60, "running")
    good_state = orjson.loads(orjson.dumps(tr.snapshot()))
    shift = good_state["shift"]
    for key, value in [("t", -1.0), ("last", "x"), ("seen", None), ("connected", 1), ("status", 3), ("target", "y"),
                       ("pending", [1]), ("shift", "x"), ("shift", {**shift, "seconds": {"running": -1}}),
                       ("shift", {**shift, "start": None}), ("shift", {**shift, "counts": [1]}),
                       ("shift", {**shift, "end": shift["start"]})]:
        fresh = tracker()
        fresh.restore({**good_state, key: value}, line.t)
        assert fresh.next_boundary() is None, key


def test_restore_with_another_calendar_keeps_the_counters() -> None:
    tr, line = tracker(), Line(at("2026-05-12 06:00"))
    line.run(tr, 60, "running")
    daily = Calendar(MADRID, ("00:00",))
    tr = restarted(tr, line.t, calendar=daily, names=None)
    line.run(tr, 60, "running")  # 07:00 to 07:59: the day's shift from its first update
    out = tr.tick(at("2026-05-13 00:00"))
    assert [(s["missing_minutes"], s["units_produced"]) for s in out] == [(24 * 60 - 59, 40 * 60)]


def test_a_clock_stepped_back_stands_time_still() -> None:
    tr, line = tracker(), Line(at("2026-05-12 06:00"))
    line.run(tr, 240, "running")  # to 09:59
    line.t -= 1800
    line.run(tr, 30, "paused")  # 09:30 to 09:59 again: all taken as at 09:59
    line.run(tr, 240, "paused")  # 10:00 to 13:59
    (summary,) = line.update(tr, "paused")
    assert (summary["run_time_hours"], summary["downtime_total_minutes"], summary["missing_minutes"]) == (
        round(239 / 60, 3), 241.0, 0.0)
    assert summary["units_produced"] == 40 * 240


def test_a_clock_set_far_ahead_and_back_starts_over() -> None:
    tr, line = tracker(), Line(at("2026-05-12 06:00"))
    line.run(tr, 60, "running")
    ahead = tr.update(RUN, at("2027-05-12 10:00"))  # a wrong clock: reported, there is no telling
    assert len(ahead) == 1 + 3 * 7
    line.run(tr, 7 * 60, "running")  # 07:00 to 13:59 again: more than RESYNC back, a new start
    (summary,) = line.update(tr, "running")
    assert (summary["start"], summary["missing_minutes"], summary["units_produced"]) == (
        "2026-05-12T04:00:00.000Z", 60.0, 40 * 7 * 60)
    assert at("2027-05-12 10:00") - at("2026-05-12 07:00") > RESYNC


# --------------------------------------------------------------------------------------------
# Midnight and DST: one summary of the right length
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("night", "hours"), [("2026-05-12", 8), ("2026-03-28", 7), ("2026-10-24", 9)])
def test_the_night_shift_is_one_summary_across_midnight_and_dst(night: str, hours: int) -> None:
    tr, line = tracker(), Line(at(f"{night} 21:50"))
    line.run(tr, 10 + hours * 60, "running")  # to 05:59, a minute apart
    (evening,) = line.out
    assert evening["shift"] == "afternoon"
    (summary,) = line.update(tr, "running")
    assert datetime.fromtimestamp(line.t, TZ).strftime("%H:%M") == "06:00"
    assert (summary["shift"], summary["shift_date"], summary["duration_hours"]) == ("night", night, hours)
    assert (summary["run_time_hours"], summary["complete"], summary["units_produced"]) == (hours, True,
                                                                                          40 * hours * 60)


def test_a_start_time_that_dst_skips_starts_at_the_jump() -> None:
    cal = Calendar(MADRID, ("02:30", "14:00"))
    tr, line = tracker(calendar=cal, names=["early", "late"]), Line(at("2026-03-28 14:00"))
    line.run(tr, 23 * 60, "running")  # to 14:00 CEST on the 29th: 22 h of real time
    line.update(tr, "running")
    late, early = line.out
    assert (late["shift"], late["start"], late["end"], late["duration_hours"]) == (
        "late", "2026-03-28T13:00:00.000Z", "2026-03-29T01:00:00.000Z", 12.0)
    assert (early["shift"], early["shift_date"], early["start"], early["duration_hours"]) == (
        "early", "2026-03-29", "2026-03-29T01:00:00.000Z", 11.0)


def test_a_day_a_zone_repeated_is_one_shift_of_48_hours() -> None:
    cal = Calendar("Pacific/Apia", ("00:00",))  # 4 July 1892 twice, going over to the other side of the date line
    tr = tracker(ProductionSpec(counter="units_total"), cal, names=None)
    t = datetime(1892, 7, 4, 0, tzinfo=ZoneInfo("Pacific/Apia")).timestamp()
    tr.update(RUN, t)
    (summary,) = tr.tick(t + 49 * 3600)
    assert (summary["shift_date"], summary["duration_hours"]) == ("1892-07-04", 48.0)


# --------------------------------------------------------------------------------------------
# The payload
# --------------------------------------------------------------------------------------------


def test_the_payload_matches_its_schema() -> None:
    tr, line = tracker(), Line(at("2026-05-12 06:00"))
    for status, minutes in DAY:
        line.run(tr, minutes, status)
    (summary,) = line.update(tr, "running")
    payload = {"event": "shift-summary", "gateway_id": "gw-1", "seq": 7, "asset_id": ASSET,
               "asset_name": "Filling 1", **summary, "ts": "2026-05-12T12:00:00.000Z"}
    validator = jsonschema.Draft202012Validator(SCHEMA)
    validator.validate(orjson.loads(orjson.dumps(payload)))
    assert set(SCHEMA["required"]) == set(payload) == set(SCHEMA["properties"])
    for key, wrong in [("shift", 0), ("availability", 1.5), ("units_produced", -1), ("start", "2026-05-12")]:
        assert not validator.is_valid({**payload, key: wrong}), key


# --------------------------------------------------------------------------------------------
# Properties over random streams
# --------------------------------------------------------------------------------------------

STATUSES = ["running", "running", "paused", "error", "maintenance", "idle", "setup", 3, "bad", "uncertain"]
OTHER = ["idle", "setup", "3"]  # statuses in neither running nor downtime


@dataclass
class Stream:
    """Calls to make (kind, time, readings) and the units the counter shows, computed from the production."""

    calls: list[tuple[str, float, list[Reading]]]
    units: int
    width: Literal[16, 32]


@st.composite
def streams(draw: st.DrawFn, max_size: int = 60) -> Stream:
    """Production on a counter with wraps, restarts from 0 and unreadable stretches, statuses good and bad,
    gaps, ticks and PLC losses; ``units`` is what a good sample showed after the first one."""
    width: Literal[16, 32] = draw(st.sampled_from([16, 32]))
    modulus, limit = 2**width, 2**width // 4
    t = float(draw(st.integers(int(utc("2026-01-01T00:00:00")), int(utc("2027-01-01T00:00:00")))))
    value = draw(st.integers(0, modulus - 1))
    counted, unseen, baseline = 0, 0, False
    calls: list[tuple[str, float, list[Reading]]] = []
    steps = draw(st.lists(st.tuples(
        st.one_of(st.floats(0, 900), st.sampled_from([0.0, 300.0, 3600.0, -120.0]), st.floats(0, 40000)),
        st.sampled_from(["read", "read", "read", "read", "empty", "tick", "lost", "back", "restart-from-0"]),
        st.sampled_from(STATUSES), st.integers(0, 250), st.sampled_from([3000, 2400, 0, None]),
        st.booleans()), max_size=max_size))
    for dt, kind, status, made, target, counter_good in steps:
        t += dt
        if kind == "restart-from-0" and baseline and unseen == 0 and (made - value) % modulus >= limit:
            value, counted = made, counted + made  # the PLC restarted and has counted `made` since
            calls.append(("read", t, [good("units_total", value)]))
            continue
        value, unseen = (value + made) % modulus, unseen + made
        if kind in ("tick", "back"):
            calls.append((kind, t, []))
            continue
        if kind == "lost":
            calls.append((kind, t, [bad("units_total"), bad("status")]))
            continue
        readings = []
        if kind == "read":
            stat = {"bad": bad("status"), "uncertain": Reading(ASSET, "status", 9, UNCERTAIN, "code 9", None, 0.0)}
            readings.append(stat.get(str(status), good("status", status)))
            readings.append(good("target_units_per_hour", target) if target is not None else bad("target"))
            readings.append(good("units_total", value) if counter_good else bad("units_total"))
            if counter_good:
                counted, unseen, baseline = counted + (unseen if baseline else 0), 0, True
        calls.append(("read", t, readings))
    return Stream(calls, counted, width)


def play(tr: ShiftTracker, calls: Sequence[tuple[str, float, list[Reading]]]) -> list[Summary]:
    out: list[Summary] = []
    for kind, t, readings in calls:
        if kind == "tick":
            out += tr.tick(t)
        elif kind in ("lost", "back"):
            if readings:
                out += tr.update(readings, t)
            out += tr.device(kind == "back", t)
        else:
            out += tr.update(readings, t)
    return out


def latest(calls: Sequence[tuple[str, float, list[Reading]]], since: float = 0.0) -> float:
    return max((t for _, t, _ in calls), default=since)


def flush(tr: ShiftTracker, calls: Sequence[tuple[str, float, list[Reading]]], since: float = 0.0) -> list[Summary]:
    """Close the shift of the last call: time passes, nothing comes."""
    return tr.tick(latest(calls, since) + 2 * 86400)


def spec_for(width: Literal[16, 32], other_as_downtime: bool = False) -> ProductionSpec:
    downtime = ["paused", "error", "maintenance", *(OTHER if other_as_downtime else [])]
    return ProductionSpec(counter="units_total", width=width, target="target_units_per_hour", downtime=downtime)


@settings(max_examples=80, deadline=None)
@given(stream=streams(), cut=st.integers(0, 60))
def test_a_restart_at_any_point_gives_the_same_summaries(stream: Stream, cut: int) -> None:
    spec = spec_for(stream.width)
    whole = tracker(spec)
    expected = play(whole, stream.calls) + flush(whole, stream.calls)
    cut = min(cut, len(stream.calls))
    first = tracker(spec)
    out = play(first, stream.calls[:cut])
    second = tracker(spec)
    state = orjson.loads(orjson.dumps(first.snapshot()))
    second.restore(state, latest(stream.calls[:cut]))
    assert second.snapshot() == first.snapshot()
    out += play(second, stream.calls[cut:]) + flush(second, stream.calls)
    assert out == expected


@settings(max_examples=80, deadline=None)
@given(stream=streams(), cut=st.integers(0, 60), down=st.floats(0, 20000))
def test_units_are_the_counter_increase_even_across_a_restart_with_lost_time(stream: Stream, cut: int,
                                                                             down: float) -> None:
    spec = spec_for(stream.width)
    first = tracker(spec)
    out = play(first, stream.calls[:cut])
    back = latest(stream.calls[:cut]) + down
    later = [(kind, t + down, r) for kind, t, r in stream.calls[cut:]]
    second = restarted(first, back, spec)
    out += play(second, later) + flush(second, later, back)
    assert sum(int(num(s, "units_produced")) for s in out) == stream.units


@settings(max_examples=80, deadline=None)
@given(stream=streams())
def test_every_minute_of_a_shift_is_run_downtime_other_or_missing(stream: Stream) -> None:
    a, b = tracker(spec_for(stream.width)), tracker(spec_for(stream.width, other_as_downtime=True))
    summaries = play(a, stream.calls) + flush(a, stream.calls)
    wider = play(b, stream.calls) + flush(b, stream.calls)
    assert len(summaries) == len(wider)
    for s, w in zip(summaries, wider, strict=True):
        assert (s["start"], s["run_time_hours"], s["missing_minutes"]) == (w["start"], w["run_time_hours"],
                                                                            w["missing_minutes"])
        downtime = s["downtime_minutes"]
        wide = w["downtime_minutes"]
        assert isinstance(downtime, dict) and isinstance(wide, dict)
        other = sum(wide[k] for k in OTHER)
        total = num(s, "run_time_hours") * 60 + num(s, "downtime_total_minutes") + other + num(s, "missing_minutes")
        assert total == pytest.approx(num(s, "duration_hours") * 60, abs=0.05)  # rounded to 0.001 h
        assert (s["missing_minutes"] == 0) is s["complete"]
        availability, performance = s["availability"], s["performance"]
        assert availability is None or 0 <= num(s, "availability") <= 1
        assert performance is None or num(s, "performance") >= 0
    assert all(str(x["end"]) <= str(y["start"]) for x, y in pairwise(summaries))  # a week back at most


def local_length(summary: Summary, calendar: Calendar) -> float:
    """Hours from the summary's local start to the calendar's next local start, by plain zoneinfo arithmetic."""
    start = datetime.fromisoformat(str(summary["start"])).astimezone(TZ)
    starts = [dtime.fromisoformat(s) for s in calendar.shifts]
    later = [s for s in starts if s > start.time()]
    day = start.date() + timedelta(days=0 if later else 1)
    nxt = datetime.combine(day, later[0] if later else starts[0], TZ)
    return (nxt.timestamp() - start.timestamp()) / 3600


NIGHTS = {"2026-03-28": 7.0, "2026-10-24": 9.0}


@settings(max_examples=40, deadline=None)
@given(
    around=st.sampled_from(["2026-03-28 18:00", "2026-10-24 18:00", "2026-12-31 18:00", "2026-03-29 00:00"]),
    offset=st.floats(0, 12 * 3600),
    steps=st.lists(st.floats(1, 900), min_size=150, max_size=200),
    shifts=st.sampled_from([("06:00", "14:00", "22:00"), ("00:00",), ("07:30", "19:30")]),
)
def test_shifts_across_midnight_and_dst_have_their_local_length(around: str, offset: float, steps: list[float],
                                                               shifts: tuple[str, ...]) -> None:
    calendar = Calendar(MADRID, shifts)
    tr = tracker(ProductionSpec(counter="units_total"), calendar, names=None)
    t = at(around) + offset
    out: list[Summary] = []
    for dt in steps:
        t += dt
        out += tr.update(RUN, t)
    out += tr.tick(t + 86400)
    for s in out:
        assert num(s, "duration_hours") == round(local_length(s, calendar), 3)
        start = datetime.fromisoformat(str(s["start"])).astimezone(TZ)
        assert (s["shift_date"], calendar.shifts[int(num(s, "shift")) - 1]) == (start.date().isoformat(),
                                                                               start.strftime("%H:%M"))
        if shifts == ("06:00", "14:00", "22:00") and s["shift"] == 3 and s["shift_date"] in NIGHTS:
            assert s["duration_hours"] == NIGHTS[str(s["shift_date"])]
    assert all(x["end"] == y["start"] for x, y in pairwise(out))
