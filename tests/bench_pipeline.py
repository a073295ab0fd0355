"""CPU cost of the per-value hot path, without a network: Modbus decode, pipeline commit, buffer drain.

    python tests/bench_pipeline.py [--assets 100 --tags 125 --cycles 200] [--change all|1pct|both] [--json]

A generated tag map (``--assets`` stations of ``--tags`` Modbus tags each, one device per station: a
status enum, then two int16 scaled x0.1 for every float32; a high rule on every tenth tag, a low rule
on every twentieth) is loaded through the tag map loader. Stages:

a. ``decode``: ``CompiledRead.decode_registers`` on each read's registers (reads of up to 125
   registers), in a tight loop; ``decode (in loop)``: the same calls inside the commit loop below,
   with the heap (and garbage collector) of a running gateway.
b. ``commit``: every cycle each station's registers change (``--change all``: every tag; ``1pct``:
   1 % of the tags, the rest unchanged), are decoded, and ``Pipeline.commit`` takes ``--per-commit``
   device batches at a time into a real SQLite buffer in a temporary directory: rules, telemetry
   (one row per station per commit: QoS 1 means every value is in some row's payload), state
   snapshots, alarms. ``Engine.update`` and ``Buffer.append`` are shown on their own as well.
   ``Engine.next_deadline`` runs after every commit, as ``Pipeline.run`` does.
c. ``drain``: every row fetched and deleted, ``--drain-batch`` rows at a time, as the publisher does
   after PUBACKs (no network, so no publish cost).

``end to end`` adds a, b and c: what the gateway itself spends per value, without the protocol libraries.
Times: ``us/value`` is elapsed time; ``cpu us/value`` this process's CPU time (SQLite runs in
aiosqlite's thread: elapsed time includes waiting for it). Alarm transitions are logged as JSON lines
into /dev/null.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a script from anywhere
    sys.path.insert(0, str(ROOT))

from drivers.modbus.decode import CompiledRead, TagSpec, compile_reads, register_format  # noqa: E402
from drivers.modbus.planner import Limits  # noqa: E402
from drivers.modbus.types import DataType, Order  # noqa: E402
from gateway import logs  # noqa: E402
from gateway.buffer import Buffer  # noqa: E402
from gateway.metrics import Metrics  # noqa: E402
from gateway.model import Reading, Transform  # noqa: E402
from gateway.pipeline import Pipeline  # noqa: E402
from gateway.poller import DeviceBatch  # noqa: E402
from gateway.rules import Transition  # noqa: E402
from gateway.tagmap import ModbusTag, TagMap, load_tag_map  # noqa: E402

STATUS = {0: "idle", 1: "running", 2: "paused", 3: "maintenance", 4: "error"}


def tag_map_yaml(assets: int, tags: int, deadband: float | None = None) -> str:
    """``assets`` stations, one Modbus device each; tag 0 a status enum, then two int16 (x0.1) for
    every float32 (each with ``deadband``, if given); a high rule on every tenth tag, a low rule on
    every twentieth."""
    lines = [
        "gateway: {id: bench-gw, site: bench}",
        "mqtt: {host: 127.0.0.1, port: 1883, topic_prefix: bench/site}",
        "devices:",
    ]
    for a in range(assets):
        lines.append(f"  - {{id: plc-{a}, protocol: modbus_tcp, host: 127.0.0.1, port: {20000 + a}, unit: 1}}")
    lines.append("assets:")
    for a in range(assets):
        lines += [f"  - id: st-{a}", "    kind: station", f"    name: Station {a}", f"    device: plc-{a}",
                  "    tags:"]
        address = 0
        rules = []
        band = "" if deadband is None else f", deadband: {deadband}"
        for t in range(tags):
            name = f"t{t:03d}"
            if t == 0:
                name = "status"
                enum = ", ".join(f"{k}: {v}" for k, v in STATUS.items())
                lines.append(f"      {name}: {{table: holding, address: {address}, type: uint16, enum: {{{enum}}}}}")
                address += 1
            elif t % 3 == 0:
                lines.append(f"      {name}: {{table: holding, address: {address}, type: float32, unit: L{band}}}")
                address += 2
            else:
                lines.append(f"      {name}: {{table: holding, address: {address}, type: int16, scale: 0.1, "
                             f"unit: degC{band}}}")
                address += 1
            if t and t % 10 == 0:
                rules.append(f"      - {{tag: {name}, kind: high, limit: 250, deadband: 1, severity: high}}")
            if t and t % 20 == 0:
                rules.append(f"      - {{tag: {name}, kind: low, limit: 5, deadband: 1, severity: medium}}")
        if rules:
            lines.append("    rules:")
            lines += rules
    return "\n".join(lines) + "\n"


def specs_of(tm: TagMap) -> dict[str, list[TagSpec]]:
    """Device -> its tags, as drivers/registry.py builds them."""
    out: dict[str, list[TagSpec]] = {}
    for asset in tm.assets:
        for name, tag in asset.tags.items():
            assert isinstance(tag, ModbusTag)
            fmt = register_format(tag.type, tag.count, tag.byte_order or Order.BIG, tag.word_order or Order.BIG,
                                  tag.bit)
            out.setdefault(tag.device, []).append(TagSpec(asset.id, name, 1, tag.table, tag.address, fmt,
                                                          Transform(tag.scale, tag.offset, tag.enum)))
    return out


@dataclass
class Block:
    """One read's registers, as a PLC would hold them, changed slot by slot."""

    read: CompiledRead
    data: bytearray
    codes: list[tuple[int, str, int]]  # (byte offset, struct code, slot index)
    shift: int  # per asset: the assets' values (and alarms) are not in lockstep

    @classmethod
    def of(cls, read: CompiledRead, types: dict[tuple[str, str], DataType]) -> Block:
        code = {DataType.UINT16: ">H", DataType.FLOAT32: ">f", DataType.INT16: ">h"}
        codes = [(s.offset * 2, code[types[s.asset, s.tag]], i) for i, s in enumerate(read.slots)]
        shift = int(read.slots[0].asset.rpartition("-")[2]) * 13
        return cls(read, bytearray(read.request.count * 2), codes, shift)

    def set(self, which: list[tuple[int, str, int]], cycle: int) -> None:
        for off, code, i in which:
            if code == ">H":
                v: float = 1 if cycle % 50 else 2  # running; paused now and then (an events message)
            elif code == ">f":
                v = i + self.shift + cycle * 0.25
            else:
                v = (i * 37 + self.shift + cycle * 11) % 3000  # 0.0 .. 299.9 after x0.1: crosses the rules' limits
            struct.pack_into(code, self.data, off, v)

    def registers(self) -> list[int]:
        return list(struct.unpack(f">{len(self.data) // 2}H", self.data))


class Timer:
    """Elapsed and CPU time, added up over many ``with`` blocks."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Timer:
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._w
        self.cpu += time.process_time() - self._c


def stat(name: str, n: int, t: Timer, unit: str = "values") -> dict[str, Any]:
    return {"stage": name, unit: n, "wall_s": round(t.wall, 4), "cpu_s": round(t.cpu, 4),
            f"{unit}_per_s": round(n / t.wall) if t.wall else None,
            "us_per_value": round(t.wall / n * 1e6, 3) if n else None,
            "cpu_us_per_value": round(t.cpu / n * 1e6, 3) if n else None}


def bench_decode(blocks: list[Block], rounds: int) -> dict[str, Any]:
    regs = [(b.read, b.registers()) for b in blocks]
    n = 0
    with Timer() as t:
        for _ in range(rounds):
            for read, r in regs:
                n += len(read.decode_registers(r, 1.8e9))
    return stat("decode", n, t)


@dataclass(frozen=True)
class Run:
    """One commit-and-drain run."""

    label: str
    share: float  # of the tags whose value changes every cycle
    cycles: int
    per_commit: int
    drain_batch: int
    path: Path
    seed: int


def _timed(pipe: Pipeline, buf: Buffer) -> dict[str, Timer]:
    """Time ``Engine.update`` and ``Buffer.append`` inside the pipeline's commits."""
    timers = {"rules": Timer(), "sqlite": Timer()}
    real_append, real_update = buf.append, pipe.engine.update

    async def append(*args: Any, **kwargs: Any) -> None:
        with timers["sqlite"]:
            await real_append(*args, **kwargs)

    def update(*args: Any, **kwargs: Any) -> list[Transition]:
        with timers["rules"]:
            return real_update(*args, **kwargs)

    buf.append = append  # type: ignore[method-assign]
    pipe.engine.update = update  # type: ignore[method-assign]
    return timers


def _readings(blocks: list[Block], cycle: int, *, share: float, rng: random.Random, now: float,
              decode: Timer) -> list[Reading]:
    """One poll of a device: its registers changed (every tag, or about ``share`` of them), decoded."""
    readings: list[Reading] = []
    for b in blocks:
        b.set(b.codes if share >= 1.0 else [c for c in b.codes if rng.random() < share], cycle)
        registers = b.registers()
        with decode:
            readings += b.read.decode_registers(registers, now)
    return readings


async def bench_commit(tm: TagMap, blocks_of: dict[str, list[Block]], run: Run) -> list[dict[str, Any]]:
    """Decode in the loop, commit, drain: the four result rows of one run."""
    rng = random.Random(run.seed)
    now = 1.8e9
    commit, decode, commits, n = Timer(), Timer(), 0, 0
    async with Buffer(run.path) as buf:
        pipe = Pipeline(tag_map=tm, buffer=buf, queue=asyncio.Queue(), boot_id="0" * 32, metrics=Metrics(),
                        on_commit=lambda states: None, clock=lambda: now, monotonic=lambda: now)
        await pipe.restore()
        parts = _timed(pipe, buf)
        for cycle in range(run.cycles):
            now = 1.8e9 + cycle
            share = 1.0 if cycle == 0 else run.share  # every tag has a value after the first cycle
            batches = [DeviceBatch(d, _readings(bs, cycle, share=share, rng=rng, now=now, decode=decode))
                       for d, bs in blocks_of.items()]
            for i in range(0, len(batches), run.per_commit):
                chunk: list[Any] = batches[i:i + run.per_commit]
                with commit:
                    await pipe.commit(chunk)
                    pipe.engine.next_deadline()  # as Pipeline.run does before every commit
                n += sum(len(b.readings) for b in chunk)
                commits += 1
        rows = buf.rows
        drain, drained, after = Timer(), 0, 0
        with drain:
            while got := await buf.fetch(after, run.drain_batch):
                await buf.delete([r.seq for r in got])
                after, drained = got[-1].seq, drained + len(got)
        assert buf.rows == 0
    out = [stat(f"decode ({run.label}, in loop)", n, decode), stat(f"commit ({run.label} change)", n, commit)]
    out[1].update(commits=commits, rows=rows)
    for name, t in parts.items():
        out[1].update({f"{name}_us_per_value": round(t.wall / n * 1e6, 3),
                       f"{name}_cpu_us_per_value": round(t.cpu / n * 1e6, 3)})
    out.append(stat(f"drain ({run.label} change)", drained, drain, unit="rows"))
    out[2]["values_per_s"] = round(n / drain.wall) if drain.wall else None
    total = Timer()
    total.wall, total.cpu = decode.wall + commit.wall + drain.wall, decode.cpu + commit.cpu + drain.cpu
    out.append(stat(f"end to end ({run.label})", n, total))
    return out


def print_table(info: dict[str, Any], results: list[dict[str, Any]]) -> None:
    print(f"{info['assets']} assets x {info['tags']} tags ({info['rules']} rules, {info['reads']} reads of "
          f"{info['registers_per_cycle'] / info['reads']:.0f} registers), {info['cycles']} cycles, "
          f"{info['per_commit']} device batches per commit, gc: {info['gc']}")
    print(f"{'stage':<24} {'count':>10} {'per s':>12} {'us/value':>9} {'cpu us/value':>13}")
    for r in results:
        unit = "rows" if "rows_per_s" in r else "values"
        print(f"{r['stage']:<24} {r[unit]:>10,} {r[f'{unit}_per_s']:>12,} {r['us_per_value']:>9.3f} "
              f"{r['cpu_us_per_value']:>13.3f}" + (f"   ({r['values_per_s']:,} values/s)" if unit == "rows" else ""))
        for part, label in (("rules", "Engine.update"), ("sqlite", "Buffer.append")):
            if f"{part}_us_per_value" in r:
                print(f"  of which {label:<16} {'':>10} {'':>12} {r[f'{part}_us_per_value']:>9.3f} "
                      f"{r[f'{part}_cpu_us_per_value']:>13.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=int, default=100)
    parser.add_argument("--tags", type=int, default=125, help="tags per asset")
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--per-commit", type=int, default=10, help="device batches committed together")
    parser.add_argument("--change", choices=["all", "1pct", "both"], default="both",
                        help="share of the tags whose value changes every cycle")
    parser.add_argument("--deadband", type=float, default=None, help="a deadband on every numeric tag")
    parser.add_argument("--drain-batch", type=int, default=100, help="rows per fetch and delete in the drain")
    parser.add_argument("--decode-rounds", type=int, default=0, help="default: --cycles")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() once set up, as a daemon could")
    parser.add_argument("--gc-threshold", type=int, default=None, help="gc.set_threshold(N): young generation size")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--keep", type=Path, default=None, help="directory for the SQLite files (kept)")
    args = parser.parse_args()
    # Alarm transitions are logged as in the daemon (JSON lines), into /dev/null: the cost, not the noise.
    stderr, sys.stderr = sys.stderr, open(os.devnull, "w")  # noqa: SIM115
    logs.configure("json", "info")
    sys.stderr = stderr

    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        yaml_path = work / "bench.yaml"
        yaml_path.write_text(tag_map_yaml(args.assets, args.tags, args.deadband), encoding="utf-8")
        tm = load_tag_map(yaml_path)
        specs = specs_of(tm)
        reads = {device: compile_reads(s, Limits()) for device, s in specs.items()}
        types = {(t.asset, t.tag): t.fmt.type for s in specs.values() for t in s}

        def fresh() -> dict[str, list[Block]]:
            return {d: [Block.of(r, types) for r in rs] for d, rs in reads.items()}

        blocks_of = fresh()
        for bs in blocks_of.values():
            for b in bs:
                b.set(b.codes, 1)
        all_blocks = [b for bs in blocks_of.values() for b in bs]
        gc.collect()
        if args.gc_threshold is not None:
            gc.set_threshold(args.gc_threshold)
        if args.gc_freeze:
            gc.freeze()  # what a daemon can do once its tag map, drivers and engine are built
        results = [bench_decode(all_blocks, args.decode_rounds or args.cycles)]
        modes = {"all": [("all", 1.0)], "1pct": [("1pct", 0.01)], "both": [("all", 1.0), ("1pct", 0.01)]}
        for label, share in modes[args.change]:
            gc.collect()
            run = Run(label, share, args.cycles, args.per_commit, args.drain_batch, work / f"buffer-{label}.sqlite",
                      args.seed)
            results += asyncio.run(bench_commit(tm, fresh(), run))

    info = {"assets": args.assets, "tags": args.tags, "cycles": args.cycles, "per_commit": args.per_commit,
            "deadband": args.deadband, "rules": sum(len(a.rules) for a in tm.assets), "reads": len(all_blocks),
            "registers_per_cycle": sum(b.read.request.count for b in all_blocks), "python": sys.version.split()[0],
            "gc": ("frozen, " if args.gc_freeze else "") + f"threshold {gc.get_threshold()[0]}"}
    if args.json:
        print(json.dumps({"setup": info, "results": results}, indent=2))
    else:
        print_table(info, results)


if __name__ == "__main__":
    main()
