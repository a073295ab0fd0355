"""Sparkplug B payloads: plain dataclasses to bytes and back, and the edge node's messages.

Pure: no I/O, no clock (every builder takes the time), no state but what the caller passes (``Seq``
is a counter object the session owns). Times are seconds since the epoch as float, like the rest of
the gateway, and become Sparkplug's UTC milliseconds here.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..model import Quality, Reading
from ..rules import State, Transition
from . import schema
from .catalog import BD_SEQ, INT_RANGES, REBIRTH, Catalog, DeviceDef, MetricDef, MetricKind, UnknownMetric, coerce
from .schema import DataType

# -- quality ------------------------------------------------------------------------------------------

QUALITY = "Quality"  # Int32, the specification's codes (section 6.4.9.1)
STATUS_CODE = "StatusCode"  # UInt32, OPC-UA StatusCode severity
REASON = "Reason"  # String, why the value is not good (only present then)
ENG_UNIT = "engUnit"  # String, the tag's unit (births only)

SPARKPLUG_QUALITY = {Quality.GOOD: 192, Quality.UNCERTAIN: 500, Quality.BAD: 0}
OPCUA_STATUS = {Quality.GOOD: 0x00000000, Quality.UNCERTAIN: 0x40000000, Quality.BAD: 0x80000000}


class PayloadError(ValueError):
    """A payload that cannot be encoded, or bytes that are not a usable Sparkplug B payload."""


class CommandError(PayloadError):
    """An NCMD/DCMD refused as a whole: nothing in it is to be applied."""


# -- the payload model ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PropertyValue:
    """One value of a PropertySet. ``value`` None means ``is_null``.

    PropertySet values are ``Mapping[str, PropertyValue]``, PropertySetList values a sequence of them.
    """

    type: DataType
    value: object = None


@dataclass(frozen=True, slots=True)
class Metric:
    """One Payload.Metric. ``value`` None means no value field (with ``is_null``: an explicit null).

    Timestamps are UTC milliseconds. A value needs a ``datatype`` to be encoded; decoded metrics
    that came without one (DATA/CMD by alias) get it from the birth, when the decoder is told it.
    """

    name: str | None = None
    alias: int | None = None
    timestamp: int | None = None
    datatype: DataType | None = None
    value: object = None
    is_null: bool = False
    is_historical: bool = False
    is_transient: bool = False
    properties: Mapping[str, PropertyValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Payload:
    timestamp: int | None = None
    metrics: tuple[Metric, ...] = ()
    seq: int | None = None
    uuid: str | None = None
    body: bytes | None = None


# -- values on the wire -----------------------------------------------------------------------------

# Which oneof member carries each datatype's value (section 6.4.16, "Google Protocol Buffer Type").
VALUE_FIELD: dict[DataType, str] = {
    DataType.INT8: "int_value", DataType.INT16: "int_value", DataType.INT32: "int_value",
    DataType.UINT8: "int_value", DataType.UINT16: "int_value", DataType.UINT32: "int_value",
    DataType.INT64: "long_value", DataType.UINT64: "long_value", DataType.DATETIME: "long_value",
    DataType.FLOAT: "float_value", DataType.DOUBLE: "double_value", DataType.BOOLEAN: "boolean_value",
    DataType.STRING: "string_value", DataType.TEXT: "string_value", DataType.UUID: "string_value",
    DataType.BYTES: "bytes_value", DataType.FILE: "bytes_value",
}
_SIGNED_BITS = {DataType.INT8: 8, DataType.INT16: 16, DataType.INT32: 32, DataType.INT64: 64}
U32_MAX, U64_MAX = 2**32 - 1, 2**64 - 1
_PYTHON_TYPES: dict[str, type | tuple[type, ...]] = {
    "boolean_value": bool, "string_value": str, "bytes_value": (bytes, bytearray),
}


def to_wire(datatype: DataType, value: object) -> tuple[str, object]:
    """(oneof member, protobuf value) for a metric or property value; PayloadError if it does not fit.

    Signed integers go out as two's complement of the member's width: Int8/16/32 in the uint32
    ``int_value``, Int64 in the uint64 ``long_value`` (-1 is 0xFFFFFFFF, or 0xFFFFFFFFFFFFFFFF).
    """
    member = VALUE_FIELD.get(datatype)
    if member is None:
        raise PayloadError(f"{datatype.label} values are not supported")
    if datatype in INT_RANGES or datatype is DataType.DATETIME:
        lo, hi = INT_RANGES.get(datatype, (0, U64_MAX))
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise PayloadError(f"{value!r} is not a {datatype.label} ({lo}..{hi})")
        return member, (value + (1 << (32 if member == "int_value" else 64)) if value < 0 else value)
    if datatype in (DataType.FLOAT, DataType.DOUBLE):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PayloadError(f"{value!r} is not a {datatype.label}")
        try:
            number = float(value)
            if datatype is DataType.FLOAT:
                struct.pack("<f", number)  # a finite double beyond float32 would silently become inf
        except OverflowError:
            raise PayloadError(f"{value!r} is out of range for a {datatype.label}") from None
        return member, number
    wanted = _PYTHON_TYPES[member]
    if not isinstance(value, wanted):
        raise PayloadError(f"{value!r} is not a {datatype.label}")
    if isinstance(value, str):
        _utf8(value, "a string value")
    return member, bytes(value) if isinstance(value, bytearray) else value


def from_wire(datatype: DataType, member: str, raw: object) -> object:
    """The Python value of a oneof member read for ``datatype``; PayloadError when they disagree."""
    expected = VALUE_FIELD.get(datatype)
    if expected is None:
        raise PayloadError(f"{datatype.label} values are not supported")
    if member != expected:
        raise PayloadError(f"a {datatype.label} value must be in {expected}, not {member}")
    if isinstance(raw, bytes) and member == "string_value":
        raise PayloadError(f"{datatype.label} value is not valid UTF-8")
    if datatype in _SIGNED_BITS:
        assert isinstance(raw, int)
        bits = _SIGNED_BITS[datatype]
        width = 32 if member == "int_value" else 64
        signed = raw - (1 << width) if raw >= 1 << (width - 1) else raw
        lo, hi = INT_RANGES[datatype]
        if lo <= signed <= hi:
            return signed
        if raw < 1 << bits:  # two's complement of the type's own width (0xFF for an Int8 -1)
            return raw - (1 << bits)
        raise PayloadError(f"{raw} is out of range for {datatype.label}")
    if datatype in INT_RANGES:
        lo, hi = INT_RANGES[datatype]
        assert isinstance(raw, int)
        if not lo <= raw <= hi:
            raise PayloadError(f"{raw} is out of range for {datatype.label}")
    return raw


def _utf8(text: str, what: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PayloadError(f"{what} is not valid UTF-8: {text!r}") from None
    return text


def _u64(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U64_MAX:
        raise PayloadError(f"{what} must be an unsigned 64-bit integer, not {value!r}")
    return value


# -- encode -----------------------------------------------------------------------------------------


def encode(payload: Payload) -> bytes:
    """Payload -> Sparkplug B bytes (fields in field-number order, unset ones left out)."""
    pb: Any = schema.Payload()
    if payload.timestamp is not None:
        pb.timestamp = _u64(payload.timestamp, "timestamp")
    for i, metric in enumerate(payload.metrics):
        try:
            _fill_metric(pb.metrics.add(), metric)
        except PayloadError as exc:
            raise PayloadError(f"metric {_label(metric.name, metric.alias, i)}: {exc}") from None
    if payload.seq is not None:
        pb.seq = _u64(payload.seq, "seq")
    if payload.uuid is not None:
        pb.uuid = _utf8(payload.uuid, "uuid")
    if payload.body is not None:
        pb.body = bytes(payload.body)
    out: bytes = pb.SerializeToString()
    return out


def _fill_metric(pb: Any, m: Metric) -> None:
    if m.name is not None:
        if not isinstance(m.name, str):
            raise PayloadError(f"name must be a string, not {m.name!r}")
        pb.name = _utf8(m.name, "name")
    if m.alias is not None:
        pb.alias = _u64(m.alias, "alias")
    if m.timestamp is not None:
        pb.timestamp = _u64(m.timestamp, "timestamp")
    if m.datatype is not None:
        pb.datatype = DataType(m.datatype).value
    if m.is_historical:
        pb.is_historical = True
    if m.is_transient:
        pb.is_transient = True
    if m.is_null:
        if m.value is not None:
            raise PayloadError("is_null with a value")
        pb.is_null = True
    if m.properties:
        _fill_properties(pb.properties, m.properties)
    if m.value is not None:
        if m.datatype is None:
            raise PayloadError("a value needs a datatype")
        member, raw = to_wire(m.datatype, m.value)
        setattr(pb, member, raw)


def _fill_properties(pb: Any, properties: Mapping[str, PropertyValue]) -> None:
    for key, pv in properties.items():
        if not isinstance(key, str):
            raise PayloadError(f"property key must be a string, not {key!r}")
        pb.keys.append(_utf8(key, "property key"))
        _fill_property(pb.values.add(), key, pv)


def _fill_property(pb: Any, key: str, pv: PropertyValue) -> None:
    pb.type = DataType(pv.type).value
    if pv.value is None:
        pb.is_null = True
    elif pv.type is DataType.PROPERTYSET:
        if not isinstance(pv.value, Mapping):
            raise PayloadError(f"property {key!r}: a PropertySet value is a mapping")
        pb.propertyset_value.SetInParent()
        _fill_properties(pb.propertyset_value, pv.value)
    elif pv.type is DataType.PROPERTYSETLIST:
        if isinstance(pv.value, (str, bytes, Mapping)) or not isinstance(pv.value, Sequence):
            raise PayloadError(f"property {key!r}: a PropertySetList value is a sequence of mappings")
        pb.propertysets_value.SetInParent()
        for item in pv.value:
            if not isinstance(item, Mapping):
                raise PayloadError(f"property {key!r}: a PropertySetList value is a sequence of mappings")
            _fill_properties(pb.propertysets_value.propertyset.add(), item)
    elif VALUE_FIELD.get(pv.type) == "bytes_value":
        raise PayloadError(f"property {key!r}: a property cannot hold {pv.type.label}")
    else:
        try:
            member, raw = to_wire(pv.type, pv.value)
        except PayloadError as exc:
            raise PayloadError(f"property {key!r}: {exc}") from None
        setattr(pb, member, raw)


# -- decode -----------------------------------------------------------------------------------------

DatatypeLookup = Callable[[str | None, int | None], DataType | None]


def decode(data: bytes, *, datatypes: DatatypeLookup | None = None) -> Payload:
    """Sparkplug B bytes -> Payload; PayloadError saying what is wrong.

    A metric's value is read for its ``datatype``; a metric without one (DATA/CMD by alias) gets it
    from ``datatypes(name, alias)`` when given, else keeps the raw protobuf value (unsigned integers
    as on the wire) and ``datatype`` None. DataSet, Template, array and extension values are refused.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"a payload is bytes, not {type(data).__name__}")
    try:
        pb: Any = schema.Payload.FromString(bytes(data))
    except schema.DecodeError as exc:
        raise PayloadError(f"not a Sparkplug B payload (protobuf: {exc})") from None
    metrics = []
    for i, m in enumerate(pb.metrics):
        name = _text(m, "name", f"metric {i}: name")
        alias = m.alias if m.HasField("alias") else None
        try:
            metrics.append(_metric(m, name, alias, datatypes))
        except PayloadError as exc:
            raise PayloadError(f"metric {_label(name, alias, i)}: {exc}") from None
    return Payload(
        timestamp=pb.timestamp if pb.HasField("timestamp") else None,
        metrics=tuple(metrics),
        seq=pb.seq if pb.HasField("seq") else None,
        uuid=_text(pb, "uuid", "uuid"),
        body=pb.body if pb.HasField("body") else None,
    )


def _metric(m: Any, name: str | None, alias: int | None, datatypes: DatatypeLookup | None) -> Metric:
    datatype = _datatype(m.datatype) if m.HasField("datatype") else None
    known = datatype if datatype is not None else (datatypes(name, alias) if datatypes is not None else None)
    member = m.WhichOneof("value")
    value: object = None
    if member is not None:
        raw = getattr(m, member)
        if member in ("dataset_value", "template_value", "extension_value"):
            raise PayloadError(f"{member} is not supported")
        if known is not None:
            value = from_wire(known, member, raw)
        elif isinstance(raw, bytes) and member == "string_value":
            raise PayloadError("string value is not valid UTF-8")
        else:
            value = raw
    is_null = m.is_null
    if is_null and value is not None:
        raise PayloadError("is_null with a value")
    return Metric(
        name=name,
        alias=alias,
        timestamp=m.timestamp if m.HasField("timestamp") else None,
        datatype=datatype,
        value=value,
        is_null=is_null,
        is_historical=m.is_historical,
        is_transient=m.is_transient,
        properties=_properties(m.properties) if m.HasField("properties") else {},
    )


def _properties(pb: Any) -> dict[str, PropertyValue]:
    keys, values = list(pb.keys), list(pb.values)
    if len(keys) != len(values):
        raise PayloadError(f"PropertySet has {len(keys)} keys but {len(values)} values")
    out: dict[str, PropertyValue] = {}
    for key, pv in zip(keys, values, strict=True):
        if isinstance(key, bytes):
            raise PayloadError(f"property key {key!r} is not valid UTF-8")
        if key in out:
            raise PayloadError(f"property {key!r} appears twice")
        out[key] = _property(key, pv)
    return out


def _property(key: str, pb: Any) -> PropertyValue:
    if not pb.HasField("type"):
        raise PayloadError(f"property {key!r} has no type")
    datatype = _datatype(pb.type)
    member = pb.WhichOneof("value")
    if pb.is_null:
        if member is not None:
            raise PayloadError(f"property {key!r}: is_null with a value")
        return PropertyValue(datatype, None)
    if datatype is DataType.PROPERTYSET and member == "propertyset_value":
        return PropertyValue(datatype, _properties(pb.propertyset_value))
    if datatype is DataType.PROPERTYSETLIST and member == "propertysets_value":
        return PropertyValue(datatype, tuple(_properties(ps) for ps in pb.propertysets_value.propertyset))
    if member is None:
        raise PayloadError(f"property {key!r} has neither a value nor is_null")
    if datatype in (DataType.PROPERTYSET, DataType.PROPERTYSETLIST):
        expected = "propertyset_value" if datatype is DataType.PROPERTYSET else "propertysets_value"
        raise PayloadError(f"property {key!r}: a {datatype.label} value must be in {expected}, not {member}")
    if member in ("propertyset_value", "propertysets_value", "extension_value"):
        raise PayloadError(f"property {key!r}: {datatype.label} value in {member}")
    try:
        return PropertyValue(datatype, from_wire(datatype, member, getattr(pb, member)))
    except PayloadError as exc:
        raise PayloadError(f"property {key!r}: {exc}") from None


def _datatype(code: int) -> DataType:
    try:
        return DataType(code)
    except ValueError:
        raise PayloadError(f"unknown datatype {code}") from None


def _text(pb: Any, member: str, what: str) -> str | None:
    if not pb.HasField(member):
        return None
    value = getattr(pb, member)
    if isinstance(value, bytes):
        raise PayloadError(f"{what} is not valid UTF-8")
    assert isinstance(value, str)
    return value


def _label(name: str | None, alias: int | None, index: int) -> str:
    if name is not None:
        return repr(name)
    return f"alias {alias}" if alias is not None else f"#{index}"


# -- sequence numbers -------------------------------------------------------------------------------


class Seq:
    """The edge node's message sequence number: 0 in the NBIRTH, then one more for each DBIRTH, DDATA,
    NDATA and DDEATH, 255 followed by 0 (tck-id-payloads-sequence-num-*)."""

    def __init__(self) -> None:
        self._last: int | None = None

    def birth(self) -> int:
        """The NBIRTH's number (0); the next message gets 1."""
        self._last = 0
        return 0

    def next(self) -> int:
        if self._last is None:
            raise RuntimeError("the sequence starts with an NBIRTH (call birth() first)")
        self._last = (self._last + 1) % 256
        return self._last

    @property
    def last(self) -> int | None:
        return self._last


def next_bd_seq(previous: int | None) -> int:
    """The bdSeq for a new MQTT CONNECT: 0 the first time, then one more, 255 followed by 0."""
    return 0 if previous is None else (previous + 1) % 256


def to_ms(ts: float) -> int:
    """Seconds since the epoch -> whole milliseconds (as ``iso_ms`` shows them)."""
    return round(ts * 1_000_000) // 1000


def _seq(seq: int) -> int:
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= 255:
        raise PayloadError(f"seq must be 0..255, not {seq!r}")
    return seq


# -- the edge node's messages -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AlarmFlags:
    """An alarm as two Boolean metrics: ``Alarms/<rule_id>/Active`` and ``Alarms/<rule_id>/Acked``."""

    rule_id: str
    active: bool  # the condition, after delays and hysteresis
    acked: bool  # nothing awaits acknowledgement (false in active_unacked and cleared_unacked)
    ts: float

    @classmethod
    def of(cls, rule_id: str, state: State | str, active: bool, ts: float) -> AlarmFlags:
        return cls(rule_id, active, State(state) not in (State.ACTIVE_UNACKED, State.CLEARED_UNACKED), ts)

    @classmethod
    def from_transition(cls, t: Transition) -> AlarmFlags:
        return cls.of(t.rule_id, t.state, t.active, t.ts)


def quality_properties(quality: Quality, reason: str | None = None,
                       unit: str | None = None) -> dict[str, PropertyValue]:
    """``engUnit`` (when given), ``Quality`` (the specification's Int32 code: 192 good, 500 for
    uncertain, 0 bad), ``StatusCode`` (UInt32, OPC-UA severity: 0, 0x40000000, 0x80000000) and, for
    a value that is not good, ``Reason``."""
    props: dict[str, PropertyValue] = {}
    if unit:
        props[ENG_UNIT] = PropertyValue(DataType.STRING, unit)
    props[QUALITY] = PropertyValue(DataType.INT32, SPARKPLUG_QUALITY[quality])
    props[STATUS_CODE] = PropertyValue(DataType.UINT32, OPCUA_STATUS[quality])
    if quality is not Quality.GOOD and reason:
        props[REASON] = PropertyValue(DataType.STRING, reason)
    return props


def reading_metric(d: MetricDef, r: Reading, *, birth: bool, historical: bool = False) -> Metric:
    """A tag or derived value: by name and alias in a birth, by alias only after it. A bad value, or
    one the metric's datatype cannot hold, goes out as null (the latter with quality bad)."""
    quality, reason, value = r.quality, r.reason, r.value
    if quality is Quality.BAD:
        value = None
    elif value is not None:
        try:
            value = coerce(d.datatype, value)
        except ValueError as exc:
            value, quality, reason = None, Quality.BAD, str(exc)
    ts = r.source_ts if r.source_ts is not None else r.ts
    return Metric(
        name=d.name if birth else None,
        alias=d.alias,
        timestamp=to_ms(ts),
        datatype=d.datatype,
        value=value,
        is_null=value is None,
        is_historical=historical,
        properties=quality_properties(quality, reason, d.unit if birth else None),
    )


def _flag_metric(d: MetricDef, value: bool, ts: float, *, birth: bool, historical: bool = False) -> Metric:
    return Metric(name=d.name if birth else None, alias=d.alias, timestamp=to_ms(ts), datatype=d.datatype,
                  value=value, is_historical=historical, properties=quality_properties(Quality.GOOD))


def nbirth(catalog: Catalog, *, bd_seq: int, ts: float) -> bytes:
    """NBIRTH: seq 0 (take it with ``Seq.birth()``), ``bdSeq`` as in the CONNECT's Will, and
    ``Node Control/Rebirth`` false, each with name, alias, datatype and timestamp."""
    ms = to_ms(ts)
    node = catalog.node
    metrics = []
    for d in node.metrics:
        if d.name == BD_SEQ:
            value: object = _seq(bd_seq)
        elif d.name == REBIRTH:
            value = False
        else:
            raise PayloadError(f"no value for node metric {d.name!r}")
        metrics.append(Metric(name=d.name, alias=d.alias, timestamp=ms, datatype=d.datatype, value=value))
    return encode(Payload(timestamp=ms, metrics=tuple(metrics), seq=0))


def ndeath(*, bd_seq: int, ts: float | None = None) -> bytes:
    """NDEATH (the CONNECT's Will, and published before a clean disconnect): only ``bdSeq``, by name,
    no seq. The timestamp is optional; at CONNECT time it says little."""
    ms = to_ms(ts) if ts is not None else None
    metric = Metric(name=BD_SEQ, timestamp=ms, datatype=DataType.INT64, value=_seq(bd_seq))
    return encode(Payload(timestamp=ms, metrics=(metric,)))


def dbirth(device: DeviceDef, *, seq: int, ts: float, latest: Mapping[str, Reading],
           alarms: Iterable[AlarmFlags] = ()) -> bytes:
    """DBIRTH: every metric of the device with name, alias, datatype, timestamp, current value (null
    and quality bad when none was read yet) and properties (engUnit, Quality, StatusCode, Reason).

    ``latest``: the newest reading of each tag and derived value, by name. ``alarms``: the flags of
    the device's alarms; one missing is born normal (not active, acknowledged)."""
    flags = {a.rule_id: a for a in alarms}
    metrics = []
    for d in device.metrics:
        if d.kind in (MetricKind.TAG, MetricKind.DERIVED):
            r = latest.get(d.key)
            if r is None:
                r = Reading(device.device_id or "", d.key, None, Quality.BAD, "no value read yet", None, ts)
            metrics.append(reading_metric(d, r, birth=True))
        elif d.kind in (MetricKind.ALARM_ACTIVE, MetricKind.ALARM_ACKED):
            a = flags.get(d.key)
            if a is None:  # normal: not active, acknowledged
                a = AlarmFlags(d.key, active=False, acked=True, ts=ts)
            value = a.active if d.kind is MetricKind.ALARM_ACTIVE else a.acked
            metrics.append(_flag_metric(d, value, a.ts, birth=True))
        else:
            raise PayloadError(f"{d.name!r} is not a device metric")
    return encode(Payload(timestamp=to_ms(ts), metrics=tuple(metrics), seq=_seq(seq)))


def ddata(device: DeviceDef, *, seq: int, ts: float, readings: Iterable[Reading] = (),
          alarms: Iterable[AlarmFlags] = (), historical: bool = False) -> bytes:
    """DDATA: the given readings and alarm flags by alias only, each with its timestamp, datatype and
    quality; ``historical`` marks replayed (buffered) values, which must not update live values.
    A reading of a metric the DBIRTH did not declare raises UnknownMetric (it needs a rebirth)."""
    metrics = []
    for r in readings:
        if r.asset != device.device_id:
            raise UnknownMetric(f"reading of {r.asset!r} in a DDATA of device {device.device_id!r}")
        d = device.metric(r.tag)
        if d.kind not in (MetricKind.TAG, MetricKind.DERIVED):
            raise UnknownMetric(f"{r.tag!r} is not a tag or derived value of {device.device_id!r}")
        metrics.append(reading_metric(d, r, birth=False, historical=historical))
    for a in alarms:
        active, acked = device.alarm(a.rule_id)
        metrics.append(_flag_metric(active, a.active, a.ts, birth=False, historical=historical))
        metrics.append(_flag_metric(acked, a.acked, a.ts, birth=False, historical=historical))
    if not metrics:
        raise PayloadError("a DDATA carries at least one metric")
    return encode(Payload(timestamp=to_ms(ts), metrics=tuple(metrics), seq=_seq(seq)))


def ddeath(*, seq: int, ts: float) -> bytes:
    """DDEATH: timestamp and seq, no metrics."""
    return encode(Payload(timestamp=to_ms(ts), seq=_seq(seq)))


# -- commands ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Write:
    """One metric value an NCMD/DCMD asks to write (already checked against the metric's birth)."""

    metric: MetricDef
    value: object


@dataclass(frozen=True, slots=True)
class Command:
    """A decoded NCMD (``device_id`` None) or DCMD.

    ``rebirth``: ``Node Control/Rebirth`` was written true. ``writes``: the other metrics, each
    writable (a tag declared ``writable``, or an ``Alarms/<rule_id>/Acked`` set true, which is an
    acknowledgement), in payload order.
    """

    device_id: str | None
    rebirth: bool
    writes: tuple[Write, ...]
    timestamp: int | None


def decode_command(data: bytes, catalog: Catalog, device_id: str | None = None) -> Command:
    """An NCMD's (``device_id`` None) or a DCMD's payload -> Command; CommandError, applying nothing,
    when any metric is unknown, ambiguous, not writable, null, or of another datatype than its birth.

    A seq or a missing timestamp (which the specification rules out for commands) is tolerated."""
    try:
        scope = catalog.scope(device_id)
    except UnknownMetric as exc:
        raise CommandError(str(exc)) from None

    def lookup(name: str | None, alias: int | None) -> DataType | None:
        d = scope.find(name, alias)
        return d.datatype if d is not None else None

    try:
        payload = decode(data, datatypes=lookup)
    except PayloadError as exc:
        raise CommandError(str(exc)) from None
    if not payload.metrics:
        raise CommandError("the command has no metrics")
    rebirth = False
    writes: list[Write] = []
    seen: set[int] = set()
    for i, m in enumerate(payload.metrics):
        where = f"metric {_label(m.name, m.alias, i)}"
        d = _command_target(scope, m, where)
        if d.alias in seen:
            raise CommandError(f"{where}: {d.name!r} is written twice")
        seen.add(d.alias)
        if m.datatype is not None and m.datatype is not d.datatype:
            raise CommandError(f"{where}: datatype {m.datatype.label} differs from its birth's {d.datatype.label}")
        if m.is_null or m.value is None:
            raise CommandError(f"{where}: no value to write")
        if not d.writable:
            raise CommandError(f"{where}: {d.name!r} is not writable")
        if d.kind is MetricKind.NODE and d.name == REBIRTH:
            if m.value is not True:
                raise CommandError(f"{where}: {REBIRTH} is written true to ask for a rebirth")
            rebirth = True
            continue
        if d.kind is MetricKind.ALARM_ACKED and m.value is not True:
            raise CommandError(f"{where}: an alarm is acknowledged by writing true")
        writes.append(Write(d, m.value))
    return Command(device_id, rebirth, tuple(writes), payload.timestamp)


def _command_target(scope: DeviceDef, m: Metric, where: str) -> MetricDef:
    if m.name is None and m.alias is None:
        raise CommandError(f"{where}: neither name nor alias")
    d = scope.find(m.name, m.alias)
    if d is None:
        if m.name is not None and m.alias is not None:
            named, aliased = scope.find(m.name, None), scope.find(None, m.alias)
            if named is not None or aliased is not None:
                raise CommandError(f"{where}: name {m.name!r} and alias {m.alias} name different metrics")
        target = "the edge node" if scope.device_id is None else f"device {scope.device_id!r}"
        raise CommandError(f"{where}: no such metric in {target}")
    return d


# -- primary host STATE -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostState:
    """A Host Application's retained STATE (spBv1.0/STATE/{host_id}): JSON, not protobuf."""

    online: bool
    timestamp: int  # UTC milliseconds; the birth's equals its Will's


def decode_state(data: bytes) -> HostState:
    """``{"online": true|false, "timestamp": <ms>}`` -> HostState; PayloadError for anything else
    (including Sparkplug 2.x's plain ``ONLINE``/``OFFLINE``). Other keys are ignored."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise PayloadError(f"STATE payload is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise PayloadError("STATE payload is not a JSON object")
    online, timestamp = doc.get("online"), doc.get("timestamp")
    if not isinstance(online, bool):
        raise PayloadError(f"STATE 'online' must be true or false, not {online!r}")
    if isinstance(timestamp, float) and math.isfinite(timestamp) and timestamp.is_integer():
        timestamp = int(timestamp)
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) or timestamp < 0:
        raise PayloadError(f"STATE 'timestamp' must be milliseconds since the epoch, not {timestamp!r}")
    return HostState(online, timestamp)


def encode_state(*, online: bool, timestamp: int) -> bytes:
    """A STATE payload as a Host Application publishes it (for tests and simulators)."""
    return orjson.dumps({"online": online, "timestamp": timestamp})


__all__ = ["ENG_UNIT", "OPCUA_STATUS", "QUALITY", "REASON", "SPARKPLUG_QUALITY", "STATUS_CODE", "AlarmFlags",
           "Command", "CommandError", "HostState", "Metric", "Payload", "PayloadError", "PropertyValue", "Seq",
           "Write", "dbirth", "ddata", "ddeath", "decode", "decode_command", "decode_state", "encode",
           "encode_state", "from_wire", "nbirth", "ndeath", "next_bd_seq", "quality_properties", "reading_metric",
           "to_ms", "to_wire"]
