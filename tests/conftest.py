from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.brokers import Mosquitto
from gateway.demo import stations_for, with_endpoints
from gateway.tagmap import TagMap, load_tag_map
from simulators.stations import Station

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


@pytest.fixture
def live_map(plant_map: TagMap, mosquitto: Mosquitto, stations: dict[str, Station]) -> TagMap:
    """The plant map pointed at the test broker and the simulators."""
    return with_endpoints(plant_map, mqtt_port=mosquitto.port, stations=stations)
