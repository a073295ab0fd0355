"""Simulators -> gateway -> real Mosquitto -> subscriber: the whole path, end to end."""

from __future__ import annotations

import asyncio
import gc
import math
from pathlib import Path

import pytest

from gateway.brokers import Mosquitto
from gateway.tagmap import TagMap
from simulators.stations import Station

from .helpers import check_delivery, collecting, running, total, tune, validate, wait_until

pytestmark = pytest.mark.integration


def _expected(tag_map: TagMap, asset_id: str, tag: str, raw: object) -> object:
    t = tag_map.asset(asset_id).tags[tag]
    if t.enum is not None:
        return t.enum[raw]  # type: ignore[index]
    return raw


async def test_values_equal_simulator_for_every_type_and_order(
    live_map: TagMap, stations: dict[str, Station], mosquitto: Mosquitto, tmp_path: Path
) -> None:
    for s in stations.values():
        s.freeze()
    prefix = live_map.mqtt.topic_prefix
    async with collecting(mosquitto.port, f"{prefix}/#") as sub, running(live_map, tmp_path / "b.sqlite"):
        await wait_until(lambda: {m.data["asset_id"] for m in sub.leaf("telemetry")} >= {a.id for a in live_map.assets}
                         and len(sub.leaf("state")) >= len(live_map.assets), 15, "telemetry of every asset")
    layouts = {(t.type, t.byte_order, t.word_order) for a in live_map.assets for t in a.tags.values()}
    assert len(layouts) >= 10, "the plant map should exercise many types and orders"
    checked = 0
    for msg in sub.leaf("telemetry"):
        validate("telemetry", msg.data)
        asset = live_map.asset(str(msg.data["asset_id"]))
        station = stations[next(iter(asset.tags.values())).device]
        snap = station.snapshot()
        readings = msg.data["readings"]
        assert isinstance(readings, list)
        assert {r["tag"] for r in readings} == set(asset.tags) | set(asset.derived), "every tag in the first batch"
        readings = [r for r in readings if r["tag"] in asset.tags]  # derived values have tests of their own
        for r in readings:
            assert r["quality"] == "good", r
            want = _expected(live_map, asset.id, r["tag"], snap[r["tag"]])
            if isinstance(want, float):
                assert math.isclose(r["value"], want, rel_tol=1e-6, abs_tol=1e-9), (asset.id, r, want)
            else:
                assert r["value"] == want and type(r["value"]) is type(want), (asset.id, r, want)
            checked += 1
    assert checked >= sum(len(a.tags) for a in live_map.assets)
    for msg in sub.leaf("state"):
        validate("state", msg.data)
        assert msg.retain is False or msg.retain is True
    statuses = sub.leaf("status")
    for msg in statuses:
        validate("status", msg.data)
    assert [m.data["state"] for m in statuses][0] == "online"
    assert statuses[-1].data["state"] == "offline", "clean shutdown publishes offline"


async def test_broker_outage_loses_nothing_and_keeps_order(
    live_map: TagMap, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Mosquitto stops for 4 s while the gateway polls at 10 Hz; afterwards every seq arrives (the long
    outage, a broker restart mid-drain and a full buffer are in test_delivery.py)."""
    tm = tune(live_map, interval=0.1, reconnect_max=1.0)
    prefix = tm.mqtt.topic_prefix
    async with collecting(mosquitto.port, f"{prefix}/+/+/telemetry", persistent=True) as sub, \
            running(tm, tmp_path / "b.sqlite") as gw:
        assert gw.publisher is not None
        await wait_until(lambda: len(sub.messages) >= 20, 10, "telemetry before the outage")
        mosquitto.stop()
        outage_started = asyncio.get_running_loop().time()
        await wait_until(lambda: not gw.publisher.connected, 10, "the gateway to notice the outage")
        backlog_start = gw.publisher.buffer.rows
        await asyncio.sleep(4 - (asyncio.get_running_loop().time() - outage_started))
        backlog = gw.publisher.buffer.rows
        assert backlog - backlog_start >= 5 * 10 * 3, f"readings buffered during the outage: {backlog}"
        last_seq = gw.publisher.buffer.next_seq - 1
        mosquitto.start()
        await wait_until(lambda: any(m.data["seq"] >= last_seq for m in sub.messages), 30, "the backlog to drain")
        await wait_until(lambda: gw.publisher.buffer.rows < 20, 10, "the buffer to empty")
        assert total(gw.metrics.drops) == 0, "nothing may be dropped while the buffer has room"
    seqs = [int(m.data["seq"]) for m in sub.messages]  # type: ignore[call-overload]
    unique = sorted(set(seqs))
    _, dupes = check_delivery(sub.messages, unique[0], unique[-1])  # no gap in seq, in order per asset
    assert dupes <= tm.mqtt.max_inflight, f"{dupes} duplicates: more than at-least-once redelivery"
    assert len(unique) >= backlog, "everything buffered during the outage arrived"
    print(f"outage: {backlog} messages buffered, {len(unique)} seqs received "
          f"({unique[0]}..{unique[-1]}), {dupes} duplicates")


async def test_hanging_station_does_not_slow_the_others(
    live_map: TagMap, stations: dict[str, Station], tmp_path: Path
) -> None:
    tm = tune(live_map, interval=0.1, timeout=0.3)
    hung = "capping-1-plc"
    # Simulators and gateway share this process: a full collection of the heap a long test session
    # built up would stall every device at once, which says nothing about the hung one.
    gc.collect()
    gc.freeze()
    try:
        async with running(tm, tmp_path / "b.sqlite") as gw:
            polls = gw.metrics.polls

            def counts() -> dict[str, float]:
                return {d.id: polls.labels(d.id)._value.get() for d in tm.devices}

            await wait_until(lambda: min(counts().values()) >= 5, 10, "every device polling")
            before = counts()
            await asyncio.sleep(2.0)
            baseline = {k: v - before[k] for k, v in counts().items()}
            stations[hung].faults.hang = True
            before = counts()
            await asyncio.sleep(2.0)
            during = {k: v - before[k] for k, v in counts().items()}
            poller = gw.pollers[hung]
            assert poller.last_error is not None and "no reply" in poller.last_error
            stations[hung].faults.clear()
            await wait_until(lambda: gw.pollers[hung].last_error is None, 35, "the hung station to recover")
    finally:
        gc.unfreeze()
    print(f"polls in 2 s before the hang: {baseline}; during: {during}")
    assert during[hung] <= 1, "the hung station cannot complete polls"
    for dev, n in during.items():
        if dev != hung:
            assert n >= 0.9 * baseline[dev], f"{dev}: {n} polls while {hung} hung vs {baseline[dev]} before"


async def test_seq_and_backlog_survive_a_restart(
    live_map: TagMap, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Run 1 publishes, run 2 polls with the broker down and stops; run 3 delivers run 2's backlog."""
    tm = tune(live_map, interval=0.1, reconnect_max=0.5)
    buffer = tmp_path / "b.sqlite"
    prefix = tm.mqtt.topic_prefix
    async with collecting(mosquitto.port, f"{prefix}/+/+/telemetry", persistent=True) as sub:
        async with running(tm, buffer):
            await wait_until(lambda: len(sub.messages) >= 10, 10, "first run's telemetry")
        mosquitto.stop()
        async with running(tm, buffer) as gw:
            assert gw.publisher is not None
            await wait_until(lambda: gw.publisher.buffer.rows >= 50, 10, "a backlog with the broker down")
        offline_last = gw.publisher.buffer.next_seq - 1
        mosquitto.start()

        def received() -> set[int]:
            return {int(m.data["seq"]) for m in sub.messages}  # type: ignore[call-overload]

        async with running(tm, buffer) as gw:
            try:
                await wait_until(lambda: received() >= set(range(1, offline_last + 1)), 20,
                                 f"every seq up to {offline_last}, the last of the run without a broker")
            except AssertionError:
                raise AssertionError(f"missing: {sorted(set(range(1, offline_last + 1)) - received())}") from None
    seqs = sorted(received())
    assert seqs == list(range(1, seqs[-1] + 1)), "one gapless seq across three runs"
    boot_ids = {m.data["boot_id"] for m in sub.messages}
    assert len(boot_ids) == 3, "each run has its own boot_id"
