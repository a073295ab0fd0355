"""Tests for gateway/derived.py: counters through wraps and resets, local days and shifts across DST, restarts."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Literal
from zoneinfo import ZoneInfo

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from gateway.derived import (
    Availability,
    Calendar,
    CounterRate,
    DailyCount,
    Derived,
    DerivedSpec,
    Efficiency,
    StatusTime,
    counter_step,
)
from gateway.model import Quality, Reading

MADRID = "Europe/Madrid"
SHIFTS = ("06:00", "14:00", "22:00")
CAL = Calendar(MADRID, SHIFTS)
ASSET = "filling-1"
SPEC: TypeAdapter[DerivedSpec] = TypeAdapter(DerivedSpec)
GOOD, UNCERTAIN, BAD = Quality.GOOD, Quality.UNCERTAIN, Quality.BAD


def at(wall: str, tz: str = MADRID, fold: int = 0) -> float:
    """Epoch of a local wall time "YYYY-MM-DD HH:MM[:SS]"; fold=1 picks the second of a repeated hour."""
    return datetime.fromisoformat(wall).replace(tzinfo=ZoneInfo(tz), fold=fold).timestamp()


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def good(tag: str, value: object) -> Reading:
    return Reading(ASSET, tag, value, GOOD, None, None, 0.0)


def bad(tag: str, reason: str = "timeout") -> Reading:
    return Reading(ASSET, tag, None, BAD, reason, None, 0.0)


def spec(**fields: object) -> DerivedSpec:
    return SPEC.validate_python(fields)


def derived(calendar: Calendar = CAL, **specs: DerivedSpec) -> Derived:
    return Derived(ASSET, specs, calendar)


def value_of(out: list[Reading], name: str) -> Reading:
    return next(r for r in out if r.tag == name)


# --------------------------------------------------------------------------------------------
# Specs (the tag map's `derived:` section)
# --------------------------------------------------------------------------------------------


def test_specs_parse_with_defaults() -> None:
    rate = spec(kind="counter_rate", counter="units_total", window="2m")
    assert rate == CounterRate(kind="counter_rate", counter="units_total", window=120.0)
    assert isinstance(rate, CounterRate)
    assert (rate.width, rate.max_step, rate.step_limit, rate.unit) == (32, None, 2**30, "units/h")
    daily = spec(kind="daily_count", counter="error_count", max_step=100)
    assert isinstance(daily, DailyCount)
    assert (daily.width, daily.step_limit) == (16, 100)
    avail = spec(kind="availability")
    assert isinstance(avail, Availability)
    assert (avail.tag, avail.up, avail.max_gap, avail.unit) == ("status", ["running"], 300.0, "%")
    st_ = spec(kind="status_time", status="error", max_gap="1m")
    assert isinstance(st_, StatusTime)
    assert (st_.max_gap, st_.unit) == (60.0, "s")
    eff = spec(kind="efficiency", rate="units_rate", target="target_units_per_hour")
    assert isinstance(eff, Efficiency)
    assert eff.inputs() == {"units_rate", "target_units_per_hour"}
    assert rate.inputs() == {"units_total"} and avail.inputs() == {"status"}


@pytest.mark.parametrize(("fields", "fragment"), [
    ({"kind": "moving_average", "tag": "x"}, "does not match any of the expected tags"),
    ({"kind": "counter_rate", "counter": "units_total", "every": "1s"}, "Extra inputs are not permitted"),
    ({"kind": "counter_rate", "counter": "units_total", "width": 24}, "Input should be 16, 32 or 64"),
    ({"kind": "counter_rate", "counter": "units_total", "window": "fast"}, "'fast' is not a duration"),
    ({"kind": "counter_rate", "counter": "units_total", "window": "0.5s"}, "greater than or equal to 1"),
    ({"kind": "counter_rate", "counter": "units_total", "max_step": 0}, "greater than or equal to 1"),
    ({"kind": "daily_count", "counter": "error_count", "max_step": 70000}, "exceeds the counter's range (2**16)"),
    ({"kind": "efficiency", "rate": "target", "target": "target"}, "rate and target name the same value"),
    ({"kind": "availability", "up": []}, "at least 1 item"),
    ({"kind": "status_time"}, "Field required"),
    ({"kind": "counter_rate", "counter": "Units Total"}, "should match pattern"),
])
def test_spec_errors(fields: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(fragment)):
        SPEC.validate_python(fields)


def test_specs_are_frozen() -> None:
    rate = CounterRate(kind="counter_rate", counter="units_total")
    with pytest.raises(ValidationError):
        rate.window = 10.0


def test_a_cycle_between_derived_values_is_refused() -> None:
    with pytest.raises(ValueError, match="cycle: a -> b -> a"):
        derived(a=spec(kind="efficiency", rate="b", target="t"), b=spec(kind="efficiency", rate="a", target="t"))
    with pytest.raises(ValueError, match="cycle: e -> e"):
        derived(e=spec(kind="efficiency", rate="e", target="t"))


# --------------------------------------------------------------------------------------------
# Counters
# --------------------------------------------------------------------------------------------

STEPS: list[tuple[int, int, int, int | None, int, bool]] = [
    # old, new, width, max_step, increase, reset
    (10, 15, 16, None, 5, False),
    (7, 7, 16, None, 0, False),
    (65535, 3, 16, None, 4, False),  # wrap: 65535 -> 0 is one step
    (65530, 9, 16, None, 15, False),
    (2**32 - 1, 2, 32, None, 3, False),
    (2**32 - 10, 5, 32, None, 15, False),
    (2**64 - 1, 0, 64, None, 1, False),
    (1000, 0, 16, None, 0, True),  # PLC restarted, counter back at 0
    (1000, 7, 16, None, 7, True),  # restarted and counted 7 since
    (40000, 30000, 32, None, 30000, True),  # not a plausible wrap: 2**32 - 10000 steps
    (4_000_000_000, 3_900_000_000, 32, None, 0, True),  # set back: the new value is only a new baseline
    (100, 50000, 16, None, 0, True),  # preset upwards: no 49900 units in one read
    (100, 50000, 16, 60000, 49900, False),
    (60000, 100, 16, 1000, 100, True),  # with a tight max_step a big drop is a reset, not a wrap
    (65000, 100, 16, 1000, 636, False),
]


@pytest.mark.parametrize("case", STEPS, ids=[f"{c[0]}-{c[1]}-u{c[2]}-{c[3]}" for c in STEPS])
def test_counter_step(case: tuple[int, int, int, int | None, int, bool]) -> None:
    old, new, width, max_step, increase, reset = case
    assert counter_step(old, new, width, max_step) == (increase, reset)


def run_counter(d: Derived, tag: str, values: list[int], t0: float, dt: float = 1.0) -> list[list[Reading]]:
    return [d.update([good(tag, v)], t0 + i * dt) for i, v in enumerate(values)]


T0 = at("2026-05-12 10:00")


def test_rate_of_steady_counting_after_warm_up() -> None:
    d = derived(rate=spec(kind="counter_rate", counter="units_total"))
    outs = run_counter(d, "units_total", [1000 + 2 * i for i in range(600)], T0)  # 2 units/s for 10 min
    for i in range(60):  # warm-up: samples must span a fifth of the 5 min window
        assert (outs[i][0].value, outs[i][0].quality, outs[i][0].reason) == (None, UNCERTAIN, "warming up")
    for out in outs[60:]:
        r = out[0]
        assert (r.asset, r.tag, r.value, r.quality, r.reason, r.source_ts) == (ASSET, "rate", 7200.0, GOOD, None, None)
    assert outs[-1][0].ts == T0 + 599
    assert d.resets == 0


def test_rate_follows_a_change_within_the_window() -> None:
    d = derived(rate=spec(kind="counter_rate", counter="units_total", window="2m"))
    values = list(range(300)) + [299 + 3 * i for i in range(1, 301)]  # 1/s, then 3/s
    outs = run_counter(d, "units_total", values, T0)
    assert outs[299][0].value == 3600.0
    assert outs[299 + 60][0].value == pytest.approx(7200.0)  # half the window at each speed
    assert outs[-1][0].value == 10800.0


@pytest.mark.parametrize("width", [16, 32])
def test_rate_is_steady_through_a_wrap(width: int) -> None:
    d = derived(rate=spec(kind="counter_rate", counter="units_total", width=width))
    modulus = 2**width
    values = [(modulus - 100 + 7 * i) % modulus for i in range(300)]  # wraps after 15 s
    outs = run_counter(d, "units_total", values, T0)
    assert {out[0].value for out in outs[60:]} == {25200.0}
    assert d.resets == 0


@pytest.mark.parametrize(("before", "after", "width"), [
    (list(range(50_000, 60_000, 10)), list(range(0, 4000, 10)), 32),  # restart from 0
    (list(range(20_000, 30_000, 10)), list(range(0, 4000, 10)), 16),
    ([4_000_000_000 + 10 * i for i in range(1000)], [3_900_000_000 + 10 * i for i in range(400)], 32),  # set back
    (list(range(50_000, 60_000, 10)), [2_000_000_000 + 10 * i for i in range(400)], 32),  # preset upwards
])
def test_a_reset_is_counted_and_never_gives_a_huge_or_negative_rate(before: list[int], after: list[int],
                                                                     width: int) -> None:
    d = derived(rate=spec(kind="counter_rate", counter="units_total", width=width))
    outs = run_counter(d, "units_total", before + after, T0)  # 10 units/s = 36000 units/h
    assert d.resets == 1
    rates = [out[0].value for out in outs[60:]]
    assert all(isinstance(r, float) and 0 <= r <= 36000.0 for r in rates)
    assert rates[-1] == 36000.0


def test_bad_counter_makes_the_rate_bad_until_good_returns() -> None:
    d = derived(rate=spec(kind="counter_rate", counter="units_total"))
    run_counter(d, "units_total", list(range(0, 1200, 10)), T0)  # 120 s at 36000 units/h
    out = d.update([bad("units_total", "connection refused")], T0 + 120)
    assert (out[0].value, out[0].quality, out[0].reason) == (None, BAD, "units_total is bad: connection refused")
    assert d.update([], T0 + 125)[0].quality is BAD  # no news is not good news
    out = d.update([good("units_total", 1300)], T0 + 130)  # the counter went on while unreadable
    assert (out[0].value, out[0].quality) == (36000.0, GOOD)
    out = d.update([good("units_total", -5)], T0 + 131)
    assert (out[0].value, out[0].quality, out[0].reason) == (None, BAD, "units_total: -5 is not a uint32 count")
    out = d.update([Reading(ASSET, "units_total", 1400, UNCERTAIN, "stale", None, 0.0)], T0 + 132)
    assert (out[0].value, out[0].quality, out[0].reason) == (None, UNCERTAIN, "units_total is uncertain: stale")


def test_rate_warms_up_again_after_a_gap_longer_than_the_window() -> None:
    d = derived(rate=spec(kind="counter_rate", counter="units_total"))
    run_counter(d, "units_total", list(range(0, 1200, 10)), T0)
    for t in range(120, 1000, 10):
        d.update([bad("units_total")], T0 + t)
    out = d.update([good("units_total", 500_000)], T0 + 1000)  # when did these units happen? unknown
    assert (out[0].value, out[0].reason) == (None, "warming up")
    outs = run_counter(d, "units_total", [500_000 + 10 * i for i in range(1, 61)], T0 + 1001)
    assert outs[-1][0].value == 36000.0
    assert d.resets == 0


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_total_increase_is_the_sum_of_increments_below_max_step(data: st.DataObject) -> None:
    widths: list[Literal[16, 32, 64]] = [16, 32, 64]
    width = data.draw(st.sampled_from(widths))
    modulus = 2**width
    max_step = data.draw(st.none() | st.integers(1, modulus))
    limit = max_step if max_step is not None else modulus // 4
    start = data.draw(st.integers(0, modulus - 1))
    big = st.integers(limit - 3, limit - 1).filter(lambda n: n >= 0)
    increments = data.draw(st.lists(st.integers(0, min(limit - 1, 50)) | big, max_size=40))
    d = derived(today=DailyCount(kind="daily_count", counter="n", width=width, max_step=max_step))
    value = start
    d.update([good("n", value)], T0)
    for i, step in enumerate(increments, 1):
        value = (value + step) % modulus
        d.update([good("n", value)], T0 + i)
    assert d.update([], T0 + 100)[0].value == sum(increments)
    assert d.resets == 0


# --------------------------------------------------------------------------------------------
# Efficiency
# --------------------------------------------------------------------------------------------

NO = object()  # no reading of that tag at all

EFFICIENCY = [
    # units_per_hour, target_units_per_hour, value, quality, reason
    (6000, 8000, 75.0, GOOD, None),
    (9000.0, 8000, 112.5, GOOD, None),
    (0, 8000, 0.0, GOOD, None),
    (6000, 0, None, UNCERTAIN, "target_units_per_hour is 0: no target"),
    (6000, -5, None, UNCERTAIN, "target_units_per_hour is -5: no target"),
    (6000, NO, None, UNCERTAIN, "no target_units_per_hour reading yet"),
    (NO, 8000, None, UNCERTAIN, "no units_per_hour reading yet"),
    (6000, bad("target_units_per_hour"), None, BAD, "target_units_per_hour is bad: timeout"),
    (bad("units_per_hour"), 0, None, BAD, "units_per_hour is bad: timeout; target_units_per_hour is 0: no target"),
    (Reading(ASSET, "units_per_hour", 6000, UNCERTAIN, "stale", None, 0.0), 8000, 75.0, UNCERTAIN,
     "units_per_hour is uncertain: stale"),
    (6000, "fast", None, BAD, "target_units_per_hour: 'fast' is not a number"),
    (float("nan"), 8000, None, BAD, "units_per_hour: nan is not a number"),
    (True, 8000, None, BAD, "units_per_hour: True is not a number"),
]


@pytest.mark.parametrize(("rate", "target", "value", "quality", "reason"), EFFICIENCY)
def test_efficiency(rate: object, target: object, value: float | None, quality: Quality, reason: str | None) -> None:
    d = derived(eff=spec(kind="efficiency", rate="units_per_hour", target="target_units_per_hour"))
    readings = [r if isinstance(r, Reading) else good(tag, r)
                for tag, r in (("units_per_hour", rate), ("target_units_per_hour", target)) if r is not NO]
    out = d.update(readings, T0)
    assert (out[0].value, out[0].quality, out[0].reason) == (value, quality, reason)
    assert d.update([], T0 + 1)[0].value == value  # the latest readings hold until new ones come


def test_efficiency_of_a_derived_rate_listed_before_it() -> None:
    d = derived(eff=spec(kind="efficiency", rate="units_rate", target="target_units_per_hour"),
                units_rate=spec(kind="counter_rate", counter="units_total"))
    out: list[Reading] = []
    for i in range(61):
        out = d.update([good("units_total", 3 * i), good("target_units_per_hour", 12000)], T0 + i)
        if i == 0:
            assert (out[0].value, out[0].quality, out[0].reason) == (None, UNCERTAIN, "units_rate is uncertain: "
                                                                     "warming up")
    assert [r.tag for r in out] == ["eff", "units_rate"]
    assert [(r.value, r.quality) for r in out] == [(90.0, GOOD), (10800.0, GOOD)]


def test_readings_of_other_assets_and_other_tags_are_ignored() -> None:
    d = derived(eff=spec(kind="efficiency", rate="units_per_hour", target="target_units_per_hour"))
    out = d.update([Reading("capping-1", "units_per_hour", 1, GOOD, None, None, 0.0), good("units_per_hour", 50),
                    good("motor_temperature", 40.0), good("target_units_per_hour", 100)], T0)
    assert [(r.tag, r.value) for r in out] == [("eff", 50.0)]


# --------------------------------------------------------------------------------------------
# Errors today (local days, DST)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("day", "hours"), [("2026-05-12", 24), ("2026-03-29", 23), ("2026-10-25", 25)])
def test_errors_today_across_local_midnights(day: str, hours: int) -> None:
    """One error at half past every local hour: a day counts as many as it has hours; uint16 wraps on the way."""
    d = derived(errors_today=spec(kind="daily_count", counter="error_count"))
    zone = ZoneInfo(MADRID)
    start, end = at(f"{day} 00:00") - 600, at(f"{day} 00:00") + (hours + 1) * 3600 + 600
    count, expected = 65530, 0
    seen_today: list[int] = []
    t = start
    while t <= end:
        local = datetime.fromtimestamp(t, zone)
        if local.minute == 30:
            count = (count + 1) % 65536
        out = d.update([good("error_count", count)], t)[0]
        if local.date().isoformat() == day:
            expected += local.minute == 30
            assert (out.value, out.quality, out.reason) == (expected, GOOD, None)
            seen_today.append(out.value)  # type: ignore[arg-type]
        elif t < at(f"{day} 00:00"):
            assert (out.quality, out.reason) == (UNCERTAIN, "counting since 23:50")  # came up mid-day
        else:
            assert out.value == (local.hour * 60 + local.minute >= 30)  # the next day starts from 0
        t += 60
    assert seen_today[0] == 0
    assert seen_today[-1] == hours
    assert d.resets == 0


def test_errors_across_midnight_after_a_long_gap_are_not_put_on_the_new_day() -> None:
    d = derived(errors_today=spec(kind="daily_count", counter="error_count"))
    d.update([good("error_count", 10)], at("2026-05-12 22:00"))
    assert d.update([good("error_count", 12)], at("2026-05-12 23:00"))[0].value == 2
    for t in ("23:30", "23:59"):
        d.update([bad("error_count")], at(f"2026-05-12 {t}"))
    out = d.update([bad("error_count")], at("2026-05-13 00:00"))
    assert (out[0].value, out[0].quality) == (None, BAD)
    out = d.update([good("error_count", 15)], at("2026-05-13 01:00"))  # 3 errors, before or after midnight?
    assert (out[0].value, out[0].quality, out[0].reason) == (0, UNCERTAIN, "counting since 01:00")
    assert d.update([good("error_count", 16)], at("2026-05-13 01:01"))[0].value == 1


def test_errors_today_survive_a_plc_restart() -> None:
    d = derived(errors_today=spec(kind="daily_count", counter="error_count", max_step=1000))
    values = [60000, 60003, 3, 5]  # PLC restarted after 60003: 3 errors since, 5 in all after it
    outs = [d.update([good("error_count", v)], at("2026-05-12 00:00") + i * 60) for i, v in enumerate(values)]
    assert [o[0].value for o in outs] == [0, 3, 6, 8]
    assert d.resets == 1


# --------------------------------------------------------------------------------------------
# Status time and availability (shifts)
# --------------------------------------------------------------------------------------------

STATUS_SPECS: dict[str, DerivedSpec] = {
    "running_time": StatusTime(kind="status_time", status="running"),
    "paused_time": StatusTime(kind="status_time", status="paused"),
    "availability": Availability(kind="availability"),
}
CODE_7 = Reading(ASSET, "status", 7, UNCERTAIN, "code 7 not in enum", None, 0.0)

SHIFT_CHANGE = [
    # local time on 2026-05-12, status reading (or NO), running s, paused s, availability %
    ("21:50", "running", 0.0, 0.0, None),
    ("21:55", NO, 300.0, 0.0, 100.0),
    ("21:58", "paused", 480.0, 0.0, 100.0),
    ("22:00", NO, 0.0, 0.0, None),  # the 22:00 shift starts
    ("22:01", "running", 0.0, 60.0, 0.0),
    ("22:04", bad("status"), 180.0, 60.0, 75.0),
    ("22:06", "running", 180.0, 60.0, 75.0),  # two minutes unknown: in no status, not in availability
    ("22:07", NO, 240.0, 60.0, 80.0),
    ("22:20", NO, 240.0, 60.0, 80.0),  # 13 minutes without an update (gateway stopped): not counted
    ("22:21", CODE_7, 300.0, 60.0, 300 / 360 * 100),
    ("22:25", "running", 300.0, 60.0, 300 / 360 * 100),
    ("22:26", "running", 360.0, 60.0, 360 / 420 * 100),
]


def test_status_time_and_availability_across_a_shift_change() -> None:
    d = Derived(ASSET, STATUS_SPECS, CAL)
    for wall, status, running, paused, availability in SHIFT_CHANGE:
        readings = [] if status is NO else [status if isinstance(status, Reading) else good("status", status)]
        out = {r.tag: r for r in d.update(readings, at(f"2026-05-12 {wall}"))}
        assert (wall, out["running_time"].value, out["paused_time"].value) == (wall, running, paused)
        if availability is None:
            assert (out["availability"].value, out["availability"].quality) == (None, UNCERTAIN)
        else:
            assert out["availability"].value == pytest.approx(availability)
    d.update([bad("status", "timeout")], at("2026-05-12 22:27"))
    out = {r.tag: r for r in d.update([], at("2026-05-12 22:28"))}
    assert (out["running_time"].value, out["running_time"].quality, out["running_time"].reason) == (
        420.0, UNCERTAIN, "status is bad: timeout; time not counted")
    assert out["availability"].quality is UNCERTAIN


def test_status_time_before_any_status() -> None:
    d = Derived(ASSET, STATUS_SPECS, CAL)
    out = d.update([], T0)
    assert [(r.value, r.quality, r.reason) for r in out] == [(None, UNCERTAIN, "no status reading yet")] * 3


@pytest.mark.parametrize(("night", "hours"), [("2026-05-12", 8), ("2026-03-28", 7), ("2026-10-24", 9)])
def test_the_night_shift_runs_past_midnight(night: str, hours: int) -> None:
    d = Derived(ASSET, STATUS_SPECS, CAL)
    t, end = at(f"{night} 22:00"), at(f"{night} 22:00") + hours * 3600
    while t < end:
        out = d.update([good("status", "running")], t)
        t += 60
    assert out[0].value == hours * 3600 - 60  # the last update is at 05:59 local
    out = d.update([good("status", "running")], end)
    assert datetime.fromtimestamp(end, ZoneInfo(MADRID)).strftime("%H:%M") == "06:00"
    assert (out[0].value, out[2].value) == (0.0, None)  # the morning shift starts
    out = d.update([good("status", "running")], end + 60)
    assert (out[0].value, out[2].value) == (60.0, 100.0)


STATUSES = ["idle", "running", "paused", "maintenance", "error"]


@settings(max_examples=50, deadline=None)
@given(
    start=st.integers(int(utc("2026-01-01T00:00:00")), int(utc("2027-01-01T00:00:00"))),
    steps=st.lists(st.tuples(st.floats(0, 900), st.sampled_from([*STATUSES, "bad", "none"])), max_size=40),
    max_gap=st.sampled_from([60.0, 300.0, 3600.0]),
)
def test_status_times_never_exceed_the_elapsed_shift(start: int, steps: list[tuple[float, str]],
                                                     max_gap: float) -> None:
    specs: dict[str, DerivedSpec] = {s: StatusTime(kind="status_time", status=s, max_gap=max_gap) for s in STATUSES}
    specs["availability"] = Availability(kind="availability", up=["running", "idle"], max_gap=max_gap)
    d = Derived(ASSET, specs, CAL)
    t = float(start)
    for dt, status in steps:
        t += dt
        readings = {"bad": [bad("status")], "none": []}.get(status, [good("status", status)])
        out = {r.tag: r.value for r in d.update(readings, t)}
        times = [v for s in STATUSES if isinstance(v := out[s], float)]
        assert sum(times) <= t - CAL.shift_start(t) + 1e-6
        availability = out["availability"]
        assert availability is None or (isinstance(availability, float) and 0 <= availability <= 100 + 1e-9)


# --------------------------------------------------------------------------------------------
# Calendar
# --------------------------------------------------------------------------------------------

DAY_STARTS = [
    # tz, instant, start of its local day
    ("UTC", utc("2026-05-12T10:00:00"), utc("2026-05-12T00:00:00")),
    ("UTC", utc("2026-05-12T00:00:00"), utc("2026-05-12T00:00:00")),
    ("UTC", 1893455999.9999998, utc("2029-12-31T00:00:00")),  # fromtimestamp would round it to the next day
    (MADRID, at("2026-05-12 00:00"), utc("2026-05-11T22:00:00")),
    (MADRID, at("2026-05-11 23:59:59"), utc("2026-05-10T22:00:00")),
    (MADRID, at("2026-03-29 12:00"), utc("2026-03-28T23:00:00")),  # a 23 h day
    (MADRID, at("2026-03-30 00:30"), utc("2026-03-29T22:00:00")),
    (MADRID, at("2026-10-25 02:30", fold=1), utc("2026-10-24T22:00:00")),  # a 25 h day
    (MADRID, at("2026-10-25 23:59"), utc("2026-10-24T22:00:00")),
    (MADRID, at("2026-10-26 00:00"), utc("2026-10-25T23:00:00")),
    ("America/Santiago", at("2026-09-06 12:00", "America/Santiago"), utc("2026-09-06T04:00:00")),  # no midnight
    ("America/Santiago", utc("2026-04-05T03:30:00"), utc("2026-04-04T03:00:00")),  # 23:30 twice: still the 4th
    ("Asia/Kolkata", utc("2026-05-12T18:29:00"), utc("2026-05-11T18:30:00")),
]


@pytest.mark.parametrize(("tz", "ts", "start"), DAY_STARTS)
def test_day_start(tz: str, ts: float, start: float) -> None:
    assert Calendar(tz).day_start(ts) == start


SHIFT_STARTS = [
    # instant (Madrid, 06:00/14:00/22:00), start of its shift
    (at("2026-05-12 05:59"), at("2026-05-11 22:00")),
    (at("2026-05-12 06:00"), at("2026-05-12 06:00")),
    (at("2026-05-12 13:59:59"), at("2026-05-12 06:00")),
    (at("2026-05-12 14:00"), at("2026-05-12 14:00")),
    (at("2026-05-12 23:30"), at("2026-05-12 22:00")),
    (at("2026-05-13 00:30"), at("2026-05-12 22:00")),
    (at("2026-03-29 03:30"), utc("2026-03-28T21:00:00")),  # 22:00 CET, a 7 h night
    (at("2026-03-29 06:00"), utc("2026-03-29T04:00:00")),
    (at("2026-10-25 05:59"), utc("2026-10-24T20:00:00")),  # 22:00 CEST, a 9 h night
    (at("2026-10-25 06:00"), utc("2026-10-25T05:00:00")),
]


@pytest.mark.parametrize(("ts", "start"), SHIFT_STARTS)
def test_shift_start(ts: float, start: float) -> None:
    assert CAL.shift_start(ts) == start


def test_shift_starts_at_skipped_or_repeated_times() -> None:
    cal = Calendar(MADRID, ("02:30", "14:00"))
    assert cal.shift_start(at("2026-03-29 03:10")) == utc("2026-03-29T01:00:00")  # 02:30 skipped: the jump
    assert cal.shift_start(at("2026-03-29 01:59")) == at("2026-03-28 14:00")
    assert cal.shift_start(at("2026-10-25 02:40", fold=1)) == at("2026-10-25 02:30")  # the first 02:30
    assert Calendar().shift_start(utc("2026-05-12T10:00:00")) == utc("2026-05-12T00:00:00")


@pytest.mark.parametrize(("tz", "shifts", "fragment"), [
    ("Mars/Olympus_Mons", ("00:00",), "unknown time zone 'Mars/Olympus_Mons'"),
    ("", ("00:00",), "unknown time zone ''"),
    ("Europe", ("00:00",), "unknown time zone 'Europe'"),
    ("../etc/passwd", ("00:00",), "unknown time zone"),
    (MADRID, ("25:00",), "shift start '25:00' is not a time of day HH:MM"),
    (MADRID, ("6:00",), "shift start '6:00' is not"),
    (MADRID, ("06:60",), "shift start '06:60' is not"),
    (MADRID, ("06:00", 14), "shift start 14 is not"),
    (MADRID, (), "non-empty list of HH:MM"),
    (MADRID, "06:00", "non-empty list of HH:MM"),
    (MADRID, ("14:00", "06:00"), "must ascend within the day: 06:00 comes after 14:00"),
    (MADRID, ("06:00", "06:00"), "must ascend"),
])
def test_calendar_errors(tz: str, shifts: tuple[str, ...], fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        Calendar(tz, shifts)


@settings(max_examples=200, deadline=None)
@given(
    ts=st.floats(utc("2020-01-01T00:00:00"), utc("2030-01-01T00:00:00")),
    tz=st.sampled_from([MADRID, "America/Santiago", "Australia/Lord_Howe", "Asia/Kolkata", "UTC"]),
)
def test_days_and_shifts_contain_the_instant(ts: float, tz: str) -> None:
    cal = Calendar(tz, SHIFTS)
    day = cal.day_start(ts)
    assert day <= ts < day + 25 * 3600
    assert cal.day_start(day) == day
    shift = cal.shift_start(ts)
    assert day - 10 * 3600 <= shift <= ts < shift + 10 * 3600
    assert cal.shift_start(shift) == shift


# --------------------------------------------------------------------------------------------
# Snapshot and restore
# --------------------------------------------------------------------------------------------

PLANT_SPECS: dict[str, DerivedSpec] = {
    "units_rate": CounterRate(kind="counter_rate", counter="units_total"),
    "efficiency": Efficiency(kind="efficiency", rate="units_rate", target="target_units_per_hour"),
    "errors_today": DailyCount(kind="daily_count", counter="error_count"),
    **STATUS_SPECS,
}


def plant(i: int) -> list[Reading]:
    """Minute-by-minute station readings: 40 units/min, an error every 7 min, paused every 10th minute."""
    return [good("units_total", (2**32 - 1000 + 40 * i) % 2**32), good("error_count", (65530 + i // 7) % 65536),
            good("target_units_per_hour", 3000), good("status", "paused" if i % 10 == 9 else "running")]


def feed(d: Derived, minutes: range, t0: float) -> list[list[Reading]]:
    return [d.update(plant(i), t0 + 60 * i) for i in minutes]


def test_snapshot_round_trip_continues_the_same_numbers() -> None:
    t0 = at("2026-05-12 13:00")
    first = Derived(ASSET, PLANT_SPECS, CAL)
    feed(first, range(0, 90), t0)  # over the 14:00 shift change
    state = orjson.loads(orjson.dumps(first.snapshot()))
    second = Derived(ASSET, PLANT_SPECS, CAL)
    second.restore(state, t0 + 60 * 90)
    a, b = feed(first, range(90, 120), t0), feed(second, range(90, 120), t0)
    assert a == b
    final = {r.tag: (r.value, r.quality) for r in b[-1]}
    assert final["units_rate"] == (2400.0, GOOD)
    assert final["efficiency"] == (80.0, GOOD)
    assert final["errors_today"] == (119 // 7, UNCERTAIN)  # counting since 13:00, not midnight
    minutes = range(60, 119)  # 14:00 to 14:58, each to the status read at its start
    assert final["running_time"] == (60.0 * sum(i % 10 != 9 for i in minutes), GOOD)
    assert final["paused_time"] == (60.0 * sum(i % 10 == 9 for i in minutes), GOOD)


@pytest.mark.parametrize("state", [
    {},
    {"version": 99, "counters": {}},
    {"version": 1, "counters": "x", "rates": None, "daily": [], "clocks": 3},
    {"version": 1,
     "counters": {"units_total/32/1073741824": {"last": "a", "total": 1, "t": 0},
                  "error_count/16/16384": {"last": 70000, "total": 3, "t": 1.0}},
     "rates": {"units_rate": [[1, "x"]]},
     "daily": {"errors_today": {"day": None, "base": -1, "since": "noon"}},
     "clocks": {"status/300": [1, 2]}},
    {"version": 1,
     "counters": {"units_total/32/1073741824": {"last": 5, "total": 10, "t": 9e99}},
     "rates": {"units_rate": [[1.0, 10], [0.5, 20]]},
     "daily": {"errors_today": {"day": 9e99, "base": 1, "since": 9e99}},
     "clocks": {"status/300": {"shift": 0, "last_t": 1.0, "current": 5, "durations": {"running": -1}}}},
])
def test_restore_ignores_garbage(state: dict[str, object]) -> None:
    t0 = at("2026-05-12 13:00")
    restored, fresh = Derived(ASSET, PLANT_SPECS, CAL), Derived(ASSET, PLANT_SPECS, CAL)
    restored.restore(state, t0)
    assert feed(restored, range(0, 30), t0) == feed(fresh, range(0, 30), t0)


def test_restore_of_rate_totals_beyond_the_counter_is_ignored() -> None:
    t0 = at("2026-05-12 13:00")
    first = Derived(ASSET, PLANT_SPECS, CAL)
    feed(first, range(0, 10), t0)
    state = first.snapshot()
    state["counters"] = {}  # rate samples without the counter they came from would give a negative rate
    restored, fresh = Derived(ASSET, PLANT_SPECS, CAL), Derived(ASSET, PLANT_SPECS, CAL)
    restored.restore(state, t0 + 600)
    counted = {"units_rate", "efficiency", "errors_today"}
    assert [[r for r in out if r.tag in counted] for out in feed(restored, range(10, 20), t0)] == \
        [[r for r in out if r.tag in counted] for out in feed(fresh, range(10, 20), t0)]


def test_restore_from_an_earlier_day_starts_fresh() -> None:
    t0 = at("2026-05-12 15:00")
    first = Derived(ASSET, PLANT_SPECS, CAL)
    out = feed(first, range(0, 60), t0)[-1]
    assert value_of(out, "errors_today").value == 59 // 7
    state = orjson.loads(orjson.dumps(first.snapshot()))
    second = Derived(ASSET, PLANT_SPECS, CAL)
    t1 = at("2026-05-13 10:00")
    second.restore(state, t1)
    out = second.update(plant(70), t1)
    assert (value_of(out, "errors_today").value, value_of(out, "errors_today").reason) == (0, "counting since 10:00")
    assert value_of(out, "running_time").value == 0.0
    assert value_of(out, "units_rate").reason == "warming up"
    assert second.resets == 0


def test_restore_within_the_day_counts_what_happened_while_stopped() -> None:
    t0 = at("2026-05-12 00:00")
    first = Derived(ASSET, PLANT_SPECS, CAL)
    feed(first, range(0, 60), t0)
    state = orjson.loads(orjson.dumps(first.snapshot()))
    second = Derived(ASSET, PLANT_SPECS, CAL)
    second.restore(state, t0 + 3 * 3600)
    out = second.update(plant(180), t0 + 180 * 60)  # stopped two hours: the errors meanwhile count today
    errors = value_of(out, "errors_today")
    assert (errors.value, errors.quality) == (180 // 7, GOOD)
    assert value_of(out, "running_time").value == 60.0 * (59 - 5)  # the stop itself is not counted
