"""The Sparkplug B session: the gateway as one edge node, on its own MQTT connection (aiomqtt 2.x).

A connection has one Will. The JSON publisher's is its ``offline`` status; this one's is the NDEATH
with the connection's ``bdSeq``, so Sparkplug runs beside it on a connection of its own (client id
``{client_id}-sparkplug``).

One connection, step by step (Eclipse Sparkplug 3.0):

1. ``bdSeq`` = the previous connection's + 1 (mod 256), kept in the buffer's ``memory`` before the
   CONNECT, so it goes on across restarts (a refused attempt does not use it up); the Will is
   ``NDEATH`` with it (QoS 1, not retained).
2. Subscribe to the primary host's ``spBv1.0/STATE/{host_id}`` (when configured), and to this node's
   ``NCMD`` and its devices' ``DCMD``.
3. With a primary host: wait until its STATE says online. Until then nothing is published, and the
   buffer keeps every row for this session.
4. ``NBIRTH`` (seq 0, ``bdSeq``, ``Node Control/Rebirth``), then a ``DBIRTH`` per asset with every
   metric, its alias, datatype, unit and the newest value and quality (the retained JSON ``state``
   and ``alarms`` snapshots the pipeline commits).
5. The buffer from this consumer's cursor, in ``seq`` order: each telemetry row is a ``DDATA`` of its
   asset (metrics by alias only) with the readings whose value or quality changed since they were
   last sent (report by exception; tag deadbands were applied by the pipeline), each alarm transition
   a ``DDATA`` of the ``Alarms/<rule>/Active`` and ``.../Acked`` flags; events rows need nothing
   (``status`` is a metric). Rows committed before the births go out whole, with ``is_historical``
   true. Devices whose PLC is lost get a ``DDEATH``, and a ``DBIRTH`` when it is back.
6. A Rebirth NCMD: births again (same ``bdSeq``). The primary host going offline: ``NDEATH``,
   disconnect, and back to 1. A stop: ``NDEATH``, clean disconnect.

Delivery: births, data and deaths are QoS 0, as the specification requires (NDEATH QoS 1). A QoS 0
publish returns when the message is written to the socket, which proves nothing, so rows are
acknowledged (the cursor moves, ``Buffer.advance``) only after an UNSUBSCRIBE round trip that follows
them on the same connection: the broker handles a client's packets in order, so its UNSUBACK means
it has taken every DDATA sent before. A connection lost in between sends those rows again (as
historical data) in the next session: at least once, nothing lost while the buffer has room.

Device death: the pipeline reports each device's connectivity after the commit its batch caused
(``devices``); the report is kept with the buffer's last seq at that moment and applied once the
rows before it are published, so a DDEATH never overtakes its device's last data. An asset is dead
when every PLC its tags come from is lost. A dead device has no data: rows of it (alarm transitions
while its PLC is away) are passed over, and its next DBIRTH carries the alarm flags as they are then.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime

import aiomqtt
import orjson

from .. import commands as cmds
from .. import mqttsec
from ..backoff import Backoff
from ..buffer import Buffer, BufferError, Row
from ..codec import Topics
from ..logs import Contained, get
from ..metrics import Metrics
from ..model import Quality, Reading
from ..tagmap import TagMap
from .catalog import Catalog, DeviceDef, MetricKind
from .payload import (
    AlarmFlags,
    CommandError,
    PayloadError,
    Seq,
    dbirth,
    ddata,
    ddeath,
    decode_command,
    decode_state,
    nbirth,
    ndeath,
    next_bd_seq,
)
from .topics import MessageType, command_filters, device_topic, node_topic, state_topic

CONSUMER = "sparkplug"  # the buffer consumer's name (its cursor)
BD_SEQ_KEY = "sparkplug:bd_seq"  # memory key of the last bdSeq used in a CONNECT
BATCH = 256  # rows per read of the buffer, and per acknowledgement round trip
COMMAND_USER = "sparkplug"  # the user of operator commands that come as DCMD


class SparkplugSession:
    """Publishes the buffer as Sparkplug B; ``run()`` until ``stop()``."""

    def __init__(self, *, tag_map: TagMap, buffer: Buffer, metrics: Metrics, password: str | None = None,
                 on_command: Callable[[cmds.Command | cmds.Write], Awaitable[bytes]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        cfg, sp = tag_map.mqtt, tag_map.mqtt.sparkplug
        if sp is None:
            raise ValueError("mqtt.sparkplug is not configured")
        self.cfg = cfg
        self.gateway_id = tag_map.gateway.id
        self.group_id = sp.group_id
        self.edge_node_id = sp.edge_node_id or tag_map.gateway.id
        self.host_id = sp.primary_host_id
        self.catalog = Catalog.from_tag_map(tag_map)
        self.buffer = buffer
        self.metrics = metrics
        self.password = password
        self.on_command = on_command
        self.clock = clock
        topics = Topics(cfg.topic_prefix, tag_map.gateway.id)  # where the pipeline's snapshots are kept
        self._state_topics = {a.id: (topics.asset(a.kind, a.id, "state"), topics.asset(a.kind, a.id, "alarms"))
                              for a in tag_map.assets}
        self._plcs = {a.id: frozenset(t.device for t in a.tags.values()) for a in tag_map.assets}
        self.connected = False
        self.last_error: str | None = None
        self.bd_seq: int | None = None
        self.log = get(component="sparkplug", broker=f"{cfg.host}:{cfg.port}", edge_node=self.edge_node_id)
        self._contained = Contained(self.log, self.metrics.internal_errors.labels("sparkplug").inc)
        self._states: dict[str, bytes] = {}  # JSON state and alarms snapshots, by topic
        self._events: deque[tuple[int, dict[str, bool]]] = deque()  # (last seq committed, device -> connected)
        self._plc_up: dict[str, bool] = {}  # device -> connected, as of the events applied
        self._reported: dict[str, bool] = {}  # device -> connected, as last reported by the pipeline
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._rebirth = False
        self._host_up = False
        self._host_ts = -1  # timestamp of the newest STATE seen
        self._backoff = Backoff(cap=cfg.reconnect_max)
        self._seq = Seq()
        self._born: set[str] = set()  # devices born in this session (a DBIRTH and no DDEATH since)
        self._horizon = 0  # rows up to this seq were committed before the births: historical
        self._settle = False  # deaths found at the births are published once the replay is through
        self._position = 0  # the last row published in this session
        self._sent: dict[tuple[str, str], tuple[object, Quality, str | None]] = {}  # live values as last sent

    # -- called by the pipeline ----------------------------------------------------------------
    def notify(self, states: Iterable[tuple[str, bytes]] = ()) -> None:
        """New rows are in the buffer; ``states`` are snapshots the pipeline just committed."""
        for topic, payload in states:
            self._states[topic] = payload
        self._wake.set()

    def devices(self, connected: Mapping[str, bool]) -> None:
        """The PLCs' connectivity after a commit: its changes apply after the rows committed so far."""
        changed = {d: up for d, up in connected.items() if self._reported.get(d) is not up}
        if changed:
            self._reported.update(changed)
            self._events.append((self.buffer.next_seq - 1, changed))
            self._wake.set()

    # -- lifecycle -----------------------------------------------------------------------------
    async def run(self) -> None:
        self._states = {**dict(await self.buffer.states()), **self._states}
        saved = (await self.buffer.memory(BD_SEQ_KEY)).get(BD_SEQ_KEY)
        previous = int(saved) if saved is not None else None  # the last bdSeq a CONNECT may have carried
        while not self._stopping.is_set():
            again = False
            try:
                if self.bd_seq is None or self.bd_seq == previous:  # the last one was used: the next one
                    bd_seq = next_bd_seq(previous)
                    await self.buffer.append([], (), [(BD_SEQ_KEY, str(bd_seq).encode())])
                    self.bd_seq = bd_seq
                async with self._client(self.bd_seq) as client:
                    previous = self.bd_seq  # the broker holds this Will now
                    self._connected(True)
                    again = await self._session(client)
            except* (aiomqtt.MqttError, mqttsec.TlsFileError) as group:
                self._connected(False, mqttsec.reason(group.exceptions[0], tls=self.cfg.tls is not None))
            except* (BufferError, sqlite3.Error) as group:  # bdSeq not saved: retried like a refused connection
                self._connected(False, f"buffer: {group.exceptions[0]}")
            except* Exception as group:  # a bug in a session must not end the gateway: a new session
                why = self._contained(group.exceptions[0], "sparkplug session failed")
                self._connected(False, f"internal error {why}")
            self.connected = False
            if self._stopping.is_set():
                break
            if again:  # the primary host went offline: reconnect at once and wait for it
                continue
            await self._backoff.pause(self._stopping)

    async def stop(self) -> None:
        """Publish NDEATH and disconnect cleanly (the broker then does not send the Will)."""
        self._stopping.set()
        self._wake.set()

    def _client(self, bd_seq: int) -> aiomqtt.Client:
        tls = self.cfg.tls
        if tls is not None and getattr(self, "_tls_context", None) is None:
            self._tls_context = mqttsec.client_context(tls)
        base = self.cfg.client_id or f"edge-gateway-{self.gateway_id}"
        return aiomqtt.Client(
            self.cfg.host, self.cfg.port, identifier=f"{base}-sparkplug",
            username=self.cfg.username, password=self.password,
            will=aiomqtt.Will(self._node(MessageType.NDEATH), ndeath(bd_seq=bd_seq), qos=1, retain=False),
            clean_session=True, keepalive=int(self.cfg.keepalive), timeout=self.cfg.publish_timeout,
            tls_context=self._tls_context if tls is not None else None,
        )

    def _connected(self, up: bool, error: str | None = None) -> None:
        was, self.connected = self.connected, up
        if up:
            self._backoff.reset()
            self.last_error = None
            self.log.info("broker connected", bd_seq=self.bd_seq, primary_host=self.host_id)
        else:
            if was or error != self.last_error:
                self.log.error("broker connection lost" if was else "broker unreachable", error=error)
            self.last_error = error

    # -- one connection ------------------------------------------------------------------------
    async def _session(self, client: aiomqtt.Client) -> bool:
        """Births and data until a stop (False) or until the primary host goes offline (True)."""
        self._host_up = self.host_id is None
        self._rebirth = False
        timeout = self.cfg.publish_timeout
        async with asyncio.TaskGroup() as tg:
            listener = tg.create_task(self._listen(client), name="sparkplug-commands")
            try:
                if self.host_id is not None:
                    await client.subscribe(state_topic(self.host_id), qos=1, timeout=timeout)
                for topic in command_filters(self.group_id, self.edge_node_id):
                    await client.subscribe(topic, qos=1, timeout=timeout)
                offline = await self._births_and_data(client)
                await client.publish(self._node(MessageType.NDEATH), ndeath(bd_seq=self._bd_seq(), ts=self.clock()),
                                     qos=1, timeout=timeout)
                if offline:
                    self.log.warning("primary host offline: NDEATH sent, data stays in the buffer",
                                     host=self.host_id, backlog=self.buffer.rows)
            finally:
                listener.cancel()
        return offline

    async def _births_and_data(self, client: aiomqtt.Client) -> bool:
        while not self._stopping.is_set():
            if not self._host_up:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._rebirth = False
            await self._births(client)
            await self._drain(client)
            if not self._host_up and not self._stopping.is_set():
                return True
        return False

    async def _births(self, client: aiomqtt.Client) -> None:
        """NBIRTH and the DBIRTHs; what the buffer holds up to now is replayed as historical."""
        horizon, states = self.buffer.next_seq - 1, dict(self._states)  # one instant: no await between
        while self._events and self._events[0][0] <= horizon:
            self._plc_up.update(self._events.popleft()[1])
        self._position = self.buffer.cursor(CONSUMER)
        self._horizon = horizon
        replay = self._position < horizon
        now = self.clock()
        self._seq = Seq()
        payload = nbirth(self.catalog, bd_seq=self._bd_seq(), ts=now)
        self._seq.birth()
        await self._publish(client, self._node(MessageType.NBIRTH), payload)
        self._born = set()
        for device_id in self.catalog.devices:
            if replay or self._alive(device_id):  # a dead device is born for its history, then dies
                await self._dbirth(client, device_id, states)
        self._settle = replay
        self.log.info("births published", bd_seq=self.bd_seq, devices=len(self._born),
                      historical=max(0, horizon - self._position))

    async def _drain(self, client: aiomqtt.Client) -> None:
        """Rows in seq order, device deaths and births between them; acknowledged by round trips."""
        while not self._stopping.is_set() and self._host_up and not self._rebirth:
            self._wake.clear()
            top = self.buffer.next_seq - 1
            rows = await self.buffer.fetch(self._position, BATCH, consumer=CONSUMER)
            sent = 0
            for row in rows:
                await self._plc_events(client, before=row.seq)
                sent += await self._row(client, row)
                self._position = row.seq
            if len(rows) < BATCH:  # every row up to ``top`` is through (or was given up by a full buffer)
                self._position = max(self._position, top)
                await self._plc_events(client, before=self._position + 1)
            if self._position > self.buffer.cursor(CONSUMER):
                await client.unsubscribe(self._node(MessageType.NDATA), timeout=self.cfg.publish_timeout)
                await self.buffer.advance(CONSUMER, self._position)
                self.metrics.publishes.labels("sparkplug").inc(sent)
            if len(rows) < BATCH:
                await self._wake.wait()

    async def _plc_events(self, client: aiomqtt.Client, *, before: int) -> None:
        """Apply the connectivity reports made before row ``before`` was committed."""
        if self._settle and before > self._horizon:  # the replay is through: deaths found at the births
            self._settle = False
            for device_id in sorted(self._born):
                if not self._alive(device_id):
                    await self._ddeath(client, device_id)
        while self._events and self._events[0][0] < before:
            changed = self._events.popleft()[1]
            self._plc_up.update(changed)
            for device_id, plcs in self._plcs.items():
                if plcs.isdisjoint(changed):
                    continue
                alive = self._alive(device_id)
                if device_id in self._born and not alive:
                    await self._ddeath(client, device_id)
                elif device_id not in self._born and alive:
                    await self._dbirth(client, device_id, self._states)

    def _alive(self, device_id: str) -> bool:
        """Dead when every PLC of the asset is known to be lost."""
        return any(self._plc_up.get(plc, True) for plc in self._plcs[device_id])

    # -- messages --------------------------------------------------------------------------------
    async def _dbirth(self, client: aiomqtt.Client, device_id: str, states: Mapping[str, bytes]) -> None:
        device = self.catalog.devices[device_id]
        state_topic_, alarms_topic = self._state_topics[device_id]
        latest, flags = _snapshot(device, states.get(state_topic_), states.get(alarms_topic))
        payload = dbirth(device, seq=self._next_seq(), ts=self.clock(), latest=latest, alarms=flags)
        for d in device.metrics:
            r = latest.get(d.key) if d.kind in (MetricKind.TAG, MetricKind.DERIVED) else None
            self._sent[(device_id, d.key)] = (r.value, r.quality, r.reason) if r else (None, Quality.BAD, None)
        self._seq.next()
        await self._publish(client, self._device(MessageType.DBIRTH, device_id), payload)
        self._born.add(device_id)
        self.log.info("device born", device=device_id)

    async def _ddeath(self, client: aiomqtt.Client, device_id: str) -> None:
        payload = ddeath(seq=self._next_seq(), ts=self.clock())
        self._seq.next()
        await self._publish(client, self._device(MessageType.DDEATH, device_id), payload)
        self._born.discard(device_id)
        self.log.warning("device dead: its PLC is lost", device=device_id)

    async def _row(self, client: aiomqtt.Client, row: Row) -> bool:
        """One buffered row as a DDATA of its asset (nothing for events rows); whether one was sent."""
        leaf = row.topic.rsplit("/", 1)[-1]
        if leaf not in ("telemetry", "alerts"):
            return False
        try:
            doc = orjson.loads(row.payload)
            device_id = doc["asset_id"]
            device = self.catalog.devices.get(device_id)
            if device is None or device_id not in self._born:
                self.log.debug("row of a device not born passed over", seq=row.seq, device=device_id)
                return False
            historical = row.seq <= self._horizon
            readings: list[Reading] = []
            flags: list[AlarmFlags] = []
            if leaf == "telemetry":
                readings = _readings(device, doc)
                if not historical:
                    readings = self._by_exception(device_id, readings)
            else:
                flags = _flags(device, doc)
            if not readings and not flags:
                return False
            payload = ddata(device, seq=self._next_seq(), ts=self.clock(), readings=readings, alarms=flags,
                            historical=historical)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, PayloadError) as exc:
            self.log.error("buffered row not published as Sparkplug", seq=row.seq, error=str(exc))
            return False
        self._seq.next()
        await self._publish(client, self._device(MessageType.DDATA, device_id), payload)
        return True

    def _by_exception(self, device_id: str, readings: list[Reading]) -> list[Reading]:
        """Live readings whose value or quality differs from what was last sent (tag deadbands
        were applied by the pipeline already: Modbus and polled tags without one come every cycle)."""
        out = []
        for r in readings:
            now = (r.value, r.quality, r.reason)
            if self._sent.get((device_id, r.tag)) != now:
                self._sent[(device_id, r.tag)] = now
                out.append(r)
        return out

    async def _publish(self, client: aiomqtt.Client, topic: str, payload: bytes) -> None:
        """QoS 0, not retained (Sparkplug 3.0: births, data and deaths)."""
        await client.publish(topic, payload, qos=0, timeout=self.cfg.publish_timeout)

    def _next_seq(self) -> int:
        """The seq the next message will take (taken only once its payload is built)."""
        last = self._seq.last
        return 0 if last is None else (last + 1) % 256

    def _bd_seq(self) -> int:
        assert self.bd_seq is not None
        return self.bd_seq

    def _node(self, kind: MessageType) -> str:
        return node_topic(self.group_id, kind, self.edge_node_id)

    def _device(self, kind: MessageType, device_id: str) -> str:
        return device_topic(self.group_id, kind, self.edge_node_id, device_id)

    # -- incoming: STATE, NCMD, DCMD -------------------------------------------------------------
    async def _listen(self, client: aiomqtt.Client) -> None:
        host = state_topic(self.host_id) if self.host_id is not None else None
        ncmd = self._node(MessageType.NCMD)
        dcmd = command_filters(self.group_id, self.edge_node_id)[1].removesuffix("+")
        async for message in client.messages:
            topic = str(message.topic)
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            if topic == host:
                self._state(payload)
            elif topic == ncmd:
                self._ncmd(payload)
            elif topic.startswith(dcmd):
                await self._dcmd(topic.rsplit("/", 1)[-1], payload)

    def _state(self, payload: bytes) -> None:
        try:
            state = decode_state(payload)
        except PayloadError as exc:
            self.log.warning("primary host STATE ignored", host=self.host_id, error=str(exc))
            return
        if state.timestamp < self._host_ts:  # an older session's STATE (tck-id-host-topic-phid-*)
            return
        self._host_ts = state.timestamp
        if state.online != self._host_up:
            self.log.info("primary host " + ("online" if state.online else "offline"), host=self.host_id)
        self._host_up = state.online
        self._wake.set()

    def _ncmd(self, payload: bytes) -> None:
        try:
            command = decode_command(payload, self.catalog)
        except CommandError as exc:
            self.log.warning("NCMD refused", error=str(exc))
            return
        if command.rebirth:
            self.log.info("rebirth requested")
            self._rebirth = True
            self._wake.set()

    async def _dcmd(self, device_id: str, payload: bytes) -> None:
        """Writes of tags and alarm acknowledgements, through the gateway's operator commands."""
        try:
            command = decode_command(payload, self.catalog, device_id)
        except CommandError as exc:
            self.log.warning("DCMD refused", device=device_id, error=str(exc))
            return
        for w in command.writes:
            if self.on_command is None:
                self.log.warning("DCMD refused: commands are off", device=device_id, metric=w.metric.name)
                continue
            op: cmds.Command | cmds.Write
            if w.metric.kind is MetricKind.ALARM_ACKED:
                op = cmds.Command(name="acknowledge", alarm_id=f"{device_id}/{w.metric.key}", user=COMMAND_USER)
            else:
                value = w.value
                if not isinstance(value, (bool, int, float, str)):
                    continue
                op = cmds.Write(asset=device_id, tag=w.metric.key, value=value, user=COMMAND_USER)
            reply = orjson.loads(await self.on_command(op))
            if not reply.get("ok"):
                self.log.warning("DCMD not carried out", device=device_id, metric=w.metric.name,
                                 error=reply.get("error"))


# -- the JSON rows and snapshots, back to readings ---------------------------------------------------


def _epoch(iso: object) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if isinstance(iso, str) else None


def _readings(device: DeviceDef, doc: Mapping[str, object]) -> list[Reading]:
    """A telemetry row's readings of metrics the DBIRTH declared."""
    out = []
    asset = str(doc["asset_id"])
    items = doc["readings"]
    if not isinstance(items, list):
        raise TypeError("readings is not a list")
    for r in items:
        tag = r["tag"]
        d = device.find(tag, None)
        if d is None or d.kind not in (MetricKind.TAG, MetricKind.DERIVED):
            continue
        ts = _epoch(r["ts"])
        if ts is None:
            raise ValueError(f"reading of {tag!r} without ts")
        out.append(Reading(asset, tag, r.get("value"), Quality(r["quality"]), r.get("reason"),
                           _epoch(r.get("source_ts")), ts))
    return out


def _flags(device: DeviceDef, doc: Mapping[str, object]) -> list[AlarmFlags]:
    """An alert row (one alarm transition) as its two flags."""
    rule_id = str(doc["rule_id"])
    if device.find(f"Alarms/{rule_id}/Active", None) is None:
        return []
    ts = _epoch(doc["ts"])
    if ts is None:
        raise ValueError(f"alarm transition of {rule_id!r} without ts")
    return [AlarmFlags.of(rule_id, str(doc["state"]), bool(doc["active"]), ts)]


def _snapshot(device: DeviceDef, state: bytes | None,
              alarms: bytes | None) -> tuple[dict[str, Reading], list[AlarmFlags]]:
    """The newest value of each tag and the alarm flags, from the JSON state and alarms snapshots."""
    latest: dict[str, Reading] = {}
    flags: list[AlarmFlags] = []
    asset = device.device_id or ""
    try:
        doc = orjson.loads(state) if state else None
        if isinstance(doc, dict):
            ts = _epoch(doc["ts"]) or 0.0
            reasons = doc.get("reasons") or {}
            for tag, value in doc["values"].items():
                latest[tag] = Reading(asset, tag, value, Quality(doc["quality"][tag]), reasons.get(tag), None, ts)
        items = orjson.loads(alarms) if alarms else []
        for a in items if isinstance(items, list) else []:
            if device.find(f"Alarms/{a['rule_id']}/Active", None) is not None:
                flags.append(AlarmFlags.of(a["rule_id"], a["state"], bool(a["active"]),
                                           _epoch(a.get("since")) or time.time()))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        pass  # a snapshot of an older version: born with what could be read
    return latest, flags
