"""The console script as users run it: a subprocess, stopped by its pid."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.brokers import Mosquitto
from gateway.tagmap import TagMap
from simulators.reactors import ReactorServer
from simulators.stations import Station

from .conftest import PLANT, ROOT
from .helpers import collecting, plant_file, validate, wait_until

pytestmark = pytest.mark.integration


async def test_run_publishes_and_stops_cleanly_on_sigterm(
    tmp_path: Path, stations: dict[str, Station], mosquitto: Mosquitto, plant_map: TagMap
) -> None:
    reactors = ReactorServer()
    await reactors.start()
    try:
        await _run_and_stop(tmp_path, stations, mosquitto, plant_map, reactors)
    finally:
        await reactors.stop()


async def _run_and_stop(tmp_path: Path, stations: dict[str, Station], mosquitto: Mosquitto, plant_map: TagMap,
                        reactors: ReactorServer) -> None:
    config = plant_file(tmp_path, mqtt_port=mosquitto.port, stations=stations, reactors_endpoint=reactors.endpoint)
    env = {**os.environ, "EDGE_GATEWAY_BUFFER_PATH": str(tmp_path / "buffer.sqlite"),
           "EDGE_GATEWAY_LOG_FORMAT": "json",
           "EDGE_GATEWAY_HTTP_ADDRESS": "127.0.0.1:0"}
    prefix = plant_map.mqtt.topic_prefix
    async with collecting(mosquitto.port, f"{prefix}/#") as sub:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "run", "--config", str(config),
            env=env, cwd=tmp_path, stderr=asyncio.subprocess.PIPE,
        )
        try:
            tags = {a.id: set(a.tags) for a in plant_map.assets}  # derived values may still be warming up
            await wait_until(lambda: {m.data["asset_id"] for m in sub.leaf("state")
                                      if {q for t, q in m.data["quality"].items() if t in tags[m.data["asset_id"]]}
                                      == {"good"}} >= set(tags),
                             20, "good state of every asset of the plant from the subprocess")
        finally:
            with contextlib.suppress(ProcessLookupError):  # it may have died: its log says why
                os.kill(proc.pid, signal.SIGTERM)
            _, stderr = await asyncio.wait_for(proc.communicate(), 10)
            if proc.returncode != 0:
                print(f"gateway exited {proc.returncode}; its log:\n{stderr.decode()[-6000:]}")
        await wait_until(lambda: sub.leaf("status") and sub.leaf("status")[-1].data["state"] == "offline",
                         5, "offline status")
    assert proc.returncode == 0, stderr.decode()
    log = stderr.decode()
    assert '"event": "gateway stopped"' in log, log  # JSON log lines when not on a terminal
    for msg in sub.leaf("telemetry"):
        validate("telemetry", msg.data)
    assert (tmp_path / "buffer.sqlite").exists()


@pytest.mark.parametrize("broker", ["mosquitto", "embedded"])
def test_demo_shows_live_values(broker: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "--duration", "4", "--broker", broker],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "gateway edge-01 is online" in out
    for station in ("filling-1", "labeling-1", "capping-1", "packaging-1", "powder-1", "reactor-a", "reactor-c"):
        assert f"  {station} " in out, out
    assert "telemetry messages; poll-to-subscriber latency" in out


def test_check_exit_codes() -> None:
    ok = subprocess.run([sys.executable, "-m", "gateway", "check", str(PLANT)], capture_output=True, text=True)
    assert ok.returncode == 0 and "Modbus requests per cycle: 20" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "gateway", "check", str(ROOT / "tests/tagmaps/bad_count.yaml")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "bad_count.yaml:10: assets[0].tags.units_total" in bad.stderr
