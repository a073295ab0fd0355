"""Device drivers. Only this package imports protocol libraries (pymodbus, asyncua).

A driver turns one device's tags into Readings. It raises DriverError subclasses and never retries:
the poller owns schedules, timeouts and backoff. Construction validates and never touches the
network; ``connect`` does the I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from gateway.model import Reading


class DriverError(Exception):
    """A device could not be read. ``kind`` names the failure for metrics and logs."""

    kind = "error"

    def __init__(self, device: str, message: str) -> None:
        self.device = device
        self.detail = message  # without the device: what a tag's reason says
        super().__init__(f"{device}: {message}")


class DeviceUnreachable(DriverError):
    kind = "unreachable"


class DeviceTimeout(DriverError):
    kind = "timeout"


class DeviceException(DriverError):
    """The device answered with a protocol exception (e.g. Modbus exception code)."""

    kind = "exception"


class BadReply(DriverError):
    """The device answered something that does not match the request."""

    kind = "bad_reply"


class BadValue(DriverError):
    """The device answered, but a value cannot be used (NaN or infinite, undecodable, wrong type)."""

    kind = "bad_value"

    @classmethod
    def of(cls, device: str, rejected: Sequence[Reading]) -> BadValue:
        first = rejected[0]
        more = f" (and {len(rejected) - 1} more tags)" if len(rejected) > 1 else ""
        return cls(device, f"{first.asset}/{first.tag}: {first.reason}{more}")


class ReadResult(list[Reading]):
    """Readings of one cycle, plus what failed without breaking the connection (the poller counts it)."""

    def __init__(self, readings: Iterable[Reading] = ()) -> None:
        super().__init__(readings)
        self.errors: list[DriverError] = []


class WriteNotApplied(DriverError):
    """The device answered the write, but reading the tag back shows another value."""

    kind = "not_applied"


class WriteRefused(ValueError):
    """The driver will not write this tag: it does not know it, or the tag's table is read-only."""


class Driver(Protocol):
    device_id: str

    async def connect(self) -> None: ...

    async def read(self) -> Sequence[Reading]: ...

    async def close(self) -> None: ...

    def describe_plan(self) -> list[str]:
        """The requests one cycle sends, for ``edge-gateway check``."""
        ...

    def bad(self, reason: str, ts: float) -> list[Reading]:
        """A reading of every tag with ``bad`` quality and ``reason`` (the device failed)."""
        ...


class Writer(Protocol):
    """A driver that can set a tag on its device (operator writes of setpoints).

    ``write`` reads the tag, writes the engineering ``value`` (the tag's transform inverted), reads it
    back and returns the engineering value it held before (None if that did not decode). It raises
    ``ValueError`` before anything is written for a tag or value it cannot write (``WriteRefused``,
    ``EncodeError``), and ``DriverError`` for I/O failures (the kinds reads have), device refusals
    and a value the device did not keep (``WriteNotApplied``).
    """

    device_id: str

    async def write(self, asset: str, tag: str, value: object) -> object: ...
