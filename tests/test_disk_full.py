"""A full disk, on a real small filesystem (a tmpfs this test mounts; it skips, saying why, where it cannot).

The buffer gives up only what it must: eviction is sized by what the batch needs and by what the disk
holds (never by a fraction of a cap the disk cannot reach), strictly by priority (no event while
telemetry is left, no alarm transition while events or telemetry are), and the WAL is bounded so
that it cannot fill a nearly full disk by itself. Each test prints its figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.app import Gateway
from gateway.brokers import Mosquitto
from gateway.buffer import ALERT, EVENT, EVICT_SHARE, TELEMETRY, Buffer, Full, Message
from gateway.tagmap import TagMap
from simulators.reactors import ReactorServer
from simulators.stations import Station

from .helpers import Collector, check_delivery, collecting, plant_file, running, total, tune, wait_until
from .helpers import Message as Received

MiB = 1 << 20
# config/plant.yaml with its simulators (three reactors over OPC-UA, five stations over Modbus, at
# the map's own intervals) commits about 33 KB of payload a second (measured: 32.9 KB/s over 30 s,
# 4 minutes: 7.9 MB). The short variants below run faster and write at least as much.
PLANT_BYTES_PER_S = 33_000
SOAK_S = 240


# -- a real small filesystem -------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mounts tmpfs file systems of a given size in tmp_path (root only); unmounts them afterwards."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        if os.geteuid() != 0:
            pytest.skip(f"needs a real {size} filesystem: mounting a tmpfs needs root (.ci/run runs as root)")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"needs a real {size} filesystem, and mounting a tmpfs failed: {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(path)], check=False)


def free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int, name: str = "filler") -> Path:
    """Another process's file that leaves about ``leave`` bytes free on ``path``'s filesystem."""
    filler = path / name
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(4096, free(path) - leave))
    return filler


def ledger(db_path: Path) -> Counter[int]:
    """The buffer's count of dropped rows by priority, read as another process would."""
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return Counter({p: n for p, n in db.execute("SELECT priority, sum(rows) FROM dropped GROUP BY priority")})


def sizes(episodes: list[Full]) -> str:
    rows = sorted(sum(e.dropped.values()) for e in episodes)
    freed = sorted(e.freed for e in episodes)
    return (f"{len(episodes)} episodes of {rows[0]}..{rows[-1]} rows (median {rows[len(rows) // 2]}), "
            f"{freed[0] / 1024:.0f}..{freed[-1] / 1024:.0f} KiB")


# -- the buffer alone ----------------------------------------------------------------------------------

TELEMETRY_ROW = 3300  # bytes of a station's telemetry message in the plant map


def _batch(first: int, priorities: list[int], size: int = TELEMETRY_ROW) -> list[Message]:
    return [Message(first + i, f"t/{p}", random.randbytes(size // 2) * 2, "a", p) for i, p in enumerate(priorities)]


async def test_a_full_disk_gives_up_telemetry_only_in_small_episodes(tmpfs: Callable[[str], Path]) -> None:
    """An 8 MiB disk under a 1 GiB cap: the disk, not the cap, is the limit. Each episode frees what
    1/100 of what the disk holds needs, only telemetry goes, and every event and alert stays."""
    disk = tmpfs("8m")
    episodes: list[Full] = []
    sent: list[Message] = []
    async with Buffer(disk / "b.sqlite", max_size=1 << 30, on_full=episodes.append) as buf:
        for i in range(4000):  # 40 MB into 8 MiB
            pattern = [TELEMETRY] * 3 + ([EVENT] if i % 20 == 0 else []) + ([ALERT] if i % 50 == 0 else [])
            batch = _batch(buf.next_seq, pattern)
            await buf.append(batch, [("s/a", b"S" * 3000)], [("m", b"x")])
            sent += batch
        left = {r.seq for r in await buf.fetch(0, 1_000_000)}
        state = buf.disk
        assert state is not None
    assert state.limited_by == "disk" and state.limit < 8 * MiB
    assert episodes and {e.reason for e in episodes} == {"disk_full"}
    dropped = Counter[int]()
    for e in episodes:
        dropped.update(e.dropped)
        assert e.rounds == 1, f"one eviction was enough each time: {e}"
        assert e.limit is not None and e.freed <= e.limit // EVICT_SHARE + TELEMETRY_ROW, f"bigger than needed: {e}"
    lost = Counter(m.priority for m in sent if m.seq not in left)
    assert lost == dropped == ledger(disk / "b.sqlite"), "every dropped row is reported and counted, and only those"
    assert set(lost) == {TELEMETRY}, f"events and alerts outlast telemetry: {lost}"
    kept = sorted(m.seq for m in sent if m.priority == TELEMETRY and m.seq in left)
    assert kept == [m.seq for m in sent if m.priority == TELEMETRY][-len(kept):], "the oldest telemetry goes first"
    assert (disk / "b.sqlite-reserve").exists(), "the disk's limit left room for the cleanup: no reserve needed"
    print(f"8 MiB tmpfs, 1 GiB cap: limit {state.limit / MiB:.2f} MiB (disk), {len(left)} rows kept, "
          f"{sum(dropped.values())} telemetry dropped in {sizes(episodes)}; WAL bound {state.wal_limit >> 10} KiB")


async def test_eviction_goes_one_priority_at_a_time_and_tries_again_between(tmp_path: Path) -> None:
    """Telemetry with events and alerts, then events and alerts, then alerts only, into a 256 KiB cap:
    an event goes only once no telemetry is left, an alert only once neither is, and an episode that
    goes from one priority to the next tried the insert again in between."""
    episodes: list[Full] = []
    path = tmp_path / "b.sqlite"
    phases = [("telemetry, events, alerts", [TELEMETRY] * 4 + [EVENT] * 2 + [ALERT], 100),
              ("events and alerts", [EVENT] * 2 + [ALERT] * 2, 200),
              ("alerts", [ALERT] * 4, 400)]
    seen: dict[str, Counter[int]] = {}
    async with Buffer(path, max_size=256 * 1024, on_full=episodes.append) as buf:
        for name, pattern, batches in phases:
            seen[name] = Counter()
            for _ in range(batches):
                n = len(episodes)
                await buf.append(_batch(buf.next_seq, pattern, 1000))
                async with buf.db.execute("SELECT priority, count(*) FROM outbox GROUP BY priority") as cur:
                    waiting = Counter({p: c for p, c in await cur.fetchall()})
                for e in episodes[n:]:
                    seen[name].update(e.dropped)
                    if EVENT in e.dropped:
                        assert waiting[TELEMETRY] == 0, f"an event went while telemetry was left: {e}"
                    if ALERT in e.dropped:
                        assert waiting[TELEMETRY] == waiting[EVENT] == 0, f"an alert went while others were left: {e}"
                    if len(e.dropped) > 1:
                        assert e.rounds >= len(e.dropped), f"no new try between priorities: {e}"
    assert seen["telemetry, events, alerts"][TELEMETRY] > 0
    assert seen["events and alerts"][EVENT] > 0
    assert seen["alerts"][ALERT] > 0
    total_dropped = sum((c for c in seen.values()), Counter[int]())
    assert total_dropped == ledger(path)
    print("dropped by phase: " + "; ".join(f"{k}: {dict(v)}" for k, v in seen.items()))


async def test_rows_dropped_from_the_batch_itself_use_up_their_seqs(tmp_path: Path) -> None:
    """A batch larger than the cap whose last rows are telemetry: they go, are counted, and their
    seqs are not handed out again after a restart."""
    path = tmp_path / "b.sqlite"
    episodes: list[Full] = []
    async with Buffer(path, max_size=256 * 1024, on_full=episodes.append) as buf:
        await buf.append(_batch(1, [ALERT] * 5 + [TELEMETRY] * 2000, 400))
        left = [r.seq for r in await buf.fetch(0, 10_000)]
    assert left[:5] == [1, 2, 3, 4, 5], "the alerts stay"
    assert sum(sum(e.dropped.values()) for e in episodes) == 2005 - len(left) == ledger(path)[TELEMETRY]
    async with Buffer(path) as buf:
        assert buf.next_seq == 2006, "seqs of rows dropped from a batch are never handed out again"


async def test_live_traffic_on_a_nearly_full_disk_drops_nothing(tmpfs: Callable[[str], Path]) -> None:
    """4 MiB free, rows committed and deleted as fast as they come (the broker is up): the WAL stays
    within its bound, the disk never fills, nothing is dropped."""
    disk = tmpfs("16m")
    fill(disk, 4 * MiB)
    episodes: list[Full] = []
    wal = disk / "b.sqlite-wal"
    peak = 0
    async with Buffer(disk / "b.sqlite", max_size=1 << 30, on_full=episodes.append) as buf:
        written = 0
        while written < SOAK_S * PLANT_BYTES_PER_S:
            batch = _batch(buf.next_seq, [TELEMETRY])
            await buf.append(batch, [(f"s/{buf.next_seq % 8}", b"S" * 3000)], [("m", b"x")])
            await buf.delete([r.seq for r in await buf.fetch(0, 100)])
            written += len(batch[0].payload)
            peak = max(peak, wal.stat().st_size if wal.exists() else 0)
        state = buf.disk
        assert state is not None
    assert not episodes, f"dropped with the broker up: {episodes[:3]}"
    assert peak <= 2 * state.wal_limit, f"WAL peaked at {peak} bytes, its bound is {state.wal_limit}"
    print(f"4 MiB free: {written / MiB:.1f} MiB committed and deleted, 0 dropped; WAL bound "
          f"{state.wal_limit >> 10} KiB, peak {peak >> 10} KiB; reserve {state.reserve >> 10} KiB")


async def test_a_disk_another_process_fills(tmpfs: Callable[[str], Path]) -> None:
    """The disk's limit moves when something else takes the space (logs on the same partition): the
    reserve and the WAL's room are given back first, then telemetry goes, and nothing breaks."""
    disk = tmpfs("16m")
    episodes: list[Full] = []
    path = disk / "b.sqlite"
    async with Buffer(path, max_size=None, on_full=episodes.append) as buf:
        for _ in range(600):  # about 6 MB waiting
            await buf.append(_batch(buf.next_seq, [TELEMETRY] * 3 + [ALERT]))
        assert not episodes
        fill(disk, 256 * 1024)  # all but 256 KiB: less than the reserve and the WAL's room
        sent = 600 * 4
        for _ in range(300):
            await buf.append(_batch(buf.next_seq, [TELEMETRY] * 3 + [ALERT]))
            sent += 4
        left = await buf.fetch(0, 100_000)
        assert buf.disk is not None and buf.disk.limited_by == "disk"
    dropped = Counter[int]()
    for e in episodes:
        dropped.update(e.dropped)
    assert episodes and set(dropped) == {TELEMETRY}
    assert sum(dropped.values()) == sent - len(left) == sum(ledger(path).values())
    assert not (disk / "b.sqlite-reserve").exists(), "the disk really filled: the reserve gave its room"
    print(f"disk filled by another process: {sizes(episodes)}, {len(left)} rows kept, all alerts among them")


# -- the gateway: broker down, the disk fills, alarms meanwhile ---------------------------------------


def sequenced(sub: Collector) -> list[Received]:
    """Messages from the buffer, in arrival order; not the retained copies on .../last of batch and
    shift records (retained snapshots go out ahead of the rows still waiting)."""
    return [m for m in sub.messages if isinstance(m.data, dict) and "seq" in m.data and not m.topic.endswith("/last")]


def seqs(sub: Collector) -> set[int]:
    return {int(m.data["seq"]) for m in sequenced(sub)}  # type: ignore[call-overload]


def record(gw: Gateway) -> list[Full]:
    """The buffer's episodes, as the gateway gets them (counted and logged as well)."""
    assert gw.buffer is not None
    episodes: list[Full] = []
    report = gw.buffer.on_full
    assert report is not None

    def both(full: Full) -> None:
        episodes.append(full)
        report(full)

    gw.buffer.on_full = both
    return episodes


def dropped_by_kind(gw: Gateway) -> dict[str, float]:
    return {s.labels["kind"]: s.value for m in gw.metrics.drops.collect() for s in m.samples
            if s.name.endswith("_total") and s.value}


def gauge(gw: Gateway, name: str, **labels: str) -> float | None:
    for metric in gw.metrics.registry.collect():
        for s in metric.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


@pytest.mark.integration
async def test_broker_down_the_disk_fills_and_every_alarm_transition_arrives(
    live_map: TagMap, mosquitto: Mosquitto, stations: dict[str, Station], tmpfs: Callable[[str], Path]
) -> None:
    """The buffer on an 8 MiB tmpfs, the cap at its default 1 GiB, five stations at 20 Hz, the
    broker down. The disk fills; an alarm is raised and cleared meanwhile. Only telemetry is dropped,
    in episodes of about 1 % of what the disk holds; every alarm transition arrives once the broker is
    back; the subscriber's gaps are exactly the drops counted; health says the disk is the limit."""
    disk = tmpfs("8m")
    tm = tune(live_map, interval=0.05, reconnect_max=0.3)
    assert tm.buffer.max_size == 1 << 30
    prefix = tm.mqtt.topic_prefix
    async with collecting(mosquitto.port, f"{prefix}/#", persistent=True) as sub, \
            running(tm, disk / "b.sqlite") as gw:
        episodes = record(gw)
        await wait_until(lambda: len(sequenced(sub)) >= 20, 10, "telemetry before the outage")
        first = min(seqs(sub))
        mosquitto.stop()
        await wait_until(lambda: len(episodes) >= 5, 60, "the disk to fill")
        station = stations["filling-1-plc"]
        def transitions() -> float:
            return total(gw.metrics.alarm_transitions)

        before = transitions()
        station.faults.values = {"supply_voltage": 200.0}  # below 207 V for more than 5 s: SUPPLY_VOLTAGE
        await wait_until(lambda: transitions() >= before + 1, 20, "the alarm")
        station.faults.clear()
        await wait_until(lambda: transitions() >= before + 2, 20, "the alarm to clear")
        n = len(episodes)
        await wait_until(lambda: len(episodes) >= n + 5, 30, "more episodes after the alarm")
        await wait_until(lambda: gauge(gw, "gateway_buffer_limited_by", limit="disk") == 1, 10, "the limit metric")
        _, health = gw.health()
        report = health["buffer"]
        assert isinstance(report, dict)
        assert report["limit"] == "disk" and report["max_size"] == 1 << 30, report
        assert 0 < report["disk_free_bytes"] < 4 * MiB and report["limit_bytes"] < 8 * MiB, report
        assert gauge(gw, "gateway_buffer_disk_free_bytes") is not None
        waiting = gw.buffer.rows if gw.buffer else 0
        mosquitto.start()
        await wait_until(lambda: gw.buffer is not None and gw.buffer.rows < 50, 60, "the backlog to drain")
        last = gw.buffer.next_seq - 1 if gw.buffer else 0
        await wait_until(lambda: max(seqs(sub)) >= last, 20, "the newest message")
        by_kind = dropped_by_kind(gw)
        alarms = transitions()
        drops = total(gw.metrics.drops)
    alerts = [m for m in sequenced(sub) if m.topic.endswith("/alerts")]
    got = seqs(sub)
    missing = set(range(first, last + 1)) - got
    assert set(by_kind) == {"telemetry"}, f"only telemetry gives way while there is telemetry: {by_kind}"
    assert len(missing) == drops == sum(sum(e.dropped.values()) for e in episodes), "every gap is a counted drop"
    assert len({m.data["seq"] for m in alerts}) == alarms, "every alarm transition arrived"
    codes = [(m.data["code"], m.data["state"]) for m in alerts if m.topic.endswith("filling-1/alerts")]
    assert codes == [("SUPPLY_VOLTAGE", "active_unacked"), ("SUPPLY_VOLTAGE", "cleared_unacked")], codes
    assert all(e.reason == "disk_full" and e.limit is not None and e.freed <= e.limit // EVICT_SHARE + 8192
               for e in episodes), [e for e in episodes if e.freed > (e.limit or 0) // EVICT_SHARE + 8192][:3]
    print(f"8 MiB tmpfs, broker down: {sizes(episodes)} (1 % of the {(episodes[-1].limit or 0) / MiB:.2f} MiB the disk "
          f"holds), {drops:.0f} telemetry dropped, {waiting} rows waiting at the broker's return; "
          f"{alarms:.0f} alarm transitions raised meanwhile, all {len(alerts)} arrived; seqs {first}..{last}, "
          f"{len(missing)} gaps = {drops:.0f} drops counted; health: {report}")


# -- the gateway: broker up, a nearly full disk --------------------------------------------------------


async def _watch_wal(path: Path, peaks: list[int]) -> None:
    wal = path.with_name(path.name + "-wal")
    while True:
        with contextlib.suppress(OSError):
            peaks[0] = max(peaks[0], wal.stat().st_size)
        await asyncio.sleep(0.02)


async def _live_on_a_nearly_full_disk(tm: TagMap, mosquitto: Mosquitto, disk: Path, seconds: float,
                                      at_least: int) -> str:
    fill(disk, 4 * MiB)
    left = free(disk)
    prefix = tm.mqtt.topic_prefix
    path = disk / "b.sqlite"
    peaks = [0]
    async with collecting(mosquitto.port, f"{prefix}/#", persistent=True) as sub, running(tm, path) as gw:
        watcher = asyncio.create_task(_watch_wal(path, peaks))
        episodes = record(gw)
        await wait_until(lambda: len(sequenced(sub)) >= 10, 20, "the first messages")
        first = min(seqs(sub))
        started = time.monotonic()
        max_rows = 0
        while time.monotonic() - started < seconds:
            assert gw.buffer is not None and gw.publisher is not None
            max_rows = max(max_rows, gw.buffer.rows)
            assert gw.publisher.connected, "the broker stayed up"
            await asyncio.sleep(0.1)
        assert gw.buffer is not None
        last = gw.buffer.next_seq - 1
        await wait_until(lambda: max(seqs(sub)) >= last, 20, "the newest message")
        drops = total(gw.metrics.drops)
        state = gw.buffer.disk
        watcher.cancel()
    unique, dupes = check_delivery(sequenced(sub), first, last)
    written = sum(len(orjson.dumps(m.data)) for m in sequenced(sub)
                  if first <= int(str(m.data["seq"])) <= last)
    assert not episodes and drops == 0, f"dropped with the broker up: {episodes[:3]}"
    assert written >= at_least, f"only {written} bytes written, the plant map writes {at_least} in {SOAK_S} s"
    assert state is not None
    assert peaks[0] <= 2 * state.wal_limit, f"WAL peak {peaks[0]}, bound {state.wal_limit}"
    return (f"{left / MiB:.1f} MiB free, broker up, {seconds:.0f} s: seqs {first}..{last} all arrived "
            f"({unique} unique, {dupes} duplicates), {written / MiB:.1f} MB of payload, 0 drops, "
            f"at most {max_rows} rows waiting; "
            f"WAL bound {state.wal_limit >> 10} KiB, peak {peaks[0] >> 10} KiB; reserve {state.reserve >> 10} KiB, "
            f"limit {state.limit / MiB:.2f} MiB ({state.limited_by})")


@pytest.mark.integration
async def test_broker_up_a_nearly_full_disk_drops_nothing(
    live_map: TagMap, mosquitto: Mosquitto, tmpfs: Callable[[str], Path]
) -> None:
    """A filler leaves about 4 MiB; five stations at 20 Hz for 30 s, more bytes than the plant map
    writes in 4 minutes: nothing dropped, every seq arrives, the WAL stays within its bound."""
    tm = tune(live_map, interval=0.05)
    print(await _live_on_a_nearly_full_disk(tm, mosquitto, tmpfs("16m"), 30, SOAK_S * PLANT_BYTES_PER_S))


def _selected(request: pytest.FixtureRequest, marker: str) -> bool:
    expression = request.config.getoption("markexpr") or ""
    return marker in expression and f"not {marker}" not in expression


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(SOAK_S + 120)
async def test_broker_up_a_nearly_full_disk_drops_nothing_for_4_minutes_of_the_plant(
    request: pytest.FixtureRequest, plant_map: TagMap, mosquitto: Mosquitto, stations: dict[str, Station],
    tmpfs: Callable[[str], Path]
) -> None:
    """The same with the whole plant map (reactors and stations) at its own rates for 4 minutes."""
    if not _selected(request, "slow"):
        pytest.skip("a 4-minute soak: run it with -m slow")
    from gateway.demo import with_endpoints

    reactors = ReactorServer()
    await reactors.start()
    try:
        tm = with_endpoints(plant_map, mqtt_port=mosquitto.port, stations=stations,
                            reactors={"reactors-plc": reactors})
        print(await _live_on_a_nearly_full_disk(tm, mosquitto, tmpfs("16m"), SOAK_S,
                                                SOAK_S * PLANT_BYTES_PER_S * 9 // 10))
    finally:
        await reactors.stop()


# -- kill -9 in the middle of a disk-full episode ------------------------------------------------------


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


def logged_drops(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if "buffer full" in line:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


@pytest.mark.integration
async def test_kill9_during_disk_full_episodes_loses_nothing_uncounted(
    tmp_path: Path, stations: dict[str, Station], mosquitto: Mosquitto, plant_map: TagMap,
    tmpfs: Callable[[str], Path]
) -> None:
    """The gateway process on a full disk (3 MiB left on an 8 MiB tmpfs), evicting every few commits
    with the broker down, is killed with SIGKILL three times at random moments. The database stays
    sound; once the broker is back, every seq that never arrives is one the buffer's ledger counted."""
    disk = tmpfs("8m")
    fill(disk, 3 * MiB)  # the partition shared with other files: it fills in seconds
    config = plant_file(tmp_path, mqtt_port=mosquitto.port, stations=stations, interval="50ms")
    buffer, log = disk / "buffer.sqlite", tmp_path / "gateway.log"
    prefix = plant_map.mqtt.topic_prefix
    rng = random.Random(11)
    kills = 0
    try:
        async with collecting(mosquitto.port, f"{prefix}/+/+/+", persistent=True) as sub:
            mosquitto.stop()
            for _ in range(3):
                async with gateway_process(config, buffer, log) as proc:
                    n = len(logged_drops(log))

                    def episodes_since(n: int = n) -> bool:
                        return len(logged_drops(log)) >= n + 3

                    await wait_until(episodes_since, 60, "disk-full episodes")
                    await asyncio.sleep(rng.uniform(0.0, 0.5))
                    proc.send_signal(signal.SIGKILL)
                    assert await asyncio.wait_for(proc.wait(), 10) == -signal.SIGKILL
                    kills += 1
                ledger(buffer)  # integrity ok after every kill
            mosquitto.start()
            async with gateway_process(config, buffer, log) as proc:
                def waiting() -> int:
                    with contextlib.closing(sqlite3.connect(buffer)) as db:
                        return int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])
                await wait_until(lambda: waiting() < 50, 60, "the backlog to drain")
                with contextlib.closing(sqlite3.connect(buffer)) as db:
                    last = int(db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()[0])
                await wait_until(lambda: max(seqs(sub), default=0) >= last, 30, "the newest message")
                os.kill(proc.pid, signal.SIGTERM)
                assert await asyncio.wait_for(proc.wait(), 15) == 0
    except BaseException:
        print(log.read_text()[-5000:])
        raise
    counted = ledger(buffer)
    missing = set(range(1, last + 1)) - seqs(sub)
    logged = sum(sum(e["dropped"].values()) for e in logged_drops(log))
    assert set(counted) == {TELEMETRY}, f"only telemetry went: {counted}"
    assert len(missing) == sum(counted.values()), f"{len(missing)} seqs never arrived, {counted} counted"
    assert logged <= sum(counted.values())
    print(f"{kills} SIGKILLs during disk-full episodes: seqs 1..{last}, {len(missing)} never arrived = "
          f"{sum(counted.values())} counted in the buffer's ledger (logged before the kills: {logged}); "
          f"integrity ok after every kill")
