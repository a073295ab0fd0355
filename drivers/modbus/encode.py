"""Pure: engineering value -> what a Modbus write sends (no I/O).

The inverse of decoding: the tag's transform is inverted (``drivers.encoding.to_raw``), the raw value
is checked against the register type, and laid out with the tag's byte and word order by
``RegisterFormat.encode``. A bool in a register is a read-modify-write: ``encode_bit`` takes the
register as the PLC holds it and changes only the tag's bit. Every value that does not fit raises
``EncodeError`` (a ``ValueError``).
"""

from __future__ import annotations

from gateway.model import Transform

from ..encoding import Kind, check_int_range, to_raw
from .codec import EncodeError, RegisterFormat, set_bit
from .types import DataType

IDENTITY = Transform()
INT_RANGES: dict[DataType, tuple[int, int]] = {
    DataType.INT16: (-(1 << 15), (1 << 15) - 1),
    DataType.UINT16: (0, (1 << 16) - 1),
    DataType.INT32: (-(1 << 31), (1 << 31) - 1),
    DataType.UINT32: (0, (1 << 32) - 1),
    DataType.INT64: (-(1 << 63), (1 << 63) - 1),
    DataType.UINT64: (0, (1 << 64) - 1),
}


def kind(type_: DataType) -> Kind:
    if type_ is DataType.BOOL:
        return "bool"
    if type_ is DataType.STRING:
        return "string"
    return "float" if type_.is_float else "int"


def raw_value(value: object, type_: DataType, transform: Transform = IDENTITY) -> bool | int | float | str:
    """The raw value of ``type_`` that decodes (and transforms) back to ``value``."""
    raw = to_raw(value, transform, kind(type_))
    if type_ in INT_RANGES:
        assert isinstance(raw, int)
        check_int_range(raw, *INT_RANGES[type_], str(type_), transform)
    elif type_ is DataType.STRING:
        assert isinstance(raw, str)
        if "\x00" in raw:
            raise EncodeError("a string tag cannot hold NUL characters (NUL pads the registers)")
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise EncodeError(f"{raw!r} is not encodable as UTF-8: {exc.reason}") from None
    return raw


def encode_registers(value: object, fmt: RegisterFormat, transform: Transform = IDENTITY) -> list[int]:
    """The registers a holding-register tag (not a bit in a register) is written with."""
    if fmt.bit is not None:
        raise EncodeError("a bit in a register is written with encode_bit (read-modify-write)")
    registers = fmt.encode(raw_value(value, fmt.type, transform))
    if len(registers) != fmt.count:  # RegisterFormat.encode pads strings; numbers have their width
        raise EncodeError(f"{len(registers)} registers for a tag of {fmt.count}")
    return registers


def encode_bit(value: object, fmt: RegisterFormat, register: int) -> int:
    """``register`` (as the PLC holds it) with the tag's bit set to ``value``; other bits unchanged."""
    if fmt.bit is None:
        raise EncodeError("not a bit-in-register tag")
    if not 0 <= register <= 0xFFFF:
        raise ValueError(f"register value {register} outside 0..65535")
    return set_bit(register, fmt.bit, encode_coil(value), fmt.byte_order)


def encode_coil(value: object) -> bool:
    """The state a coil (or a bit) is written with: only ``True`` and ``False`` are accepted."""
    raw = to_raw(value, IDENTITY, "bool")
    assert isinstance(raw, bool)
    return raw
