"""Wiring: pollers -> pipeline -> buffer -> publisher, all in one TaskGroup; staged shutdown."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from drivers.registry import build_driver

from . import __version__
from .buffer import Buffer
from .logs import get
from .metrics import Metrics
from .pipeline import Pipeline
from .poller import DeviceBatch, Poller
from .publisher import Publisher
from .settings import Settings
from .tagmap import TagMap

QUEUE_SIZE = 1024


def mqtt_password(tag_map: TagMap, settings: Settings) -> str | None:
    if settings.mqtt_password is not None:
        return settings.mqtt_password.get_secret_value()
    if tag_map.mqtt.password_file is not None:
        return tag_map.mqtt.password_file.read_text(encoding="utf-8").strip()
    return None


class Gateway:
    def __init__(self, tag_map: TagMap, settings: Settings | None = None, *,
                 buffer_path: Path | None = None, metrics: Metrics | None = None) -> None:
        self.tag_map = tag_map
        self.settings = settings or Settings()
        self.buffer_path = (buffer_path or self.settings.buffer_path or tag_map.buffer.path
                            or self.settings.default_buffer_path())
        self.metrics = metrics or Metrics()
        self.boot_id = uuid.uuid4().hex
        self.log = get(gateway=tag_map.gateway.id)
        self.pollers: dict[str, Poller] = {}
        self.publisher: Publisher | None = None
        self.ready = asyncio.Event()

    async def run(self, shutdown: asyncio.Event) -> None:
        """Run until ``shutdown`` is set; then stop polling, commit, say offline, close."""
        tm = self.tag_map
        queue: asyncio.Queue[DeviceBatch | None] = asyncio.Queue(QUEUE_SIZE)
        async with Buffer(self.buffer_path) as buffer:
            publisher = self.publisher = Publisher(
                cfg=tm.mqtt, gateway_id=tm.gateway.id, boot_id=self.boot_id, version=__version__,
                buffer=buffer, metrics=self.metrics, password=mqtt_password(tm, self.settings),
            )
            pipeline = Pipeline(tag_map=tm, buffer=buffer, queue=queue, boot_id=self.boot_id,
                                metrics=self.metrics, on_commit=publisher.notify)
            for device in tm.devices:
                driver = build_driver(tm, device.id, self.settings)
                self.pollers[device.id] = Poller(
                    driver=driver, interval=device.interval, timeout=device.timeout,
                    requests=len(driver.describe_plan()), out=queue, metrics=self.metrics,
                )
            self.metrics.buffer_rows.set(buffer.rows)
            self.log.info("gateway starting", devices=len(tm.devices), assets=len(tm.assets),
                          buffer=str(self.buffer_path), backlog=buffer.rows, boot_id=self.boot_id)
            async with asyncio.TaskGroup() as tg:
                pub_task = tg.create_task(publisher.run(), name="publisher")
                pipe_task = tg.create_task(pipeline.run(), name="pipeline")
                poll_tasks = [tg.create_task(p.run(), name=f"poller[{d}]") for d, p in self.pollers.items()]
                self.ready.set()
                await shutdown.wait()
                self.log.info("gateway stopping")
                for t in poll_tasks:  # 1. inputs
                    t.cancel()
                await asyncio.gather(*poll_tasks, return_exceptions=True)
                await queue.put(None)  # 2. commit what is in memory, then the pipeline ends
                await pipe_task
                await publisher.stop()  # 3. offline status, clean disconnect
                try:
                    async with asyncio.timeout(5):
                        await asyncio.shield(pub_task)
                except TimeoutError:
                    pub_task.cancel()
            self.log.info("gateway stopped", backlog=buffer.rows)
