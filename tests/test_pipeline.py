"""The pipeline: readings -> numbered telemetry rows and state snapshots, with deadbands."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from gateway.buffer import Buffer
from gateway.metrics import Metrics
from gateway.model import Quality, Reading
from gateway.pipeline import Pipeline
from gateway.poller import DeviceBatch
from gateway.tagmap import TagMap

from .helpers import validate


def _bare(tm: TagMap) -> TagMap:
    """The plant map without rules and derived values: telemetry mechanics only."""
    return tm.model_copy(update={"assets": [a.model_copy(update={"rules": [], "derived": {}}) for a in tm.assets]})


def _r(tag: str, value: object, quality: Quality = Quality.GOOD, ts: float = 1.7e9) -> Reading:
    return Reading("filling-1", tag, value, quality, None if quality is Quality.GOOD else "timeout: x", None, ts)


async def test_deadband_numbering_and_state(plant_map: TagMap, tmp_path: Path) -> None:
    committed: list[list[tuple[str, bytes]]] = []
    async with Buffer(tmp_path / "b.sqlite") as buf:
        pipe = Pipeline(tag_map=_bare(plant_map), buffer=buf, queue=asyncio.Queue(), boot_id="0" * 32,
                        metrics=Metrics(), on_commit=committed.append)
        # motor_temperature has deadband 0.2 in the plant map; units_total has none.
        steps = [
            [_r("motor_temperature", 40.0), _r("units_total", 1)],   # first values: both reported
            [_r("motor_temperature", 40.1), _r("units_total", 1)],   # within the deadband: only units
            [_r("motor_temperature", 40.3), _r("units_total", 2)],   # 0.3 from the last reported: both
            [_r("motor_temperature", None, Quality.BAD), _r("units_total", None, Quality.BAD)],  # quality
        ]
        for readings in steps:
            await pipe.commit([DeviceBatch("filling-1-plc", readings)])
        rows = await buf.fetch(0, 100)
    bodies = [orjson.loads(r.payload) for r in rows]
    assert [b["seq"] for b in bodies] == [1, 2, 3, 4]
    assert [[x["tag"] for x in b["readings"]] for b in bodies] == [
        ["motor_temperature", "units_total"], ["units_total"],
        ["motor_temperature", "units_total"], ["motor_temperature", "units_total"],
    ]
    for b in bodies:
        validate("telemetry", b)
    assert bodies[3]["readings"][0] == {
        "tag": "motor_temperature", "value": None, "quality": "bad", "reason": "timeout: x",
        "source_ts": None, "ts": "2023-11-14T22:13:20.000Z",
    }
    # a state snapshot whenever what telemetry reported changed: step 2 moved motor_temperature only
    # inside its deadband and units_total not at all, so the retained state stays as it was
    assert [len(c) for c in committed] == [1, 0, 1, 1]
    topic, payload = committed[-1][0]
    assert topic == "ninu/plant-1/stations/filling-1/state"
    state = orjson.loads(payload)
    validate("state", state)
    assert state["quality"]["units_total"] == "bad" and state["reasons"]["units_total"] == "timeout: x"


async def test_unchanged_readings_commit_no_state(plant_map: TagMap, tmp_path: Path) -> None:
    committed: list[list[tuple[str, bytes]]] = []
    async with Buffer(tmp_path / "b.sqlite") as buf:
        pipe = Pipeline(tag_map=_bare(plant_map), buffer=buf, queue=asyncio.Queue(), boot_id="0" * 32,
                        metrics=Metrics(), on_commit=committed.append)
        await pipe.commit([DeviceBatch("filling-1-plc", [_r("status", "running")])])
        await pipe.commit([DeviceBatch("filling-1-plc", [_r("status", "running", ts=1.7e9 + 1)])])
        assert buf.rows == 2, "telemetry without a deadband reports every poll"
    assert [len(c) for c in committed] == [1, 0]
