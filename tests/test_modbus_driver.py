"""The Modbus driver and the poller against the bundled station simulator, over real sockets."""

from __future__ import annotations

import asyncio
import math
import re

import pytest

from drivers import DeviceTimeout, DeviceUnreachable
from drivers.modbus.driver import ModbusTcpDriver
from drivers.registry import build_driver
from gateway.brokers import free_port
from gateway.demo import with_endpoints
from gateway.metrics import Metrics
from gateway.model import Quality
from gateway.poller import DeviceBatch, Poller
from gateway.tagmap import TagMap
from simulators.stations import Kind, Station

from .helpers import total, tune, wait_until

DEVICE = "filling-1-plc"


def _driver(plant_map: TagMap, station: Station, timeout: float = 0.3) -> ModbusTcpDriver:
    tm = tune(with_endpoints(plant_map, stations={DEVICE: station}), timeout=timeout)
    driver = build_driver(tm, DEVICE)
    assert isinstance(driver, ModbusTcpDriver)
    return driver


async def test_reads_every_tag_as_the_plc_holds_it(plant_map: TagMap, station: Station) -> None:
    station.freeze()
    driver = _driver(plant_map, station)
    await driver.connect()
    try:
        readings = await driver.read()
    finally:
        await driver.close()
    snap = station.snapshot()
    assert len(readings) == 22 and not readings.errors
    for r in readings:
        assert r.quality is Quality.GOOD, r
        want = snap[r.tag]
        if r.tag == "status":
            assert r.value == "running"
        elif isinstance(want, float):
            assert math.isclose(r.value, want, rel_tol=1e-6), r  # type: ignore[arg-type]
        else:
            assert r.value == want, r


async def test_exception_code_marks_tags_bad_and_keeps_the_connection(plant_map: TagMap, station: Station) -> None:
    driver = _driver(plant_map, station)
    await driver.connect()
    try:
        station.faults.exception = 4
        result = await driver.read()
        assert [e.kind for e in result.errors] == ["exception"] * 4
        assert all(r.quality is Quality.BAD and "exception 4 (server device failure)" in (r.reason or "")
                   for r in result)
        station.faults.clear()
        again = await driver.read()  # same connection: an exception reply is a valid reply
        assert all(r.quality is Quality.GOOD for r in again) and not again.errors
    finally:
        await driver.close()


async def test_timeout_drops_the_connection_before_the_next_request(plant_map: TagMap, station: Station) -> None:
    """A reply that arrives late must never be read as the answer to a later request."""
    station.freeze()
    driver = _driver(plant_map, station, timeout=0.2)
    await driver.connect()
    try:
        station.faults.delay = 0.5
        with pytest.raises(DeviceTimeout, match="no reply in 0.2s"):
            await driver.read()
        with pytest.raises(DeviceUnreachable, match="not connected"):
            await driver.read()
        station.faults.clear()
        await asyncio.sleep(0.6)  # the late replies are on their way to a closed socket
        await driver.connect()
        result = await driver.read()
    finally:
        await driver.close()
    snap = station.snapshot()
    assert {r.tag: r.value for r in result}["units_total"] == snap["units_total"]
    assert all(r.quality is Quality.GOOD for r in result)


async def test_unmapped_addresses_fail_only_their_request(plant_map: TagMap, station: Station) -> None:
    tm = with_endpoints(plant_map, stations={DEVICE: station})
    asset = tm.asset("filling-1")
    extra = asset.tags["error_count"].model_copy(update={"address": 200})  # beyond the PLC's map
    tags = {**asset.tags, "missing": extra}
    tm = tm.model_copy(update={"assets": [asset.model_copy(update={"tags": tags})]})
    driver = build_driver(tm, DEVICE)
    await driver.connect()
    try:
        result = await driver.read()
    finally:
        await driver.close()
    by_tag = {r.tag: r for r in result}
    assert by_tag["missing"].quality is Quality.BAD
    assert "exception 2 (illegal data address)" in (by_tag["missing"].reason or "")
    assert by_tag["units_total"].quality is Quality.GOOD
    assert len(result.errors) == 1


async def test_connection_refused_is_unreachable(plant_map: TagMap) -> None:
    dead = Station(DEVICE, Kind.FILLING, port=free_port())  # never started: nothing listens
    driver = _driver(plant_map, dead)
    with pytest.raises(DeviceUnreachable, match="cannot connect"):
        await driver.connect()


async def test_poller_marks_tags_bad_while_down_and_recovers(plant_map: TagMap, station: Station) -> None:
    tm = tune(with_endpoints(plant_map, stations={DEVICE: station}), interval=0.05, timeout=0.2)
    queue: asyncio.Queue[DeviceBatch | None] = asyncio.Queue()
    metrics = Metrics()
    driver = build_driver(tm, DEVICE)
    poller = Poller(driver=driver, interval=0.05, timeout=0.2, requests=4, out=queue, metrics=metrics,
                    backoff_cap=0.2)
    batches: list[DeviceBatch] = []

    async def drain() -> None:
        while True:
            item = await queue.get()
            assert item is not None
            batches.append(item)

    tasks = [asyncio.create_task(poller.run()), asyncio.create_task(drain())]
    try:
        await wait_until(lambda: poller.connected and len(batches) >= 3, 5, "first polls")
        port = station.port
        await station.stop()
        await wait_until(lambda: poller.last_error is not None, 5, "the outage to be noticed")
        bad = [b for b in batches if all(r.quality is Quality.BAD for r in b.readings)]
        assert bad and bad[-1].readings[0].reason
        assert metrics.device_connected.labels(DEVICE)._value.get() == 0
        assert total(metrics.poll_errors) >= 1
        restarted = Station(DEVICE, Kind.FILLING, port=port)
        await restarted.start()
        try:
            n = len(batches)
            await wait_until(lambda: poller.last_error is None and len(batches) > n + 2, 10, "recovery")
            assert all(r.quality is Quality.GOOD for r in batches[-1].readings)
        finally:
            await restarted.stop()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _wrong_function(frame: bytes) -> bytes:
    """Answer a holding-register read (FC 3) as if it were an input-register read (FC 4)."""
    return frame[:7] + bytes([4]) + frame[8:] if frame[7] == 3 else frame


def _one_register_short(frame: bytes) -> bytes:
    """Drop the last register of a register read and fix the lengths, so the frame is well formed."""
    mbap, fc, byte_count, data = frame[:7], frame[7], frame[8], frame[9:]
    if fc not in (3, 4):
        return frame
    pdu = bytes([fc, byte_count - 2]) + data[:-2]
    return mbap[:4] + (1 + len(pdu)).to_bytes(2, "big") + mbap[6:7] + pdu  # MBAP length: unit + PDU


@pytest.mark.parametrize(("mangle", "message"), [
    (_wrong_function, "function code 4 to a request with 3"),
    (_one_register_short, "byte count 70 instead of 72 (for 36 registers) in reply to unit 1 holding 0+36"),
])
async def test_reply_that_does_not_match_the_request_is_rejected(
    plant_map: TagMap, station: Station, mangle: object, message: str
) -> None:
    from drivers import BadReply

    driver = _driver(plant_map, station)
    await driver.connect()
    try:
        station.faults.mangle = mangle  # type: ignore[assignment]
        with pytest.raises(BadReply, match=re.escape(message)):
            await driver.read()
        with pytest.raises(DeviceUnreachable, match="not connected"):
            await driver.read()  # a bad reply drops the connection like a timeout does
    finally:
        station.faults.clear()
        await driver.close()


async def test_dropped_connection_is_reported_and_reconnects(plant_map: TagMap, station: Station) -> None:
    driver = _driver(plant_map, station)
    await driver.connect()
    try:
        assert len(await driver.read()) == 22
        station.drop_connections()
        await asyncio.sleep(0.05)
        with pytest.raises((DeviceUnreachable, DeviceTimeout)):
            await driver.read()
        await driver.connect()
        assert all(r.quality is Quality.GOOD for r in await driver.read())
    finally:
        await driver.close()
