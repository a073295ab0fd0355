"""Tests for drivers/modbus/codec.py: golden register layouts, an independent oracle, round trips."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pymodbus.client.mixin import ModbusClientMixin

from drivers.modbus.codec import (
    EncodeError,
    RegisterFormat,
    bytes_to_registers,
    registers_to_bytes,
    set_bit,
)
from drivers.modbus.types import DataType, Order

B, L = Order.BIG, Order.LITTLE

# (byte_order, word_order) in the usual PLC naming for a 32-bit value.
ABCD = (B, B)
CDAB = (B, L)
BADC = (L, B)
DCBA = (L, L)
ALL_ORDERS = [ABCD, CDAB, BADC, DCBA]
ORDER_IDS = ["ABCD", "CDAB", "BADC", "DCBA"]

NUMERIC = [
    DataType.INT16,
    DataType.UINT16,
    DataType.INT32,
    DataType.UINT32,
    DataType.INT64,
    DataType.UINT64,
    DataType.FLOAT32,
    DataType.FLOAT64,
]
INTEGER_RANGES = {
    DataType.INT16: (-(2**15), 2**15 - 1),
    DataType.UINT16: (0, 2**16 - 1),
    DataType.INT32: (-(2**31), 2**31 - 1),
    DataType.UINT32: (0, 2**32 - 1),
    DataType.INT64: (-(2**63), 2**63 - 1),
    DataType.UINT64: (0, 2**64 - 1),
}


def fmt(type_: DataType, orders: tuple[Order, Order] = ABCD, count: int | None = None,
        bit: int | None = None) -> RegisterFormat:
    byte_order, word_order = orders
    return RegisterFormat(type_, count or type_.width or 1, byte_order, word_order, bit)


def same_float(a: object, b: object) -> bool:
    """Bit-exact float equality, except that any NaN equals any NaN."""
    assert isinstance(a, float) and isinstance(b, float)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return struct.pack(">d", a) == struct.pack(">d", b)


def swap16(reg: int) -> int:
    return ((reg & 0xFF) << 8) | (reg >> 8)


# --------------------------------------------------------------------------------------------
# Golden tables: register values written by hand, not produced by the encoder.
# --------------------------------------------------------------------------------------------

GOLDEN = [
    # type, orders, value, registers
    (DataType.INT16, ABCD, -1, [0xFFFF]),
    (DataType.INT16, BADC, -1, [0xFFFF]),
    (DataType.INT16, ABCD, 0x1234, [0x1234]),
    (DataType.INT16, BADC, 0x1234, [0x3412]),
    (DataType.INT16, CDAB, 0x1234, [0x1234]),  # word order is meaningless for one register
    (DataType.INT16, ABCD, -32768, [0x8000]),
    (DataType.INT16, BADC, -32768, [0x0080]),
    (DataType.UINT16, ABCD, 0xFFFF, [0xFFFF]),
    (DataType.UINT16, ABCD, 0x1234, [0x1234]),
    (DataType.UINT16, BADC, 0x1234, [0x3412]),
    (DataType.UINT16, DCBA, 0x00FF, [0xFF00]),
    (DataType.INT32, ABCD, -2, [0xFFFF, 0xFFFE]),
    (DataType.INT32, CDAB, -2, [0xFFFE, 0xFFFF]),
    (DataType.INT32, BADC, -2, [0xFFFF, 0xFEFF]),
    (DataType.INT32, DCBA, -2, [0xFEFF, 0xFFFF]),
    (DataType.INT32, ABCD, 0x12345678, [0x1234, 0x5678]),
    (DataType.UINT32, ABCD, 0x12345678, [0x1234, 0x5678]),
    (DataType.UINT32, CDAB, 0x12345678, [0x5678, 0x1234]),
    (DataType.UINT32, BADC, 0x12345678, [0x3412, 0x7856]),
    (DataType.UINT32, DCBA, 0x12345678, [0x7856, 0x3412]),
    (DataType.UINT32, ABCD, 0xFFFFFFFF, [0xFFFF, 0xFFFF]),
    (DataType.INT64, ABCD, 0x0102030405060708, [0x0102, 0x0304, 0x0506, 0x0708]),
    (DataType.INT64, CDAB, 0x0102030405060708, [0x0708, 0x0506, 0x0304, 0x0102]),
    (DataType.INT64, BADC, 0x0102030405060708, [0x0201, 0x0403, 0x0605, 0x0807]),
    (DataType.INT64, DCBA, 0x0102030405060708, [0x0807, 0x0605, 0x0403, 0x0201]),
    (DataType.INT64, ABCD, -2, [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE]),
    (DataType.INT64, CDAB, -2, [0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF]),
    (DataType.INT64, BADC, -2, [0xFFFF, 0xFFFF, 0xFFFF, 0xFEFF]),
    (DataType.INT64, DCBA, -2, [0xFEFF, 0xFFFF, 0xFFFF, 0xFFFF]),
    (DataType.UINT64, ABCD, 0x0102030405060708, [0x0102, 0x0304, 0x0506, 0x0708]),
    (DataType.UINT64, CDAB, 0x0102030405060708, [0x0708, 0x0506, 0x0304, 0x0102]),
    (DataType.UINT64, BADC, 0x0102030405060708, [0x0201, 0x0403, 0x0605, 0x0807]),
    (DataType.UINT64, DCBA, 0x0102030405060708, [0x0807, 0x0605, 0x0403, 0x0201]),
    (DataType.UINT64, ABCD, 2**64 - 1, [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF]),
    (DataType.FLOAT32, ABCD, 1.0, [0x3F80, 0x0000]),
    (DataType.FLOAT32, CDAB, 1.0, [0x0000, 0x3F80]),
    (DataType.FLOAT32, BADC, 1.0, [0x803F, 0x0000]),
    (DataType.FLOAT32, DCBA, 1.0, [0x0000, 0x803F]),
    (DataType.FLOAT32, ABCD, -2.5, [0xC020, 0x0000]),
    (DataType.FLOAT32, ABCD, 123.456, [0x42F6, 0xE979]),  # 0x42F6E979
    (DataType.FLOAT32, DCBA, 123.456, [0x79E9, 0xF642]),
    (DataType.FLOAT64, ABCD, 1.5, [0x3FF8, 0x0000, 0x0000, 0x0000]),
    (DataType.FLOAT64, CDAB, 1.5, [0x0000, 0x0000, 0x0000, 0x3FF8]),
    (DataType.FLOAT64, BADC, 1.5, [0xF83F, 0x0000, 0x0000, 0x0000]),
    (DataType.FLOAT64, DCBA, 1.5, [0x0000, 0x0000, 0x0000, 0xF83F]),
    (DataType.FLOAT64, ABCD, -2.0, [0xC000, 0x0000, 0x0000, 0x0000]),
]


def _golden_id(case: tuple[object, ...]) -> str:
    type_, orders, value, _ = case
    return f"{type_}-{ORDER_IDS[ALL_ORDERS.index(orders)]}-{value}"


@pytest.mark.parametrize("case", GOLDEN, ids=[_golden_id(c) for c in GOLDEN])
def test_golden_decode(case: tuple[DataType, tuple[Order, Order], object, list[int]]) -> None:
    type_, orders, value, registers = case
    decoded = fmt(type_, orders).decode(registers)
    if type_.is_float:
        assert decoded == pytest.approx(value, rel=1e-7)
        assert isinstance(decoded, float)
    else:
        assert decoded == value
        assert type(decoded) is int


@pytest.mark.parametrize("case", GOLDEN, ids=[_golden_id(c) for c in GOLDEN])
def test_golden_encode(case: tuple[DataType, tuple[Order, Order], object, list[int]]) -> None:
    type_, orders, value, registers = case
    assert fmt(type_, orders).encode(value) == registers


def test_float32_golden_is_exactly_the_ieee_pattern() -> None:
    # 123.456 is not exact in float32: the decoded value is the float32 nearest to it.
    value = fmt(DataType.FLOAT32).decode([0x42F6, 0xE979])
    assert value == struct.unpack(">f", struct.pack(">f", 123.456))[0]


STRING_GOLDEN = [
    # text, count, orders, registers
    ("AB", 1, ABCD, [0x4142]),
    ("AB", 1, BADC, [0x4241]),
    ("AB", 1, CDAB, [0x4142]),
    ("AB", 1, DCBA, [0x4241]),
    ("ABC", 2, ABCD, [0x4142, 0x4300]),
    ("ABC", 2, CDAB, [0x4300, 0x4142]),
    ("ABC", 2, BADC, [0x4241, 0x0043]),
    ("ABC", 2, DCBA, [0x0043, 0x4241]),
    ("A", 3, ABCD, [0x4100, 0x0000, 0x0000]),
    ("ABCDEF", 3, ABCD, [0x4142, 0x4344, 0x4546]),
    ("ABCDEF", 3, CDAB, [0x4546, 0x4344, 0x4142]),
    ("", 2, ABCD, [0x0000, 0x0000]),
]


@pytest.mark.parametrize(("text", "count", "orders", "registers"), STRING_GOLDEN)
def test_string_golden(text: str, count: int, orders: tuple[Order, Order],
                       registers: list[int]) -> None:
    f = fmt(DataType.STRING, orders, count=count)
    assert f.encode(text) == registers
    assert f.decode(registers) == text


@pytest.mark.parametrize(
    ("registers", "orders", "expected"),
    [
        ([0x4142, 0x2020], ABCD, "AB"),  # trailing spaces stripped
        ([0x4142, 0x0000, 0x0000], ABCD, "AB"),  # NUL padding stripped
        ([0x4142, 0x2000, 0x2000], ABCD, "AB"),  # mixed spaces and NULs stripped
        ([0x4120, 0x4200], ABCD, "A B"),  # inner space kept
        ([0x2041, 0x0000], ABCD, " A"),  # leading space kept
        ([0x4241, 0x2020], BADC, "AB"),
        ([0x0000, 0x4142], CDAB, "AB"),
        ([0x0000, 0x0000], ABCD, ""),
        ([0x2020], ABCD, ""),
    ],
)
def test_string_decode_strips_padding(registers: list[int], orders: tuple[Order, Order],
                                      expected: str) -> None:
    assert fmt(DataType.STRING, orders, count=len(registers)).decode(registers) == expected


@pytest.mark.parametrize(
    ("bit", "byte_order", "register"),
    [
        (0, B, 0x0001),
        (1, B, 0x0002),
        (7, B, 0x0080),
        (8, B, 0x0100),
        (15, B, 0x8000),
        (0, L, 0x0100),
        (1, L, 0x0200),
        (7, L, 0x8000),
        (8, L, 0x0001),
        (15, L, 0x0080),
    ],
)
def test_bit_in_register_golden(bit: int, byte_order: Order, register: int) -> None:
    f = RegisterFormat(DataType.BOOL, 1, byte_order, B, bit)
    assert f.decode([register]) is True
    assert f.decode([0xFFFF ^ register]) is False
    assert f.decode([0x0000]) is False
    assert f.decode([0xFFFF]) is True
    assert set_bit(0, bit, True, byte_order) == register
    assert set_bit(0xFFFF, bit, False, byte_order) == 0xFFFF ^ register


def test_bit_in_register_ignores_word_order() -> None:
    assert RegisterFormat(DataType.BOOL, 1, B, L, 3).decode([0x0008]) is True
    assert RegisterFormat(DataType.BOOL, 1, L, L, 3).decode([0x0800]) is True


@pytest.mark.parametrize(
    ("register", "bit", "value", "byte_order", "expected"),
    [
        (0x0000, 0, True, B, 0x0001),
        (0x0001, 0, True, B, 0x0001),  # already set
        (0x0001, 0, False, B, 0x0000),
        (0x1234, 15, True, B, 0x9234),
        (0xFFFF, 15, False, B, 0x7FFF),
        (0x0000, 0, True, L, 0x0100),
        (0x0000, 15, True, L, 0x0080),
        (0x1234, 1, False, L, 0x1034),
        (0xFFFF, 8, False, L, 0xFFFE),
        (0x1234, 4, False, B, 0x1224),
    ],
)
def test_set_bit_table(register: int, bit: int, value: bool, byte_order: Order,
                       expected: int) -> None:
    assert set_bit(register, bit, value, byte_order) == expected


@settings(max_examples=300, deadline=None)
@given(
    register=st.integers(0, 0xFFFF),
    bit=st.integers(0, 15),
    value=st.booleans(),
    byte_order=st.sampled_from([B, L]),
)
def test_set_bit_then_read_back(register: int, bit: int, value: bool, byte_order: Order) -> None:
    new = set_bit(register, bit, value, byte_order)
    assert 0 <= new <= 0xFFFF
    assert RegisterFormat(DataType.BOOL, 1, byte_order, B, bit).decode([new]) is value
    # Only the one physical bit may change.
    physical = bit if byte_order is B else (bit + 8) % 16
    assert (new ^ register) & ~(1 << physical) == 0
    # Every other bit-in-register tag on the same register keeps its value.
    for other in range(16):
        if other != bit:
            f = RegisterFormat(DataType.BOOL, 1, byte_order, B, other)
            assert f.decode([new]) == f.decode([register])


def test_registers_bytes_helpers() -> None:
    assert registers_to_bytes([0x0102, 0xFFFE]) == b"\x01\x02\xff\xfe"
    assert bytes_to_registers(b"\x01\x02\xff\xfe") == [0x0102, 0xFFFE]
    assert registers_to_bytes([]) == b""


# --------------------------------------------------------------------------------------------
# Oracle: pymodbus' own converter (big byte order; little byte order by pre-swapping each word).
# --------------------------------------------------------------------------------------------

PYMODBUS_TYPE = {
    DataType.INT16: ModbusClientMixin.DATATYPE.INT16,
    DataType.UINT16: ModbusClientMixin.DATATYPE.UINT16,
    DataType.INT32: ModbusClientMixin.DATATYPE.INT32,
    DataType.UINT32: ModbusClientMixin.DATATYPE.UINT32,
    DataType.INT64: ModbusClientMixin.DATATYPE.INT64,
    DataType.UINT64: ModbusClientMixin.DATATYPE.UINT64,
    DataType.FLOAT32: ModbusClientMixin.DATATYPE.FLOAT32,
    DataType.FLOAT64: ModbusClientMixin.DATATYPE.FLOAT64,
}


@pytest.mark.parametrize("orders", ALL_ORDERS, ids=ORDER_IDS)
@pytest.mark.parametrize("type_", NUMERIC, ids=str)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_decode_matches_pymodbus(type_: DataType, orders: tuple[Order, Order],
                                 data: st.DataObject) -> None:
    width = type_.width
    assert width is not None
    registers = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=width, max_size=width))
    byte_order, word_order = orders
    oracle_input = registers if byte_order is B else [swap16(r) for r in registers]
    expected = ModbusClientMixin.convert_from_registers(
        oracle_input, PYMODBUS_TYPE[type_], word_order=word_order.value
    )
    got = fmt(type_, orders).decode(registers)
    if type_.is_float:
        assert same_float(got, expected)
    else:
        assert got == expected


# --------------------------------------------------------------------------------------------
# Round trips.
# --------------------------------------------------------------------------------------------


def _float32_values() -> st.SearchStrategy[float]:
    # Any finite float64 narrowed to float32 through struct (so it is exactly representable).
    return st.floats(allow_nan=False, allow_infinity=False, min_value=-3.4e38, max_value=3.4e38).map(
        lambda v: struct.unpack(">f", struct.pack(">f", v))[0]
    ) | st.floats(width=32, allow_nan=False, allow_infinity=False)


def _values(type_: DataType) -> st.SearchStrategy[object]:
    if type_ in INTEGER_RANGES:
        lo, hi = INTEGER_RANGES[type_]
        return st.integers(lo, hi) | st.sampled_from([lo, hi, 0, -1 if lo < 0 else 1])
    if type_ is DataType.FLOAT32:
        return _float32_values() | st.sampled_from([0.0, -0.0, math.inf, -math.inf])
    return st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(
        [0.0, -0.0, 5e-324, 1.7976931348623157e308, math.inf, -math.inf]
    )


@pytest.mark.parametrize("orders", ALL_ORDERS, ids=ORDER_IDS)
@pytest.mark.parametrize("type_", NUMERIC, ids=str)
@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_numeric_round_trip(type_: DataType, orders: tuple[Order, Order],
                            data: st.DataObject) -> None:
    value = data.draw(_values(type_))
    f = fmt(type_, orders)
    registers = f.encode(value)
    assert len(registers) == type_.width
    assert all(isinstance(r, int) and 0 <= r <= 0xFFFF for r in registers)
    decoded = f.decode(registers)
    if type_.is_float:
        assert same_float(decoded, float(value))  # type: ignore[arg-type]
    else:
        assert decoded == value


@pytest.mark.parametrize("orders", ALL_ORDERS, ids=ORDER_IDS)
@pytest.mark.parametrize("type_", [DataType.FLOAT32, DataType.FLOAT64], ids=str)
def test_nan_round_trips_as_nan(type_: DataType, orders: tuple[Order, Order]) -> None:
    f = fmt(type_, orders)
    decoded = f.decode(f.encode(math.nan))
    assert isinstance(decoded, float)
    assert math.isnan(decoded)


@pytest.mark.parametrize("orders", ALL_ORDERS, ids=ORDER_IDS)
@pytest.mark.parametrize("type_", list(INTEGER_RANGES), ids=str)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_encode_rejects_out_of_range_int(type_: DataType, orders: tuple[Order, Order],
                                         data: st.DataObject) -> None:
    lo, hi = INTEGER_RANGES[type_]
    value = data.draw(
        st.integers(max_value=lo - 1) | st.integers(min_value=hi + 1) | st.sampled_from([lo - 1, hi + 1])
    )
    with pytest.raises(EncodeError):
        fmt(type_, orders).encode(value)


@pytest.mark.parametrize("type_", list(INTEGER_RANGES), ids=str)
@pytest.mark.parametrize("value", [1.5, "1", None, b"\x00"])
def test_encode_rejects_non_integers_for_int_types(type_: DataType, value: object) -> None:
    with pytest.raises(EncodeError):
        fmt(type_).encode(value)


@pytest.mark.parametrize("value", ["1.0", None, b"\x00\x00\x00\x00"])
def test_encode_rejects_non_numbers_for_float_types(value: object) -> None:
    for type_ in (DataType.FLOAT32, DataType.FLOAT64):
        with pytest.raises(EncodeError):
            fmt(type_).encode(value)


@pytest.mark.parametrize("value", [1e300, -1e39, 3.5e38])
def test_encode_rejects_float32_overflow(value: float) -> None:
    with pytest.raises(EncodeError):
        fmt(DataType.FLOAT32).encode(value)


def test_encode_bit_in_register_is_rejected() -> None:
    with pytest.raises(EncodeError):
        RegisterFormat(DataType.BOOL, 1, bit=3).encode(True)


ASCII_PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


@pytest.mark.parametrize("orders", ALL_ORDERS, ids=ORDER_IDS)
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_string_round_trip(orders: tuple[Order, Order], data: st.DataObject) -> None:
    count = data.draw(st.integers(1, 10), label="count")
    text = data.draw(st.text(ASCII_PRINTABLE, max_size=2 * count), label="text")
    assume(not text.endswith(" "))
    f = fmt(DataType.STRING, orders, count=count)
    registers = f.encode(text)
    assert len(registers) == count
    assert f.decode(registers) == text


@pytest.mark.parametrize("orders", ALL_ORDERS, ids=ORDER_IDS)
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_string_too_long_is_rejected(orders: tuple[Order, Order], data: st.DataObject) -> None:
    count = data.draw(st.integers(1, 10), label="count")
    text = data.draw(st.text(ASCII_PRINTABLE, min_size=2 * count + 1, max_size=2 * count + 8))
    with pytest.raises(EncodeError):
        fmt(DataType.STRING, orders, count=count).encode(text)


def test_string_length_is_counted_in_utf8_bytes() -> None:
    f = fmt(DataType.STRING, count=1)
    assert f.decode(f.encode("é")) == "é"  # 2 bytes: fits
    with pytest.raises(EncodeError):
        f.encode("éa")  # 3 bytes
    with pytest.raises(EncodeError):
        f.encode(12)  # not a str


# --------------------------------------------------------------------------------------------
# compile(): decoding at a byte offset inside a larger block.
# --------------------------------------------------------------------------------------------

ALL_TYPES_WITH_COUNT = [(t, t.width) for t in NUMERIC] + [(DataType.STRING, 1), (DataType.STRING, 3)]


@pytest.mark.parametrize("orders", ALL_ORDERS, ids=ORDER_IDS)
@pytest.mark.parametrize(("type_", "count"), ALL_TYPES_WITH_COUNT, ids=lambda v: str(v))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_compile_at_offset_matches_decode_of_slice(type_: DataType, count: int,
                                                   orders: tuple[Order, Order],
                                                   data: st.DataObject) -> None:
    before = data.draw(st.integers(0, 10), label="before")
    after = data.draw(st.integers(0, 10), label="after")
    block = data.draw(
        st.lists(st.integers(0, 0xFFFF), min_size=before + count + after,
                 max_size=before + count + after),
        label="block",
    )
    f = fmt(type_, orders, count=count)
    decoder = f.compile()
    own = block[before : before + count]
    try:
        expected: object = f.decode(own)
    except UnicodeDecodeError:
        with pytest.raises(UnicodeDecodeError):
            decoder(registers_to_bytes(block), before * 2)
        return
    got = decoder(registers_to_bytes(block), before * 2)
    if type_.is_float:
        assert same_float(got, expected)
    else:
        assert got == expected


@pytest.mark.parametrize("byte_order", [B, L])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_compile_bit_at_offset_matches_decode_of_slice(byte_order: Order,
                                                       data: st.DataObject) -> None:
    block = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=12))
    index = data.draw(st.integers(0, len(block) - 1))
    bit = data.draw(st.integers(0, 15))
    f = RegisterFormat(DataType.BOOL, 1, byte_order, B, bit)
    assert f.compile()(registers_to_bytes(block), index * 2) is f.decode([block[index]])


def test_compile_at_offset_golden() -> None:
    block = [0xDEAD, 0xBEEF, 0x3F80, 0x0000, 0x4142, 0x4300, 0x1234]
    buf = registers_to_bytes(block)
    assert fmt(DataType.FLOAT32).compile()(buf, 4) == 1.0
    assert fmt(DataType.FLOAT32, CDAB).compile()(buf, 4) == fmt(DataType.FLOAT32, CDAB).decode(
        [0x3F80, 0x0000]
    )
    assert fmt(DataType.UINT32, CDAB).compile()(buf, 2) == 0x3F80BEEF
    assert fmt(DataType.STRING, count=2).compile()(buf, 8) == "ABC"
    assert fmt(DataType.UINT16, BADC).compile()(buf, 12) == 0x3412
    assert fmt(DataType.UINT32, DCBA).compile()(buf, 0) == 0xEFBEADDE
