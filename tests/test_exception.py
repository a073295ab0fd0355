"""Report by exception: the decision per reading (tables and properties), the per-tag parameters the
tag map gives, and an unchanged plant through the real pipeline and buffer."""

from __future__ import annotations

import asyncio
import itertools
import math
from datetime import datetime
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.buffer import Buffer
from gateway.exception import Deadband, deadbands
from gateway.metrics import Metrics
from gateway.model import Quality, Reading
from gateway.pipeline import Pipeline
from gateway.poller import DeviceBatch
from gateway.tagmap import SourceError, TagMap, load_tag_map_text

from .conftest import PLANT
from .helpers import validate

G, U, B = Quality.GOOD, Quality.UNCERTAIN, Quality.BAD
INF = math.inf


def _r(value: object, quality: Quality = G, reason: str | None = None) -> Reading:
    if quality is not G and reason is None:
        reason = "timeout: no answer"
    return Reading("a", "t", value, quality, reason, None, 0.0)


def _feed(band: Deadband, steps: list[tuple[float, Reading]]) -> list[bool]:
    return [band.offer(r, now) for now, r in steps]


# -- the decision, by table --------------------------------------------------------------------------

T = 1.8e9  # a multiple of every max_silence below: the next full minute is T + 60
CASES: dict[str, tuple[float, float, list[tuple[float, Reading]], list[bool]]] = {
    # name: (band, max_silence, [(now, reading)], reported?)
    "first reading": (0.5, INF, [(T, _r(1.0))], [True]),
    "inside the band, at it, beyond": (
        0.5, INF, [(T, _r(10.0)), (T + 1, _r(10.4)), (T + 2, _r(10.5)), (T + 3, _r(9.5)), (T + 4, _r(10.51))],
        [True, False, False, False, True]),
    "measured from the last reported, not the last read (drift adds up)": (
        0.5, INF, [(T, _r(0.0)), (T + 1, _r(0.3)), (T + 2, _r(0.45)), (T + 3, _r(0.6)), (T + 4, _r(0.9))],
        [True, False, False, True, False]),
    "downwards too": (0.5, INF, [(T, _r(0.0)), (T + 1, _r(-0.5)), (T + 2, _r(-0.6))], [True, False, True]),
    "band 0: any change": (0.0, INF, [(T, _r(1)), (T + 1, _r(1)), (T + 2, _r(2)), (T + 3, _r(2.0)), (T + 4, _r(2.001))],
                           [True, False, True, False, True]),
    "ints": (2.0, INF, [(T, _r(100)), (T + 1, _r(102)), (T + 2, _r(103))], [True, False, True]),
    "good -> bad -> bad -> good, same value": (
        5.0, INF, [(T, _r(1.0)), (T + 1, _r(None, B)), (T + 2, _r(None, B)), (T + 3, _r(1.0))],
        [True, True, False, True]),
    "bad with another reason": (
        0.0, INF, [(T, _r(None, B, "timeout")), (T + 1, _r(None, B, "timeout")), (T + 2, _r(None, B, "refused"))],
        [True, False, True]),
    "uncertain -> good inside the band": (5.0, INF, [(T, _r(7, U, "code 7")), (T + 1, _r(7.1))], [True, True]),
    "text: on change": (0.0, INF, [(T, _r("idle")), (T + 1, _r("idle")), (T + 2, _r("running"))], [True, False, True]),
    "bool is no number, whatever the band": (
        5.0, INF, [(T, _r(True)), (T + 1, _r(True)), (T + 2, _r(False)), (T + 3, _r(1))], [True, False, True, True]),
    "number -> text -> number": (5.0, INF, [(T, _r(1.0)), (T + 1, _r("1.0")), (T + 2, _r(1.0))], [True, True, True]),
    "a good NaN is never held back": (5.0, INF, [(T, _r(math.nan)), (T + 1, _r(math.nan))], [True, True]),
    "max_silence: unchanged is sent again at each multiple of it": (
        0.5, 60.0, [(T, _r(1.0)), (T + 30, _r(1.0)), (T + 59.9, _r(1.1)), (T + 60, _r(1.1)), (T + 61, _r(1.1)),
                    (T + 119.9, _r(1.1)), (T + 120, _r(1.1))],
        [True, False, False, True, False, False, True]),
    "first report mid-minute: again at the full minute, not 60 s later": (
        0.0, 60.0, [(T + 45, _r(1)), (T + 59, _r(1)), (T + 60.5, _r(1)), (T + 119, _r(1)), (T + 121, _r(1))],
        [True, False, True, False, True]),
    "a change does not move the next full minute": (
        0.0, 60.0, [(T, _r(1)), (T + 50, _r(2)), (T + 59, _r(2)), (T + 60, _r(2)), (T + 119, _r(2))],
        [True, True, False, True, False]),
    "a poll that misses the minute: the next one sends": (
        0.0, 60.0, [(T, _r(1)), (T + 59, _r(1)), (T + 125, _r(1)), (T + 170, _r(1))], [True, False, True, False]),
    "the wall clock stepped back": (0.5, 60.0, [(T, _r(1.0)), (T - 3600, _r(1.0)), (T - 3599, _r(1.0))],
                                    [True, True, False]),
    "no max_silence: silent for a year": (0.5, INF, [(T, _r(1.0)), (T + 86400 * 365, _r(1.0))], [True, False]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_decision_table(name: str) -> None:
    band, silence, steps, want = CASES[name]
    assert _feed(Deadband(band, silence), steps) == want


def test_reported_reading_is_kept_whole() -> None:
    band = Deadband(1.0, 60.0)
    first = _r(1.0)
    band.offer(first, T + 1)
    band.offer(_r(1.5), T + 2)
    assert (band.last, band.sent, band.due) == (first, T + 1, T + 60)


@pytest.mark.parametrize(("band", "silence"), [(-1.0, INF), (math.inf, INF), (math.nan, INF), (0.0, 0.0)])
def test_nonsense_parameters_are_refused(band: float, silence: float) -> None:
    with pytest.raises(ValueError):
        Deadband(band, silence)


# -- the decision, by property ------------------------------------------------------------------------

bands = st.floats(0.0, 10.0)
numbers = st.floats(-1000.0, 1000.0) | st.integers(-1000, 1000)
steps_in_time = st.floats(0.0, 30.0)
silences = st.sampled_from([1.0, 5.0, 60.0, 90.0, INF]) | st.integers(1, 100).map(float)  # whole seconds: exact



@settings(max_examples=300, deadline=None)
@given(d=bands, silence=silences, seq=st.lists(st.tuples(steps_in_time, numbers), min_size=1, max_size=80))
def test_numbers_one_quality(d: float, silence: float, seq: list[tuple[float, float]]) -> None:
    """With absolute deadband d: consecutive reports differ by more than d unless a multiple of
    max_silence was passed; the last report never differs from the current value by more than d; a
    reading is held back only while less than max_silence has passed since the last report."""
    band, now, prev = Deadband(d, silence), T, None
    for step, value in seq:
        now += step
        sent, due = band.sent, band.due
        reported = band.offer(_r(value), now)
        assert band.last is not None
        assert abs(value - band.last.value) <= d  # type: ignore[operator]
        if prev is None:
            assert reported, "the first reading is always reported"
        elif reported:
            assert abs(value - prev) > d or now >= due
        else:
            assert now - sent < silence, "held back although max_silence had passed"
        if reported:
            prev = value
            assert 0 < band.due - now <= silence


@settings(max_examples=300, deadline=None)
@given(silence=silences, start=st.floats(0.0, 200.0), steps=st.lists(steps_in_time, min_size=1, max_size=80))
def test_max_silence_bounds_the_gap(silence: float, start: float, steps: list[float]) -> None:
    """An unchanged value is sent again within max_silence (plus the time to the next reading) of the
    last report, and at most once per multiple of max_silence."""
    band, now, times = Deadband(0.0, silence), T + start, []
    for step in steps:
        now += step
        if band.offer(_r(42.0), now):
            times.append(now)
    assert all(b - a < silence + 30.0 for a, b in itertools.pairwise(times))
    assert now - times[-1] < silence, "the tail is shorter than max_silence"
    slots = [t // silence for t in times]
    assert slots == sorted(set(slots)), "one report per multiple of max_silence"
    if silence == INF:
        assert len(times) == 1


values = st.none() | st.booleans() | numbers | st.sampled_from(["idle", "running", "", "1.0"])
qualities = st.sampled_from([(G, None), (U, "code 9 not in enum"), (B, "timeout"), (B, "connection refused")])


def _spec(r: Reading, now: float, *, band: float, silence: float, last: Reading | None, sent: float) -> bool:
    """The rule of gateway/exception.py, spelled out the slow way."""
    if last is None or (last.quality, last.reason) != (r.quality, r.reason):
        return True
    if now < sent or (silence < INF and math.floor(now / silence) > math.floor(sent / silence)):
        return True

    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if number(r.value) and number(last.value):
        return bool(abs(r.value - last.value) > band)  # type: ignore[operator]
    return bool(r.value != last.value)


@settings(max_examples=400, deadline=None)
@given(d=bands, silence=silences,
       seq=st.lists(st.tuples(st.floats(-5.0, 30.0), values, qualities), min_size=1, max_size=60))
def test_any_readings_follow_the_rule(d: float, silence: float,
                                      seq: list[tuple[float, object, tuple[Quality, str | None]]]) -> None:
    """Any mix of types, qualities, reasons and clock steps (backwards too): the decision is the rule's,
    and the last report always has the current quality and reason."""
    band, now = Deadband(d, silence), T + 0.5
    for step, value, (quality, reason) in seq:
        now = round(now + step, 3)
        r = Reading("a", "t", value, quality, reason, None, now)
        want = _spec(r, now, band=d, silence=silence, last=band.last, sent=band.sent)
        assert band.offer(r, now) is want
        assert band.last is not None and (band.last.quality, band.last.reason) == (quality, reason)
        if want:
            assert band.last is r and band.sent == now


# -- the tag map -> the parameters --------------------------------------------------------------------

MAP = """
gateway: {id: edge-01}
mqtt: {topic_prefix: ninu/plant-1}
devices:
  - {id: plc-1, protocol: modbus_tcp, host: 127.0.0.1, max_silence: 10m}
  - {id: plc-2, protocol: modbus_tcp, host: 127.0.0.1, port: 503}
  - {id: ua-1, protocol: opcua, endpoint: "opc.tcp://127.0.0.1:4840", deadband_type: absolute}
assets:
  - id: filler-1
    kind: station
    device: plc-1
    tags:
      units_total: {table: holding, address: 0, type: uint32}
      speed: {table: holding, address: 2, type: float32, deadband_percent: 2, min: -50, max: 150}
      motor_temperature: {table: holding, address: 4, type: int16, scale: 0.1, deadband: 0.2, max_silence: 30s}
      other_plc: {device: plc-2, table: holding, address: 0}
      banded: {device: plc-2, table: holding, address: 1, deadband: 3}
  - id: filler-2
    kind: station
    device: plc-1
    max_silence: 2m
    tags:
      units_total: {table: holding, address: 10, type: uint32}
      status: {table: holding, address: 12, enum: {0: idle, 1: running}, max_silence: 1h}
      target: {table: holding, address: 13}
    derived:
      efficiency: {kind: efficiency, rate: units_total, target: target}
  - id: reactor-a
    kind: reactor
    device: ua-1
    tags:
      temperature: {node: "ns=2;s=T", type: float, deadband: 0.1}
      batch_id: {node: "ns=2;s=B", type: string}
"""


def _params(tm: TagMap) -> dict[tuple[str, str], tuple[float, float]]:
    return {k: (v.band, v.max_silence) for k, v in deadbands(tm).items()}


def test_parameters_from_the_tag_map() -> None:
    assert _params(load_tag_map_text(MAP, "rbe.yaml")) == {
        ("filler-1", "units_total"): (0.0, 600.0),          # the device's max_silence: on change
        ("filler-1", "speed"): (4.0, 600.0),                # 2 % of 150 - -50
        ("filler-1", "motor_temperature"): (0.2, 30.0),     # its own max_silence beats the device's
        ("filler-1", "banded"): (3.0, INF),                 # a deadband and no max_silence: as before
        ("filler-2", "units_total"): (0.0, 120.0),          # the asset's beats the device's
        ("filler-2", "status"): (0.0, 3600.0),
        ("filler-2", "target"): (0.0, 120.0),
        ("filler-2", "efficiency"): (0.0, 120.0),           # derived values follow the asset's
        ("reactor-a", "temperature"): (0.1, INF),
    }  # other_plc and batch_id: no deadband and no max_silence anywhere: every reading


def test_plant_map_parameters() -> None:
    tm = load_tag_map_text(PLANT.read_text(encoding="utf-8"), "plant.yaml")
    params = _params(tm)
    assert params[("filling-1", "motor_temperature")] == (0.2, 60.0)
    assert params[("reactor-a", "temperature")] == (0.1, INF)
    assert ("filling-1", "units_total") not in params, "no deadband, no max_silence: every poll"


@pytest.mark.parametrize(("text", "seconds"), [("90", 90.0), ("1.5m", 90.0), ("1h", 3600.0), ("1s", 1.0)])
def test_max_silence_is_a_duration(text: str, seconds: float) -> None:
    tm = load_tag_map_text(MAP.replace("max_silence: 30s", f"max_silence: {text}"), "rbe.yaml")
    assert tm.asset("filler-1").tags["motor_temperature"].max_silence == seconds


def _problems(text: str) -> list[str]:
    with pytest.raises(SourceError) as info:
        load_tag_map_text(text, "rbe.yaml")
    return [f"{p.line}: {p.path}: {p.message}" for p in info.value.problems]


def test_percent_server_deadband_takes_deadband_percent() -> None:
    """deadband_type percent: the server filters by a percent of the node's EURange, so the tag says
    deadband_percent; an absolute deadband there would mean one thing to the server, another here."""
    text = MAP.replace("deadband_type: absolute", "deadband_type: percent")
    assert _problems(text) == [
        "32: assets[2].tags.temperature.deadband: device 'ua-1' has deadband_type percent (of the node's EURange): "
        "give deadband_percent, with min and max as the EURange",
    ]
    load_tag_map_text(text.replace("deadband: 0.1}", "deadband_percent: 0.1, min: 0, max: 100}"), "rbe.yaml")


def test_max_silence_needs_values_to_arrive() -> None:
    """A subscription sends changes only: max_silence there would never fire. Mode poll it can."""
    subscribed = MAP.replace("      batch_id: {node: \"ns=2;s=B\", type: string}",
                             "      batch_id: {node: \"ns=2;s=B\", type: string, max_silence: 1m}")
    assert _problems(subscribed) == [
        "33: assets[2].tags.batch_id.max_silence: device 'ua-1' subscribes: the server sends changes only, so an "
        "unchanged value cannot be sent again; max_silence needs mode: poll (a stale rule notices a value that "
        "stopped)"]
    polled = subscribed.replace('4840", deadband_type', '4840", mode: poll, deadband_type')
    assert _params(load_tag_map_text(polled, "rbe.yaml"))[("reactor-a", "batch_id")] == (0.0, 60.0)
    on_asset = MAP.replace("    kind: reactor\n", "    kind: reactor\n    max_silence: 5m\n")
    assert [p.split(": ")[1] for p in _problems(on_asset)] == ["assets[2].max_silence"]
    on_device = MAP.replace("deadband_type: absolute", "deadband_type: absolute, max_silence: 5m")
    assert [p.split(": ")[1] for p in _problems(on_device)] == ["devices[2].max_silence"]


# -- through the pipeline and the buffer --------------------------------------------------------------

STATION = """
gateway: {id: edge-01}
mqtt: {topic_prefix: ninu/plant-1}
devices:
  - {id: plc-1, protocol: modbus_tcp, host: 127.0.0.1}
assets:
  - id: filler-1
    kind: station
    device: plc-1
    max_silence: 1m
    tags:
      status: {table: holding, address: 0, enum: {0: idle, 1: running}}
      units_total: {table: holding, address: 1, type: uint32}
      running: {table: holding, address: 3, type: bool, bit: 0}
      motor_temperature: {table: holding, address: 4, type: int16, scale: 0.1, deadband: 0.2}
      fill_volume: {table: holding, address: 5, type: float32, deadband_percent: 1, min: 0, max: 1000}
      product_code: {table: holding, address: 7, type: string, count: 4}
"""
START = 1.8e9


class Plant:
    """A pipeline on a real buffer, fed one poll per second of a fake clock."""

    def __init__(self, tm: TagMap, buf: Buffer) -> None:
        self.now = START
        self.states: list[tuple[str, bytes]] = []
        self.pipe = Pipeline(tag_map=tm, buffer=buf, queue=asyncio.Queue(), boot_id="0" * 32, metrics=Metrics(),
                             on_commit=self.states.extend, clock=lambda: self.now, monotonic=lambda: self.now)
        self.buf = buf

    async def poll(self, values: dict[str, object], bad: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.now += 1.0
        readings = [Reading("filler-1", tag, None if tag in bad else v, B if tag in bad else G,
                            "timeout: x" if tag in bad else None, None, self.now) for tag, v in values.items()]
        await self.pipe.commit([DeviceBatch("plc-1", readings)])

    async def telemetry(self) -> list[tuple[float, dict[str, object]]]:
        """(seconds since start, {tag: value or quality}) of every telemetry message."""
        out: list[tuple[float, dict[str, object]]] = []
        for row in await self.buf.fetch(0, 100_000):
            if not row.topic.endswith("/telemetry"):
                continue  # a change of status is also an events message
            body = orjson.loads(row.payload)
            validate("telemetry", body)
            ts = datetime.fromisoformat(body["readings"][0]["ts"]).timestamp() - START
            out.append((round(ts), {r["tag"]: r["value"] if r["quality"] == "good" else r["quality"]
                                    for r in body["readings"]}))
        return out


VALUES: dict[str, object] = {"status": "running", "units_total": 1200, "running": True, "motor_temperature": 41.5,
                             "fill_volume": 500.0, "product_code": "P-12"}


async def test_unchanged_plant_sends_a_heartbeat_only(tmp_path: Path) -> None:
    tm = load_tag_map_text(STATION, "station.yaml")
    async with Buffer(tmp_path / "b.sqlite") as buf:
        plant = Plant(tm, buf)
        for _ in range(300):
            await plant.poll(VALUES)
        got = await plant.telemetry()
    assert [t for t, _ in got] == [1, 60, 120, 180, 240, 300], "the first poll, then every full minute"
    assert all(tags == VALUES for _, tags in got), "all tags together, in one message"
    assert len(plant.states) == 1, "the retained state only when a value changed: the first poll"


async def test_changes_quality_and_heartbeat_through_the_pipeline(tmp_path: Path) -> None:
    tm = load_tag_map_text(STATION, "station.yaml")
    async with Buffer(tmp_path / "b.sqlite") as buf:
        plant = Plant(tm, buf)
        now = dict(VALUES)
        script: list[tuple[dict[str, object], set[str], dict[str, object]]] = [
            # (changes, bad tags, telemetry expected)
            ({}, set(), VALUES),
            ({"motor_temperature": 41.6, "fill_volume": 509.0}, set(), {}),  # inside both bands
            ({"motor_temperature": 41.8, "fill_volume": 500.0}, set(), {"motor_temperature": 41.8}),  # 0.3 > 0.2
            ({"fill_volume": 489.0}, set(), {"fill_volume": 489.0}),  # 11 > 1 % of 1000
            ({"status": "idle", "running": False}, set(), {"status": "idle", "running": False}),
            ({}, {"units_total"}, {"units_total": "bad"}),
            ({}, {"units_total"}, {}),  # still bad, same reason
            ({}, set(), {"units_total": 1200}),  # good again, the same value as before
            ({"motor_temperature": 41.7}, set(), {}),  # inside the band of 41.8
        ]
        want = []
        for changes, bad, sent in script:
            now.update(changes)
            await plant.poll(now, bad)
            want += [(plant.now - START, sent)] if sent else []
        while plant.now - START < 130:  # nothing changes any more
            await plant.poll(now)
        got = await plant.telemetry()
    heartbeat = {**VALUES, "status": "idle", "running": False, "motor_temperature": 41.7, "fill_volume": 489.0}
    assert got == [*want, (60, heartbeat), (120, heartbeat)], "at each full minute the current values, together"


async def test_rbe_off_is_every_poll(tmp_path: Path) -> None:
    """Without deadbands or max_silence (config as before): every reading of every poll."""
    text = STATION.replace("    max_silence: 1m\n", "").replace(", deadband: 0.2", "")
    text = text.replace(", deadband_percent: 1, min: 0, max: 1000", "")
    tm = load_tag_map_text(text, "station.yaml")
    assert deadbands(tm) == {}
    async with Buffer(tmp_path / "b.sqlite") as buf:
        plant = Plant(tm, buf)
        for _ in range(30):
            await plant.poll(VALUES)
        got = await plant.telemetry()
    assert len(got) == 30 and all(tags == VALUES for _, tags in got)
