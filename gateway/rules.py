"""The plant's limits, checked at the edge: rule declarations and a pure alarm engine.

The engine has no I/O and no clock of its own: readings, device status and operator commands come in
with the time they happen, alarm transitions go out. The same inputs always give the same
transitions, so it is table- and property-tested on its own and replays exactly.

The alarm lifecycle follows ISA-18.2::

    normal --condition--> active_unacked --ack--> active_acked --clear--> normal
                              |  ^                                  (no ack needed)
                         clear|  |condition
                              v  |
                         cleared_unacked --ack--> normal

plus ``shelved`` (by an operator, always with an expiry) and ``out_of_service`` (maintenance). The
condition is still tracked while an alarm is shelved or out of service; when it comes back, an
alarm whose condition is active annunciates again as ``active_unacked``.

Every condition kind has hysteresis (``deadband``: a value must come back inside the limit by that
much to clear) and on/off delays (``delay``, ``off_delay``: the condition must hold that long), so
a noisy value never chatters.
"""

from __future__ import annotations

import math
import string
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, field_validator, model_validator

from .fields import Duration, Frozen, Identifier, TagName
from .model import Quality, Reading

Severity = Literal["low", "medium", "high", "critical"]
SEVERITIES: tuple[Severity, ...] = ("low", "medium", "high", "critical")
LIMIT_KINDS = ("high", "high_high", "low", "low_low")
MAX_SHELVE = 24 * 3600.0  # ISA-18.2: shelving is always time-limited

DEFAULT_CODES = {
    "high": "LIMIT_HIGH", "high_high": "LIMIT_HIGH_HIGH", "low": "LIMIT_LOW", "low_low": "LIMIT_LOW_LOW",
    "target": "OFF_TARGET", "rate": "RATE_OF_CHANGE", "stale": "STALE_VALUE", "bad_quality": "BAD_QUALITY",
    "comm_lost": "COMM_LOST",
}
DEFAULT_MESSAGES = {
    "high": "{asset_name}: {tag} {value}{unit} above {limit}{unit}",
    "high_high": "{asset_name}: {tag} {value}{unit} above {limit}{unit} (high-high)",
    "low": "{asset_name}: {tag} {value}{unit} below {limit}{unit}",
    "low_low": "{asset_name}: {tag} {value}{unit} below {limit}{unit} (low-low)",
    "target": "{asset_name}: {tag} {value}{unit} off target {target}{unit} by {deviation}%",
    "rate": "{asset_name}: {tag} changing {rate}{unit}/min, limit {limit}{unit}/min",
    "stale": "{asset_name}: no good {tag} value for {after}s",
    "bad_quality": "{asset_name}: {tag} quality bad ({reason})",
    "comm_lost": "{asset_name}: communication with {device} lost",
}
DEFAULT_CLEAR = "{asset_name}: {tag} back to normal ({value}{unit})"
DEFAULT_CLEARS = {
    "comm_lost": "{asset_name}: communication with {device} restored",
    "stale": "{asset_name}: {tag} values arriving again",
    "bad_quality": "{asset_name}: {tag} quality good again",
}
PLACEHOLDERS = frozenset({"asset", "asset_name", "tag", "value", "unit", "limit", "target", "deviation",
                          "rate", "after", "reason", "device", "severity", "code"})


def _kind(value: object) -> object:
    return value.replace("-", "_") if isinstance(value, str) else value


def _percent_value(value: object) -> float | None:
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            return float(value.strip()[:-1])
        except ValueError:
            return None  # pydantic reports the field
    return None


def _tolerance(data: object) -> object:
    """``tolerance: 0.2`` is absolute; ``tolerance: 2%`` is relative to the target, and so is its
    deadband (``deadband: 0.5%``)."""
    if isinstance(data, dict) and (tol := _percent_value(data.get("tolerance"))) is not None:
        data = {**data, "tolerance": tol, "relative": True}
        if (band := _percent_value(data.get("deadband"))) is not None:
            data["deadband"] = band
    return data


class Rule(Frozen):
    """One rule of an asset (the tag map's ``rules:`` list)."""

    model_config = ConfigDict(allow_inf_nan=False)  # a limit of .nan or .inf would never fire

    id: Identifier | None = Field(default=None, description="default: {tag}_{kind}; alarm id {asset}/{id}")
    tag: TagName
    kind: Annotated[Literal["high", "high_high", "low", "low_low", "target", "rate", "stale", "bad_quality",
                            "comm_lost"], BeforeValidator(_kind)]
    limit: float | None = Field(default=None, description="limit kinds: the limit; rate: change per minute")
    target: float | None = None
    target_tag: TagName | None = None
    tolerance: float | None = Field(default=None, gt=0, description="target: 0.2 (absolute) or 2% (of target)")
    relative: bool = False
    direction: Literal["rising", "falling", "both"] = "both"
    window: Duration = Field(default=60.0, gt=0, le=86400, description="rate: measured over this window")
    after: Duration | None = Field(default=None, gt=0, le=86400, description="stale: no good value this long")
    deadband: float = Field(default=0.0, ge=0, description="hysteresis, in the unit of the compared quantity")
    delay: Duration = Field(default=0.0, ge=0, le=86400, description="on-delay")
    off_delay: Duration = Field(default=0.0, ge=0, le=86400)
    severity: Severity = "medium"
    code: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$")] | None = None
    message: str | None = Field(default=None, description="template: " + ", ".join(sorted(PLACEHOLDERS)))
    clear_message: str | None = Field(default=None, description="template once the condition has cleared")
    when: dict[TagName, list[str | int | float | bool]] | None = Field(
        default=None, description="applies only while each tag has one of the values, e.g. {status: [heating]}"
    )

    @model_validator(mode="before")
    @classmethod
    def _relative(cls, data: object) -> object:
        return _tolerance(data)

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        k = self.kind
        needs: dict[str, bool] = {
            "limit": k in LIMIT_KINDS or k == "rate",
            "tolerance": k == "target",
            "after": k == "stale",
        }
        for name, needed in needs.items():
            given = getattr(self, name) is not None
            if needed and not given:
                raise ValueError(f"a {k} rule needs {name}")
            if given and not needed:
                raise ValueError(f"{name} does not apply to a {k} rule")
        if k == "target":
            if (self.target is None) == (self.target_tag is None):
                raise ValueError("a target rule needs target (a number) or target_tag (a tag), not both")
        elif self.target is not None or self.target_tag is not None:
            raise ValueError(f"target/target_tag do not apply to a {k} rule")
        if self.relative and k != "target":
            raise ValueError(f"relative does not apply to a {k} rule")
        if k == "rate" and self.limit is not None and self.limit <= 0:
            raise ValueError("a rate limit is a positive change per minute")
        if self.deadband and k in ("stale", "bad_quality", "comm_lost"):
            raise ValueError(f"deadband does not apply to a {k} rule")
        if k == "target" and self.tolerance is not None and self.deadband >= self.tolerance:
            raise ValueError(f"deadband {self.deadband} must be below the tolerance {self.tolerance}")
        if self.direction != "both" and k != "rate":
            raise ValueError("direction applies to rate rules")
        return self

    @field_validator("message", "clear_message")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is not None:
            check_template(value)
        return value

    @property
    def rule_id(self) -> str:
        return self.id or f"{self.tag}_{self.kind}"

    @property
    def inputs(self) -> set[str]:
        """Tags the rule reads."""
        return {self.tag} | ({self.target_tag} if self.target_tag else set()) | set(self.when or ())


def check_template(template: str) -> None:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"message template: {exc}") from None
    fields = {name for _, name, _, _ in parsed if name is not None}
    unknown = fields - PLACEHOLDERS
    if unknown:
        raise ValueError(f"message template: unknown placeholder(s) {sorted(unknown)}; "
                         f"known: {', '.join(sorted(PLACEHOLDERS))}")
    if any("{" in (spec or "") for _, _, spec, _ in parsed):
        raise ValueError("message template: no placeholders inside a format spec")
    try:  # placeholders are filled with text: a conversion or format spec text does not take fails here
        template.format(**dict.fromkeys(PLACEHOLDERS, ""))
    except ValueError as exc:
        raise ValueError(f"message template: {exc}") from None


# -- the engine ------------------------------------------------------------------------------------

class State(StrEnum):
    NORMAL = "normal"
    ACTIVE_UNACKED = "active_unacked"
    ACTIVE_ACKED = "active_acked"
    CLEARED_UNACKED = "cleared_unacked"
    SHELVED = "shelved"
    OUT_OF_SERVICE = "out_of_service"


@dataclass(frozen=True, slots=True)
class AssetInfo:
    """What the engine needs to know of an asset."""

    id: str
    name: str
    rules: tuple[Rule, ...]
    devices: Mapping[str, str]  # tag -> device id
    units: Mapping[str, str | None] = field(default_factory=dict)  # tag -> unit


@dataclass(frozen=True, slots=True)
class Transition:
    """One change of an alarm's state: what an ``alerts`` message carries."""

    alarm_id: str
    asset_id: str
    tag: str
    rule: str  # the rule's kind
    rule_id: str
    code: str
    severity: Severity
    state: State
    previous: State
    active: bool  # the condition, after its delays
    value: object
    unit: str | None
    limit: float | None
    target: float | None
    deviation_percentage: float | None
    message: str
    trigger: str  # condition, acknowledge, shelve, unshelve, shelve_expired, out_of_service, in_service
    ts: float
    user: str | None = None
    comment: str | None = None
    shelved_until: float | None = None


class CommandError(Exception):
    """An operator command that cannot apply (unknown alarm, wrong state); nothing changed."""


@dataclass
class _Alarm:
    rule: Rule
    asset: AssetInfo
    alarm_id: str
    code: str
    state: State = State.NORMAL
    active: bool = False  # condition after delays and hysteresis
    pending_since: float | None = None  # when the raw condition started to differ from ``active``
    raw: bool = False
    since: float | None = None  # time of the last transition
    shelved_until: float | None = None
    value: object = None
    limit: float | None = None
    target: float | None = None
    _deviation: float | None = None  # see ``deviation``
    rate: float | None = None
    reason: str | None = None
    history: deque[tuple[float, float]] = field(default_factory=deque)  # rate: (ts, value) in the window
    index: int = 0  # in Engine._order
    st: _TagState | None = None  # the state of ``rule.tag`` (made with the engine)
    side: int = 0  # limit kinds: 1 high, high_high; -1 low, low_low; 0 any other kind
    limit_value: float = 0.0  # limit kinds: float(rule.limit)
    _deviation_of: tuple[float, float] | None = None  # (delta, base) of a deviation not computed yet

    @property
    def deviation(self) -> float | None:
        """Deviation from the limit or target in percent. A limit rule computes it only when it is
        read (a view, a transition, a snapshot): the rounding costs as much as the rest of a check."""
        if self._deviation_of is not None:
            self._deviation, self._deviation_of = _percent(*self._deviation_of), None
        return self._deviation

    @deviation.setter
    def deviation(self, value: float | None) -> None:
        self._deviation, self._deviation_of = value, None

    def unit(self) -> str | None:
        return self.asset.units.get(self.rule.tag)


@dataclass(slots=True)
class _TagState:
    value: object = None
    quality: Quality | None = None
    reason: str | None = None
    good_ts: float | None = None  # last good reading
    readers: tuple[int, ...] = ()  # alarms whose rule reads the tag (indexes into Engine._order)
    rates: tuple[_Alarm, ...] = ()  # rate alarms of this tag: they remember its good values


_GOOD = Quality.GOOD
_NONE: dict[str, _TagState] = {}


class Engine:
    """Alarms of a set of assets. Feed it with :meth:`update`, :meth:`device` and :meth:`tick`."""

    def __init__(self, assets: Iterable[AssetInfo], start: float) -> None:
        self.alarms: dict[str, _Alarm] = {}
        self.by_asset: dict[str, list[_Alarm]] = {}
        self.tags: dict[tuple[str, str], _TagState] = {}
        self.devices_down: set[str] = set()
        self.start = start  # stale clocks start here: a tag never read is stale ``after`` seconds in
        self.evaluated = start  # the latest time rules were evaluated at
        self._tags_of: dict[str, list[tuple[str, str]]] = {}  # device -> (asset, tag) it serves
        for asset in assets:
            for tag, device in asset.devices.items():
                self._tags_of.setdefault(device, []).append((asset.id, tag))
            alarms = self.by_asset.setdefault(asset.id, [])
            for rule in asset.rules:
                rule_id = rule.rule_id
                alarm = _Alarm(rule, asset, f"{asset.id}/{rule_id}", rule.code or DEFAULT_CODES[rule.kind])
                self.alarms[alarm.alarm_id] = alarm
                alarms.append(alarm)
        self._order = list(self.alarms.values())
        self._readers: dict[tuple[str, str], list[int]] = {}  # (asset, tag) -> alarms whose rule reads it
        for i, alarm in enumerate(self._order):
            alarm.index = i
            if alarm.rule.kind != "comm_lost":  # follows the device, not values
                for tag in sorted(alarm.rule.inputs):
                    self._readers.setdefault((alarm.asset.id, tag), []).append(i)
        # What keeps the per-value and per-commit work small (update, device, tick, counts): only
        # tags some rule reads have a state (nothing else looks at the others), made here; each knows
        # the alarms that read it, each device the states of its tags. ``tick`` and ``next_deadline``
        # visit only the alarms that can have a timer running (``_watch``: an on/off delay pending or
        # shelved, kept by _evaluate, _move and restore; ``_stale``: stale rules), and the counts of
        # alarms not normal are kept as states change.
        self._stale = frozenset(a.index for a in self._order if a.rule.kind == "stale")
        self._watch: set[int] = set()  # a superset of the alarms with pending_since set or shelved
        self._not_normal: dict[str, int] = dict.fromkeys(SEVERITIES, 0)
        self._read: dict[str, dict[str, _TagState]] = {}  # asset -> tag -> state, of the tags rules read
        for asset_id, tag in self._readers:
            self._read.setdefault(asset_id, {})[tag] = self._state(asset_id, tag)
        self._states_of: dict[str, list[_TagState]] = {
            device: [self._state(asset_id, tag) for asset_id, tag in keys if (asset_id, tag) in self._readers]
            for device, keys in self._tags_of.items()
        }
        for alarm in self._order:
            rule = alarm.rule
            if rule.kind != "comm_lost":  # follows the device: no state
                alarm.st = self._state(alarm.asset.id, rule.tag)
            if rule.kind in LIMIT_KINDS:
                alarm.side = 1 if rule.kind.startswith("high") else -1
                alarm.limit_value = float(rule.limit)  # type: ignore[arg-type]

    def _state(self, asset_id: str, tag: str) -> _TagState:
        """The state of a tag (made with the engine: the tags its rules read)."""
        key = (asset_id, tag)
        st = self.tags.get(key)
        if st is None:
            readers = tuple(self._readers.get(key, ()))
            rates = tuple(a for a in (self._order[i] for i in readers) if a.rule.kind == "rate" and a.rule.tag == tag)
            st = self.tags[key] = _TagState(readers=readers, rates=rates)
        return st

    # -- inputs ---------------------------------------------------------------------------------
    def update(self, readings: Iterable[Reading], now: float) -> list[Transition]:
        """New readings (of any assets); every rule they touch is evaluated at ``now``."""
        touched: set[int] = set()
        order = self._order
        read = self._read
        asset: str | None = None
        states: dict[str, _TagState] = {}
        for r in readings:  # per value: keep it lean (readings come grouped by asset)
            if r.asset != asset:
                asset = r.asset
                states = read.get(asset, _NONE)
            st = states.get(r.tag)
            if st is None:
                continue  # no rule reads the tag
            quality = st.quality = r.quality
            st.value = r.value
            st.reason = r.reason
            if quality is _GOOD:
                st.good_ts = r.ts
            touched.update(st.readers)
            if st.rates and quality is _GOOD and _number(r.value) is not None:
                for alarm in st.rates:
                    _remember(alarm, r.ts, float(r.value))  # type: ignore[arg-type]
        out: list[Transition] = []
        for i in sorted(touched):  # map order: the same readings always give the same transitions
            self._evaluate(order[i], now, out)
        return out

    def device(self, device_id: str, connected: bool, now: float) -> list[Transition]:
        """The device answered (``connected``) or failed at ``now``.

        An answer vouches for the device's tags whose last value was good, even when it brought no
        new value: a subscription reports changes only, and a value that does not change is not stale.
        """
        if connected:
            for st in self._states_of.get(device_id, ()):
                if st.quality is _GOOD:
                    st.good_ts = now
        if connected == (device_id not in self.devices_down):
            return []
        if connected:
            self.devices_down.discard(device_id)
        else:
            self.devices_down.add(device_id)
        out: list[Transition] = []
        for alarm in self.alarms.values():
            if alarm.rule.kind == "comm_lost" and alarm.asset.devices.get(alarm.rule.tag) == device_id:
                self._evaluate(alarm, now, out)
        return out

    def tick(self, now: float) -> list[Transition]:
        """Time passed: delays run out, values go stale, shelving expires."""
        out: list[Transition] = []
        order = self._order
        for i in sorted(self._watch | self._stale):  # the alarms in map order, as all of them would be
            alarm = order[i]
            if alarm.state is State.SHELVED and alarm.shelved_until is not None and now >= alarm.shelved_until:
                self._return(alarm, now, "shelve_expired", None, None, out)
            if alarm.pending_since is not None or alarm.rule.kind == "stale":
                self._evaluate(alarm, now, out)
            if alarm.pending_since is None and alarm.state is not State.SHELVED:
                self._watch.discard(i)
        return out

    def shift(self, delta: float) -> None:
        """The wall clock jumped by ``delta`` seconds (NTP stepped it): move every running timer with
        it, so delays, staleness, rates and shelving keep their real durations. Transition times
        (``since``) are history and stay as they were."""
        self.start += delta
        self.evaluated += delta
        for a in self.alarms.values():
            if a.pending_since is not None:
                a.pending_since += delta
            if a.shelved_until is not None:
                a.shelved_until += delta
            a.history = deque((t + delta, v) for t, v in a.history)
        for st in self.tags.values():
            if st.good_ts is not None:
                st.good_ts += delta

    def next_deadline(self) -> float | None:
        """The earliest time at which :meth:`tick` can change something."""
        times: list[float] = []
        for i in self._watch | self._stale:
            a = self._order[i]
            r = a.rule
            if a.pending_since is not None:
                times.append(a.pending_since + (r.off_delay if a.active else r.delay))
            if a.state is State.SHELVED and a.shelved_until is not None:
                times.append(a.shelved_until)
            if r.kind == "stale" and r.after is not None and not a.raw:
                st = self.tags.get((a.asset.id, r.tag))
                last = st.good_ts if st and st.good_ts is not None else self.start
                due = max(last, self.start) + r.after
                if due > self.evaluated:  # not one that passed while the rule did not apply (`when`)
                    times.append(due)
        return min(times) if times else None

    # -- operator commands ---------------------------------------------------------------------
    def acknowledge(self, alarm_id: str, now: float, user: str | None = None,
                    comment: str | None = None) -> Transition | None:
        """None when there is nothing to acknowledge (idempotent: a repeated ack changes nothing)."""
        alarm = self._get(alarm_id)
        if alarm.state is State.ACTIVE_UNACKED:
            return self._move(alarm, State.ACTIVE_ACKED, now, "acknowledge", user, comment)
        if alarm.state is State.CLEARED_UNACKED:
            return self._move(alarm, State.NORMAL, now, "acknowledge", user, comment)
        return None

    def shelve(self, alarm_id: str, now: float, duration: float, user: str | None = None,
               comment: str | None = None) -> Transition:
        if not 0 < duration <= MAX_SHELVE:
            raise CommandError(f"shelve duration must be above 0 and at most {MAX_SHELVE:.0f} s")
        alarm = self._get(alarm_id)
        if alarm.state is State.OUT_OF_SERVICE:
            raise CommandError(f"{alarm_id} is out of service; return it to service first")
        alarm.shelved_until = now + duration
        return self._move(alarm, State.SHELVED, now, "shelve", user, comment)

    def unshelve(self, alarm_id: str, now: float, user: str | None = None,
                 comment: str | None = None) -> Transition | None:
        return self._leave(alarm_id, State.SHELVED, now, "unshelve", user=user, comment=comment)

    def out_of_service(self, alarm_id: str, now: float, user: str | None = None,
                       comment: str | None = None) -> Transition | None:
        alarm = self._get(alarm_id)
        if alarm.state is State.OUT_OF_SERVICE:
            return None
        alarm.shelved_until = None
        return self._move(alarm, State.OUT_OF_SERVICE, now, "out_of_service", user, comment)

    def in_service(self, alarm_id: str, now: float, user: str | None = None,
                   comment: str | None = None) -> Transition | None:
        return self._leave(alarm_id, State.OUT_OF_SERVICE, now, "in_service", user=user, comment=comment)

    def _leave(self, alarm_id: str, state: State, now: float, trigger: str, *, user: str | None,
               comment: str | None) -> Transition | None:
        """Return an alarm in ``state`` to what its condition says (None: it was not in ``state``)."""
        alarm = self._get(alarm_id)
        if alarm.state is not state:
            return None
        out: list[Transition] = []
        self._return(alarm, now, trigger, user, comment, out)
        return out[0] if out else None

    # -- views and persistence ----------------------------------------------------------------
    def not_normal(self, asset_id: str) -> list[dict[str, object]]:
        """The asset's alarms that are not normal: the retained ``alarms`` topic."""
        return [self.view(a.alarm_id) for a in self.by_asset.get(asset_id, ()) if a.state is not State.NORMAL]

    def view(self, alarm_id: str) -> dict[str, object]:
        a = self._get(alarm_id)
        return {
            "alarm_id": a.alarm_id, "tag": a.rule.tag, "rule": a.rule.kind, "rule_id": a.rule.rule_id,
            "code": a.code, "severity": a.rule.severity, "state": a.state.value, "active": a.active,
            "since": a.since, "value": a.value, "unit": a.unit(), "limit": a.limit, "target": a.target,
            "deviation_percentage": a.deviation, "message": self._message(a),
            "shelved_until": a.shelved_until,
        }

    def counts(self) -> dict[str, int]:
        """Alarms not normal, by severity."""
        return dict(self._not_normal)  # kept by _changed_state

    def snapshot(self, alarm_id: str) -> dict[str, object]:
        a = self._get(alarm_id)
        return {"state": a.state.value, "active": a.active, "since": a.since, "shelved_until": a.shelved_until,
                "value": a.value, "limit": a.limit, "target": a.target, "deviation": a.deviation}

    def restore(self, alarm_id: str, saved: Mapping[str, Any]) -> bool:
        """Put back a state saved by :meth:`snapshot`; False (and nothing changed) when it does not fit."""
        alarm = self.alarms.get(alarm_id)
        try:
            state = State(saved["state"])
            active = bool(saved["active"])
            shelved = saved.get("shelved_until")
            since = saved.get("since")
            if alarm is None or (shelved is not None and not isinstance(shelved, (int, float))) \
                    or (since is not None and not isinstance(since, (int, float))):
                return False
        except (KeyError, ValueError, TypeError):
            return False
        self._changed_state(alarm, state)
        alarm.state, alarm.active, alarm.raw, alarm.since = state, active, active, since
        alarm.shelved_until = float(shelved) if shelved is not None and state is State.SHELVED else None
        alarm.value = saved.get("value")
        for name in ("limit", "target", "deviation"):
            v = saved.get(name)
            setattr(alarm, name, float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None)
        return True

    # -- evaluation ------------------------------------------------------------------------------
    def _get(self, alarm_id: str) -> _Alarm:
        alarm = self.alarms.get(alarm_id)
        if alarm is None:
            raise CommandError(f"no alarm {alarm_id!r}")
        return alarm

    def _evaluate(self, alarm: _Alarm, now: float, out: list[Transition]) -> None:
        self.evaluated = max(self.evaluated, now)
        raw = self._condition(alarm, now)
        if raw is None:  # cannot tell (no value yet, bad value): keep the state
            alarm.pending_since = None
            return
        if raw is _SUPPRESSED:  # outside its `when`: the condition is off at once
            alarm.raw, alarm.pending_since = False, None
            if alarm.active:
                self._set_active(alarm, False, now, out)
            return
        alarm.raw = bool(raw)
        if alarm.raw == alarm.active:
            alarm.pending_since = None
            return
        if alarm.pending_since is None:
            alarm.pending_since = now
            self._watch.add(alarm.index)
        wait = alarm.rule.delay if alarm.raw else alarm.rule.off_delay
        if now - alarm.pending_since >= wait:
            alarm.pending_since = None
            self._set_active(alarm, alarm.raw, now, out)

    def _condition(self, alarm: _Alarm, now: float) -> bool | object | None:
        """The raw condition at ``now``, with hysteresis; None when it cannot be evaluated."""
        rule, asset = alarm.rule, alarm.asset
        if rule.when is not None and not self._applies(alarm):
            return _SUPPRESSED
        if alarm.side:  # a limit (the most common kind, checked per value)
            return _limit(alarm)
        st = alarm.st
        kind = rule.kind
        if kind == "comm_lost":
            alarm.value = None
            return asset.devices.get(rule.tag) in self.devices_down
        if kind == "stale":
            last = st.good_ts if st is not None and st.good_ts is not None else self.start
            alarm.value = round(now - max(last, self.start), 3)
            return now - max(last, self.start) > (rule.after or 0.0)
        if kind == "bad_quality":
            if st is None or st.quality is None:
                return None
            alarm.value, alarm.reason = st.value, st.reason
            return st.quality is Quality.BAD
        if st is None or st.quality is not Quality.GOOD:
            return None
        value = _number(st.value)
        if value is None:
            return None
        alarm.value = st.value
        if kind in LIMIT_KINDS:
            limit = float(rule.limit)  # type: ignore[arg-type]
            alarm.limit = limit
            alarm.deviation = _percent(value - limit, limit)
            if kind.startswith("high"):
                return value > (limit - rule.deadband if alarm.active else limit)
            return value < (limit + rule.deadband if alarm.active else limit)
        if kind == "target":
            target = self._target(alarm)
            if target is None:
                return None
            alarm.target = target
            alarm.deviation = _percent(value - target, target)
            if rule.relative:
                if alarm.deviation is None:
                    return None
                off = abs(alarm.deviation)
            else:
                off = abs(value - target)
            tol = float(rule.tolerance)  # type: ignore[arg-type]
            return off > (tol - rule.deadband if alarm.active else tol)
        if kind == "rate":
            rate = _rate(alarm.history)
            if rate is None:
                return None
            alarm.rate = rate
            alarm.limit = rule.limit
            signed = {"rising": rate, "falling": -rate, "both": abs(rate)}[rule.direction]
            limit = float(rule.limit)  # type: ignore[arg-type]
            return signed > (limit - rule.deadband if alarm.active else limit)
        raise AssertionError(kind)

    def _applies(self, alarm: _Alarm) -> bool:
        """Every tag of the rule's ``when`` has a good value among its allowed ones."""
        for tag, allowed in (alarm.rule.when or {}).items():
            st = self.tags.get((alarm.asset.id, tag))
            if st is None or st.quality is not Quality.GOOD or st.value not in allowed:
                return False
        return True

    def _target(self, alarm: _Alarm) -> float | None:
        if alarm.rule.target is not None:
            return alarm.rule.target
        st = self.tags.get((alarm.asset.id, alarm.rule.target_tag or ""))
        if st is None or st.quality is not Quality.GOOD:
            return None
        return _number(st.value)

    def _set_active(self, alarm: _Alarm, active: bool, now: float, out: list[Transition]) -> None:
        alarm.active = active
        state = alarm.state
        if state in (State.SHELVED, State.OUT_OF_SERVICE):
            return  # tracked, not annunciated
        if active and state in (State.NORMAL, State.CLEARED_UNACKED):
            out.append(self._move(alarm, State.ACTIVE_UNACKED, now, "condition"))
        elif not active and state is State.ACTIVE_UNACKED:
            out.append(self._move(alarm, State.CLEARED_UNACKED, now, "condition"))
        elif not active and state is State.ACTIVE_ACKED:
            out.append(self._move(alarm, State.NORMAL, now, "condition"))

    def _return(self, alarm: _Alarm, now: float, trigger: str, user: str | None, comment: str | None,
                out: list[Transition]) -> None:
        """Back from shelved or out of service: an active condition annunciates again."""
        alarm.shelved_until = None
        new = State.ACTIVE_UNACKED if alarm.active else State.NORMAL
        out.append(self._move(alarm, new, now, trigger, user, comment))

    def _move(self, alarm: _Alarm, new: State, now: float, trigger: str, user: str | None = None,
              comment: str | None = None) -> Transition:
        self._changed_state(alarm, new)
        previous, alarm.state, alarm.since = alarm.state, new, now
        rule = alarm.rule
        return Transition(
            alarm_id=alarm.alarm_id, asset_id=alarm.asset.id, tag=rule.tag, rule=rule.kind, rule_id=rule.rule_id,
            code=alarm.code, severity=rule.severity, state=new, previous=previous, active=alarm.active,
            value=alarm.value, unit=alarm.unit(), limit=alarm.limit, target=alarm.target,
            deviation_percentage=alarm.deviation, message=self._message(alarm), trigger=trigger, ts=now,
            user=user, comment=comment, shelved_until=alarm.shelved_until,
        )

    def _changed_state(self, alarm: _Alarm, new: State) -> None:
        """Bookkeeping before ``alarm.state`` becomes ``new``: the counts, and a shelved alarm's timer."""
        normal = State.NORMAL
        self._not_normal[alarm.rule.severity] += (new is not normal) - (alarm.state is not normal)
        if new is State.SHELVED:
            self._watch.add(alarm.index)

    def _message(self, alarm: _Alarm) -> str:
        rule = alarm.rule
        unit = alarm.unit()
        fields = {
            "asset": alarm.asset.id, "asset_name": alarm.asset.name or alarm.asset.id, "tag": rule.tag,
            "value": _fmt(alarm.value), "unit": f" {unit}" if unit else "", "limit": _fmt(alarm.limit),
            "target": _fmt(alarm.target), "deviation": _fmt(alarm.deviation), "rate": _fmt(alarm.rate),
            "after": _fmt(rule.after), "reason": alarm.reason or "", "severity": rule.severity,
            "code": alarm.code, "device": alarm.asset.devices.get(rule.tag, ""),
        }
        if alarm.active:
            template = rule.message or DEFAULT_MESSAGES[rule.kind]
        else:
            template = rule.clear_message or DEFAULT_CLEARS.get(rule.kind, DEFAULT_CLEAR)
        return template.format(**fields)


_SUPPRESSED = object()


def _limit(alarm: _Alarm) -> bool | None:
    """``Engine._condition`` of a limit rule, without its dispatch: it runs for every value of the tag."""
    st = alarm.st
    if st is None or st.quality is not _GOOD:
        return None
    raw = st.value
    value = (raw if raw - raw == 0.0 else None) if type(raw) is float else _number(raw)
    if value is None:
        return None
    alarm.value = raw
    limit = alarm.limit = alarm.limit_value
    alarm._deviation_of = (value - limit, limit)  # alarm.deviation, when read
    if alarm.side > 0:
        return value > (limit - alarm.rule.deadband if alarm.active else limit)
    return value < (limit + alarm.rule.deadband if alarm.active else limit)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _percent(delta: float, base: float) -> float | None:
    return round(delta / abs(base) * 100.0, 3) if base else None


def _remember(alarm: _Alarm, ts: float, value: float) -> None:
    hist = alarm.history
    if hist and ts <= hist[-1][0]:
        return  # a reading no newer than the last one says nothing about the rate
    hist.append((ts, value))
    while len(hist) > 2 and hist[1][0] <= ts - alarm.rule.window:
        hist.popleft()


def _rate(hist: deque[tuple[float, float]]) -> float | None:
    """Change per minute across the window (oldest to newest value kept)."""
    if len(hist) < 2:
        return None
    (t0, v0), (t1, v1) = hist[0], hist[-1]
    return round((v1 - v0) / (t1 - t0) * 60.0, 6)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)
