"""Whatever one device's driver raises stays in that device; a batch the pipeline cannot process keeps
its readings; the process and every other device go on (DESIGN.md, Bad input).

The failing driver is a test double wrapping the real Modbus driver of a bundled station (no library
is patched): it raises what a protocol library's bug would (an AssertionError on connect, a KeyError
in a decoder), or returns a value no rule expects.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import structlog

from drivers import Driver
from drivers.registry import build_driver
from gateway.brokers import Mosquitto
from gateway.logs import configure
from gateway.metrics import Metrics
from gateway.model import Reading
from gateway.settings import Settings
from gateway.tagmap import TagMap

from .helpers import Message, collecting, running, tune, wait_until

pytestmark = pytest.mark.integration

BROKEN = "filling-1-plc"
ODD = "labeling-1-plc"
HEALTHY = ("capping-1-plc", "packaging-1-plc", "powder-1-plc")


class Breaking:
    """A driver that delegates to a real one, and raises what it is told to, where it is told to."""

    def __init__(self, inner: Driver) -> None:
        self.inner = inner
        self.device_id = inner.device_id
        self.on_connect: BaseException | None = None
        self.on_read: BaseException | None = None
        self.odd_value: tuple[str, object] | None = None  # (tag, value) put into every read

    async def connect(self) -> None:
        await self.inner.connect()
        if self.on_connect is not None:
            raise self.on_connect

    async def read(self) -> Sequence[Reading]:
        readings = list(await self.inner.read())
        if self.on_read is not None:
            raise self.on_read
        if self.odd_value is not None:
            tag, value = self.odd_value
            readings = [r._replace(value=value) if r.tag == tag else r for r in readings]
        return readings

    async def close(self) -> None:
        await self.inner.close()

    def describe_plan(self) -> list[str]:
        return self.inner.describe_plan()

    def bad(self, reason: str, ts: float) -> list[Reading]:
        return self.inner.bad(reason, ts)


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The gateway's log as JSON lines in a buffer; the logging set-up as before afterwards."""
    stream = io.StringIO()
    configure("json", "info", stream=stream)
    try:
        yield stream
    finally:
        structlog.reset_defaults()
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def _count(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_driver_that_raises_anything_fails_only_its_device(
    live_map: TagMap, mosquitto: Mosquitto, tmp_path: Path, json_log: io.StringIO
) -> None:
    tm = tune(live_map, interval=0.1, timeout=0.5)
    doubles: dict[str, Breaking] = {}

    def drivers(tag_map: TagMap, device_id: str, settings: Settings | None = None) -> Driver:
        real = build_driver(tag_map, device_id, settings)
        if device_id in (BROKEN, ODD):
            doubles[device_id] = Breaking(real)
            return doubles[device_id]
        return real

    metrics = Metrics()
    async with collecting(mosquitto.port, "ninu/plant-1/stations/+/telemetry") as sub, \
            running(tm, tmp_path / "buffer.sqlite", metrics=metrics, drivers=drivers) as gw:
        broken = doubles[BROKEN]
        await wait_until(lambda: gw.pollers[BROKEN].connected and _count(
            metrics, "gateway_device_polls_total", device=BROKEN) > 2, 10, "the device polled")
        # 1. A library's bug on read, on every cycle: the device fails, again and again.
        broken.on_read = KeyError("slot 7")
        polls = {d: _count(metrics, "gateway_device_polls_total", device=d) for d in HEALTHY}
        since = time.monotonic()
        await wait_until(lambda: _count(metrics, "gateway_internal_errors_total",
                                        component=f"poller[{BROKEN}]") >= 3, 15, "three internal failures")
        # 2. The same at connect (asyncua's bare assert on a refused secure channel looks like this).
        broken.on_read, broken.on_connect = None, AssertionError()
        before = _count(metrics, "gateway_internal_errors_total", component=f"poller[{BROKEN}]")
        await wait_until(lambda: _count(metrics, "gateway_internal_errors_total",
                                        component=f"poller[{BROKEN}]") >= before + 2, 15, "connect failures")
        elapsed = time.monotonic() - since
        health = gw.health()[1]
        assert "internal error AssertionError" in str(health["devices"][BROKEN]["last_error"])  # type: ignore[index]
        # Every other device went on at its rate meanwhile.
        for d in HEALTHY:
            done = _count(metrics, "gateway_device_polls_total", device=d) - polls[d]
            assert done >= 0.7 * elapsed / 0.1, f"{d}: {done} polls in {elapsed:.1f}s"
        # 3. Fixed: it recovers by itself.
        broken.on_connect = None
        await wait_until(lambda: gw.pollers[BROKEN].connected and gw.pollers[BROKEN].last_error is None, 40,
                         "the device back")
        # 4. A value no payload can carry (bytes where a temperature should be): the pipeline fails on the
        # batch, and keeps its readings, that one bad with the reason, the others as they were read.
        doubles[ODD].odd_value = ("motor_temperature", b"\xff")
        await wait_until(lambda: _odd(sub.messages), 10, "the batch delivered as telemetry")
        await wait_until(lambda: _count(metrics, "gateway_internal_errors_total", component="pipeline") >= 3, 10,
                         "several batches contained")
        doubles[ODD].odd_value = None
        bad = [r for m in sub.messages if m.data.get("asset_id") == "filling-1" for r in m.data["readings"]
               if r["quality"] == "bad"]  # type: ignore[union-attr]
        assert any("internal error KeyError" in r["reason"] for r in bad), bad[:3]
        assert any("internal error AssertionError" in r["reason"] for r in bad), bad[:3]
    lines = _lines(json_log)
    traces = [line for line in lines if line.get("event") == "device failed with an internal error"]
    # Each distinct error's traceback once per outage, however often it repeated (3+ and 2+ times).
    assert [t["error"] for t in traces] == ["KeyError: 'slot 7'", "AssertionError"], traces
    assert all("Traceback" in str(t["exception"]) for t in traces)
    pipeline = [line for line in lines if str(line.get("event", "")).startswith("pipeline failed on a batch")]
    assert len(pipeline) == 1, pipeline  # once for this error, however many batches it hit
    assert "bytes" in str(pipeline[0]["error"]) and "Traceback" in str(pipeline[0]["exception"])


def _odd(messages: list[Message]) -> bool:
    """labeling-1's telemetry with motor_temperature bad (the bytes), and its other tags good."""
    for m in messages:
        if m.data.get("asset_id") != "labeling-1":
            continue
        readings = {r["tag"]: r for r in m.data["readings"]}  # type: ignore[union-attr]
        odd = readings.get("motor_temperature")
        if odd is not None and odd["quality"] == "bad" and "type bytes" in odd["reason"]:
            return any(r["quality"] == "good" for t, r in readings.items() if t != "motor_temperature")
    return False
