"""Modbus TCP framing (drivers/modbus/frame.py): requests byte for byte, and every reply field checked.

The reference replies are built here by hand from the specification (Modbus Messaging on TCP/IP
§3.1.3, Modbus Application Protocol §6.1-6.4, 6.5, 6.6, 6.12, §7), not with the code under test.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.modbus.frame import (
    FrameError,
    Reply,
    check,
    describe_partial,
    frame_size,
    read_request,
    write_request,
)


def _mbap(tid: int, unit: int, pdu: bytes, pid: int = 0) -> bytes:
    return struct.pack(">HHHB", tid, pid, len(pdu) + 1, unit) + pdu


def _registers_reply(tid: int, unit: int, fc: int, values: list[int]) -> bytes:
    return _mbap(tid, unit, bytes([fc, 2 * len(values)]) + b"".join(v.to_bytes(2, "big") for v in values))


def _bits_reply(tid: int, unit: int, fc: int, bits: list[bool]) -> bytes:
    data = bytearray((len(bits) + 7) // 8)
    for i, b in enumerate(bits):
        data[i // 8] |= b << (i % 8)
    return _mbap(tid, unit, bytes([fc, len(data)]) + bytes(data))


def test_read_request_is_the_specification_example() -> None:
    # Modbus Application Protocol §6.3: read holding registers 108-110 (address 107, 3 registers).
    req = read_request(0x1234, 17, 3, 107, 3)
    assert req.frame == bytes.fromhex("1234 0000 0006 11 03 006B 0003")


@pytest.mark.parametrize(("fc", "values", "pdu"), [
    (5, [True], "05 00AC FF00"),  # §6.5: coil 173 on
    (5, [False], "05 00AC 0000"),
    (6, [3], "06 0001 0003"),  # §6.6: register 2 to 3
    (16, [0x000A, 0x0102], "10 0001 0002 04 000A 0102"),  # §6.12
])
def test_write_requests(fc: int, values: list[int] | list[bool], pdu: str) -> None:
    address = 0xAC if fc == 5 else 1
    req = write_request(7, 1, fc, address, values)
    body = bytes.fromhex(pdu)
    assert req.frame == struct.pack(">HHHB", 7, 0, len(body) + 1, 1) + body


@given(st.integers(1, 0xFFFF), st.integers(0, 247), st.sampled_from([3, 4]),
       st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=125))
def test_honest_register_replies_are_taken(tid: int, unit: int, fc: int, values: list[int]) -> None:
    req = read_request(tid, unit, fc, 0, len(values))
    frame = _registers_reply(tid, unit, fc, values)
    assert frame_size(frame) == len(frame)
    reply = check(req, frame)
    assert reply.registers == tuple(values)
    assert reply.data == frame[9:]


@given(st.integers(1, 0xFFFF), st.integers(0, 247), st.sampled_from([1, 2]),
       st.lists(st.booleans(), min_size=1, max_size=2000))
def test_honest_bit_replies_are_taken(tid: int, unit: int, fc: int, bits: list[bool]) -> None:
    reply = check(read_request(tid, unit, fc, 0, len(bits)), _bits_reply(tid, unit, fc, bits))
    assert reply.bits == tuple(bits)


@pytest.mark.parametrize(("fc", "count"), [(3, 1), (3, 36), (4, 125), (1, 1), (2, 2), (2, 9), (1, 2000)])
def test_every_changed_header_byte_is_rejected(fc: int, count: int) -> None:
    """Transaction id, protocol id, length, unit id, function code and byte count: any other value of
    any of their bytes is no reply to the request (exhaustively, byte by byte)."""
    req = read_request(0x0102, 5, fc, 0, count)
    honest = (_registers_reply(0x0102, 5, fc, list(range(count))) if fc in (3, 4)
              else _bits_reply(0x0102, 5, fc, [True] * count))
    for i in range(9):
        for value in range(256):
            if value == honest[i]:
                continue
            forged = honest[:i] + bytes([value]) + honest[i + 1:]
            with pytest.raises(FrameError):
                size = frame_size(forged)
                if size is None or size > len(forged):
                    raise FrameError("incomplete")  # the client waits for more, then reports it partial
                check(req, forged[:size])
                if size < len(forged):
                    raise FrameError("bytes after the frame")  # the client rejects what follows


def test_transaction_id_zero_is_no_wildcard() -> None:
    req = read_request(9, 1, 3, 0, 2)
    with pytest.raises(FrameError, match="transaction id 0 instead of 9"):
        check(req, _registers_reply(0, 1, 3, [1, 2]))


@pytest.mark.parametrize(("frame", "reason"), [
    (_mbap(1, 1, bytes([2, 250]) + bytes(250)), "byte count 250 instead of 1 (for 2 bits)"),
    (_mbap(1, 1, bytes([2, 2, 3, 0])), "byte count 2 instead of 1 (for 2 bits)"),
    (_mbap(1, 1, bytes([2, 0])), "byte count 0 instead of 1 (for 2 bits)"),
    (_mbap(1, 1, bytes([2, 2, 3])), "byte count 2 in a frame that holds 1 data bytes"),
    (_mbap(1, 1, bytes([0x82])), "an exception reply of 1 bytes"),
    (_mbap(1, 1, bytes([0x82, 4, 0])), "an exception reply of 3 bytes"),
    (_mbap(1, 1, bytes([4, 1, 3])), "function code 4 to a request with 2"),
    (_mbap(1, 1, bytes([2])), "a read reply without its byte count"),
])
def test_bit_read_replies_that_must_be_rejected(frame: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        check(read_request(1, 1, 2, 0, 2), frame)


def test_an_exception_reply_is_taken_with_its_code() -> None:
    assert check(read_request(1, 1, 3, 0, 2), _mbap(1, 1, bytes([0x83, 2]))) == Reply(exception=2)


@pytest.mark.parametrize(("length", "reason"), [(0, "MBAP length 0"), (1, "MBAP length 1"),
                                                (255, "MBAP length 255 (at most 254)")])
def test_impossible_lengths_lose_the_framing(length: int, reason: str) -> None:
    with pytest.raises(FrameError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        frame_size(struct.pack(">HHHB", 1, 0, length, 1))


@given(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=125), st.data())
def test_truncation_at_every_position_is_incomplete(values: list[int], data: st.DataObject) -> None:
    frame = _registers_reply(3, 1, 3, values)
    cut = data.draw(st.integers(0, len(frame) - 1))
    part = frame[:cut]
    size = frame_size(part)
    assert size is None or size > len(part)
    why = describe_partial(read_request(3, 1, 3, 0, len(values)), part)
    assert why == (f"a {cut}-byte fragment" if cut < 7 else f"{cut} of the {len(frame)} bytes its header announces")


@pytest.mark.parametrize(("fc", "values", "echo", "reason"), [
    (6, [5], (1, 5), None),
    (6, [5], (1, 7), None),  # the echoed value is not compared: the read back decides
    (6, [5], (2, 5), "reply for address 2"),
    (16, [1, 2, 3], (1, 3), None),
    (16, [1, 2, 3], (1, 2), "reply for address 1\\+2, not 1\\+3"),
    (5, [True], (1, 0xFF00), None),
])
def test_write_replies_echo_their_request(fc: int, values: list[int], echo: tuple[int, int],
                                          reason: str | None) -> None:
    req = write_request(4, 1, fc, 1, values)
    frame = _mbap(4, 1, struct.pack(">BHH", fc, *echo))
    if reason is None:
        assert check(req, frame).address == echo[0]
    else:
        with pytest.raises(FrameError, match=reason):
            check(req, frame)
