"""The YAML tag map: frozen pydantic models, strict validation, errors with file, line and field.

The models are the reference for the tag map; README.md shows it by example. Field checks come from
pydantic (every error at once); checks across the map (ids, device references, overlapping writable
addresses, reads that fit the protocol) run after, and also report every error at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BeforeValidator,
    Discriminator,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic import Tag as PydTag
from pydantic_core import ErrorDetails

from drivers.modbus.types import ADDRESS_SPACE, MAX_READ_BITS, MAX_READ_REGISTERS, DataType, Order, Table

from .derived import Calendar, Derived, DerivedSpec
from .fields import ID_PATTERN, Duration, Frozen, Identifier, TagName, duration
from .rules import LIMIT_KINDS, Rule
from .yamlsource import Document, Loc, Problem, SourceError, format_path, load, parse

Interval = Annotated[float, BeforeValidator(duration), Field(ge=0.01, le=86400)]
TopicPart = Annotated[str, Field(pattern=r"^[^#+\s]+(/[^#+\s/]+)*$")]


class GatewayConfig(Frozen):
    id: Identifier
    site: str = ""
    timezone: str = Field(default="UTC", description="the plant's time zone: days and shifts of derived values")
    shifts: list[str] = Field(default_factory=lambda: ["00:00"], min_length=1,
                              description="local start times of the shifts, e.g. [06:00, 14:00, 22:00]")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        Calendar(tz=value)
        return value

    @field_validator("shifts")
    @classmethod
    def _shifts(cls, value: list[str]) -> list[str]:
        Calendar(shifts=tuple(value))
        return value

    def calendar(self) -> Calendar:
        return Calendar(tz=self.timezone, shifts=tuple(self.shifts))


class MqttConfig(Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    topic_prefix: TopicPart = Field(description="ISA-95 style path, e.g. ninu/plant-1")
    client_id: str | None = Field(default=None, description="defaults to edge-gateway-{gateway.id}")
    username: str | None = None
    password_file: Path | None = Field(
        default=None,
        description="file holding the broker password; EDGE_GATEWAY_MQTT_PASSWORD overrides it",
    )
    keepalive: Duration = Field(default=30.0, ge=5, le=3600)
    max_inflight: int = Field(default=64, ge=1, le=1000, description="QoS 1 messages awaiting PUBACK")
    reconnect_max: Duration = Field(default=30.0, ge=0.1, le=300, description="backoff cap")
    publish_timeout: Duration = Field(default=10.0, ge=0.5, le=300)


class BufferConfig(Frozen):
    path: Path | None = Field(
        default=None,
        description="SQLite file; default $STATE_DIRECTORY/buffer.sqlite or ./var/buffer.sqlite",
    )


class ModbusTcpDevice(Frozen):
    protocol: Literal["modbus_tcp"]
    id: Identifier
    host: str
    port: int = Field(default=502, ge=1, le=65535)
    unit: int = Field(default=1, ge=0, le=255)
    interval: Interval = 1.0
    timeout: Annotated[float, BeforeValidator(duration), Field(ge=0.01, le=60)] = 1.0
    max_gap: int = Field(default=0, ge=0, le=MAX_READ_REGISTERS, description="hole a read may bridge")
    max_registers: int = Field(default=MAX_READ_REGISTERS, ge=1, le=MAX_READ_REGISTERS)
    max_bits: int = Field(default=MAX_READ_BITS, ge=1, le=MAX_READ_BITS)
    byte_order: Order = Order.BIG
    word_order: Order = Order.BIG


    def describe(self) -> str:
        return f"{self.protocol} {self.host}:{self.port} unit {self.unit}"


class OpcUaSecurity(Frozen):
    """OPC-UA secure channel. A configured mode is never downgraded to None."""

    mode: Literal["None", "Sign", "SignAndEncrypt"] = "None"
    policy: Literal["Basic256Sha256", "Aes128Sha256RsaOaep", "Aes256Sha256RsaPss"] = "Basic256Sha256"
    certificate: Path | None = Field(default=None, description="client certificate (DER or PEM)")
    private_key: Path | None = Field(default=None, description="client private key (PEM)")
    server_certificate: Path | None = Field(default=None, description="trusted server certificate")
    application_uri: str | None = Field(
        default=None, description="must equal the URI in the client certificate's subjectAltName"
    )

    @model_validator(mode="after")
    def _complete(self) -> OpcUaSecurity:
        if self.mode != "None" and (self.certificate is None or self.private_key is None):
            raise ValueError(f"security mode {self.mode} needs certificate and private_key")
        return self


class OpcUaDevice(Frozen):
    protocol: Literal["opcua"]
    id: Identifier
    endpoint: Annotated[str, Field(pattern=r"^opc\.tcp://[^/\s]+(/.*)?$")]
    mode: Literal["subscribe", "poll"] = "subscribe"
    interval: Interval = 1.0
    timeout: Annotated[float, BeforeValidator(duration), Field(ge=0.05, le=60)] = 2.0
    sampling_interval: Annotated[float, BeforeValidator(duration), Field(ge=0, le=3600)] | None = Field(
        default=None, description="server-side sampling; default: the interval"
    )
    queue_size: int = Field(default=10, ge=1, le=10000)
    deadband_type: Literal["none", "absolute", "percent"] = Field(
        default="none", description="server-side deadband of monitored items, from each tag's deadband"
    )
    max_nodes_per_read: int | None = Field(default=None, ge=1, description="default: the server's limit")
    recheck: Duration = Field(default=5.0, ge=0.5, le=3600, description="re-resolve missing nodes this often")
    username: str | None = None
    password_file: Path | None = None
    security: OpcUaSecurity = OpcUaSecurity()

    def describe(self) -> str:
        return f"opcua {self.endpoint} {self.mode}"


Device = Annotated[ModbusTcpDevice | OpcUaDevice, Field(discriminator="protocol")]


class TagBase(Frozen):
    device: Identifier
    scale: float = 1.0
    offset: float = 0.0
    enum: dict[int, str] | None = None
    unit: str | None = None
    deadband: float | None = Field(default=None, ge=0, description="report by exception")
    writable: bool = False
    min: float | None = None
    max: float | None = None

    def _check_range(self) -> None:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")


class ModbusTag(TagBase):
    table: Table
    address: int = Field(ge=0, lt=ADDRESS_SPACE)
    unit_id: int | None = Field(default=None, ge=0, le=255, description="overrides the device's unit")
    type: DataType = DataType.UINT16
    count: int | None = Field(default=None, ge=1, le=MAX_READ_REGISTERS)
    bit: int | None = Field(default=None, ge=0, le=15)
    byte_order: Order | None = None
    word_order: Order | None = None

    @model_validator(mode="after")
    def _layout(self) -> ModbusTag:
        if self.table.is_bits:
            if self.type is not DataType.BOOL:
                raise ValueError(f"{self.table} holds bits: type must be bool, not {self.type}")
            if self.bit is not None or (self.count not in (None, 1)):
                raise ValueError(f"{self.table} tags take neither bit nor count")
        elif self.type is DataType.BOOL:
            if self.bit is None:
                raise ValueError("a bool in a register needs bit: 0..15")
        elif self.bit is not None:
            raise ValueError("bit applies to type bool only")
        width = self.type.width
        if self.type is DataType.STRING:
            if self.count is None:
                raise ValueError("a string needs count (registers, two characters each)")
        elif self.count is not None and self.count != width:
            raise ValueError(f"count {self.count} does not fit type {self.type} ({width} register(s))")
        if self.address + self.registers > ADDRESS_SPACE:
            raise ValueError(f"address {self.address} + {self.registers} runs past 65535")
        if (self.scale != 1.0 or self.offset != 0.0) and self.type in (DataType.BOOL, DataType.STRING):
            raise ValueError(f"scale/offset do not apply to {self.type}")
        if self.enum is not None and not self.type.is_integer:
            raise ValueError("enum applies to integer types")
        self._check_range()
        return self

    @property
    def registers(self) -> int:
        """Addresses the tag spans in its table (bits for coils/discretes)."""
        if self.table.is_bits:
            return 1
        return self.count if self.count is not None else (self.type.width or 1)


NODE_ID = r"^(nsu=[^;]+;|ns=\d+;)?(i=\d+|s=.+|g=[0-9a-fA-F-]{36}|b=[A-Za-z0-9+/=]+)$"


class OpcUaTag(TagBase):
    node: Annotated[str, Field(pattern=NODE_ID, description="nsu=<namespace uri>;s=... (preferred) or ns=2;s=...")]
    type: Literal["bool", "int", "float", "string"] | None = Field(
        default=None, description="expected value type; another type marks the tag bad"
    )

    @model_validator(mode="after")
    def _check(self) -> OpcUaTag:
        self._check_range()
        return self


def _tag_kind(data: object) -> str:
    return "opcua" if isinstance(data, dict) and "node" in data else "modbus"


Tag = Annotated[
    Annotated[ModbusTag, PydTag("modbus")] | Annotated[OpcUaTag, PydTag("opcua")],
    Discriminator(_tag_kind),
]


class Asset(Frozen):
    id: Identifier
    kind: Literal["reactor", "station"]
    name: str = ""
    device: Identifier | None = Field(default=None, description="default device of the asset's tags")
    tags: dict[TagName, Tag] = Field(min_length=1)
    rules: list[Rule] = Field(default_factory=list, description="limits checked at the edge, see gateway/rules.py")
    derived: dict[TagName, DerivedSpec] = Field(default_factory=dict, description="values computed at the edge")

    @model_validator(mode="before")
    @classmethod
    def _default_device(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("device") and isinstance(data.get("tags"), dict):
            tags = {
                name: {"device": data["device"], **tag} if isinstance(tag, dict) and "device" not in tag else tag
                for name, tag in data["tags"].items()
            }
            data = {**data, "tags": tags}
        return data


class TagMap(Frozen):
    gateway: GatewayConfig
    mqtt: MqttConfig
    buffer: BufferConfig = BufferConfig()
    devices: list[Device] = Field(min_length=1)
    assets: list[Asset] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _extension_keys(cls, data: object) -> object:
        """Top-level ``x-...`` keys hold YAML anchors for reuse (as in compose files)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith("x-"))}
        return data

    def device(self, device_id: str) -> Device:
        return next(d for d in self.devices if d.id == device_id)

    def asset(self, asset_id: str) -> Asset:
        return next(a for a in self.assets if a.id == asset_id)

    def bindings(self, device_id: str) -> Iterator[tuple[Asset, str, Tag]]:
        """Every (asset, tag name, tag) read from ``device_id``."""
        for asset in self.assets:
            for name, tag in asset.tags.items():
                if tag.device == device_id:
                    yield asset, name, tag


def load_tag_map(path: Path | str, display: str | None = None) -> TagMap:
    """Load and validate; raise SourceError listing every problem with file, line and field."""
    return _validate(load(Path(path), display))


def load_tag_map_text(text: str, name: str) -> TagMap:
    """Validate a tag map given as text; ``name`` is how errors refer to it."""
    return _validate(parse(text, name))


def _validate(doc: Document) -> TagMap:
    try:
        tag_map = TagMap.model_validate(doc.data)
    except ValidationError as exc:
        raise SourceError([_problem(doc, _loc(e), _message(e)) for e in exc.errors()]) from None
    problems = [_problem(doc, loc, msg) for loc, msg in cross_check(tag_map)]
    if problems:
        raise SourceError(problems)
    return tag_map


_UNION_TAGS = {"modbus", "opcua", "modbus_tcp"}


def _loc(err: ErrorDetails) -> Loc:
    """The error's location in the document: without the unions' discriminator values."""
    raw = tuple(err["loc"])
    loc = tuple(e for i, e in enumerate(raw)
                if not (e in _UNION_TAGS and i >= 2 and raw[i - 2] in ("tags", "devices")))
    return (*loc, "protocol") if err["type"] == "union_tag_invalid" else loc


def _message(err: ErrorDetails) -> str:
    kind, loc = err["type"], err["loc"]
    if kind == "extra_forbidden":
        if loc and loc[-1] == "password":
            return "unknown key: secrets stay out of the tag map (EDGE_GATEWAY_MQTT_PASSWORD or password_file)"
        return "unknown key"
    if kind == "missing":
        return "required"
    if kind == "union_tag_invalid":
        ctx = err.get("ctx") or {}
        return f"unknown protocol {ctx.get('tag')!r} (known: {ctx.get('expected_tags')})"
    if kind == "string_pattern_mismatch" and (err.get("ctx") or {}).get("pattern") == ID_PATTERN:
        return f"{err['input']!r} is not an id: lowercase letters, digits, - and _, at most 63"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if kind in ("enum", "literal_error"):
        msg += f", not {err['input']!r}"
    return msg


def _problem(doc: Document, loc: Loc, message: str) -> Problem:
    line, path = doc.locate(loc)
    return Problem(doc.file, line, path, message)


def cross_check(tm: TagMap) -> list[tuple[Loc, str]]:
    """Checks that need the whole map; each names the field it concerns."""
    issues: list[tuple[Loc, str]] = []
    issues += _duplicates(tm)
    devices = {d.id: d for d in tm.devices}
    writable: dict[tuple[str, int, Table], list[tuple[int, int, Loc]]] = {}
    for ai, asset in enumerate(tm.assets):
        for name, tag in asset.tags.items():
            loc: Loc = ("assets", ai, "tags", name)
            device = devices.get(tag.device)
            if device is None:
                issues.append(((*loc, "device"), f"no device {tag.device!r} (devices: {', '.join(devices)})"))
                continue
            if isinstance(tag, OpcUaTag) != isinstance(device, OpcUaDevice):
                want = "node" if isinstance(device, OpcUaDevice) else "table and address"
                issues.append(((*loc, "device"),
                               f"device {device.id!r} speaks {device.protocol}: its tags take {want}"))
                continue
            if isinstance(tag, ModbusTag) and isinstance(device, ModbusTcpDevice):
                limit = device.max_bits if tag.table.is_bits else device.max_registers
                if tag.registers > limit:
                    issues.append(((*loc, "count"), f"{tag.registers} registers exceed one read ({limit})"))
                if tag.writable:
                    key = (device.id, tag.unit_id if tag.unit_id is not None else device.unit, tag.table)
                    writable.setdefault(key, []).append((tag.address, tag.address + tag.registers, loc))
        issues += _check_derived(asset, ai, tm.gateway.calendar())
        issues += _check_rules(asset, ai)
    for spans in writable.values():
        spans.sort()
        for (s1, e1, loc1), (s2, _e2, loc2) in zip(spans, spans[1:], strict=False):
            if s2 < e1:
                issues.append(((*loc2, "address"), f"writable addresses overlap {format_path(loc1)} ({s1}..{e1 - 1})"))
    return issues


def _numeric(tag: Tag) -> bool:
    if tag.enum is not None:
        return False
    if isinstance(tag, OpcUaTag):
        return tag.type in (None, "int", "float")
    return tag.type not in (DataType.BOOL, DataType.STRING)


def _check_derived(asset: Asset, ai: int, calendar: Calendar) -> list[tuple[Loc, str]]:
    """Derived values have names of their own and read tags or other derived values of the asset."""
    issues: list[tuple[Loc, str]] = []
    for name, spec in asset.derived.items():
        loc: Loc = ("assets", ai, "derived", name)
        if name in asset.tags:
            issues.append((loc, f"{name!r} is also a tag of {asset.id!r}; a derived value needs a name of its own"))
        for ref in sorted(spec.inputs() - set(asset.tags) - set(asset.derived)):
            issues.append((loc, f"reads {ref!r}, which is neither a tag nor a derived value of {asset.id!r}"))
    if asset.derived and not set(asset.derived) & set(asset.tags):  # a shadowed tag reads as a cycle
        try:
            Derived(asset.id, asset.derived, calendar)
        except ValueError as exc:
            issues.append((("assets", ai, "derived"), str(exc)))
    return issues


def _check_rules(asset: Asset, ai: int) -> list[tuple[Loc, str]]:
    """Rules name tags of their asset, compare numbers, and limits are in order."""
    issues: list[tuple[Loc, str]] = []
    ids: dict[str, int] = {}
    limits: dict[tuple[str, str], tuple[float, int]] = {}
    names = {**asset.tags, **asset.derived}
    known = ", ".join(names)
    for ri, rule in enumerate(asset.rules):
        loc: Loc = ("assets", ai, "rules", ri)
        if rule.rule_id in ids:
            issues.append(((*loc, "id"), f"duplicate rule id {rule.rule_id!r} (also rules[{ids[rule.rule_id]}]); "
                                         "give one an id"))
        ids.setdefault(rule.rule_id, ri)
        refs: list[tuple[str, Loc]] = [(rule.tag, (*loc, "tag"))]
        if rule.target_tag:
            refs.append((rule.target_tag, (*loc, "target_tag")))
        refs += [(t, (*loc, "when", t)) for t in rule.when or ()]
        missing = False
        for name, where in refs:
            if name not in names:
                issues.append((where, f"no tag {name!r} in asset {asset.id!r} (tags: {known})"))
                missing = True
        if missing:
            continue
        tag = asset.tags.get(rule.tag)  # None: a derived value, always a number
        if rule.kind in (*LIMIT_KINDS, "target", "rate") and tag is not None and not _numeric(tag):
            issues.append(((*loc, "tag"), f"a {rule.kind} rule needs a numeric tag; {rule.tag!r} is not"))
        if rule.kind == "comm_lost" and tag is None:
            issues.append(((*loc, "tag"), f"{rule.tag!r} is derived; comm_lost needs a tag read from a device"))
        target = asset.tags.get(rule.target_tag or "")
        if target is not None and not _numeric(target):
            issues.append(((*loc, "target_tag"), f"{rule.target_tag!r} is not a numeric tag"))
        for name, allowed in (rule.when or {}).items():
            when_tag = asset.tags.get(name)
            enum = when_tag.enum if when_tag is not None else None
            if enum is not None:
                bad = [v for v in allowed if v not in enum.values()]
                if bad:
                    issues.append(((*loc, "when", name), f"{bad} not among {name}'s values: "
                                                         f"{', '.join(enum.values())}"))
        if rule.kind in LIMIT_KINDS and rule.limit is not None and rule.when is None:
            limits[(rule.tag, rule.kind)] = (rule.limit, ri)
    order = [("low_low", "low"), ("low", "high"), ("high", "high_high"), ("low_low", "high_high"),
             ("low", "high_high"), ("low_low", "high")]
    for lo, hi in order:
        for tag_name in sorted({t for t, _ in limits}):
            a, b = limits.get((tag_name, lo)), limits.get((tag_name, hi))
            if a and b and a[0] >= b[0]:
                issues.append((("assets", ai, "rules", b[1], "limit"),
                               f"{hi} limit {b[0]} of {tag_name!r} is not above its {lo} limit {a[0]} "
                               f"(rules[{a[1]}])"))
    return issues


def _duplicates(tm: TagMap) -> list[tuple[Loc, str]]:
    issues: list[tuple[Loc, str]] = []
    for section, ids in (("devices", [d.id for d in tm.devices]), ("assets", [a.id for a in tm.assets])):
        first: dict[str, int] = {}
        for i, id_ in enumerate(ids):
            if id_ in first:
                issues.append(((section, i, "id"), f"duplicate id {id_!r} (also {section}[{first[id_]}])"))
            else:
                first[id_] = i
    return issues


__all__ = ["Asset", "Device", "ModbusTag", "ModbusTcpDevice", "OpcUaDevice", "OpcUaTag", "SourceError", "Tag",
           "TagMap", "load_tag_map"]
