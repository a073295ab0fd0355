"""Pure conversion between 16-bit registers and typed values (no I/O).

Registers arrive as ints 0..65535 (big-endian on the wire, §4.2). A block reply is packed once into
bytes; each tag then reads its slice with one precompiled ``struct`` call. Byte and word order are
applied by permuting the slice, so every combination uses the same big-endian struct format.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .types import DataType, Order

RawDecoder = Callable[[bytes, int], object]


class EncodeError(ValueError):
    """A value cannot be represented in the tag's type."""


def registers_to_bytes(registers: Sequence[int]) -> bytes:
    return struct.pack(f">{len(registers)}H", *registers)


def bytes_to_registers(data: bytes) -> list[int]:
    return list(struct.unpack(f">{len(data) // 2}H", data))


def _reorder(raw: bytes, byte_order: Order, word_order: Order) -> bytes:
    """Permute PLC order into big-endian order; the permutation is its own inverse."""
    if word_order is Order.LITTLE:
        raw = b"".join(raw[i : i + 2] for i in range(len(raw) - 2, -1, -2))
    if byte_order is Order.LITTLE:
        swapped = bytearray(raw)
        swapped[0::2], swapped[1::2] = raw[1::2], raw[0::2]
        raw = bytes(swapped)
    return raw


@dataclass(frozen=True, slots=True)
class RegisterFormat:
    """How one tag's value is laid out in registers."""

    type: DataType
    count: int  # registers
    byte_order: Order = Order.BIG
    word_order: Order = Order.BIG
    bit: int | None = None  # bit-in-register, 0 = least significant

    def compile(self) -> RawDecoder:
        """Return ``decode(block_bytes, byte_offset) -> raw value`` for this layout."""
        size = self.count * 2
        natural = self.byte_order is Order.BIG and self.word_order is Order.BIG
        if self.type is DataType.STRING:
            return self._compile_string(size, natural)
        unpack = struct.Struct(">" + self.type.struct_code).unpack_from
        if self.bit is not None:
            bit = self.bit
            if self.byte_order is Order.BIG:
                return lambda buf, off: bool((unpack(buf, off)[0] >> bit) & 1)
            return lambda buf, off: bool((unpack(_reorder(buf[off : off + 2], Order.LITTLE, Order.BIG), 0)[0] >> bit) & 1)
        if natural:
            return lambda buf, off: unpack(buf, off)[0]
        bo, wo = self.byte_order, self.word_order
        return lambda buf, off: unpack(_reorder(buf[off : off + size], bo, wo), 0)[0]

    def _compile_string(self, size: int, natural: bool) -> RawDecoder:
        bo, wo = self.byte_order, self.word_order

        def decode(buf: bytes, off: int) -> object:
            raw = buf[off : off + size]
            if not natural:
                raw = _reorder(raw, bo, wo)
            return raw.rstrip(b"\x00 ").decode("utf-8")

        return decode

    def decode(self, registers: Sequence[int]) -> object:
        """Decode one value from exactly its own registers (tests, one-off reads)."""
        return self.compile()(registers_to_bytes(registers), 0)

    def encode(self, value: object) -> list[int]:
        """The registers a PLC would hold for ``value`` (the simulator and tests use this)."""
        if self.bit is not None:
            raise EncodeError("a bit-in-register tag is encoded with set_bit()")
        if self.type is DataType.STRING:
            if not isinstance(value, str):
                raise EncodeError(f"string tag needs a str, got {value!r}")
            raw = value.encode("utf-8")
            if len(raw) > self.count * 2:
                raise EncodeError(f"{value!r} is longer than {self.count * 2} bytes")
            raw = raw.ljust(self.count * 2, b"\x00")
        else:
            try:
                raw = struct.pack(">" + self.type.struct_code, value)
            except (struct.error, OverflowError) as exc:  # OverflowError: float32 out of range
                raise EncodeError(f"{value!r} does not fit {self.type}") from exc
        return bytes_to_registers(_reorder(raw, self.byte_order, self.word_order))


def set_bit(register: int, bit: int, value: bool, byte_order: Order = Order.BIG) -> int:
    """Return ``register`` with ``bit`` set to ``value`` (as a bit-in-register tag reads it)."""
    swap = byte_order is Order.LITTLE
    if swap:
        register = ((register & 0xFF) << 8) | (register >> 8)
    register = register | (1 << bit) if value else register & ~(1 << bit)
    if swap:
        register = ((register & 0xFF) << 8) | (register >> 8)
    return register


def is_finite(value: object) -> bool:
    return not isinstance(value, float) or math.isfinite(value)
