"""Alarms through the pipeline and the buffer (alerts, retained alarms, events, commands, restart),
then end to end: simulated reactors -> gateway -> real Mosquitto, and operator commands back."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import commands as cmds
from gateway.brokers import Mosquitto
from gateway.buffer import ALERT, EVENT, TELEMETRY, Buffer
from gateway.demo import with_endpoints
from gateway.metrics import Metrics
from gateway.model import Quality, Reading
from gateway.pipeline import Pipeline
from gateway.poller import DeviceBatch
from gateway.tagmap import TagMap
from simulators.reactors import ReactorServer

from .helpers import Collector, collecting, running, validate, wait_until

T0 = 1_800_000_000.0
PREFIX = "ninu/plant-1"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def reading(asset: str, tag: str, value: object, ts: float, quality: Quality = Quality.GOOD) -> Reading:
    return Reading(asset, tag, value, quality, None if quality is Quality.GOOD else "bad: x", None, ts)


def pipeline(tm: TagMap, buf: Buffer, clock: Clock, committed: list[list[tuple[str, bytes]]]) -> Pipeline:
    return Pipeline(tag_map=tm, buffer=buf, queue=asyncio.Queue(), boot_id="0" * 32, metrics=Metrics(),
                    on_commit=committed.append, clock=clock, monotonic=clock)


async def rows_by_leaf(buf: Buffer) -> dict[str, list[dict[str, object]]]:
    out: dict[str, list[dict[str, object]]] = {}
    for row in await buf.fetch(0, 10_000):
        out.setdefault(row.topic.rsplit("/", 1)[1], []).append(orjson.loads(row.payload))
    return out


async def test_excursion_status_change_ack_and_restart(plant_map: TagMap, tmp_path: Path) -> None:
    clock, committed = Clock(), []
    path = tmp_path / "b.sqlite"
    async with Buffer(path) as buf:
        pipe = pipeline(plant_map, buf, clock, committed)
        await pipe.restore()
        first = dict(committed[0])
        assert orjson.loads(first[f"{PREFIX}/reactors/reactor-a/alarms"]) == [], "retained alarms start empty"
        assert f"{PREFIX}/stations/filling-1/alarms" in first
        batch = [reading("reactor-a", "status", "heating", T0), reading("reactor-a", "temperature", 90.0, T0)]
        await pipe.commit([DeviceBatch("reactors-plc", batch)])
        clock.now = T0 + 4.9
        await pipe.commit([])
        assert (await rows_by_leaf(buf)).get("alerts") is None, "the 5 s on-delay has not run out"
        clock.now = T0 + 5.0
        assert pipe.engine.next_deadline() == T0 + 5.0
        await pipe.commit([])
        await pipe.commit([DeviceBatch("reactors-plc", [reading("reactor-a", "status", "mixing", T0 + 6)])])
        by_leaf = await rows_by_leaf(buf)
        alert = by_leaf["alerts"][0]
        validate("alerts", alert)
        assert (alert["code"], alert["severity"], alert["state"], alert["value"], alert["limit"]) == (
            "PROD009", "high", "active_unacked", 90.0, 85.0)
        assert alert["deviation_percentage"] == pytest.approx(5.882, abs=1e-3)
        assert alert["ts"] == "2027-01-15T08:00:05.000Z"
        status = [e for e in by_leaf["events"] if e["event"] != "batch-status-change"]
        event = status[0]
        validate("events", event)
        assert (event["event"], event["old_status"], event["new_status"]) == ("reactor-update", "heating", "mixing")
        assert len(status) == 1, "the first status seen is no change"
        # reactor-a has a batch context: a batch seen running at the first sight starts then (not observed
        # from its start), and its phase change is a batch event too; the status event carries the batch.
        batch_events = [e for e in by_leaf["events"] if e["event"] == "batch-status-change"]
        for e in batch_events:
            validate("events", e)
        assert [(e["old_status"], e["new_status"]) for e in batch_events] == [(None, "heating"), ("heating", "mixing")]
        assert event["batch_id"] == batch_events[0]["batch_id"] == alert["batch_id"]
        rows = await buf.fetch(0, 100)
        assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
        async with buf.db.execute("SELECT topic, priority FROM outbox ORDER BY seq") as cur:
            prio = {t.rsplit("/", 1)[1]: p for t, p in await cur.fetchall()}
        assert prio == {"telemetry": TELEMETRY, "events": EVENT, "alerts": ALERT}
        retained = orjson.loads(dict(committed[-2])[f"{PREFIX}/reactors/reactor-a/alarms"])
        validate("alarms", retained)
        assert [(a["alarm_id"], a["state"]) for a in retained] == [("reactor-a/temperature_high", "active_unacked")]

    # A restarted gateway remembers the alarm, its last status, and can acknowledge it.
    clock.now = T0 + 60
    committed.clear()
    async with Buffer(path) as buf:
        pipe = pipeline(plant_map, buf, clock, committed)
        task = asyncio.create_task(pipe.run())
        await wait_until(lambda: bool(committed), 5, "retained alarms after restart")
        retained = orjson.loads(dict(committed[0])[f"{PREFIX}/reactors/reactor-a/alarms"])
        assert [a["state"] for a in retained] == ["active_unacked"]
        reply = orjson.loads(await pipe.submit(cmds.parse("acknowledge", b'{"alarm_id": "reactor-a/temperature_high",'
                                                                           b' "request_id": "r1", "user": "op1"}'), 5))
        validate("reply", reply)
        assert (reply["ok"], reply["changed"], reply["request_id"]) == (True, True, "r1")
        assert reply["alarm"]["state"] == "active_acked"
        again = orjson.loads(await pipe.submit(cmds.parse("acknowledge", b'{"alarm_id": "reactor-a/temperature_high"}'),
                                               5))
        assert (again["ok"], again["changed"]) == (True, False), "a repeated ack is harmless and says so"
        unknown = orjson.loads(await pipe.submit(cmds.parse("shelve", b'{"alarm_id": "reactor-a/nope", '
                                                                      b'"duration": "1h"}'), 5))
        assert (unknown["ok"], unknown["error"]) == (False, "no alarm 'reactor-a/nope'")
        await pipe.commit([DeviceBatch("reactors-plc", [reading("reactor-a", "status", "mixing", T0 + 61)])])
        await pipe.queue.put(None)
        await task
        alerts = (await rows_by_leaf(buf))["alerts"]
        assert [(a["state"], a["trigger"], a["user"]) for a in alerts[1:]] == [("active_acked", "acknowledge", "op1")]
        events = [e["event"] for e in (await rows_by_leaf(buf))["events"]]
        assert events.count("reactor-update") == 1, \
            "the status remembered across the restart: mixing again is no change"
        assert events.count("batch-status-change") == 2, "the batch and its phase remembered across the restart"


@pytest.mark.parametrize(("name", "payload", "error"), [
    ("acknowledge", b"not json", "payload is not JSON"),
    ("acknowledge", b"[1, 2]", "payload must be a JSON object"),
    ("acknowledge", b"{}", "alarm_id: Field required"),
    ("acknowledge", b'{"alarm_id": "a/b", "force": true}', "force: Extra inputs are not permitted"),
    ("shelve", b'{"alarm_id": "a/b"}', "duration: Field required"),
    ("shelve", b'{"alarm_id": "a/b", "duration": "2d"}', "is not a duration"),
    ("shelve", b'{"alarm_id": "a/b", "duration": "25h"}', "less than or equal to 86400"),
    ("self_destruct", b'{"alarm_id": "a/b", "request_id": "x"}', "unknown command 'self_destruct'"),
    ("acknowledge", b"{" + b" " * 20000 + b"}", "over 16384"),
])
def test_malformed_commands_are_rejected_with_a_reason(name: str, payload: bytes, error: str) -> None:
    with pytest.raises(cmds.Rejected, match=error):
        cmds.parse(name, payload)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([*cmds.SCHEMAS, "x", ""]),
       st.one_of(st.binary(max_size=200),
                 st.dictionaries(st.sampled_from(["alarm_id", "request_id", "duration", "user", "comment", "x"]),
                                 st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=20),
                                           st.booleans(), st.lists(st.integers(), max_size=2)))
                 .map(lambda d: json.dumps(d).encode())))
def test_any_command_payload_parses_or_is_rejected(name: str, payload: bytes) -> None:
    try:
        cmd = cmds.parse(name, payload)
    except cmds.Rejected as exc:
        assert str(exc)
        validate("reply", orjson.loads(cmds.reply(gateway_id="g", command=name, request_id=exc.request_id, ts=T0,
                                                  error=str(exc))))
    else:
        assert cmd.name in cmds.SCHEMAS and cmd.alarm_id


# -- end to end ------------------------------------------------------------------------------------

@pytest.fixture
async def frozen_reactors() -> AsyncIterator[ReactorServer]:
    """Reactors standing still at the start of their cycle: A idle, B heating, C mixing."""
    server = ReactorServer(time_scale=1.0)
    await server.start()
    server.freeze()
    try:
        yield server
    finally:
        await server.stop()


def reactors_map(plant_map: TagMap, reactors: ReactorServer, mosquitto: Mosquitto) -> TagMap:
    device = next(d for d in plant_map.devices if d.id == "reactors-plc").model_copy(update={"interval": 0.2})
    tm = plant_map.model_copy(update={"devices": [device],
                                      "assets": [a for a in plant_map.assets if a.kind == "reactor"],
                                      "mqtt": plant_map.mqtt.model_copy(update={"reconnect_max": 0.5})})
    return with_endpoints(tm, mqtt_port=mosquitto.port, reactors={"reactors-plc": reactors})


def alerts(sub: Collector, alarm_id: str) -> list[dict[str, object]]:
    return [m.data for m in sub.leaf("alerts") if m.data["alarm_id"] == alarm_id]


async def send(port: int, name: str, payload: bytes) -> None:
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"central-{time.monotonic_ns()}") as client:
        await client.publish(f"{PREFIX}/gateways/edge-01/cmd/{name}", payload, qos=1)


@pytest.mark.integration
async def test_excursions_reach_mqtt_and_acknowledge_over_mqtt(
    plant_map: TagMap, frozen_reactors: ReactorServer, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    sim = frozen_reactors
    tm = reactors_map(plant_map, sim, mosquitto)
    b, c = sim.models["B"], sim.models["C"]
    assert (b.status, c.status) == ("heating", "mixing")
    async with collecting(mosquitto.port, f"{PREFIX}/#") as sub, running(tm, tmp_path / "b.sqlite") as gw:
        await wait_until(lambda: any(m.topic.endswith("reactor-b/state") for m in sub.messages), 10, "state")
        temp_b = float(sim.snapshot("B")["Temperature"])  # type: ignore[arg-type]
        pressure_c = float(sim.snapshot("C")["Pressure"])  # type: ignore[arg-type]
        injected = time.monotonic()
        b.faults.temperature_offset = 90.0 - temp_b  # above high (85), below high-high (95)
        c.faults.pressure_offset = 3.3 - pressure_c  # above high-high (3.0)
        b.faults.ph_offset = 0.3  # recipe pH 9.5 +- 0.2
        await wait_until(lambda: bool(alerts(sub, "reactor-b/temperature_high")), 15, "PROD009 on reactor-b")
        assert time.monotonic() - injected >= 5.0, "the plant's 5 s on-delay holds"
        await wait_until(lambda: bool(alerts(sub, "reactor-c/pressure_high_high")), 10, "PROD010 on reactor-c")
        await wait_until(lambda: bool(alerts(sub, "reactor-b/ph_level_target")), 10, "pH drift on reactor-b")

        temp = alerts(sub, "reactor-b/temperature_high")[0]
        assert (temp["code"], temp["severity"], temp["state"], temp["limit"]) == (
            "PROD009", "high", "active_unacked", 85)
        assert temp["value"] == pytest.approx(90.0, abs=0.01)
        pressure = alerts(sub, "reactor-c/pressure_high_high")[0]
        assert (pressure["code"], pressure["severity"], pressure["state"]) == ("PROD010", "critical", "active_unacked")
        assert pressure["message"].startswith("Reactor C - Especialidades: critical pressure 3.3")  # type: ignore[union-attr]
        ph = alerts(sub, "reactor-b/ph_level_target")[0]
        assert ph["target"] == 9.5
        assert ph["value"] == pytest.approx(9.8, abs=0.02)
        assert ph["deviation_percentage"] == pytest.approx((ph["value"] - 9.5) / 9.5 * 100, abs=1e-3)  # type: ignore[operator]
        assert alerts(sub, "reactor-a/temperature_high") == [], "reactor A saw no excursion"
        metric = gw.metrics.registry.get_sample_value
        assert metric("gateway_alarms_active", {"severity": "critical"}) == 1
        assert metric("gateway_alarms_active", {"severity": "high"}) == 2  # temperature B, pressure C
        assert metric("gateway_alarm_transitions_total", {"severity": "critical", "state": "active_unacked"}) == 1

        # Acknowledge over MQTT; malformed and unknown commands change nothing.
        await send(mosquitto.port, "acknowledge", b"{broken")
        await send(mosquitto.port, "reset_everything", b'{"alarm_id": "reactor-b/temperature_high", "request_id": "x"}')
        await send(mosquitto.port, "acknowledge", b'{"alarm_id": "reactor-b/nope", "request_id": "u"}')
        await send(mosquitto.port, "acknowledge",
                   b'{"alarm_id": "reactor-b/temperature_high", "request_id": "ack-1", "user": "op-7"}')
        await wait_until(lambda: any(m.data.get("request_id") == "ack-1" for m in sub.leaf("reply")), 10, "ack reply")
        replies = [m.data for m in sub.leaf("reply")]
        for r in replies:
            validate("reply", r)
        assert [(r["request_id"], r["ok"]) for r in replies] == [(None, False), ("x", False), ("u", False),
                                                                 ("ack-1", True)]
        assert "payload is not JSON" in replies[0]["error"]  # type: ignore[operator]
        assert "unknown command" in replies[1]["error"]  # type: ignore[operator]
        assert replies[3]["alarm"]["state"] == "active_acked"  # type: ignore[index]
        await wait_until(lambda: len(alerts(sub, "reactor-b/temperature_high")) == 2, 5, "the ack transition")
        acked = alerts(sub, "reactor-b/temperature_high")[1]
        assert (acked["state"], acked["previous_state"], acked["user"]) == ("active_acked", "active_unacked", "op-7")

        def retained_b() -> list[dict[str, object]]:
            msgs = [m for m in sub.messages if m.topic == f"{PREFIX}/reactors/reactor-b/alarms"]
            return msgs[-1].data if msgs else []  # type: ignore[return-value]
        await wait_until(lambda: any(a["state"] == "active_acked" for a in retained_b()), 5, "retained alarms")
        validate("alarms", retained_b())
        assert {a["alarm_id"] for a in retained_b()} == {"reactor-b/temperature_high", "reactor-b/ph_level_target"}
        for m in sub.leaf("alerts"):
            validate("alerts", m.data)
        seqs = [m.data["seq"] for m in sub.messages if "seq" in m.data and m.topic.endswith("reactor-b/alerts")]
        assert seqs == sorted(seqs)


@pytest.mark.integration
async def test_broker_outage_during_an_excursion_loses_no_transition(
    plant_map: TagMap, frozen_reactors: ReactorServer, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    sim = frozen_reactors
    tm = reactors_map(plant_map, sim, mosquitto)
    c = sim.models["C"]
    alarm = "reactor-c/pressure_high_high"
    async with collecting(mosquitto.port, f"{PREFIX}/reactors/+/alerts", persistent=True) as sub, \
            running(tm, tmp_path / "b.sqlite") as gw:
        await wait_until(lambda: gw.publisher is not None and gw.publisher.connected, 10, "gateway online")
        base = float(sim.snapshot("C")["Pressure"])  # type: ignore[arg-type]
        mosquitto.stop()
        await wait_until(lambda: not gw.publisher.connected, 10, "gateway sees the outage")  # type: ignore[union-attr]
        engine = gw.generation.pipeline.engine  # type: ignore[union-attr]
        c.faults.pressure_offset = 3.3 - base
        for raised in (alarm, "reactor-c/pressure_high"):  # delays 1 s and 2 s
            await wait_until(lambda a=raised: engine.view(a)["state"] == "active_unacked", 10, f"{raised} raised")
        c.faults.pressure_offset = 0.0
        await wait_until(lambda: engine.view(alarm)["state"] == "cleared_unacked", 10, "cleared during the outage")
        assert gw.buffer is not None and gw.buffer.rows >= 2
        mosquitto.start()
        await wait_until(lambda: len(alerts(sub, alarm)) >= 2, 20, "both transitions after the outage")
    got = alerts(sub, alarm)
    assert [a["state"] for a in got] == ["active_unacked", "cleared_unacked"]
    assert got[0]["seq"] < got[1]["seq"]  # type: ignore[operator]
    high = [a["state"] for a in alerts(sub, "reactor-c/pressure_high")]
    assert high == ["active_unacked", "cleared_unacked"], "the high alarm of the same excursion too"


async def test_wall_clock_steps_keep_alarm_timers_and_seq_order(plant_map: TagMap, tmp_path: Path) -> None:
    """NTP steps the edge PC's clock: a 5 s delay still takes 5 s, a fresh value does not go stale,
    a 1 h shelve lasts an hour, and rows stay ordered by seq whatever their timestamps say."""
    wall, mono = Clock(), Clock()
    mono.now = 1000.0
    committed: list[list[tuple[str, bytes]]] = []

    def elapse(real: float, step: float = 0.0) -> None:
        mono.now += real
        wall.now += real + step

    async with Buffer(tmp_path / "b.sqlite") as buf:
        pipe = Pipeline(tag_map=plant_map, buffer=buf, queue=asyncio.Queue(), boot_id="0" * 32, metrics=Metrics(),
                        on_commit=committed.append, clock=wall, monotonic=mono)
        await pipe.restore()

        async def feed(temperature: float) -> None:
            await pipe.commit([DeviceBatch("reactors-plc", [reading("reactor-a", "status", "heating", wall.now),
                                                            reading("reactor-a", "temperature", temperature,
                                                                    wall.now)])])

        async def states() -> list[tuple[str, str]]:
            return [(a["alarm_id"], a["state"]) for a in (await rows_by_leaf(buf)).get("alerts", [])]

        await feed(90.0)  # above the high limit: its 5 s on-delay starts
        elapse(2.0, step=-3600.0)  # the clock is stepped back an hour
        await feed(90.0)
        elapse(2.9)
        await feed(90.0)
        assert await states() == [], "4.9 s of real time: the delay has not run out"
        elapse(0.1)
        await feed(90.0)
        assert await states() == [("reactor-a/temperature_high", "active_unacked")], "5 s of real time"

        elapse(10.0, step=+7200.0)  # stepped forward two hours: the value read 10 s ago is not stale
        await pipe.commit([])
        elapse(10.0)
        await feed(80.0)
        assert "reactor-a/temperature_stale" in pipe.engine.alarms
        assert ("reactor-a/temperature_stale", "active_unacked") not in await states()

        await pipe.commit([cmds.parse("shelve", b'{"alarm_id": "reactor-a/temperature_high", "duration": "1h"}')])
        assert (await states())[-1] == ("reactor-a/temperature_high", "shelved")
        elapse(60.0, step=+3000.0)  # 50 min of wall time jumps, one minute passes
        await pipe.commit([])
        high = "reactor-a/temperature_high"
        assert [s for a, s in await states() if a == high][-1] == "shelved", "the shelve lasts its real hour"
        elapse(3540.0)
        await pipe.commit([])
        assert [s for a, s in await states() if a == high][-1] != "shelved", "and ends after it"

        rows = await buf.fetch(0, 10_000)
        assert [r.seq for r in rows] == list(range(1, len(rows) + 1)), "seq orders the rows, not their timestamps"
        stamps = [orjson.loads(r.payload)["readings"][0]["ts"] for r in rows if r.topic.endswith("/telemetry")]
        assert stamps[1] < stamps[0], "the stepped-back clock shows in the timestamps, not in the order"
