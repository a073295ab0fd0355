"""Writes to PLC tags through the drivers, against the bundled simulators over real sockets."""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import AsyncIterator

import pytest
from asyncua import ua

from drivers import DeviceException, DeviceTimeout, DeviceUnreachable, WriteNotApplied, WriteRefused
from drivers.modbus.codec import EncodeError
from drivers.modbus.driver import ModbusTcpDriver
from drivers.opcua import OpcUaDriver
from drivers.registry import build_driver
from gateway.demo import with_endpoints
from gateway.model import Quality
from gateway.tagmap import ModbusTag, OpcUaDevice, OpcUaTag, TagMap
from simulators.reactors import NAMESPACE, ReactorServer
from simulators.stations import Station

from .helpers import tune, wait_until

pytestmark = pytest.mark.integration
STATION = "filling-1-plc"
ASSET = "filling-1"
REACTORS = "reactors-plc"
# Tags the plant map does not have: a float setpoint in spare holding registers (plain PLC memory),
# flag bits next to the program's status bits in register 8, and the status word without its enum.
EXTRA_STATION_TAGS = {
    "fill_setpoint": {"table": "holding", "address": 40, "type": "float32", "word_order": "little"},
    "dose_total": {"table": "holding", "address": 44, "type": "float64", "byte_order": "little"},
    "spare_flag": {"table": "holding", "address": 8, "type": "bool", "bit": 5},
    "flag_le": {"table": "holding", "address": 42, "type": "bool", "bit": 3, "byte_order": "little"},
    "status_code": {"table": "holding", "address": 0, "type": "uint16"},
}


# --------------------------------------------------------------------------------------------
# Modbus (station simulator)
# --------------------------------------------------------------------------------------------


@pytest.fixture
async def modbus(plant_map: TagMap, station: Station) -> AsyncIterator[ModbusTcpDriver]:
    tm = tune(with_endpoints(plant_map, stations={STATION: station}), timeout=0.5)
    asset = tm.asset(ASSET)
    extra = {name: ModbusTag.model_validate({"device": STATION, **spec}) for name, spec in EXTRA_STATION_TAGS.items()}
    tm = tm.model_copy(update={"assets": [asset.model_copy(update={"tags": {**asset.tags, **extra}})]})
    driver = build_driver(tm, STATION)
    assert isinstance(driver, ModbusTcpDriver)
    await driver.connect()
    try:
        yield driver
    finally:
        await driver.close()


async def _values(driver: ModbusTcpDriver) -> dict[str, object]:
    readings = await driver.read()
    assert not readings.errors, readings.errors
    assert all(r.quality is Quality.GOOD for r in readings), [r for r in readings if r.quality is not Quality.GOOD]
    return {r.tag: r.value for r in readings}


def _f32(x: float) -> float:
    return float(struct.unpack(">f", struct.pack(">f", x))[0])


async def test_float_setpoint_in_holding_registers(modbus: ModbusTcpDriver, station: Station) -> None:
    assert await modbus.write(ASSET, "fill_setpoint", 512.25) == 0.0  # the old value, for the audit trail
    assert station._blocks["h"][40:42] == [0x1000, 0x4400]  # 512.25 is 0x44001000; word order CDAB
    assert (await _values(modbus))["fill_setpoint"] == 512.25
    assert await modbus.write(ASSET, "fill_setpoint", 12.3) == 512.25
    assert (await _values(modbus))["fill_setpoint"] == _f32(12.3)  # float32 precision
    assert await modbus.write(ASSET, "dose_total", -1234.5678) == 0.0  # float64, byte order little (FC 16)
    assert (await _values(modbus))["dose_total"] == -1234.5678


async def test_int16_with_scale_holds_across_plc_steps(modbus: ModbusTcpDriver, station: Station) -> None:
    assert await modbus.write(ASSET, "speed_setpoint", 85.5) == 100.0
    assert station._blocks["h"][7] == 855  # raw = value / scale
    assert station.model.speed == 85.5 and station.snapshot()["speed_setpoint"] == 85.5
    steps = station.model.steps
    await asyncio.sleep(0.35)  # the process model advances; the setpoint is its state, not overwritten
    values = await _values(modbus)
    assert station.model.steps > steps
    assert values["speed_setpoint"] == pytest.approx(85.5)
    assert await modbus.write(ASSET, "speed_setpoint", -0.0) == pytest.approx(85.5)
    assert (await _values(modbus))["speed_setpoint"] == 0.0


async def test_enum_status_is_written_by_name(modbus: ModbusTcpDriver, station: Station) -> None:
    old = await modbus.write(ASSET, "status", "maintenance")
    assert old in ("idle", "running", "paused", "maintenance", "error")
    assert station._blocks["h"][0] == 3
    await asyncio.sleep(0.35)
    values = await _values(modbus)
    assert values["status"] == "maintenance" and values["status_code"] == 3  # held by the PLC, not the model's cycle
    assert values["door_open"] is True  # the program's own output follows the new status
    assert await modbus.write(ASSET, "status", "running") == "maintenance"
    assert (await _values(modbus))["status"] == "running"


async def test_coil(modbus: ModbusTcpDriver, station: Station) -> None:
    station.freeze()
    assert await modbus.write(ASSET, "conveyor_enabled", False) is True  # the line runs: the conveyor ran
    assert station.snapshot()["conveyor_enabled"] is False
    assert (await _values(modbus))["conveyor_enabled"] is False
    assert await modbus.write(ASSET, "conveyor_enabled", True) is False
    assert (await _values(modbus))["conveyor_enabled"] is True


async def test_bit_in_register_leaves_the_other_bits_alone(modbus: ModbusTcpDriver, station: Station) -> None:
    station.freeze()
    station._blocks["h"][8] |= 0x4000  # a bit no tag maps, set by someone else
    before = await _values(modbus)
    register = station._blocks["h"][8]
    assert await modbus.write(ASSET, "spare_flag", True) is False
    assert station._blocks["h"][8] == register | 0x0020
    after = await _values(modbus)
    assert after["spare_flag"] is True
    for tag in ("running", "fault", "door_open"):
        assert after[tag] == before[tag], tag
    assert await modbus.write(ASSET, "spare_flag", False) is True
    assert station._blocks["h"][8] == register
    assert await modbus.write(ASSET, "flag_le", True) is False  # byte order little: bit 3 is 0x0800 on the wire
    assert station._blocks["h"][42] == 0x0800
    assert (await _values(modbus))["flag_le"] is True


async def test_string_and_uint32_setpoints(modbus: ModbusTcpDriver, station: Station) -> None:
    assert await modbus.write(ASSET, "product_code", "NINU-GEL-1L") == "NINU-FIL-500"
    old_batch = station.snapshot()["batch_number"]
    assert await modbus.write(ASSET, "batch_number", 4_000_000_000) == old_batch  # uint32, byte order little
    await asyncio.sleep(0.25)
    values = await _values(modbus)
    assert values["product_code"] == "NINU-GEL-1L" and values["batch_number"] == 4_000_000_000
    assert station.snapshot()["product_code"] == "NINU-GEL-1L"


@pytest.mark.parametrize("case", [
    ("ambient_temperature", 20.0, WriteRefused, "input table, which Modbus cannot write"),
    ("guard_closed", False, WriteRefused, "discrete table, which Modbus cannot write"),
    ("no_such_tag", 1, WriteRefused, "no tag filling-1/no_such_tag"),
    ("speed_setpoint", 4000.0, EncodeError, r"out of range for int16 with scale 0.1 .*\(-3276.8..3276.7\)"),
    ("speed_setpoint", 55.55, EncodeError, "not a step of the tag's resolution 0.1"),
    ("target_units_per_hour", -1, EncodeError, r"-1 is out of range for uint16 \(0..65535\)"),
    ("target_units_per_hour", 70000, EncodeError, "out of range for uint16"),
    ("fill_setpoint", math.nan, EncodeError, "not a finite number"),
    ("fill_setpoint", 1e39, EncodeError, "does not fit float32"),
    ("status", "exploded", EncodeError, "needs one of idle, running, paused, maintenance, error"),
    ("conveyor_enabled", 1, EncodeError, "needs true or false"),
    ("spare_flag", "on", EncodeError, "needs true or false"),
    ("product_code", "X" * 17, EncodeError, "longer than 16 bytes"),
], ids=lambda c: f"{c[0]}={c[1]!r}"[:40])
async def test_refusals_change_nothing_on_the_plc(modbus: ModbusTcpDriver, station: Station,
                                                  case: tuple[str, object, type[Exception], str]) -> None:
    tag, value, error, message = case
    station.freeze()
    blocks = {k: list(v) for k, v in station._blocks.items()}
    requests = station.requests
    with pytest.raises(error, match=message) as err:
        await modbus.write(ASSET, tag, value)
    assert isinstance(err.value, ValueError)  # a request problem, not a device failure
    assert station.requests == requests, "not even a read was sent"
    assert station.writes == 0
    assert {k: list(v) for k, v in station._blocks.items()} == blocks
    assert await _values(modbus)  # the connection is fine


async def test_unknown_asset_is_refused(modbus: ModbusTcpDriver) -> None:
    with pytest.raises(WriteRefused, match="no tag reactor-a/speed_setpoint"):
        await modbus.write("reactor-a", "speed_setpoint", 50.0)


async def test_plc_that_does_not_keep_the_value(modbus: ModbusTcpDriver, station: Station) -> None:
    station.freeze()
    with pytest.raises(WriteNotApplied, match=r"speed_setpoint: wrote 130.0, the PLC holds 120.0"):
        await modbus.write(ASSET, "speed_setpoint", 130.0)  # the program clamps speed to 0..120 %
    assert station.model.speed == 120.0
    with pytest.raises(WriteNotApplied, match=r"motor_temperature: wrote 20\.0, the PLC holds"):
        await modbus.write(ASSET, "motor_temperature", 20.0)  # an output of the program: re-asserted
    assert (await _values(modbus))["motor_temperature"] == station.snapshot()["motor_temperature"]


async def test_exception_replies(modbus: ModbusTcpDriver, station: Station) -> None:
    station.freeze()
    status = station._blocks["h"][0]
    with pytest.raises(DeviceException, match=r"exception 3 \(illegal data value\) for write \(FC 6\)"):
        await modbus.write(ASSET, "status_code", 9)  # no such status: the program refuses it
    assert station._blocks["h"][0] == status
    station.faults.exception = 4
    try:
        with pytest.raises(DeviceException, match=r"exception 4 \(server device failure\)"):
            await modbus.write(ASSET, "speed_setpoint", 50.0)  # the read before the write fails: no write
    finally:
        station.faults.clear()
    assert station.model.speed == 100.0
    assert await modbus.write(ASSET, "speed_setpoint", 50.0) == 100.0  # same connection


async def test_timeout_drops_the_connection(modbus: ModbusTcpDriver, station: Station) -> None:
    station.faults.delay = 0.8
    try:
        with pytest.raises(DeviceTimeout, match=r"no reply in 0\.5s"):
            await modbus.write(ASSET, "speed_setpoint", 50.0)
        with pytest.raises(DeviceUnreachable, match="not connected"):
            await modbus.write(ASSET, "speed_setpoint", 50.0)
    finally:
        station.faults.clear()
    await asyncio.sleep(0.9)  # the late replies arrive at a closed socket
    await modbus.connect()
    assert await modbus.write(ASSET, "speed_setpoint", 50.0) == 100.0


async def test_writes_and_reads_share_the_connection_one_request_at_a_time(
    modbus: ModbusTcpDriver, station: Station
) -> None:
    station.freeze()
    setpoints = [float(40 + i) for i in range(12)]

    async def reads() -> None:
        for _ in range(12):
            await _values(modbus)

    async def writes() -> None:
        for value in setpoints:
            await modbus.write(ASSET, "speed_setpoint", value)

    async def flags() -> None:
        for i in range(12):
            await modbus.write(ASSET, "spare_flag", i % 2 == 0)

    async with asyncio.timeout(20):
        await asyncio.gather(reads(), writes(), flags(), reads())
    values = await _values(modbus)
    assert values["speed_setpoint"] == setpoints[-1] and values["spare_flag"] is False
    assert station.writes == 24


# --------------------------------------------------------------------------------------------
# OPC-UA (reactor simulator)
# --------------------------------------------------------------------------------------------


def _opcua_map(plant_map: TagMap, reactors: ReactorServer, mode: str = "poll") -> TagMap:
    dev = next(d for d in plant_map.devices if isinstance(d, OpcUaDevice)).model_copy(
        update={"mode": mode, "interval": 0.1})
    assets = [a for a in plant_map.assets if a.kind == "reactor"]
    a = assets[0]
    extra = {
        "status_code": OpcUaTag.model_validate({"device": REACTORS, "node": f"nsu={NAMESPACE};s=ReactorA.Status",
                                                "type": "int"}),
        "ghost": OpcUaTag.model_validate({"device": REACTORS, "node": f"nsu={NAMESPACE};s=ReactorA.NoSuchNode"}),
    }
    assets[0] = a.model_copy(update={"tags": {**a.tags, **extra}})
    tm = plant_map.model_copy(update={"devices": [dev], "assets": assets})
    return with_endpoints(tm, reactors={REACTORS: reactors})


@pytest.fixture
async def opcua(plant_map: TagMap, reactors: ReactorServer) -> AsyncIterator[OpcUaDriver]:
    driver = build_driver(_opcua_map(plant_map, reactors), REACTORS)
    assert isinstance(driver, OpcUaDriver)
    await driver.connect()
    try:
        yield driver
    finally:
        await driver.close()


async def _node(reactors: ReactorServer, letter: str, name: str) -> ua.Variant:
    """The node's value as the server holds it, with its VariantType."""
    assert reactors.server is not None
    dv = await reactors.server.get_node(f"ns={reactors.ns};s=Reactor{letter}.{name}").read_data_value()
    assert dv.Value is not None
    return dv.Value


async def _opc_values(driver: OpcUaDriver, asset: str) -> dict[str, object]:
    return {r.tag: r.value for r in await driver.read() if r.asset == asset and r.quality is Quality.GOOD}


async def test_opcua_float_node(opcua: OpcUaDriver, reactors: ReactorServer) -> None:
    reactors.freeze()
    old_setpoint = reactors.snapshot("A")["TemperatureSetpoint"]
    assert await opcua.write("reactor-a", "temperature_setpoint", 62.5) == old_setpoint
    await asyncio.sleep(0.25)  # a few publish ticks of the simulator: the value is the program's state
    assert reactors.snapshot("A")["TemperatureSetpoint"] == 62.5
    held = await _node(reactors, "A", "TemperatureSetpoint")
    assert held.VariantType is ua.VariantType.Double and held.Value == 62.5
    assert (await _opc_values(opcua, "reactor-a"))["temperature_setpoint"] == 62.5
    assert await opcua.write("reactor-b", "ph_target", 9) == 9.5  # an int for a Double node: sent as Double
    assert (await _opc_values(opcua, "reactor-b"))["ph_target"] == 9.0
    assert reactors.models["B"].ph_target == 9.0


async def test_opcua_int_node(opcua: OpcUaDriver, reactors: ReactorServer) -> None:
    reactors.freeze()
    await asyncio.sleep(0.15)
    old = reactors.snapshot("A")["Status"]
    assert await opcua.write("reactor-a", "status_code", 3) == old
    held = await _node(reactors, "A", "Status")
    assert held.VariantType is ua.VariantType.Int32 and held.Value == 3  # the node's own type
    assert reactors.models["A"].status == "cooling"
    values = await _opc_values(opcua, "reactor-a")
    assert values["status"] == "cooling" and values["status_code"] == 3


async def test_opcua_enum_holds_while_the_process_runs(plant_map: TagMap, reactors: ReactorServer) -> None:
    driver = build_driver(_opcua_map(plant_map, reactors, mode="subscribe"), REACTORS)
    assert isinstance(driver, OpcUaDriver)
    await driver.connect()
    try:
        await driver.write("reactor-c", "status", "maintenance")
        latest: dict[str, object] = {}

        async def seen() -> bool:
            latest.update(await _opc_values(driver, "reactor-c"))
            return latest.get("status") == "maintenance"

        for _ in range(100):
            if await seen():
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"status never read back as maintenance: {latest}")
        await asyncio.sleep(0.5)  # 2.5 s of plant time
        assert reactors.snapshot("C")["Status"] == 6
        assert await driver.write("reactor-c", "status", "idle") == "maintenance"
        await wait_until(lambda: reactors.models["C"].status == "idle", 2, "the cycle to restart")
    finally:
        await driver.close()


OPCUA_REFUSALS = [
    ("reactor-a", "no_such_tag", 1.0, WriteRefused, "no tag reactor-a/no_such_tag"),
    ("filling-1", "speed_setpoint", 1.0, WriteRefused, "no tag filling-1/speed_setpoint"),
    ("reactor-a", "status_code", 2**31, EncodeError, r"out of range for Int32 \(-2147483648..2147483647\)"),
    ("reactor-a", "status_code", 2.5, EncodeError, "not a whole number"),
    ("reactor-a", "status", "exploded", EncodeError, "needs one of idle, mixing"),
    ("reactor-a", "temperature_setpoint", "hot", EncodeError, "needs a number"),
    ("reactor-a", "temperature_setpoint", math.inf, EncodeError, "not a finite number"),
    ("reactor-a", "recipe_id", 7, EncodeError, "needs a string"),
]


async def test_opcua_refusals_change_nothing(opcua: OpcUaDriver, reactors: ReactorServer) -> None:
    reactors.freeze()
    await asyncio.sleep(0.15)
    before = {x: reactors.snapshot(x) for x in "ABC"}
    for asset, tag, value, error, message in OPCUA_REFUSALS:  # one server: an OPC-UA server takes seconds to start
        with pytest.raises(error, match=message) as err:
            await opcua.write(asset, tag, value)
        assert isinstance(err.value, ValueError), (tag, value)
    await asyncio.sleep(0.15)
    assert reactors.writes == []
    assert {x: reactors.snapshot(x) for x in "ABC"} == before


async def test_opcua_device_refusals(opcua: OpcUaDriver, reactors: ReactorServer) -> None:
    reactors.freeze()
    with pytest.raises(DeviceException, match=r"the server refused the write: Bad(NotWritable|UserAccessDenied)"):
        await opcua.write("reactor-a", "temperature", 20.0)  # a measurement: its node is read-only
    with pytest.raises(DeviceException, match="BadNodeIdUnknown"):
        await opcua.write("reactor-a", "ghost", 1.0)
    with pytest.raises(WriteNotApplied, match=r"ph_target .*wrote 15.0, the server holds 7.0"):
        await opcua.write("reactor-a", "ph_target", 15.0)  # the program drops a pH target beyond 14
    assert reactors.models["A"].ph_target == 7.0
    assert reactors.writes == [("A", "PhTarget", 15.0, False)]
    assert await opcua.write("reactor-a", "recipe_id", "RCP-LIQ-002") == "RCP-LIQ-001"
    assert (await _opc_values(opcua, "reactor-a"))["recipe_id"] == "RCP-LIQ-002"


async def test_opcua_write_needs_a_session(plant_map: TagMap) -> None:
    driver = build_driver(_opcua_map(plant_map, ReactorServer()), REACTORS)  # construction: no network
    assert isinstance(driver, OpcUaDriver)
    with pytest.raises(DeviceUnreachable, match="not connected"):
        await driver.write("reactor-a", "temperature_setpoint", 50.0)


async def test_opcua_variant_follows_each_node_type_of_another_server() -> None:
    """Not our simulator: Float, UInt16 (scaled), Boolean, Duration (a subtype of Double) and an abstract
    BaseDataType node, each written with the VariantType the server expects."""
    from asyncua import Server

    from drivers.opcua import OpcTagSpec
    from gateway.brokers import free_port
    from gateway.model import Transform

    server = Server()
    await server.init()
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/"
    server.set_endpoint(endpoint)
    idx = await server.register_namespace("http://example.com/line-7/")
    obj = await server.nodes.objects.add_object(ua.NodeId(5000, idx), "Line7")
    initial = {
        5001: ua.Variant(1.5, ua.VariantType.Float),
        5002: ua.Variant(100, ua.VariantType.UInt16),
        5003: ua.Variant(False, ua.VariantType.Boolean),
        5004: ua.Variant(250.0, ua.VariantType.Double),
        5005: ua.Variant(7, ua.VariantType.Int64),
    }
    datatypes = {5004: ua.NodeId(ua.ObjectIds.Duration), 5005: ua.NodeId(ua.ObjectIds.BaseDataType)}
    nodes = {}
    for i, variant in initial.items():
        nodes[i] = await obj.add_variable(ua.NodeId(i, idx), f"v{i}", variant, datatype=datatypes.get(i))
        await nodes[i].set_writable()
    tags = [
        OpcTagSpec("line-7", "ratio", f"ns={idx};i=5001"),
        OpcTagSpec("line-7", "speed", f"ns={idx};i=5002", transform=Transform(0.5)),
        OpcTagSpec("line-7", "enabled", f"ns={idx};i=5003"),
        OpcTagSpec("line-7", "cycle_ms", f"ns={idx};i=5004"),
        OpcTagSpec("line-7", "anything", f"ns={idx};i=5005"),
    ]
    async with server:
        driver = OpcUaDriver(device_id="line-7-plc", endpoint=endpoint, mode="poll", interval=0.1, timeout=2.0,
                             tags=tags)
        await driver.connect()
        try:
            assert await driver.write("line-7", "ratio", 0.1) == 1.5
            assert await driver.write("line-7", "speed", 75) == 50.0  # raw 150
            assert await driver.write("line-7", "enabled", True) is False
            assert await driver.write("line-7", "cycle_ms", 500) == 250.0
            assert await driver.write("line-7", "anything", 9) == 7
            with pytest.raises(EncodeError, match="out of range for Float"):
                await driver.write("line-7", "ratio", 1e39)
            with pytest.raises(EncodeError, match=r"out of range for UInt16 with scale 0\.5"):
                await driver.write("line-7", "speed", 40000)
            values = {r.tag: r.value for r in await driver.read()}
        finally:
            await driver.close()
        held = {i: (await node.read_data_value()).Value for i, node in nodes.items()}
    assert values == {"ratio": _f32(0.1), "speed": 75.0, "enabled": True, "cycle_ms": 500.0, "anything": 9}
    expected = {5001: (ua.VariantType.Float, _f32(0.1)), 5002: (ua.VariantType.UInt16, 150),
                5003: (ua.VariantType.Boolean, True), 5004: (ua.VariantType.Double, 500.0),
                5005: (ua.VariantType.Int64, 9)}
    assert {i: (v.VariantType, v.Value) for i, v in held.items() if v is not None} == expected
