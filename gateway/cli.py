"""``edge-gateway``: run, check, simulate, demo."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from . import __version__
from .settings import Settings
from .tagmap import SourceError, TagMap, load_tag_map


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the gateway")
    p.add_argument("--config", type=Path, help="tag map (default: $EDGE_GATEWAY_CONFIG or config/plant.yaml)")

    p = sub.add_parser("check", help="validate a tag map and print what it will do")
    p.add_argument("file", nargs="?", type=Path)
    p.add_argument("--config", type=Path)

    p = sub.add_parser("simulate", help="serve simulated station PLCs for a tag map's Modbus devices")
    p.add_argument("--config", type=Path)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--time-scale", type=float, default=1.0, help="plant seconds per wall second")

    p = sub.add_parser("demo", help="simulators + broker + gateway, with a live view")
    p.add_argument("--config", type=Path)
    p.add_argument("--duration", type=float, default=None, help="seconds (default: until Ctrl-C)")
    p.add_argument("--broker", choices=["auto", "mosquitto", "embedded"], default="auto",
                   help="auto: Mosquitto when installed, else the embedded demo broker")

    args = parser.parse_args(argv)
    settings = Settings()
    config = getattr(args, "file", None) or args.config or settings.config
    if args.command == "check":
        return check(config)
    tag_map = _load_or_exit(config)
    if args.command == "run":
        from .logs import configure

        configure(settings.log_format, settings.log_level)
        return asyncio.run(_run(tag_map, settings, config))
    if args.command == "simulate":
        from .demo import simulate

        return asyncio.run(_with_signals(
            lambda stop: simulate(tag_map, seed=args.seed, time_scale=args.time_scale, shutdown=stop)))
    from .demo import demo

    return asyncio.run(_with_signals(lambda stop: demo(tag_map, duration=args.duration, broker=args.broker, shutdown=stop)))


def _load_or_exit(path: Path) -> TagMap:
    try:
        return load_tag_map(path)
    except SourceError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None


def check(path: Path) -> int:
    from drivers.registry import build_driver

    try:
        tm = load_tag_map(path)
    except SourceError as exc:
        print(exc, file=sys.stderr)
        print(f"{path}: {len(exc.problems)} error(s)", file=sys.stderr)
        return 2
    tags = sum(len(a.tags) for a in tm.assets)
    print(f"{path}: OK  gateway {tm.gateway.id}  {len(tm.devices)} devices, {len(tm.assets)} assets, {tags} tags")
    print(f"mqtt {tm.mqtt.host}:{tm.mqtt.port}  prefix {tm.mqtt.topic_prefix}")
    total = 0
    for device in tm.devices:
        plan = build_driver(tm, device.id).describe_plan()
        if device.protocol == "modbus_tcp":
            total += len(plan)
        n = sum(1 for _ in tm.bindings(device.id))
        print(f"device {device.id} ({device.describe()}, every {device.interval:g}s): {n} tags")
        for line in plan:
            print(f"    {line}")
    for asset in tm.assets:
        print(f"asset {asset.id} ({asset.kind}, {asset.name!r}): {len(asset.tags)} tags, "
              f"{len(asset.rules)} rules, {len(asset.derived)} derived")
    print(f"Modbus requests per cycle: {total}")
    return 0


async def _run(tag_map: TagMap, settings: Settings, path: Path) -> int:
    from .app import Gateway

    shutdown = asyncio.Event()
    gateway = Gateway(tag_map, settings, reload_map=lambda: load_tag_map(path))
    _install_signals(shutdown)
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, gateway.request_reload)
    await gateway.run(shutdown)
    return 0


def _install_signals(shutdown: asyncio.Event) -> None:
    """First SIGTERM/SIGINT: stop in stages. Second: exit at once."""
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if shutdown.is_set():
            raise SystemExit(1)
        shutdown.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)


async def _with_signals(main: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    shutdown = asyncio.Event()
    _install_signals(shutdown)
    return await main(shutdown)
