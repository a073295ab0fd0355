"""Sparkplug B codec (gateway/sparkplug): checked against the specification, not against itself.

What the encoder produces is read back by a protobuf wire-format reader written here, which knows the
field numbers of ``sparkplug_b.proto`` (Sparkplug 3.0, section 6.4.1) from its own tables; payload bytes
written by hand from the specification are compared byte for byte.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.modbus.types import DataType as ModbusType
from drivers.modbus.types import Table
from gateway.model import Quality, Reading
from gateway.sparkplug import (
    AlarmFlags,
    Catalog,
    CommandError,
    DataType,
    Metric,
    MetricKind,
    MetricSpec,
    Payload,
    PayloadError,
    PropertyValue,
    Seq,
    StateTopic,
    Topic,
    TopicError,
    UnknownMetric,
    dbirth,
    ddata,
    ddeath,
    decode,
    decode_command,
    decode_state,
    device_topic,
    encode,
    nbirth,
    ndeath,
    next_bd_seq,
    node_topic,
    parse_topic,
    schema,
    state_topic,
)
from gateway.sparkplug.catalog import datatype_of, tag_datatype
from gateway.sparkplug.payload import encode_state
from gateway.sparkplug.topics import MessageType, command_filters
from gateway.tagmap import ModbusTag, OpcUaTag, load_tag_map_text

# -- an independent reader of the protobuf wire format ----------------------------------------------

VARINT, I64, LEN, I32 = 0, 1, 2, 5
WIRE = {"uint": VARINT, "bool": VARINT, "float": I32, "double": I64, "string": LEN, "bytes": LEN}


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            assert value < 2**64, "varint wider than 64 bits"
            return value, pos
        shift += 7
        assert shift < 70, "varint longer than 10 bytes"


def read_fields(buf: bytes) -> list[tuple[int, int, Any]]:
    out, pos = [], 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == VARINT:
            value, pos = read_varint(buf, pos)
        elif wire in (I64, I32):
            size = 8 if wire == I64 else 4
            value, pos = buf[pos:pos + size], pos + size
        elif wire == LEN:
            size, pos = read_varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise AssertionError(f"field {number}: unexpected wire type {wire}")
        assert pos <= len(buf), f"field {number} runs past the end"
        out.append((number, wire, value))
    return out


# Field tables from the specification: number -> (name, kind[, repeated]); a dict kind is a message.
PROPERTY_SET: dict[int, tuple[Any, ...]] = {}
PROPERTY_SET_LIST = {1: ("propertyset", PROPERTY_SET, True)}
PROPERTY_VALUE = {1: ("type", "uint"), 2: ("is_null", "bool"), 3: ("int_value", "uint"), 4: ("long_value", "uint"),
                  5: ("float_value", "float"), 6: ("double_value", "double"), 7: ("boolean_value", "bool"),
                  8: ("string_value", "string"), 9: ("propertyset_value", PROPERTY_SET),
                  10: ("propertysets_value", PROPERTY_SET_LIST)}
PROPERTY_SET.update({1: ("keys", "string", True), 2: ("values", PROPERTY_VALUE, True)})
METRIC = {1: ("name", "string"), 2: ("alias", "uint"), 3: ("timestamp", "uint"), 4: ("datatype", "uint"),
          5: ("is_historical", "bool"), 6: ("is_transient", "bool"), 7: ("is_null", "bool"),
          9: ("properties", PROPERTY_SET), 10: ("int_value", "uint"), 11: ("long_value", "uint"),
          12: ("float_value", "float"), 13: ("double_value", "double"), 14: ("boolean_value", "bool"),
          15: ("string_value", "string"), 16: ("bytes_value", "bytes")}
PAYLOAD = {1: ("timestamp", "uint"), 2: ("metrics", METRIC, True), 3: ("seq", "uint"), 4: ("uuid", "string"),
           5: ("body", "bytes")}
VALUE_FIELDS = {"int_value", "long_value", "float_value", "double_value", "boolean_value", "string_value",
                "bytes_value", "propertyset_value", "propertysets_value"}


def read(buf: bytes, table: dict[int, tuple[Any, ...]] = PAYLOAD) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for number, wire, raw in read_fields(buf):
        assert number in table, f"field {number} is not in the specification's message"
        name, kind, *repeated = table[number]
        assert wire == (LEN if isinstance(kind, dict) else WIRE[kind]), f"{name}: wire type {wire}"
        if isinstance(kind, dict):
            value: Any = read(raw, kind)
        elif kind == "bool":
            assert raw in (0, 1), f"{name}: bool {raw}"
            value = bool(raw)
        elif kind in ("float", "double"):
            value = struct.unpack("<f" if kind == "float" else "<d", raw)[0]
        elif kind == "string":
            value = raw.decode("utf-8")
        else:
            value = raw
        if repeated:
            out.setdefault(name, []).append(value)
        else:
            assert name not in out, f"{name} appears twice"
            out[name] = value
    assert len(VALUE_FIELDS & out.keys()) <= 1, f"more than one oneof value: {out}"
    return out


# -- the schema against the specification -------------------------------------------------------------

SPEC_MESSAGES = {
    "Payload": "timestamp=1:uint64 metrics=2:Metric* seq=3:uint64 uuid=4:string body=5:bytes",
    "Payload.Metric": "name=1:string alias=2:uint64 timestamp=3:uint64 datatype=4:uint32 is_historical=5:bool "
                      "is_transient=6:bool is_null=7:bool metadata=8:MetaData properties=9:PropertySet "
                      "int_value=10:uint32 long_value=11:uint64 float_value=12:float double_value=13:double "
                      "boolean_value=14:bool string_value=15:string bytes_value=16:bytes dataset_value=17:DataSet "
                      "template_value=18:Template extension_value=19:MetricValueExtension",
    "Payload.PropertySet": "keys=1:string* values=2:PropertyValue*",
    "Payload.PropertySetList": "propertyset=1:PropertySet*",
    "Payload.PropertyValue": "type=1:uint32 is_null=2:bool int_value=3:uint32 long_value=4:uint64 float_value=5:float "
                             "double_value=6:double boolean_value=7:bool string_value=8:string "
                             "propertyset_value=9:PropertySet propertysets_value=10:PropertySetList "
                             "extension_value=11:PropertyValueExtension",
    "Payload.MetaData": "is_multi_part=1:bool content_type=2:string size=3:uint64 seq=4:uint64 file_name=5:string "
                        "file_type=6:string md5=7:string description=8:string",
    "Payload.DataSet": "num_of_columns=1:uint64 columns=2:string* types=3:uint32* rows=4:Row*",
    "Payload.DataSet.Row": "elements=1:DataSetValue*",
    "Payload.DataSet.DataSetValue": "int_value=1:uint32 long_value=2:uint64 float_value=3:float "
                                    "double_value=4:double boolean_value=5:bool string_value=6:string "
                                    "extension_value=7:DataSetValueExtension",
    "Payload.Template": "version=1:string metrics=2:Metric* parameters=3:Parameter* template_ref=4:string "
                        "is_definition=5:bool",
    "Payload.Template.Parameter": "name=1:string type=2:uint32 int_value=3:uint32 long_value=4:uint64 "
                                  "float_value=5:float double_value=6:double boolean_value=7:bool "
                                  "string_value=8:string extension_value=9:ParameterValueExtension",
}
SPEC_EXTENSIONS = {"Payload": 6, "Payload.Template": 6, "Payload.DataSet": 5, "Payload.DataSet.Row": 2,
                   "Payload.PropertySet": 3, "Payload.PropertySetList": 2, "Payload.MetaData": 9,
                   "Payload.Metric.MetricValueExtension": 1, "Payload.PropertyValue.PropertyValueExtension": 1,
                   "Payload.DataSet.DataSetValue.DataSetValueExtension": 1,
                   "Payload.Template.Parameter.ParameterValueExtension": 1}
SPEC_DATATYPES = [
    "Unknown", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64", "Float", "Double", "Boolean",
    "String", "DateTime", "Text", "UUID", "DataSet", "Bytes", "File", "Template", "PropertySet", "PropertySetList",
    "Int8Array", "Int16Array", "Int32Array", "Int64Array", "UInt8Array", "UInt16Array", "UInt32Array", "UInt64Array",
    "FloatArray", "DoubleArray", "BooleanArray", "StringArray", "DateTimeArray",
]


def test_schema_fields_are_the_specifications() -> None:
    type_names = {1: "double", 2: "float", 4: "uint64", 8: "bool", 9: "string", 12: "bytes", 13: "uint32"}
    for message, spec in SPEC_MESSAGES.items():
        desc = schema.POOL.FindMessageTypeByName(f"{schema.PACKAGE}.{message}")
        got = set()
        for f in desc.fields:
            type_name = f.message_type.name if f.message_type is not None else type_names[f.type]
            repeated = f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED
            assert repeated or f.has_presence, f"{message}.{f.name}: proto2 optional fields have presence"
            star = "*" if repeated else ""
            got.add(f"{f.name}={f.number}:{type_name}{star}")
        assert got == set(spec.split()), message
        oneof = {f.name for f in desc.fields if f.containing_oneof is not None}
        assert oneof == {f.name for f in desc.fields if f.name.endswith("_value") and f.name != "is_null"}, message
    for message, start in SPEC_EXTENSIONS.items():
        desc = schema.POOL.FindMessageTypeByName(f"{schema.PACKAGE}.{message}")
        assert desc.extension_ranges == [(start, 2**29)], message


def test_datatype_enum_is_the_specifications() -> None:
    assert [(d.value, n) for d, n in zip(DataType, SPEC_DATATYPES, strict=True)] == list(enumerate(SPEC_DATATYPES))
    enum = schema.POOL.FindEnumTypeByName(f"{schema.PACKAGE}.DataType")
    assert [(v.name, v.number) for v in enum.values] == [(n, i) for i, n in enumerate(SPEC_DATATYPES)]


# -- golden bytes, written from the specification -----------------------------------------------------

TS = 1486144502122  # the specification's example timestamp
TS_VARINT = "ea f2 f5 a8 a0 2b"  # 1486144502122 in 7-bit groups, least significant first

GOLDEN = [
    pytest.param(
        Payload(timestamp=TS, seq=2, metrics=(
            Metric(alias=1, timestamp=TS, datatype=DataType.DOUBLE, value=12.5),)),
        f"08 {TS_VARINT}"                       # Payload.timestamp (1, varint)
        " 12 14"                                # Payload.metrics (2, length-delimited), 20 bytes
        "   10 01"                              #   Metric.alias (2) = 1
        f"  18 {TS_VARINT}"                     #   Metric.timestamp (3)
        "   20 0a"                              #   Metric.datatype (4) = 10 Double
        "   69 00 00 00 00 00 00 29 40"         #   Metric.double_value (13, fixed64) = 12.5
        " 18 02",                               # Payload.seq (3) = 2
        id="double-with-alias"),
    pytest.param(
        Payload(metrics=(Metric(name="Node Control/Rebirth", datatype=DataType.BOOLEAN, value=False),)),
        "12 1a"                                 # metrics, 26 bytes
        " 0a 14" + " 4e 6f 64 65 20 43 6f 6e 74 72 6f 6c 2f 52 65 62 69 72 74 68"  # name (1) "Node Control/Rebirth"
        " 20 0b"                                # datatype = 11 Boolean
        " 70 00",                               # boolean_value (14, varint) = false, present
        id="boolean-false"),
    pytest.param(
        Payload(metrics=(Metric(alias=3, datatype=DataType.STRING, value="Test"),)),
        "12 0a 10 03 20 0c 7a 04 54 65 73 74",  # alias 3, datatype 12 String, string_value (15) "Test"
        id="string"),
    pytest.param(
        Payload(metrics=(Metric(alias=4, datatype=DataType.DOUBLE, value=0.5, properties={
            "engUnit": PropertyValue(DataType.STRING, "degC"),
            "Quality": PropertyValue(DataType.INT32, 192)}),)),
        "12 32"                                 # metrics, 50 bytes
        " 10 04 20 0a"                          # alias 4, datatype 10 Double
        " 4a 23"                                # properties (9), PropertySet of 35 bytes
        "   0a 07 65 6e 67 55 6e 69 74"         #   keys (1) "engUnit"
        "   0a 07 51 75 61 6c 69 74 79"         #   keys (1) "Quality"
        "   12 08 08 0c 42 04 64 65 67 43"      #   values (2): type 12 String, string_value (8) "degC"
        "   12 05 08 03 18 c0 01"               #   values (2): type 3 Int32, int_value (3) 192
        " 69 00 00 00 00 00 00 e0 3f",          # double_value 0.5, after the properties (field order)
        id="propertyset-engunit-quality"),
    pytest.param(
        Payload(metrics=(Metric(alias=5, timestamp=1000, datatype=DataType.DOUBLE, is_null=True),)),
        "12 09 10 05 18 e8 07 20 0a 38 01",     # alias 5, timestamp 1000, datatype 10, is_null (7) true
        id="is-null"),
    pytest.param(
        Payload(metrics=(Metric(alias=6, datatype=DataType.INT32, value=-1),
                         Metric(alias=7, datatype=DataType.INT64, value=-2, is_historical=True))),
        "12 0a 10 06 20 03 50 ff ff ff ff 0f"   # Int32 -1: int_value (10) as uint32 0xFFFFFFFF
        " 12 11 10 07 20 04 28 01"              # Int64 -2, is_historical (5) true,
        " 58 fe ff ff ff ff ff ff ff ff 01",    #   long_value (11) as uint64 2**64 - 2
        id="negative-integers"),
]


@pytest.mark.parametrize(("payload", "wire"), GOLDEN)
def test_golden_bytes(payload: Payload, wire: str) -> None:
    expected = bytes.fromhex(wire)
    assert encode(payload) == expected
    assert decode(expected) == payload


def test_ndeath_golden_bytes() -> None:
    """The Will: only the bdSeq metric, by name, Int64; no seq."""
    assert ndeath(bd_seq=3) == bytes.fromhex("12 0b 0a 05 62 64 53 65 71 20 04 58 03")


def test_ddeath_golden_bytes() -> None:
    assert ddeath(seq=123, ts=TS / 1000) == bytes.fromhex(f"08 {TS_VARINT} 18 7b")


# -- round trips over random metric sets ----------------------------------------------------------------

INT_RANGES = {DataType.INT8: 8, DataType.INT16: 16, DataType.INT32: 32, DataType.INT64: 64}
UINT_RANGES = {DataType.UINT8: 8, DataType.UINT16: 16, DataType.UINT32: 32, DataType.UINT64: 64}


def values_of(datatype: DataType) -> st.SearchStrategy[object]:
    if datatype in INT_RANGES:
        bits = INT_RANGES[datatype]
        return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    if datatype in UINT_RANGES or datatype is DataType.DATETIME:
        return st.integers(0, 2 ** UINT_RANGES.get(datatype, 64) - 1)
    others: dict[DataType, st.SearchStrategy[object]] = {
        DataType.FLOAT: st.floats(width=32, allow_nan=False), DataType.DOUBLE: st.floats(allow_nan=False),
        DataType.BOOLEAN: st.booleans(), DataType.BYTES: st.binary(max_size=20), DataType.FILE: st.binary(max_size=20),
    }
    return others.get(datatype, st.text(max_size=20))


def wire_value(datatype: DataType, value: Any) -> tuple[str, Any]:
    """Which field carries a value and how, per the specification's datatype table (section 6.4.16)."""
    if datatype in (DataType.INT8, DataType.INT16, DataType.INT32):
        return "int_value", value & 0xFFFFFFFF
    if datatype in (DataType.UINT8, DataType.UINT16, DataType.UINT32):
        return "int_value", value
    if datatype in (DataType.INT64, DataType.UINT64, DataType.DATETIME):
        return "long_value", value & 0xFFFFFFFFFFFFFFFF
    member = {DataType.FLOAT: "float_value", DataType.DOUBLE: "double_value", DataType.BOOLEAN: "boolean_value",
              DataType.BYTES: "bytes_value", DataType.FILE: "bytes_value"}.get(datatype, "string_value")
    return member, value


SCALARS = [d for d in DataType if d.value <= 18 and d is not DataType.DATASET and d is not DataType.UNKNOWN]
PROPERTY_TYPES = [d for d in SCALARS if d not in (DataType.BYTES, DataType.FILE)]


@st.composite
def property_values(draw: st.DrawFn, depth: int = 1) -> PropertyValue:
    kinds = PROPERTY_TYPES + ([DataType.PROPERTYSET] if depth else [])
    datatype = draw(st.sampled_from(kinds))
    if draw(st.integers(0, 5)) == 0:
        return PropertyValue(datatype, None)
    if datatype is DataType.PROPERTYSET:
        return PropertyValue(datatype, draw(st.dictionaries(st.text(max_size=8), property_values(0), max_size=3)))
    return PropertyValue(datatype, draw(values_of(datatype)))


@st.composite
def metrics(draw: st.DrawFn) -> Metric:
    datatype = draw(st.sampled_from(SCALARS))
    null = draw(st.booleans())
    return Metric(
        name=draw(st.none() | st.text(max_size=30)),
        alias=draw(st.none() | st.integers(0, 2**64 - 1)),
        timestamp=draw(st.none() | st.integers(0, 2**64 - 1)),
        datatype=datatype,
        value=None if null else draw(values_of(datatype)),
        is_null=null,
        is_historical=draw(st.booleans()),
        is_transient=draw(st.booleans()),
        properties=draw(st.dictionaries(st.text(max_size=10), property_values(), max_size=4)),
    )


def expected_properties(props: dict[str, PropertyValue]) -> dict[str, Any]:
    values = []
    for pv in props.values():
        item: dict[str, Any] = {"type": pv.type.value}
        if pv.value is None:
            item["is_null"] = True
        elif pv.type is DataType.PROPERTYSET:
            assert isinstance(pv.value, dict)
            item["propertyset_value"] = expected_properties(pv.value)
        else:
            member, raw = wire_value(pv.type, pv.value)
            item[member] = raw
        values.append(item)
    return {"keys": list(props), "values": values} if props else {}


def expected_metric(m: Metric) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("name", "alias", "timestamp"):
        if getattr(m, key) is not None:
            out[key] = getattr(m, key)
    assert m.datatype is not None
    out["datatype"] = m.datatype.value
    for flag in ("is_historical", "is_transient", "is_null"):
        if getattr(m, flag):
            out[flag] = True
    if m.properties:
        out["properties"] = expected_properties(dict(m.properties))
    if m.value is not None:
        member, raw = wire_value(m.datatype, m.value)
        out[member] = raw
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(metrics(), max_size=6), st.none() | st.integers(0, 2**64 - 1), st.none() | st.integers(0, 255))
def test_random_metric_sets_read_back_as_the_specification_says(ms: list[Metric], ts: int | None,
                                                                 seq: int | None) -> None:
    payload = Payload(timestamp=ts, metrics=tuple(ms), seq=seq)
    data = encode(payload)
    got = read(data)
    expected: dict[str, Any] = {}
    if ts is not None:
        expected["timestamp"] = ts
    if ms:
        expected["metrics"] = [expected_metric(m) for m in ms]
    if seq is not None:
        expected["seq"] = seq
    assert got == expected
    assert decode(data) == payload


# -- the edge node's messages -----------------------------------------------------------------------------

MAP = """
gateway: {id: edge-01}
mqtt: {topic_prefix: ninu/plant-1}
devices:
  - {id: plc-1, protocol: modbus_tcp, host: 127.0.0.1}
assets:
  - id: filling-1
    kind: station
    device: plc-1
    tags:
      status: {table: holding, address: 0, type: uint16, enum: {0: idle, 1: running}}
      units_total: {table: holding, address: 2, type: uint32}
      energy_total: {table: holding, address: 4, type: uint64}
      running: {table: holding, address: 8, type: bool, bit: 0}
      motor_temperature: {table: holding, address: 9, type: int16, scale: 0.1, unit: degC}
      product_code: {table: holding, address: 26, type: string, count: 8}
      speed_setpoint: {table: holding, address: 40, type: int16, writable: true, min: -100, max: 100, unit: "%"}
    derived:
      counted_rate: {kind: counter_rate, counter: units_total}
      made_today: {kind: daily_count, counter: units_total}
    rules:
      - {tag: motor_temperature, kind: high, limit: 80}
  - id: filling-2
    kind: station
    device: plc-1
    tags:
      units_total: {table: holding, address: 102, type: uint32}
"""
T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.from_tag_map(load_tag_map_text(MAP, "map.yaml"))


def reading(tag: str, value: object, quality: Quality = Quality.GOOD, reason: str | None = None, *,
            source_ts: float | None = None, asset: str = "filling-1") -> Reading:
    return Reading(asset, tag, value, quality, reason, source_ts, T0 + 1)


def props(metric: dict[str, Any]) -> dict[str, dict[str, Any]]:
    ps = metric.get("properties", {})
    return dict(zip(ps.get("keys", []), ps.get("values", []), strict=True))


def test_catalog_names_aliases_and_datatypes(catalog: Catalog) -> None:
    dev = catalog.device("filling-1")
    names = [m.name for m in dev.metrics]
    assert names == sorted(names)
    assert set(names) == {"status", "units_total", "energy_total", "running", "motor_temperature", "product_code",
                          "speed_setpoint", "counted_rate", "made_today", "Alarms/motor_temperature_high/Active",
                          "Alarms/motor_temperature_high/Acked"}
    types = {m.name: m.datatype for m in dev.metrics}
    assert types["status"] is DataType.STRING
    assert types["units_total"] is DataType.INT64
    assert types["energy_total"] is DataType.UINT64
    assert types["running"] is DataType.BOOLEAN
    assert types["motor_temperature"] is DataType.DOUBLE
    assert types["product_code"] is DataType.STRING
    assert types["counted_rate"] is DataType.DOUBLE
    assert types["made_today"] is DataType.INT64
    assert types["Alarms/motor_temperature_high/Active"] is DataType.BOOLEAN
    everything = [*catalog.node.metrics, *(m for d in catalog.devices.values() for m in d.metrics)]
    assert [m.alias for m in everything] == list(range(1, len(everything) + 1))  # unique across the node
    assert [m.name for m in catalog.node.metrics] == ["Node Control/Rebirth", "bdSeq"]
    assert dev.metric("motor_temperature").unit == "degC"
    assert dev.metric("speed_setpoint").writable and not dev.metric("units_total").writable


def test_aliases_do_not_depend_on_declaration_order(catalog: Catalog) -> None:
    specs = {d: [MetricSpec(m.name, m.datatype, m.kind, m.key, m.unit, m.writable) for m in dev.metrics]
             for d, dev in catalog.devices.items()}
    shuffled = {d: list(reversed(ms)) for d, ms in reversed(list(specs.items()))}
    assert Catalog.build(shuffled) == catalog
    assert Catalog.from_tag_map(load_tag_map_text(MAP, "again.yaml")) == catalog


def test_catalog_refuses_duplicate_names_and_bad_device_ids() -> None:
    spec = MetricSpec("x", DataType.DOUBLE, MetricKind.TAG, "x")
    with pytest.raises(ValueError, match="two metrics are named 'x'"):
        Catalog.build({"a": [spec, spec]})
    with pytest.raises(TopicError, match="reserved"):
        Catalog.build({"a/b": [spec]})


def test_nbirth(catalog: Catalog) -> None:
    seq = Seq()
    assert seq.birth() == 0
    got = read(nbirth(catalog, bd_seq=7, ts=T0))
    assert got["seq"] == 0
    assert got["timestamp"] == 1_700_000_000_000
    by_name = {m["name"]: m for m in got["metrics"]}
    assert by_name["bdSeq"] == {"name": "bdSeq", "alias": 2, "timestamp": 1_700_000_000_000, "datatype": 4,
                                "long_value": 7}
    assert by_name["Node Control/Rebirth"] == {"name": "Node Control/Rebirth", "alias": 1,
                                               "timestamp": 1_700_000_000_000, "datatype": 11,
                                               "boolean_value": False}


def test_ndeath_matches_the_nbirth_bd_seq(catalog: Catalog) -> None:
    death = read(ndeath(bd_seq=255, ts=T0))
    birth = read(nbirth(catalog, bd_seq=255, ts=T0))
    assert "seq" not in death
    assert [m["name"] for m in death["metrics"]] == ["bdSeq"]
    assert death["metrics"][0]["long_value"] == next(m for m in birth["metrics"] if m["name"] == "bdSeq")["long_value"]


def test_dbirth_declares_every_metric(catalog: Catalog) -> None:
    dev = catalog.device("filling-1")
    latest = {
        "motor_temperature": reading("motor_temperature", 41.5, source_ts=T0 + 0.25),
        "status": reading("status", None, Quality.BAD, "timeout"),
        "units_total": reading("units_total", 4294967096),
        "counted_rate": reading("counted_rate", None, Quality.UNCERTAIN, "warming up"),
    }
    alarms = [AlarmFlags.of("motor_temperature_high", "active_unacked", True, T0 + 0.5)]
    got = read(dbirth(dev, seq=1, ts=T0 + 2, latest=latest, alarms=alarms))
    assert got["seq"] == 1
    assert got["timestamp"] == 1_700_000_002_000
    ms = {m["name"]: m for m in got["metrics"]}
    assert list(ms) == [m.name for m in dev.metrics]
    for m in dev.metrics:
        wire = ms[m.name]
        assert wire["alias"] == m.alias
        assert wire["datatype"] == m.datatype.value
        assert "timestamp" in wire
    temp = ms["motor_temperature"]
    assert temp["double_value"] == 41.5
    assert temp["timestamp"] == 1_700_000_000_250  # the device's own timestamp
    assert props(temp) == {"engUnit": {"type": 12, "string_value": "degC"}, "Quality": {"type": 3, "int_value": 192},
                           "StatusCode": {"type": 7, "int_value": 0}}
    status = ms["status"]
    assert status["is_null"] is True
    assert VALUE_FIELDS.isdisjoint(status)
    assert props(status) == {"Quality": {"type": 3, "int_value": 0}, "StatusCode": {"type": 7, "int_value": 0x80000000},
                             "Reason": {"type": 12, "string_value": "timeout"}}
    assert ms["units_total"]["long_value"] == 4294967096
    rate = ms["counted_rate"]
    assert rate["is_null"] is True
    assert props(rate)["Quality"] == {"type": 3, "int_value": 500}
    assert props(rate)["StatusCode"] == {"type": 7, "int_value": 0x40000000}
    never_read = ms["running"]
    assert never_read["is_null"] is True and props(never_read)["Quality"]["int_value"] == 0
    assert ms["Alarms/motor_temperature_high/Active"]["boolean_value"] is True
    assert ms["Alarms/motor_temperature_high/Acked"]["boolean_value"] is False


def test_ddata_by_alias_only(catalog: Catalog) -> None:
    dev = catalog.device("filling-1")
    readings = [
        reading("motor_temperature", 42.0, source_ts=T0 + 0.5),
        reading("speed_setpoint", -12),
        reading("status", "running"),
        reading("status", 7, Quality.UNCERTAIN, "code 7 not in enum"),
        reading("running", None, Quality.BAD, "Modbus exception 2"),
        reading("product_code", 3.5),  # a value the datatype cannot hold
    ]
    alarms = [AlarmFlags.of("motor_temperature_high", "active_acked", True, T0 + 0.75)]
    got = read(ddata(dev, seq=9, ts=T0 + 3, readings=readings, alarms=alarms))
    assert got["seq"] == 9
    ms = got["metrics"]
    assert all("name" not in m for m in ms)
    assert [m["alias"] for m in ms] == [dev.metric(n).alias for n in (
        "motor_temperature", "speed_setpoint", "status", "status", "running", "product_code",
        "Alarms/motor_temperature_high/Active", "Alarms/motor_temperature_high/Acked")]
    assert ms[0]["double_value"] == 42.0 and ms[0]["timestamp"] == 1_700_000_000_500
    assert "engUnit" not in props(ms[0])
    assert ms[1]["long_value"] == 2**64 - 12  # Int64 -12, two's complement
    assert ms[1]["timestamp"] == 1_700_000_001_000  # no source timestamp: when it was read
    assert ms[2]["string_value"] == "running"
    assert ms[3]["string_value"] == "7" and props(ms[3])["Quality"]["int_value"] == 500
    assert ms[4]["is_null"] is True and props(ms[4])["Reason"]["string_value"] == "Modbus exception 2"
    assert ms[5]["is_null"] is True and props(ms[5])["Quality"]["int_value"] == 0
    assert "does not fit String" in props(ms[5])["Reason"]["string_value"]
    assert ms[6]["boolean_value"] is True and ms[7]["boolean_value"] is True
    assert not any(m.get("is_historical") for m in ms)


def test_ddata_replay_is_historical(catalog: Catalog) -> None:
    dev = catalog.device("filling-1")
    got = read(ddata(dev, seq=0, ts=T0, readings=[reading("units_total", 5)], historical=True))
    assert got["metrics"][0]["is_historical"] is True


def test_ddata_refuses_what_the_birth_did_not_declare(catalog: Catalog) -> None:
    dev = catalog.device("filling-1")
    with pytest.raises(UnknownMetric, match="no metric 'spindle_speed'"):
        ddata(dev, seq=0, ts=T0, readings=[reading("spindle_speed", 1.0)])
    with pytest.raises(UnknownMetric, match="filling-2"):
        ddata(dev, seq=0, ts=T0, readings=[reading("units_total", 1, asset="filling-2")])
    with pytest.raises(PayloadError, match="at least one metric"):
        ddata(dev, seq=0, ts=T0)
    with pytest.raises(PayloadError, match=r"seq must be 0\.\.255"):
        ddata(dev, seq=256, ts=T0, readings=[reading("units_total", 1)])


def test_ddeath(catalog: Catalog) -> None:
    assert read(ddeath(seq=4, ts=T0)) == {"timestamp": 1_700_000_000_000, "seq": 4}


def test_seq_wraps_after_255() -> None:
    seq = Seq()
    with pytest.raises(RuntimeError):
        seq.next()
    assert seq.birth() == 0
    assert [seq.next() for _ in range(257)] == [*range(1, 256), 0, 1]
    assert seq.birth() == 0 and seq.next() == 1  # a rebirth starts again at 0
    assert next_bd_seq(None) == 0 and next_bd_seq(0) == 1 and next_bd_seq(255) == 0


def test_python_values_to_datatypes() -> None:
    assert datatype_of(True) is DataType.BOOLEAN
    assert datatype_of(2**31) is DataType.INT64  # Int64 for every int, not Int32 "while it fits"
    assert datatype_of(-(2**63)) is DataType.INT64
    assert datatype_of(2**64 - 1) is DataType.UINT64
    assert datatype_of(1.5) is DataType.DOUBLE
    assert datatype_of("running") is DataType.STRING
    assert datatype_of(Quality.GOOD) is DataType.STRING
    with pytest.raises(ValueError, match="64-bit"):
        datatype_of(2**64)
    with pytest.raises(TypeError):
        datatype_of(None)


def test_tag_declarations_to_datatypes() -> None:
    def modbus(**kw: Any) -> ModbusTag:
        return ModbusTag(device="plc", table=Table.HOLDING, address=0, **kw)

    assert tag_datatype(modbus(type=ModbusType.INT16)) is DataType.INT64
    assert tag_datatype(modbus(type=ModbusType.UINT64)) is DataType.UINT64
    assert tag_datatype(modbus(type=ModbusType.INT32, scale=0.5)) is DataType.DOUBLE
    assert tag_datatype(modbus(type=ModbusType.FLOAT32)) is DataType.DOUBLE
    assert tag_datatype(modbus(type=ModbusType.BOOL, bit=3)) is DataType.BOOLEAN
    assert tag_datatype(modbus(type=ModbusType.UINT16, enum={0: "idle"})) is DataType.STRING
    assert tag_datatype(OpcUaTag(device="ua", node="ns=2;s=A", type="int")) is DataType.INT64
    assert tag_datatype(OpcUaTag(device="ua", node="ns=2;s=A", type="string")) is DataType.STRING
    assert tag_datatype(OpcUaTag(device="ua", node="ns=2;s=A", type="bool")) is DataType.BOOLEAN
    assert tag_datatype(OpcUaTag(device="ua", node="ns=2;s=A")) is DataType.DOUBLE


# -- commands -------------------------------------------------------------------------------------------------

def cmd(*metrics: Metric, seq: int | None = None) -> bytes:
    return encode(Payload(timestamp=TS, metrics=metrics, seq=seq))


def test_rebirth_by_name_or_alias(catalog: Catalog) -> None:
    rebirth = catalog.node.metric("Node Control/Rebirth")
    by_name = decode_command(cmd(Metric(name=rebirth.name, timestamp=TS, datatype=DataType.BOOLEAN, value=True)),
                             catalog)
    assert by_name.rebirth and by_name.writes == () and by_name.device_id is None and by_name.timestamp == TS
    by_alias = decode_command(cmd(Metric(alias=rebirth.alias, value=True, datatype=DataType.BOOLEAN)), catalog)
    assert by_alias.rebirth


def test_writes_are_typed_by_the_birth(catalog: Catalog) -> None:
    dev = catalog.device("filling-1")
    speed = dev.metric("speed_setpoint")
    acked = dev.metric("Alarms/motor_temperature_high/Acked")
    typed = cmd(Metric(alias=speed.alias, datatype=DataType.INT64, value=-5))
    got = decode_command(typed, catalog, "filling-1")
    assert [(w.metric.name, w.value) for w in got.writes] == [("speed_setpoint", -5)]
    # without a datatype in the command, the birth's applies: -5 as uint64 in long_value (11)
    untyped = bytes.fromhex(f"12 0d 10 {speed.alias:02x} 58 fb ff ff ff ff ff ff ff ff 01")
    assert decode_command(untyped, catalog, "filling-1").writes[0].value == -5
    ack = decode_command(cmd(Metric(name=acked.name, datatype=DataType.BOOLEAN, value=True)), catalog, "filling-1")
    assert ack.writes[0].metric.kind is MetricKind.ALARM_ACKED and ack.writes[0].metric.key == "motor_temperature_high"


@pytest.mark.parametrize(("device", "metrics", "message"), [
    (None, (), "no metrics"),
    (None, (Metric(datatype=DataType.BOOLEAN, value=True),), "neither name nor alias"),
    (None, (Metric(name="Node Control/Reboot", datatype=DataType.BOOLEAN, value=True),), "no such metric"),
    (None, (Metric(name="Node Control/Rebirth", alias=2, datatype=DataType.BOOLEAN, value=True),),
     "name 'Node Control/Rebirth' and alias 2 name different metrics"),
    (None, (Metric(name="Node Control/Rebirth", datatype=DataType.BOOLEAN, value=False),), "written true"),
    (None, (Metric(name="Node Control/Rebirth", datatype=DataType.STRING, value="true"),), "datatype String differs"),
    (None, (Metric(name="Node Control/Rebirth", datatype=DataType.BOOLEAN, is_null=True),), "no value"),
    (None, (Metric(name="bdSeq", datatype=DataType.INT64, value=1),), "'bdSeq' is not writable"),
    (None, (Metric(name="Node Control/Rebirth", datatype=DataType.BOOLEAN, value=True),) * 2, "written twice"),
    ("filling-1", (Metric(name="units_total", datatype=DataType.INT64, value=1),), "'units_total' is not writable"),
    ("filling-1", (Metric(name="Alarms/motor_temperature_high/Acked", datatype=DataType.BOOLEAN, value=False),),
     "acknowledged by writing true"),
    ("filling-1", (Metric(name="speed_setpoint", datatype=DataType.INT64, value=1),
                   Metric(name="spindle", datatype=DataType.INT64, value=1)), "no such metric in device 'filling-1'"),
    ("filling-1", (Metric(name="Node Control/Rebirth", datatype=DataType.BOOLEAN, value=True),), "no such metric"),
    ("filling-9", (Metric(name="speed_setpoint", datatype=DataType.INT64, value=1),), "no device 'filling-9'"),
])
def test_malformed_commands_are_refused(catalog: Catalog, device: str | None, metrics: tuple[Metric, ...],
                                        message: str) -> None:
    with pytest.raises(CommandError, match=message):
        decode_command(cmd(*metrics), catalog, device)


@pytest.mark.parametrize(("data", "message"), [
    (b"\x12\x05\x0a", "not a Sparkplug B payload"),  # truncated
    (b"\x12\x04\x20\x63\x70\x01", "unknown datatype 99"),
    (b"\x12\x04\x20\x0b\x58\x01", "Boolean value must be in boolean_value, not long_value"),
    (b"\x12\x06\x0a\x02\xff\xfe\x70\x01", "not valid UTF-8"),
    (b"\x12\x07\x10\x01\x20\x01\x50\x80\x02", "out of range for Int8"),  # Int8 int_value 256
])
def test_undecodable_commands_are_refused(catalog: Catalog, data: bytes, message: str) -> None:
    with pytest.raises(CommandError, match=message):
        decode_command(data, catalog)


def test_command_with_seq_is_tolerated(catalog: Catalog) -> None:
    data = cmd(Metric(name="Node Control/Rebirth", datatype=DataType.BOOLEAN, value=True), seq=3)
    assert decode_command(data, catalog).rebirth


def test_int8_accepts_both_twos_complement_widths() -> None:
    for raw in ("ff ff ff ff 0f", "ff 01"):  # -1 as uint32 (sign-extended) and as one byte
        data = bytes.fromhex(f"12 {2 + 1 + len(raw.split()):02x} 20 01 50 {raw}")
        assert decode(data).metrics[0].value == -1


# -- STATE ----------------------------------------------------------------------------------------------------

def test_state_payloads() -> None:
    assert decode_state(b'{"online": true, "timestamp": 1668114759262}').online is True
    assert decode_state(encode_state(online=False, timestamp=5)).timestamp == 5
    for bad in (b"ONLINE", b"[]", b'{"online": "yes", "timestamp": 1}', b'{"online": true}',
                b'{"online": true, "timestamp": -1}', b'{"online": true, "timestamp": true}'):
        with pytest.raises(PayloadError):
            decode_state(bad)


# -- topics ---------------------------------------------------------------------------------------------------

ids = st.text(st.characters(exclude_characters="/+#\x00", codec="utf-8"), min_size=1, max_size=20)


@settings(max_examples=200, deadline=None)
@given(ids, st.sampled_from(list(MessageType)), ids, ids)
def test_topic_round_trip(group: str, message_type: MessageType, node: str, device: str) -> None:
    if message_type.is_device:
        topic = device_topic(group, message_type, node, device)
        assert topic == f"spBv1.0/{group}/{message_type}/{node}/{device}"
        assert parse_topic(topic) == Topic(group, message_type, node, device)
    else:
        topic = node_topic(group, message_type, node)
        assert topic == f"spBv1.0/{group}/{message_type}/{node}"
        assert parse_topic(topic) == Topic(group, message_type, node)
    assert str(parse_topic(topic)) == topic


@settings(max_examples=100, deadline=None)
@given(ids)
def test_state_topic_round_trip(host: str) -> None:
    assert state_topic(host) == f"spBv1.0/STATE/{host}"
    assert parse_topic(state_topic(host)) == StateTopic(host)


@pytest.mark.parametrize("topic", [
    "spBv1.0/plant-1/NBIRTH",  # no edge node
    "spBv1.0/plant-1/NBIRTH/edge-01/reactor-a",  # a device on a node message
    "spBv1.0/plant-1/DDATA/edge-01",  # a device message without device
    "spBv1.0/plant-1/DDATA/edge-01/a/b",  # too deep
    "spBv1.0/plant-1/BIRTH/edge-01",  # unknown message type
    "spBv1.0/plant-1/ddata/edge-01/a",  # message types are upper case
    "spAv1.0/plant-1/NBIRTH/edge-01",  # another namespace
    "spBv1.0//NBIRTH/edge-01",  # empty group
    "spBv1.0/plant-1/NDATA/",  # empty edge node
    "spBv1.0/plant+1/NDATA/edge-01",
    "spBv1.0/plant-1/NDATA/edge#01",
    "spBv1.0/STATE",
    "spBv1.0/STATE/",
    "spBv1.0/STATE/host/extra",
    "ninu/plant-1/gateways/edge-01/status",
])
def test_topics_refused(topic: str) -> None:
    with pytest.raises(TopicError):
        parse_topic(topic)


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "a#b", "a\x00b", "\ud800"])
def test_ids_refused_when_building(bad: str) -> None:
    with pytest.raises(TopicError):
        node_topic(bad, MessageType.NBIRTH, "edge-01")
    with pytest.raises(TopicError):
        device_topic("plant-1", MessageType.DDATA, "edge-01", bad)
    with pytest.raises(TopicError):
        state_topic(bad)


def test_topic_shapes_are_checked_when_building() -> None:
    with pytest.raises(TopicError, match="need a device_id"):
        Topic("plant-1", MessageType.DBIRTH, "edge-01")
    with pytest.raises(TopicError, match="take no device_id"):
        Topic("plant-1", MessageType.NCMD, "edge-01", "reactor-a")
    with pytest.raises(TopicError, match="unknown message type"):
        node_topic("plant-1", "NBORN", "edge-01")
    assert command_filters("plant-1", "edge-01") == ("spBv1.0/plant-1/NCMD/edge-01", "spBv1.0/plant-1/DCMD/edge-01/+")


def test_float_metric_is_32_bit() -> None:
    data = encode(Payload(metrics=(Metric(alias=1, datatype=DataType.FLOAT, value=1.1),)))
    value = read(data)["metrics"][0]["float_value"]
    assert value == struct.unpack("<f", struct.pack("<f", 1.1))[0]
    assert not math.isclose(value, 1.1, rel_tol=1e-12)
    with pytest.raises(PayloadError, match="out of range for a Float"):
        encode(Payload(metrics=(Metric(alias=1, datatype=DataType.FLOAT, value=1e300),)))
