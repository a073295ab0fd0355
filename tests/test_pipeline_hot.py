"""The pipeline's per-value bookkeeping: readings counted by quality, state snapshots only on a change
(of value, quality or reason), status events; the payloads valid against the schemas."""

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

ASSET = "filling-1"
DEVICE = "filling-1-plc"


def _bare(tm: TagMap) -> TagMap:
    return tm.model_copy(update={"assets": [a.model_copy(update={"rules": [], "derived": {}}) for a in tm.assets]})


def _r(tag: str, value: object, quality: Quality = Quality.GOOD, reason: str | None = None,
       ts: float = 1.7e9) -> Reading:
    return Reading(ASSET, tag, value, quality, reason, None, ts)


def _count(metrics: Metrics, quality: str) -> float:
    return metrics.registry.get_sample_value("gateway_readings_total", {"asset": ASSET, "quality": quality}) or 0.0


async def test_counts_states_and_status_events(plant_map: TagMap, tmp_path: Path) -> None:
    committed: list[list[tuple[str, bytes]]] = []
    metrics = Metrics()
    async with Buffer(tmp_path / "b.sqlite") as buf:
        pipe = Pipeline(tag_map=_bare(plant_map), buffer=buf, queue=asyncio.Queue(), boot_id="0" * 32,
                        metrics=metrics, on_commit=committed.append)

        async def commit(*readings: Reading) -> list[tuple[str, bytes]]:
            await pipe.commit([DeviceBatch(DEVICE, list(readings))])
            return committed[-1]

        assert len(await commit(_r("status", "idle"), _r("units_total", 1), _r("error_count", 0))) == 1
        assert (_count(metrics, "good"), _count(metrics, "bad"), _count(metrics, "uncertain")) == (3, 0, 0)
        assert await commit(_r("status", "idle", ts=1.7e9 + 1), _r("units_total", 1)) == [], "nothing changed"
        # the same tag twice in one commit (two polls queued together): both compared with the last state
        assert len(await commit(_r("units_total", 1), _r("units_total", 2))) == 1
        state = orjson.loads(committed[-1][0][1])
        validate("state", state)
        assert state["values"]["units_total"] == 2
        assert await commit(_r("units_total", 2)) == []
        # a quality change alone, then a reason change alone, are changes
        assert len(await commit(_r("units_total", 2, Quality.UNCERTAIN, "code 2 not in enum"))) == 1
        assert len(await commit(_r("units_total", 2, Quality.UNCERTAIN, "another reason"))) == 1
        state = orjson.loads(committed[-1][0][1])
        validate("state", state)
        assert state["quality"]["units_total"] == "uncertain" and state["reasons"] == {"units_total": "another reason"}
        assert len(await commit(_r("status", "running"), _r("error_count", None, Quality.BAD, "timeout"))) == 1
        assert (_count(metrics, "good"), _count(metrics, "bad"), _count(metrics, "uncertain")) == (9, 1, 2)
        rows = await buf.fetch(0, 100)
    events = [orjson.loads(r.payload) for r in rows if r.topic.endswith("/events")]
    assert [(e["old_status"], e["new_status"]) for e in events] == [("idle", "running")]
    for e in events:
        validate("events", e)
    telemetry = [orjson.loads(r.payload) for r in rows if r.topic.endswith("/telemetry")]
    for t in telemetry:
        validate("telemetry", t)
    assert [len(t["readings"]) for t in telemetry] == [3, 2, 2, 1, 1, 1, 2]
    assert telemetry[-1]["readings"][1] == {"tag": "error_count", "value": None, "quality": "bad",
                                            "source_ts": None, "ts": "2023-11-14T22:13:20.000Z", "reason": "timeout"}
