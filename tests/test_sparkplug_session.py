"""Sparkplug B output against the real broker: simulators -> gateway -> Mosquitto -> a Sparkplug subscriber.

Payloads are read with the codec's own decoder (tests/test_sparkplug_codec.py checks it against the
specification byte for byte).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import aiomqtt
import orjson
import pytest

from gateway.brokers import Mosquitto
from gateway.buffer import Row
from gateway.demo import with_endpoints
from gateway.rules import Rule
from gateway.sparkplug import Catalog, DataType, Metric, MetricKind, Payload, decode, encode, parse_topic
from gateway.sparkplug.payload import encode_state, to_ms
from gateway.sparkplug.session import CONSUMER
from gateway.sparkplug.topics import StateTopic, Topic
from gateway.tagmap import SourceError, SparkplugConfig, TagMap, load_tag_map, load_tag_map_text
from simulators.stations import Station

from .conftest import PLANT
from .helpers import collecting, plant_file, running, tune, validate, wait_until

pytestmark = pytest.mark.integration

GROUP = "plant-1"
NODE = "edge-01"
HOST = "scada-1"


@dataclass
class SpMessage:
    topic: Topic
    payload: Payload
    at: float

    @property
    def kind(self) -> str:
        return str(self.topic.message_type)

    @property
    def device(self) -> str | None:
        return self.topic.device_id


@dataclass
class SpCollector:
    """Every message the edge node publishes, decoded, in arrival order."""

    port: int
    persistent: bool = False  # a persistent session: the broker queues for it while it is away
    messages: list[SpMessage] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    identifier: str = field(default_factory=lambda: f"sp-{time.monotonic_ns()}")

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", self.port, identifier=self.identifier,
                                          clean_session=not self.persistent) as client:
                    await client.subscribe("spBv1.0/#", qos=1)
                    self.connected.set()
                    async for msg in client.messages:
                        topic = parse_topic(str(msg.topic))
                        if isinstance(topic, StateTopic) or topic.message_type in ("NCMD", "DCMD"):
                            continue  # the test's own messages
                        assert isinstance(msg.payload, bytes)
                        self.messages.append(SpMessage(topic, decode(msg.payload), time.time()))
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(0.1)

    def of(self, kind: str, device: str | None = None, since: int = 0) -> list[SpMessage]:
        return [m for m in self.messages[since:] if m.kind == kind and (device is None or m.device == device)]

    def last(self, kind: str) -> int:
        """Index of the newest message of this kind (-1: none)."""
        return max((i for i, m in enumerate(self.messages) if m.kind == kind), default=-1)


@contextlib.asynccontextmanager
async def sparkplug_collecting(port: int, *, persistent: bool = False) -> AsyncIterator[SpCollector]:
    collector = SpCollector(port, persistent)
    task = asyncio.create_task(collector.run())
    try:
        async with asyncio.timeout(10):
            await collector.connected.wait()
        yield collector
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def sparkplug_map(tm: TagMap, *, fmt: str = "sparkplug", host: str | None = None) -> TagMap:
    tm = tune(tm, interval=0.25, timeout=1.0, reconnect_max=0.5)
    mqtt = tm.mqtt.model_copy(update={"format": fmt, "sparkplug": SparkplugConfig(group_id=GROUP,
                                                                                  primary_host_id=host)})
    return tm.model_copy(update={"mqtt": mqtt})


async def publish(port: int, topic: str, payload: bytes, *, retain: bool = False) -> None:
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"pub-{time.monotonic_ns()}") as client:
        await client.publish(topic, payload, qos=1, retain=retain)


def every_device_has_data(sub: SpCollector, devices: set[str], since: int = 0) -> Callable[[], bool]:
    """Live (not historical) DDATA of each of ``devices`` among the messages from ``since`` on."""
    return lambda: {m.device for m in sub.of("DDATA", since=since) if not m.payload.metrics[0].is_historical} \
        >= devices


def bd_seq(m: SpMessage) -> int:
    value = next(x.value for x in m.payload.metrics if x.name == "bdSeq")
    assert isinstance(value, int)
    return value


def metric_value(m: SpMessage, alias: int) -> Metric | None:
    return next((x for x in m.payload.metrics if x.alias == alias), None)


def check_session(messages: list[SpMessage], catalog: Catalog) -> None:
    """NBIRTH first; seq +1 on every message after it; DATA only of born devices, by alias only."""
    assert messages[0].kind == "NBIRTH", [m.kind for m in messages[:5]]
    seq = -1
    born: set[str] = set()
    for m in messages:
        if m.kind == "NBIRTH":
            assert m.payload.seq == 0
            born = set()
        elif m.kind == "NDEATH":
            continue
        else:
            assert m.payload.seq == (seq + 1) % 256, (m.kind, m.device, m.payload.seq, seq)
        seq = m.payload.seq if m.payload.seq is not None else seq
        if m.kind == "DBIRTH":
            assert m.device is not None
            born.add(m.device)
        elif m.kind == "DDEATH":
            born.discard(m.device)
        elif m.kind == "DDATA":
            assert m.device in born, f"DDATA of {m.device} before its DBIRTH"
            device = catalog.device(m.device)
            for metric in m.payload.metrics:
                assert metric.name is None and metric.alias is not None, metric
                device.by_alias(metric.alias)


# -- configuration ---------------------------------------------------------------------------------


def test_format_and_sparkplug_section_in_the_tag_map() -> None:
    text = PLANT.read_text()
    assert load_tag_map_text(text, "plant.yaml").mqtt.format == "json", "JSON unless asked otherwise"
    section = "  format: both\n  sparkplug: {group_id: Plant1, primary_host_id: scada-1}\n"
    both = load_tag_map_text(text.replace("  topic_prefix: ninu/plant-1\n", "  topic_prefix: ninu/plant-1\n" + section),
                             "plant.yaml")
    assert both.mqtt.sparkplug == SparkplugConfig(group_id="Plant1", primary_host_id="scada-1")
    with pytest.raises(SourceError) as missing:
        load_tag_map_text(text.replace("  topic_prefix: ninu/plant-1\n",
                                       "  topic_prefix: ninu/plant-1\n  format: sparkplug\n"), "plant.yaml")
    assert "needs a sparkplug section" in str(missing.value.problems[0])
    with pytest.raises(SourceError) as bad:
        load_tag_map_text(text.replace("  topic_prefix: ninu/plant-1\n", "  topic_prefix: ninu/plant-1\n"
                                       "  format: sparkplug\n  sparkplug: {group_id: plant/1}\n"), "plant.yaml")
    assert "mqtt.sparkplug.group_id" in str(bad.value.problems[0])


# -- births, data, rebirth, alarms ------------------------------------------------------------------


async def test_births_before_data_with_every_metric_and_alias(
    live_map: TagMap, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    tm = sparkplug_map(live_map)
    catalog = Catalog.from_tag_map(tm)
    devices = set(catalog.devices)
    async with sparkplug_collecting(mosquitto.port) as sub, \
            collecting(mosquitto.port, f"{tm.mqtt.topic_prefix}/#") as json_sub, \
            running(tm, tmp_path / "b.sqlite"):
        await wait_until(every_device_has_data(sub, devices), 15, "DDATA of every asset")
    messages = sub.messages
    check_session(messages, catalog)
    nbirth = messages[0].payload
    assert {(m.name, m.alias, m.datatype) for m in nbirth.metrics} == \
        {(d.name, d.alias, d.datatype) for d in catalog.node.metrics}
    assert bd_seq(messages[0]) == 0, "the first connection of a new buffer"
    for device_id in devices:
        births = sub.of("DBIRTH", device_id)
        assert len(births) == 1
        first_data = sub.messages.index(sub.of("DDATA", device_id)[0])
        assert sub.messages.index(births[0]) < first_data
        metrics = births[0].payload.metrics
        assert {(m.name, m.alias, m.datatype) for m in metrics} == \
            {(d.name, d.alias, d.datatype) for d in catalog.device(device_id).metrics}, "every metric, its alias"
    birth = sub.of("DBIRTH", "filling-1")[0].payload.metrics
    temp = next(m for m in birth if m.name == "motor_temperature")
    assert temp.properties["engUnit"].value == "degC"
    assert temp.properties["Quality"].value in (0, 192)
    status = catalog.device("filling-1").metric("status")
    values = [v.value for m in sub.of("DDATA", "filling-1") if (v := metric_value(m, status.alias))]
    assert values and all(v in {"idle", "running", "paused", "maintenance", "error"} for v in values)
    for device_id in devices:  # report by exception: a live DDATA carries only what changed
        born = sub.of("DBIRTH", device_id)[0]
        last = {m.alias: (m.value, m.properties["Quality"], m.properties.get("Reason")) for m in born.payload.metrics}
        for data in sub.of("DDATA", device_id):
            for m in data.payload.metrics:
                if m.is_historical:
                    continue
                now = (m.value, m.properties["Quality"], m.properties.get("Reason"))
                assert now != last[m.alias], (device_id, m)
                last[m.alias] = now
    historical = [all(x.is_historical for x in m.payload.metrics) for m in sub.of("DDATA")]
    assert not historical[-1], "rows committed after the births are live data"
    assert historical == sorted(historical, reverse=True), "rows committed before the births (if any) come first"
    assert not json_sub.messages, "format sparkplug: no JSON topics"


async def test_rebirth_on_ncmd(live_map: TagMap, mosquitto: Mosquitto, tmp_path: Path) -> None:
    tm = sparkplug_map(live_map)
    catalog = Catalog.from_tag_map(tm)
    devices = set(catalog.devices)
    async with sparkplug_collecting(mosquitto.port) as sub, running(tm, tmp_path / "b.sqlite"):
        await wait_until(every_device_has_data(sub, devices), 15, "DDATA of every asset")
        mark = len(sub.messages)
        rebirth = encode(Payload(timestamp=to_ms(time.time()), metrics=(
            Metric(name="Node Control/Rebirth", datatype=DataType.BOOLEAN, value=True),)))
        await publish(mosquitto.port, f"spBv1.0/{GROUP}/NCMD/{NODE}", rebirth)
        await wait_until(lambda: bool(sub.of("NBIRTH", since=mark)) and every_device_has_data(
            sub, devices, since=sub.last("NBIRTH"))(), 10, "a new NBIRTH, then DDATA of every asset")
    check_session(sub.messages, catalog)
    first, again = sub.of("NBIRTH")
    assert again.payload.seq == 0
    assert bd_seq(again) == bd_seq(first), "a rebirth keeps the connection's bdSeq"
    after = sub.messages[sub.messages.index(again):]
    births = [m.device for m in after if m.kind == "DBIRTH"]
    assert set(births) == devices and len(births) == len(devices)
    last_birth = max(i for i, m in enumerate(after) if m.kind == "DBIRTH")
    first_data = min(i for i, m in enumerate(after) if m.kind == "DDATA")
    assert last_birth < first_data, "every DBIRTH before any DDATA"


async def test_alarm_transitions_are_device_metrics_and_dcmd_acknowledges(
    live_map: TagMap, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    always = Rule(id="always_hot", tag="motor_temperature", kind="high", limit=-1000, severity="low")
    assets = [a.model_copy(update={"rules": [*a.rules, always]}) if a.id == "filling-1" else a
              for a in live_map.assets]
    tm = sparkplug_map(live_map.model_copy(update={"assets": assets}))
    device = Catalog.from_tag_map(tm).device("filling-1")
    active, acked = device.alarm("always_hot")

    def flag(alias: int, value: bool) -> Callable[[], bool]:
        return lambda: any((x := metric_value(m, alias)) is not None and x.value is value
                           for m in sub.of("DDATA", "filling-1"))

    async with sparkplug_collecting(mosquitto.port) as sub, running(tm, tmp_path / "b.sqlite"):
        await wait_until(flag(active.alias, True), 15, "Alarms/always_hot/Active true in a DDATA")
        assert flag(acked.alias, False)(), "raised, not acknowledged"
        ack = encode(Payload(timestamp=to_ms(time.time()), metrics=(
            Metric(name=acked.name, datatype=DataType.BOOLEAN, value=True),)))
        await publish(mosquitto.port, f"spBv1.0/{GROUP}/DCMD/{NODE}/filling-1", ack)
        await wait_until(flag(acked.alias, True), 10, "Alarms/always_hot/Acked true after the DCMD")
    birth = {m.name: m for m in sub.of("DBIRTH", "filling-1")[0].payload.metrics}
    assert birth[active.name].datatype is DataType.BOOLEAN and birth[acked.name].datatype is DataType.BOOLEAN


# -- deaths ----------------------------------------------------------------------------------------


async def test_killed_gateway_broker_publishes_ndeath_with_the_births_bdseq(
    stations: dict[str, Station], mosquitto: Mosquitto, tmp_path: Path
) -> None:
    config = plant_file(tmp_path, mqtt_port=mosquitto.port, stations=stations, interval="250ms")
    text = config.read_text().replace("  topic_prefix: ninu/plant-1\n", "  topic_prefix: ninu/plant-1\n"
                                      f"  format: sparkplug\n  sparkplug: {{group_id: {GROUP}}}\n", 1)
    assert "format: sparkplug" in text
    config.write_text(text)
    buffer = tmp_path / "buffer.sqlite"
    env = {**os.environ, "EDGE_GATEWAY_BUFFER_PATH": str(buffer), "EDGE_GATEWAY_LOG_FORMAT": "json",
           "EDGE_GATEWAY_HTTP_ADDRESS": "off"}
    async with sparkplug_collecting(mosquitto.port) as sub:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "run", "--config", str(config),
            env=env, cwd=tmp_path, stderr=asyncio.subprocess.PIPE)
        try:
            await wait_until(lambda: bool(sub.of("DDATA")), 20, "DDATA from the gateway subprocess")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            _, stderr = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == -signal.SIGKILL, stderr.decode()[-3000:]
        await wait_until(lambda: bool(sub.of("NDEATH")), 10, "the NDEATH Will, published by the broker")
        born = bd_seq(sub.of("NBIRTH")[-1])
        death = sub.of("NDEATH")[-1].payload
        assert [(m.name, m.value) for m in death.metrics] == [("bdSeq", born)]
        # the next start connects with the next bdSeq (kept in the buffer)
        tm = load_tag_map(config)
        async with running(tm, buffer):
            await wait_until(lambda: len(sub.of("NBIRTH")) == 2, 10, "NBIRTH of the restarted gateway")
        assert bd_seq(sub.of("NBIRTH")[-1]) == (born + 1) % 256
        assert len(sub.of("NDEATH")) == 2, "a clean stop publishes its NDEATH itself"


async def test_plc_lost_ddeath_and_dbirth_when_back(
    live_map: TagMap, stations: dict[str, Station], mosquitto: Mosquitto, tmp_path: Path
) -> None:
    tm = sparkplug_map(live_map)
    catalog = Catalog.from_tag_map(tm)
    devices = set(catalog.devices)
    async with sparkplug_collecting(mosquitto.port) as sub, running(tm, tmp_path / "b.sqlite"):
        await wait_until(every_device_has_data(sub, devices), 15, "DDATA of every asset")
        await stations["labeling-1-plc"].stop()
        await wait_until(lambda: bool(sub.of("DDEATH")), 10, "DDEATH of labeling-1")
        died = len(sub.messages)
        await wait_until(every_device_has_data(sub, devices - {"labeling-1"}, since=died), 10,
                         "the other assets go on")
        await stations["labeling-1-plc"].start()
        await wait_until(lambda: bool(sub.of("DDATA", "labeling-1", since=died)), 15, "labeling-1 back")
    check_session(sub.messages, catalog)
    assert [m.device for m in sub.of("DDEATH")] == ["labeling-1"]
    death = sub.messages.index(sub.of("DDEATH")[0])
    rebirth = sub.messages.index(sub.of("DBIRTH", "labeling-1", since=death)[0])
    assert all(sub.messages.index(m) > rebirth for m in sub.of("DDATA", "labeling-1", since=death)), \
        "no DDATA of a dead device; a DBIRTH first when its PLC is back"
    before = [m for m in sub.of("DDATA", "labeling-1") if sub.messages.index(m) < death]
    tags = {d.alias for d in catalog.device("labeling-1").metrics if d.kind is MetricKind.TAG}
    quality = {m.properties["Quality"].value for m in before[-1].payload.metrics if m.alias in tags}
    assert quality == {0}, "the last DDATA before the DDEATH says the tags went bad"


# -- primary host ------------------------------------------------------------------------------------


async def test_primary_host_offline_data_buffered_then_replayed_as_historical(
    live_map: TagMap, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    tm = sparkplug_map(live_map, host=HOST)
    catalog = Catalog.from_tag_map(tm)
    devices = set(catalog.devices)
    state = f"spBv1.0/STATE/{HOST}"
    t0 = to_ms(time.time())
    async with sparkplug_collecting(mosquitto.port) as sub, running(tm, tmp_path / "b.sqlite") as gw:
        buffer = gw.buffer
        assert buffer is not None
        await wait_until(lambda: buffer.next_seq > 10, 10, "rows committed while no host was seen")
        assert not sub.messages, "no NBIRTH before the primary host is online"
        await publish(mosquitto.port, state, encode_state(online=True, timestamp=t0), retain=True)
        await wait_until(every_device_has_data(sub, devices), 15, "DDATA of every asset")
        await publish(mosquitto.port, state, encode_state(online=False, timestamp=t0 + 1), retain=True)
        await wait_until(lambda: bool(sub.of("NDEATH")), 10, "NDEATH when the primary host goes offline")
        offline_at = len(sub.messages)
        cursor, seq = buffer.cursor(CONSUMER), buffer.next_seq
        await wait_until(lambda: buffer.next_seq > seq + 20, 10, "rows committed while the host is offline")
        assert len(sub.messages) == offline_at, "nothing published while the primary host is offline"
        assert buffer.cursor(CONSUMER) == cursor, "the buffer keeps the rows"
        waiting = await buffer.fetch(cursor, 100_000, consumer=CONSUMER)
        await publish(mosquitto.port, state, encode_state(online=True, timestamp=t0 + 2), retain=True)
        await wait_until(lambda: any(not m.payload.metrics[0].is_historical
                                     for m in sub.of("DDATA", since=offline_at)), 15, "live data after the replay")
    messages = sub.messages
    check_session(messages[offline_at:], catalog)
    bd = [bd_seq(b) for b in sub.of("NBIRTH")]
    assert len(bd) == 2 and bd[1] != bd[0], "a new connection, a new bdSeq"
    data = sub.of("DDATA", since=offline_at)
    marks = [{x.is_historical for x in m.payload.metrics} for m in data]
    assert all(len(f) == 1 for f in marks), "a DDATA is historical or live, never both"
    flags = [f == {True} for f in marks]
    live = flags.index(False)
    assert all(flags[:live]) and not any(flags[live:]), "historical data first, in one run, then live"
    expected = _expected(waiting)
    got = [(m.device, [x.timestamp for x in m.payload.metrics]) for m in data[:live]]
    assert len(expected) > 20
    assert got[:len(expected)] == expected, "every buffered row, in seq order, flagged historical"


def _expected(rows: list[Row]) -> list[tuple[str, list[int]]]:
    """The DDATA each buffered row becomes: its asset and the timestamps of its metrics."""
    out = []
    for row in rows:
        doc = orjson.loads(row.payload)
        if row.topic.endswith("/telemetry"):
            out.append((doc["asset_id"], [to_ms(_epoch(r["ts"])) for r in doc["readings"]]))
        elif row.topic.endswith("/alerts"):
            out.append((doc["asset_id"], [to_ms(_epoch(doc["ts"]))] * 2))
    return out


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


# -- broker outage ---------------------------------------------------------------------------------------


async def test_broker_outage_data_buffered_then_replayed_as_historical(
    live_map: TagMap, stations: dict[str, Station], tmp_path: Path
) -> None:
    """The subscriber keeps a persistent session on a broker that queues QoS 0 for it, so it misses
    nothing of what the gateway publishes right after the broker is back."""
    workdir = tmp_path / "broker"
    workdir.mkdir()
    broker = Mosquitto(workdir=workdir, extra="queue_qos0_messages true\n")
    broker.start()
    try:
        tm = sparkplug_map(with_endpoints(live_map, mqtt_port=broker.port, stations=stations))
        devices = {a.id for a in tm.assets}
        async with sparkplug_collecting(broker.port, persistent=True) as sub, \
                running(tm, tmp_path / "b.sqlite") as gw:
            buffer, session = gw.buffer, gw.sparkplug
            assert buffer is not None and session is not None
            await wait_until(every_device_has_data(sub, devices), 15, "DDATA of every asset")
            broker.stop()
            await wait_until(lambda: not session.connected, 10, "the session sees the broker gone")
            cursor, seq = buffer.cursor(CONSUMER), buffer.next_seq
            await wait_until(lambda: buffer.next_seq > seq + 20, 10, "rows committed during the outage")
            assert buffer.cursor(CONSUMER) == cursor
            waiting = await buffer.fetch(cursor, 100_000, consumer=CONSUMER)
            broker.start()
            await wait_until(lambda: len(sub.of("NBIRTH")) == 2 and every_device_has_data(
                sub, devices, since=sub.last("NBIRTH"))(), 15, "births and live data after the outage")
    finally:
        broker.stop()
    again = sub.last("NBIRTH")
    assert bd_seq(sub.messages[again]) == (bd_seq(sub.messages[0]) + 1) % 256
    data = sub.of("DDATA", since=again)
    historical = [m for m in data if m.payload.metrics[0].is_historical]
    assert data[:len(historical)] == historical, "the replay first, then live data"
    assert [(m.device, [x.timestamp for x in m.payload.metrics]) for m in historical[:len(waiting)]] == \
        _expected(waiting), "every row of the outage, in seq order"


# -- reload ---------------------------------------------------------------------------------------------


async def test_reload_switches_format_and_rebirths_on_new_metrics(
    live_map: TagMap, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    json_map = tune(live_map, interval=0.25, timeout=1.0)
    sp_map = sparkplug_map(live_map)
    always = Rule(id="always_hot", tag="motor_temperature", kind="high", limit=-1000, severity="low")
    more = sp_map.model_copy(update={"assets": [a.model_copy(update={"rules": [*a.rules, always]})
                                                if a.id == "filling-1" else a for a in sp_map.assets]})
    maps = [sp_map, more]
    devices = {a.id for a in live_map.assets}
    prefix = live_map.mqtt.topic_prefix
    async with sparkplug_collecting(mosquitto.port) as sub, collecting(mosquitto.port, f"{prefix}/#") as json_sub, \
            running(json_map, tmp_path / "b.sqlite", reload_map=lambda: maps.pop(0)) as gw:
        await wait_until(lambda: {m.data["asset_id"] for m in json_sub.leaf("telemetry")} >= devices, 15,
                         "JSON telemetry of every asset")
        assert not sub.messages
        gw.request_reload()  # json -> sparkplug
        await wait_until(every_device_has_data(sub, devices), 15, "Sparkplug data after the reload")
        assert json_sub.leaf("status")[-1].data["state"] == "offline", "the JSON publisher stopped"
        gw.request_reload()  # a new rule: new metrics, a new session
        await wait_until(lambda: len(sub.of("NBIRTH")) == 2 and every_device_has_data(
            sub, devices, since=sub.last("NBIRTH"))(), 15, "births of the new metrics")
    first, second = sub.of("NBIRTH")
    assert bd_seq(second) == bd_seq(first) + 1
    assert sub.of("NDEATH"), "the old session ended with its NDEATH"
    names = {m.name for m in sub.of("DBIRTH", "filling-1", since=sub.messages.index(second))[0].payload.metrics}
    assert "Alarms/always_hot/Active" in names


# -- both outputs --------------------------------------------------------------------------------------


async def test_both_formats_share_the_buffer(live_map: TagMap, mosquitto: Mosquitto, tmp_path: Path) -> None:
    tm = sparkplug_map(live_map, fmt="both")
    devices = {a.id for a in tm.assets}
    prefix = tm.mqtt.topic_prefix
    async with sparkplug_collecting(mosquitto.port) as sub, collecting(mosquitto.port, f"{prefix}/#") as json_sub, \
            running(tm, tmp_path / "b.sqlite") as gw:
        buffer = gw.buffer
        assert buffer is not None
        await wait_until(lambda: every_device_has_data(sub, devices)()
                         and {m.data["asset_id"] for m in json_sub.leaf("telemetry")} >= devices,
                         15, "telemetry of every asset in both formats")
        top = max(int(str(m.data["seq"])) for m in json_sub.leaf("telemetry"))
        # both outputs delivered every row up to ``top``: the buffer lets them go (and keeps the rest)
        deadline = time.monotonic() + 10
        while (rows := await buffer.fetch(0, 1, consumer=CONSUMER)) and rows[0].seq <= top:
            assert time.monotonic() < deadline, f"row {rows[0].seq} is still in the buffer"
            await asyncio.sleep(0.02)
    for m in json_sub.leaf("telemetry"):
        validate("telemetry", m.data)
    assert json_sub.leaf("status")[0].data["state"] == "online"
