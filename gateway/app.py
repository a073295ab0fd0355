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

from drivers.registry import build_driver

from . import __version__
from .buffer import Buffer
from .health import HealthServer
from .logs import get
from .metrics import Metrics
from . import commands as cmds
from .pipeline import Item, Pipeline
from .poller import Poller
from .publisher import Publisher
from .sdnotify import Notifier
from .settings import Settings
from .tagmap import SourceError, TagMap

QUEUE_SIZE = 1024
COMMAND_TIMEOUT = 10.0  # an operator command not answered by then gets an error reply
STOP_GRACE = 5.0  # seconds the publisher gets to say offline at shutdown


def mqtt_password(tag_map: TagMap, settings: Settings) -> str | None:
    if settings.mqtt_password is not None:
        return settings.mqtt_password.get_secret_value()
    if tag_map.mqtt.password_file is not None:
        return tag_map.mqtt.password_file.read_text(encoding="utf-8").strip()
    return None


class _Generation:
    """Pollers and the pipeline of one tag map."""

    def __init__(self, gw: Gateway, tm: TagMap, buffer: Buffer, publisher: Publisher) -> None:
        self.queue: asyncio.Queue[Item] = asyncio.Queue(QUEUE_SIZE)
        self.pipeline = Pipeline(tag_map=tm, buffer=buffer, queue=self.queue, boot_id=gw.boot_id,
                                 metrics=gw.metrics, on_commit=publisher.notify)
        self.pollers: dict[str, Poller] = {}
        for device in tm.devices:
            driver = build_driver(tm, device.id, gw.settings)
            self.pollers[device.id] = Poller(
                driver=driver, interval=device.interval, timeout=device.timeout,
                requests=len(driver.describe_plan()), out=self.queue, metrics=gw.metrics,
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
                 reload_map: Callable[[], TagMap] | None = None, notifier: Notifier | None = None) -> None:
        self.tag_map = tag_map
        self.settings = settings or Settings()
        self.buffer_path = (buffer_path or self.settings.buffer_path or tag_map.buffer.path
                            or self.settings.default_buffer_path())
        self.metrics = metrics or Metrics()
        self.reload_map = reload_map
        self.notifier = notifier or Notifier()
        self.boot_id = uuid.uuid4().hex
        self.log = get(gateway=tag_map.gateway.id)
        self.pollers: dict[str, Poller] = {}
        self.generation: _Generation | None = None
        self.publisher: Publisher | None = None
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
        async with Buffer(self.buffer_path) as buffer:
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
            publisher = self._start_publisher(tm, buffer, tg)
            await self._start_http()
            watchdog = tg.create_task(self.notifier.watchdog_loop(), name="watchdog")
            stats = tg.create_task(self._buffer_stats(buffer), name="buffer-stats")
            gen = self._generation(tm, buffer, publisher, tg)
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
                if (new.mqtt, new.gateway) != (tm.mqtt, tm.gateway):
                    await self._stop_publisher()
                    publisher = self._start_publisher(new, buffer, tg)
                tm = self.tag_map = new
                gen = self._generation(tm, buffer, publisher, tg)
                self.reloads += 1
                self.log.info("tag map reloaded", devices=len(tm.devices), assets=len(tm.assets))
                self.notifier.status(f"reloaded: {len(tm.devices)} devices, {len(tm.assets)} assets")
            self.notifier.stopping()
            self.log.info("gateway stopping")
            await gen.stop()  # 1. inputs, 2. commit what is in memory
            await self._stop_publisher()  # 3. offline status, clean disconnect
            stats.cancel()
            watchdog.cancel()
            if self.http is not None:
                await self.http.stop()
        self.log.info("gateway stopped", backlog=buffer.rows)

    # -- parts -------------------------------------------------------------------------------
    def _generation(self, tm: TagMap, buffer: Buffer, publisher: Publisher, tg: asyncio.TaskGroup) -> _Generation:
        gen = self.generation = _Generation(self, tm, buffer, publisher)
        gen.start(tg)
        self.pollers = gen.pollers
        return gen

    async def command(self, command: cmds.Command) -> bytes:
        """An operator command, handed to the running tag map's alarms; the reply to publish."""
        gen = self.generation
        if gen is None:
            return cmds.reply(gateway_id=self.tag_map.gateway.id, command=command.name,
                              request_id=command.request_id, ts=time.time(), error="the gateway is starting")
        return await gen.pipeline.submit(command, COMMAND_TIMEOUT)

    def _start_publisher(self, tm: TagMap, buffer: Buffer, tg: asyncio.TaskGroup) -> Publisher:
        self.publisher = Publisher(
            cfg=tm.mqtt, gateway_id=tm.gateway.id, boot_id=self.boot_id, version=__version__,
            buffer=buffer, metrics=self.metrics, password=mqtt_password(tm, self.settings),
            on_command=self.command,
        )
        self._pub_task = tg.create_task(self.publisher.run(), name="publisher")
        return self.publisher

    async def _stop_publisher(self) -> None:
        if self.publisher is None:
            return
        await self.publisher.stop()
        done, _ = await asyncio.wait([self._pub_task], timeout=STOP_GRACE)
        while not done:  # asyncio.wait never swallows a cancellation of the caller
            self._pub_task.cancel()
            done, _ = await asyncio.wait([self._pub_task], timeout=1.0)

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

    async def _buffer_stats(self, buffer: Buffer) -> None:
        while True:
            self.metrics.buffer_rows.set(buffer.rows)
            try:
                size, age = await buffer.stats()
            except Exception as exc:  # noqa: BLE001 - stats are best effort; writes report their own errors
                self.log.warning("buffer stats failed", error=str(exc))
            else:
                self._buffer_age = age
                self.metrics.buffer_bytes.set(size)
                self.metrics.buffer_oldest_age.set(age or 0.0)
            await asyncio.sleep(2.0)

    def health(self) -> tuple[bool, dict[str, object]]:
        """ok unless no device can be read (the gateway cannot do its job); broker loss alone is
        'degraded': the buffer keeps every reading meanwhile."""
        devices = {d: {"connected": p.connected, "last_error": p.last_error} for d, p in self.pollers.items()}
        pub = self.publisher
        broker = {"connected": bool(pub and pub.connected), "last_error": pub.last_error if pub else None}
        any_device = any(p.connected for p in self.pollers.values())
        ok = any_device or not self.pollers
        status = "ok" if ok and broker["connected"] and all(p.connected for p in self.pollers.values()) \
            else ("degraded" if ok else "down")
        buffer = {"rows": self.buffer.rows if self.buffer else None, "oldest_age_s": self._buffer_age}
        return ok, {"status": status, "gateway_id": self.tag_map.gateway.id, "boot_id": self.boot_id,
                    "version": __version__, "ts": time.time(), "devices": devices, "broker": broker,
                    "buffer": buffer, "reloads": self.reloads}
