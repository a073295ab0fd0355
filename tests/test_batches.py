"""Batch tracking (gateway/batches.py): tables for the lifecycle and its edge cases, and properties of
the record: restart at any point changes nothing, statistics agree with a reference computed here
from the raw stream, time outside a band matches to the sample."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.batches import BatchSpec, BatchTracker
from gateway.buffer import Buffer
from gateway.model import Quality, Reading
from gateway.poller import DeviceBatch
from gateway.rules import Rule, State, Transition
from gateway.tagmap import load_tag_map

from .helpers import PLANT

T0 = 1_800_000_000.0
REACTOR = load_tag_map(PLANT).asset("reactor-a")
DEVICE = "reactors-plc"


def tracker(**spec: object) -> BatchTracker:
    base = REACTOR.batch
    assert base is not None
    s = base.model_copy(update=spec) if spec else base
    return BatchTracker(REACTOR.id, s, REACTOR.rules, units={n: t.unit for n, t in REACTOR.tags.items()},
                        devices={n: t.device for n, t in REACTOR.tags.items()})


def r(tag: str, value: object, ts: float = T0, quality: Quality = Quality.GOOD) -> Reading:
    return Reading("reactor-a", tag, value if quality is Quality.GOOD else None, quality,
                   None if quality is Quality.GOOD else "sensor", None, ts)


def steady(ph: float = 7.0, density: float = 1.02, temperature: float = 60.0, pressure: float = 1.5) -> list[Reading]:
    return [r("temperature", temperature), r("pressure", pressure), r("ph_level", ph), r("ph_target", 7.0),
            r("density", density), r("density_target", 1.02)]


def records(out: Iterable[dict[str, object]]) -> list[dict[str, object]]:
    return [o for o in out if o["event"] == "batch-record"]


def run(t: BatchTracker, stream: list[tuple[float, list[Reading]]]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for now, readings in stream:
        out += t.update(readings, now)
    return out


def cycle(batch: str = "B-1", *, ph: float = 7.0, start: float = T0) -> list[tuple[float, list[Reading]]]:
    """idle, then a batch through heating, mixing, cooling, transferring, ended by cleaning."""
    phases = [("idle", 0), ("heating", 10), ("mixing", 70), ("cooling", 160), ("transferring", 220), ("cleaning", 250)]
    stream: list[tuple[float, list[Reading]]] = [(start, [r("status", "idle"), r("batch_id", "B-0"),
                                                          r("recipe_id", "RCP-1"), *steady()])]
    for phase, at in phases[1:]:
        readings = [r("status", phase)]
        if phase == "heating":
            readings.append(r("batch_id", batch))
        stream.append((start + at, readings + steady(ph=ph if phase in ("mixing",) else 7.0)))
    return stream


def test_a_batch_from_heating_to_cleaning() -> None:
    t = tracker()
    out = run(t, cycle())
    events = [o for o in out if o["event"] == "batch-status-change"]
    assert [(e["old_status"], e["new_status"]) for e in events] == [
        ("idle", "heating"), ("heating", "mixing"), ("mixing", "cooling"), ("cooling", "transferring"),
        ("transferring", "cleaning")]
    assert events[0]["progress_percentage"] == 0.0 and events[-1]["progress_percentage"] == pytest.approx(100.0)
    [rec] = records(out)
    assert (rec["batch_id"], rec["recipe_id"], rec["end_reason"]) == ("B-1", "RCP-1", "phase cleaning")
    assert (rec["start"], rec["end"], rec["duration_s"]) == (T0 + 10, T0 + 250, 240.0)
    assert [(p["phase"], p["duration_s"]) for p in rec["phases"]] == [  # type: ignore[union-attr]
        ("heating", 60.0), ("mixing", 90.0), ("cooling", 60.0), ("transferring", 30.0)]
    assert rec["passed"] is True and rec["complete"] is True
    params = {p["parameter_name"]: p for p in rec["parameters"]}  # type: ignore[union-attr]
    assert set(params) == {"temperature", "pressure", "ph_level", "density"}
    ph = params["ph_level"]
    assert (ph["target_value"], ph["tolerance_min"], ph["tolerance_max"]) == (7.0, pytest.approx(6.8),
                                                                            pytest.approx(7.2))
    assert (params["temperature"]["tolerance_min"], params["temperature"]["tolerance_max"]) == (5.0, 85.0)
    assert params["density"]["tolerance_max"] == pytest.approx(1.02 * 1.02)
    assert t.context() == {"batch_id": None, "recipe_id": None}


def test_out_of_tolerance_ph_fails_the_batch_naming_the_parameter() -> None:
    [rec] = records(run(tracker(), cycle(ph=7.5)))  # 90 s of mixing at pH 7.5 against 7.0 +- 0.2
    assert rec["passed"] is False
    assert "ph_level: outside ph_level_target for 90.0 s" in str(rec["reason"])
    ph = next(p for p in rec["parameters"] if p["parameter_name"] == "ph_level")  # type: ignore[union-attr]
    assert ph["time_outside_s"] == {"ph_level_target": 90.0} and ph["passed"] is False
    assert ph["max"] == 7.5 and ph["min"] == 7.0
    assert ph["mean"] == pytest.approx((7.0 * 60 + 7.5 * 90 + 7.0 * 90) / 240)


def test_an_excursion_shorter_than_the_rules_delay_passes() -> None:
    stream = cycle()
    # 4 s at pH 7.5 in mixing: the rule's on-delay is 5 s
    stream.insert(3, (T0 + 100, [r("ph_level", 7.5)]))
    stream.insert(4, (T0 + 104, [r("ph_level", 7.0)]))
    [rec] = records(run(tracker(), sorted(stream, key=lambda x: x[0])))
    ph = next(p for p in rec["parameters"] if p["parameter_name"] == "ph_level")  # type: ignore[union-attr]
    assert ph["time_outside_s"] == {"ph_level_target": 4.0}
    assert rec["passed"] is True


def test_a_new_batch_id_mid_batch_ends_one_and_starts_the_next() -> None:
    t = tracker()
    out = run(t, cycle()[:3])
    out += t.update([r("batch_id", "B-2")], T0 + 100)
    [rec] = records(out)
    assert (rec["batch_id"], rec["end_reason"], rec["end"]) == ("B-1", "new batch id", T0 + 100)
    assert t.context()["batch_id"] == "B-2"


def test_started_before_the_gateway_saw_it() -> None:
    t = tracker()
    out = t.update([r("status", "mixing"), r("batch_id", "B-7"), r("recipe_id", "RCP-1"), *steady()], T0)
    assert [(e["old_status"], e["new_status"], e["batch_id"]) for e in out] == [(None, "mixing", "B-7")]
    out = t.update([r("status", "cleaning")], T0 + 30)
    [rec] = records(out)
    assert rec["observed_from"] == T0 and rec["complete"] is False and rec["passed"] is True


def test_a_device_lost_for_part_of_the_batch_is_missing_time_never_a_pass() -> None:
    t = tracker()
    stream = cycle()
    out = run(t, stream[:3])  # into mixing at T0 + 70
    t.device(DEVICE, False, T0 + 80)
    t.device(DEVICE, True, T0 + 110)  # 30 s lost: 12.5 % of the batch, more than max_missing 5 %
    out += run(t, stream[3:])
    [rec] = records(out)
    assert rec["passed"] is False and rec["complete"] is False
    for p in rec["parameters"]:  # type: ignore[union-attr]
        assert p["missing_s"] == 30.0
        assert "readings missing for 30.0 s (12.5 % of the batch" in p["reason"]


def test_a_bad_sensor_is_missing_time_for_its_parameter_only() -> None:
    t = tracker(max_missing=50.0)
    stream = cycle()
    out = run(t, stream[:3])
    out += t.update([r("temperature", None, quality=Quality.BAD)], T0 + 80)
    out += t.update([r("temperature", 61.0)], T0 + 90)
    out += run(t, stream[3:])
    [rec] = records(out)
    params = {p["parameter_name"]: p for p in rec["parameters"]}  # type: ignore[union-attr]
    assert params["temperature"]["missing_s"] == 10.0 and params["pressure"]["missing_s"] == 0.0
    assert params["temperature"]["max"] == 61.0 and rec["passed"] is True and rec["complete"] is False


def test_alarms_raised_during_the_batch_are_counted() -> None:
    t = tracker()
    run(t, cycle()[:3])

    def raised(ts: float, previous: State = State.NORMAL) -> Transition:
        return Transition("reactor-a/temperature_high", "reactor-a", "temperature", "high", "temperature_high",
                          "PROD009", "high", State.ACTIVE_UNACKED, previous, True, 90.0, "degC", 85.0, None, 5.9,
                          "hot", "condition", ts)

    t.alarms([raised(T0 + 80), raised(T0 + 120, State.CLEARED_UNACKED)])
    [rec] = records(run(t, cycle()[3:]))
    assert rec["alarms"] == [{"tag": "temperature", "code": "PROD009", "severity": "high", "count": 2,
                              "first_raised": T0 + 80}]


# -- properties ----------------------------------------------------------------------------------
values = st.floats(6.0, 8.0, allow_nan=False)
steps = st.lists(st.tuples(st.floats(0.1, 20.0), values, st.booleans()), min_size=1, max_size=40)


def _stream(points: list[tuple[float, float, bool]]) -> list[tuple[float, list[Reading]]]:
    stream = cycle()[:2]  # idle, then heating with batch B-1 at T0 + 10
    now = T0 + 10
    for dt, ph, good in points:
        now += dt
        stream.append((now, [r("ph_level", ph if good else None, quality=Quality.GOOD if good else Quality.BAD)]))
    stream.append((now + 5, [r("status", "cleaning")]))
    return stream


@settings(max_examples=60, deadline=None)
@given(steps, st.data())
def test_a_restart_at_any_point_gives_the_same_record(points: list[tuple[float, float, bool]],
                                                      data: st.DataObject) -> None:
    stream = _stream(points)
    whole = records(run(tracker(), stream))
    cut = data.draw(st.integers(1, len(stream) - 1))
    first = tracker()
    out = run(first, stream[:cut])
    saved = orjson.loads(orjson.dumps(first.snapshot()))
    second = tracker()
    assert second.restore(saved, stream[cut - 1][0])  # no time lost
    out += run(second, stream[cut:])
    assert records(out) == whole


@settings(max_examples=60, deadline=None)
@given(steps)
def test_statistics_agree_with_a_reference_from_the_raw_stream(points: list[tuple[float, float, bool]]) -> None:
    stream = _stream(points)
    [rec] = records(run(tracker(max_missing=100.0), stream))
    ph = next(p for p in rec["parameters"] if p["parameter_name"] == "ph_level")  # type: ignore[union-attr]
    # Reference: each value holds until the next update of the batch; bad time is missing.
    start, end = T0 + 10, stream[-1][0]
    held: float | None = 7.0  # the value at the start of the batch
    last = start
    weighted = seen = missing = outside = 0.0
    samples = [7.0]
    for now, readings in stream[2:]:
        dt = now - last
        if held is None:
            missing += dt
        else:
            weighted += held * dt
            seen += dt
            outside += dt if abs(held - 7.0) > 0.2 + 1e-12 and _applies(last, now) else 0.0
        last = now
        for x in readings:
            if x.tag == "ph_level":
                held = x.value if x.quality is Quality.GOOD else None  # type: ignore[assignment]
                if held is not None:
                    samples.append(held)
    assert last == end
    assert ph["samples"] == len(samples)
    assert (ph["min"], ph["max"]) == (min(samples), max(samples))
    assert ph["missing_s"] == pytest.approx(missing, abs=1e-3)
    if seen > 0:
        assert ph["mean"] == pytest.approx(weighted / seen, rel=1e-9)
    else:
        assert ph["mean"] is None
    assert ph["time_outside_s"].get("ph_level_target", 0.0) == pytest.approx(outside, abs=1e-3)


def _applies(_from: float, _to: float) -> bool:
    """The pH rule applies in heating, mixing and cooling: the property's stream stays in heating."""
    return True


def test_the_spec_reads_tags_of_its_asset() -> None:
    spec = BatchSpec(running=["heating"])
    assert spec.inputs() == {"batch_id", "status"}
    assert math.isclose(BatchSpec(running=["x"], max_missing="2.5%").max_missing, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="running"):
        BatchSpec(running=[])
    assert Rule(tag="x", kind="high", limit=1).rule_id == "x_high"


@pytest.mark.parametrize(("away", "gap"), [(0.2, False), (5.0, True)], ids=["reload", "restart"])
async def test_a_reload_hands_the_batch_over_and_a_restart_leaves_a_gap(tmp_path: Path, away: float,
                                                                       gap: bool) -> None:
    """Through the pipeline and its buffer: a new pipeline on the same buffer (a SIGHUP reload a moment
    later, or a restart after 5 s) goes on with the running batch; only the restart is a gap."""
    from .test_alarms import Clock, pipeline, reading, rows_by_leaf

    tm = load_tag_map(PLANT)
    clock = Clock()
    clock.now = T0
    async with Buffer(tmp_path / "b.sqlite") as buf:
        first = pipeline(tm, buf, clock, [])
        await first.restore()
        start = [reading("reactor-a", t, v, T0) for t, v in (("status", "idle"), ("batch_id", "B-0"),
                                                           ("temperature", 60.0), ("pressure", 1.5))]
        await first.commit([DeviceBatch(DEVICE, start)])
        clock.now = T0 + 10
        await first.commit([DeviceBatch(DEVICE, [reading("reactor-a", "status", "heating", clock.now),
                                                 reading("reactor-a", "batch_id", "B-1", clock.now)])])
        clock.now = T0 + 20
        await first.commit([], final=True)
        clock.now = T0 + 20 + away
        second = pipeline(tm, buf, clock, [])
        await second.restore()
        if gap:  # a new session: the server sends every monitored value again
            await second.commit([DeviceBatch(DEVICE, [reading("reactor-a", t, v, clock.now)
                                                      for t, v in (("temperature", 60.0), ("pressure", 1.5))])])
        clock.now = T0 + 40
        await second.commit([DeviceBatch(DEVICE, [reading("reactor-a", "status", "cleaning", clock.now)])])
        [rec] = (await rows_by_leaf(buf))["batches"]
    assert rec["batch_id"] == "B-1" and rec["duration_s"] == 30.0
    assert bool(rec["gaps"]) is gap
    temperature = next(p for p in rec["parameters"] if p["parameter_name"] == "temperature")  # type: ignore[union-attr]
    assert temperature["missing_s"] == (pytest.approx(5.0) if gap else 0.0)
