"""Pure: a device's tags -> a read plan, and read replies -> Readings (no I/O)."""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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
    fmt: RegisterFormat | None = None  # None: decode with ``decode`` only (never in the block struct)


@dataclass(frozen=True, slots=True)
class _Block:
    """How a register read is decoded at once. Every numeric slot in natural (big-endian) order that
    does not overlap the one before is one field of a single ``struct`` format over the whole read
    (``x`` pads the holes), so a reply is unpacked with one C call. The other slots (strings,
    bit-in-register, swapped byte or word order, overlaps) keep their own decoder. Transforms are
    applied by kind: plain integers need nothing, scaled integers one multiply-add, floats a finite
    check; enums and anything else go through ``Transform.apply``.
    """

    unpack: Callable[[bytes, int], tuple[object, ...]]
    need: int  # bytes the struct reads
    pack: Callable[..., bytes]  # the request's register count, packed big-endian
    count: int  # registers in the request
    slow: tuple[tuple[int, RawDecoder, int], ...]  # (slot index, decoder, byte offset), ascending
    scaled: tuple[tuple[int, float, float], ...]  # integer slots: (index, scale, offset)
    floats: tuple[tuple[int, float, float, bool], ...]  # float slots: (index, scale, offset, identity)
    general: tuple[tuple[int, Transform], ...]  # enums, slow slots: Transform.apply
    keys: tuple[tuple[str, str], ...]  # (asset, tag) of every slot

    @classmethod
    def of(cls, request: ReadRequest, slots: tuple[_Slot, ...]) -> _Block:
        codes: list[str] = []
        at = 0  # bytes covered by the struct so far
        slow: list[tuple[int, RawDecoder, int]] = []
        scaled: list[tuple[int, float, float]] = []
        floats: list[tuple[int, float, float, bool]] = []
        general: list[tuple[int, Transform]] = []
        for i, s in enumerate(slots):
            off = s.offset * 2
            t = s.transform
            if _fits_block(s.fmt) and off >= at:
                assert s.fmt is not None
                if off > at:
                    codes.append(f"{off - at}x")
                codes.append(s.fmt.type.struct_code)
                at = off + s.fmt.count * 2
                identity = t.scale == 1.0 and t.offset == 0.0
                if t.enum is not None or type(t) is not Transform:
                    general.append((i, t))
                elif s.fmt.type.is_float:
                    floats.append((i, t.scale, t.offset, identity))
                elif not identity:
                    scaled.append((i, t.scale, t.offset))
            else:
                assert s.decode is not None
                slow.append((i, s.decode, off))
                general.append((i, t))
        block = struct.Struct(">" + "".join(codes))
        return cls(block.unpack_from, block.size, struct.Struct(f">{request.count}H").pack, request.count,
                   tuple(slow), tuple(scaled), tuple(floats), tuple(general), tuple((s.asset, s.tag) for s in slots))

    def decode(self, registers: Sequence[int], ts: float) -> list[Reading] | None:
        """The readings of a reply; None when the reply is shorter than the struct (decode slot by slot)."""
        n = len(registers)
        if n * 2 < self.need:
            return None
        buf = self.pack(*registers) if n == self.count else registers_to_bytes(registers)
        values: list[object] = list(self.unpack(buf, 0))
        special: list[tuple[int, object, Quality, str | None]] = []  # slots that are not plain good values
        failed = self._decode_slow(buf, values, special) if self.slow else _NONE
        for i, scale, offset in self.scaled:
            values[i] = values[i] * scale + offset  # type: ignore[operator]
        finite = math.isfinite
        for i, scale, offset, identity in self.floats:
            raw = values[i]
            if not finite(raw):  # type: ignore[arg-type]
                special.append((i, None, Quality.BAD, f"not a finite number ({raw})"))
            elif not identity:
                values[i] = raw * scale + offset  # type: ignore[operator]
        for i, transform in self.general:
            if i in failed:
                continue
            value, quality, reason = transform.apply(values[i])
            if quality is _GOOD and reason is None:
                values[i] = value
            else:
                special.append((i, value, quality, reason))
        new = tuple.__new__
        out = [new(Reading, (asset, tag, v, _GOOD, None, None, ts))
               for (asset, tag), v in zip(self.keys, values, strict=True)]
        for i, value, quality, reason in special:
            asset, tag = self.keys[i]
            out[i] = new(Reading, (asset, tag, value, quality, reason, None, ts))
        return out

    def _decode_slow(self, buf: bytes, values: list[object],
                     special: list[tuple[int, object, Quality, str | None]]) -> set[int]:
        """Put the values of the slots outside the struct in place; the indexes that failed."""
        failed: set[int] = set()
        for i, decode, off in self.slow:  # ascending: each lands at its own index
            try:
                values.insert(i, decode(buf, off))
            except (struct.error, UnicodeDecodeError, ValueError) as exc:
                values.insert(i, None)
                failed.add(i)
                special.append((i, None, Quality.BAD, f"undecodable: {exc}"))
        return failed


_GOOD = Quality.GOOD
_NONE: frozenset[int] = frozenset()


def _fits_block(fmt: RegisterFormat | None) -> bool:
    """A numeric value whose registers are already in big-endian order (one register: any word order)."""
    return (fmt is not None and fmt.bit is None and fmt.type is not DataType.STRING and fmt.type.width == fmt.count
            and fmt.byte_order is Order.BIG and (fmt.word_order is Order.BIG or fmt.count == 1))


@dataclass(frozen=True, slots=True)
class CompiledRead:
    request: ReadRequest
    slots: tuple[_Slot, ...]
    block: _Block | None = field(default=None, compare=False, repr=False)  # register reads: set at init

    def __post_init__(self) -> None:
        if self.block is None and not self.request.table.is_bits:
            object.__setattr__(self, "block", _Block.of(self.request, self.slots))

    def decode_registers(self, registers: Sequence[int], ts: float) -> list[Reading]:
        if self.block is not None:
            out = self.block.decode(registers, ts)
            if out is not None:
                return out
        return self.decode_slots(registers, ts)

    def decode_slots(self, registers: Sequence[int], ts: float) -> list[Reading]:
        """Slot by slot, each with its own decoder and ``Transform.apply`` (the reference for
        ``decode_registers``, and what a short reply takes)."""
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
        new = tuple.__new__
        return [new(Reading, (s.asset, s.tag, bool(bits[s.offset]), _GOOD, None, None, ts)) for s in self.slots]

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
            slots.append(_Slot(t.asset, t.tag, offset, decoder, t.transform, None if decoder is None else t.fmt))
        compiled.append(CompiledRead(req, tuple(slots)))
    return compiled


def register_format(type_: DataType, count: int | None, byte_order: Order, word_order: Order,
                    bit: int | None) -> RegisterFormat:
    return RegisterFormat(type_, count or type_.width or 1, byte_order, word_order, bit)
