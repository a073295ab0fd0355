"""Pure write encoding: engineering value -> registers / bits / OPC-UA Variant, and back through the reader."""

from __future__ import annotations

import math
import struct

import pytest
from asyncua import ua
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from drivers.encoding import to_raw
from drivers.modbus.codec import EncodeError, RegisterFormat
from drivers.modbus.encode import INT_RANGES, encode_bit, encode_coil, encode_registers, raw_value
from drivers.modbus.types import DataType, Order
from drivers.opcua import OPC_INT_RANGES, encode_variant
from gateway.model import Quality, Transform

B, L = Order.BIG, Order.LITTLE
ORDERS = [(B, B), (B, L), (L, B), (L, L)]
ORDER_IDS = ["ABCD", "CDAB", "BADC", "DCBA"]
INTEGERS = list(INT_RANGES)
FLOATS = [DataType.FLOAT32, DataType.FLOAT64]
SCALES = [(0.1, 0.0), (0.01, -40.0), (10.0, 0.0), (-0.5, 100.0), (0.25, 273.15)]
PLAIN = Transform()


def fmt(type_: DataType, orders: tuple[Order, Order] = (B, B), count: int | None = None,
        bit: int | None = None) -> RegisterFormat:
    return RegisterFormat(type_, count or type_.width or 1, orders[0], orders[1], bit)


def read_back(f: RegisterFormat, transform: Transform, registers: list[int]) -> object:
    """What the gateway's reader makes of ``registers``: decode, then the tag's transform."""
    value, quality, reason = transform.apply(f.decode(registers))
    assert quality is Quality.GOOD, reason
    return value


def f32(x: float) -> float:
    return float(struct.unpack(">f", struct.pack(">f", x))[0])


# --------------------------------------------------------------------------------------------
# Round trips: encode with the writer, decode with the existing reader.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orders", ORDERS, ids=ORDER_IDS)
@pytest.mark.parametrize("type_", INTEGERS, ids=str)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_integer_round_trip(type_: DataType, orders: tuple[Order, Order], data: st.DataObject) -> None:
    lo, hi = INT_RANGES[type_]
    value = data.draw(st.integers(lo, hi) | st.sampled_from([lo, hi, 0]))
    as_float = data.draw(st.booleans()) and abs(value) < 2**53  # a whole float is a whole number
    f = fmt(type_, orders)
    registers = encode_registers(float(value) if as_float else value, f)
    assert len(registers) == f.count and all(0 <= r <= 0xFFFF for r in registers)
    back = read_back(f, PLAIN, registers)
    assert back == value and type(back) is int


@pytest.mark.parametrize("orders", ORDERS, ids=ORDER_IDS)
@pytest.mark.parametrize("type_", INTEGERS, ids=str)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_scaled_integer_round_trip(type_: DataType, orders: tuple[Order, Order], data: st.DataObject) -> None:
    lo, hi = INT_RANGES[type_]
    lo, hi = max(lo, -(2**40)), min(hi, 2**40)  # where a float64 engineering value still names one step
    raw = data.draw(st.integers(lo, hi) | st.sampled_from([lo, hi, 0]))
    scale, offset = data.draw(st.sampled_from(SCALES))
    transform = Transform(scale, offset)
    value = raw * scale + offset
    f = fmt(type_, orders)
    registers = encode_registers(value, f, transform)
    assert f.decode(registers) == raw
    assert read_back(f, transform, registers) == pytest.approx(value, rel=1e-12, abs=1e-9)


@pytest.mark.parametrize("orders", ORDERS, ids=ORDER_IDS)
@pytest.mark.parametrize("type_", FLOATS, ids=str)
@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_float_round_trip(type_: DataType, orders: tuple[Order, Order], data: st.DataObject) -> None:
    limit = 3.4e38 if type_ is DataType.FLOAT32 else 1.7e308
    value = data.draw(st.floats(-limit, limit, allow_nan=False, allow_infinity=False)
                      | st.integers(-(2**62), 2**62) | st.sampled_from([0.0, -0.0, 1.0, -1.5]))
    f = fmt(type_, orders)
    back = read_back(f, PLAIN, encode_registers(value, f))
    assert isinstance(back, float)
    if type_ is DataType.FLOAT32:
        assert back == f32(float(value))  # the float32 nearest to the value, bit for bit
        assert back == pytest.approx(value, rel=2**-23, abs=1.5e-45)
    else:
        assert back == float(value)


@pytest.mark.parametrize("orders", ORDERS, ids=ORDER_IDS)
@pytest.mark.parametrize("type_", FLOATS, ids=str)
@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_scaled_float_round_trip(type_: DataType, orders: tuple[Order, Order], data: st.DataObject) -> None:
    value = data.draw(st.floats(-1e30, 1e30, allow_nan=False, allow_infinity=False))
    scale, offset = data.draw(st.sampled_from(SCALES))
    transform = Transform(scale, offset)
    f = fmt(type_, orders)
    back = read_back(f, transform, encode_registers(value, f, transform))
    assert isinstance(back, float)
    precision = 2**-23 if type_ is DataType.FLOAT32 else 2**-51
    tolerance = precision * (abs(value) + abs(offset)) + 1e-37 * abs(scale)
    assert abs(back - value) <= tolerance


@pytest.mark.parametrize("orders", ORDERS, ids=ORDER_IDS)
@pytest.mark.parametrize("type_", INTEGERS, ids=str)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_enum_round_trip(type_: DataType, orders: tuple[Order, Order], data: st.DataObject) -> None:
    lo, hi = INT_RANGES[type_]
    codes = data.draw(st.lists(st.integers(lo, hi), min_size=1, max_size=6, unique=True))
    enum = {code: f"state-{i}" for i, code in enumerate(codes)}
    code = data.draw(st.sampled_from(codes))
    transform = Transform(enum=enum)
    f = fmt(type_, orders)
    assert read_back(f, transform, encode_registers(enum[code], f, transform)) == enum[code]


TEXT = st.text(st.characters(min_codepoint=0x01, max_codepoint=0xD7FF), max_size=20)  # no NUL, no surrogates


@pytest.mark.parametrize("orders", ORDERS, ids=ORDER_IDS)
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_string_round_trip(orders: tuple[Order, Order], data: st.DataObject) -> None:
    text = data.draw(TEXT)
    assume(not text.endswith(" "))  # the reader strips trailing spaces (padding)
    size = len(text.encode("utf-8"))
    count = data.draw(st.integers(max(1, (size + 1) // 2), max(1, (size + 1) // 2) + 4))
    f = fmt(DataType.STRING, orders, count=count)
    registers = encode_registers(text, f)
    assert len(registers) == count
    assert read_back(f, PLAIN, registers) == text


@pytest.mark.parametrize("byte_order", [B, L])
@settings(max_examples=200, deadline=None)
@given(register=st.integers(0, 0xFFFF), bit=st.integers(0, 15), value=st.booleans())
def test_bit_in_register_changes_only_its_bit(byte_order: Order, register: int, bit: int, value: bool) -> None:
    f = RegisterFormat(DataType.BOOL, 1, byte_order, B, bit)
    new = encode_bit(value, f, register)
    assert f.decode([new]) is value
    for other in range(16):
        if other != bit:
            g = RegisterFormat(DataType.BOOL, 1, byte_order, B, other)
            assert g.decode([new]) is g.decode([register])


def test_coil_takes_only_bools() -> None:
    assert encode_coil(True) is True
    assert encode_coil(False) is False
    for value in (1, 0, "true", None, 1.0):
        with pytest.raises(EncodeError, match="needs true or false"):
            encode_coil(value)


# --------------------------------------------------------------------------------------------
# Values that do not fit: each a clear ValueError, never registers.
# --------------------------------------------------------------------------------------------

STATUS = Transform(enum={0: "idle", 1: "running", 2: "paused"})
SPEED = Transform(0.1)  # int16 x 0.1: -3276.8 .. 3276.7

ERRORS = [
    # type, count, transform, value, message
    (DataType.INT16, None, PLAIN, 32768, r"32768 is out of range for int16 \(-32768..32767\)"),
    (DataType.INT16, None, PLAIN, -32769, "out of range for int16"),
    (DataType.UINT16, None, PLAIN, -1, r"-1 is out of range for uint16 \(0..65535\)"),
    (DataType.UINT16, None, PLAIN, 65536, "out of range for uint16"),
    (DataType.INT32, None, PLAIN, 2**31, "out of range for int32"),
    (DataType.UINT32, None, PLAIN, 2**32, "out of range for uint32"),
    (DataType.INT64, None, PLAIN, 2**63, "out of range for int64"),
    (DataType.UINT64, None, PLAIN, -1, "out of range for uint64"),
    (DataType.UINT64, None, PLAIN, 10**400, "out of range for uint64"),
    (DataType.INT16, None, SPEED, 3276.8, r"out of range for int16 with scale 0.1 and offset 0 \(-3276.8..3276.7\)"),
    (DataType.INT16, None, SPEED, 55.37, "not a step of the tag's resolution 0.1"),
    (DataType.INT16, None, PLAIN, 1.5, "1.5 is not a whole number"),
    (DataType.INT16, None, PLAIN, True, r"needs a number, got True \(bool\)"),
    (DataType.INT16, None, PLAIN, "12", r"needs a number, got '12' \(str\)"),
    (DataType.INT16, None, PLAIN, None, "needs a number"),
    (DataType.INT16, None, PLAIN, math.nan, "nan is not a finite number"),
    (DataType.INT16, None, SPEED, math.inf, "inf is not a finite number"),
    (DataType.FLOAT32, None, PLAIN, math.nan, "nan is not a finite number"),
    (DataType.FLOAT32, None, PLAIN, math.inf, "inf is not a finite number"),
    (DataType.FLOAT64, None, PLAIN, -math.inf, "-inf is not a finite number"),
    (DataType.FLOAT32, None, PLAIN, 3.5e38, "does not fit float32"),
    (DataType.FLOAT32, None, Transform(0.001), 1e36, "does not fit float32"),
    (DataType.FLOAT64, None, Transform(1e-300), 1e300, "out of range"),
    (DataType.FLOAT64, None, PLAIN, 10**400, "out of range"),
    (DataType.FLOAT32, None, PLAIN, "1.0", "needs a number"),
    (DataType.FLOAT32, None, Transform(0.0), 1.0, "scale is 0"),
    (DataType.UINT16, None, STATUS, "exploded", r"needs one of idle, running, paused; got 'exploded' \(str\)"),
    (DataType.UINT16, None, STATUS, 1, "needs one of idle, running, paused"),
    (DataType.INT16, None, Transform(enum={70000: "big"}), "big", "70000 is out of range for int16"),
    (DataType.STRING, 2, PLAIN, "ABCDE", "longer than 4 bytes"),
    (DataType.STRING, 1, PLAIN, "éa", "longer than 2 bytes"),
    (DataType.STRING, 2, PLAIN, 12, r"needs a string, got 12 \(int\)"),
    (DataType.STRING, 2, PLAIN, "A\x00B", "NUL"),
    (DataType.STRING, 2, PLAIN, "\ud800", "not encodable as UTF-8"),
]


@pytest.mark.parametrize(("type_", "count", "transform", "value", "message"), ERRORS,
                         ids=[f"{e[0]}-{e[3]!r}"[:40] for e in ERRORS])
def test_values_that_do_not_fit_are_refused(type_: DataType, count: int | None, transform: Transform,
                                            value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        encode_registers(value, fmt(type_, count=count), transform)
    assert isinstance(err.value, EncodeError)


def test_bit_tags_are_encoded_by_read_modify_write_only() -> None:
    bit = RegisterFormat(DataType.BOOL, 1, bit=3)
    with pytest.raises(EncodeError, match="read-modify-write"):
        encode_registers(True, bit)
    with pytest.raises(EncodeError, match="needs true or false"):
        encode_bit(1, bit, 0)
    with pytest.raises(ValueError, match=r"outside 0\.\.65535"):
        encode_bit(True, bit, 70000)


def test_raw_value_inverts_scale_and_offset() -> None:
    assert raw_value(55.3, DataType.INT16, SPEED) == 553
    assert raw_value(-40.0, DataType.INT16, Transform(0.01, -40.0)) == 0
    assert raw_value(100.0, DataType.FLOAT32, Transform(2.0, 10.0)) == 45.0
    assert raw_value("paused", DataType.UINT16, STATUS) == 2
    assert to_raw(7, PLAIN, "float") == 7.0 and isinstance(to_raw(7, PLAIN, "float"), float)


# --------------------------------------------------------------------------------------------
# OPC-UA: the Variant follows the node's type.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vtype", list(OPC_INT_RANGES), ids=lambda v: v.name)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_opcua_integer_variants(vtype: ua.VariantType, data: st.DataObject) -> None:
    lo, hi = OPC_INT_RANGES[vtype]
    value = data.draw(st.integers(lo, hi))
    variant = encode_variant(value, PLAIN, vtype)
    assert variant.VariantType is vtype and variant.Value == value and type(variant.Value) is int
    for outside in (lo - 1, hi + 1):
        with pytest.raises(EncodeError, match=f"out of range for {vtype.name}"):
            encode_variant(outside, PLAIN, vtype)


@settings(max_examples=100, deadline=None)
@given(value=st.floats(-3.4e38, 3.4e38, allow_nan=False, allow_infinity=False))
def test_opcua_float_and_double_variants(value: float) -> None:
    single = encode_variant(value, PLAIN, ua.VariantType.Float)
    assert single.VariantType is ua.VariantType.Float and single.Value == f32(value)
    double = encode_variant(value, PLAIN, ua.VariantType.Double)
    assert double.VariantType is ua.VariantType.Double and double.Value == value


@pytest.mark.parametrize(("value", "transform", "vtype", "expected"), [
    (True, PLAIN, ua.VariantType.Boolean, True),
    ("RCP-1", PLAIN, ua.VariantType.String, "RCP-1"),
    ("mixing", Transform(enum={0: "idle", 1: "mixing"}), ua.VariantType.Int32, 1),
    (42, PLAIN, ua.VariantType.Double, 42.0),
    (50.0, Transform(0.5), ua.VariantType.Int16, 100),
])
def test_opcua_variant_table(value: object, transform: Transform, vtype: ua.VariantType, expected: object) -> None:
    variant = encode_variant(value, transform, vtype)
    assert variant.VariantType is vtype
    assert variant.Value == expected and type(variant.Value) is type(expected)


@pytest.mark.parametrize(("value", "transform", "vtype", "message"), [
    (1, PLAIN, ua.VariantType.Boolean, "needs true or false"),
    (1.5, PLAIN, ua.VariantType.Int32, "not a whole number"),
    (math.nan, PLAIN, ua.VariantType.Double, "not a finite number"),
    (1e39, PLAIN, ua.VariantType.Float, "out of range for Float"),
    ("x", PLAIN, ua.VariantType.Double, "needs a number"),
    (3, PLAIN, ua.VariantType.String, "needs a string"),
    ("gone", Transform(enum={0: "idle"}), ua.VariantType.Int32, "needs one of idle"),
    ("idle", Transform(enum={0: "idle"}), ua.VariantType.String, "cannot hold 0"),
    (1, PLAIN, ua.VariantType.DateTime, "cannot write a node of type DateTime"),
])
def test_opcua_values_that_do_not_fit(value: object, transform: Transform, vtype: ua.VariantType,
                                      message: str) -> None:
    with pytest.raises(EncodeError, match=message):
        encode_variant(value, transform, vtype)
