"""Derived station values through the pipeline (telemetry, state, restart) and live from the station
simulators over a real broker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from gateway.brokers import Mosquitto
from gateway.buffer import Buffer
from gateway.demo import stations_for, with_endpoints
from gateway.metrics import Metrics
from gateway.model import Quality, Reading
from gateway.pipeline import Pipeline
from gateway.poller import DeviceBatch
from gateway.tagmap import TagMap

from .conftest import stations_only
from .helpers import collecting, running, validate, wait_until

T0 = 1_800_000_000.0  # 2027-01-15 09:00 in Madrid: the 06:00 shift is running
DERIVED = ("counted_units_per_hour", "efficiency", "errors_today", "availability", "running_time", "paused_time",
           "error_time", "maintenance_time", "idle_time")


def station(tag: str, value: object, ts: float) -> Reading:
    return Reading("filling-1", tag, value, Quality.GOOD, None, None, ts)


class Clock:
    now = T0

    def __call__(self) -> float:
        return self.now


async def test_derived_values_in_telemetry_and_state_and_across_a_restart(plant_map: TagMap, tmp_path: Path) -> None:
    clock = Clock()
    committed: list[list[tuple[str, bytes]]] = []
    path = tmp_path / "b.sqlite"

    def make(buf: Buffer) -> Pipeline:
        return Pipeline(tag_map=plant_map, buffer=buf, queue=asyncio.Queue(), boot_id="0" * 32, metrics=Metrics(),
                        on_commit=committed.append, clock=clock, monotonic=clock)

    async def cycle(pipe: Pipeline, i: int, errors: int) -> None:
        clock.now = T0 + i
        await pipe.commit([DeviceBatch("filling-1-plc", [
            station("status", "running" if i < 60 else "paused", clock.now),
            station("units_total", 65_000 + i // 2, clock.now),  # 1800 units/h
            station("target_units_per_hour", 2000, clock.now),
            station("error_count", errors, clock.now),
        ])])

    async with Buffer(path) as buf:
        pipe = make(buf)
        for i in range(91):
            await cycle(pipe, i, errors=65_534 + (i >= 30))  # one error, then the uint16 counter wraps
        await cycle(pipe, 91, errors=0)
        rows = await buf.fetch(0, 1000)
        last = orjson.loads(rows[-1].payload)
        validate("telemetry", last)
        got = {r["tag"]: r for r in last["readings"]}
        assert set(DERIVED) <= set(got)
        assert got["counted_units_per_hour"]["value"] == pytest.approx(1800, rel=0.02)
        assert got["efficiency"]["value"] == pytest.approx(90, rel=0.02)
        assert got["errors_today"]["value"] == 2, "65534 -> 65535 -> 0 is two errors, not a reset"
        assert got["running_time"]["value"] == pytest.approx(60)
        assert got["paused_time"]["value"] == pytest.approx(31)
        assert got["availability"]["value"] == pytest.approx(60 / 91 * 100, rel=1e-3)
        state = orjson.loads(dict(committed[-1])["ninu/plant-1/stations/filling-1/state"])
        validate("state", state)
        assert state["values"]["errors_today"] == 2
        await pipe.commit([], final=True)

    # A restart mid-shift goes on counting from where it stopped.
    async with Buffer(path) as buf:
        pipe = make(buf)
        await pipe.restore()
        for i in range(92, 95):
            await cycle(pipe, i, errors=1)
        got = {r["tag"]: r for r in orjson.loads((await buf.fetch(0, 10_000))[-1].payload)["readings"]}
        assert got["errors_today"]["value"] == 3
        assert got["paused_time"]["value"] == pytest.approx(34)


@pytest.mark.integration
async def test_derived_values_live_from_the_simulators(plant_map: TagMap, mosquitto: Mosquitto,
                                                       tmp_path: Path) -> None:
    """Stations at 20x plant time (enough units per second to count); a 10 s rate window."""
    scale = 20.0
    sims = stations_for(plant_map, any_port=True, time_scale=scale)
    for sim in sims.values():  # started first: their ports are chosen on start
        await sim.start()
    assets = []
    for a in stations_only(plant_map).assets:
        derived = {**a.derived, "counted_units_per_hour": a.derived["counted_units_per_hour"].model_copy(
            update={"window": 10.0})}
        assets.append(a.model_copy(update={"derived": derived}))
    tm = with_endpoints(stations_only(plant_map).model_copy(update={"assets": assets}), mqtt_port=mosquitto.port,
                        stations=sims)
    topic = f"{tm.mqtt.topic_prefix}/stations/filling-1/state"
    try:
        async with collecting(mosquitto.port, topic) as sub, running(tm, tmp_path / "b.sqlite"):
            def latest() -> dict[str, object]:
                return sub.messages[-1].data if sub.messages else {}

            def ready() -> bool:
                q, v = latest().get("quality", {}), latest().get("values", {})
                return isinstance(q, dict) and isinstance(v, dict) and q.get("efficiency") == "good" \
                    and v.get("status") == "running" and v.get("running_time", 0) >= 8  # the window is full
            await wait_until(ready, 30, "a full rate window of a running line")
    finally:
        for sim in sims.values():
            await sim.stop()
    state = latest()
    validate("state", state)
    values = state["values"]
    assert isinstance(values, dict)
    assert set(DERIVED) <= set(values)
    # The simulated line runs at 90-102 % of its target in plant time; counted in wall time, 20x that.
    assert 0.8 * scale * 100 < values["efficiency"] < 1.2 * scale * 100, values
    assert values["counted_units_per_hour"] == pytest.approx(
        values["efficiency"] * values["target_units_per_hour"] / 100, rel=1e-3)
    assert values["counted_units_per_hour"] / scale == pytest.approx(values["units_per_hour"], rel=0.2), \
        "the rate counted at the edge agrees with the PLC's own"
    assert 0 < values["availability"] <= 100
