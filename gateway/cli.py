"""``edge-gateway``: run, check, simulate, demo."""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from . import __version__
from .settings import Settings
from .tagmap import SourceError, TagMap, load_tag_map

GC_THRESHOLD = 50_000  # allocations between young-generation collections (Python's default: 700)


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

    p = sub.add_parser("bench", help="measure the whole path under load (simulators, Mosquitto, gateway)",
                       description="Simulated devices in their own processes, a private Mosquitto, the gateway "
                                   "with rules on and a subscriber: values/s end to end, latency, CPU, memory, "
                                   "buffer and MQTT bytes per value, and the backlog drain after a broker outage.")
    p.add_argument("--devices", type=int, default=20, help="simulated devices (default 20)")
    p.add_argument("--tags", type=int, default=500, help="tags per device (default 500)")
    p.add_argument("--opcua", type=int, default=0, help="how many of the devices are OPC-UA servers (default 0)")
    p.add_argument("--opcua-mode", choices=["subscribe", "poll"], default="subscribe")
    p.add_argument("--interval", type=float, default=1.0, help="poll interval in seconds (default 1)")
    p.add_argument("--change", type=float, default=None,
                   help="seconds between value changes (default: 1.013 x interval)")
    p.add_argument("--changing", type=float, default=1.0, help="share of tags that move at each change (0-1)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds measured after warm-up (default 20)")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--outage", type=float, default=10.0, help="broker outage before the drain (0: no drain phase)")
    p.add_argument("--sim-procs", type=int, default=2, help="simulator processes (default 2)")
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio", help="the gateway's event loop")
    p.add_argument("--deadband", type=float, default=None, help="absolute deadband on every value tag")
    p.add_argument("--deadband-percent", type=float, default=None, help="percent deadband on every value tag")
    p.add_argument("--max-silence", type=float, default=None, help="seconds before an unchanged value is resent")
    p.add_argument("--no-rules", action="store_true", help="no alarm rules (default: one per 10 tags)")
    p.add_argument("--max-inflight", type=int, default=64)
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.add_argument("--keep", type=Path, default=None, help="keep the work files (tag map, logs, buffer) here")

    args = parser.parse_args(argv)
    if args.command == "bench":
        from .bench import BenchConfig, run_cli

        if args.opcua > args.devices:
            parser.error("--opcua cannot exceed --devices")
        return run_cli(BenchConfig(
            devices=args.devices, tags=args.tags, opcua=args.opcua, opcua_mode=args.opcua_mode,
            interval=args.interval, change=args.change, changing=args.changing, duration=args.duration,
            warmup=args.warmup, outage=args.outage, sim_procs=args.sim_procs, loop=args.loop,
            deadband=args.deadband, deadband_percent=args.deadband_percent, max_silence=args.max_silence,
            rules=not args.no_rules, max_inflight=args.max_inflight), as_json=args.json, workdir=args.keep)
    settings = Settings()
    config = getattr(args, "file", None) or args.config or settings.config
    if args.command == "check":
        return check(config)
    tag_map = _load_or_exit(config)
    if args.command == "run":
        from .logs import configure

        configure(settings.log_format, settings.log_level)
        return _event_loop(settings.event_loop)(_run(tag_map, settings, config))
    if args.command == "simulate":
        from .demo import simulate

        return asyncio.run(_with_signals(
            lambda stop: simulate(tag_map, seed=args.seed, time_scale=args.time_scale, shutdown=stop)))
    from .demo import demo

    return asyncio.run(_with_signals(lambda stop: demo(tag_map, duration=args.duration, broker=args.broker, shutdown=stop)))


def _event_loop(name: str) -> Callable[[Awaitable[int]], int]:
    """``asyncio.run``, or uvloop's when chosen (``auto``: uvloop when it is installed)."""
    if name != "asyncio":
        try:
            import uvloop
        except ImportError:
            if name == "uvloop":
                print("EDGE_GATEWAY_EVENT_LOOP=uvloop, but uvloop is not installed "
                      "(pip install 'edge-gateway[speed]')", file=sys.stderr)
                raise SystemExit(2) from None
        else:
            return uvloop.run  # type: ignore[no-any-return]
    return asyncio.run  # type: ignore[return-value]


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
    # The tag map and everything built from it live as long as the process: keep them out of the
    # collector's scans, and collect young objects less often (a poll cycle makes many short-lived ones).
    # Measured with tests/bench_pipeline.py --gc-freeze --gc-threshold 50000: about 1 us less per value.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD)
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
