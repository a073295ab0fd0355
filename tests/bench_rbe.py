"""Report by exception on the wire: telemetry of an unchanged plant through the real pipeline and buffer.

    .venv/bin/python tests/bench_rbe.py [--cycles 600] [--noise 0.05] [--derived]

The plant map's stations are polled once a second (a fake clock) with the same values every cycle,
once as config/plant.yaml has them (only motor_temperature has a deadband) and once with report by
exception on: ``max_silence: 1m`` on every station asset (each tag is sent when it changes, and at
least once a minute), plus ``deadband`` on the analog tags. ``--noise X`` adds jitter of +-X to the
analog tags (inside the deadbands of the RBE map when X < 0.2); ``--derived`` keeps the derived values.
Prints telemetry messages, values and bytes committed to the buffer, and the retained state snapshots.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

import orjson

from drivers.modbus.types import DataType
from gateway.buffer import Buffer
from gateway.commands import Command, Write
from gateway.metrics import Metrics
from gateway.model import Quality, Reading
from gateway.pipeline import Pipeline
from gateway.poller import DeviceBatch
from gateway.tagmap import ModbusTag, TagMap, load_tag_map_text

PLANT = Path(__file__).resolve().parents[1] / "config" / "plant.yaml"
ANALOG = ("units_per_hour", "fill_volume", "ambient_temperature", "supply_voltage")  # motor_temperature has one
NOISY = (*ANALOG, "motor_temperature")
VALUES = {"supply_voltage": 230.0, "motor_temperature": 41.5, "ambient_temperature": 22.5, "units_per_hour": 1100.0}


def rbe_text(text: str) -> str:
    """The plant map with report by exception on every station."""
    text = text.replace("kind: station, name:", "kind: station, max_silence: 1m, name:")
    for tag in ANALOG:
        text = text.replace(f"  {tag}: {{", f"  {tag}: {{deadband: 0.5, ", 1)
    return text


def stations(tm: TagMap, derived: bool) -> TagMap:
    assets = [a if derived else a.model_copy(update={"derived": {}, "rules": []})
              for a in tm.assets if a.kind == "station"]
    return tm.model_copy(update={"devices": [d for d in tm.devices if d.protocol == "modbus_tcp"],
                                 "assets": assets})


def value(name: str, tag: ModbusTag) -> object:
    if name in VALUES:
        return VALUES[name]
    if tag.enum is not None:
        return tag.enum[min(tag.enum)] if tag.enum else 0
    if tag.type is DataType.BOOL:
        return True
    if tag.type is DataType.STRING:
        return "P-1234"
    if tag.type.is_float or tag.scale != 1.0:
        return 21.5
    return 7


async def run(tm: TagMap, cycles: int, noise: float) -> dict[str, float]:
    rng = random.Random(1)
    clock = [1.8e9]
    states = 0

    def on_commit(s: list[tuple[str, bytes]]) -> None:
        nonlocal states
        states += len(s)

    with tempfile.TemporaryDirectory() as tmp:
        async with Buffer(Path(tmp) / "b.sqlite", max_size=None) as buf:
            pipe = Pipeline(tag_map=tm, buffer=buf, queue=asyncio.Queue(), boot_id="0" * 32, metrics=Metrics(),
                            on_commit=on_commit, clock=lambda: clock[0], monotonic=lambda: clock[0])
            base = {(a.id, n): value(n, t) for a in tm.assets for n, t in a.tags.items()}  # type: ignore[arg-type]
            started = time.perf_counter()
            for _ in range(cycles):
                clock[0] += 1.0
                batches: list[DeviceBatch | Command | Write] = []
                for d in tm.devices:
                    readings = []
                    for asset, name, _tag in tm.bindings(d.id):
                        v = base[(asset.id, name)]
                        assert isinstance(v, (bool, int, float, str))
                        if noise and name in NOISY and isinstance(v, float):
                            v += rng.uniform(-noise, noise)
                        readings.append(Reading(asset.id, name, v, Quality.GOOD, None, None, clock[0]))
                    batches.append(DeviceBatch(d.id, readings))
                await pipe.commit(batches)
            took = time.perf_counter() - started
            rows = [r for r in await buf.fetch(0, 10**9) if r.topic.endswith("/telemetry")]
    values = sum(len(orjson.loads(r.payload)["readings"]) for r in rows)
    return {"messages": len(rows), "values": values, "bytes": sum(len(r.payload) for r in rows),
            "states": states, "ms_per_cycle": took / cycles * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=600)
    parser.add_argument("--noise", type=float, default=0.0, help="jitter of the float tags (+-)")
    parser.add_argument("--derived", action="store_true", help="keep the derived values (and rules)")
    args = parser.parse_args()
    text = PLANT.read_text(encoding="utf-8")
    read = 0
    for name, source in (("RBE off", text), ("RBE on ", rbe_text(text))):
        tm = stations(load_tag_map_text(source, name), args.derived)
        read = sum(len(a.tags) for a in tm.assets) * args.cycles
        out = asyncio.run(run(tm, args.cycles, args.noise))
        print(f"{name}: {out['messages']:6d} telemetry messages, {out['values']:7d} values "
              f"({out['values'] / read:6.1%} of {read} read), {out['bytes'] / 1024:8.1f} KiB, "
              f"{out['states']:5d} state snapshots, {out['ms_per_cycle']:.2f} ms/cycle")


if __name__ == "__main__":
    main()
