"""The delivery promise under the faults a plant has: long broker outages, a broker restarted in the
middle of a drain, the gateway killed with SIGKILL mid-drain and mid-commit.

Every test counts what was sent (the buffer's seq), what arrived (deduplicated by seq), the
duplicates and the drops, and prints the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.brokers import Mosquitto
from gateway.tagmap import TagMap
from simulators.stations import Station

from .helpers import (
    Collector,
    Message,
    check_delivery,
    collecting,
    plant_file,
    running,
    total,
    tune,
    validate,
    wait_until,
)

pytestmark = pytest.mark.integration
OUTAGE = 6  # seconds
MID_COMMIT_KILLS = 3


def sequenced(sub: Collector) -> list[Message]:
    """Messages that carry a seq: telemetry, events and alerts."""
    return [m for m in sub.messages if isinstance(m.data, dict) and "seq" in m.data]


def drops(gw: Gateway) -> float:
    return total(gw.metrics.drops)


async def test_long_outage_drains_while_live_data_flows_and_survives_a_broker_restart(
    live_map: TagMap, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Five stations polled at 20 Hz; the broker is down 6 s, comes back, is restarted while the
    backlog drains, and comes back again. Everything arrives, live state is not queued behind the
    backlog, and polling never pauses."""
    tm = tune(live_map, interval=0.05, reconnect_max=0.3)
    tm = tm.model_copy(update={"mqtt": tm.mqtt.model_copy(update={"max_inflight": 8})})
    prefix = tm.mqtt.topic_prefix
    loop = asyncio.get_running_loop()
    async with collecting(mosquitto.port, f"{prefix}/#", persistent=True) as sub, \
            running(tm, tmp_path / "b.sqlite") as gw:
        pub = gw.publisher
        assert pub is not None
        await wait_until(lambda: len(sequenced(sub)) >= 50, 10, "telemetry before the outage")
        first = min(int(m.data["seq"]) for m in sequenced(sub))  # type: ignore[call-overload]
        mosquitto.stop()
        down_at = loop.time()
        await wait_until(lambda: not pub.connected, 10, "the gateway to notice the outage")
        await asyncio.sleep(max(0.0, OUTAGE - (loop.time() - down_at)))
        backlog = pub.buffer.rows
        last_before = pub.buffer.next_seq - 1
        polls_before = total(gw.metrics.polls)
        assert backlog >= 5 * 20 * OUTAGE * 0.6, f"only {backlog} buffered in {OUTAGE} s of 5 stations at 20 Hz"

        mosquitto.start()
        up_at = loop.time()
        n_before = len(sub.messages)
        # Restart the broker while the backlog drains.
        await wait_until(lambda: len(sequenced(sub)) > 50 + backlog // 4, 30, "a quarter of the backlog")
        in_buffer = pub.buffer.rows
        mosquitto.stop()
        assert in_buffer > backlog // 4, f"the drain had nearly ended ({in_buffer} rows left) before the restart"
        await wait_until(lambda: not pub.connected, 10, "the gateway to notice the restart")
        mosquitto.start()
        await wait_until(lambda: any(int(m.data["seq"]) >= last_before for m in sequenced(sub)),  # type: ignore[call-overload]
                         60, "the whole backlog")
        drained_at = loop.time()
        polls_after = total(gw.metrics.polls)
        last = pub.buffer.next_seq - 1
        await wait_until(lambda: any(int(m.data["seq"]) >= last for m in sequenced(sub)),  # type: ignore[call-overload]
                         20, "live data after the backlog")
        assert drops(gw) == 0, "nothing may be dropped while the buffer has room"

    unique, dupes = check_delivery(sequenced(sub), first, last)
    # Live state during the drain: retained snapshots are published before backlog rows, on
    # every page of the drain, so each station's state arrived before the backlog was through.
    during = sub.messages[n_before:]
    last_backlog_at = next(m.received for m in during
                           if "seq" in m.data and int(m.data["seq"]) >= last_before)  # type: ignore[call-overload]
    fresh_states = {m.topic for m in during if m.topic.endswith("/state") and m.received < last_backlog_at}
    assert len(fresh_states) == len(tm.assets), f"state of every station during the drain: {sorted(fresh_states)}"
    for m in during:
        if m.topic.endswith("/state"):
            validate("state", m.data)
    # Polling never paused: readings of the outage and of the drain are all there, at the poll rate.
    polled = polls_after - polls_before
    drain_s = drained_at - up_at
    assert polled >= 5 * drain_s / 0.05 * 0.5, f"{polled} polls in a {drain_s:.1f} s drain: polling slowed down"
    live_rate = 5 / 0.05
    print(f"outage {OUTAGE} s + restart mid-drain: sent {first}..{last} ({last - first + 1}), received {unique} unique,"
          " "
          f"{dupes} duplicates, 0 drops; backlog {backlog} drained in {drain_s:.1f} s "
          f"({backlog / drain_s:.0f} msg/s, {backlog / drain_s / live_rate:.1f}x the live rate of "
          f"{live_rate:.0f} msg/s)")


# -- SIGKILL ------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def gateway_process(config: Path, buffer: Path, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    env = {**os.environ, "EDGE_GATEWAY_BUFFER_PATH": str(buffer), "EDGE_GATEWAY_LOG_FORMAT": "json",
           "EDGE_GATEWAY_HTTP_ADDRESS": "off"}
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", "run", "--config", str(config),
                                                    env=env, cwd=config.parent, stdout=out, stderr=out)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def kill9(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGKILL)
    assert await asyncio.wait_for(proc.wait(), 10) == -signal.SIGKILL


def sent(buffer: Path) -> tuple[int, int]:
    """(last seq handed out, rows still waiting), read from the database the gateway left behind."""
    with contextlib.closing(sqlite3.connect(buffer)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        waiting = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
    return (row[0] if row else 0), waiting


async def test_sigkill_mid_commit_and_mid_drain_loses_no_reading(
    tmp_path: Path, stations: dict[str, Station], mosquitto: Mosquitto, plant_map: TagMap
) -> None:
    """The gateway process is killed with SIGKILL three times while it commits at 100 Hz, and once
    in the middle of draining an outage's backlog. Each restart goes on from the database: the
    subscriber (deduplicating by seq) misses nothing, and the database stays sound."""
    config = plant_file(tmp_path, mqtt_port=mosquitto.port, stations=stations, interval="50ms")
    buffer, log = tmp_path / "buffer.sqlite", tmp_path / "gateway.log"
    prefix = plant_map.mqtt.topic_prefix
    rng = random.Random(7)
    kills = 0
    try:
        async with collecting(mosquitto.port, f"{prefix}/+/+/+", persistent=True) as sub:
            # Mid-commit: five stations at 20 Hz are ~100 commits a second; kill at random moments.
            for _ in range(MID_COMMIT_KILLS):
                async with gateway_process(config, buffer, log) as proc:
                    n = len(sequenced(sub))
                    await wait_until(lambda n=n: len(sequenced(sub)) >= n + 20, 20, "the gateway publishing")
                    await asyncio.sleep(rng.uniform(0.0, 0.5))
                    await kill9(proc)
                    kills += 1
                sent(buffer)  # the database is sound after every kill
            # Mid-drain: an outage fills the buffer, the broker comes back, the gateway dies draining.
            async with gateway_process(config, buffer, log) as proc:
                n = len(sequenced(sub))
                await wait_until(lambda: len(sequenced(sub)) >= n + 20, 20, "the gateway publishing")
                mosquitto.stop()
                await asyncio.sleep(5)
                last_before, backlog = sent(buffer)
                mosquitto.start()
                await wait_until(lambda: any(int(m.data["seq"]) > last_before - backlog + 50  # type: ignore[call-overload]
                                             for m in sequenced(sub)), 30, "the drain to be under way")
                await kill9(proc)
                kills += 1
            _, left = sent(buffer)
            assert left > 0, "the kill came after the drain had finished: not a kill mid-drain"
            # The last run drains everything and stops cleanly.
            async with gateway_process(config, buffer, log) as proc:
                await wait_until(lambda: sent(buffer)[1] == 0, 30, "the buffer to drain")
                last, _ = sent(buffer)
                await wait_until(lambda: any(int(m.data["seq"]) >= last for m in sequenced(sub)),  # type: ignore[call-overload]
                                 30, "the last message")
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(proc.wait(), 15) == 0
    except BaseException:
        print(log.read_text()[-5000:])
        raise
    unique, dupes = check_delivery(sequenced(sub), 1, last)
    assert unique == last
    boots = {m.data["boot_id"] for m in sequenced(sub) if "boot_id" in m.data}
    assert len(boots) == kills + 1, "one boot per process, seq going on across all of them"
    print(f"{kills} SIGKILLs ({MID_COMMIT_KILLS} mid-commit, 1 mid-drain with {left} rows waiting): sent 1..{last}, "
          f"received {unique} unique, {dupes} duplicates, 0 lost; database integrity ok after every kill")


async def test_a_full_buffer_during_an_outage_drops_what_it_counts_and_recovers(
    live_map: TagMap, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """A 256 KiB buffer and five stations at 20 Hz behind a broker outage: the buffer fills, the gateway
    keeps polling and gives up the oldest telemetry; afterwards the subscriber's seq gaps are exactly
    the drops the metrics counted, and the gateway goes on without dropping anything more."""
    tm = tune(live_map, interval=0.05, reconnect_max=0.3)
    tm = tm.model_copy(update={"buffer": tm.buffer.model_copy(update={"max_size": 256 * 1024})})
    prefix = tm.mqtt.topic_prefix
    async with collecting(mosquitto.port, f"{prefix}/#", persistent=True) as sub, \
            running(tm, tmp_path / "b.sqlite") as gw:
        pub = gw.publisher
        assert pub is not None
        await wait_until(lambda: len(sequenced(sub)) >= 20, 10, "telemetry before the outage")
        first = min(int(m.data["seq"]) for m in sequenced(sub))  # type: ignore[call-overload]
        mosquitto.stop()
        await wait_until(lambda: drops(gw) >= 300, 60, "the buffer to fill and drop")
        size = (tmp_path / "b.sqlite").stat().st_size
        assert size <= 256 * 1024, f"the database grew to {size} bytes past its cap"
        polls = total(gw.metrics.polls)
        mosquitto.start()
        await wait_until(lambda: pub.buffer.rows < 20 and pub.connected, 30, "the backlog to drain")
        dropped = drops(gw)
        last = pub.buffer.next_seq - 1
        await wait_until(lambda: any(int(m.data["seq"]) >= last for m in sequenced(sub)),  # type: ignore[call-overload]
                         20, "the newest message")
        by_kind = {s.labels["kind"]: s.value for m in gw.metrics.drops.collect() for s in m.samples
                   if s.name.endswith("_total")}
        assert drops(gw) == dropped, "nothing more is dropped once the broker is back"
    got = {int(m.data["seq"]) for m in sequenced(sub)}  # type: ignore[call-overload]
    missing = set(range(first, last + 1)) - got
    assert len(missing) == dropped, f"{len(missing)} seqs missing, {dropped} drops counted"
    assert set(by_kind) == {"telemetry"}, f"only telemetry gives way while there is telemetry: {by_kind}"
    print(f"256 KiB buffer, broker down until 300 drops: sent {first}..{last}, {dropped:.0f} dropped "
          f"(telemetry, oldest first), {len(got & set(range(first, last + 1)))} received; "
          f"{polls:.0f} polls meanwhile, the buffer stayed at {size} bytes")
