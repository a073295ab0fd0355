"""CPU cost of the rules engine, the derived values and the batch trackers on the plant map (no I/O).

    python tests/bench_rules.py [--cycles 2000]

Feeds every tag of every asset in every batch (the worst case: polled devices, no deadbands).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import orjson

from gateway.batches import BatchTracker
from gateway.derived import Derived
from gateway.model import Quality, Reading
from gateway.rules import AssetInfo, Engine
from gateway.shifts import ShiftTracker
from gateway.tagmap import load_tag_map

PLANT = Path(__file__).resolve().parents[1] / "config" / "plant.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=2000)
    args = parser.parse_args()
    tm = load_tag_map(PLANT)
    engine = Engine((AssetInfo(id=a.id, name=a.name, rules=tuple(a.rules),
                               devices={n: t.device for n, t in a.tags.items()}) for a in tm.assets), start=0.0)
    batches = {a.id: [Reading(a.id, n, ("mixing" if a.kind == "reactor" else "running") if n == "status" else 1.0,
                              Quality.GOOD, None, None, 0.0) for n in a.tags] for a in tm.assets}
    values, started = 0, time.perf_counter()
    for i in range(args.cycles):
        for batch in batches.values():
            engine.update(batch, float(i))
            values += len(batch)
    took = time.perf_counter() - started
    rules = sum(len(a.rules) for a in tm.assets)
    print(f"rules engine: {values / took:,.0f} values/s, {took / values * 1e6:.2f} us/value "
          f"({values} values, {rules} rules, {len(tm.assets)} assets)")
    calendar = tm.gateway.calendar()
    derived = [(Derived(a.id, a.derived, calendar), batches[a.id]) for a in tm.assets if a.derived]
    values, started = 0, time.perf_counter()
    for i in range(args.cycles):
        for d, batch in derived:
            d.update(batch, 1.8e9 + i)
            values += len(batch)
    took = time.perf_counter() - started
    print(f"derived values: {values / took:,.0f} station values/s, {took / values * 1e6:.2f} us/value "
          f"({len(derived)} stations, {max(len(a.derived) for a in tm.assets)} derived values each)")

    trackers = [(BatchTracker(a.id, a.batch, a.rules, units={n: t.unit for n, t in a.tags.items()},
                              devices={n: t.device for n, t in a.tags.items()}), batches[a.id])
                for a in tm.assets if a.batch is not None]
    values, started = 0, time.perf_counter()
    for i in range(args.cycles):
        for t, batch in trackers:
            t.update(batch, 1.8e9 + i)
            orjson.dumps(t.snapshot())  # committed with every commit that reads the asset
            values += len(batch)
    took = time.perf_counter() - started
    print(f"batch trackers (with their snapshot per commit): {values / took:,.0f} reactor values/s, "
          f"{took / values * 1e6:.2f} us/value ({len(trackers)} reactors, "
          f"{len(trackers[0][0].critical) if trackers else 0} critical parameters each)")

    shifts = [(ShiftTracker(a.id, a.production, calendar, tm.gateway.shift_names), batches[a.id])
              for a in tm.assets if a.production is not None]
    values, started = 0, time.perf_counter()
    for i in range(args.cycles):
        for st, batch in shifts:
            st.update(batch, 1.8e9 + i)
            st.tick(1.8e9 + i)
            values += len(batch)
    took = time.perf_counter() - started
    print(f"shift trackers: {values / took:,.0f} station values/s, {took / values * 1e6:.2f} us/value "
          f"({len(shifts)} stations)")


if __name__ == "__main__":
    main()
