"""MQTT publisher (aiomqtt 2.x): the only module that imports aiomqtt.

One connection at a time, rebuilt in a loop with jittered backoff. On every connect: birth
``online`` (retained; the Will says ``offline``), the latest retained state of every asset, then
the buffer from its oldest row, in ``seq`` order, with at most ``max_inflight`` QoS 1 messages
awaiting PUBACK. A row is deleted only after its PUBACK. State snapshots go before backlog rows, so
live state is never queued behind an outage's backlog.

It also subscribes to the gateway's command topic and answers every command on ``cmd/reply``.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable

import aiomqtt

from . import codec, mqttsec
from . import commands as cmds
from .backoff import Backoff
from .buffer import Buffer, BufferError, Row
from .codec import Topics
from .logs import Contained, get
from .metrics import Metrics
from .tagmap import MqttConfig


class Publisher:
    def __init__(self, *, cfg: MqttConfig, gateway_id: str, boot_id: str, version: str,
                 buffer: Buffer, metrics: Metrics, password: str | None = None,
                 on_command: Callable[[cmds.Command | cmds.Write], Awaitable[bytes]] | None = None) -> None:
        self.cfg = cfg
        self.gateway_id, self.boot_id, self.version = gateway_id, boot_id, version
        self.buffer = buffer
        self.metrics = metrics
        self.password = password
        self.on_command = on_command
        self.topics = Topics(cfg.topic_prefix, gateway_id)
        self.connected = False
        self.last_error: str | None = None
        self.log = get(component="publisher", broker=f"{cfg.host}:{cfg.port}")
        self._contained = Contained(self.log, metrics.internal_errors.labels("publisher").inc)
        self._wake = asyncio.Event()
        self._dirty: set[str] = set()  # state topics to (re)publish
        self._states: dict[str, bytes] = {}
        self._acked: list[int] = []
        self._stopping = asyncio.Event()
        self._backoff = Backoff(cap=cfg.reconnect_max)

    # -- called by the pipeline --------------------------------------------------------------
    def notify(self, states: Iterable[tuple[str, bytes]] = ()) -> None:
        """New rows are in the buffer; ``states`` are snapshots the pipeline just committed."""
        for topic, payload in states:
            self._states[topic] = payload
            self._dirty.add(topic)
        self._wake.set()

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self) -> None:
        self._states = {**dict(await self.buffer.states()), **self._states}
        while not self._stopping.is_set():
            try:
                async with self._client() as client:
                    self._connected(True)
                    await self._session(client)
            except* (aiomqtt.MqttError, mqttsec.TlsFileError) as group:
                logged = None if self.connected else self._client_log.error  # why a connect was refused
                self._connected(False, mqttsec.reason(group.exceptions[0], tls=self.cfg.tls is not None,
                                                      logged=logged))
            except* Exception as group:  # a bug in a session must not end the gateway: a new session
                why = self._contained(group.exceptions[0], "publisher failed")
                self._connected(False, f"internal error {why}")
            await self._flush_acks()
            if self._stopping.is_set():
                break
            await self._backoff.pause(self._stopping)

    async def stop(self) -> None:
        """Ask the session to publish ``offline`` and disconnect cleanly (the Will is not sent)."""
        self._stopping.set()
        self._wake.set()

    def _status_payload(self, *, online: bool) -> bytes:
        return codec.status(online=online, gateway_id=self.gateway_id, version=self.version,
                            boot_id=self.boot_id, ts=time.time())

    def _client(self) -> aiomqtt.Client:
        """A new client for every connection; TLS exactly when ``mqtt.tls`` is set, its context built once."""
        self._client_log = _SocketErrors()
        tls = self.cfg.tls
        if tls is not None and getattr(self, "_tls_context", None) is None:
            self._tls_context = mqttsec.client_context(tls)  # raises TlsFileError: retried like a refused connect
        client = aiomqtt.Client(
            self.cfg.host, self.cfg.port,
            identifier=self.cfg.client_id or f"edge-gateway-{self.gateway_id}",
            username=self.cfg.username, password=self.password,
            will=aiomqtt.Will(self.topics.status, self._status_payload(online=False), qos=1, retain=True),
            clean_session=True, keepalive=int(self.cfg.keepalive), timeout=self.cfg.publish_timeout,
            max_inflight_messages=self.cfg.max_inflight,
            tls_context=self._tls_context if tls is not None else None,
            logger=self._client_log.logger,
        )
        client.pending_calls_threshold = self.cfg.max_inflight + 16
        return client

    def _connected(self, up: bool, error: str | None = None) -> None:
        was = self.connected
        self.connected = up
        self.metrics.broker_connected.set(1 if up else 0)
        if up:
            self._backoff.reset()
            self.last_error = None
            self.log.info("broker connected", backlog=self.buffer.rows, tls=self.cfg.tls is not None)
        else:
            self.metrics.reconnects.inc()
            if was or error != self.last_error:  # each new reason once, not every retry
                self.log.error("broker connection lost" if was else "broker unreachable", error=error,
                               backlog=self.buffer.rows)
            self.last_error = error

    # -- one connection ----------------------------------------------------------------------
    async def _session(self, client: aiomqtt.Client) -> None:
        await self._status(client, online=True)
        self._dirty.update(self._states)  # retained state may be stale after an outage
        async with asyncio.TaskGroup() as tg:
            acker = tg.create_task(self._ack_loop(), name="publisher-acks")
            listener = tg.create_task(self._commands(client), name="publisher-commands")
            try:
                await self._drain(client, tg)
            finally:
                acker.cancel()
                listener.cancel()
        await self._status(client, online=False)

    async def _drain(self, client: aiomqtt.Client, tg: asyncio.TaskGroup) -> None:
        window = asyncio.Semaphore(self.cfg.max_inflight)
        cursor = 0
        while not self._stopping.is_set():
            self._wake.clear()
            await self._publish_states(client)
            rows = await self.buffer.fetch(cursor, self.cfg.max_inflight)
            if not rows:
                await self._wake.wait()
                continue
            for row in rows:
                await window.acquire()
                tg.create_task(self._send(client, row, window))
                cursor = row.seq
        await self._wait_idle(window)

    async def _wait_idle(self, window: asyncio.Semaphore) -> None:
        for _ in range(self.cfg.max_inflight):
            await window.acquire()

    async def _send(self, client: aiomqtt.Client, row: Row, window: asyncio.Semaphore) -> None:
        self.metrics.inflight.inc()
        try:
            await client.publish(row.topic, row.payload, qos=1, timeout=self.cfg.publish_timeout)
        finally:
            self.metrics.inflight.dec()
            window.release()
        self._acked.append(row.seq)
        self.metrics.publishes.labels("telemetry").inc()
        self.metrics.delivery_latency.observe(max(0.0, time.time() - row.created))

    async def _publish_states(self, client: aiomqtt.Client) -> None:
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()  # a failure ends the session; the next one sends them all

        async def publish(topic: str, payload: bytes) -> None:
            await client.publish(topic, payload, qos=1, retain=True, timeout=self.cfg.publish_timeout)
            self.metrics.publishes.labels("state").inc()

        # In flight together: one PUBACK round trip for all, not one per asset (a hundred assets'
        # states in turn held the backlog up by as many round trips at each pass).
        await asyncio.gather(*(publish(topic, self._states[topic]) for topic in sorted(dirty)
                               if topic in self._states))

    async def _status(self, client: aiomqtt.Client, *, online: bool) -> None:
        await client.publish(self.topics.status, self._status_payload(online=online), qos=1, retain=True,
                             timeout=self.cfg.publish_timeout)

    async def _commands(self, client: aiomqtt.Client) -> None:
        """Answer each command in arrival order; a command never blocks publishing."""
        if self.on_command is None:
            return
        await client.subscribe(self.topics.command("+"), qos=1, timeout=self.cfg.publish_timeout)
        async for message in client.messages:
            name = str(message.topic).rsplit("/", 1)[-1]
            if name == "reply":
                continue  # our own answers, on a topic under the same filter
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            try:
                command = cmds.parse(name, payload)
            except cmds.Rejected as exc:
                self.metrics.commands.labels(name if name in cmds.SCHEMAS else "unknown", "rejected").inc()
                self.log.warning("command rejected", command=name[:64], error=str(exc))
                answer = cmds.reply(gateway_id=self.gateway_id, command=name[:64], request_id=exc.request_id,
                                    ts=time.time(), error=str(exc))
            else:
                answer = await self.on_command(command)
            await client.publish(self.topics.command("reply"), answer, qos=1, timeout=self.cfg.publish_timeout)

    async def _ack_loop(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            await self._flush_acks()

    async def _flush_acks(self) -> None:
        if self._acked:
            acked, self._acked = self._acked, []
            try:
                await self.buffer.delete(acked)
            except (BufferError, sqlite3.Error) as exc:  # a full or broken disk: try again next time
                self._acked = acked + self._acked
                self.metrics.buffer_errors.labels("delete").inc()
                self.log.error("acknowledged rows not deleted yet", rows=len(acked), error=str(exc))
                return
            self.metrics.buffer_rows.set(self.buffer.rows)


class _SocketErrors(logging.Handler):
    """Keeps the last socket error the MQTT client logged for one connection (a TLS alert after the
    handshake is only logged), and passes every record on to the client's usual logger."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.error: BaseException | None = None
        self.logger = logging.Logger("mqtt.connection")  # not registered: one per connection, then freed
        self.logger.parent = logging.getLogger("mqtt")
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        self.error = next((a for a in args if isinstance(a, BaseException)), self.error)
