"""The gateway against a hostile Modbus TCP server (tests/hostile_modbus.py), beside a healthy station.

No frame that should be rejected may ever give a good value; a PLC that closes or resets the
connection at once is an ordinary device failure; the process, and every other device, go on.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from drivers import DriverError
from drivers.modbus.decode import TagSpec, register_format
from drivers.modbus.driver import ModbusTcpDriver
from drivers.modbus.types import DataType, Order, Table
from gateway.brokers import Mosquitto, free_port
from gateway.metrics import Metrics
from gateway.poller import DeviceBatch, Poller
from simulators.stations import Station

from .helpers import collecting, wait_until
from .hostile_modbus import BITS, HONEST_LIMIT, ON_ACCEPT, REGISTERS, Hostile

pytestmark = pytest.mark.integration

TIMEOUT = 0.3
INTERVAL = 0.1


def _specs(table: Table) -> list[TagSpec]:
    if table is Table.DISCRETE:
        return [TagSpec(asset="bits", tag=f"b{i}", unit=1, table=table, address=i,
                        fmt=register_format(DataType.BOOL, None, Order.BIG, Order.BIG, None)) for i in range(BITS)]
    return [TagSpec(asset="regs", tag=f"r{i}", unit=1, table=table, address=i,
                    fmt=register_format(DataType.UINT16, None, Order.BIG, Order.BIG, None)) for i in range(REGISTERS)]


@pytest.mark.parametrize("kind", ON_ACCEPT)
async def test_close_or_reset_on_accept_is_a_device_failure_every_time(kind: str) -> None:
    """200 connections closed (FIN) or reset (RST) by the PLC as soon as they are accepted: every
    one a DriverError of the device, never anything else (before: a closed socket escaped connect)."""
    server = Hostile(seed=3, honest_share=0.0, only=(kind,), timeout=TIMEOUT)
    await server.start()
    driver = ModbusTcpDriver(device_id="refusing-plc", host="127.0.0.1", port=server.port, timeout=TIMEOUT,
                             tags=_specs(Table.HOLDING))
    kinds: dict[str, int] = {}
    try:
        for _ in range(200):
            with pytest.raises(DriverError) as err:  # anything else fails the test
                await driver.connect()
                await driver.read()
            kinds[err.value.kind] = kinds.get(err.value.kind, 0) + 1
            assert "closed" in err.value.detail or "reset" in err.value.detail, err.value.detail
    finally:
        await driver.close()
        await server.stop()
    assert server.served[kind] == 200
    assert kinds == {"unreachable": 200}


async def test_pollers_count_every_refused_connection_and_the_healthy_station_keeps_its_rate(
    station: Station,
) -> None:
    """The same, as the gateway runs devices: pollers of a FIN and an RST PLC with a short backoff, and a
    healthy station in the same loop, until each refusing PLC was tried 200 times."""
    servers = {kind: Hostile(seed=4, honest_share=0.0, only=(kind,)) for kind in ON_ACCEPT}
    for s in servers.values():
        await s.start()
    metrics = Metrics()
    healthy: list[float] = []

    class Sink:
        async def put(self, batch: DeviceBatch) -> None:
            if batch.device == "healthy" and batch.connected:
                healthy.append(time.monotonic())

    good = ModbusTcpDriver(device_id="healthy", host="127.0.0.1", port=station.port, timeout=TIMEOUT,
                           tags=_specs(Table.HOLDING))
    pollers = [Poller(driver=good, interval=INTERVAL, timeout=TIMEOUT, requests=1, out=Sink(), metrics=metrics)]
    for kind, s in servers.items():
        d = ModbusTcpDriver(device_id=kind, host="127.0.0.1", port=s.port, timeout=TIMEOUT, tags=_specs(Table.HOLDING))
        pollers.append(Poller(driver=d, interval=INTERVAL, timeout=TIMEOUT, requests=1, out=Sink(), metrics=metrics,
                              backoff_cap=0.01))
    tasks = [asyncio.create_task(p.run()) for p in pollers]
    started = time.monotonic()
    try:
        await wait_until(lambda: all(s.served[k] >= 200 for k, s in servers.items()), 60, "200 refusals each")
        for kind in ON_ACCEPT:
            await wait_until(lambda k=kind: _errors(metrics, k) >= servers[k].served[k], 5,  # type: ignore[misc]
                             f"{kind}: every refusal counted")
    finally:
        for p in pollers:
            p.stop()
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for s in servers.values():
            await s.stop()
    escaped = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
    assert not escaped, escaped
    for kind in ON_ACCEPT:
        assert metrics.registry.get_sample_value(
            "gateway_internal_errors_total", {"component": f"poller[{kind}]"}) in (None, 0.0)
    elapsed = time.monotonic() - started
    print(f"{elapsed:.1f}s for 200 FIN and 200 RST refusals; healthy station: {len(healthy)} cycles")
    assert len(healthy) >= 0.8 * elapsed / INTERVAL, f"healthy station: {len(healthy)} cycles in {elapsed:.1f}s"


def _errors(metrics: Metrics, device: str) -> float:
    return sum(s.value for m in metrics.poll_errors.collect() for s in m.samples
               if s.name.endswith("_total") and s.labels["device"] == device)


# -- 90 s of a hostile server beside a healthy station, in a gateway process -----------------------------
DURATION = float(os.environ.get("HOSTILE_SECONDS", "90"))
WINDOW = 10.0


def _map(tmp_path: Path, mqtt_port: int, station_port: int, regs_port: int, bits_port: int) -> Path:
    text = f"""
gateway: {{id: hostile-edge, site: test}}
mqtt: {{host: 127.0.0.1, port: {mqtt_port}, topic_prefix: hostile}}
devices:
  - {{id: healthy-plc, protocol: modbus_tcp, host: 127.0.0.1, port: {station_port}, unit: 1, interval: 100ms,
     timeout: 300ms}}
  - {{id: regs-plc, protocol: modbus_tcp, host: 127.0.0.1, port: {regs_port}, unit: 1, interval: 100ms,
     timeout: 300ms}}
  - {{id: bits-plc, protocol: modbus_tcp, host: 127.0.0.1, port: {bits_port}, unit: 1, interval: 100ms,
     timeout: 300ms}}
assets:
  - id: healthy
    kind: station
    device: healthy-plc
    tags:
      status: {{table: holding, address: 0, type: uint16}}
      error_count: {{table: holding, address: 1, type: uint16}}
  - id: regs
    kind: station
    device: regs-plc
    tags:
{"".join(f"      r{i}: {{table: holding, address: {i}, type: uint16}}{chr(10)}" for i in range(REGISTERS))}
  - id: bits
    kind: station
    device: bits-plc
    tags:
{"".join(f"      b{i}: {{table: discrete, address: {i}, type: bool}}{chr(10)}" for i in range(BITS))}
"""
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    return path


async def _scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    raw = (await reader.read()).decode()
    writer.close()
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in raw.partition("\r\n\r\n")[2].splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name, _, labels = name_labels.partition("{")
        pairs = frozenset(tuple(p.split("=", 1)) for p in labels.rstrip("}").replace('"', "").split(",") if p)
        out[(name, pairs)] = float(value)  # type: ignore[arg-type]
    return out


def _sum(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and want <= set(ls))


async def test_ninety_seconds_of_a_hostile_plc(tmp_path: Path, mosquitto: Mosquitto, station: Station) -> None:
    regs = Hostile(seed=11, timeout=TIMEOUT)
    bits = Hostile(seed=12, timeout=TIMEOUT)
    for s in (regs, bits):
        await s.start()
    http = free_port()
    env = {**os.environ, "EDGE_GATEWAY_BUFFER_PATH": str(tmp_path / "buffer.sqlite"),
           "EDGE_GATEWAY_LOG_FORMAT": "json", "EDGE_GATEWAY_HTTP_ADDRESS": f"127.0.0.1:{http}"}
    config = _map(tmp_path, mosquitto.port, station.port, regs.port, bits.port)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "run", "--config", str(config), env=env, cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out_lines: list[bytes] = []
    err_lines: list[bytes] = []

    async def pump(stream: asyncio.StreamReader, into: list[bytes]) -> None:
        while line := await stream.readline():
            into.append(line)

    assert proc.stdout is not None and proc.stderr is not None
    pumps = [asyncio.create_task(pump(proc.stdout, out_lines)), asyncio.create_task(pump(proc.stderr, err_lines))]
    windows: list[float] = []
    try:
        async with collecting(mosquitto.port, "hostile/stations/+/telemetry") as sub:
            await wait_until(lambda: any(m.data.get("asset_id") == "healthy" for m in sub.messages), 15,
                             "the healthy station's first telemetry")
            scraped = await _scrape(http)
            before = _sum(scraped, "gateway_device_polls_total", device="healthy-plc")
            for _ in range(int(DURATION / WINDOW)):
                await asyncio.sleep(WINDOW)
                assert proc.returncode is None, "the gateway exited"
                scraped = await _scrape(http)
                now = _sum(scraped, "gateway_device_polls_total", device="healthy-plc")
                windows.append(now - before)
                before = now
            # The end: honest replies only, so every bad one served has been answered and counted.
            for s in (regs, bits):
                s.honest_share = 1.0
            await asyncio.sleep(2 * TIMEOUT + 1.0)
            await wait_until(lambda: _good_after_last_bad(sub.messages, "regs")
                             and _good_after_last_bad(sub.messages, "bits"),
                             40, "good values again")  # within the backoff cap of 30 s
            scraped = await _scrape(http)
            messages = list(sub.messages)
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 15)
        await asyncio.gather(*pumps)
        for s in (regs, bits):
            await s.stop()
    assert proc.returncode == 0, b"".join(err_lines[-20:]).decode()

    # 1. The healthy station at its full rate in every 10 s window.
    print(f"healthy station polls per {WINDOW:g}s window: {windows}")
    assert all(w >= 0.95 * WINDOW / INTERVAL for w in windows), windows

    # 2. No value from a frame that should have been rejected ever published as good.
    readings = [(m.data["asset_id"], r) for m in messages for r in m.data["readings"]]  # type: ignore[union-attr]
    good = [(a, r) for a, r in readings if r["quality"] == "good"]
    forged = [(a, r) for a, r in good if (a == "regs" and not 0 <= r["value"] < HONEST_LIMIT)
              or (a == "bits" and r["value"] is not True)]
    assert not forged, forged[:5]
    assert any(a == "regs" for a, _ in good) and any(a == "bits" for a, _ in good)

    # 3. Every bad behaviour is one counted device failure with a precise reason, and none internal.
    for server, device in ((regs, "regs-plc"), (bits, "bits-plc")):
        counted = _sum(scraped, "gateway_device_errors_total", device=device)
        print(f"{device}: served {dict(server.served)}; counted failures {counted:g} of {server.bad_served} bad")
        assert counted == server.bad_served, (counted, dict(server.served))
        assert _sum(scraped, "gateway_device_errors_total", device=device, kind="internal") == 0
    reasons = {r["reason"].split(": ", 2)[-1].split(" in reply to")[0].split(" during ")[0]
               for a, r in readings if r["quality"] == "bad" and a in ("regs", "bits")}
    vague = [r for r in reasons if "busy" in r or r in ("", "error")]
    assert not vague, vague
    print(f"{len(reasons)} distinct reasons, e.g. {sorted(reasons)[:8]}")

    # 4. Every line the gateway wrote is JSON.
    lines = [line for line in out_lines + err_lines if line.strip()]
    not_json = []
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            not_json.append(line)
    assert not not_json, not_json[:5]
    assert lines, "the gateway logged nothing"


def _good_after_last_bad(messages: list[Any], asset: str) -> bool:
    """The asset's newest reading of every tag is good."""
    latest: dict[str, str] = {}
    for m in messages:
        if m.data.get("asset_id") == asset:
            for r in m.data["readings"]:
                latest[r["tag"]] = r["quality"]
    return bool(latest) and all(q == "good" for q in latest.values())
