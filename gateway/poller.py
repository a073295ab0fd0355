"""One task per device: schedule, timeouts, reconnect with backoff. Never blocks another device."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from drivers import Driver, DriverError

from .backoff import Backoff
from .logs import Contained, get
from .metrics import Metrics
from .model import Reading


@dataclass(frozen=True, slots=True)
class DeviceBatch:
    device: str
    readings: Sequence[Reading]
    connected: bool = True  # False: the device failed; its readings are the bad ones of the outage


class Sink(Protocol):
    async def put(self, item: DeviceBatch, /) -> None: ...


class Poller:
    def __init__(self, *, driver: Driver, interval: float, timeout: float, requests: int,
                 out: Sink, metrics: Metrics, backoff_cap: float = 30.0, offset: float = 0.0) -> None:
        self.driver = driver
        self.offset = offset  # seconds before the first connect: devices of one map poll out of step
        self.device = driver.device_id
        self.interval = interval
        # Safety nets, looser than the drivers' own limits so that the driver's error (the precise one)
        # comes first: a connect may take several round trips (an OPC-UA session: up to 3 timeouts),
        # a cycle one timeout per request (an OPC-UA read: up to 2 timeouts).
        self.connect_timeout = timeout * 3 + 1.0
        self.read_timeout = timeout * max(requests, 2) + 1.0
        self.out = out
        self.metrics = metrics
        self.backoff = Backoff(cap=backoff_cap)
        self.log = get(device=self.device)
        self.connected = False
        self.last_error: str | None = None
        self._down_since: float | None = None
        self._failures = 0
        self._partial: str | None = None  # what the last cycle's answer had wrong (exceptions, NaN)
        self._stopped = False
        # exceptions no driver should raise: counted, the traceback logged once per outage
        self._contained = Contained(self.log, metrics.internal_errors.labels(f"poller[{self.device}]").inc)

    def stop(self) -> None:
        """Leave the loop at the next step, even if a cancellation got lost on the way."""
        self._stopped = True

    async def run(self) -> None:
        try:
            if self.offset > 0:
                await asyncio.sleep(self.offset)
            while not self._stopped:
                try:
                    await self._connect()
                    await self._poll_loop()
                except DriverError as exc:
                    await self._failed(exc.kind, str(exc))
                except TimeoutError:
                    await self._failed("timeout", f"{self.device}: no answer within the device timeout")
                except Exception as exc:  # a library's bug is this device's failure, not the process's
                    text = self._contained(exc, "device failed with an internal error")
                    await self._failed("internal", f"{self.device}: internal error {text}")
                await self._close()
                await asyncio.sleep(self.backoff.next())
        finally:
            self.metrics.device_connected.labels(self.device).set(0)
            await self._close()

    async def _close(self) -> None:
        """Close the driver; whatever its library raises on the way is logged, never raised."""
        try:
            await self.driver.close()
        except Exception as exc:
            self._contained(exc, "device close failed")

    async def _connect(self) -> None:
        async with asyncio.timeout(self.connect_timeout):
            await self.driver.connect()
        self.connected = True
        self.metrics.device_connected.labels(self.device).set(1)

    async def _poll_loop(self) -> None:
        next_at = time.monotonic()
        while not self._stopped:
            started = time.monotonic()
            async with asyncio.timeout(self.read_timeout):
                result = await self.driver.read()
            elapsed = time.monotonic() - started
            self.metrics.polls.labels(self.device).inc()
            self.metrics.poll_latency.labels(self.device).observe(elapsed)
            errors = getattr(result, "errors", ())
            for err in errors:
                self.metrics.poll_errors.labels(self.device, err.kind).inc()
            self._answered_with(errors)
            self._recovered()
            await self.out.put(DeviceBatch(self.device, result))
            next_at += self.interval
            now = time.monotonic()
            if next_at < now:  # fixed rate; a cycle that overran skips the missed ticks
                missed = int((now - next_at) / self.interval) + 1
                self.metrics.poll_overruns.labels(self.device).inc(missed)
                next_at += missed * self.interval
            await asyncio.sleep(next_at - now)

    async def _failed(self, kind: str, message: str) -> None:
        self.connected = False
        self.metrics.device_connected.labels(self.device).set(0)
        self.metrics.poll_errors.labels(self.device, kind).inc()
        self._failures += 1
        changed = message != self.last_error
        self.last_error = message
        if self._down_since is None:
            self._down_since = time.monotonic()
            self.log.error("device failed", kind=kind, error=message)
        else:
            self.log.debug("device still failing", kind=kind, error=message, failures=self._failures)
        if changed:  # tags go bad once per distinct failure, not once per retry
            try:
                bad = self.driver.bad(f"{kind}: {message}", time.time())
            except Exception as exc:  # the outage is still reported (as the device's loss)
                self._contained(exc, "device failed with an internal error")
                bad = []
            await self.out.put(DeviceBatch(self.device, bad, connected=False))

    def _answered_with(self, errors: Sequence[DriverError]) -> None:
        """Log errors in an answer (their tags are bad) when they change, not once per cycle."""
        text = "; ".join(f"{e.kind}: {e.detail}" for e in errors) or None
        if text != self._partial:
            if text is not None:
                self.log.warning("device answered with errors", errors=text)
            else:  # in subscribe mode a cycle without notifications has none either: no all-clear
                self.log.debug("device answered without errors")
            self._partial = text

    def _recovered(self) -> None:
        self.backoff.reset()
        if self._down_since is not None:
            self.log.warning("device recovered", failures=self._failures,
                             outage_s=round(time.monotonic() - self._down_since, 3))
            self._down_since, self._failures, self.last_error = None, 0, None
            self._contained.reset()

