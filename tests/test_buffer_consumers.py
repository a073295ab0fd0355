"""The buffer with more than one consumer: a row leaves only when every active consumer is done with it.

The default consumer (``fetch``/``delete``, the JSON publisher) acknowledges rows one by one, in any
order; a named consumer (the Sparkplug session) reads in seq order and moves a cursor (``advance``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.buffer import Buffer

SP = "sparkplug"


def _rows(first: int, n: int) -> list[tuple[int, str, bytes, str]]:
    return [(s, "t/a/telemetry", f"p{s}".encode(), "a") for s in range(first, first + n)]


async def _seqs(buf: Buffer, consumer: str | None = None) -> list[int]:
    return [r.seq for r in await buf.fetch(0, 1000, consumer=consumer)]


async def test_default_consumer_alone_deletes_as_before(tmp_path: Path) -> None:
    async with Buffer(tmp_path / "b.sqlite") as buf:
        await buf.use_consumers()
        await buf.append(_rows(1, 4))
        await buf.delete([3, 1])
        assert await _seqs(buf) == [2, 4]
        assert buf.rows == 2


async def test_both_consumers_row_leaves_after_the_second_ack(tmp_path: Path) -> None:
    async with Buffer(tmp_path / "b.sqlite") as buf:
        await buf.use_consumers(SP)
        assert buf.cursor(SP) == 0
        await buf.append(_rows(1, 6))
        await buf.delete([2, 4, 5])  # the JSON publisher first: rows are only marked
        assert buf.rows == 6
        assert await _seqs(buf) == [1, 3, 6], "the default consumer is not given its acknowledged rows again"
        assert await _seqs(buf, SP) == [1, 2, 3, 4, 5, 6], "the named consumer still sees every row"
        await buf.advance(SP, 4)  # Sparkplug is done up to 4: 2 and 4 are done for both
        assert await _seqs(buf, SP) == [1, 3, 5, 6]
        assert buf.rows == 4
        await buf.delete([1, 3])  # at or below the cursor: deleted at once
        assert await _seqs(buf, SP) == [5, 6]
        await buf.advance(SP, 6)  # 5 was acknowledged by JSON before, 6 not yet
        assert await _seqs(buf, SP) == [6]
        await buf.delete([6])
        assert await _seqs(buf, SP) == []
        assert buf.rows == 0


async def test_cursor_and_marks_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite"
    async with Buffer(path) as buf:
        await buf.use_consumers(SP)
        await buf.append(_rows(1, 5))
        await buf.advance(SP, 2)
        await buf.delete([4])
    async with Buffer(path) as buf:
        await buf.use_consumers(SP)
        assert buf.cursor(SP) == 2
        assert await _seqs(buf) == [1, 2, 3, 5]
        assert await _seqs(buf, SP) == [1, 2, 3, 4, 5]
        await buf.advance(SP, 1)  # never backwards
        assert buf.cursor(SP) == 2


async def test_named_consumer_alone(tmp_path: Path) -> None:
    async with Buffer(tmp_path / "b.sqlite") as buf:
        await buf.append(_rows(1, 3))  # waiting from before Sparkplug was turned on
        await buf.use_consumers(SP, default=False)
        assert await _seqs(buf, SP) == [1, 2, 3], "a new consumer starts at the oldest waiting row"
        await buf.advance(SP, 2)
        assert await _seqs(buf, SP) == [3]
        assert buf.rows == 1


async def test_dropping_the_named_consumer_releases_what_json_acknowledged(tmp_path: Path) -> None:
    async with Buffer(tmp_path / "b.sqlite") as buf:
        await buf.use_consumers(SP)
        await buf.append(_rows(1, 4))
        await buf.delete([1, 2, 3])
        assert buf.rows == 4
        await buf.use_consumers()  # format back to json
        assert await _seqs(buf, SP) == [4]
        assert buf.rows == 1


async def test_dropping_json_releases_what_sparkplug_passed(tmp_path: Path) -> None:
    async with Buffer(tmp_path / "b.sqlite") as buf:
        await buf.use_consumers(SP)
        await buf.append(_rows(1, 4))
        await buf.advance(SP, 3)
        assert buf.rows == 4
        await buf.use_consumers(SP, default=False)  # format sparkplug
        assert await _seqs(buf, SP) == [4]


async def test_needs_a_consumer(tmp_path: Path) -> None:
    async with Buffer(tmp_path / "b.sqlite") as buf:
        with pytest.raises(ValueError, match="at least one consumer"):
            await buf.use_consumers(default=False)
