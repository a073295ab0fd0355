"""Modbus data model shared by the planner, the decoder and the tag map.

Modbus Application Protocol v1.1b3 §4.3: four primary tables. Coils and discrete inputs are single
bits; holding and input registers are 16-bit words sent most significant byte first (§4.2). Types
wider than one register span consecutive registers; their word order and the byte order inside each
register are a property of the PLC, so both are set per tag.
"""

from __future__ import annotations

from enum import StrEnum


class Table(StrEnum):
    COIL = "coil"
    DISCRETE = "discrete"
    HOLDING = "holding"
    INPUT = "input"

    @property
    def is_bits(self) -> bool:
        return self in (Table.COIL, Table.DISCRETE)

    @property
    def function_code(self) -> int:
        """The read function code for this table (MBAP §6.1-6.4)."""
        return _READ_FC[self]


_READ_FC = {Table.COIL: 1, Table.DISCRETE: 2, Table.HOLDING: 3, Table.INPUT: 4}


class DataType(StrEnum):
    BOOL = "bool"
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    INT64 = "int64"
    UINT64 = "uint64"
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    STRING = "string"

    @property
    def width(self) -> int | None:
        """Registers one value occupies; None for strings (their count is configured)."""
        return _WIDTH[self]

    @property
    def struct_code(self) -> str:
        return _STRUCT[self]

    @property
    def is_float(self) -> bool:
        return self in (DataType.FLOAT32, DataType.FLOAT64)

    @property
    def is_integer(self) -> bool:
        return self not in (DataType.BOOL, DataType.STRING) and not self.is_float


_WIDTH: dict[DataType, int | None] = {
    DataType.BOOL: 1,
    DataType.INT16: 1,
    DataType.UINT16: 1,
    DataType.INT32: 2,
    DataType.UINT32: 2,
    DataType.INT64: 4,
    DataType.UINT64: 4,
    DataType.FLOAT32: 2,
    DataType.FLOAT64: 4,
    DataType.STRING: None,
}
_STRUCT = {
    DataType.BOOL: "H",
    DataType.INT16: "h",
    DataType.UINT16: "H",
    DataType.INT32: "i",
    DataType.UINT32: "I",
    DataType.INT64: "q",
    DataType.UINT64: "Q",
    DataType.FLOAT32: "f",
    DataType.FLOAT64: "d",
    DataType.STRING: "s",
}


class Order(StrEnum):
    """Byte order inside a register, or word order across registers."""

    BIG = "big"
    LITTLE = "little"


MAX_READ_REGISTERS = 125  # §6.3: quantity of registers 1..125
MAX_READ_BITS = 2000  # §6.1: quantity of coils 1..2000
ADDRESS_SPACE = 65536  # §4.4: addresses 0..65535
