"""Tests for drivers/modbus/decode.py: tag specs -> compiled reads -> Readings."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.modbus.codec import RegisterFormat
from drivers.modbus.decode import CompiledRead, TagSpec, compile_reads, register_format
from drivers.modbus.planner import Limits
from drivers.modbus.types import DataType, Order, Table
from gateway.model import Quality, Reading, Transform

TS = 1_700_000_000.25
H, I, C, D = Table.HOLDING, Table.INPUT, Table.COIL, Table.DISCRETE


def spec(tag: str, address: int, type_: DataType = DataType.UINT16, *, table: Table = H,
         count: int | None = None, transform: Transform = Transform(), asset: str = "press1",
         unit: int = 1, byte_order: Order = Order.BIG, word_order: Order = Order.BIG,
         bit: int | None = None) -> TagSpec:
    fmt = register_format(type_, count, byte_order, word_order, bit)
    return TagSpec(asset, tag, unit, table, address, fmt, transform)


def by_tag(readings: list[Reading]) -> dict[str, Reading]:
    out = {r.tag: r for r in readings}
    assert len(out) == len(readings)
    return out


def only(reads: list[CompiledRead]) -> CompiledRead:
    assert len(reads) == 1
    return reads[0]


def test_register_format_defaults_count_from_type() -> None:
    assert register_format(DataType.FLOAT64, None, Order.BIG, Order.LITTLE, None) == RegisterFormat(
        DataType.FLOAT64, 4, Order.BIG, Order.LITTLE, None
    )
    assert register_format(DataType.STRING, None, Order.BIG, Order.BIG, None).count == 1
    assert register_format(DataType.STRING, 6, Order.BIG, Order.BIG, None).count == 6
    assert register_format(DataType.BOOL, None, Order.LITTLE, Order.BIG, 3).bit == 3


def test_tag_spec_key() -> None:
    assert spec("temp", 0).key == "press1/temp"


def test_compile_and_decode_a_register_block() -> None:
    tags = [
        spec("temp", 0, DataType.INT16, transform=Transform(scale=0.1)),
        spec("state", 1, DataType.UINT16, transform=Transform(enum={0: "idle", 1: "running"})),
        spec("flow", 2, DataType.FLOAT32),
        spec("name", 4, DataType.STRING, count=4),
        spec("count", 8, DataType.UINT32, word_order=Order.LITTLE),
        spec("door", 10, DataType.BOOL, bit=0),
        spec("estop", 10, DataType.BOOL, bit=15),
    ]
    read = only(compile_reads(tags))
    assert (read.request.table, read.request.address, read.request.count) == (H, 0, 11)

    registers = [
        367,  # temp
        1,  # state
        0x3F80, 0x0000,  # flow 1.0
        0x4D58, 0x2D31, 0x2020, 0x0000,  # "MX-1" padded
        0x5678, 0x1234,  # count 0x12345678, CDAB
        0x0001,  # door bit 0 set, estop bit 15 clear
    ]
    readings = read.decode_registers(registers, TS)
    assert len(readings) == len(tags)
    assert all(r.asset == "press1" and r.ts == TS and r.source_ts is None for r in readings)
    got = by_tag(readings)
    assert all(r.quality is Quality.GOOD and r.reason is None for r in readings)
    assert got["temp"].value == pytest.approx(36.7)
    assert got["state"].value == "running"
    assert got["flow"].value == 1.0
    assert got["name"].value == "MX-1"
    assert got["count"].value == 0x12345678
    assert got["door"].value is True
    assert got["estop"].value is False


def test_reads_at_a_non_zero_address_use_offsets() -> None:
    tags = [
        spec("a", 1000, DataType.INT16, table=I),
        spec("b", 1003, DataType.INT32, table=I),
    ]
    read = only(compile_reads(tags, Limits(max_gap=5)))
    assert (read.request.address, read.request.count) == (1000, 5)
    got = by_tag(read.decode_registers([0xFFFE, 0xAAAA, 0xBBBB, 0xFFFF, 0xFFF0], TS))
    assert got["a"].value == -2
    assert got["b"].value == -16


def test_registers_of_different_assets_on_one_unit() -> None:
    tags = [spec("speed", 0, asset="a1"), spec("speed", 1, asset="a2")]
    readings = only(compile_reads(tags)).decode_registers([10, 20], TS)
    assert sorted((r.asset, r.tag, r.value) for r in readings) == [
        ("a1", "speed", 10),
        ("a2", "speed", 20),
    ]


def test_split_reads_each_decode_their_own_tags() -> None:
    tags = [spec("a", 0), spec("b", 50), spec("c", 1, table=I), spec("d", 0, unit=2)]
    reads = compile_reads(tags)
    assert len(reads) == 4
    replies = {
        (1, H, 0): [11],
        (1, H, 50): [22],
        (1, I, 1): [33],
        (2, H, 0): [44],
    }
    values = {}
    for read in reads:
        rq = read.request
        for r in read.decode_registers(replies[(rq.unit, rq.table, rq.address)], TS):
            values[r.tag] = r.value
    assert values == {"a": 11, "b": 22, "c": 33, "d": 44}


def test_decode_bits() -> None:
    tags = [
        spec("run", 10, DataType.BOOL, table=C),
        spec("jog", 13, DataType.BOOL, table=C),
        spec("alarm", 0, DataType.BOOL, table=D),
    ]
    reads = compile_reads(tags, Limits(max_gap=4))
    coil = next(r for r in reads if r.request.table is C)
    disc = next(r for r in reads if r.request.table is D)
    assert (coil.request.address, coil.request.count) == (10, 4)

    got = by_tag(coil.decode_bits([True, True, True, False], TS))
    assert got["run"].value is True
    assert got["jog"].value is False
    assert all(r.quality is Quality.GOOD and r.reason is None and r.ts == TS for r in got.values())

    got = by_tag(disc.decode_bits([1], TS))  # type: ignore[list-item]
    assert got["alarm"].value is True


def test_bit_tables_use_one_address_per_tag() -> None:
    # The register format's count does not widen a coil read.
    tags = [spec("a", 0, DataType.BOOL, table=C, count=4), spec("b", 1, DataType.BOOL, table=C)]
    read = only(compile_reads(tags))
    assert (read.request.address, read.request.count) == (0, 2)


def test_scale_and_offset() -> None:
    tags = [
        spec("t", 0, DataType.INT16, transform=Transform(scale=0.1)),
        spec("p", 1, DataType.INT16, transform=Transform(scale=0.5, offset=-10)),
        spec("neg", 2, DataType.INT16, transform=Transform(scale=0.1)),
    ]
    got = by_tag(only(compile_reads(tags)).decode_registers([367, 40, 0xFFF6], TS))
    assert got["t"].value == pytest.approx(36.7)
    assert got["p"].value == pytest.approx(10.0)
    assert got["neg"].value == pytest.approx(-1.0)
    assert all(r.quality is Quality.GOOD for r in got.values())


def test_enum_known_and_unknown_codes() -> None:
    t = Transform(enum={0: "idle", 1: "running"})
    tags = [spec("s1", 0, transform=t), spec("s2", 1, transform=t), spec("s3", 2, transform=t)]
    got = by_tag(only(compile_reads(tags)).decode_registers([1, 0, 7], TS))
    assert (got["s1"].value, got["s1"].quality, got["s1"].reason) == ("running", Quality.GOOD, None)
    assert (got["s2"].value, got["s2"].quality) == ("idle", Quality.GOOD)
    assert got["s3"].quality is Quality.UNCERTAIN
    assert got["s3"].value == 7
    assert got["s3"].reason and "7" in got["s3"].reason


def test_enum_on_a_float_is_bad() -> None:
    tags = [spec("s", 0, DataType.FLOAT32, transform=Transform(enum={1: "on"}))]
    (r,) = only(compile_reads(tags)).decode_registers([0x3F80, 0x0000], TS)
    assert (r.value, r.quality) == (None, Quality.BAD)
    assert r.reason


@pytest.mark.parametrize(
    ("type_", "registers", "text"),
    [
        (DataType.FLOAT32, [0x7FC0, 0x0000], "nan"),
        (DataType.FLOAT32, [0x7F80, 0x0000], "inf"),
        (DataType.FLOAT32, [0xFF80, 0x0000], "-inf"),
        (DataType.FLOAT64, [0x7FF8, 0, 0, 0], "nan"),
        (DataType.FLOAT64, [0xFFF0, 0, 0, 0], "-inf"),
    ],
)
@pytest.mark.parametrize("transform", [Transform(), Transform(scale=2.0, offset=1.0)])
def test_non_finite_floats_are_bad(type_: DataType, registers: list[int], text: str,
                                   transform: Transform) -> None:
    tags = [spec("x", 0, type_, transform=transform), spec("ok", len(registers))]
    got = by_tag(only(compile_reads(tags)).decode_registers([*registers, 5], TS))
    x = got["x"]
    assert x.value is None
    assert x.quality is Quality.BAD
    assert x.reason and text in x.reason
    # A bad tag does not spoil its neighbours in the same read.
    assert (got["ok"].value, got["ok"].quality) == (5, Quality.GOOD)


def test_finite_float_is_good() -> None:
    (r,) = only(compile_reads([spec("f", 0, DataType.FLOAT32)])).decode_registers([0xC020, 0], TS)
    assert (r.value, r.quality, r.reason) == (-2.5, Quality.GOOD, None)
    assert not math.isnan(r.value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "registers",
    [
        [0xFFFE, 0x0000],  # 0xFF is never valid UTF-8
        [0x41C3, 0x2800],  # "A" then a broken two-byte sequence
        [0x4142, 0x4380],  # lone continuation byte
    ],
)
def test_invalid_utf8_string_is_bad_not_an_exception(registers: list[int]) -> None:
    tags = [spec("name", 0, DataType.STRING, count=2), spec("ok", 2)]
    got = by_tag(only(compile_reads(tags)).decode_registers([*registers, 9], TS))
    name = got["name"]
    assert name.value is None
    assert name.quality is Quality.BAD
    assert name.reason and name.reason.startswith("undecodable")
    assert (got["ok"].value, got["ok"].quality) == (9, Quality.GOOD)


def test_string_with_utf8_and_byte_swap() -> None:
    tags = [spec("name", 0, DataType.STRING, count=2, byte_order=Order.LITTLE)]
    (r,) = only(compile_reads(tags)).decode_registers([0xC341, 0x00A9], TS)  # "Aé" swapped
    assert (r.value, r.quality) == ("Aé", Quality.GOOD)


def test_short_reply_is_bad_not_an_exception() -> None:
    # A reply with fewer registers than requested must not raise out of the decoder.
    tags = [spec("a", 0), spec("b", 1, DataType.UINT32)]
    got = by_tag(only(compile_reads(tags)).decode_registers([7, 1], TS))
    assert (got["a"].value, got["a"].quality) == (7, Quality.GOOD)
    assert (got["b"].value, got["b"].quality) == (None, Quality.BAD)


def test_bad_marks_every_tag() -> None:
    tags = [spec("a", 0), spec("b", 1, DataType.FLOAT32), spec("c", 3, DataType.STRING, count=2)]
    read = only(compile_reads(tags))
    readings = read.bad("timeout after 1.0 s", TS)
    assert [(r.asset, r.tag) for r in readings] == [("press1", "a"), ("press1", "b"), ("press1", "c")]
    assert all(
        r.value is None and r.quality is Quality.BAD and r.reason == "timeout after 1.0 s"
        and r.ts == TS and r.source_ts is None
        for r in readings
    )


def test_bad_on_a_bit_read() -> None:
    read = only(compile_reads([spec("x", 0, DataType.BOOL, table=D), spec("y", 1, DataType.BOOL,
                                                                             table=D)]))
    readings = read.bad("exception code 2", TS)
    assert {r.tag for r in readings} == {"x", "y"}
    assert all(r.quality is Quality.BAD and r.reason == "exception code 2" for r in readings)


def test_duplicate_tags_are_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        compile_reads([spec("a", 0), spec("a", 5)])


def test_compiled_slots_follow_the_plan() -> None:
    tags = [spec("late", 20), spec("early", 0), spec("mid", 2, DataType.FLOAT32)]
    reads = compile_reads(tags, Limits(max_gap=1))
    assert [(r.request.address, r.request.count) for r in reads] == [(0, 4), (20, 1)]
    assert [(s.tag, s.offset) for s in reads[0].slots] == [("early", 0), ("mid", 2)]
    assert [(s.tag, s.offset) for s in reads[1].slots] == [("late", 0)]
    assert reads[0].request.points == (("press1/early", 0), ("press1/mid", 2))


# -- the block decoder (one struct per read) against the slot-by-slot reference -----------------------

def _key(r: Reading) -> tuple[object, ...]:
    """A reading with its value's type: 1 and 1.0 are not the same decode."""
    return (*r, type(r.value))


_TYPES = [t for t in DataType if t is not DataType.BOOL]


@st.composite
def _layouts(draw: st.DrawFn) -> tuple[list[TagSpec], Limits]:
    n = draw(st.integers(1, 12))
    tags = []
    for i in range(n):
        table = draw(st.sampled_from([H, I]))
        address = draw(st.integers(0, 40))
        if draw(st.integers(0, 5)) == 0:
            fmt_type, count, bit = DataType.BOOL, None, draw(st.integers(0, 15))
        else:
            fmt_type = draw(st.sampled_from(_TYPES))
            count = draw(st.integers(1, 4)) if fmt_type is DataType.STRING else None
            bit = None
        numeric = fmt_type not in (DataType.BOOL, DataType.STRING)
        transform = Transform()
        if numeric:
            kind = draw(st.sampled_from(["plain", "scaled", "enum"]))
            if kind == "scaled":
                transform = Transform(scale=draw(st.sampled_from([0.1, 2.0, -0.5, 1.0])),
                                      offset=draw(st.sampled_from([0.0, -10.0, 3.25])))
            elif kind == "enum":
                transform = Transform(enum={0: "idle", 1: "running", 7: "seven"})
        tags.append(spec(f"t{i}", address, fmt_type, table=table, count=count, transform=transform,
                         byte_order=draw(st.sampled_from([Order.BIG, Order.LITTLE])),
                         word_order=draw(st.sampled_from([Order.BIG, Order.LITTLE])), bit=bit))
    return tags, Limits(max_gap=draw(st.integers(0, 10)))


_WORDS = st.one_of(st.integers(0, 0xFFFF), st.sampled_from([0, 1, 7, 0x7FC0, 0x7F80, 0xFF80, 0xFFFF, 0x4142, 0xC328]))


@settings(max_examples=300, deadline=None)
@given(layout=_layouts(), data=st.data())
def test_block_decode_equals_slot_decode(layout: tuple[list[TagSpec], Limits], data: st.DataObject) -> None:
    tags, limits = layout
    for read in compile_reads(tags, limits):
        count = read.request.count
        n = data.draw(st.sampled_from([count, count, count, max(0, count - 1), count + 1]), label="reply length")
        registers = data.draw(st.lists(_WORDS, min_size=n, max_size=n), label="registers")
        got = read.decode_registers(registers, TS)
        want = read.decode_slots(registers, TS)
        assert [_key(r) for r in got] == [_key(r) for r in want]


def test_block_decode_table() -> None:
    """A realistic map: scaled int16, float32 (one NaN), a swapped uint32, a string, bits, an enum, a hole."""
    tags = [
        spec("status", 0, DataType.UINT16, transform=Transform(enum={0: "idle", 1: "running"})),
        spec("temp", 1, DataType.INT16, transform=Transform(scale=0.1)),
        spec("flow", 2, DataType.FLOAT32),
        spec("bad_flow", 4, DataType.FLOAT32, transform=Transform(scale=2.0)),
        spec("count", 6, DataType.UINT32, word_order=Order.LITTLE),
        spec("door", 8, DataType.BOOL, bit=0),
        spec("estop", 8, DataType.BOOL, bit=15),
        spec("name", 9, DataType.STRING, count=2),
        spec("level", 13, DataType.INT16, transform=Transform(scale=0.5, offset=-10)),
    ]
    read = only(compile_reads(tags, Limits(max_gap=2)))
    assert read.block is not None
    assert [s.tag for s in read.slots if any(i == read.slots.index(s) for i, _, _ in read.block.slow)] == [
        "count", "door", "estop", "name"]
    registers = [1, 0xFFF6, 0x3F80, 0, 0x7FC0, 0, 0x5678, 0x1234, 0x8001, 0x4142, 0x4300, 0, 0, 40]
    got = by_tag(read.decode_registers(registers, TS))
    assert [_key(r) for r in read.decode_registers(registers, TS)] == [
        _key(r) for r in read.decode_slots(registers, TS)]
    assert (got["status"].value, got["status"].quality) == ("running", Quality.GOOD)
    assert got["temp"].value == pytest.approx(-1.0)
    assert got["flow"].value == 1.0 and type(got["flow"].value) is float
    assert (got["bad_flow"].value, got["bad_flow"].quality, got["bad_flow"].reason) == (
        None, Quality.BAD, "not a finite number (nan)")
    assert got["count"].value == 0x12345678
    assert (got["door"].value, got["estop"].value) == (True, True)
    assert got["name"].value == "ABC"
    assert got["level"].value == pytest.approx(10.0)
    assert all(r.ts == TS and r.source_ts is None for r in got.values())
