"""OPC-UA driver CPU cost: subscribe vs poll, per 1,000 tag values per second.

    python tests/bench_opcua.py --tags 1000 --rate 2 --seconds 10

Starts an asyncua server in a separate process (so its CPU is not counted) with ``--tags`` Double
variables that all change ``--rate`` times per second, then runs the gateway's OPC-UA driver in
this process in each mode for ``--seconds``, reading the way the poller does. Reports the values
delivered and the CPU time of this process (user + system) per 1,000 values/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NS = "urn:ninu:bench"


async def serve(port: int, tags: int, rate: float) -> None:
    from asyncua import Server, ua

    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/")
    idx = await server.register_namespace(NS)
    obj = await server.nodes.objects.add_object(ua.NodeId("Bench", idx), "Bench")
    ids = []
    for i in range(tags):
        await obj.add_variable(ua.NodeId(f"T{i}", idx), f"T{i}", 0.0)
        ids.append(ua.NodeId(f"T{i}", idx))
    async with server:
        print("ready", flush=True)
        n = 0
        while True:
            n += 1
            for i, node_id in enumerate(ids):
                await server.write_attribute_value(node_id, ua.DataValue(ua.Variant(n + i / 1000, ua.VariantType.Double)))
            await asyncio.sleep(1 / rate)


async def measure(port: int, tags: int, rate: float, seconds: float, mode: str) -> tuple[int, float]:
    from drivers.opcua import OpcTagSpec, OpcUaDriver

    specs = [OpcTagSpec("bench", f"t{i}", f"nsu={NS};s=T{i}") for i in range(tags)]
    driver = OpcUaDriver(device_id="bench", endpoint=f"opc.tcp://127.0.0.1:{port}/", mode=mode,
                         interval=1 / rate, timeout=5.0, tags=specs, queue_size=1, recheck=3600)
    await driver.connect()
    try:
        await asyncio.sleep(1.0)
        await driver.read()  # warm-up: initial values
        values = 0
        cpu0, t0 = os.times(), time.monotonic()
        next_at = t0
        while time.monotonic() - t0 < seconds:
            values += sum(1 for r in await driver.read() if r.value is not None)
            next_at += 1 / rate
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        cpu1 = os.times()
        cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        return values, cpu
    finally:
        await driver.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tags", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=2.0, help="changes (and reads) per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.tags, args.rate))
        return
    from gateway.brokers import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--tags", str(args.tags),
                             "--rate", str(args.rate)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        print(f"{args.tags} tags changing {args.rate:g}/s for {args.seconds:g}s, server in pid {proc.pid}")
        for mode in ("subscribe", "poll"):
            values, cpu = asyncio.run(measure(port, args.tags, args.rate, args.seconds, mode))
            per_s = values / args.seconds
            per_k = cpu / args.seconds / (per_s / 1000) if per_s else float("nan")
            print(f"{mode:>9}: {per_s:9.0f} values/s, CPU {cpu / args.seconds * 100:5.1f}% of a core, "
                  f"{per_k * 100:5.2f}% of a core per 1,000 values/s ({cpu / max(values, 1) * 1e6:.1f} us/value)")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
