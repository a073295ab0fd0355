"""A gateway process whose OPC-UA PLC refuses its certificate: the process runs on, every Modbus
station keeps its poll rate, /healthz and the tags say what to fix, every log line is JSON; once the
certificate is trusted on the PLC the device connects by itself, without a restart."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from gateway.brokers import Mosquitto, free_port
from simulators.stations import Station

from .helpers import STATION_DEVICES, collecting, plant_file, wait_until
from .test_hostile_modbus import _scrape, _sum
from .test_opcua_refusals import Pki, pki, plc  # noqa: F401 - the fixture, used by name

pytestmark = pytest.mark.integration


async def _health(port: int) -> dict[str, object]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    raw = await reader.read()
    writer.close()
    return json.loads(raw.partition(b"\r\n\r\n")[2])  # type: ignore[no-any-return]


async def test_a_plc_refusing_the_certificate_stops_nothing_else(
    pki: Pki, tmp_path: Path, stations: dict[str, Station], mosquitto: Mosquitto  # noqa: F811
) -> None:
    async with plc(pki, trusted=pki.trusted) as server:
        config = plant_file(tmp_path, mqtt_port=mosquitto.port, stations=stations,
                            reactors_endpoint=server.endpoint, interval="100ms")
        text = config.read_text().replace("    mode: subscribe            # or poll\n", (
            "    mode: subscribe\n"
            f"    security: {{mode: SignAndEncrypt, policy: Basic256Sha256, certificate: {pki.gateway.cert}, "
            f"private_key: {pki.gateway.key}, server_certificate: {pki.plc.cert}}}\n"), 1)
        assert "SignAndEncrypt" in text
        config.write_text(text)
        http = free_port()
        env = {**os.environ, "EDGE_GATEWAY_BUFFER_PATH": str(tmp_path / "buffer.sqlite"),
               "EDGE_GATEWAY_LOG_FORMAT": "json", "EDGE_GATEWAY_HTTP_ADDRESS": f"127.0.0.1:{http}"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "run", "--config", str(config), env=env, cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            async with collecting(mosquitto.port, "ninu/plant-1/reactors/reactor-a/state") as sub:
                health: dict[str, object] = {}

                async def refused() -> bool:
                    nonlocal health
                    try:
                        health = await _health(http)
                    except OSError:
                        return False
                    error = str(health["devices"]["reactors-plc"]["last_error"])  # type: ignore[index]
                    return "does not trust the gateway's certificate" in error

                await _until(refused, 20, "the refusal in /healthz")
                error = str(health["devices"]["reactors-plc"]["last_error"])  # type: ignore[index]
                assert pki.gateway.thumbprint in error and str(pki.gateway.cert) in error, error
                before = await _scrape(http)
                await asyncio.sleep(5.0)
                after = await _scrape(http)
                assert proc.returncode is None
                for device in STATION_DEVICES:
                    polls = (_sum(after, "gateway_device_polls_total", device=device)
                             - _sum(before, "gateway_device_polls_total", device=device))
                    assert polls >= 45, f"{device}: {polls} polls in 5 s at 100 ms"
                assert _sum(after, "gateway_device_errors_total", device="reactors-plc", kind="security") >= 1
                assert _sum(after, "gateway_internal_errors_total") == 0
                await wait_until(lambda: any(
                    "does not trust" in str(m.data.get("reasons", {}).get("temperature"))  # type: ignore[union-attr]
                    for m in sub.messages), 10, "the tags bad with the reason")
                shutil.copy(pki.gateway.cert, pki.trusted)  # what the PLC's administrator does

                async def connected() -> bool:
                    h = await _health(http)
                    return bool(h["devices"]["reactors-plc"]["connected"])  # type: ignore[index]

                await _until(connected, 40, "the device connected by itself")  # within its backoff (30 s cap)
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err.decode()[-2000:]
    lines = [line for line in (out + err).splitlines() if line.strip()]
    not_json = [line for line in lines if not _is_json(line)]
    assert lines and not not_json, not_json[:5]


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


async def _until(check: object, within: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.2)
