"""Pure: a device's tags -> a read plan, and read replies -> Readings (no I/O)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.model import Quality, Reading, Transform

from .codec import RawDecoder, RegisterFormat, registers_to_bytes
from .planner import Limits, Point, ReadRequest, plan
from .types import DataType, Order, Table


@dataclass(frozen=True, slots=True)
class TagSpec:
    """One tag as the Modbus driver needs it (built from the tag map)."""

    asset: str
    tag: str
    unit: int
    table: Table
    address: int
    fmt: RegisterFormat
    transform: Transform = Transform()

    @property
    def key(self) -> str:
        return f"{self.asset}/{self.tag}"


@dataclass(frozen=True, slots=True)
class _Slot:
    asset: str
    tag: str
    offset: int
    decode: RawDecoder | None  # None for bit tables
    transform: Transform


@dataclass(frozen=True, slots=True)
class CompiledRead:
    request: ReadRequest
    slots: tuple[_Slot, ...]

    def decode_registers(self, registers: Sequence[int], ts: float) -> list[Reading]:
        buf = registers_to_bytes(registers)
        out = []
        for s in self.slots:
            try:
                raw = s.decode(buf, s.offset * 2)  # type: ignore[misc]
            except (struct.error, UnicodeDecodeError, ValueError) as exc:
                out.append(Reading(s.asset, s.tag, None, Quality.BAD, f"undecodable: {exc}", None, ts))
                continue
            value, quality, reason = s.transform.apply(raw)
            out.append(Reading(s.asset, s.tag, value, quality, reason, None, ts))
        return out

    def decode_bits(self, bits: Sequence[bool], ts: float) -> list[Reading]:
        return [Reading(s.asset, s.tag, bool(bits[s.offset]), Quality.GOOD, None, None, ts) for s in self.slots]

    def bad(self, reason: str, ts: float) -> list[Reading]:
        return [Reading(s.asset, s.tag, None, Quality.BAD, reason, None, ts) for s in self.slots]


def compile_reads(tags: Sequence[TagSpec], limits: Limits = Limits()) -> list[CompiledRead]:
    """Plan the reads for ``tags`` and attach each tag's decoder to its request."""
    by_key = {t.key: t for t in tags}
    if len(by_key) != len(tags):
        raise ValueError("duplicate asset/tag in one device")
    points = [
        Point(t.key, t.unit, t.table, t.address, 1 if t.table.is_bits else t.fmt.count) for t in tags
    ]
    compiled = []
    for req in plan(points, limits):
        slots = []
        for key, offset in req.points:
            t = by_key[key]
            decoder = None if req.table.is_bits else t.fmt.compile()
            slots.append(_Slot(t.asset, t.tag, offset, decoder, t.transform))
        compiled.append(CompiledRead(req, tuple(slots)))
    return compiled


def register_format(type_: DataType, count: int | None, byte_order: Order, word_order: Order,
                    bit: int | None) -> RegisterFormat:
    return RegisterFormat(type_, count or type_.width or 1, byte_order, word_order, bit)
