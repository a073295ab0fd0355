"""The edge node's metric catalog: every metric name, its alias and its Sparkplug datatype.

Births must declare every metric the node will ever report, with a datatype that then holds for the
whole session, and aliases unique across the *whole edge node* (NBIRTH and all DBIRTHs,
tck-id-payloads-alias-uniqueness). So the catalog is derived from the tag map, not from the values
seen so far: a tag's datatype comes from its declaration, and aliases are numbered 1, 2, 3, ... over
the node's metrics sorted by (device id, metric name), node metrics first. The same tag map always
gives the same catalog, so a rebirth, or a restart, publishes the same aliases; a changed map may
renumber them, and then needs a full rebirth (``Catalog`` compares equal when nothing changed).
Alias 0 is never used (some consumers read 0 as "no alias").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum

from drivers.modbus.types import DataType as ModbusType

from ..derived import DailyCount
from ..tagmap import Asset, OpcUaTag, Tag, TagMap
from .schema import DataType
from .topics import check_id

BD_SEQ = "bdSeq"
REBIRTH = "Node Control/Rebirth"
ALARMS = "Alarms"

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT64_MAX = 2**64 - 1


class MetricKind(StrEnum):
    NODE = "node"  # bdSeq, Node Control/Rebirth
    TAG = "tag"  # a tag of the asset, read from a device
    DERIVED = "derived"  # a value the gateway computes for the asset
    ALARM_ACTIVE = "alarm_active"  # Alarms/<rule_id>/Active
    ALARM_ACKED = "alarm_acked"  # Alarms/<rule_id>/Acked


def alarm_metric_names(rule_id: str) -> tuple[str, str]:
    """``Alarms/<rule_id>/Active`` and ``Alarms/<rule_id>/Acked``."""
    return f"{ALARMS}/{rule_id}/Active", f"{ALARMS}/{rule_id}/Acked"


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """A metric before aliases are numbered."""

    name: str
    datatype: DataType
    kind: MetricKind
    key: str  # the tag or derived value's name, the rule id of an alarm metric, or the node metric's name
    unit: str | None = None
    writable: bool = False  # whether an NCMD/DCMD may write it


@dataclass(frozen=True, slots=True)
class MetricDef:
    """A metric as born: what the NBIRTH/DBIRTH declares and the DATA and CMD messages refer to."""

    name: str
    alias: int
    datatype: DataType
    kind: MetricKind
    key: str
    unit: str | None = None
    writable: bool = False


class UnknownMetric(KeyError):
    """A metric that is not in the birth: it cannot be published without a new birth."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown metric"


@dataclass(frozen=True)
class DeviceDef:
    """The metrics of the edge node itself (``device_id`` None) or of one Sparkplug device (an asset)."""

    device_id: str | None
    metrics: tuple[MetricDef, ...]
    _by_name: dict[str, MetricDef] = field(init=False, repr=False, compare=False)
    _by_alias: dict[int, MetricDef] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {m.name: m for m in self.metrics})
        object.__setattr__(self, "_by_alias", {m.alias: m for m in self.metrics})

    def metric(self, name: str) -> MetricDef:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownMetric(f"{self._where()} has no metric {name!r}") from None

    def by_alias(self, alias: int) -> MetricDef:
        try:
            return self._by_alias[alias]
        except KeyError:
            raise UnknownMetric(f"{self._where()} has no metric with alias {alias}") from None

    def find(self, name: str | None, alias: int | None) -> MetricDef | None:
        """The metric a CMD names by name and/or alias (None if it names none of this scope's)."""
        by_name = self._by_name.get(name) if name is not None else None
        by_alias = self._by_alias.get(alias) if alias is not None else None
        if name is not None and alias is not None and by_name is not by_alias:
            return None
        return by_name or by_alias

    def alarm(self, rule_id: str) -> tuple[MetricDef, MetricDef]:
        active, acked = alarm_metric_names(rule_id)
        return self.metric(active), self.metric(acked)

    def _where(self) -> str:
        return "the edge node" if self.device_id is None else f"device {self.device_id!r}"


@dataclass(frozen=True)
class Catalog:
    """All metrics of one edge node: its own and those of each device, with node-wide unique aliases."""

    node: DeviceDef
    devices: Mapping[str, DeviceDef]

    @classmethod
    def build(cls, devices: Mapping[str, Iterable[MetricSpec]]) -> Catalog:
        """Number the aliases: node metrics, then each device by id, each by metric name."""
        specs = {check_id(device_id, "device_id"): _unique(device_id, list(metrics))
                 for device_id, metrics in devices.items()}
        alias = 0

        def number(device_id: str | None, metrics: list[MetricSpec]) -> DeviceDef:
            nonlocal alias
            defs = []
            for m in sorted(metrics, key=lambda m: m.name):
                alias += 1
                defs.append(MetricDef(m.name, alias, m.datatype, m.kind, m.key, m.unit, m.writable))
            return DeviceDef(device_id, tuple(defs))

        node = number(None, list(NODE_METRICS))
        return cls(node, {device_id: number(device_id, specs[device_id]) for device_id in sorted(specs)})

    @classmethod
    def from_tag_map(cls, tag_map: TagMap) -> Catalog:
        """One Sparkplug device per asset: its tags, derived values and alarm flags."""
        return cls.build({asset.id: asset_metrics(asset) for asset in tag_map.assets})

    def device(self, device_id: str) -> DeviceDef:
        try:
            return self.devices[device_id]
        except KeyError:
            raise UnknownMetric(f"no device {device_id!r} in this edge node") from None

    def scope(self, device_id: str | None) -> DeviceDef:
        """The node's own metrics (None) or a device's."""
        return self.node if device_id is None else self.device(device_id)


NODE_METRICS = (
    MetricSpec(BD_SEQ, DataType.INT64, MetricKind.NODE, BD_SEQ),
    MetricSpec(REBIRTH, DataType.BOOLEAN, MetricKind.NODE, REBIRTH, writable=True),
)


def _unique(device_id: str, metrics: list[MetricSpec]) -> list[MetricSpec]:
    seen: set[str] = set()
    for m in metrics:
        if not isinstance(m.name, str) or not m.name:
            raise ValueError(f"device {device_id!r}: a metric name is a non-empty string, not {m.name!r}")
        try:
            m.name.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"device {device_id!r}: metric name {m.name!r} is not valid UTF-8") from None
        if m.name in seen:
            raise ValueError(f"device {device_id!r}: two metrics are named {m.name!r}")
        seen.add(m.name)
    return metrics


def asset_metrics(asset: Asset) -> list[MetricSpec]:
    """An asset's metrics: each tag and derived value under its own name, two flags per rule."""
    out = [MetricSpec(name, tag_datatype(tag), MetricKind.TAG, name, tag.unit, tag.writable)
           for name, tag in asset.tags.items()]
    out += [MetricSpec(name, DataType.INT64 if isinstance(spec, DailyCount) else DataType.DOUBLE,
                       MetricKind.DERIVED, name, spec.unit)
            for name, spec in asset.derived.items()]
    for rule in asset.rules:
        active, acked = alarm_metric_names(rule.rule_id)
        out.append(MetricSpec(active, DataType.BOOLEAN, MetricKind.ALARM_ACTIVE, rule.rule_id))
        out.append(MetricSpec(acked, DataType.BOOLEAN, MetricKind.ALARM_ACKED, rule.rule_id, writable=True))
    return out


_OPCUA_TYPES = {"bool": DataType.BOOLEAN, "string": DataType.STRING, "int": DataType.INT64,
                "float": DataType.DOUBLE, None: DataType.DOUBLE}
_MODBUS_TYPES = {ModbusType.BOOL: DataType.BOOLEAN, ModbusType.STRING: DataType.STRING,
                 ModbusType.FLOAT32: DataType.DOUBLE, ModbusType.FLOAT64: DataType.DOUBLE,
                 ModbusType.UINT64: DataType.UINT64}


def tag_datatype(tag: Tag) -> DataType:
    """The datatype of a tag's engineering value, from its declaration (births need it before any value).

    enum -> String (the name; an unknown code goes out as its decimal string, quality uncertain);
    bool -> Boolean; string -> String; float32/float64, or any scale/offset -> Double;
    uint64 -> UInt64; other integers -> Int64. An OPC-UA tag without ``type`` is taken as Double.
    """
    if tag.enum is not None:
        return DataType.STRING
    datatype = (_OPCUA_TYPES[tag.type] if isinstance(tag, OpcUaTag)
                else _MODBUS_TYPES.get(tag.type, DataType.INT64))
    scaled = tag.scale != 1.0 or tag.offset != 0.0
    if scaled and datatype in (DataType.INT64, DataType.UINT64):
        return DataType.DOUBLE
    return datatype


def datatype_of(value: object) -> DataType:
    """The datatype for a Python value: bool -> Boolean, int -> Int64 (UInt64 above 2**63 - 1),
    float -> Double, str and enum members -> String. Int64 for every int: a birth fixes the datatype
    for the session, and "Int32 while it fits" would break on the first larger value of a counter."""
    if isinstance(value, bool):
        return DataType.BOOLEAN
    if isinstance(value, Enum):
        return DataType.STRING
    if isinstance(value, int):
        if INT64_MIN <= value <= INT64_MAX:
            return DataType.INT64
        if 0 <= value <= UINT64_MAX:
            return DataType.UINT64
        raise ValueError(f"{value} does not fit a 64-bit integer")
    if isinstance(value, float):
        return DataType.DOUBLE
    if isinstance(value, str):
        return DataType.STRING
    raise TypeError(f"no Sparkplug datatype for {type(value).__name__} values")


def coerce(datatype: DataType, value: object) -> object:
    """``value`` as the metric's datatype holds it; ValueError when it does not fit.

    Accepted: the datatype's own Python type; an int for Double; an integral float for an integer
    type; an enum member or an int (an enum code the map does not name) for String. Never a bool for
    a number, nor a number for a bool.
    """
    convert = _COERCE.get(datatype)
    out = convert(datatype, value) if convert is not None and not isinstance(value, bool) else None
    if datatype is DataType.BOOLEAN and isinstance(value, bool):
        out = value
    if out is None:
        raise ValueError(f"{value!r} does not fit {datatype.label}")
    return out


def _to_text(_: DataType, value: object) -> str | None:
    if isinstance(value, Enum):
        value = value.value if isinstance(value.value, str) else value.name
    elif isinstance(value, int):
        value = str(value)
    if not isinstance(value, str):
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def _to_float(_: DataType, value: object) -> float | None:
    if not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def _to_int(datatype: DataType, value: object) -> int | None:
    lo, hi = INT_RANGES[datatype]
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and lo <= value <= hi else None


INT_RANGES: dict[DataType, tuple[int, int]] = {
    DataType.INT8: (-(2**7), 2**7 - 1),
    DataType.INT16: (-(2**15), 2**15 - 1),
    DataType.INT32: (-(2**31), 2**31 - 1),
    DataType.INT64: (INT64_MIN, INT64_MAX),
    DataType.UINT8: (0, 2**8 - 1),
    DataType.UINT16: (0, 2**16 - 1),
    DataType.UINT32: (0, 2**32 - 1),
    DataType.UINT64: (0, UINT64_MAX),
}
_COERCE: dict[DataType, Callable[[DataType, object], object]] = {
    DataType.STRING: _to_text, DataType.TEXT: _to_text, DataType.DOUBLE: _to_float, DataType.FLOAT: _to_float,
    **dict.fromkeys(INT_RANGES, _to_int),
}

__all__ = ["ALARMS", "BD_SEQ", "NODE_METRICS", "REBIRTH", "Catalog", "DeviceDef", "MetricDef", "MetricKind",
           "MetricSpec", "UnknownMetric", "alarm_metric_names", "asset_metrics", "coerce", "datatype_of",
           "tag_datatype"]
