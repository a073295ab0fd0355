"""Modbus TCP framing, pure: request frames out, replies checked against their request.

Modbus Messaging on TCP/IP Implementation Guide v1.0b §3.1.3 (MBAP header): transaction id (2 bytes),
protocol id (2, always 0), length (2: the unit id and the PDU that follow), unit id (1). Modbus
Application Protocol v1.1b3 §6 gives each function's PDU; §7 the exception reply (function code
+ 0x80, one exception code byte).

A reply is taken only when every field answers its request: the transaction id (never a wildcard),
the protocol id, the unit id, the function code, and a byte count exactly what the request implies,
filling exactly the length the MBAP header announces. Anything else is a ``FrameError`` that says
what was wrong; the client drops the connection on it, so a late or stray frame can never answer a
later request. No I/O and no clock here: the client (``client.py``) feeds bytes and sends frames.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MBAP = struct.Struct(">HHHB")  # transaction id, protocol id, length, unit id
HEADER = MBAP.size  # 7
MAX_LENGTH = 254  # unit id + the largest PDU (253 bytes, MODBUS Application Protocol §4.1)
READ_BITS = (1, 2)
READ_REGISTERS = (3, 4)
_READ = struct.Struct(">HHHBBHH")  # MBAP + function code, address, count


class FrameError(ValueError):
    """A reply that does not answer its request (or no frame at all); the message says why."""


@dataclass(frozen=True, slots=True)
class Request:
    """One request on the wire: what its reply must echo."""

    tid: int
    unit: int
    fc: int
    address: int
    count: int  # registers or bits asked for (reads), written (FC 15/16), or 1 (FC 5/6)
    frame: bytes


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply that answers its request: ``exception`` set, or the data of the function."""

    exception: int | None = None
    registers: tuple[int, ...] = ()
    bits: tuple[bool, ...] = ()
    data: bytes = b""  # the registers' bytes as sent (big-endian words), for decoding without a copy
    address: int | None = None  # writes: the echoed address
    value: int | None = None  # writes: the echoed value (FC 5/6) or count (FC 15/16)


def read_request(tid: int, unit: int, fc: int, address: int, count: int) -> Request:
    """FC 1-4: read ``count`` bits or registers from ``address``."""
    if fc not in READ_BITS + READ_REGISTERS:
        raise ValueError(f"function code {fc} is not a read")
    frame = _READ.pack(tid, 0, 6, unit, fc, address, count)
    return Request(tid, unit, fc, address, count, frame)


def write_request(tid: int, unit: int, fc: int, address: int, values: list[int] | list[bool]) -> Request:
    """FC 5 (one coil), FC 6 (one register), FC 16 (registers)."""
    if fc == 5:
        pdu = struct.pack(">BHH", 5, address, 0xFF00 if values[0] else 0x0000)
        count = 1
    elif fc == 6:
        pdu = struct.pack(">BHH", 6, address, int(values[0]))
        count = 1
    elif fc == 16:
        count = len(values)
        pdu = struct.pack(f">BHHB{count}H", 16, address, count, count * 2, *(int(v) for v in values))
    else:
        raise ValueError(f"function code {fc} is not a supported write")
    return Request(tid, unit, fc, address, count, MBAP.pack(tid, 0, len(pdu) + 1, unit) + pdu)


def frame_size(buf: bytes | bytearray) -> int | None:
    """The size of the frame at the start of ``buf`` once its header is in, or None before.

    Raises FrameError for a header whose length cannot be a Modbus frame (the stream has lost its
    framing: nothing after it can be trusted)."""
    if len(buf) < HEADER:
        return None
    length = int.from_bytes(buf[4:6], "big")
    if length < 2:
        raise FrameError(f"MBAP length {length} (a frame holds at least a unit id and a function code)")
    if length > MAX_LENGTH:
        raise FrameError(f"MBAP length {length} (at most {MAX_LENGTH})")
    return HEADER - 1 + length


def check(req: Request, frame: bytes | bytearray) -> Reply:
    """The reply in ``frame`` (exactly one whole frame) if it answers ``req``; FrameError if not."""
    tid, pid, length, unit = MBAP.unpack_from(frame)
    if tid != req.tid:
        raise FrameError(f"transaction id {tid} instead of {req.tid}")
    if pid != 0:
        raise FrameError(f"protocol id {pid} instead of 0")
    if unit != req.unit:
        raise FrameError(f"unit {unit} instead of {req.unit}")
    if len(frame) != HEADER - 1 + length:  # the caller cuts frames by the header: a guard, not a check
        raise FrameError(f"{len(frame)} of the {HEADER - 1 + length} bytes its header announces")
    fc = frame[HEADER]
    pdu = len(frame) - HEADER  # bytes from the function code on
    if fc == req.fc | 0x80:
        if pdu != 2:
            raise FrameError(f"an exception reply of {pdu} bytes (function code and one exception code)")
        return Reply(exception=frame[HEADER + 1])
    if fc != req.fc:
        raise FrameError(f"function code {fc} to a request with {req.fc}")
    if fc in READ_REGISTERS or fc in READ_BITS:
        return _read_reply(req, frame, pdu)
    return _write_reply(req, frame, pdu)


def _read_reply(req: Request, frame: bytes | bytearray, pdu: int) -> Reply:
    want = req.count * 2 if req.fc in READ_REGISTERS else (req.count + 7) // 8
    if pdu < 2:
        raise FrameError("a read reply without its byte count")
    byte_count = frame[HEADER + 1]
    if byte_count != pdu - 2:
        raise FrameError(f"byte count {byte_count} in a frame that holds {pdu - 2} data bytes")
    if byte_count != want:
        what = f"{req.count} registers" if req.fc in READ_REGISTERS else f"{req.count} bits"
        raise FrameError(f"byte count {byte_count} instead of {want} (for {what})")
    data = bytes(frame[HEADER + 2:])
    if req.fc in READ_REGISTERS:
        return Reply(registers=struct.unpack(f">{req.count}H", data), data=data)
    bits = tuple(bool(data[i >> 3] >> (i & 7) & 1) for i in range(req.count))
    return Reply(bits=bits, data=data)


def _write_reply(req: Request, frame: bytes | bytearray, pdu: int) -> Reply:
    if pdu != 5:
        raise FrameError(f"a write reply of {pdu} bytes (5 expected)")
    address, value = struct.unpack_from(">HH", frame, HEADER + 1)
    if address != req.address or (req.fc == 16 and value != req.count):
        echoed = value if req.fc == 16 else req.count
        raise FrameError(f"reply for address {address}+{echoed}, not {req.address}+{req.count}")
    return Reply(address=address, value=value)


def describe_partial(req: Request, buf: bytes | bytearray) -> str:
    """What an incomplete reply (the bytes that came before the timeout) has wrong, or lacks."""
    if len(buf) >= HEADER:
        tid, pid, _length, unit = MBAP.unpack_from(buf)
        if tid != req.tid:
            return f"transaction id {tid} instead of {req.tid}"
        if pid != 0:
            return f"protocol id {pid} instead of 0"
        if unit != req.unit:
            return f"unit {unit} instead of {req.unit}"
        size = frame_size(buf)
        return f"{len(buf)} of the {size} bytes its header announces"
    return f"a {len(buf)}-byte fragment"
