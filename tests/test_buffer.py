"""The SQLite buffer: seq survives restarts and is never reused; rows leave only when deleted."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from gateway.buffer import ALERT, EVENT, TELEMETRY, Buffer, Full, Message, Row


def _rows(first: int, n: int, asset: str = "a") -> list[tuple[int, str, bytes, str]]:
    return [(s, f"t/{asset}", f"p{s}".encode(), asset) for s in range(first, first + n)]


async def test_seq_continues_after_restart_even_when_drained(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite"
    async with Buffer(path) as buf:
        assert buf.next_seq == 1
        await buf.append(_rows(1, 5))
        await buf.delete([1, 2, 3, 4, 5])
        assert buf.rows == 0
    async with Buffer(path) as buf:
        assert buf.next_seq == 6, "a drained buffer must not hand out seq 1 again"
        await buf.append(_rows(6, 2))
    async with Buffer(path) as buf:
        assert buf.rows == 2
        assert [r.seq for r in await buf.fetch(0, 10)] == [6, 7]


async def test_fetch_is_ordered_and_paged(tmp_path: Path) -> None:
    async with Buffer(tmp_path / "b.sqlite") as buf:
        await buf.append(_rows(1, 10))
        assert [r.seq for r in await buf.fetch(0, 4)] == [1, 2, 3, 4]
        assert [r.seq for r in await buf.fetch(4, 4)] == [5, 6, 7, 8]
        await buf.delete([6, 2])
        assert [r.seq for r in await buf.fetch(0, 100)] == [1, 3, 4, 5, 7, 8, 9, 10]
        assert buf.rows == 8
        row = (await buf.fetch(0, 1))[0]
        assert (row.topic, row.payload) == ("t/a", b"p1")


async def test_append_refuses_holes_in_seq(tmp_path: Path) -> None:
    async with Buffer(tmp_path / "b.sqlite") as buf:
        with pytest.raises(ValueError, match="next_seq"):
            await buf.append(_rows(3, 1))


async def test_state_is_one_row_per_topic_and_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite"
    async with Buffer(path) as buf:
        await buf.append([], [("s/a", b"1"), ("s/b", b"1")])
        await buf.append([], [("s/a", b"2")])
    async with Buffer(path) as buf:
        assert await buf.states() == [("s/a", b"2"), ("s/b", b"1")]


async def test_concurrent_appends_and_deletes_never_collide(tmp_path: Path) -> None:
    """The pipeline appends while the publisher deletes acknowledged rows, on one connection."""
    async with Buffer(tmp_path / "b.sqlite") as buf:

        async def writer() -> None:
            for _ in range(200):
                await buf.append(_rows(buf.next_seq, 3))

        async def deleter() -> None:
            done = 0
            while done < 600:
                rows = await buf.fetch(done, 50)
                await buf.delete([r.seq for r in rows])
                done = rows[-1].seq if rows else done
                await asyncio.sleep(0)

        await asyncio.gather(writer(), deleter())
        assert buf.rows == 0
        assert buf.next_seq == 601


async def test_wal_mode(tmp_path: Path) -> None:
    async with Buffer(tmp_path / "b.sqlite") as buf, buf.db.execute("PRAGMA journal_mode") as cur:
        assert (await cur.fetchone()) == ("wal",)


# -- a full buffer: eviction by priority --------------------------------------------------------------

CAP = 256 * 1024
PAYLOAD = b"x" * 400  # a telemetry message of a few dozen values


def _messages(first: int, priorities: list[int]) -> list[Message]:
    return [Message(first + i, f"t/{p}", PAYLOAD, "a", p) for i, p in enumerate(priorities)]


async def _fill(buf: Buffer, batches: int, pattern: list[int]) -> list[Message]:
    sent: list[Message] = []
    for _ in range(batches):
        batch = _messages(buf.next_seq, pattern)
        await buf.append(batch, [("s/a", b"state")], [("m:a", b"memory")])
        sent += batch
    return sent


async def _waiting(buf: Buffer) -> list[Row]:
    return await buf.fetch(0, 1_000_000)


async def test_cap_drops_oldest_telemetry_first_and_keeps_every_alert(tmp_path: Path) -> None:
    episodes: list[Full] = []
    async with Buffer(tmp_path / "b.sqlite", max_size=CAP, on_full=episodes.append) as buf:
        # Nine telemetry messages, one event and one alert per commit, far more than the cap holds.
        sent = await _fill(buf, 100, [TELEMETRY] * 9 + [EVENT, ALERT])
        left = await _waiting(buf)
        assert (tmp_path / "b.sqlite").stat().st_size <= CAP
    seqs = {r.seq for r in left}
    dropped = Counter[int]()
    for e in episodes:
        assert e.reason == "cap"
        dropped.update(e.dropped)
    by_priority = Counter(m.priority for m in sent if m.seq not in seqs)
    assert by_priority == dropped, "every dropped row is reported, and only those"
    assert by_priority[ALERT] == 0 and by_priority[EVENT] == 0, "alerts and events outlast telemetry"
    assert by_priority[TELEMETRY] > 0
    assert len(left) == buf.rows == len(sent) - sum(dropped.values())
    kept_telemetry = sorted(m.seq for m in sent if m.priority == TELEMETRY and m.seq in seqs)
    all_telemetry = [m.seq for m in sent if m.priority == TELEMETRY]
    assert kept_telemetry == all_telemetry[-len(kept_telemetry):], "the oldest telemetry goes first"
    assert len(episodes) < 100 // 3, "each episode frees room for several commits, not one at a time"


async def test_a_full_buffer_never_evicts_rows_the_publisher_holds(tmp_path: Path) -> None:
    """Rows fetched for sending and not deleted yet (in flight, or delivered and waiting for their
    delete) are not given up: a drop reported is a message that will never arrive."""
    episodes: list[Full] = []
    async with Buffer(tmp_path / "b.sqlite", max_size=CAP, on_full=episodes.append) as buf:
        await _fill(buf, 10, [TELEMETRY] * 10)
        held = [r.seq for r in await buf.fetch(0, 30)]  # the oldest rows, as a reconnected publisher takes them
        await buf.delete(held[:10])  # the first ten delivered and deleted; twenty still held
        sent = await _fill(buf, 100, [TELEMETRY] * 10)
        assert episodes, "the cap was reached"
        left = {r.seq for r in await _waiting(buf)}
    assert set(held[10:]) <= left, "held rows stay until they are deleted"
    dropped = sum(sum(e.dropped.values()) for e in episodes)
    assert dropped == 100 - 10 + len(sent) - len(left), "every dropped row is reported, and only those"


async def test_a_buffer_of_alerts_only_gives_up_the_oldest_alerts(tmp_path: Path) -> None:
    episodes: list[Full] = []
    async with Buffer(tmp_path / "b.sqlite", max_size=CAP, on_full=episodes.append) as buf:
        sent = await _fill(buf, 1000, [ALERT])
        left = [r.seq for r in await _waiting(buf)]
    assert episodes and all(set(e.dropped) == {ALERT} for e in episodes)
    assert left == [m.seq for m in sent][-len(left):], "the newest alerts stay, in order"
    assert sum(sum(e.dropped.values()) for e in episodes) == len(sent) - len(left)


async def test_a_batch_larger_than_the_cap_keeps_its_most_important_rows(tmp_path: Path) -> None:
    episodes: list[Full] = []
    async with Buffer(tmp_path / "b.sqlite", max_size=CAP, on_full=episodes.append) as buf:
        batch = _messages(1, [TELEMETRY] * 2000 + [ALERT] * 5)
        await buf.append(batch)
        left = await _waiting(buf)
        assert buf.next_seq == 2006, "seq numbers of dropped rows are never handed out again"
    assert [r.seq for r in left][-5:] == [2001, 2002, 2003, 2004, 2005]
    assert sum(sum(e.dropped.values()) for e in episodes) == 2005 - len(left)


async def test_disk_full_drops_by_priority_and_recovers_when_space_returns(tmp_path: Path) -> None:
    """A disk that fills (SQLite's page limit standing in for it) is not the configured cap."""
    episodes: list[Full] = []
    async with Buffer(tmp_path / "b.sqlite", max_size=None, on_full=episodes.append) as buf:
        await buf.db.execute("PRAGMA max_page_count = 64")  # 256 KiB of disk for the database
        await _fill(buf, 200, [TELEMETRY] * 4 + [ALERT])
        assert episodes and {e.reason for e in episodes} == {"disk_full"}
        before = len(episodes)
        rows = await _waiting(buf)
        await buf.delete([r.seq for r in rows])  # the broker is back: the backlog drains
        await _fill(buf, 20, [TELEMETRY] * 4 + [ALERT])
        assert len(episodes) == before, "space freed by the drain is used again, nothing more is dropped"
        await buf.set_max_size(None)  # more disk
        await _fill(buf, 200, [TELEMETRY] * 4 + [ALERT])
        assert len(episodes) == before
        assert buf.rows == 220 * 5


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


async def test_a_real_full_filesystem(tmp_path: Path) -> None:
    """The same, on a 16 MiB tmpfs that really runs out of space (WAL and database together)."""
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "16m"):
        pytest.skip("mounting a small tmpfs needs root; the page-limit test covers the policy")
    episodes: list[Full] = []
    try:
        async with Buffer(mnt / "b.sqlite", max_size=None, on_full=episodes.append) as buf:
            sent = await _fill(buf, 3500, [TELEMETRY] * 9 + [ALERT])
            left = {r.seq for r in await _waiting(buf)}
            assert episodes and {e.reason for e in episodes} == {"disk_full"}
            assert all(m.seq in left for m in sent if m.priority == ALERT), "no alert is lost"
            assert sum(sum(e.dropped.values()) for e in episodes) == len(sent) - len(left)
            waiting = sorted(left)
            for i in range(0, len(waiting), 64):  # the broker is back: the backlog drains, as PUBACKs come
                await buf.delete(waiting[i:i + 64])
            before = len(episodes)
            await _fill(buf, 20, [TELEMETRY] * 9 + [ALERT])
            assert len(episodes) == before
            assert (mnt / "b.sqlite-reserve").exists(), "the reserve is laid down again once there is room"
        async with Buffer(mnt / "b.sqlite") as buf, buf.db.execute("PRAGMA integrity_check") as cur:
            assert await cur.fetchone() == ("ok",)
    finally:
        subprocess.run(["umount", "--lazy", str(mnt)], check=False)


async def test_a_cancelled_delete_finishes_before_the_next_transaction_starts(tmp_path: Path) -> None:
    """The publisher's ack task is cancelled when the broker goes away, possibly mid-delete: the
    delete still ends (and keeps the write lock until it has), so the pipeline's next append is
    never a transaction started inside another."""
    async with Buffer(tmp_path / "b.sqlite") as buf:
        for _ in range(50):
            await buf.append(_rows(buf.next_seq, 200))
        waiting = [r.seq for r in await buf.fetch(0, 100_000)]
        for i in range(0, len(waiting), 500):
            delete = asyncio.create_task(buf.delete(waiting[i:i + 500]))
            await asyncio.sleep(0)  # let it start its transaction
            delete.cancel()
            if i % 1000:  # cancelled twice, as a task group and then its owner do
                await asyncio.sleep(0)
                delete.cancel()
            await buf.append(_rows(buf.next_seq, 3))  # must not fail with a nested BEGIN
            with pytest.raises(asyncio.CancelledError):
                await delete
        assert buf.next_seq == 50 * 200 + len(range(0, len(waiting), 500)) * 3 + 1


@pytest.mark.parametrize("one_call", [True, False], ids=["one-thread-call", "call-per-statement"])
async def test_a_transaction_commits_whole_or_not_at_all(tmp_path: Path, one_call: bool) -> None:
    """Both ways of running a transaction (one call on aiosqlite's thread, or one per statement)."""
    async with Buffer(tmp_path / "b.sqlite") as buf:
        buf.one_call = one_call
        await buf.append(_rows(1, 3), [("s/a", b"1")], [("k", b"v")])
        with pytest.raises(Exception, match="UNIQUE"):  # the state write would succeed; the row not
            await buf._committed(("INSERT INTO state(topic, payload, updated) VALUES (?, ?, ?)", [("s/b", b"2", 0)]),
                                 ("INSERT INTO outbox(seq, topic, payload, asset, created) VALUES (?, ?, ?, ?, ?)",
                                  [(2, "t/a", b"x", "a", 0.0)]))
        assert await buf.states() == [("s/a", b"1")]
        assert await buf.memory("") == {"k": b"v"}
        assert [r.payload for r in await buf.fetch(0, 10)] == [b"p1", b"p2", b"p3"]
        await buf.delete([1, 3])
        assert [r.seq for r in await buf.fetch(0, 10)] == [2] and buf.rows == 1


async def test_deleted_rows_are_not_zeroed_page_by_page(tmp_path: Path) -> None:
    """secure_delete=FAST: a Debian SQLite zeroes every freed page by default (20x the cost of a delete)."""
    async with Buffer(tmp_path / "b.sqlite") as buf:
        assert await buf._pragma("secure_delete") == 2
