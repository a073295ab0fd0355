"""Store-and-forward buffer in SQLite (aiosqlite, WAL).

Every sequenced message (telemetry, events, alarm transitions) is committed here before it is
published and deleted only after the broker's PUBACK. Each row has a priority (telemetry 0, events 1,
alerts 2) that decides what a full buffer gives up first. ``seq`` is the row's primary key with
AUTOINCREMENT, so it is never reused, survives restarts and has no gaps: a number is only consumed
by a committed row. Retained per-asset ``state`` is a snapshot, kept one row per topic and
replaced in place: after an outage only the newest state matters. ``memory`` holds what the
gateway must remember across restarts (alarm states, last status, derived counters), written in the
same transaction as the messages it explains, so the two never disagree after a crash.

A full buffer (the configured ``max_size``, enforced by SQLite's ``max_page_count``, or a full disk:
both are ``SQLITE_FULL``) keeps running: it deletes the oldest rows of the lowest priority present
(telemetry first, alerts last), about 1 % of the cap at a time so that it does not evict on every
commit, and retries. When nothing older is left to give up, the new batch's own rows go, lowest
priority first. Every episode is reported to ``on_full`` (reason, rows dropped by priority, seqs).

On a really full disk even a DELETE needs room (its pages go to the WAL first), so the buffer keeps
a reserve file of ``RESERVE`` bytes beside the database: a full disk removes it to make the room
the eviction needs, and it is laid down again once the disk has space for it (after an eviction,
or when the backlog has drained).

Consumers: by default one consumer reads the buffer (``fetch``) and deletes what the broker
acknowledged (``delete``): the JSON publisher. ``use_consumers`` adds named consumers that read in
``seq`` order and acknowledge by moving their cursor (``advance``; the Sparkplug session), and may
turn the default consumer off. A row is deleted only once every active consumer is done with it: a
row the default consumer acknowledged while a named one still needs it is marked in ``acked`` (and
``fetch`` no longer returns it); a named consumer's cursor is kept in ``cursors`` across restarts.
With only the default consumer nothing of this is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
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
CREATE TABLE IF NOT EXISTS cursors (
    consumer TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS acked (
    seq INTEGER PRIMARY KEY
);
"""
TELEMETRY, EVENT, ALERT = 0, 1, 2  # priorities: a full buffer drops telemetry first, alerts last
PRIORITY_NAMES = {TELEMETRY: "telemetry", EVENT: "event", ALERT: "alert"}
EVICT_SHARE = 100  # a full buffer frees at least 1/100 of its cap at a time
EVICT_ROUNDS = 12  # each round frees twice as much as the one before
RESERVE = 1 << 20  # bytes kept free for a full disk's eviction


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


def _full(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


def _run_transaction(conn: sqlite3.Connection,
                     statements: Sequence[tuple[str, Sequence[tuple[object, ...]]]]) -> list[int]:
    """``Buffer._transaction`` on the connection's own thread: the rows each statement changed."""
    changed: list[int] = []
    conn.execute("BEGIN")
    try:
        for sql, params in statements:
            changed.append(max(conn.executemany(sql, params).rowcount, 0) if params else 0)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLITE_FULL may have rolled the transaction back already
            conn.execute("ROLLBACK")
        raise
    return changed


class Full(NamedTuple):
    """What one full-buffer episode gave up."""

    reason: str  # "cap" (the configured max_size) or "disk_full"
    dropped: dict[int, int]  # priority -> rows
    first_seq: int | None
    last_seq: int | None


class Buffer:
    def __init__(self, path: Path, *, max_size: int | None = None,
                 on_full: Callable[[Full], None] | None = None) -> None:
        self.path = path
        self.max_size = max_size
        self.on_full = on_full
        self._db: aiosqlite.Connection | None = None
        self._next_seq = 1
        self.rows = 0
        self.page_size = 4096
        self._write = asyncio.Lock()  # one transaction at a time on the shared connection
        self._default = True  # the default consumer (fetch/delete) is active
        self._cursors: dict[str, int] = {}  # active named consumers -> last seq they are done with
        # rows the default consumer has fetched and not deleted yet: in flight, or delivered and
        # waiting for their delete. A full buffer never evicts them, so a drop is always a real loss.
        self._held: set[int] = set()
        self.one_call = True  # a transaction is one call on aiosqlite's thread (see _transaction)

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
        self.one_call = self.one_call and hasattr(db, "_execute") and hasattr(db, "_conn")
        try:
            # secure_delete=FAST: SQLite builds that default to secure_delete=ON (Debian's) zero every
            # freed overflow page of a deleted row, ~40 us per 12 KB telemetry row instead of ~2 us, and
            # need more WAL room to delete on a full disk. FAST zeroes only what costs no extra I/O.
            for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "journal_size_limit=67108864",
                           "foreign_keys=OFF", "secure_delete=FAST"):
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
            self.page_size = await self._pragma("page_size")
            await self.set_max_size(self.max_size)
            self._lay_reserve()
        except sqlite3.Error as exc:
            await self.close()
            raise BufferError(f"cannot use {self.path}: {exc}") from exc

    async def _pragma(self, pragma: str) -> int:
        async with self.db.execute(f"PRAGMA {pragma}") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def set_max_size(self, max_size: int | None) -> None:
        """Cap the database file (``None``: only the disk limits it). A file already larger keeps
        its size; the space rows free inside it is reused."""
        self.max_size = max_size
        pages = 0x7FFFFFFE if max_size is None else max(16, max_size // self.page_size)
        await self._pragma(f"max_page_count = {pages}")

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

        The caller numbers messages from ``next_seq`` upwards, in order, without holes. When the
        buffer is full, older rows (and, as a last resort, some of these) are dropped by priority
        and reported to ``on_full``; only a write that fails for another reason raises.
        """
        msgs = [m if isinstance(m, Message) else Message(*m) for m in messages]
        if msgs and msgs[0].seq != self._next_seq:
            raise ValueError(f"first seq {msgs[0].seq} is not next_seq {self._next_seq}")
        states, memory = list(states), list(memory)
        async with self._write:
            keep = msgs
            for attempt in range(EVICT_ROUNDS + 1):
                try:
                    await self._insert(keep, states, memory)
                    break
                except sqlite3.OperationalError as exc:
                    if not _full(exc):
                        raise
                    need = sum(len(m.payload) for m in keep) * 4 << attempt
                    keep = await self._make_room(max(need, (self.max_size or 0) // EVICT_SHARE), keep)
            else:
                raise BufferError(f"{self.path}: full, and dropping every waiting message did not help")
        if msgs:
            self._next_seq = msgs[-1].seq + 1
            self.rows += len(keep)

    @property
    def _reserve(self) -> Path:
        return self.path.with_name(self.path.name + "-reserve")

    def _lay_reserve(self) -> None:
        """Lay down the reserve file when the disk has room for it and some to spare."""
        try:
            if shutil.disk_usage(self.path.parent).free < 3 * RESERVE:
                return
            with open(self._reserve, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, RESERVE)
        except OSError:
            with contextlib.suppress(OSError):
                self._reserve.unlink()

    async def _insert(self, msgs: list[Message], states: list[tuple[str, bytes]],
                      memory: list[tuple[str, bytes]]) -> None:
        now = time.time()
        await self._committed(
            ("INSERT INTO outbox(seq, topic, payload, asset, created, priority) VALUES (?, ?, ?, ?, ?, ?)",
             [(m.seq, m.topic, m.payload, m.asset, now, m.priority) for m in msgs]),
            ("INSERT INTO state(topic, payload, updated) VALUES (?, ?, ?) "
             "ON CONFLICT(topic) DO UPDATE SET payload=excluded.payload, updated=excluded.updated",
             [(topic, payload, now) for topic, payload in states]),
            ("INSERT OR REPLACE INTO memory(key, value) VALUES (?, ?)", memory),
        )

    async def _make_room(self, want: int, new: list[Message]) -> list[Message]:
        """Free about ``want`` payload bytes: the oldest waiting rows of the lowest priority first,
        then (when nothing waits, or the disk cannot take even a DELETE) the new rows of the lowest
        priority. Returns the new rows kept."""
        at_cap = self.max_size is not None and \
            await self._pragma("page_count") >= await self._pragma("max_page_count") - 1
        reason = "cap" if at_cap else "disk_full"
        if not at_cap:  # the disk: use the reserve, and give the WAL's space back
            want = max(want, RESERVE)
            await self._use_reserve()
        victims = await self._oldest(want)
        if victims:
            try:
                self.rows -= await self._committed(("DELETE FROM outbox WHERE seq = ?", [(q,) for q, _ in victims]))
            except sqlite3.OperationalError as exc:
                if not _full(exc):
                    raise
                victims = []
        keep = new
        if not victims and new:  # nothing older to give up: the new batch drops its least important rows
            floor = min(m.priority for m in new)
            lowest = [m for m in new if m.priority == floor]
            if len(lowest) == len(new):  # one priority only: its older half
                lowest = lowest[:max(1, len(lowest) // 2)]
            victims = [(m.seq, m.priority) for m in lowest]
            gone = {m.seq for m in lowest}
            keep = [m for m in new if m.seq not in gone]
        if not at_cap:
            await self._checkpoint()
            self._lay_reserve()
        if self.on_full is not None and victims:
            seqs = [q for q, _ in victims]
            self.on_full(Full(reason, dict(Counter(p for _, p in victims)), min(seqs), max(seqs)))
        return keep

    async def _oldest(self, want: int) -> list[tuple[int, int]]:
        """(seq, priority) of the oldest rows of the lowest priorities, about ``want`` payload bytes."""
        victims: list[tuple[int, int]] = []
        freed = 0
        for priority in sorted(PRIORITY_NAMES):  # by rowid within a priority: no index needed
            async with self.db.execute("SELECT seq, length(payload) FROM outbox WHERE priority = ? ORDER BY seq",
                                       (priority,)) as cur:
                async for seq, size in cur:
                    if seq in self._held:
                        continue
                    victims.append((seq, priority))
                    freed += size + 64  # the row's own overhead
                    if freed >= want:
                        return victims
        return victims

    async def _use_reserve(self) -> None:
        with contextlib.suppress(OSError):
            self._reserve.unlink()
        await self._checkpoint()

    async def _checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it (best effort: the disk may be full)."""
        with contextlib.suppress(sqlite3.Error):
            await self._pragma("wal_checkpoint(TRUNCATE)")

    async def fetch(self, after: int, limit: int, *, consumer: str | None = None) -> list[Row]:
        """Committed rows after ``after`` (never rows of a transaction still open). For the default
        consumer (``consumer`` None) without the rows it already acknowledged; a named consumer gets
        every row after ``after``."""
        sql = ("SELECT seq, topic, payload, created FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?"
               if consumer is not None else
               "SELECT seq, topic, payload, created FROM outbox WHERE seq > ? "
               "AND NOT EXISTS (SELECT 1 FROM acked WHERE acked.seq = outbox.seq) ORDER BY seq LIMIT ?")
        async with self._write:
            rows = [Row(*r) for r in await self.db.execute_fetchall(sql, (after, limit))]  # one thread round trip
        if consumer is None:
            self._held.update(r.seq for r in rows)
        return rows

    async def delete(self, seqs: Sequence[int]) -> None:
        """Delete acknowledged rows (the default consumer's acknowledgement). A full disk gets the
        reserve's room for it (a DELETE writes to the WAL first); when even that fails, BufferError,
        and the rows stay to be sent again. Rows a named consumer still needs are only marked."""
        if not seqs:
            return
        async with self._write:
            if self._cursors:
                floor = min(self._cursors.values())
                await self._delete(("DELETE FROM outbox WHERE seq = ?", [(q,) for q in seqs if q <= floor]),
                                   ("INSERT OR IGNORE INTO acked(seq) VALUES (?)", [(q,) for q in seqs if q > floor]))
            else:
                await self._delete(("DELETE FROM outbox WHERE seq = ?", [(q,) for q in seqs]))
        self._held.difference_update(seqs)

    async def _delete(self, *statements: tuple[str, Sequence[tuple[object, ...]]]) -> None:
        """One transaction whose first statement deletes rows from the outbox (counted)."""
        try:
            changed = (await self._committed_each(*statements))[0]
        except sqlite3.OperationalError as exc:
            if not _full(exc):
                raise
            await self._use_reserve()
            try:
                changed = (await self._committed_each(*statements))[0]
            except sqlite3.OperationalError as again:
                raise BufferError(f"{self.path}: cannot delete acknowledged rows: {again}") from again
            await self._checkpoint()
        self.rows -= changed
        if self.rows == 0 and not self._reserve.exists():  # drained after a full disk
            await self._checkpoint()
            self._lay_reserve()

    # -- named consumers ---------------------------------------------------------------------------
    async def use_consumers(self, *names: str, default: bool = True) -> None:
        """Who reads the buffer: the default consumer (``fetch``/``delete``) when ``default``, and the
        named in-order consumers (``fetch(consumer=...)``/``advance``). A name seen for the first time
        starts at the oldest waiting row; a known one where it stopped. Rows every active consumer is
        done with are deleted now (say, after the default consumer was the only one left)."""
        if not default and not names:
            raise ValueError("the buffer needs at least one consumer")
        async with self._write:
            cursors: dict[str, int] = {}
            for name in names:
                async with self.db.execute("SELECT seq FROM cursors WHERE consumer = ?", (name,)) as cur:
                    row = await cur.fetchone()
                cursors[name] = int(row[0]) if row else 0
            self._default, self._cursors = default, cursors
            await self._delete(*self._sweep())

    def cursor(self, name: str) -> int:
        """The last seq the named consumer is done with."""
        return self._cursors[name]

    async def advance(self, name: str, seq: int) -> None:
        """The named consumer is done with every row up to ``seq``; rows all consumers are done
        with are deleted, in the same transaction that moves the cursor."""
        async with self._write:
            if seq <= self._cursors[name]:
                return
            self._cursors[name] = seq
            sweep = self._sweep()
            await self._delete(*sweep, ("INSERT INTO cursors(consumer, seq) VALUES (?, ?) "
                                        "ON CONFLICT(consumer) DO UPDATE SET seq = excluded.seq", [(name, seq)]))

    def _sweep(self) -> list[tuple[str, Sequence[tuple[object, ...]]]]:
        """Statements deleting the rows every active consumer is done with (the outbox first)."""
        if not self._cursors:  # the default consumer alone: what it acknowledged is done
            return [("DELETE FROM outbox WHERE seq IN (SELECT seq FROM acked)", [()]),
                    ("DELETE FROM acked", [()])]
        floor = min(self._cursors.values())
        outbox = ("DELETE FROM outbox WHERE seq <= ? AND seq IN (SELECT seq FROM acked WHERE seq <= ?)",
                  [(floor, floor)]) if self._default else ("DELETE FROM outbox WHERE seq <= ?", [(floor,)])
        return [outbox, ("DELETE FROM acked WHERE seq <= ?", [(floor,)])]

    async def _committed(self, *statements: tuple[str, Sequence[tuple[object, ...]]]) -> int:
        """A transaction that runs to its end even if the caller is cancelled meanwhile.

        Cancelling a coroutine between COMMIT being sent and its reply would leave the caller
        not knowing whether the rows are stored, and a ROLLBACK after it would fail.
        """
        return sum(await self._committed_each(*statements))

    async def _committed_each(self, *statements: tuple[str, Sequence[tuple[object, ...]]]) -> list[int]:
        """As ``_committed``; the rows each statement changed.

        A cancelled caller still waits for the transaction to end before the cancellation goes on:
        its caller holds the write lock, and the next transaction must not BEGIN inside this one.
        """
        task = asyncio.ensure_future(self._transaction(*statements))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            while not task.done():  # a second cancel (a task group, then its owner) waits as well
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([task])
            if not task.cancelled():
                task.exception()  # retrieved: the caller is cancelled either way
            raise

    async def _transaction(self, *statements: tuple[str, Sequence[tuple[object, ...]]]) -> list[int]:
        """Run ``executemany`` statements in one transaction; return the rows each changed.

        The whole transaction is one call on aiosqlite's connection thread (each ``await db.execute``
        is a round trip to that thread, ~0.1 ms: five per commit were a third of its cost). That uses
        aiosqlite's ``_execute``/``_conn`` (pinned <0.23); without them, one call per statement."""
        db = self.db
        if self.one_call:
            return await db._execute(_run_transaction, db._conn, statements)  # type: ignore[no-untyped-call,no-any-return]
        changed: list[int] = []
        await db.execute("BEGIN")
        try:
            for sql, params in statements:
                n = 0
                if params:
                    cur = await db.executemany(sql, params)
                    n = max(cur.rowcount, 0)
                changed.append(n)
            await db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLITE_FULL may have rolled the transaction back already
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
