"""Batches at the edge: from every reading of an asset, its current batch, its phases and, when it ends,
the batch record that quality release needs (ISA-88 words: a batch runs on a unit, from a recipe,
through phases; each critical parameter gets a result).

Pure and synchronous: readings, device connectivity and alarm transitions go in with the time (float
epoch seconds, the pipeline's commit time); events and records come out. Nothing reads a clock or
does I/O, and the whole state is a JSON snapshot, so a restart changes nothing but the time the
gateway was away (a gap, said in the record).

Rules (the README's "Batches" section says the same for plant engineers):

* A batch **starts** when the batch id tag changes to a new non-empty value, or when the phase tag
  enters one of ``running`` while no batch runs. It **ends** when the phase enters one of ``ending``,
  or when another non-empty batch id appears (that one starts at once: a batch id changed mid-batch is
  a new batch, and the record of the old one says ``end_reason: "new batch id"``).
* **Started before it was seen**: when the gateway first sees an asset (no saved state) in a running
  phase, a batch starts then with ``complete: false`` and ``observed_from``; its record covers only
  what was seen.
* **Time weighting**: a value holds from the update that brought it to the next update; the mean is
  the time-weighted mean over the batch, min and max are of the samples. Time while the value is
  bad, its device is lost or the gateway is not running is **missing** time, counted per parameter
  and never weighed into the mean or the bands.
* **Bands**: every limit rule (high, high_high: above; low, low_low: below) and target rule (outside
  target ± tolerance) of a critical parameter is a band; ``time_outside_s`` is the time the held value
  spent outside it while the rule applied (its ``when``). An excursion longer than the rule's
  ``delay`` (any, when the delay is 0) fails the parameter, whether or not its alarm was shelved.
* **Passed**: a parameter passes when no excursion failed it and its readings were missing for at
  most ``max_missing`` percent of the batch (a gap is never mistaken for a pass). The batch passes
  when every critical parameter does; ``reason`` names each one that did not and why.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from .fields import Duration, Frozen, TagName
from .model import Quality, Reading
from .rules import LIMIT_KINDS, Rule, State, Transition

SNAPSHOT_VERSION = 1
Percent = Annotated[float, BeforeValidator(lambda v: float(v[:-1]) if isinstance(v, str) and v.endswith("%") else v),
                    Field(ge=0, le=100)]
BAND_KINDS = frozenset(LIMIT_KINDS) | {"target"}


class BatchSpec(Frozen):
    """An asset's ``batch:`` section: which tags say what the asset is making."""

    id: TagName = Field(default="batch_id", description="the tag holding the batch id")
    recipe: TagName | None = Field(default=None, description="the tag holding the recipe id")
    phase: TagName = Field(default="status", description="the tag holding the phase (an enum tag's names)")
    running: list[str] = Field(min_length=1, description="phases in which a batch runs")
    ending: list[str] = Field(default_factory=list, description="phases whose start ends the batch")
    critical: list[TagName] | None = Field(
        default=None, description="critical parameters; default: every tag a limit, target or rate rule reads")
    expected_duration: Duration | None = Field(default=None, gt=0, le=30 * 86400,
                                               description="progress_percentage = elapsed / this")
    progress: TagName | None = Field(default=None, description="a tag holding the progress in percent")
    max_missing: Percent = Field(default=5.0, description="a parameter missing longer (% of the batch) fails")

    def inputs(self) -> set[str]:
        return {self.id, self.phase} | {t for t in (self.recipe, self.progress) if t} | set(self.critical or ())


def critical_tags(spec: BatchSpec, rules: Sequence[Rule]) -> list[str]:
    """The batch's critical parameters: as declared, or every tag a limit, target or rate rule reads."""
    if spec.critical is not None:
        return list(spec.critical)
    return list(dict.fromkeys(r.tag for r in rules if r.kind in BAND_KINDS or r.kind == "rate"))


@dataclass(frozen=True, slots=True)
class Band:
    rule_id: str
    kind: str
    limit: float | None
    target: float | None
    target_tag: str | None
    tolerance: float | None
    relative: bool
    delay: float
    when: tuple[tuple[str, tuple[object, ...]], ...]
    code: str | None
    severity: str

    def inputs(self) -> set[str]:
        """Tags besides its own that the band reads: its target tag and the tags of its ``when``."""
        return ({self.target_tag} if self.target_tag else set()) | {t for t, _ in self.when}

    @classmethod
    def of(cls, rule: Rule) -> Band:
        return cls(rule.rule_id, rule.kind, rule.limit, rule.target, rule.target_tag, rule.tolerance, rule.relative,
                   rule.delay, tuple((t, tuple(v)) for t, v in (rule.when or {}).items()), rule.code, rule.severity)

    def limits(self, target: float | None) -> tuple[float | None, float | None]:
        """(lowest, highest) value inside the band; None where it is open or the target is unknown."""
        if self.kind in ("high", "high_high"):
            return None, self.limit
        if self.kind in ("low", "low_low"):
            return self.limit, None
        if target is None or self.tolerance is None:
            return None, None
        tol = self.tolerance / 100 * abs(target) if self.relative else self.tolerance  # relative: in percent
        return target - tol, target + tol


class _Param:
    """One critical parameter's statistics over a batch."""

    __slots__ = ("excursion", "failed", "first", "last", "max", "min", "missing", "outside", "samples",
                 "seen", "weighted")

    def __init__(self) -> None:
        self.samples = 0
        self.min: float | None = None
        self.max: float | None = None
        self.first: float | None = None
        self.last: float | None = None
        self.weighted = 0.0  # integral of the value over the time it was known
        self.seen = 0.0  # time the value was known (good, device up)
        self.missing = 0.0
        self.outside: dict[str, float] = {}  # rule id -> seconds outside its band
        self.excursion: dict[str, float] = {}  # rule id -> seconds of the excursion going on
        self.failed: dict[str, float] = {}  # rule id -> the longest excursion beyond the rule's delay

    def sample(self, value: float) -> None:
        self.samples += 1
        self.min = value if self.min is None else min(self.min, value)
        self.max = value if self.max is None else max(self.max, value)
        if self.first is None:
            self.first = value
        self.last = value

    def state(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__slots__}

    @classmethod
    def load(cls, saved: Mapping[str, Any]) -> _Param:
        p = cls()
        for k in cls.__slots__:
            setattr(p, k, saved[k])
        return p


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class BatchTracker:
    """The batches of one asset."""

    def __init__(self, asset_id: str, spec: BatchSpec, rules: Sequence[Rule], *, units: Mapping[str, str | None],
                 devices: Mapping[str, str]) -> None:
        self.asset_id = asset_id
        self.spec = spec
        self.rules = list(rules)
        self.critical = critical_tags(spec, rules)
        self.units = dict(units)
        self.devices = dict(devices)  # tag -> device id
        self.bands: dict[str, list[Band]] = {t: [Band.of(r) for r in rules if r.tag == t and r.kind in BAND_KINDS]
                                             for t in self.critical}
        self._watch = ({spec.id, spec.phase} | {t for t in (spec.recipe, spec.progress) if t}
                       | set(self.critical) | {t for bs in self.bands.values() for b in bs for t in b.inputs()})
        self.values: dict[str, object] = {}  # last good value of every tag watched (kept while it is bad)
        self.held: dict[str, float | None] = {}  # critical tag -> value it holds now (None: missing)
        self.lost: set[str] = set()  # devices lost
        self.last: float | None = None  # time of the last update
        self.batch: dict[str, Any] | None = None  # the running batch (JSON-ready), or None
        self.params: dict[str, _Param] = {}

    # -- inputs ----------------------------------------------------------------------------------
    def update(self, readings: Iterable[Reading], now: float) -> list[dict[str, object]]:
        """Feed the asset's readings of one commit; the events (batch-status-change) and records
        (batch-record) they cause, in order."""
        self._advance(now)
        phase_before, id_before = self.values.get(self.spec.phase), self.values.get(self.spec.id)
        for r in readings:
            if r.tag not in self._watch:
                continue
            good = r.quality is Quality.GOOD
            if good:
                self.values[r.tag] = r.value
            if r.tag in self.bands:
                value = _number(r.value) if good else None
                self.held[r.tag] = value
                if value is not None and self.batch is not None:
                    self._param(r.tag).sample(value)
        self.last = now
        return self._lifecycle(phase_before, id_before, now)

    def device(self, device: str, connected: bool, now: float) -> None:
        """A device of the asset was lost or answers again: its tags' time is missing meanwhile."""
        self._advance(now)
        if connected:
            self.lost.discard(device)
        else:
            self.lost.add(device)
        self.last = now

    def touch(self, now: float) -> None:
        """The gateway ran until ``now`` (its last commit before a stop): the values held count until then."""
        self._advance(now)
        if self.last is None or now > self.last:
            self.last = now

    def alarms(self, transitions: Iterable[Transition]) -> None:
        """Alarm transitions of the asset: raises of critical parameters' alarms count in the record."""
        if self.batch is None:
            return
        for t in transitions:
            if t.asset_id == self.asset_id and t.active and t.previous in (State.NORMAL, State.CLEARED_UNACKED) \
                    and t.state is State.ACTIVE_UNACKED and t.tag in self.bands:
                key = f"{t.tag}|{t.code}|{t.severity}"
                entry = self.batch["alarms"].setdefault(key, {"count": 0, "first_raised": t.ts})
                entry["count"] += 1

    def context(self) -> dict[str, object]:
        """What alerts and events of the asset carry: the batch and recipe running now (or None)."""
        b = self.batch
        return {"batch_id": b["batch_id"] if b else None, "recipe_id": b["recipe_id"] if b else None}

    # -- time ------------------------------------------------------------------------------------
    def _advance(self, now: float) -> None:
        """Weigh every critical value held since the last update, up to ``now``."""
        if self.batch is None or self.last is None or now <= self.last:
            return
        dt = now - self.last
        for tag in self.critical:
            p = self._param(tag)
            value = self.held.get(tag)
            if value is None or self.devices.get(tag) in self.lost:
                p.missing += dt
                self._end_excursions(tag, p)
                continue
            p.weighted += value * dt
            p.seen += dt
            for band in self.bands[tag]:
                if not self._applies(band):
                    self._end_excursion(band, p)
                    continue
                low, high = band.limits(_number(self.values.get(band.target_tag)) if band.target_tag else band.target)
                if (low is not None and value < low) or (high is not None and value > high):
                    p.outside[band.rule_id] = p.outside.get(band.rule_id, 0.0) + dt
                    p.excursion[band.rule_id] = p.excursion.get(band.rule_id, 0.0) + dt
                else:
                    self._end_excursion(band, p)

    def _applies(self, band: Band) -> bool:
        return all(self.values.get(tag) in allowed for tag, allowed in band.when)

    def _end_excursions(self, tag: str, p: _Param) -> None:
        for band in self.bands[tag]:
            self._end_excursion(band, p)

    @staticmethod
    def _end_excursion(band: Band, p: _Param) -> None:
        seconds = p.excursion.pop(band.rule_id, 0.0)
        if seconds > band.delay or (seconds > 0 and band.delay == 0):
            p.failed[band.rule_id] = max(p.failed.get(band.rule_id, 0.0), seconds)

    def _param(self, tag: str) -> _Param:
        p = self.params.get(tag)
        if p is None:
            p = self.params[tag] = _Param()
        return p

    # -- lifecycle -------------------------------------------------------------------------------
    def _lifecycle(self, phase_before: object, id_before: object, now: float) -> list[dict[str, object]]:
        """Start and end batches on what changed; a first sight of the phase or the id is no change (the
        gateway just learns where the asset is)."""
        spec = self.spec
        phase, batch_id = self.values.get(spec.phase), self.values.get(spec.id)
        out: list[dict[str, object]] = []
        new_id = isinstance(batch_id, str) and batch_id not in ("", id_before) and id_before is not None
        entered = phase != phase_before
        if self.batch is not None:
            if new_id:
                out += self._end(now, "new batch id", phase)
            elif entered and phase in spec.ending:
                out += self._end(now, f"phase {phase}", phase)
            elif entered and phase is not None:
                self._phase(phase, now)
                out.append(self._event(phase_before, phase, now))
        if self.batch is None and (new_id or (entered and phase in spec.running)):
            out += self._start(now, phase_before, phase, observed=phase_before is not None or new_id)
        return out

    def _start(self, now: float, old: object, phase: object, *, observed: bool) -> list[dict[str, object]]:
        batch_id, recipe = self.values.get(self.spec.id), self.values.get(self.spec.recipe or "")
        self.batch = {"batch_id": batch_id if isinstance(batch_id, str) else None,
                      "recipe_id": recipe if isinstance(recipe, str) else None,
                      "start": now, "observed_from": None if observed else now, "phases": [], "alarms": {},
                      "gaps": []}
        self.params = {}
        for tag in self.critical:
            value = self.held.get(tag)
            if value is not None:
                self._param(tag).sample(value)
        if phase is not None:
            self._phase(phase, now)
        return [self._event(old, phase, now)]

    def _phase(self, phase: object, now: float) -> None:
        assert self.batch is not None
        phases = self.batch["phases"]
        if phases and phases[-1]["end"] is None:
            phases[-1]["end"] = now
        phases.append({"phase": phase, "start": now, "end": None})

    def _end(self, now: float, why: str, phase: object) -> list[dict[str, object]]:
        batch = self.batch
        assert batch is not None
        for tag in self.critical:
            self._end_excursions(tag, self._param(tag))
        event = self._event(batch["phases"][-1]["phase"] if batch["phases"] else None, phase, now)
        record = self._record(now, why)
        self.batch, self.params = None, {}
        return [event, record]

    def _progress(self, now: float) -> float | None:
        if self.spec.progress is not None:
            value = _number(self.values.get(self.spec.progress))
            return None if value is None else round(min(max(value, 0.0), 100.0), 1)
        if self.spec.expected_duration is None or self.batch is None:
            return None
        elapsed = now - float(self.batch["start"])
        return round(min(100.0, 100.0 * elapsed / self.spec.expected_duration), 1)

    def _event(self, old: object, new: object, now: float) -> dict[str, object]:
        b = self.batch
        return {"event": "batch-status-change", "batch_id": b["batch_id"] if b else None,
                "recipe_id": b["recipe_id"] if b else None, "old_status": old, "new_status": new,
                "progress_percentage": self._progress(now), "ts": now}

    def _record(self, now: float, why: str) -> dict[str, object]:
        batch = self.batch
        assert batch is not None
        duration = now - batch["start"]
        phases = [{**p, "end": now if p["end"] is None else p["end"]} for p in batch["phases"]]
        for p in phases:
            p["duration_s"] = round(p["end"] - p["start"], 3)
        parameters = [self._result(tag, duration) for tag in self.critical]
        failing = [f"{p['parameter_name']}: {p['reason']}" for p in parameters if not p["passed"]]
        alarms = [{"tag": k.split("|")[0], "code": k.split("|")[1], "severity": k.split("|")[2], **v}
                  for k, v in batch["alarms"].items()]
        missing = max((float(p["missing_s"]) for p in parameters), default=0.0)  # type: ignore[arg-type]
        return {"event": "batch-record", "batch_id": batch["batch_id"], "recipe_id": batch["recipe_id"],
                "start": batch["start"], "end": now, "duration_s": round(duration, 3), "end_reason": why,
                "observed_from": batch["observed_from"],
                "complete": batch["observed_from"] is None and not batch["gaps"] and missing == 0,
                "phases": phases, "parameters": parameters, "alarms": alarms, "gaps": batch["gaps"],
                "passed": not failing, "reason": "; ".join(failing) if failing else "every critical parameter "
                                                                                    "within its bands", "ts": now}

    def _result(self, tag: str, duration: float) -> dict[str, object]:
        p = self._param(tag)
        target: float | None = None
        low: float | None = None
        high: float | None = None
        for band in self.bands[tag]:
            t = _number(self.values.get(band.target_tag)) if band.target_tag else band.target
            lo, hi = band.limits(t)
            if band.kind == "target":
                target = t
            low = lo if low is None or (lo is not None and lo > low) else low
            high = hi if high is None or (hi is not None and hi < high) else high
        mean = p.weighted / p.seen if p.seen > 0 else None
        reasons = [f"outside {rule} for {seconds:.1f} s (longer than its delay)" for rule, seconds in p.failed.items()]
        share = 100.0 * p.missing / duration if duration > 0 else 0.0
        if share > self.spec.max_missing:
            reasons.append(f"readings missing for {p.missing:.1f} s ({share:.1f} % of the batch, at most "
                           f"{self.spec.max_missing:g} % allowed)")
        if p.samples == 0:
            reasons.append("no reading during the batch")
        return {"parameter_name": tag, "unit": self.units.get(tag), "critical": True, "samples": p.samples,
                "min": p.min, "max": p.max, "mean": mean, "first": p.first, "last": p.last,
                "measured_value": mean, "target_value": target, "tolerance_min": low, "tolerance_max": high,
                "time_outside_s": {k: round(v, 3) for k, v in p.outside.items()},
                "missing_s": round(p.missing, 3), "passed": not reasons,
                "reason": "; ".join(reasons) if reasons else "within its bands"}

    # -- restart ---------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, object]:
        return {"v": SNAPSHOT_VERSION, "values": self.values, "held": self.held, "lost": sorted(self.lost),
                "last": self.last, "batch": self.batch, "params": {t: p.state() for t, p in self.params.items()}}

    def restore(self, saved: object, now: float) -> bool:
        """Back to a snapshot's state; the time from its last update to ``now`` is a gap (the gateway
        was not running). False (and a fresh start) when the snapshot does not fit."""
        if not isinstance(saved, dict) or saved.get("v") != SNAPSHOT_VERSION:
            return False
        try:
            self.values = dict(saved["values"])
            self.held = {t: v for t, v in saved["held"].items() if t in self.bands}
            self.lost = set(saved["lost"])
            self.last = saved["last"]
            self.batch = saved["batch"]
            self.params = {t: _Param.load(p) for t, p in saved["params"].items() if t in self.bands}
        except (KeyError, TypeError, ValueError):
            fresh = BatchTracker(self.asset_id, self.spec, self.rules, units=self.units, devices=self.devices)
            self.values, self.held, self.lost, self.last = fresh.values, fresh.held, fresh.lost, fresh.last
            self.batch, self.params = fresh.batch, fresh.params
            return False
        if self.batch is not None and self.last is not None and now > self.last:
            gap_from = self.last
            self.held = dict.fromkeys(self.held)  # nothing is known of the time away
            self._advance(now)
            self.batch["gaps"].append({"from": gap_from, "to": now, "reason": "gateway not running"})
            self.last = now
        return True
