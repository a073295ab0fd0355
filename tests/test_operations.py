"""Operations: sd_notify on a real socket, the watchdog, /healthz, /metrics, SIGTERM, SIGHUP, the unit."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest

from gateway.brokers import Mosquitto
from gateway.sdnotify import Notifier
from gateway.tagmap import TagMap
from simulators.stations import Station

from .conftest import ROOT
from .helpers import collecting, plant_file, running, tune, wait_until

pytestmark = pytest.mark.integration


class NotifySocket:
    """What systemd listens on: a datagram socket, read from a thread so a blocked loop cannot hide pings."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def lines(self, prefix: str) -> list[float]:
        return [t for t, line in self.messages if line.startswith(prefix)]

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "EDGE_GATEWAY_BUFFER_PATH": str(tmp_path / "buffer.sqlite"),
            "EDGE_GATEWAY_LOG_FORMAT": "json", "EDGE_GATEWAY_HTTP_ADDRESS": "127.0.0.1:0", **extra}


async def _spawn(config: Path, env: dict[str, str], cwd: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "run", "--config", str(config), env=env, cwd=cwd,
        stderr=asyncio.subprocess.PIPE,
    )


async def _stop(proc: asyncio.subprocess.Process) -> str:
    """SIGTERM by pid; the gateway must be gone within 10 s (systemd's TimeoutStopSec is 15)."""
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, err.decode()
    print(f"SIGTERM to exit: {time.monotonic() - sent:.2f}s")
    return err.decode()


async def test_ready_watchdog_stopping_on_a_real_notify_socket(
    tmp_path: Path, stations: dict[str, Station], mosquitto: Mosquitto
) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        env = _env(tmp_path, NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="400000")
        proc = await _spawn(plant_file(tmp_path, mqtt_port=mosquitto.port, stations=stations), env, tmp_path)
        await wait_until(lambda: len(notify.lines("WATCHDOG=1")) >= 4, 15, "watchdog pings")
        err = await _stop(proc)
        await wait_until(lambda: bool(notify.lines("STOPPING=1")), 5, "STOPPING=1")
    finally:
        notify.close()
    ready, pings, stopping = notify.lines("READY=1"), notify.lines("WATCHDOG=1"), notify.lines("STOPPING=1")
    assert len(ready) == 1 and len(stopping) == 1
    assert ready[0] < stopping[0]
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    assert max(gaps) < 0.4, f"pings at half the watchdog interval: {gaps}"
    assert '"event": "gateway stopped"' in err
    assert any(line.startswith("STATUS=") for _, line in notify.messages)


async def test_blocked_loop_stops_the_watchdog_pings(tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    notifier = Notifier(notify.path, "200000")  # 0.2 s: pings every 0.1 s
    task = asyncio.create_task(notifier.watchdog_loop())
    try:
        await wait_until(lambda: len(notify.lines("WATCHDOG=1")) >= 3, 5, "pings")
        blocked_from = time.monotonic()
        time.sleep(1.0)  # a blocked event loop: the pings must stop, so systemd would restart us
        blocked_to = time.monotonic()
        await wait_until(lambda: bool([t for t in notify.lines("WATCHDOG=1") if t > blocked_to]), 5, "pings again")
    finally:
        task.cancel()
        notifier.close()
        notify.close()
    during = [t for t in notify.lines("WATCHDOG=1") if blocked_from + 0.05 < t < blocked_to]
    assert during == [], "no ping while the loop is blocked"


async def test_healthz_turns_503_when_broker_and_devices_are_gone(
    live_map: TagMap, stations: dict[str, Station], mosquitto: Mosquitto, tmp_path: Path
) -> None:
    tm = tune(live_map, interval=0.1, timeout=0.2)
    async with running(tm, tmp_path / "b.sqlite") as gw:
        assert gw.http is not None
        port = gw.http.port
        await wait_until(lambda: all(p.connected for p in gw.pollers.values()), 10, "devices up")
        await wait_until(lambda: bool(gw.publisher and gw.publisher.connected), 10, "broker up")
        status, body = await http_get(port, "/healthz")
        report = orjson.loads(body)
        assert status == 200 and report["status"] == "ok", report
        mosquitto.stop()
        await wait_until(lambda: not gw.publisher.connected, 10, "broker loss noticed")  # type: ignore[union-attr]
        status, body = await http_get(port, "/healthz")
        assert status == 200 and orjson.loads(body)["status"] == "degraded", "buffering is still doing the job"
        for s in stations.values():
            await s.stop()
        await wait_until(lambda: not any(p.connected for p in gw.pollers.values()), 10, "devices gone")
        status, body = await http_get(port, "/healthz")
        report = orjson.loads(body)
        assert status == 503 and report["status"] == "down", report
        assert report["broker"]["connected"] is False
        assert all(d["connected"] is False and d["last_error"] for d in report["devices"].values())
        assert report["buffer"]["rows"] >= 0
        assert (await http_get(port, "/nope"))[0] == 404
        mosquitto.start()


async def test_metrics_pass_promtool(live_map: TagMap, tmp_path: Path) -> None:
    async with running(tune(live_map, interval=0.1), tmp_path / "b.sqlite") as gw:
        assert gw.http is not None
        await wait_until(lambda: gw.metrics.polls.labels("filling-1-plc")._value.get() >= 3, 10, "polls")
        await asyncio.sleep(2.5)  # one round of buffer stats
        status, body = await http_get(gw.http.port, "/metrics")
    assert status == 200
    text = body.decode()
    for name in ("gateway_device_polls_total", "gateway_device_errors_total", "gateway_device_poll_duration_seconds_bucket",
                 "gateway_device_connected", "gateway_readings_total", "gateway_buffer_rows", "gateway_buffer_bytes",
                 "gateway_buffer_oldest_age_seconds", "gateway_buffer_drops_total", "gateway_mqtt_publishes_total",
                 "gateway_mqtt_inflight", "gateway_mqtt_connected", "gateway_mqtt_reconnects_total",
                 "gateway_alarms_active", "gateway_build_info"):
        assert name in text, name
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus); .ci/run installs it")
    result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


async def test_sigterm_under_load_loses_nothing(
    tmp_path: Path, stations: dict[str, Station], mosquitto: Mosquitto, plant_map: TagMap
) -> None:
    config = plant_file(tmp_path, mqtt_port=mosquitto.port, stations=stations, interval="50ms")
    prefix = plant_map.mqtt.topic_prefix
    async with collecting(mosquitto.port, f"{prefix}/+/+/telemetry", persistent=True) as sub:
        proc = await _spawn(config, _env(tmp_path), tmp_path)
        await wait_until(lambda: len(sub.messages) >= 200, 20, "load")
        await _stop(proc)
        with sqlite3.connect(tmp_path / "buffer.sqlite") as db:
            last = db.execute("SELECT seq FROM sqlite_sequence WHERE name='outbox'").fetchone()[0]
            left = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
        proc = await _spawn(config, _env(tmp_path), tmp_path)
        try:
            received = lambda: {int(m.data["seq"]) for m in sub.messages}  # noqa: E731
            await wait_until(lambda: received() >= set(range(1, last + 1)), 20, f"every seq up to {last}")
            await wait_until(lambda: max(received()) > last + 10, 20, "the second run publishing")
        finally:
            await _stop(proc)
    print(f"SIGTERM under load: {last} messages committed by the first run, {left} still buffered at exit, "
          f"all {last} received after the restart")


async def test_sighup_reloads_a_good_map_and_keeps_a_running_one_on_a_bad_map(
    tmp_path: Path, stations: dict[str, Station], mosquitto: Mosquitto, plant_map: TagMap
) -> None:
    config = plant_file(tmp_path, mqtt_port=mosquitto.port, stations=stations, interval="100ms")
    good = config.read_text()
    prefix = plant_map.mqtt.topic_prefix
    async with collecting(mosquitto.port, f"{prefix}/+/+/telemetry") as sub:
        proc = await _spawn(config, _env(tmp_path), tmp_path)
        try:
            await wait_until(lambda: len(sub.messages) >= 20, 20, "telemetry")
            config.write_text(good.replace("type: uint32, word_order: big", "type: uint33"))  # broken
            os.kill(proc.pid, signal.SIGHUP)
            n = len(sub.messages)
            await wait_until(lambda: len(sub.messages) >= n + 20, 10, "polling goes on after a bad reload")
            # A good map without the powder line: that station stops reporting, the others go on.
            config.write_text(good.replace("  - {id: powder-1,", "  # - {id: powder-1,"))
            os.kill(proc.pid, signal.SIGHUP)
            await asyncio.sleep(1.0)
            n = len(sub.messages)
            await wait_until(lambda: len(sub.messages) >= n + 20, 10, "polling after a good reload")
            assert all(m.data["asset_id"] != "powder-1" for m in sub.messages[n:])
        finally:
            err = await _stop(proc)
    assert "tag map reload refused, the running map stays" in err and "uint33" in err, err
    assert '"event": "tag map reloaded"' in err
    seqs = sorted({int(m.data["seq"]) for m in sub.messages})
    assert seqs == list(range(seqs[0], seqs[-1] + 1)), "no message lost across reloads"


def test_unit_file_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed; .ci/run installs systemd")
    unit = (ROOT / "systemd" / "edge-gateway.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "DynamicUser=yes" in unit
    exe = shutil.which("edge-gateway") or str(Path(sys.executable).parent / "edge-gateway")
    path = tmp_path / "edge-gateway.service"
    path.write_text(unit.replace("/opt/edge-gateway/bin/edge-gateway", exe))
    result = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
