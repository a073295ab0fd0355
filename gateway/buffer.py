"""Store-and-forward buffer in SQLite (aiosqlite, WAL).

Every sequenced message (telemetry, events, alarm transitions) is committed here before it is
published and deleted only after the broker's PUBACK. Each row has a priority (telemetry 0, events 1,
alerts 2) that decides what a full buffer gives up first. ``seq`` is the row's primary key with
AUTOINCREMENT, so it is never reused, survives restarts and has no gaps: a number is only consumed
by a committed row. Retained per-asset ``state`` is a snapshot, kept one row per topic and
replaced in place: after an outage only the newest state matters. ``memory`` holds what the
gateway must remember across restarts (alarm states, last status, derived counters), written in the
same transaction as the messages it explains, so the two never disagree after a crash.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import aiosqlite

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    asset TEXT NOT NULL,
    created REAL NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS state (
    topic TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS memory (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"""
TELEMETRY, EVENT, ALERT = 0, 1, 2  # priorities: a full buffer drops telemetry first, alerts last


class Message(NamedTuple):
    seq: int
    topic: str
    payload: bytes
    asset: str
    priority: int = TELEMETRY


class Row(NamedTuple):
    seq: int
    topic: str
    payload: bytes
    created: float


class BufferError(Exception):
    """The buffer cannot be opened or written (disk, permissions, corruption)."""


class Buffer:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._next_seq = 1
        self.rows = 0
        self._write = asyncio.Lock()  # one transaction at a time on the shared connection

    async def __aenter__(self) -> Buffer:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = await aiosqlite.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise BufferError(f"cannot open {self.path}: {exc}") from exc
        self._db = db
        try:
            for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "journal_size_limit=67108864",
                           "foreign_keys=OFF"):
                await db.execute(f"PRAGMA {pragma}")
            await db.executescript(SCHEMA)
            async with db.execute("PRAGMA table_info(outbox)") as cur:
                columns = {r[1] for r in await cur.fetchall()}
            if "priority" not in columns:  # a buffer written before priorities existed
                await db.execute("ALTER TABLE outbox ADD COLUMN priority INTEGER NOT NULL DEFAULT 0")
            async with db.execute("SELECT seq FROM sqlite_sequence WHERE name='outbox'") as cur:
                row = await cur.fetchone()
            self._next_seq = (row[0] if row else 0) + 1
            async with db.execute("SELECT count(*) FROM outbox") as cur:
                self.rows = (await cur.fetchone() or (0,))[0]
        except sqlite3.Error as exc:
            await self.close()
            raise BufferError(f"cannot use {self.path}: {exc}") from exc

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise BufferError("buffer is closed")
        return self._db

    @property
    def next_seq(self) -> int:
        """The seq the next appended message gets; valid until append() commits."""
        return self._next_seq

    async def append(self, messages: Sequence[Message | tuple[int, str, bytes, str]],
                     states: Iterable[tuple[str, bytes]] = (),
                     memory: Iterable[tuple[str, bytes]] = ()) -> None:
        """Commit messages, state snapshots and memory entries in one transaction.

        The caller numbers messages from ``next_seq`` upwards, in order, without holes.
        """
        msgs = [m if isinstance(m, Message) else Message(*m) for m in messages]
        if msgs and msgs[0].seq != self._next_seq:
            raise ValueError(f"first seq {msgs[0].seq} is not next_seq {self._next_seq}")
        now = time.time()
        async with self._write:
            await self._committed(
                ("INSERT INTO outbox(seq, topic, payload, asset, created, priority) VALUES (?, ?, ?, ?, ?, ?)",
                 [(m.seq, m.topic, m.payload, m.asset, now, m.priority) for m in msgs]),
                ("INSERT INTO state(topic, payload, updated) VALUES (?, ?, ?) "
                 "ON CONFLICT(topic) DO UPDATE SET payload=excluded.payload, updated=excluded.updated",
                 [(topic, payload, now) for topic, payload in states]),
                ("INSERT OR REPLACE INTO memory(key, value) VALUES (?, ?)", list(memory)),
            )
        if msgs:
            self._next_seq = msgs[-1].seq + 1
            self.rows += len(msgs)

    async def fetch(self, after: int, limit: int) -> list[Row]:
        """Committed rows after ``after`` (never rows of a transaction still open)."""
        async with self._write, self.db.execute(
            "SELECT seq, topic, payload, created FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit),
        ) as cur:
            return [Row(*r) for r in await cur.fetchall()]

    async def delete(self, seqs: Sequence[int]) -> None:
        if not seqs:
            return
        async with self._write:
            changed = await self._committed(("DELETE FROM outbox WHERE seq = ?", [(q,) for q in seqs]))
        self.rows -= changed

    async def _committed(self, *statements: tuple[str, list[tuple[object, ...]]]) -> int:
        """A transaction that runs to its end even if the caller is cancelled meanwhile.

        Cancelling a coroutine between COMMIT being sent and its reply would leave the caller
        not knowing whether the rows are stored, and a ROLLBACK after it would fail.
        """
        return await asyncio.shield(self._transaction(*statements))

    async def _transaction(self, *statements: tuple[str, list[tuple[object, ...]]]) -> int:
        """Run ``executemany`` statements in one transaction; return the rows they changed."""
        db = self.db
        changed = 0
        await db.execute("BEGIN")
        try:
            for sql, params in statements:
                if params:
                    cur = await db.executemany(sql, params)
                    changed += max(cur.rowcount, 0)
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        return changed

    async def states(self) -> list[tuple[str, bytes]]:
        async with self.db.execute("SELECT topic, payload FROM state ORDER BY topic") as cur:
            return [(t, p) for t, p in await cur.fetchall()]

    async def memory(self, prefix: str) -> dict[str, bytes]:
        """Memory entries whose key starts with ``prefix``."""
        async with self.db.execute("SELECT key, value FROM memory WHERE substr(key, 1, ?) = ?",
                                   (len(prefix), prefix)) as cur:
            return {k: v for k, v in await cur.fetchall()}

    async def stats(self) -> tuple[int, float | None]:
        """Payload bytes waiting, and the age in seconds of the oldest waiting row."""
        async with self.db.execute("SELECT coalesce(sum(length(payload)), 0), min(created) FROM outbox") as cur:
            row = await cur.fetchone()
        size, oldest = row if row else (0, None)
        return int(size), (None if oldest is None else max(0.0, time.time() - oldest))
