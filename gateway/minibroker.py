"""A tiny MQTT 3.1.1 broker for ``edge-gateway demo`` on machines without Mosquitto. Demo only.

Enough of MQTT 3.1.1 for a gateway and a viewer on one machine: CONNECT with Will, PUBLISH QoS 0/1/2
in, retained messages, SUBSCRIBE with + and # wildcards, delivery at QoS 0, PINGREQ, DISCONNECT.
No persistence, no authentication, no sessions: never use it in production or in tests of the
delivery promise (those run against a real Mosquitto).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass, field


def topic_matches(pattern: str, topic: str) -> bool:
    p, t = pattern.split("/"), topic.split("/")
    for i, part in enumerate(p):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(p) == len(t)


def _encode_len(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = divmod(n, 128)
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(data: bytes, pos: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from(">H", data, pos)
    return data[pos + 2 : pos + 2 + n], pos + 2 + n


def _publish_packet(topic: str, payload: bytes, retain: bool = False) -> bytes:
    t = topic.encode()
    body = struct.pack(">H", len(t)) + t + payload
    return bytes([0x30 | int(retain)]) + _encode_len(len(body)) + body


@dataclass(eq=False)
class _Session:
    writer: asyncio.StreamWriter
    filters: set[str] = field(default_factory=set)
    will: tuple[str, bytes, bool] | None = None


class MiniBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self.retained: dict[str, bytes] = {}
        self.sessions: set[_Session] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for s in list(self.sessions):
                s.writer.close()
            await self._server.wait_closed()

    def _route(self, topic: str, payload: bytes, retain: bool) -> None:
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)
        packet = _publish_packet(topic, payload)
        for s in self.sessions:
            if any(topic_matches(f, topic) for f in s.filters):
                s.writer.write(packet)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = _Session(writer)
        clean = False
        try:
            while True:
                head = await reader.readexactly(1)
                length, shift = 0, 0
                while True:
                    b = (await reader.readexactly(1))[0]
                    length |= (b & 0x7F) << shift
                    shift += 7
                    if not b & 0x80:
                        break
                body = await reader.readexactly(length)
                kind, flags = head[0] >> 4, head[0] & 0x0F
                if kind == 1:
                    self._connect(session, body)
                    writer.write(b"\x20\x02\x00\x00")
                    self.sessions.add(session)
                elif kind == 3:
                    self._publish(writer, flags, body)
                elif kind == 6:  # PUBREL -> PUBCOMP
                    writer.write(b"\x70\x02" + body[:2])
                elif kind == 8:
                    self._subscribe(session, body)
                elif kind == 10:  # UNSUBSCRIBE
                    pos = 2
                    while pos < len(body):
                        f, pos = _str(body, pos)
                        session.filters.discard(f.decode())
                    writer.write(b"\xb0\x02" + body[:2])
                elif kind == 12:
                    writer.write(b"\xd0\x00")
                elif kind == 14:
                    clean = True
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, struct.error):
            pass
        finally:
            self.sessions.discard(session)
            if not clean and session.will is not None:
                self._route(*session.will)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _connect(self, session: _Session, body: bytes) -> None:
        _, pos = _str(body, 0)  # protocol name
        flags = body[pos + 1]
        pos += 4  # level, flags, keepalive
        _, pos = _str(body, pos)  # client id
        if flags & 0x04:
            topic, pos = _str(body, pos)
            message, pos = _str(body, pos)
            session.will = (topic.decode(), message, bool(flags & 0x20))

    def _publish(self, writer: asyncio.StreamWriter, flags: int, body: bytes) -> None:
        qos, retain = (flags >> 1) & 3, bool(flags & 1)
        topic, pos = _str(body, 0)
        if qos:
            packet_id = body[pos : pos + 2]
            pos += 2
            writer.write((b"\x40\x02" if qos == 1 else b"\x50\x02") + packet_id)
        self._route(topic.decode(), body[pos:], retain)

    def _subscribe(self, session: _Session, body: bytes) -> None:
        packet_id, pos, granted = body[:2], 2, bytearray()
        new = []
        while pos < len(body):
            f, pos = _str(body, pos)
            pos += 1  # requested QoS; everything is delivered at QoS 0
            new.append(f.decode())
            granted.append(0)
        session.filters.update(new)
        session.writer.write(b"\x90" + _encode_len(2 + len(granted)) + packet_id + bytes(granted))
        for topic, payload in self.retained.items():
            if any(topic_matches(f, topic) for f in new):
                session.writer.write(_publish_packet(topic, payload, retain=True))
