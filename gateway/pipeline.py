"""Readings -> rules -> sequenced messages and state snapshots, committed to the buffer in batches.

Batching is adaptive: the pipeline takes every batch already queued, commits them in one
transaction, then wakes the publisher. Under light load each poll commits alone (lowest latency);
under heavy load commits grow (highest throughput).

The alarm engine lives here, so a reading, the alarm transition it causes and the alarm state the
gateway must remember are committed together: after a crash the three agree. Operator commands come
through the same queue as readings and are answered only once their effect is committed.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from functools import partial
from operator import attrgetter

import orjson
from prometheus_client import Counter

from . import codec
from . import commands as cmds
from .batches import BatchTracker
from .buffer import ALERT, EVENT, PRIORITY_NAMES, TELEMETRY, Buffer, BufferError, Message
from .codec import Topics
from .derived import Derived
from .exception import Deadband, deadbands
from .logs import Contained, get
from .metrics import Metrics
from .model import Quality, Reading
from .poller import DeviceBatch
from .rules import AssetInfo, CommandError, Engine, State, Transition
from .shifts import ShiftTracker
from .tagmap import TagMap

Item = DeviceBatch | cmds.Command | cmds.Write | None
STATUS_TAG = "status"  # a change of this tag is an `events` message
_RECORDS = ("/batches", "/shifts")  # topics whose last message is also kept retained on .../last
DERIVED_SAVE_EVERY = 10.0  # seconds between saves of derived counters (and at every stop)
CLOCK_JUMP = 2.0  # seconds the wall clock may drift from the monotonic clock between commits before it counts as a step
_Pending = tuple[str, str, int, Callable[..., bytes]]  # asset, topic, priority, payload(seq=...)
_GOOD = Quality.GOOD
_TAG = attrgetter("tag")
_QUALITY = attrgetter("quality")


_PLAIN = (type(None), bool, int, float, str)  # value types every payload can carry
HANDOVER = 1.0  # seconds: state saved less than this before a restore was handed over (a reload), not a stop


def _resumed(saved: object, key: str, now: float) -> float:
    """When a tracker's saved state resumes: ``now`` after a stop (the time away is a gap), or the time it
    was saved when a reload handed it over a moment ago (no gap: the values held stay good)."""
    last = saved.get(key) if isinstance(saved, dict) else None
    return last if isinstance(last, (int, float)) and 0 <= now - last < HANDOVER else now


def _unsequenced(payload: bytes) -> bytes:
    doc = orjson.loads(payload)
    doc.pop("seq", None)
    return orjson.dumps(doc)


def _plain(r: Reading) -> Reading:
    """``r``, or a bad reading in its place when its value is of a type no payload can carry."""
    if type(r.value) in _PLAIN:
        return r
    return r._replace(value=None, quality=Quality.BAD,
                      reason=f"internal: a value of type {type(r.value).__name__} cannot be published")


class Pipeline:
    def __init__(self, *, tag_map: TagMap, buffer: Buffer, queue: asyncio.Queue[Item],
                 boot_id: str, metrics: Metrics, on_commit: Callable[[list[tuple[str, bytes]]], None],
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 on_devices: Callable[[dict[str, bool]], None] | None = None) -> None:
        self.tag_map = tag_map
        self.buffer = buffer
        self.queue = queue
        self.boot_id = boot_id
        self.metrics = metrics
        self.on_commit = on_commit  # called with the state snapshots just committed
        self.on_devices = on_devices  # called after a commit with the connectivity of the devices it read
        self.clock = clock
        self.monotonic = monotonic
        self._clocks: tuple[float, float] | None = None  # (wall, monotonic) at the last commit
        self.gateway_id = tag_map.gateway.id
        self.topics = Topics(tag_map.mqtt.topic_prefix, tag_map.gateway.id)
        self.assets = {a.id: a for a in tag_map.assets}
        # report by exception: (asset, tag) -> its band, max silence and last report; absent: every reading
        self.deadbands: dict[tuple[str, str], Deadband] = deadbands(tag_map)
        self._banded = {asset for asset, _ in self.deadbands}  # assets where a reading may stay unreported
        self._with_status = {a.id for a in tag_map.assets if STATUS_TAG in a.tags or STATUS_TAG in a.derived}
        self.latest: dict[str, dict[str, Reading]] = defaultdict(dict)  # last reading per tag
        self.statuses: dict[str, object] = {}  # last good status per asset
        calendar = tag_map.gateway.calendar()
        self.derived = {a.id: Derived(a.id, a.derived, calendar) for a in tag_map.assets if a.derived}
        self._derived_saved: dict[str, float] = {}  # asset -> when its derived state was last remembered
        self.engine = Engine(
            (AssetInfo(id=a.id, name=a.name, rules=tuple(a.rules),
                       devices={n: t.device for n, t in a.tags.items()},
                       units={**{n: t.unit for n, t in a.tags.items()}, **{n: d.unit for n, d in a.derived.items()}})
             for a in tag_map.assets),
            start=clock(),
        )
        self.batches = {a.id: BatchTracker(a.id, a.batch, a.rules, units={n: t.unit for n, t in a.tags.items()},
                                           devices={n: t.device for n, t in a.tags.items()})
                        for a in tag_map.assets if a.batch is not None}
        self._batches_of: dict[str, list[BatchTracker]] = defaultdict(list)  # device -> trackers of its tags
        for bt in self.batches.values():
            for device in set(bt.devices.values()):
                self._batches_of[device].append(bt)
        self._raised_in: dict[str, dict[str, object]] = {}  # alarm id -> batch context when it was raised
        names = tag_map.gateway.shift_names
        self.shifts = {a.id: ShiftTracker(a.id, a.production, calendar, names)
                       for a in tag_map.assets if a.production is not None}
        self._shifts_of: dict[str, list[ShiftTracker]] = defaultdict(list)  # device -> trackers of its stations
        for a in tag_map.assets:
            if a.production is not None:
                for device in {t.device for n, t in a.tags.items() if n in a.production.inputs()}:
                    self._shifts_of[device].append(self.shifts[a.id])
        self.log = get(component="pipeline")
        self._restored = False
        self._reading_counters: dict[tuple[str, Quality], Counter] = {}  # metrics.readings' children
        self._contained = Contained(self.log, metrics.internal_errors.labels("pipeline").inc)

    # -- running ---------------------------------------------------------------------------------
    async def run(self) -> None:
        """Commit batches until a ``None`` arrives (shutdown: everything before it is committed)."""
        await self.restore()
        while True:
            items: list[Item] = []
            deadline = self.next_deadline()
            try:
                async with asyncio.timeout_at(None if deadline is None else
                                              asyncio.get_running_loop().time() + max(0.01, deadline - self.clock())):
                    items.append(await self.queue.get())
            except TimeoutError:
                pass  # a delay ran out, a value went stale, a shelving expired: tick
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            done = None in items
            batch = [i for i in items if i is not None]
            try:
                await self.commit(batch, final=done)
            except Exception as exc:  # one bad input must not stop every device's data
                await self._contain(batch, exc)
            if done:
                return

    async def submit(self, command: cmds.Command | cmds.Write, timeout: float) -> bytes:
        """Queue an operator command; its reply once the effect is committed."""
        loop = asyncio.get_running_loop()
        command.reply = loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await self.queue.put(command)
                return await command.reply
        except TimeoutError:
            return self._reply(command, error="the gateway did not answer in time; nothing may have changed")

    async def restore(self) -> None:
        """Alarm states and last statuses from the buffer; the retained alarms of every asset."""
        if self._restored:
            return
        self._restored = True
        memory = await self.buffer.memory("")
        dropped = 0
        for key, raw in memory.items():
            kind, _, ident = key.partition(":")
            try:
                value = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if kind == "alarm" and isinstance(value, dict):
                dropped += not self.engine.restore(ident, value)
                if isinstance(value.get("batch"), dict):
                    self._raised_in[ident] = value["batch"]
            elif kind == "shift" and ident in self.shifts:
                self.shifts[ident].restore(value, _resumed(value, "seen", self.clock()))
            elif kind == "batch" and ident in self.batches:
                if not self.batches[ident].restore(value, _resumed(value, "last", self.clock())):
                    self.log.warning("batch state not restored (changed format)", asset=ident)
            elif kind == "status" and ident in self.assets:
                self.statuses[ident] = value
            elif kind == "derived" and ident in self.derived and isinstance(value, dict):
                self.derived[ident].restore(value, self.clock())
        if dropped:
            self.log.warning("alarm states not restored (rule gone or changed)", alarms=dropped)
        states = [self._alarms_state(a) for a in self.assets if self.assets[a].rules]
        await self.buffer.append([], states)
        self._alarm_counts()
        self.on_commit(states)

    # -- one commit ------------------------------------------------------------------------------
    async def commit(self, items: list[DeviceBatch | cmds.Command | cmds.Write], *, final: bool = False) -> None:
        """Commit what ``items`` cause; ``final``: the last commit before a stop (save everything)."""
        now = self._now()
        pending: list[_Pending] = []
        transitions: list[Transition] = self.engine.tick(now)
        states: list[tuple[str, bytes]] = []
        memory: list[tuple[str, bytes]] = []
        by_asset: dict[str, list[Reading]] = defaultdict(list)
        commands: list[cmds.Command | cmds.Write] = []
        devices: dict[str, bool] = {}
        answered: dict[str, ShiftTracker] = {}
        summaries: list[tuple[str, list[dict[str, object]]]] = []
        for item in items:
            if isinstance(item, (cmds.Command, cmds.Write)):
                commands.append(item)
                continue
            devices[item.device] = item.connected
            transitions += self.engine.device(item.device, item.connected, now)
            self._device_seen(item, now, answered, summaries)
            for r in item.readings:
                by_asset[r.asset].append(r)
        for asset_id, readings in by_asset.items():
            derived = self.derived.get(asset_id)
            if derived is not None:
                readings.extend(derived.update(readings, now))
            tracker = self.batches.get(asset_id)
            if tracker is not None:  # before the alerts: they carry the batch running when they happened
                self._batch(tracker, readings, pending, memory, now)
            self._telemetry(asset_id, readings, pending, states, memory, now=now)
            transitions += self.engine.update(readings, now)
        self._plant_context(answered, summaries, by_asset, pending=pending, memory=memory, now=now, final=final)
        for asset_id, derived in self.derived.items():
            if final or now - self._derived_saved.get(asset_id, 0.0) >= DERIVED_SAVE_EVERY:
                self._derived_saved[asset_id] = now
                memory.append((f"derived:{asset_id}", orjson.dumps(derived.snapshot())))
        replies: list[tuple[cmds.Command | cmds.Write, bytes]] = []
        for command in commands:
            if isinstance(command, cmds.Write):
                replies.append((command, self._written(command, pending)))
                continue
            t, reply = self._apply(command, now)
            transitions += t
            replies.append((command, reply))
        if transitions:
            for bt in self.batches.values():
                bt.alarms(transitions)
        self._alerts(transitions, pending, states, memory)
        if not pending and not states and not memory:
            self._answer(replies)
            self._devices(devices)
            return
        rows = self._numbered(pending)
        # The last record also retained, without its seq: the sequenced message is the one to count
        states += [(r.topic + "/last", _unsequenced(r.payload)) for r in rows if r.topic.endswith(_RECORDS)]
        try:
            await self.buffer.append(rows, states, memory)
        except (sqlite3.Error, BufferError) as exc:
            # Not a full buffer (the buffer makes room for itself), but a broken disk or database.
            self.metrics.buffer_errors.labels("append").inc()
            for row in rows:
                self.metrics.drops.labels("buffer_error", PRIORITY_NAMES[row.priority]).inc()
            self.log.error("buffer write failed, messages dropped", rows=len(rows), error=str(exc))
            self._answer([(c, self._reply(c, error=f"buffer write failed: {exc}")) for c, _ in replies])
            return
        self.metrics.buffer_rows.set(self.buffer.rows)
        self._alarm_metrics(transitions)
        self._answer(replies)
        self.on_commit(states)
        self._devices(devices)

    async def _contain(self, items: list[DeviceBatch | cmds.Command | cmds.Write], exc: Exception) -> None:
        """``commit`` raised on these items (a bug, or an input nothing foresaw): keep their readings as
        plain telemetry (no rules, no derived values, every reading), answer their commands with the
        error, count it, and log the traceback once per kind of error."""
        what = self._contained(exc, "pipeline failed on a batch; its readings are kept without rules")
        pending: list[_Pending] = []
        for item in items:
            if isinstance(item, DeviceBatch):
                by_asset: dict[str, list[Reading]] = defaultdict(list)
                for r in item.readings:
                    by_asset[r.asset].append(_plain(r))
                pending += [self._telemetry_message(asset_id, readings)
                            for asset_id, readings in by_asset.items() if asset_id in self.assets]
            else:
                self._answer([(item, self._reply(item, error=f"internal error: {what}"))])
        rows = self._numbered(pending)
        try:
            await self.buffer.append(rows)
        except Exception as again:
            for row in rows:
                self.metrics.drops.labels("internal", PRIORITY_NAMES[row.priority]).inc()
            self.log.error("readings of a failed batch dropped", rows=len(rows), error=str(again))
            return
        self.on_commit([])

    def _numbered(self, pending: list[_Pending]) -> list[Message]:
        """The pending messages as buffer rows, numbered from the buffer's next seq."""
        seq = self.buffer.next_seq
        return [Message(seq + i, topic, make(seq=seq + i), asset, prio)
                for i, (asset, topic, prio, make) in enumerate(pending)]

    def _telemetry_message(self, asset_id: str, readings: list[Reading]) -> _Pending:
        asset = self.assets[asset_id]
        return (asset_id, self.topics.asset(asset.kind, asset_id, "telemetry"), TELEMETRY,
                partial(codec.telemetry, gateway_id=self.gateway_id, boot_id=self.boot_id, asset_id=asset_id,
                        readings=readings))

    def _batch(self, tracker: BatchTracker, readings: list[Reading], pending: list[_Pending],
               memory: list[tuple[str, bytes]], now: float) -> None:
        """The asset's batch: its events and records as messages, its state in the same commit."""
        asset = self.assets[tracker.asset_id]
        for doc in tracker.update(readings, now):
            record = doc["event"] == "batch-record"
            pending.append((asset.id, self.topics.asset(asset.kind, asset.id, "batches" if record else "events"),
                            ALERT if record else EVENT,
                            partial(codec.batch, doc, gateway_id=self.gateway_id, asset_id=asset.id,
                                    asset_name=asset.name, kind=asset.kind)))
            if record:
                self.log.info("batch ended", asset=asset.id, batch_id=doc["batch_id"], passed=doc["passed"],
                              reason=doc["reason"])
        memory.append((f"batch:{asset.id}", orjson.dumps(tracker.snapshot())))

    def _device_seen(self, item: DeviceBatch, now: float, answered: dict[str, ShiftTracker],
                     summaries: list[tuple[str, list[dict[str, object]]]]) -> None:
        """A device answered or was lost: the batches and shifts of its assets learn it. A station whose
        device answered is observed, even without a reading of it (``answered``, updated later)."""
        for bt in self._batches_of.get(item.device, ()):
            bt.device(item.device, item.connected, now)
        for st in self._shifts_of.get(item.device, ()):
            if item.connected:
                answered.setdefault(st.asset_id, st)
            else:
                summaries.append((st.asset_id, st.device(False, now)))

    def _plant_context(self, answered: dict[str, ShiftTracker], summaries: list[tuple[str, list[dict[str, object]]]],
                       by_asset: dict[str, list[Reading]], *, pending: list[_Pending],
                       memory: list[tuple[str, bytes]], now: float, final: bool) -> None:
        """Shifts: the observed stations' readings, the boundaries passed, their summaries. At the last
        commit before a stop or a reload the batches ran until now, and that is saved."""
        for asset_id, st in answered.items():
            summaries.append((asset_id, st.update(by_asset.get(asset_id, ()), now)))
        for asset_id, st in self.shifts.items():
            summaries.append((asset_id, st.tick(now)))
        self._shift_summaries(summaries, pending, memory, now, final=final)
        if final:
            for bt in self.batches.values():
                bt.touch(now)
                memory.append((f"batch:{bt.asset_id}", orjson.dumps(bt.snapshot())))

    def _shift_summaries(self, summaries: list[tuple[str, list[dict[str, object]]]], pending: list[_Pending],
                         memory: list[tuple[str, bytes]], now: float, *, final: bool) -> None:
        """Summaries of shifts that ended, as messages; a station's shift state is saved with them (so a
        summary is never sent twice), every DERIVED_SAVE_EVERY seconds and at a stop."""
        with_summary: set[str] = set()
        for asset_id, docs in summaries:
            asset = self.assets[asset_id]
            for doc in docs:
                with_summary.add(asset_id)
                pending.append((asset_id, self.topics.asset(asset.kind, asset_id, "shifts"), ALERT,
                                partial(codec.shift, doc, gateway_id=self.gateway_id, asset_id=asset_id,
                                        asset_name=asset.name, ts=now)))
                self.log.info("shift ended", asset=asset_id, shift=doc["shift"], shift_date=doc["shift_date"],
                              units=doc["units_produced"], complete=doc["complete"])
        for asset_id, st in self.shifts.items():
            key = f"shift:{asset_id}"
            if final or asset_id in with_summary or now - self._derived_saved.get(key, 0.0) >= DERIVED_SAVE_EVERY:
                self._derived_saved[key] = now
                memory.append((key, orjson.dumps(st.snapshot())))

    def next_deadline(self) -> float | None:
        """When the pipeline must commit even without input: an alarm timer, or a shift's end."""
        times = [t for t in (self.engine.next_deadline(), *(st.next_boundary() for st in self.shifts.values()))
                 if t is not None]
        return min(times) if times else None

    def _context(self, asset_id: str) -> dict[str, object] | None:
        tracker = self.batches.get(asset_id)
        return tracker.context() if tracker is not None else None

    def _devices(self, devices: dict[str, bool]) -> None:
        """Device connectivity, once what the devices' batches caused is committed (Sparkplug DDEATH)."""
        if devices and self.on_devices is not None:
            self.on_devices(devices)

    def _now(self) -> float:
        """Wall time for this commit. A step of the wall clock (NTP, an operator) moves the alarm
        timers with it: ordering is by ``seq`` anyway, and durations follow the monotonic clock."""
        now, mono = self.clock(), self.monotonic()
        if self._clocks is not None:
            jump = (now - self._clocks[0]) - (mono - self._clocks[1])
            if abs(jump) > CLOCK_JUMP:
                self.engine.shift(jump)
                self.log.warning("wall clock stepped", seconds=round(jump, 3))
        self._clocks = (now, mono)
        return now

    def _telemetry(self, asset_id: str, readings: list[Reading], pending: list[_Pending],
                   states: list[tuple[str, bytes]], memory: list[tuple[str, bytes]], *,
                   now: float) -> None:
        asset = self.assets[asset_id]
        self._count(asset_id, readings)
        report = [r for r in readings if self._report(r, now)] if asset_id in self._banded else readings
        if report:
            pending.append(self._telemetry_message(asset_id, report))
        # One pass (per value: keep it lean): status changes, and whether anything reported differs from
        # the state snapshot (value, quality or reason). The snapshot holds what telemetry reported, so
        # a value moving inside its deadband republishes neither.
        latest = self.latest[asset_id]
        last = latest.get
        changed = False
        for r in report:
            old = last(r.tag)
            if old is None or old.value != r.value or old.quality is not r.quality or old.reason != r.reason:
                changed = True
                break
        for r in readings if asset_id in self._with_status else ():
            if r.tag == STATUS_TAG and r.quality is _GOOD and r.value != self.statuses.get(asset_id):
                old_status = self.statuses.get(asset_id)
                self.statuses[asset_id] = r.value
                memory.append((f"status:{asset_id}", orjson.dumps(r.value)))
                if old_status is not None:  # the first status ever seen is no change
                    pending.append((asset_id, self.topics.asset(asset.kind, asset_id, "events"), EVENT,
                                    partial(codec.event, gateway_id=self.gateway_id, asset_id=asset_id,
                                            asset_name=asset.name, kind=asset.kind, tag=r.tag, old=old_status,
                                            new=r.value, ts=r.ts, batch=self._context(asset_id))))
        if changed:
            latest.update(zip(map(_TAG, report), report, strict=True))
            topic = self.topics.asset(asset.kind, asset_id, "state")
            states.append((topic, codec.state(asset_id=asset_id, asset_name=asset.name,
                                              kind=asset.kind, ts=self.clock(), latest=latest)))

    def _alerts(self, transitions: list[Transition], pending: list[_Pending], states: list[tuple[str, bytes]],
                memory: list[tuple[str, bytes]]) -> None:
        changed: dict[str, None] = {}
        for t in transitions:
            asset = self.assets[t.asset_id]
            context = self._context(t.asset_id)
            saved = self.engine.snapshot(t.alarm_id)
            if context is not None:
                if t.trigger == "condition" and t.active and t.state is State.ACTIVE_UNACKED:
                    self._raised_in[t.alarm_id] = context
                saved["batch"] = self._raised_in.get(t.alarm_id, context)
            pending.append((t.asset_id, self.topics.asset(asset.kind, t.asset_id, "alerts"), ALERT,
                            partial(codec.alert, gateway_id=self.gateway_id, asset_name=asset.name,
                                    kind=asset.kind, t=t, batch=context)))
            memory.append((f"alarm:{t.alarm_id}", orjson.dumps(saved)))
            changed[t.asset_id] = None
            log = self.log.warning if t.state.value.startswith("active") else self.log.info
            log("alarm", alarm_id=t.alarm_id, state=t.state.value, previous=t.previous.value, trigger=t.trigger,
                severity=t.severity, code=t.code, value=t.value)
        states.extend(self._alarms_state(a) for a in changed)

    def _alarms_state(self, asset_id: str) -> tuple[str, bytes]:
        asset = self.assets[asset_id]
        items = self.engine.not_normal(asset_id)
        if asset_id in self.batches:  # each with the batch running when it was raised
            none = {"batch_id": None, "recipe_id": None}
            items = [{**a, **self._raised_in.get(str(a["alarm_id"]), none)} for a in items]
        return (self.topics.asset(asset.kind, asset_id, "alarms"), codec.alarms(items))

    def _apply(self, c: cmds.Command, now: float) -> tuple[list[Transition], bytes]:
        e = self.engine
        try:
            if c.name == "acknowledge":
                t = e.acknowledge(c.alarm_id, now, c.user, c.comment)
            elif c.name == "shelve":
                t = e.shelve(c.alarm_id, now, c.duration or 0.0, c.user, c.comment)
            elif c.name == "unshelve":
                t = e.unshelve(c.alarm_id, now, c.user, c.comment)
            elif c.name == "out_of_service":
                t = e.out_of_service(c.alarm_id, now, c.user, c.comment)
            elif c.name == "in_service":
                t = e.in_service(c.alarm_id, now, c.user, c.comment)
            else:
                raise CommandError(f"unknown command {c.name!r}")
        except CommandError as exc:
            self.metrics.commands.labels(c.name, "refused").inc()
            self.log.warning("command refused", command=c.name, alarm_id=c.alarm_id, user=c.user, error=str(exc))
            return [], self._reply(c, error=str(exc))
        self.metrics.commands.labels(c.name, "ok").inc()
        self.log.info("command", command=c.name, alarm_id=c.alarm_id, user=c.user, changed=t is not None)
        return ([t] if t else []), self._reply(c, changed=t is not None, alarm=e.view(c.alarm_id))

    def _written(self, w: cmds.Write, pending: list[_Pending]) -> bytes:
        """A write the device has been asked for: its audit record (an events message) and reply."""
        asset = self.assets[w.asset]
        pending.append((w.asset, self.topics.asset(asset.kind, w.asset, "events"), EVENT,
                        partial(codec.write_event, gateway_id=self.gateway_id, asset_id=w.asset,
                                asset_name=asset.name, kind=asset.kind, tag=w.tag, user=w.user, comment=w.comment,
                                request_id=w.request_id, old=w.old, new=w.value, error=w.error, ts=w.ts,
                                batch=self._context(w.asset))))
        if w.error is not None:
            return self._reply(w, error=w.error)
        return self._reply(w, changed=w.old != w.value, write=w)

    def _reply(self, c: cmds.Command | cmds.Write, *, error: str | None = None, changed: bool = False,
               alarm: dict[str, object] | None = None, write: cmds.Write | None = None) -> bytes:
        return cmds.reply(gateway_id=self.gateway_id, command=c.name, request_id=c.request_id, ts=self.clock(),
                          error=error, changed=changed, alarm=alarm, write=write)

    @staticmethod
    def _answer(replies: Iterable[tuple[cmds.Command | cmds.Write, bytes]]) -> None:
        for command, payload in replies:
            if command.reply is not None and not command.reply.done():
                command.reply.set_result(payload)

    def _alarm_metrics(self, transitions: list[Transition]) -> None:
        """Counts change only with transitions: most commits have none and skip the walk over alarms."""
        for t in transitions:
            self.metrics.alarm_transitions.labels(t.severity, t.state.value).inc()
        if transitions:
            self._alarm_counts()

    def _alarm_counts(self) -> None:
        for severity, n in self.engine.counts().items():
            self.metrics.alarms_active.labels(severity).set(n)

    def _count(self, asset_id: str, readings: list[Reading]) -> None:
        """Readings by quality (counted in C: ``list.count``; the labelled counters are looked up once)."""
        qualities = list(map(_QUALITY, readings))
        good = qualities.count(_GOOD)
        counts = [(_GOOD, good)]
        if good < len(qualities):
            bad = qualities.count(Quality.BAD)
            counts += [(Quality.BAD, bad), (Quality.UNCERTAIN, len(qualities) - good - bad)]
        for quality, n in counts:
            if n:
                counter = self._reading_counters.get((asset_id, quality))
                if counter is None:
                    counter = self._reading_counters[(asset_id, quality)] = \
                        self.metrics.readings.labels(asset_id, quality.value)
                counter.inc(n)

    def _report(self, r: Reading, now: float) -> bool:
        """Report by exception (gateway/exception.py); a tag without a deadband reports every reading."""
        band = self.deadbands.get((r.asset, r.tag))
        return band is None or band.offer(r, now)

