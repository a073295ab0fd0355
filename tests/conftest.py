from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.brokers import Mosquitto
from gateway.demo import stations_for, with_endpoints
from gateway.tagmap import TagMap, load_tag_map
from simulators.reactors import ReactorServer
from simulators.stations import Kind, Station

ROOT = Path(__file__).resolve().parents[1]
PLANT = ROOT / "config" / "plant.yaml"


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A private Mosquitto on a free port, with persistence; tests may stop() and start() it."""
    workdir = tmp_path / "mosquitto"
    workdir.mkdir()
    broker = Mosquitto(workdir=workdir)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
async def station() -> AsyncIterator[Station]:
    """One filling station PLC (filling-1-plc) on a free port, seed 7."""
    s = Station("filling-1-plc", Kind.FILLING, seed=7)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


@pytest.fixture
def plant_map() -> TagMap:
    return load_tag_map(PLANT)


@pytest.fixture
async def stations(plant_map: TagMap) -> AsyncIterator[dict[str, Station]]:
    """The plant's station simulators, on free ports, keyed by device id."""
    sims = stations_for(plant_map, any_port=True)
    for s in sims.values():
        await s.start()
    try:
        yield sims
    finally:
        for s in sims.values():
            await s.stop()


def stations_only(tm: TagMap) -> TagMap:
    """The plant map without the reactors (OPC-UA has tests of its own)."""
    devices = [d for d in tm.devices if d.protocol == "modbus_tcp"]
    return tm.model_copy(update={"devices": devices, "assets": [a for a in tm.assets if a.kind == "station"]})


@pytest.fixture
def live_map(plant_map: TagMap, mosquitto: Mosquitto, stations: dict[str, Station]) -> TagMap:
    """The plant's stations pointed at the test broker and the simulators."""
    return with_endpoints(stations_only(plant_map), mqtt_port=mosquitto.port, stations=stations)


@pytest.fixture
async def reactors() -> AsyncIterator[ReactorServer]:
    """The reactor PLC simulator (OPC-UA) on a free port, running at 5x speed."""
    server = ReactorServer(time_scale=5.0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
