"""A hostile Modbus TCP server: seeded, it answers correctly most of the time and otherwise with one of
many kinds of bad behaviour, at the framing level a PLC, a gateway or a broken network could show.

Its register map is small and its honest values are recognisable: holding registers 0..3 count up
and stay below ``HONEST_LIMIT``, discrete inputs 0..1 are always on. Every reply that must be rejected
carries ``MARKER`` in its registers and off bits, so a test can tell whether a value that reached the
consumers came from a frame that should never have been taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

HONEST_LIMIT = 1000  # honest register values stay below this
MARKER = 0xBEEF  # every register of a frame that must be rejected
REGISTERS = 4
BITS = 2

# Behaviours for one request. "ok" kinds must be taken; all others must be rejected.
OK = ("ok", "split")
BAD_FRAMES = (
    "tid_zero", "tid_other", "tid_previous", "protocol_id", "unit_other", "function_other",
    "exception_without_code", "mbap_length_0", "mbap_length_1", "mbap_length_huge", "mbap_length_short",
    "byte_count_more", "byte_count_less", "byte_count_huge", "byte_count_lies_up", "byte_count_lies_down",
    "trailing_garbage", "merged_stray", "duplicate", "unsolicited_next",
)
BAD_LINK = ("truncated", "silence", "late", "close_mid_reply", "reset_mid_reply", "exception_reply")
ON_ACCEPT = ("close_on_accept", "reset_on_accept")
KINDS = OK + BAD_FRAMES + BAD_LINK + ON_ACCEPT


@dataclass
class Hostile:
    seed: int = 1
    honest_share: float = 0.6  # of the requests answered correctly
    unit: int = 1
    timeout: float = 0.3  # the client's timeout: "late" replies come after it
    host: str = "127.0.0.1"
    port: int = 0
    only: tuple[str, ...] | None = None  # restrict the bad behaviours (tests of one kind)
    served: Counter[str] = field(default_factory=Counter)
    _server: asyncio.Server | None = None
    _tick: int = 0
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.bad_kinds = tuple(k for k in KINDS if k not in OK and (self.only is None or k in self.only))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    @property
    def bad_served(self) -> int:
        return sum(n for k, n in self.served.items() if k not in OK)

    def _pick(self) -> str:
        if not self.bad_kinds or self.rng.random() < self.honest_share:
            return "ok" if self.rng.random() < 0.8 else "split"
        return self.rng.choice(self.bad_kinds)

    def _registers(self) -> list[int]:
        self._tick += 1
        return [(self._tick + i) % HONEST_LIMIT for i in range(REGISTERS)]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            kind = self._pick()
            if kind in ON_ACCEPT:
                self.served[kind] += 1
                _close(writer, reset=kind == "reset_on_accept")
                return
            await self._serve(reader, writer, first=kind)
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: str) -> None:
        kind: str | None = first if first not in ON_ACCEPT else None
        previous_tid = 0
        while True:
            head = await reader.readexactly(7)
            tid, _pid, length, unit = struct.unpack(">HHHB", head)
            pdu = await reader.readexactly(length - 1)
            if kind is None:
                kind = self._pick()
                while kind in ON_ACCEPT:
                    kind = self._pick()
            self.served[kind] += 1
            go_on = await self._answer(writer, kind, tid, previous_tid, unit, pdu)
            previous_tid = tid
            kind = None
            if not go_on:
                return

    async def _answer(self, writer: asyncio.StreamWriter, kind: str, tid: int, previous_tid: int, unit: int,
                      pdu: bytes) -> bool:
        fc, address, count = struct.unpack(">BHH", pdu[:5])
        honest = self._reply_pdu(fc, address, count, forged=False)
        forged = self._reply_pdu(fc, address, count, forged=True)

        def frame(body: bytes, *, t: int = tid, pid: int = 0, u: int = unit, length: int | None = None) -> bytes:
            return struct.pack(">HHHB", t, pid, len(body) + 1 if length is None else length, u) + body

        send: Callable[[bytes], None] = writer.write
        if kind == "ok":
            send(frame(honest))
        elif kind == "split":
            whole = frame(honest)
            for part in (whole[:3], whole[3:8], whole[8:]):
                send(part)
                await writer.drain()
                await asyncio.sleep(0.005)
        elif kind == "tid_zero":
            send(frame(forged, t=0))
        elif kind == "tid_other":
            send(frame(forged, t=(tid + 7) % 0x10000))
        elif kind == "tid_previous":
            send(frame(forged, t=previous_tid))
        elif kind == "protocol_id":
            send(frame(forged, pid=1))
        elif kind == "unit_other":
            send(frame(forged, u=(unit + 1) % 256))
        elif kind == "function_other":
            send(frame(bytes([3 if fc == 4 else 4]) + forged[1:]))
        elif kind == "exception_without_code":
            send(frame(bytes([fc | 0x80])))
        elif kind == "mbap_length_0":
            send(frame(forged, length=0))
        elif kind == "mbap_length_1":
            send(frame(forged, length=1))
        elif kind == "mbap_length_huge":
            send(frame(forged, length=300) + bytes(300))
        elif kind == "mbap_length_short":  # the header announces less than the PDU that follows
            send(frame(forged, length=len(forged) - 1))
        elif kind == "byte_count_more":  # consistent frame, but more data than asked for
            send(frame(bytes([fc, forged[1] + 2]) + forged[2:] + b"\xbe\xef"))
        elif kind == "byte_count_less":  # consistent frame, but less data than asked for
            send(frame(bytes([fc, forged[1] - 1]) + forged[2:-1]))
        elif kind == "byte_count_huge":  # a bit read answered with 250 data bytes
            send(frame(bytes([fc, 250]) + bytes([0]) * 250 if fc in (1, 2) else bytes([fc, 250]) + b"\xbe\xef" * 125))
        elif kind == "byte_count_lies_up":  # the byte count says more than the frame holds
            send(frame(bytes([forged[0], forged[1] + 2]) + forged[2:]))
        elif kind == "byte_count_lies_down":
            send(frame(bytes([forged[0], forged[1] - 1]) + forged[2:]))
        elif kind == "trailing_garbage":
            send(frame(honest) + b"\x00\x01\x02")
        elif kind == "merged_stray":  # the reply and a forged frame in one segment
            send(frame(honest) + frame(forged, t=(tid + 1) % 0x10000))
        elif kind == "duplicate":
            send(frame(honest) + frame(forged))
        elif kind == "unsolicited_next":  # the reply, then a forged frame before the next request
            send(frame(honest))
            await writer.drain()
            await asyncio.sleep(0.02)
            send(frame(forged, t=(tid + 1) % 0x10000))
        elif kind == "truncated":
            whole = frame(forged)
            send(whole[:self.rng.randrange(1, len(whole))])
        elif kind == "silence":
            pass
        elif kind == "late":
            await asyncio.sleep(self.timeout * 2)
            send(frame(forged))
        elif kind in ("close_mid_reply", "reset_mid_reply"):
            whole = frame(forged)
            send(whole[:self.rng.randrange(1, len(whole))])
            await writer.drain()
            _close(writer, reset=kind == "reset_mid_reply")
            return False
        elif kind == "exception_reply":  # a well-formed exception: the tags go bad, the link stays
            send(frame(bytes([fc | 0x80, 4])))
        else:
            raise AssertionError(kind)
        await writer.drain()
        return True

    def _reply_pdu(self, fc: int, address: int, count: int, *, forged: bool) -> bytes:
        if fc in (3, 4):
            values = [MARKER] * count if forged else [(v if address + i < REGISTERS else 0)
                                                      for i, v in enumerate(self._registers()[:count])] + \
                [0] * max(0, count - REGISTERS)
            return struct.pack(f">BB{count}H", fc, count * 2, *values[:count])
        if fc in (1, 2):
            nbytes = (count + 7) // 8
            data = bytes(nbytes) if forged else bytes([(1 << min(count, 8)) - 1]) + bytes([0xFF] * (nbytes - 1))
            return bytes([fc, nbytes]) + data
        return bytes([fc | 0x80, 1])


def _close(writer: asyncio.StreamWriter, *, reset: bool) -> None:
    sock = writer.get_extra_info("socket")
    if reset and sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    else:
        writer.close()
