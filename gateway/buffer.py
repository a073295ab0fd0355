"""Store-and-forward buffer in SQLite (aiosqlite, WAL).

Every sequenced message (telemetry, events, alarm transitions) is committed here before it is
published and deleted only after the broker's PUBACK. Each row has a priority (telemetry 0, events 1,
alerts 2) that decides what a full buffer gives up first. ``seq`` is the row's primary key with
AUTOINCREMENT, so it is never reused, survives restarts and has no gaps: a number is only consumed
by a committed row (or by a dropped one, which the ``dropped`` ledger records). Retained per-asset
``state`` is a snapshot, kept one row per topic and replaced in place: after an outage only the
newest state matters. ``memory`` holds what the gateway must remember across restarts (alarm
states, last status, derived counters), written in the same transaction as the messages it
explains, so the two never disagree after a crash.

Two limits bound the database: the configured ``max_size`` (the cap) and the disk. Both are
enforced as SQLite's ``max_page_count``, so either makes an insert fail with ``SQLITE_FULL`` while
the disk still has the room a cleanup needs. The disk's limit is what the buffer's files may take
of the filesystem (free space plus the files themselves) less the reserve and room for the WAL; it
is put in force once less than ``DISK_WATCH`` is free, and measured again every ``WATCH_PERIOD``.
A disk that fills anyway (another process writes to it) fails an insert with ``SQLITE_FULL`` too.

A full buffer keeps running and gives up as little as it can, strictly by priority:

1. A full disk first gives up the reserve file and writes the WAL back into the database
   (checkpoint, truncate), and the insert is tried again: nothing is dropped when that is enough.
2. Otherwise one round gives up rows of the lowest priority that has any: the oldest waiting rows,
   or, once none of that priority waits, the new batch's own. It frees about what the batch needs
   (twice its bytes, doubling each round) but at least 1/``EVICT_SHARE`` of the limit in force (the
   cap, or what the disk holds) so that it does not evict on every commit, and the insert is tried
   again after each round. Events go only when no telemetry is left, alarm transitions only when
   neither is.
3. When the disk cannot take even the DELETE of an eviction, the new batch's rows go, lowest
   priority first: nothing else can make room.

Every episode (one append that dropped rows) is reported to ``on_full`` (reason, rows and bytes by
priority, seqs, the limit, the free disk), and every dropped row is counted in the ``dropped``
ledger in the transaction that drops it, so a crash never loses a row that was not counted.

The WAL is bounded so that it cannot fill a nearly full disk by itself: ``wal_autocheckpoint`` and
``journal_size_limit`` are 1/``WAL_SHARE`` of the space the buffer can use (between ``WAL_MIN`` and
``WAL_MAX``). The reserve file beside the database (``RESERVE``, or the WAL's bound when larger) is
the room a full disk's checkpoint and eviction need; it is laid down again once the disk has room.

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
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
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
CREATE TABLE IF NOT EXISTS dropped (
    reason TEXT NOT NULL,
    priority INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    PRIMARY KEY (reason, priority)
);
"""
TELEMETRY, EVENT, ALERT = 0, 1, 2  # priorities: a full buffer drops telemetry first, alerts last
PRIORITY_NAMES = {TELEMETRY: "telemetry", EVENT: "event", ALERT: "alert"}
EVICT_SHARE = 100  # an eviction frees at least 1/100 of the limit in force (the cap, or what the disk holds)
EVICT_NEED = 2  # the first round frees twice the bytes of the batch that did not fit; each round doubles
EVICT_ROUNDS = 64  # rounds one append may take before it gives up (each drops something, or none is left)
ROW_OVERHEAD = 64  # bytes a row takes beside its payload
RESERVE = 1 << 20  # the smallest reserve file: room for a full disk's checkpoint and eviction
WAL_SHARE = 16  # the WAL may grow to 1/16 of the space the buffer can use before it is checkpointed ...
WAL_MIN, WAL_MAX = 256 << 10, 4 << 20  # ... but to no less than 256 KiB and no more than 4 MiB
WAL_STEP = 64 << 10  # in steps of 64 KiB
DISK_WATCH = 64 << 20  # with less free than this, the disk's limit is put in force as a page limit
WATCH_PERIOD = 0.5  # seconds between measurements of the disk while appending


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
    """What one full-buffer episode gave up, and why."""

    reason: str  # "cap" (the configured max_size) or "disk_full" (the disk's limit, or a full disk)
    dropped: dict[int, int]  # priority -> rows
    first_seq: int | None
    last_seq: int | None
    freed: int = 0  # payload bytes of the dropped rows
    limit: int | None = None  # bytes the database could take when it happened
    free: int | None = None  # bytes free on the disk when it happened
    rounds: int = 0  # evictions it took


class Disk(NamedTuple):
    """The buffer's disk, as last measured, and the limits the buffer derives from it."""

    free: int  # bytes free on the filesystem (for an unprivileged process)
    database: int  # bytes of the database file
    wal: int  # bytes of the WAL file
    reserve: int  # bytes of the reserve file laid down
    wal_limit: int  # bytes the WAL may grow to before it is checkpointed (and truncated back to)
    reserve_size: int  # bytes the reserve should have
    disk_limit: int  # bytes the database may take on this disk
    cap: int | None  # the configured max_size

    @property
    def limited_by(self) -> str:
        """"disk" when the disk holds less than the cap, else "cap"."""
        return "disk" if self.cap is None or self.disk_limit < self.cap else "cap"

    @property
    def limit(self) -> int:
        """Bytes the database may take: the cap, or less when the disk holds less."""
        return self.disk_limit if self.cap is None else min(self.cap, self.disk_limit)


UPSERT_DROPPED = ("INSERT INTO dropped(reason, priority, rows, last_seq) VALUES (?, ?, ?, ?) "
                  "ON CONFLICT(reason, priority) DO UPDATE SET rows = rows + excluded.rows, "
                  "last_seq = max(last_seq, excluded.last_seq)")


@dataclass
class _Episode:
    """One append's way through a full buffer."""

    reason: str = ""
    limit: int = 0
    victims: list[tuple[int, int, int]] = field(default_factory=list)  # (seq, priority, bytes) given up
    new: list[tuple[int, int, int]] = field(default_factory=list)  # those of them from the batch itself
    relieved: bool = False  # the reserve and the WAL were given back
    retry: bool = False  # something made room without dropping anything: insert again first
    stuck: bool = False  # the disk cannot take the DELETE of an eviction
    rounds: int = 0

    def ledger(self, victims: Iterable[tuple[int, int, int]]) -> list[tuple[object, ...]]:
        by: dict[int, list[int]] = {}
        for seq, priority, _ in victims:
            by.setdefault(priority, []).append(seq)
        return [(self.reason, p, len(seqs), max(seqs)) for p, seqs in sorted(by.items())]


def _size(path: Path) -> int:
    """Bytes the file takes on its disk (its blocks, not its length)."""
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


def _length(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


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
        self.disk: Disk | None = None  # the last measurement (see watch)
        self._watched = -WATCH_PERIOD  # monotonic time of that measurement
        self._pages = 0  # the max_page_count put in force
        self._wal_limit = 0  # the WAL bound put in force

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
            for pragma in ("journal_mode=WAL", "synchronous=NORMAL", f"journal_size_limit={WAL_MAX}",
                           "foreign_keys=OFF", "secure_delete=FAST"):
                await db.execute(f"PRAGMA {pragma}")
            try:
                await db.executescript(SCHEMA)
            except sqlite3.OperationalError as exc:  # a new table, on a full disk: the reserve's room
                if not _full(exc):
                    raise
                await self._relieve()
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
        async with self._write:
            self.max_size = max_size
            self._pages = 0  # put the page limit in force again, whatever it was
            await self._watch(force=True)

    def _cap_pages(self) -> int:
        return 0x7FFFFFFE if self.max_size is None else max(16, self.max_size // self.page_size)

    async def watch(self) -> Disk:
        """Measure the disk now and adjust to it (WAL bound, page limit, reserve)."""
        async with self._write:
            return await self._watch(force=True)

    async def _watch(self, *, force: bool = False) -> Disk:
        """Measure the disk (at most every WATCH_PERIOD unless forced) and adjust to it."""
        now = time.monotonic()
        if self.disk is not None and not force and now - self._watched < WATCH_PERIOD:
            return self.disk
        self._watched = now
        disk = self.disk = self._measure()
        if disk.wal_limit != self._wal_limit:  # checkpoint at the bound; truncate the WAL back to it
            await self._pragma(f"wal_autocheckpoint = {disk.wal_limit // self.page_size}")
            await self._pragma(f"journal_size_limit = {disk.wal_limit}")
            self._wal_limit = disk.wal_limit
        if disk.wal > 2 * disk.wal_limit:  # the autocheckpoint could not keep up (a reader, a full disk)
            await self._checkpoint()
        pages = self._cap_pages()
        if disk.limited_by == "disk" and disk.free < DISK_WATCH:
            pages = min(pages, max(16, disk.disk_limit // self.page_size))
        if pages != self._pages:  # below the database's page count SQLite keeps that count
            await self._pragma(f"max_page_count = {pages}")
            self._pages = pages
        if _length(self._reserve) != disk.reserve_size and self._lay_reserve(disk):
            disk = self.disk = self._measure()
        return disk

    def _measure(self) -> Disk:
        """The disk as it is now, and what the buffer may take of it."""
        try:
            st = os.statvfs(self.path.parent)
            free = st.f_bavail * st.f_frsize
        except OSError:
            free = 0
        database, wal, shm = (_size(self.path.with_name(self.path.name + s)) for s in ("", "-wal", "-shm"))
        reserve = _size(self._reserve)
        room = free + database + wal + shm + reserve  # what the buffer's files can take of the disk
        wal_limit = min(max(room // WAL_SHARE, WAL_MIN), WAL_MAX) // WAL_STEP * WAL_STEP
        reserve_size = max(RESERVE, wal_limit)
        # Beside the database: the reserve, the WAL between two checkpoints plus what one commit or
        # one eviction adds to it before the checkpoint runs, and the WAL index.
        disk_limit = max(0, room - reserve_size - 2 * wal_limit - shm)
        return Disk(free, database, wal, reserve, wal_limit, reserve_size, disk_limit, self.max_size)

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
        buffer is full, rows are dropped by priority (older ones first, these as a last resort) and
        reported to ``on_full``; only a write that fails for another reason raises.
        """
        msgs = [m if isinstance(m, Message) else Message(*m) for m in messages]
        if msgs and msgs[0].seq != self._next_seq:
            raise ValueError(f"first seq {msgs[0].seq} is not next_seq {self._next_seq}")
        states, memory = list(states), list(memory)
        async with self._write:
            await self._watch()
            keep, episode = msgs, None
            while True:
                try:
                    await self._insert(keep, states, memory, episode, msgs[-1].seq if msgs else 0)
                    break
                except sqlite3.OperationalError as exc:
                    if not _full(exc):
                        raise
                if episode is None:
                    episode = await self._episode(keep)
                if episode.rounds >= EVICT_ROUNDS:
                    raise BufferError(f"{self.path}: full, and {EVICT_ROUNDS} evictions did not make room")
                keep = await self._make_room(episode, keep)
        if msgs:
            self._next_seq = msgs[-1].seq + 1
            self.rows += len(keep)
        if episode is not None and episode.victims:
            self._report(episode)

    @property
    def _reserve(self) -> Path:
        return self.path.with_name(self.path.name + "-reserve")

    def _lay_reserve(self, disk: Disk) -> bool:
        """Bring the reserve file to its size when the disk has room for it and for the WAL beside it."""
        length = _length(self._reserve)
        grow = disk.reserve_size - length
        if grow > 0 and disk.free - grow < 2 * disk.wal_limit:
            return False
        try:
            with open(self._reserve, "r+b" if self._reserve.exists() else "wb") as f:
                if grow > 0:
                    os.posix_fallocate(f.fileno(), 0, disk.reserve_size)
                else:
                    f.truncate(disk.reserve_size)
        except OSError:
            with contextlib.suppress(OSError):
                self._reserve.unlink()
        return True

    async def _insert(self, msgs: list[Message], states: list[tuple[str, bytes]],
                      memory: list[tuple[str, bytes]], episode: _Episode | None, last_seq: int) -> None:
        now = time.time()
        statements: list[tuple[str, Sequence[tuple[object, ...]]]] = [
            ("INSERT INTO outbox(seq, topic, payload, asset, created, priority) VALUES (?, ?, ?, ?, ?, ?)",
             [(m.seq, m.topic, m.payload, m.asset, now, m.priority) for m in msgs]),
            ("INSERT INTO state(topic, payload, updated) VALUES (?, ?, ?) "
             "ON CONFLICT(topic) DO UPDATE SET payload=excluded.payload, updated=excluded.updated",
             [(topic, payload, now) for topic, payload in states]),
            ("INSERT OR REPLACE INTO memory(key, value) VALUES (?, ?)", memory),
        ]
        if episode is not None and episode.new:
            # The batch's own dropped rows: counted, and their seqs used up, with the rows kept.
            statements += [
                (UPSERT_DROPPED, episode.ledger(episode.new)),
                ("UPDATE sqlite_sequence SET seq = ? WHERE name = 'outbox' AND seq < ?", [(last_seq, last_seq)]),
                ("INSERT INTO sqlite_sequence(name, seq) SELECT 'outbox', ? "
                 "WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'outbox')", [(last_seq,)]),
            ]
        await self._committed(*statements)

    async def _episode(self, batch: list[Message]) -> _Episode:
        """The first failed insert of an append: which limit it met, and what the disk can hold."""
        pages, limit_pages = await self._pragma("page_count"), await self._pragma("max_page_count")
        await self._watch(force=True)
        needs = sum(len(m.payload) + ROW_OVERHEAD for m in batch) // self.page_size + 8
        at_limit = pages + needs >= limit_pages
        cap = self.max_size is not None and limit_pages >= self._cap_pages()
        episode = _Episode(reason="cap" if at_limit and cap else "disk_full")
        # The limit in force: the page limit it met, or, on a disk that filled before it, the database
        # as it is (what the disk holds). Never a cap the disk cannot reach.
        episode.limit = min(limit_pages, pages) * self.page_size if at_limit else pages * self.page_size
        if not at_limit:  # the disk itself is full (another process took its room)
            await self._relieve()
            episode.relieved = episode.retry = True
        elif await self._pragma("max_page_count") > limit_pages:  # the disk has room again
            episode.retry = True
        return episode

    async def _make_room(self, episode: _Episode, new: list[Message]) -> list[Message]:
        """One round: give up the oldest rows of the lowest priority that has any, waiting or new
        (about what the batch needs); returns the new rows kept."""
        if episode.retry:  # the reserve's room, the WAL given back, or more disk: try that first
            episode.retry = False
            return new
        need = max(sum(len(m.payload) + ROW_OVERHEAD for m in new) * EVICT_NEED, 4 * self.page_size)
        want = max(need << min(episode.rounds, 40), episode.limit // EVICT_SHARE)
        episode.rounds += 1
        for priority in sorted(PRIORITY_NAMES):
            old = [] if episode.stuck else await self._oldest(priority, want)
            fresh = [(m.seq, m.priority, len(m.payload)) for m in new if m.priority == priority]
            if not old and not fresh:
                continue
            if old:
                if await self._evict(episode, old):
                    return new  # try again before any more goes, the batch's own rows above all
                episode.stuck = True  # the disk cannot take a DELETE: only the batch's own rows can make room
                if not fresh:
                    continue
            gone: list[tuple[int, int, int]] = []
            freed = 0
            for victim in fresh:  # the batch's own rows of this priority, oldest first
                if freed >= want:
                    break
                gone.append(victim)
                freed += victim[2] + ROW_OVERHEAD
            episode.victims += gone
            episode.new += gone
            seqs = {q for q, _, _ in gone}
            return [m for m in new if m.seq not in seqs]
        raise BufferError(f"{self.path}: full, and no waiting or new message is left to give up")

    async def _evict(self, episode: _Episode, victims: list[tuple[int, int, int]]) -> bool:
        """Delete waiting rows, counting them in the ledger in the same transaction. A disk too full
        for the DELETE gets the reserve's room for it once; False when even that did not do."""
        statements = (("DELETE FROM outbox WHERE seq = ?", [(q,) for q, _, _ in victims]),
                      (UPSERT_DROPPED, episode.ledger(victims)))
        try:
            changed = (await self._committed_each(*statements))[0]
        except sqlite3.OperationalError as exc:
            if not _full(exc):
                raise
            if episode.relieved:
                return False
            await self._relieve()
            episode.relieved = True
            try:
                changed = (await self._committed_each(*statements))[0]
            except sqlite3.OperationalError as again:
                if not _full(again):
                    raise
                return False
        self.rows -= changed
        episode.victims += victims
        if episode.relieved:
            await self._checkpoint()  # the DELETE's WAL back to the disk
        return True

    async def _oldest(self, priority: int, want: int) -> list[tuple[int, int, int]]:
        """(seq, priority, bytes) of the oldest waiting rows of one priority, about ``want`` bytes."""
        victims: list[tuple[int, int, int]] = []
        freed = 0
        async with self.db.execute("SELECT seq, length(payload) FROM outbox WHERE priority = ? ORDER BY seq",
                                   (priority,)) as cur:  # by rowid within a priority: no index needed
            async for seq, size in cur:
                if seq in self._held:
                    continue
                victims.append((seq, priority, size))
                freed += size + ROW_OVERHEAD
                if freed >= want:
                    break
        return victims

    def _report(self, episode: _Episode) -> None:
        self._watched = -WATCH_PERIOD  # measure again at the next append: the reserve may go back
        if self.on_full is None:
            return
        seqs = [q for q, _, _ in episode.victims]
        self.on_full(Full(episode.reason, dict(Counter(p for _, p, _ in episode.victims)), min(seqs), max(seqs),
                          sum(size for _, _, size in episode.victims), episode.limit,
                          self.disk.free if self.disk else None, episode.rounds))

    async def dropped(self) -> dict[tuple[str, int], int]:
        """Rows dropped since the database was created, by (reason, priority)."""
        async with self.db.execute("SELECT reason, priority, rows FROM dropped") as cur:
            return {(r, p): n for r, p, n in await cur.fetchall()}

    async def _relieve(self) -> None:
        """A full disk: give up the reserve, write the WAL back into the database and truncate it."""
        with contextlib.suppress(OSError):
            self._reserve.unlink()
        await self._checkpoint()
        self._watched = -WATCH_PERIOD

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
            if self._measure().free >= self._wal_limit:  # the page limit (rows marked acked need pages)
                raise BufferError(f"{self.path}: cannot delete acknowledged rows: {exc}") from exc
            await self._relieve()
            try:
                changed = (await self._committed_each(*statements))[0]
            except sqlite3.OperationalError as again:
                raise BufferError(f"{self.path}: cannot delete acknowledged rows: {again}") from again
            await self._checkpoint()
        self.rows -= changed
        if self.rows == 0:  # drained: the reserve goes back when the disk has room (measured now and then)
            await self._watch()

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
