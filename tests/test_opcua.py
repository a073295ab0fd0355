"""The OPC-UA driver against the reactor simulator and a foreign asyncua server, over real sockets."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from asyncua import Server, ua

from drivers import DeviceUnreachable
from drivers.opcua import OpcTagSpec, OpcUaDriver, SecurityMismatch
from drivers.registry import build_driver
from gateway.brokers import Mosquitto
from gateway.demo import with_endpoints
from gateway.model import Quality, Reading
from gateway.tagmap import OpcUaDevice, TagMap
from simulators.reactors import NAMESPACE, ReactorServer

from .helpers import collecting, running, validate, wait_until

pytestmark = pytest.mark.integration
DEVICE = "reactors-plc"


def reactors_only(tm: TagMap, **device: object) -> TagMap:
    dev = next(d for d in tm.devices if isinstance(d, OpcUaDevice)).model_copy(update=device)
    assets = [a for a in tm.assets if a.kind == "reactor"]
    return tm.model_copy(update={"devices": [dev], "assets": assets})


@pytest.fixture
async def reactors() -> AsyncIterator[ReactorServer]:
    server = ReactorServer(time_scale=5.0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _driver(plant_map: TagMap, reactors: ReactorServer, **device: object) -> OpcUaDriver:
    tm = with_endpoints(reactors_only(plant_map, **device), reactors={DEVICE: reactors})
    driver = build_driver(tm, DEVICE)
    assert isinstance(driver, OpcUaDriver)
    return driver


async def _collect(driver: OpcUaDriver, until: float, want: int) -> dict[tuple[str, str], Reading]:
    """Latest reading per (asset, tag), reading the driver the way the poller does."""
    latest: dict[tuple[str, str], Reading] = {}
    deadline = time.monotonic() + until
    while time.monotonic() < deadline:
        for r in await driver.read():
            latest[(r.asset, r.tag)] = r
        if len(latest) >= want and all(r.quality is Quality.GOOD for r in latest.values()):
            break
        await asyncio.sleep(0.05)
    return latest


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_every_reactor_tag_reaches_mqtt_with_type_and_quality(
    plant_map: TagMap, reactors: ReactorServer, mosquitto: Mosquitto, tmp_path: Path, mode: str
) -> None:
    reactors.freeze()
    await asyncio.sleep(0.2)
    tm = with_endpoints(reactors_only(plant_map, mode=mode, interval=0.2), mqtt_port=mosquitto.port,
                        reactors={DEVICE: reactors})
    want = {(a.id, t) for a in tm.assets for t in a.tags}
    async with collecting(mosquitto.port, f"{tm.mqtt.topic_prefix}/reactors/+/telemetry") as sub, \
            running(tm, tmp_path / "b.sqlite"):
        def seen() -> set[tuple[str, str]]:
            return {(m.data["asset_id"], r["tag"]) for m in sub.messages for r in m.data["readings"]
                    if r["quality"] == "good"}
        await wait_until(lambda: seen() >= want, 15, f"all {len(want)} reactor tags in {mode} mode")
    status_names = {0: "idle", 1: "mixing", 2: "heating", 3: "cooling", 4: "transferring", 5: "cleaning"}
    for m in sub.messages:
        validate("telemetry", m.data)
        letter = str(m.data["asset_id"])[-1].upper()
        snap = reactors.snapshot(letter)
        for r in m.data["readings"]:
            variable = "".join(p.capitalize() for p in r["tag"].split("_"))
            want_value = snap[variable]
            if r["tag"] == "status":
                assert r["value"] == status_names[want_value]  # type: ignore[index]
            elif isinstance(want_value, float):
                assert isinstance(r["value"], float) and math.isclose(r["value"], want_value), r
            else:
                assert r["value"] == want_value and type(r["value"]) is type(want_value), r
            assert r["source_ts"] is not None, "OPC-UA carries the source timestamp"


async def test_missing_node_and_bad_sensor_fail_only_their_own_tags(
    plant_map: TagMap, reactors: ReactorServer
) -> None:
    tm = with_endpoints(reactors_only(plant_map, interval=0.1), reactors={DEVICE: reactors})
    asset = tm.asset("reactor-a")
    ghost = asset.tags["pressure"].model_copy(update={"node": f"nsu={NAMESPACE};s=ReactorA.NoSuchSensor"})
    wrong = asset.tags["pressure"].model_copy(update={"node": f"nsu={NAMESPACE};s=ReactorA.BatchId"})
    tags = {**asset.tags, "ghost": ghost, "wrong_type": wrong}
    tm = tm.model_copy(update={"assets": [asset.model_copy(update={"tags": tags}), *tm.assets[1:]]})
    reactors.models["B"].faults.bad.add("Pressure")
    for mode in ("subscribe", "poll"):
        driver = build_driver(tm.model_copy(update={"devices": [tm.devices[0].model_copy(update={"mode": mode})]}),
                              DEVICE)
        await driver.connect()
        try:
            latest: dict[tuple[str, str], Reading] = {}
            async with asyncio.timeout(10):
                while len(latest) < 38:
                    latest.update({(r.asset, r.tag): r for r in await driver.read()})
                    await asyncio.sleep(0.05)
        finally:
            await driver.close()
        bad = {k: r for k, r in latest.items() if r.quality is not Quality.GOOD}
        assert set(bad) == {("reactor-a", "ghost"), ("reactor-a", "wrong_type"), ("reactor-b", "pressure")}, mode
        assert "BadNodeIdUnknown" in (bad[("reactor-a", "ghost")].reason or "")
        assert "ReactorA.NoSuchSensor" in (bad[("reactor-a", "ghost")].reason or ""), "names the node"
        assert "expected float" in (bad[("reactor-a", "wrong_type")].reason or "")
        assert "BadSensorFailure" in (bad[("reactor-b", "pressure")].reason or "")


async def test_server_restart_shows_bad_then_recovers_every_item(
    plant_map: TagMap, reactors: ReactorServer, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    tm = with_endpoints(reactors_only(plant_map, interval=0.2, timeout=0.5), mqtt_port=mosquitto.port,
                        reactors={DEVICE: reactors})
    tm = tm.model_copy(update={"mqtt": tm.mqtt.model_copy(update={"reconnect_max": 1.0})})
    async with collecting(mosquitto.port, f"{tm.mqtt.topic_prefix}/reactors/+/state") as sub, \
            running(tm, tmp_path / "b.sqlite") as gw:
        gw.pollers[DEVICE].backoff.cap = 1.0

        def latest_state(asset: str) -> dict[str, object]:
            states = [m.data for m in sub.messages if m.data["asset_id"] == asset]
            return states[-1] if states else {}

        def all_quality(q: str) -> bool:
            return all(set(latest_state(a).get("quality", {}).values()) == {q} for a in ("reactor-a", "reactor-b", "reactor-c"))  # type: ignore[union-attr]

        await wait_until(lambda: all_quality("good"), 15, "good reactor state")
        await reactors.restart(downtime=2.0, shift_namespaces=2)  # indexes change, as after a redeploy
        await wait_until(lambda: all_quality("bad"), 10, "bad quality while the server is down")
        reasons = set(latest_state("reactor-a")["reasons"].values())  # type: ignore[union-attr]
        assert reasons and all(reasons), reasons
        await wait_until(lambda: all_quality("good"), 15, "every tag good again after the restart")
    assert reactors.ns != 2 or reactors.extra_namespaces == 2


async def test_plc_download_recovers_without_restart(plant_map: TagMap, reactors: ReactorServer) -> None:
    for mode in ("subscribe", "poll"):
        driver = _driver(plant_map, reactors, mode=mode, interval=0.1, recheck=0.5)
        await driver.connect()
        try:
            latest = await _collect(driver, 10, 36)
            assert all(r.quality is Quality.GOOD for r in latest.values())
            download = asyncio.create_task(reactors.download("A", downtime=1.5))

            async def state() -> None:
                latest.update({(r.asset, r.tag): r for r in await driver.read()})

            async with asyncio.timeout(10):
                while not all(latest[("reactor-a", t)].quality is Quality.BAD for t in ("temperature", "pressure")):
                    await state()
                    await asyncio.sleep(0.05)
            assert all(latest[(a, "temperature")].quality is Quality.GOOD for a in ("reactor-b", "reactor-c"))
            assert "BadNodeIdUnknown" in (latest[("reactor-a", "temperature")].reason or "")
            await download
            async with asyncio.timeout(10):
                while not all(r.quality is Quality.GOOD for r in latest.values()):
                    await state()
                    await asyncio.sleep(0.05)
        finally:
            await driver.close()


async def test_foreign_server_numeric_ids_other_namespace() -> None:
    """Not our simulator: another namespace URI, numeric node ids, values set by the test."""
    server = Server()
    await server.init()
    from gateway.brokers import free_port

    port = free_port()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/")
    await server.register_namespace("urn:vendor:other")
    idx = await server.register_namespace("http://example.com/line-7/")
    obj = await server.nodes.objects.add_object(ua.NodeId(5000, idx), "Line7")
    await obj.add_variable(ua.NodeId(5001, idx), "Speed", 12.5)
    await obj.add_variable(ua.NodeId(5002, idx), "Count", ua.Variant(42, ua.VariantType.UInt32))
    await obj.add_variable(ua.NodeId(5003, idx), "Running", True)
    async with server:
        tags = [
            OpcTagSpec("line-7", "speed", "nsu=http://example.com/line-7/;i=5001", expected="float"),
            OpcTagSpec("line-7", "count", f"ns={idx};i=5002", expected="int"),
            OpcTagSpec("line-7", "running", "nsu=http://example.com/line-7/;i=5003", expected="bool"),
            OpcTagSpec("line-7", "server_state", "i=2259"),  # a standard node in namespace 0
        ]
        for mode in ("poll", "subscribe"):
            driver = OpcUaDriver(device_id="line-7-plc", endpoint=f"opc.tcp://127.0.0.1:{port}/", mode=mode,
                                 interval=0.1, timeout=2.0, tags=tags)
            await driver.connect()
            try:
                latest = await _collect(driver, 10, 4)
            finally:
                await driver.close()
            values = {t: r.value for (_, t), r in latest.items()}
            assert values == {"speed": 12.5, "count": 42, "running": True, "server_state": 0}, mode


async def test_unknown_namespace_marks_tags_bad(reactors: ReactorServer) -> None:
    tags = [OpcTagSpec("reactor-a", "temperature", "nsu=urn:not:here;s=ReactorA.Temperature"),
            OpcTagSpec("reactor-a", "pressure", f"nsu={NAMESPACE};s=ReactorA.Pressure")]
    driver = OpcUaDriver(device_id=DEVICE, endpoint=reactors.endpoint, mode="poll", interval=0.1, timeout=2.0,
                         tags=tags)
    await driver.connect()
    try:
        by_tag = {r.tag: r for r in await driver.read()}
    finally:
        await driver.close()
    assert by_tag["pressure"].quality is Quality.GOOD
    assert by_tag["temperature"].quality is Quality.BAD
    assert "namespace 'urn:not:here' not on the server" in (by_tag["temperature"].reason or "")


async def test_unreachable_endpoint(plant_map: TagMap) -> None:
    from gateway.brokers import free_port

    driver = OpcUaDriver(device_id=DEVICE, endpoint=f"opc.tcp://127.0.0.1:{free_port()}/", mode="poll",
                         interval=0.1, timeout=0.5, tags=[])
    with pytest.raises(DeviceUnreachable, match="cannot connect"):
        await driver.connect()
    assert SecurityMismatch.kind == "security"
