"""The SQLite buffer: seq survives restarts and is never reused; rows leave only when deleted."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.buffer import Buffer


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
