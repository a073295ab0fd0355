"""Device drivers. Only this package imports protocol libraries (pymodbus, asyncua).

A driver turns one device's tags into Readings. It raises DriverError subclasses and never retries:
the poller owns schedules, timeouts and backoff. Construction validates and never touches the
network; ``connect`` does the I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
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
