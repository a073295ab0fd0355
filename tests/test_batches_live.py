"""Batches and shifts against the bundled simulators and a real Mosquitto.

The reactor simulator runs its plant time 20x faster (a 240 s batch in 12 s); the test map's rule
delays and the batch's expected duration are scaled the same way, so a record means what it would on
the plant. The simulator keeps its own trace of every batch (each 0.1 s step's values): the record's
statistics, computed from what the subscription delivered, must agree with it.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from pathlib import Path

import orjson
import pytest

from drivers.registry import build_driver
from gateway.app import Gateway
from gateway.brokers import Mosquitto
from gateway.buffer import Buffer
from gateway.demo import with_endpoints
from gateway.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.poller import DeviceBatch
from gateway.tagmap import TagMap
from simulators.reactors import ReactorServer
from simulators.stations import Kind, Station

from .helpers import Message, collecting, running, tune, validate, wait_until

pytestmark = pytest.mark.integration

SCALE = 20.0
VARIABLES = {"temperature": "Temperature", "pressure": "Pressure", "ph_level": "PhLevel", "density": "Density"}


def scaled(tm: TagMap, scale: float) -> TagMap:
    """The map with every rule delay and batch duration in the simulator's faster plant time."""
    assets = []
    for a in tm.assets:
        rules = [r.model_copy(update={"delay": r.delay / scale, "off_delay": r.off_delay / scale}) for r in a.rules]
        update: dict[str, object] = {"rules": rules}
        if a.batch is not None and a.batch.expected_duration is not None:
            update["batch"] = a.batch.model_copy(update={"expected_duration": a.batch.expected_duration / scale})
        assets.append(a.model_copy(update=update))
    return tm.model_copy(update={"assets": assets})


def reactors_only(tm: TagMap) -> TagMap:
    return tm.model_copy(update={"devices": [d for d in tm.devices if d.protocol == "opcua"],
                                 "assets": [a for a in tm.assets if a.kind == "reactor"]})


def _records(messages: list[Message], asset: str) -> list[dict[str, object]]:
    return [m.data for m in messages if m.topic.endswith(f"/reactors/{asset}/batches")]


async def test_batch_records_agree_with_the_simulator_and_survive_a_broker_outage(
    plant_map: TagMap, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    server = ReactorServer(seed=5, time_scale=SCALE)
    server.models["A"].off_spec = 1.0  # reactor A's batches run out of pH tolerance while mixing
    await server.start()
    try:
        tm = tune(scaled(with_endpoints(reactors_only(plant_map), mqtt_port=mosquitto.port,
                                        reactors={"reactors-plc": server}), SCALE), interval=0.1)
        async with collecting(mosquitto.port, "ninu/plant-1/reactors/#", persistent=True) as sub, \
                running(tm, tmp_path / "buffer.sqlite") as gw:
            # The broker goes away before reactor A's first batch ends (about 13 s in), and comes back after.
            await asyncio.sleep(4.0)
            mosquitto.stop()
            await _batch_ends(gw, "reactor-a", 30)
            mosquitto.start()
            await wait_until(lambda: bool(_records(sub.messages, "reactor-a"))
                             and len(_records(sub.messages, "reactor-c")) >= 1, 40, "batch records")
    finally:
        await server.stop()
    a = _records(sub.messages, "reactor-a")[0]
    c = _records(sub.messages, "reactor-c")[0]
    for rec in (a, c):
        validate("batches", rec)
    # Reactor A: seen from its start, off-spec, and failed naming the parameter.
    assert a["complete"] is True and a["observed_from"] is None
    assert a["batch_id"] in server.models["A"].off_spec_batches
    assert a["passed"] is False and "ph_level: outside ph_level_target" in str(a["reason"])
    assert [p["phase"] for p in a["phases"]] == ["heating", "mixing", "cooling", "transferring"]  # type: ignore[union-attr]
    # Reactor C: its first batch was under way when the gateway started: said so, and passed.
    assert c["complete"] is False and c["observed_from"] is not None and c["passed"] is True
    # Statistics against the simulator's own trace of the batch.
    trace = server.models["A"].trace[str(a["batch_id"])]
    for p in a["parameters"]:  # type: ignore[union-attr]
        low, high, total, steps = trace[VARIABLES[p["parameter_name"]]]
        span = max(high - low, 1e-3)
        print(f"{p['parameter_name']}: gateway min {p['min']} max {p['max']} mean {p['mean']:.4f} "
              f"({p['samples']} samples); simulator min {low} max {high} mean {total / steps:.4f} ({steps} steps)")
        # The gateway sees a subset of the simulator's steps (the subscription samples them), so its
        # extremes lie inside the simulator's and near them (density is noise only: its extremes differ most);
        # the time-weighted mean agrees.
        assert low <= p["min"] <= low + 0.25 * span and high - 0.25 * span <= p["max"] <= high
        assert p["mean"] == pytest.approx(total / steps, abs=0.03 * span)
    # The alert raised meanwhile carries the batch.
    alerts = [m.data for m in sub.messages
              if m.topic.endswith("/reactor-a/alerts") and m.data["state"] == "active_unacked"]
    assert alerts and alerts[0]["batch_id"] == a["batch_id"] and alerts[0]["recipe_id"] == a["recipe_id"]
    # Retained copy of the last record, without its seq.
    last = [m for m in sub.messages if m.topic.endswith("/reactor-a/batches/last")]
    assert last and "seq" not in last[-1].data


async def _batch_ends(gw: Gateway, asset: str, within: float) -> None:
    """Wait until a batch of ``asset`` has run and ended in the running gateway's pipeline."""
    deadline, ran = time.monotonic() + within, False
    while time.monotonic() < deadline:
        gen = gw.generation
        tracker = gen.pipeline.batches[asset] if gen is not None else None
        if tracker is not None:
            ran = ran or tracker.batch is not None
            if ran and tracker.batch is None:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no batch of {asset} ended within {within} s")


async def test_a_shift_boundary_gives_one_summary_per_station_with_the_simulators_units(
    plant_map: TagMap, tmp_path: Path
) -> None:
    """A station read by the real driver from the bundled simulator, through the pipeline, with the
    pipeline's clock put just before a shift boundary: one summary whose units are the simulator's own
    counter delta over the shift."""
    from gateway.derived import Calendar
    from gateway.model import iso_ms

    from .conftest import stations_only
    tm = stations_only(plant_map)
    device = tm.devices[0]
    station = Station(device.id, Kind.FILLING, seed=3, time_scale=100, units_start=(1 << 32) - 40)  # it wraps
    await station.start()
    tm = with_endpoints(tm.model_copy(update={"devices": [device],
                                              "assets": [a for a in tm.assets if a.device == device.id]}),
                        stations={device.id: station})
    asset = tm.assets[0]
    driver = build_driver(tm, device.id)
    calendar = Calendar(tz=tm.gateway.timezone, shifts=tuple(tm.gateway.shifts))
    boundary = calendar.shift_start(time.time() + 8 * 3600)  # the start of a later shift
    clock = [boundary - 30.0]
    messages: list[tuple[str, bytes]] = []
    async with Buffer(tmp_path / "b.sqlite") as buf:
        pipe = Pipeline(tag_map=tm, buffer=buf, queue=asyncio.Queue(), boot_id="b", metrics=Metrics(),
                        on_commit=lambda states: None, clock=lambda: clock[0])
        await pipe.restore()
        await driver.connect()
        try:
            units: list[int] = []
            for _ in range(60):  # 60 polls 1 s apart in the pipeline's time, across the boundary
                readings = await driver.read()
                units.append(int(next(r.value for r in readings if r.tag == "units_total")))  # type: ignore[arg-type]
                await pipe.commit([DeviceBatch(device.id, readings)])
                clock[0] += 1.0
                await asyncio.sleep(0.05)
        finally:
            await driver.close()
            await station.stop()
        rows = await buf.fetch(0, 10_000)
        messages = [(r.topic, r.payload) for r in rows if r.topic.endswith("/shifts")]
    assert len(messages) == 1, messages
    summary = orjson.loads(messages[0][1])
    validate("shifts", summary)
    # The gateway saw the shift from 30 s before its end: the units of those polls, the rest missing.
    assert summary["end"] == iso_ms(boundary) and summary["asset_id"] == asset.id
    # An increase counts in the shift of the sample that shows it: the 30th poll is the new shift's.
    assert summary["units_produced"] == (units[29] - units[0]) % (1 << 32) > 0
    assert summary["complete"] is False and summary["missing_minutes"] > 0
    assert summary["shift"] in tm.gateway.shift_names  # type: ignore[operator]


async def test_a_gateway_killed_mid_batch_publishes_its_record_after_the_restart(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """SIGKILL while reactor A's batch runs, restart at once: the batch's record arrives once, with the
    time away as a gap (never weighed in), and statistics that still agree with the simulator's trace."""
    import os
    import signal
    import sys

    from .helpers import PLANT

    server = ReactorServer(seed=9, time_scale=SCALE)
    server.models["A"].step_left = 100.0  # idle for 5 s, so that the gateway sees its batch start
    await server.start()
    lines = [line for line in PLANT.read_text().splitlines()  # the reactors only, polled every 100 ms
             if "protocol: modbus_tcp" not in line and "kind: station" not in line]
    config = tmp_path / "reactors.yaml"
    config.write_text("\n".join(lines).replace("port: 1883", f"port: {mosquitto.port}")
                      .replace("opc.tcp://127.0.0.1:4840/reactors", server.endpoint)
                      .replace("interval: 500ms", "interval: 100ms"))
    env = {**os.environ, "EDGE_GATEWAY_BUFFER_PATH": str(tmp_path / "buffer.sqlite"),
           "EDGE_GATEWAY_LOG_FORMAT": "json", "EDGE_GATEWAY_HTTP_ADDRESS": "off"}

    async def spawn() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "run", "--config", str(config), env=env, cwd=tmp_path,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)

    model = server.models["A"]
    proc = await spawn()
    try:
        async with collecting(mosquitto.port, "ninu/plant-1/reactors/reactor-a/#", persistent=True) as sub:
            # Reactor A's first batch starts 5 s in; the gateway is killed in mixing.
            await wait_until(lambda: model.status == "mixing" and any(
                m.topic.endswith("/events") and m.data.get("event") == "batch-status-change"
                for m in sub.messages), 20, "reactor A mixing")
            batch_id = model.batch_id
            os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
            await asyncio.sleep(0.5)
            proc = await spawn()
            await wait_until(lambda: bool(_records(sub.messages, "reactor-a")), 30, "the record")
            records = _records(sub.messages, "reactor-a")
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 15)
        await server.stop()
    rec = records[0]
    validate("batches", rec)
    assert rec["batch_id"] == batch_id and rec["observed_from"] is None
    assert [g["reason"] for g in rec["gaps"]] == ["gateway not running"]  # type: ignore[union-attr]
    assert rec["complete"] is False
    assert [p["phase"] for p in rec["phases"]] == ["heating", "mixing", "cooling", "transferring"]  # type: ignore[union-attr]
    trace = model.trace[batch_id]
    (gap,) = rec["gaps"]  # type: ignore[misc]
    gap_s = (datetime.fromisoformat(gap["to"]) - datetime.fromisoformat(gap["from"])).total_seconds()
    for p in rec["parameters"]:  # type: ignore[union-attr]
        low, high, _total, _steps = trace[VARIABLES[p["parameter_name"]]]
        span = max(high - low, 1e-3)
        # The time away is missing, never weighed in: the statistics are of the time seen, inside the
        # simulator's extremes (its mean over the whole batch differs by what the gap left out).
        assert low <= p["min"] <= p["mean"] <= p["max"] <= high, (p, span)
        assert p["missing_s"] >= gap_s - 0.01
