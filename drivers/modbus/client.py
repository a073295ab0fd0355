"""A strict Modbus TCP client: one request in flight, every reply checked against its request.

pymodbus's client takes a reply with transaction id 0 for any request, checks a bit read's byte
count only for being long enough, logs undecodable frames through asyncio's exception handler and,
when the PLC closes the connection while ``connect()`` is still returning, hands back a transport
whose socket is already closed. A gateway that feeds safety alarms cannot take a wrong value for a
good one, so the read and write path is this small asyncio protocol over ``frame.py``, which checks
every field of a reply and drops the connection on anything it does not expect.

Errors are ``ClientError`` subclasses with plain-word reasons; the driver turns them into its
DriverErrors (it knows the device and the request's tags).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from .frame import FrameError, Reply, Request, check, describe_partial, frame_size


class ClientError(Exception):
    """The request got no usable reply."""


class Closed(ClientError):
    """The connection is gone (the PLC closed or reset it, or it was never made)."""


class NoReply(ClientError):
    """Nothing came within the timeout."""


class Rejected(ClientError):
    """Something came that is not the reply (or not only the reply): the connection is dropped."""


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        self.size: int | None = None  # the size of the frame being received, once its header is in
        self.closed: str | None = None  # why the connection is gone
        self.stray: str | None = None  # bytes that came when no request was waiting for them

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            if self.stray is None:
                self.stray = f"{len(self.buf)} bytes came when no request was waiting for them"
            return
        try:
            if self.size is None:
                self.size = frame_size(self.buf)
        except FrameError as exc:
            waiter.set_exception(Rejected(str(exc)))
            return
        if self.size is not None and len(self.buf) >= self.size:
            waiter.set_result(None)

    def eof_received(self) -> bool:
        self._gone("the PLC closed the connection")
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone("the PLC reset the connection" if isinstance(exc, ConnectionResetError)
                   else f"connection lost: {exc}" if exc is not None else "the PLC closed the connection")
        self.transport = None

    def _gone(self, why: str) -> None:
        if self.closed is None:
            self.closed = why
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(Closed(why))


class ModbusTcpClient:
    """One TCP connection to a Modbus server. Not safe for concurrent requests: the caller holds a
    lock (the driver does), since Modbus TCP servers commonly answer one request at a time."""

    def __init__(self, host: str, port: int, *, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._proto: _Protocol | None = None
        self._tid = 0

    @property
    def connected(self) -> bool:
        p = self._proto
        return p is not None and p.closed is None and p.transport is not None and not p.transport.is_closing()

    def next_tid(self) -> int:
        """Transaction ids run 1..65535 and never 0 (a wildcard to some servers)."""
        self._tid = self._tid % 0xFFFF + 1
        return self._tid

    async def connect(self) -> None:
        """Open the connection; Closed (with the OS's reason) when it cannot be made."""
        self.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                _transport, proto = await loop.create_connection(_Protocol, self.host, self.port)
        except TimeoutError:
            raise Closed(f"no connection within {self.timeout:g}s") from None
        except OSError as exc:
            raise Closed(exc.strerror or str(exc)) from exc
        self._proto = proto
        _tune_socket(proto.transport, self.timeout)

    def close(self) -> None:
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.abort()  # an RST, not a FIN: nothing of this connection is wanted any more

    async def request(self, req: Request) -> Reply:
        """Send ``req`` and wait for its reply; on any error the connection is closed."""
        proto = self._proto
        if proto is None:
            raise Closed("not connected")
        try:
            return await self._exchange(proto, req)
        except BaseException:
            self.close()
            raise

    async def _exchange(self, proto: _Protocol, req: Request) -> Reply:
        if proto.closed is not None or proto.transport is None or proto.transport.is_closing():
            raise Closed(proto.closed or "not connected")
        if proto.stray is not None:
            raise Rejected(f"{proto.stray} (after the previous reply)")
        proto.buf.clear()
        proto.size = None
        waiter = proto.waiter = asyncio.get_running_loop().create_future()
        proto.transport.write(req.frame)
        try:
            async with asyncio.timeout(self.timeout):
                await waiter
        except TimeoutError:
            if proto.buf:
                raise Rejected(describe_partial(req, proto.buf)) from None
            raise NoReply(f"no reply in {self.timeout:g}s") from None
        except Closed as exc:
            if proto.buf:
                raise Closed(f"{exc} after {len(proto.buf)} bytes of the reply") from None
            raise
        finally:
            proto.waiter = None
        size = proto.size
        assert size is not None
        frame, rest = bytes(proto.buf[:size]), len(proto.buf) - size
        proto.buf.clear()
        try:
            reply = check(req, frame)
        except FrameError as exc:
            raise Rejected(str(exc)) from None
        if rest:
            raise Rejected(f"{rest} bytes more than the frame its header announces")
        return reply


def _tune_socket(transport: asyncio.Transport | None, timeout: float) -> None:
    """SO_KEEPALIVE and TCP_USER_TIMEOUT catch a half-open connection (PITFALLS.md). A socket the
    PLC already closed again is no error here: the first request finds it closed."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux: unacknowledged data fails the socket
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(max(timeout, 1.0) * 3000))
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
