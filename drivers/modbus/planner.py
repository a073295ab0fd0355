"""Pure request planning: merge a device's tags into as few Modbus reads as possible.

Tags of one unit and table are sorted by address and merged greedily while the merged read stays
within the protocol's quantity limit (§6.1: 2000 bits, §6.3: 125 registers) and the hole between
two tags is at most ``max_gap`` addresses. Greedy merging over sorted starts is optimal here: each
request starts at the first tag not yet covered and extends as far as the limits allow.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import groupby

from .types import ADDRESS_SPACE, MAX_READ_BITS, MAX_READ_REGISTERS, Table


class PlanError(ValueError):
    """A tag cannot be read by any single request (configuration error)."""


@dataclass(frozen=True, slots=True)
class Point:
    """Where one tag lives: ``count`` registers (or bits) from ``address``."""

    key: str
    unit: int
    table: Table
    address: int
    count: int

    @property
    def end(self) -> int:
        return self.address + self.count


@dataclass(frozen=True, slots=True)
class ReadRequest:
    unit: int
    table: Table
    address: int
    count: int
    points: tuple[tuple[str, int], ...]  # (key, offset of the tag inside this read)

    def __str__(self) -> str:
        return f"unit {self.unit} {self.table} {self.address}+{self.count} ({len(self.points)} tags)"


@dataclass(frozen=True, slots=True)
class Limits:
    max_gap: int = 0
    max_registers: int = MAX_READ_REGISTERS
    max_bits: int = MAX_READ_BITS

    def size(self, table: Table) -> int:
        return self.max_bits if table.is_bits else self.max_registers


def plan(points: Iterable[Point], limits: Limits = Limits()) -> list[ReadRequest]:
    """Cover every point exactly once with the fewest reads that respect ``limits``."""
    ordered = sorted(points, key=lambda p: (p.unit, p.table, p.address, p.end, p.key))
    requests: list[ReadRequest] = []
    for (unit, table), group in groupby(ordered, key=lambda p: (p.unit, p.table)):
        requests.extend(_plan_group(unit, table, list(group), limits))
    return requests


def _plan_group(unit: int, table: Table, points: list[Point], limits: Limits) -> list[ReadRequest]:
    size = limits.size(table)
    out: list[ReadRequest] = []
    batch: list[Point] = []
    start = end = 0
    for p in points:
        _check_point(p, size)
        if batch and p.address - end <= limits.max_gap and max(end, p.end) - start <= size:
            batch.append(p)
            end = max(end, p.end)
            continue
        if batch:
            out.append(_request(unit, table, start, end, batch))
        batch, start, end = [p], p.address, p.end
    if batch:
        out.append(_request(unit, table, start, end, batch))
    return out


def _check_point(p: Point, size: int) -> None:
    if p.count < 1 or p.count > size:
        raise PlanError(f"{p.key}: {p.count} addresses do not fit one read (at most {size})")
    if p.address < 0 or p.end > ADDRESS_SPACE:
        raise PlanError(f"{p.key}: addresses {p.address}..{p.end - 1} outside 0..65535")


def _request(unit: int, table: Table, start: int, end: int, batch: list[Point]) -> ReadRequest:
    return ReadRequest(
        unit=unit,
        table=table,
        address=start,
        count=end - start,
        points=tuple((p.key, p.address - start) for p in batch),
    )
