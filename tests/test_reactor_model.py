"""The reactor simulator's process model (pure): batch cycle, lag, pressure, pH, determinism."""

from __future__ import annotations

import math

from simulators.reactors import CYCLE, STATUS, STEP, ReactorModel


def _run(model: ReactorModel, seconds: float) -> list[dict[str, object]]:
    out = []
    for _ in range(int(seconds / STEP)):
        model.step()
        out.append(model.values())
    return out


def test_deterministic_for_a_seed() -> None:
    assert _run(ReactorModel("A", seed=3), 60) == _run(ReactorModel("A", seed=3), 60)
    assert _run(ReactorModel("A", seed=3), 60) != _run(ReactorModel("A", seed=4), 60)


def test_batch_cycle_visits_every_step_in_order() -> None:
    model = ReactorModel("A", seed=1)
    codes = [v["Status"] for v in _run(model, sum(d for _, d, _, _ in CYCLE) * 2)]
    order = [c for i, c in enumerate(codes) if i == 0 or c != codes[i - 1]]
    names = [next(k for k, v in STATUS.items() if v == c) for c in order]
    cycle = [s for s, _, _, _ in CYCLE]
    start = names.index("idle")
    assert names[start : start + len(cycle)] == cycle
    batches = {v["BatchId"] for v in _run(model, 1)}
    assert len(batches) == 1 and str(next(iter(batches))).startswith("B-A-")


def test_temperature_follows_setpoint_with_lag_and_pressure_follows_temperature() -> None:
    model = ReactorModel("A", seed=1)
    model.step_index, model.step_left, model.temperature = 1, 60.0, 25.0  # heating to 75 degC
    values = _run(model, 50)
    temps = [float(v["Temperature"]) for v in values]  # type: ignore[arg-type]
    assert temps[0] < temps[100] < temps[-1] < 75.0, "rises towards the setpoint, never past it"
    assert abs(temps[-1] - (75 - 50 * math.exp(-50 / 20))) < 1.0  # first order, time constant 20 s
    first, last = values[0], values[-1]
    assert float(last["Pressure"]) > float(first["Pressure"])  # type: ignore[arg-type]


def test_ph_drifts_towards_target_and_faults_show() -> None:
    model = ReactorModel("B", seed=2)
    model.ph = model.ph_target + 0.5
    _run(model, 120)
    assert abs(model.ph - model.ph_target) < 0.5 * 0.2, "drifted most of the way back"
    model.faults.temperature_offset, model.faults.pressure_offset, model.faults.ph_offset = 30.0, 5.0, 0.4
    v = model.values()
    assert float(v["PhLevel"]) - model.ph_target > 0.2  # type: ignore[arg-type]
    assert float(v["Pressure"]) > 5.0  # type: ignore[arg-type]
    model.faults.clear()
    assert abs(float(model.values()["PhLevel"]) - model.ph) < 1e-3  # type: ignore[arg-type]
