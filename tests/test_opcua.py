"""The OPC-UA driver against the reactor simulator and a foreign asyncua server, over real sockets."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import pytest
from asyncua import Server, ua

from drivers import DeviceTimeout, DeviceUnreachable
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
    await asyncio.sleep(0.3)  # the simulator publishes the Bad status on its next tick
    expected_bad = {("reactor-a", "ghost"), ("reactor-a", "wrong_type"), ("reactor-b", "pressure")}
    for mode in ("subscribe", "poll"):
        driver = build_driver(tm.model_copy(update={"devices": [tm.devices[0].model_copy(update={"mode": mode})]}),
                              DEVICE)
        await driver.connect()
        try:
            latest: dict[tuple[str, str], Reading] = {}

            def bad() -> dict[tuple[str, str], Reading]:
                return {k: r for k, r in latest.items() if r.quality is not Quality.GOOD}

            async with asyncio.timeout(10):
                while len(latest) < 38 or set(bad()) != expected_bad:
                    latest.update({(r.asset, r.tag): r for r in await driver.read()})
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # and nothing else turns bad meanwhile
            latest.update({(r.asset, r.tag): r for r in await driver.read()})
        finally:
            await driver.close()
        bad = {k: r for k, r in latest.items() if r.quality is not Quality.GOOD}
        assert set(bad) == expected_bad, mode
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
        restart = asyncio.create_task(reactors.restart(downtime=2.0, shift_namespaces=2))  # indexes change
        await wait_until(lambda: all_quality("bad"), 10, "bad quality while the server is down")
        reasons = set(latest_state("reactor-a")["reasons"].values())  # type: ignore[union-attr]
        assert reasons and all(reasons), reasons
        await restart
        back = time.monotonic()
        await wait_until(lambda: all_quality("good"), 15, "every tag good again after the restart")
        print(f"reactor server restart: all 36 tags good {time.monotonic() - back:.2f}s after it was back "
              f"(backoff cap 1 s)")
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


def _pki(tmp_path: Path, name: str, uri: str, server: bool) -> tuple[Path, Path]:
    from asyncua.crypto.cert_gen import (
        dump_private_key_as_pem,
        generate_private_key,
        generate_self_signed_app_certificate,
    )
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = generate_private_key()
    use = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = generate_self_signed_app_certificate(
        key, name, {"organizationName": "NINU"},
        [x509.UniformResourceIdentifier(uri), x509.DNSName("localhost")], [use],
    )
    cert_path, key_path = tmp_path / f"{name}.der", tmp_path / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(Encoding.DER))
    key_path.write_bytes(dump_private_key_as_pem(key))
    return cert_path, key_path


@pytest.mark.parametrize(("policy", "mode"), [
    ("Basic256Sha256", "SignAndEncrypt"), ("Basic256Sha256", "Sign"),
    ("Aes128Sha256RsaOaep", "SignAndEncrypt"), ("Aes256Sha256RsaPss", "SignAndEncrypt"),
])
async def test_secure_channel(tmp_path: Path, policy: str, mode: str) -> None:
    server_cert, server_key = _pki(tmp_path, "plc", "urn:freeopcua:python:server", server=True)
    client_cert, client_key = _pki(tmp_path, "gateway", "urn:ninu:edge-gateway:edge-01", server=False)
    other_cert, _ = _pki(tmp_path, "impostor", "urn:freeopcua:python:server", server=True)
    server = ReactorServer(security=mode, policy=policy, certificate=server_cert, private_key=server_key)
    await server.start()
    tags = [OpcTagSpec("reactor-a", "temperature", f"nsu={NAMESPACE};s=ReactorA.Temperature", expected="float")]
    try:
        from drivers.opcua import Security

        secure = Security(mode, policy, client_cert, client_key, server_cert)
        driver = OpcUaDriver(device_id=DEVICE, endpoint=server.endpoint, mode="poll", interval=0.1, timeout=3.0,
                             tags=tags, security=secure)
        await driver.connect()
        try:
            (reading,) = await driver.read()
            assert reading.quality is Quality.GOOD and isinstance(reading.value, float)
            assert driver._client is not None
            assert driver._client.security_policy.Mode == getattr(ua.MessageSecurityMode, mode)
            assert driver._client.security_policy.URI.endswith(policy.replace("Sha256Rsa", "_Sha256_Rsa"))
        finally:
            await driver.close()

        # The server is not the one whose certificate we pinned: refused, never downgraded.
        pinned_wrong = Security(mode, policy, client_cert, client_key, other_cert)
        driver = OpcUaDriver(device_id=DEVICE, endpoint=server.endpoint, mode="poll", interval=0.1, timeout=1.0,
                             tags=tags, security=pinned_wrong)
        with pytest.raises(DeviceTimeout, match="is server_certificate the server's certificate"):
            await driver.connect()
        assert driver._client is None
    finally:
        await server.stop()


async def test_configured_security_is_never_downgraded(tmp_path: Path, reactors: ReactorServer) -> None:
    """The reactor simulator offers only security mode None; a client that wants encryption fails."""
    client_cert, client_key = _pki(tmp_path, "gateway", "urn:ninu:edge-gateway:edge-01", server=False)
    from drivers.opcua import Security

    driver = OpcUaDriver(
        device_id=DEVICE, endpoint=reactors.endpoint, mode="poll", interval=0.1, timeout=3.0,
        tags=[OpcTagSpec("reactor-a", "temperature", f"nsu={NAMESPACE};s=ReactorA.Temperature")],
        security=Security("SignAndEncrypt", "Basic256Sha256", client_cert, client_key),
    )
    with pytest.raises(SecurityMismatch, match="cannot connect"):
        await driver.connect()
    assert driver._client is None


async def test_slow_server_times_out_and_recovers(reactors: ReactorServer) -> None:
    from simulators.proxy import FaultProxy

    proxy = FaultProxy(reactors.host, reactors.port)
    await proxy.start()
    endpoint = f"opc.tcp://127.0.0.1:{proxy.port}/reactors"
    tags = [OpcTagSpec("reactor-a", "temperature", f"nsu={NAMESPACE};s=ReactorA.Temperature", expected="float")]
    # a timeout with room for a loaded machine's connect; a delay far beyond it
    driver = OpcUaDriver(device_id=DEVICE, endpoint=endpoint, mode="poll", interval=0.1, timeout=1.0, tags=tags)
    try:
        await driver.connect()
        assert (await driver.read())[0].quality is Quality.GOOD
        proxy.delay = 3.0
        with pytest.raises(DeviceTimeout, match="no answer"):
            await driver.read()
        proxy.delay = 0.0
        proxy.cut()
        await driver.connect()  # what the poller does next: a new client
        assert (await driver.read())[0].quality is Quality.GOOD
    finally:
        await driver.close()
        await proxy.stop()


async def test_username_password_from_the_environment(
    plant_map: TagMap, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asyncua.crypto.permission_rules import User, UserRole

    class OnlyEdge:
        def get_user(self, _iserver: object, username: str | None = None, password: str | None = None,
                     certificate: object = None) -> User | None:
            return User(role=UserRole.User) if (username, password) == ("edge-01", "s3cret") else None

    from gateway.brokers import free_port

    port = free_port()
    server = Server(user_manager=OnlyEdge())  # type: ignore[arg-type]
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/")
    server.set_security_IDs(["Username"])
    async with server:
        tm = reactors_only(plant_map, endpoint=f"opc.tcp://127.0.0.1:{port}/", username="edge-01", mode="poll")
        monkeypatch.setenv("EDGE_GATEWAY_OPCUA_PASSWORD", "s3cret")
        driver = build_driver(tm, DEVICE)
        await driver.connect()  # the reactor nodes are not there; the session is what counts
        await driver.close()
        monkeypatch.setenv("EDGE_GATEWAY_OPCUA_PASSWORD", "wrong")
        with pytest.raises(DeviceUnreachable, match="cannot connect"):
            await build_driver(tm, DEVICE).connect()


async def test_silent_server_is_detected_in_subscribe_mode(reactors: ReactorServer) -> None:
    """The link stays open but nothing comes back (no publish responses, no keep-alives)."""
    from simulators.proxy import FaultProxy

    proxy = FaultProxy(reactors.host, reactors.port)
    await proxy.start()
    tags = [OpcTagSpec("reactor-a", "temperature", f"nsu={NAMESPACE};s=ReactorA.Temperature")]
    driver = OpcUaDriver(device_id=DEVICE, endpoint=f"opc.tcp://127.0.0.1:{proxy.port}/reactors", mode="subscribe",
                         interval=0.2, timeout=0.5, tags=tags)
    try:
        await driver.connect()
        await _collect(driver, 5, 1)
        proxy.hang = True
        with pytest.raises((DeviceUnreachable, DeviceTimeout)):
            async with asyncio.timeout(15):
                while True:
                    await driver.read()
                    await asyncio.sleep(0.1)
    finally:
        proxy.hang = False
        await driver.close()
        await proxy.stop()


async def test_server_side_deadband(reactors: ReactorServer) -> None:
    """deadband_type absolute: the server sends a change only when it exceeds the tag's deadband."""
    node = f"nsu={NAMESPACE};s=ReactorA.Temperature"  # noisy: changes on every simulator tick
    tags = [OpcTagSpec("reactor-a", "wide", node, deadband=1000.0), OpcTagSpec("reactor-b", "counter",
            f"nsu={NAMESPACE};s=ReactorB.Temperature")]
    counts = {"wide": 0, "counter": 0}
    for deadband_type in ("absolute", "none"):
        driver = OpcUaDriver(device_id=DEVICE, endpoint=reactors.endpoint, mode="subscribe", interval=0.1,
                             timeout=2.0, tags=tags, deadband_type=deadband_type, sampling_interval=0.05)
        counts = {"wide": 0, "counter": 0}
        await driver.connect()
        try:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                for r in await driver.read():
                    counts[r.tag] += 1
                await asyncio.sleep(0.1)
        finally:
            await driver.close()
        if deadband_type == "absolute":
            assert counts["wide"] == 1, f"only the initial value passes a deadband of 1000: {counts}"
            assert counts["counter"] >= 5, counts
        else:
            assert counts["wide"] >= 5, f"without a server deadband every change arrives: {counts}"
