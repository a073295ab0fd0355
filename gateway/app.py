"""Wiring: pollers -> pipeline -> buffer -> publisher, in one TaskGroup; staged shutdown; reload.

The buffer, the publisher and the HTTP endpoint live as long as the process. Pollers and the
pipeline belong to one tag map: a reload (SIGHUP) stops them after committing what they hold and
starts them again on the new map; a map that does not load is logged and the running one stays.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from drivers import Driver, DriverError
from drivers.registry import build_driver

from . import __version__
from . import commands as cmds
from .buffer import PRIORITY_NAMES, Buffer, Full
from .health import HealthServer
from .logs import Contained, get
from .metrics import Metrics
from .pipeline import Item, Pipeline
from .poller import Poller
from .publisher import Publisher
from .sdnotify import Notifier
from .settings import Settings
from .sparkplug import Catalog
from .sparkplug.session import CONSUMER as SPARKPLUG
from .sparkplug.session import SparkplugSession
from .tagmap import SourceError, TagMap

QUEUE_SIZE = 1024
STAGGER_MAX = 1.0  # seconds over which the first polls of a map's devices are spread
COMMAND_TIMEOUT = 10.0  # an operator command not answered by then gets an error reply
WRITE_TIMEOUT = 5.0  # a PLC write (read old, write, read back) that takes longer is reported as failed
STOP_GRACE = 5.0  # seconds the publisher gets to say offline at shutdown


def mqtt_password(tag_map: TagMap, settings: Settings) -> str | None:
    if settings.mqtt_password is not None:
        return settings.mqtt_password.get_secret_value()
    if tag_map.mqtt.password_file is not None:
        return tag_map.mqtt.password_file.read_text(encoding="utf-8").strip()
    return None


class _Generation:
    """Pollers and the pipeline of one tag map."""

    def __init__(self, gw: Gateway, tm: TagMap, buffer: Buffer) -> None:
        self.queue: asyncio.Queue[Item] = asyncio.Queue(QUEUE_SIZE)
        self.pipeline = Pipeline(tag_map=tm, buffer=buffer, queue=self.queue, boot_id=gw.boot_id,
                                 metrics=gw.metrics, on_commit=gw.notify, on_devices=gw.devices_changed)
        self.pollers: dict[str, Poller] = {}
        for i, device in enumerate(tm.devices):
            driver = gw.build_driver(tm, device.id, gw.settings)
            # Spread the devices' cycles over the interval (at most 1 s): a hundred devices read in the
            # same instant would make one burst that every reading of it waits for.
            offset = min(device.interval, STAGGER_MAX) * i / len(tm.devices)
            self.pollers[device.id] = Poller(
                driver=driver, interval=device.interval, timeout=device.timeout,
                requests=len(driver.describe_plan()), out=self.queue, metrics=gw.metrics, offset=offset,
            )
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, tg: asyncio.TaskGroup) -> None:
        self.pipe_task = tg.create_task(self.pipeline.run(), name="pipeline")
        self.tasks = [tg.create_task(p.run(), name=f"poller[{d}]") for d, p in self.pollers.items()]

    async def stop(self) -> None:
        """Stop polling; commit everything already read; the pipeline ends.

        Python 3.11's ``asyncio.wait_for`` (used inside the protocol libraries) can swallow a
        cancellation that races with a reply, so pollers also get a stop flag, and are cancelled
        again until they are done.
        """
        for p in self.pollers.values():
            p.stop()
        while pending := [t for t in self.tasks if not t.done()]:
            for t in pending:
                t.cancel()
            await asyncio.wait(pending, timeout=1.0)
        await self.queue.put(None)
        await self.pipe_task


class Gateway:
    def __init__(self, tag_map: TagMap, settings: Settings | None = None, *,
                 buffer_path: Path | None = None, metrics: Metrics | None = None,
                 reload_map: Callable[[], TagMap] | None = None, notifier: Notifier | None = None,
                 drivers: Callable[[TagMap, str, Settings], Driver] = build_driver) -> None:
        self.tag_map = tag_map
        self.settings = settings or Settings()
        self.buffer_path = (buffer_path or self.settings.buffer_path or tag_map.buffer.path
                            or self.settings.default_buffer_path())
        self.metrics = metrics or Metrics()
        self.reload_map = reload_map
        self.build_driver = drivers  # the registry's; tests put a driver of their own in its place
        self.notifier = notifier or Notifier()
        self.boot_id = uuid.uuid4().hex
        self.log = get(gateway=tag_map.gateway.id)
        self.pollers: dict[str, Poller] = {}
        self.generation: _Generation | None = None
        self.publisher: Publisher | None = None
        self.sparkplug: SparkplugSession | None = None
        self.buffer: Buffer | None = None
        self.http: HealthServer | None = None
        self.ready = asyncio.Event()
        self.reload_requested = asyncio.Event()
        self.reloads = 0
        self._buffer_age: float | None = None

    def request_reload(self) -> None:
        self.reload_requested.set()

    async def run(self, shutdown: asyncio.Event) -> None:
        """Run until ``shutdown`` is set; then stop polling, commit, say offline, close."""
        async with Buffer(self.buffer_path, max_size=self.tag_map.buffer.max_size, on_full=self._buffer_full) as buffer:
            self.buffer = buffer
            try:
                await self._run(buffer, shutdown)
            finally:
                self.notifier.close()

    async def _run(self, buffer: Buffer, shutdown: asyncio.Event) -> None:
        tm = self.tag_map
        self.metrics.buffer_rows.set(buffer.rows)
        self.log.info("gateway starting", devices=len(tm.devices), assets=len(tm.assets),
                      buffer=str(self.buffer_path), backlog=buffer.rows, boot_id=self.boot_id)
        async with asyncio.TaskGroup() as tg:
            await _use_consumers(buffer, tm)
            self._start_publisher(tm, buffer, tg)
            self._start_sparkplug(tm, buffer, tg)
            await self._start_http()
            watchdog = tg.create_task(self.notifier.watchdog_loop(), name="watchdog")
            stats = tg.create_task(self._buffer_stats(buffer), name="buffer-stats")
            gen = self._generation(tm, buffer, tg)
            self.ready.set()
            self.notifier.ready(f"{len(tm.devices)} devices, {len(tm.assets)} assets")
            while True:
                waits = [asyncio.ensure_future(shutdown.wait()), asyncio.ensure_future(self.reload_requested.wait())]
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
                if shutdown.is_set():
                    break
                self.reload_requested.clear()
                new = self._load_new_map()
                if new is None:
                    continue
                await gen.stop()
                await buffer.set_max_size(new.buffer.max_size)
                if (new.mqtt, new.gateway, _listens(new)) != (tm.mqtt, tm.gateway, _listens(tm)):
                    await self._stop_publisher()
                    await self._stop_sparkplug()
                    await _use_consumers(buffer, new)
                    self._start_publisher(new, buffer, tg)
                    self._start_sparkplug(new, buffer, tg)
                elif self.sparkplug is not None and self.sparkplug.catalog != Catalog.from_tag_map(new):
                    await self._stop_sparkplug()  # other metrics: a new session, with births of them
                    self._start_sparkplug(new, buffer, tg)
                tm = self.tag_map = new
                gen = self._generation(tm, buffer, tg)
                self.reloads += 1
                self.log.info("tag map reloaded", devices=len(tm.devices), assets=len(tm.assets))
                self.notifier.status(f"reloaded: {len(tm.devices)} devices, {len(tm.assets)} assets")
            self.notifier.stopping()
            self.log.info("gateway stopping")
            await gen.stop()  # 1. inputs, 2. commit what is in memory
            await self._stop_publisher()  # 3. offline status, clean disconnect
            await self._stop_sparkplug()  # NDEATH, clean disconnect
            stats.cancel()
            watchdog.cancel()
            if self.http is not None:
                await self.http.stop()
        self.log.info("gateway stopped", backlog=buffer.rows)

    # -- parts -------------------------------------------------------------------------------
    def _generation(self, tm: TagMap, buffer: Buffer, tg: asyncio.TaskGroup) -> _Generation:
        gen = self.generation = _Generation(self, tm, buffer)
        gen.start(tg)
        self.pollers = gen.pollers
        return gen

    async def command(self, command: cmds.Command | cmds.Write) -> bytes:
        """An operator command: refused by policy, or carried out (a write by the device's poller's
        driver), audited and committed by the running tag map's pipeline; the reply to publish."""
        gen, tm = self.generation, self.tag_map
        why = "the gateway is starting" if gen is None else cmds.refuse(tm, command)
        if gen is None or why is not None:
            self.metrics.commands.labels(command.name, "refused").inc()
            self.log.warning("command refused", command=command.name, user=command.user, error=why,
                             target=_target(command))
            return cmds.reply(gateway_id=tm.gateway.id, command=command.name, request_id=command.request_id,
                              ts=time.time(), error=why)
        if isinstance(command, cmds.Write):
            await self._write(gen, command)
        return await gen.pipeline.submit(command, COMMAND_TIMEOUT)

    async def _write(self, gen: _Generation, w: cmds.Write) -> None:
        """Ask the tag's device to take the value; the outcome goes into ``w`` for the audit trail."""
        device = self.tag_map.asset(w.asset).tags[w.tag].device
        try:
            async with asyncio.timeout(WRITE_TIMEOUT):
                w.old = await gen.pollers[device].driver.write(w.asset, w.tag, w.value)
        except DriverError as exc:
            w.error = f"{exc.kind}: {exc.detail}"
        except ValueError as exc:
            w.error = str(exc)
        except TimeoutError:
            w.error = f"the device did not answer within {WRITE_TIMEOUT:g} s; the value may have been written"
        except Exception as exc:  # a driver's bug fails this write, not the command listener
            contained = Contained(self.log, self.metrics.internal_errors.labels(f"write[{device}]").inc)
            w.error = "internal error " + contained(exc, "tag write failed with an internal error", target=_target(w))
        w.ts = time.time()
        self.metrics.commands.labels("write", "ok" if w.error is None else "failed").inc()
        (self.log.info if w.error is None else self.log.error)(
            "tag write", user=w.user, target=_target(w), old=w.old, new=w.value, error=w.error,
            request_id=w.request_id, comment=w.comment)

    def notify(self, states: list[tuple[str, bytes]]) -> None:
        """The pipeline committed rows (and these state snapshots): wake the outputs."""
        for out in (self.publisher, self.sparkplug):
            if out is not None:
                out.notify(states)

    def devices_changed(self, connected: dict[str, bool]) -> None:
        """The pipeline committed batches of these devices (connected or lost): Sparkplug DDEATH/DBIRTH."""
        if self.sparkplug is not None:
            self.sparkplug.devices(connected)

    def _start_sparkplug(self, tm: TagMap, buffer: Buffer, tg: asyncio.TaskGroup) -> None:
        self.sparkplug = None
        if tm.mqtt.format == "json":
            return
        self.sparkplug = SparkplugSession(tag_map=tm, buffer=buffer, metrics=self.metrics,
                                          password=mqtt_password(tm, self.settings),
                                          on_command=self.command if _listens(tm) else None)
        self._sparkplug_task = tg.create_task(self.sparkplug.run(), name="sparkplug")

    async def _stop_sparkplug(self) -> None:
        if self.sparkplug is not None:
            await _stop_output(self.sparkplug, self._sparkplug_task)

    def _start_publisher(self, tm: TagMap, buffer: Buffer, tg: asyncio.TaskGroup) -> None:
        self.publisher = None
        if tm.mqtt.format == "sparkplug":
            return
        self.publisher = Publisher(
            cfg=tm.mqtt, gateway_id=tm.gateway.id, boot_id=self.boot_id, version=__version__,
            buffer=buffer, metrics=self.metrics, password=mqtt_password(tm, self.settings),
            on_command=self.command if _listens(tm) else None,
        )
        self._pub_task = tg.create_task(self.publisher.run(), name="publisher")

    async def _stop_publisher(self) -> None:
        if self.publisher is not None:
            await _stop_output(self.publisher, self._pub_task)

    async def _start_http(self) -> None:
        address = self.settings.http_address
        if not address or address == "off":
            return
        host, _, port = address.rpartition(":")
        self.http = HealthServer(host=host or "127.0.0.1", port=int(port), registry=self.metrics.registry,
                                 health=self.health)
        try:
            await self.http.start()
        except OSError as exc:  # the endpoint is for operators; polling goes on without it
            self.log.error("health endpoint not started", address=address, error=str(exc))
            self.http = None
            return
        self.log.info("health endpoint", url=f"http://{self.http.host}:{self.http.port}/healthz")

    def _load_new_map(self) -> TagMap | None:
        if self.reload_map is None:
            self.log.warning("reload requested, but this gateway has no tag map file to reload")
            return None
        try:
            return self.reload_map()
        except SourceError as exc:
            self.log.error("tag map reload refused, the running map stays", errors=[str(p) for p in exc.problems])
        except OSError as exc:
            self.log.error("tag map reload refused, the running map stays", error=str(exc))
        return None

    def _buffer_full(self, full: Full) -> None:
        """The buffer gave rows up to stay writable: count each and say which, and why."""
        for priority, n in full.dropped.items():
            self.metrics.drops.labels(full.reason, PRIORITY_NAMES[priority]).inc(n)
        self.log.warning("buffer full, messages dropped", reason=full.reason, max_size=self.tag_map.buffer.max_size,
                         limit_bytes=full.limit, disk_free_bytes=full.free,
                         dropped={PRIORITY_NAMES[p]: n for p, n in full.dropped.items()}, dropped_bytes=full.freed,
                         first_seq=full.first_seq, last_seq=full.last_seq)

    async def _buffer_stats(self, buffer: Buffer) -> None:
        while True:
            self.metrics.buffer_rows.set(buffer.rows)
            try:
                size, age = await buffer.stats()
                disk = await buffer.watch()
            except Exception as exc:
                self.log.warning("buffer stats failed", error=str(exc))
            else:
                self._buffer_age = age
                self.metrics.buffer_bytes.set(size)
                self.metrics.buffer_oldest_age.set(age or 0.0)
                m = self.metrics
                m.buffer_disk_free.set(disk.free)
                m.buffer_limit.clear()  # no cap (max_size null, maybe since a reload): no cap series
                m.buffer_limit.labels("disk").set(disk.disk_limit)
                if disk.cap is not None:
                    m.buffer_limit.labels("cap").set(disk.cap)
                for limit in ("cap", "disk"):
                    m.buffer_limited_by.labels(limit).set(int(disk.limited_by == limit))
                for name, n in (("database", disk.database), ("wal", disk.wal), ("reserve", disk.reserve)):
                    m.buffer_files.labels(name).set(n)
            await asyncio.sleep(2.0)

    def health(self) -> tuple[bool, dict[str, object]]:
        """ok unless no device can be read (the gateway cannot do its job); broker loss alone is
        'degraded': the buffer keeps every reading meanwhile."""
        devices = {d: {"connected": p.connected, "last_error": p.last_error} for d, p in self.pollers.items()}
        outs = [o for o in (self.publisher, self.sparkplug) if o is not None]
        broker = {"connected": bool(outs) and all(o.connected for o in outs),
                  "last_error": next((o.last_error for o in outs if o.last_error), None)}
        any_device = any(p.connected for p in self.pollers.values())
        ok = any_device or not self.pollers
        status = "ok" if ok and broker["connected"] and all(p.connected for p in self.pollers.values()) \
            else ("degraded" if ok else "down")
        buffer: dict[str, object] = {"rows": self.buffer.rows if self.buffer else None,
                                     "oldest_age_s": self._buffer_age}
        disk = self.buffer.disk if self.buffer else None
        if disk is not None:  # which limit the buffer meets first: the configured cap or the disk
            buffer.update(limit=disk.limited_by, limit_bytes=disk.limit, max_size=disk.cap,
                          disk_free_bytes=disk.free, database_bytes=disk.database, wal_bytes=disk.wal,
                          reserve_bytes=disk.reserve)
        return ok, {"status": status, "gateway_id": self.tag_map.gateway.id, "boot_id": self.boot_id,
                    "version": __version__, "ts": time.time(), "devices": devices, "broker": broker,
                    "buffer": buffer, "reloads": self.reloads}


def _target(command: cmds.Command | cmds.Write) -> str:
    return f"{command.asset}/{command.tag}" if isinstance(command, cmds.Write) else command.alarm_id


async def _use_consumers(buffer: Buffer, tm: TagMap) -> None:
    """The buffer's readers: the JSON publisher (the default consumer) and/or the Sparkplug session."""
    fmt = tm.mqtt.format
    await buffer.use_consumers(*(() if fmt == "json" else (SPARKPLUG,)), default=fmt != "sparkplug")


async def _stop_output(output: Publisher | SparkplugSession, task: asyncio.Task[None]) -> None:
    """Ask an MQTT output to say goodbye and disconnect; cancel it when it takes over STOP_GRACE."""
    await output.stop()
    done, _ = await asyncio.wait([task], timeout=STOP_GRACE)
    while not done:  # asyncio.wait never swallows a cancellation of the caller
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=1.0)


def _listens(tm: TagMap) -> bool:
    """Whether the gateway subscribes to its command topic at all."""
    return tm.commands.alarms or tm.commands.writes
