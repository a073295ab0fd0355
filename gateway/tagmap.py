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
    AfterValidator,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Discriminator,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic import Tag as PydTag
from pydantic_core import ErrorDetails

from drivers.modbus.types import ADDRESS_SPACE, MAX_READ_BITS, MAX_READ_REGISTERS, DataType, Order, Table

from .batches import BatchSpec, critical_tags
from .derived import Calendar, Derived, DerivedSpec
from .fields import ID_PATTERN, Duration, Frozen, Identifier, TagName, duration
from .mqttsec import TlsFileError, client_context
from .rules import LIMIT_KINDS, Rule
from .shifts import ProductionSpec
from .yamlsource import Document, Loc, Problem, SourceError, format_path, load, parse

Interval = Annotated[float, BeforeValidator(duration), Field(ge=0.01, le=86400)]
Silence = Annotated[float, BeforeValidator(duration), Field(ge=1, le=86400)]
SILENCE = ("report by exception: send a value at least this often, even unchanged (1s..24h); "
           "a tag without a deadband then reports when it changes")
TopicPart = Annotated[str, Field(pattern=r"^[^#+\s]+(/[^#+\s/]+)*$")]


def _file_name(path: Path) -> Path:
    if "\x00" in str(path):  # the OS refuses it when the file is opened, at load or later at run time
        raise ValueError("a file name cannot contain a NUL character")
    return path


FileName = Annotated[Path, AfterValidator(_file_name)]


class GatewayConfig(Frozen):
    id: Identifier
    site: str = ""
    timezone: str = Field(default="UTC", description="the plant's time zone: days and shifts of derived values")
    shifts: list[str] = Field(default_factory=lambda: ["00:00"], min_length=1,
                              description="local start times of the shifts, e.g. [06:00, 14:00, 22:00]")
    shift_names: list[Annotated[str, Field(min_length=1, max_length=32)]] | None = Field(
        default=None, description="a name per shift, in the order of shifts (default: 1, 2, 3, ...)")

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

    @model_validator(mode="after")
    def _names(self) -> GatewayConfig:
        if self.shift_names is not None and len(self.shift_names) != len(self.shifts):
            raise ValueError(f"shift_names has {len(self.shift_names)} names for {len(self.shifts)} shifts")
        return self

    def calendar(self) -> Calendar:
        return Calendar(tz=self.timezone, shifts=tuple(self.shifts))


def _tls_version(value: object) -> object:
    """``min_version: 1.2`` is a number in YAML."""
    return f"{value:g}" if isinstance(value, float) else value


class MqttTls(Frozen):
    """TLS to the broker: used exactly when this section is present, never a fallback to plain TCP.
    The broker's certificate chain and host name are always verified."""

    ca_file: FileName | None = Field(
        default=None, description="PEM CA certificate(s) the broker's certificate must chain to; "
                                  "default: the system's trust store",
    )
    cert_file: FileName | None = Field(default=None, description="PEM client certificate, for brokers that require one")
    key_file: FileName | None = Field(default=None,
                                      description="its private key (PEM, unencrypted); default: in cert_file")
    server_name: str | None = Field(
        default=None, min_length=1,
        description="name the broker's certificate must carry, when mqtt.host is an address it does not list",
    )
    min_version: Annotated[Literal["1.2", "1.3"], BeforeValidator(_tls_version)] = "1.2"

    @model_validator(mode="after")
    def _pair(self) -> MqttTls:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file")
        return self


SparkplugId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^+/#\s]+$")]


class SparkplugConfig(Frozen):
    """Sparkplug B output (``mqtt.format: sparkplug | both``): the gateway is one edge node."""

    group_id: SparkplugId = Field(description="Sparkplug group id, e.g. plant-1")
    edge_node_id: SparkplugId | None = Field(default=None, description="default: gateway.id")
    primary_host_id: SparkplugId | None = Field(
        default=None, description="host application whose STATE gates publishing; absent: publish whenever connected",
    )


class MqttConfig(Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535, description="default 1883, 8883 with tls")
    topic_prefix: TopicPart = Field(description="ISA-95 style path, e.g. ninu/plant-1")
    client_id: str | None = Field(default=None, description="defaults to edge-gateway-{gateway.id}")
    username: str | None = None
    password_file: FileName | None = Field(
        default=None,
        description="file holding the broker password; EDGE_GATEWAY_MQTT_PASSWORD overrides it",
    )
    keepalive: Duration = Field(default=30.0, ge=5, le=3600)
    max_inflight: int = Field(default=64, ge=1, le=1000, description="QoS 1 messages awaiting PUBACK")
    reconnect_max: Duration = Field(default=30.0, ge=0.1, le=300, description="backoff cap")
    publish_timeout: Duration = Field(default=10.0, ge=0.5, le=300)
    tls: MqttTls | None = Field(default=None, description="TLS to the broker; absent: plain TCP")
    format: Literal["json", "sparkplug", "both"] = Field(
        default="json", description="json: the topics of the README; sparkplug: Sparkplug B (spBv1.0); both",
    )
    sparkplug: SparkplugConfig | None = Field(default=None, description="needed with format sparkplug or both")

    @model_validator(mode="before")
    @classmethod
    def _tls_port(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("tls") is not None and "port" not in data:
            return {**data, "port": 8883}
        return data

    @model_validator(mode="after")
    def _sparkplug_section(self) -> MqttConfig:
        if self.format != "json" and self.sparkplug is None:
            raise ValueError(f"format {self.format} needs a sparkplug section (at least group_id)")
        return self


class BufferConfig(Frozen):
    path: FileName | None = Field(
        default=None,
        description="SQLite file; default $STATE_DIRECTORY/buffer.sqlite or ./var/buffer.sqlite",
    )
    max_size: ByteSize | None = Field(
        default=ByteSize(1 << 30), ge=256 * 1024,
        description="cap of the database file, e.g. 1GiB or 500MB; when full, the oldest telemetry goes first, "
                    "alerts last; null: only the disk limits it",
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
    max_silence: Silence | None = Field(default=None, description="default of the device's tags: " + SILENCE)


    def describe(self) -> str:
        return f"{self.protocol} {self.host}:{self.port} unit {self.unit}"


class OpcUaSecurity(Frozen):
    """OPC-UA secure channel. A configured mode is never downgraded to None."""

    mode: Literal["None", "Sign", "SignAndEncrypt"] = "None"
    policy: Literal["Basic256Sha256", "Aes128Sha256RsaOaep", "Aes256Sha256RsaPss"] = "Basic256Sha256"
    certificate: FileName | None = Field(default=None, description="client certificate (DER or PEM)")
    private_key: FileName | None = Field(default=None, description="client private key (PEM)")
    server_certificate: FileName | None = Field(default=None, description="trusted server certificate")
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
        default="none", description="server-side deadband of monitored items: absolute from each tag's deadband, "
                                    "percent (of the node's EURange) from each tag's deadband_percent"
    )
    max_nodes_per_read: int | None = Field(default=None, ge=1, description="default: the server's limit")
    recheck: Duration = Field(default=5.0, ge=0.5, le=3600, description="re-resolve missing nodes this often")
    max_silence: Silence | None = Field(default=None, description="default of the device's tags (mode poll only): "
                                                                  + SILENCE)
    username: str | None = None
    password_file: FileName | None = None
    security: OpcUaSecurity = OpcUaSecurity()

    def describe(self) -> str:
        return f"opcua {self.endpoint} {self.mode}"


Device = Annotated[ModbusTcpDevice | OpcUaDevice, Field(discriminator="protocol")]


def _absolute(value: object) -> object:
    """``deadband: 2%`` (the rules' spelling) is not a tag's: say which field it is."""
    if isinstance(value, str) and value.strip().endswith("%"):
        raise ValueError(f"{value.strip()!r}: a percent of the tag's range is deadband_percent: "
                         f"{value.strip()[:-1].strip()} (with min and max)")
    return value


class TagBase(Frozen):
    model_config = ConfigDict(allow_inf_nan=False)  # scale, offset, deadband, min, max: finite numbers

    device: Identifier
    scale: float = 1.0
    offset: float = 0.0
    enum: dict[int, str] | None = None
    unit: str | None = None
    deadband: Annotated[float, BeforeValidator(_absolute)] | None = Field(
        default=None, ge=0, description="report by exception: send the value when it moves more than this "
                                        "(in the tag's unit) from the last value sent; 0: on any change",
    )
    deadband_percent: float | None = Field(
        default=None, ge=0, le=100, description="report by exception: deadband as a percent of the range max - min",
    )
    max_silence: Silence | None = Field(default=None, description=SILENCE + "; default: the asset's, the device's")
    writable: bool = False
    min: float | None = None
    max: float | None = None

    def _check_range(self, numeric: bool) -> None:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        if self.writable and numeric and self.enum is None and (self.min is None or self.max is None):
            raise ValueError("a writable number needs min and max: the range operators may set")

    def _check_report(self, kind: str | None) -> None:
        """Deadbands: one of absolute or percent; percent of a range; only numbers move by an amount.
        ``kind``: None for a number, else what the tag holds (a bool, a string, an enum)."""
        if self.deadband is not None and self.deadband_percent is not None:
            raise ValueError("deadband and deadband_percent: give one (deadband in the tag's unit, "
                             "deadband_percent of its range max - min)")
        if kind is not None:
            if self.deadband_percent is not None:
                raise ValueError(f"deadband_percent applies to numbers; {kind} is sent when it changes "
                                 "(deadband: 0, or max_silence)")
            if self.deadband:
                raise ValueError(f"deadband {self.deadband:g} on {kind}: it is sent when it changes, "
                                 "use deadband: 0 (or max_silence)")
        if self.deadband_percent is not None:
            if self.min is None or self.max is None:
                raise ValueError("deadband_percent is a percent of the tag's range: it needs min and max")
            if self.min == self.max:
                raise ValueError(f"deadband_percent needs max above min (both {self.min:g})")


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
        if self.writable and self.table not in (Table.HOLDING, Table.COIL):
            raise ValueError(f"{self.table} is read-only in Modbus: writable tags are holding or coil")
        self._check_range(self.type.is_integer or self.type.is_float)
        self._check_report(self._holds())
        return self

    def _holds(self) -> str | None:
        """None for a number, else what the tag holds."""
        if self.enum is not None:
            return "an enum"
        return None if self.type.is_integer or self.type.is_float else f"a {self.type}"

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
        if self.writable and self.type is None:
            raise ValueError("a writable OPC-UA tag needs type (bool, int, float or string)")
        self._check_range(self.type in ("int", "float"))
        self._check_report(self._holds())
        return self

    def _holds(self) -> str | None:
        """None for a number (or a node of any type), else what the tag holds."""
        if self.enum is not None:
            return "an enum"
        return None if self.type in (None, "int", "float") else f"a {self.type}"


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
    max_silence: Silence | None = Field(default=None, description="default of the asset's tags and derived "
                                                                  "values: " + SILENCE)
    tags: dict[TagName, Tag] = Field(min_length=1)
    rules: list[Rule] = Field(default_factory=list, description="limits checked at the edge, see gateway/rules.py")
    derived: dict[TagName, DerivedSpec] = Field(default_factory=dict, description="values computed at the edge")
    batch: BatchSpec | None = Field(default=None, description="what says which batch runs: records at its end")
    production: ProductionSpec | None = Field(default=None, description="a station's counters and status: a "
                                                                        "production summary per shift")

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


class CommandsConfig(Frozen):
    """Operator commands over MQTT: all off unless turned on here (gateway/commands.py)."""

    alarms: bool = Field(default=False, description="acknowledge, shelve, unshelve, out_of_service, in_service")
    writes: bool = Field(default=False, description="write: set a tag marked writable, within its min/max")
    users: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(
        default=None, description="who may send commands (the payload's user); absent: anyone the broker lets in",
    )


class TagMap(Frozen):
    gateway: GatewayConfig
    mqtt: MqttConfig
    buffer: BufferConfig = BufferConfig()
    commands: CommandsConfig = CommandsConfig()
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


_UNION_TAGS = {  # the section holding a union -> the tags pydantic puts in an error's loc
    "tags": {"modbus", "opcua"},
    "devices": {"modbus_tcp", "opcua"},
    "derived": {"counter_rate", "efficiency", "daily_count", "status_time", "availability"},
}


def _union_member(raw: Loc, i: int) -> bool:
    """Whether ``raw[i]`` names a union member (a discriminator value, or a type of a ``when`` value)."""
    if i >= 2 and raw[i] in _UNION_TAGS.get(str(raw[i - 2]), ()):
        return True
    return i >= 3 and raw[i - 3] == "when" and isinstance(raw[i - 1], int)


def _loc(err: ErrorDetails) -> Loc:
    """The error's location in the document: without the unions' members; a bad or missing discriminator
    is located at its own key (``protocol``, ``kind``)."""
    raw = tuple(err["loc"])
    loc = tuple(e for i, e in enumerate(raw) if not _union_member(raw, i))
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        return (*loc, _discriminator(err))
    return loc


def _discriminator(err: ErrorDetails) -> str:
    return str((err.get("ctx") or {}).get("discriminator", "'protocol'")).strip("'")


def _message(err: ErrorDetails) -> str:
    kind, loc = err["type"], err["loc"]
    if kind == "extra_forbidden":
        if loc and loc[-1] == "password":
            return "unknown key: secrets stay out of the tag map (EDGE_GATEWAY_MQTT_PASSWORD or password_file)"
        return "unknown key"
    if kind in ("missing", "union_tag_not_found"):
        return "required"
    if kind == "union_tag_invalid":
        ctx = err.get("ctx") or {}
        return f"unknown {_discriminator(err)} {ctx.get('tag')!r} (known: {ctx.get('expected_tags')})"
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
    issues += _check_mqtt_files(tm.mqtt)
    devices = {d.id: d for d in tm.devices}
    issues += _check_opcua_report(tm, devices)
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
        issues += _check_batch(asset, ai)
        issues += _check_production(asset, ai)
    for spans in writable.values():
        spans.sort()
        for (s1, e1, loc1), (s2, _e2, loc2) in zip(spans, spans[1:], strict=False):
            if s2 < e1:
                issues.append(((*loc2, "address"), f"writable addresses overlap {format_path(loc1)} ({s1}..{e1 - 1})"))
    return issues


_SUBSCRIBED = ("device {device!r} subscribes: the server sends changes only, so an unchanged value cannot be "
               "sent again; max_silence needs mode: poll (a stale rule notices a value that stopped)")


def _check_opcua_report(tm: TagMap, devices: dict[str, Device]) -> list[tuple[Loc, str]]:
    """What OPC-UA devices can do: a subscription sends changes only, so max_silence (of a device, an asset
    or a tag) cannot reach its tags; a server-side percent deadband comes from deadband_percent."""
    issues: list[tuple[Loc, str]] = []
    for di, device in enumerate(tm.devices):
        if isinstance(device, OpcUaDevice) and device.mode == "subscribe" and device.max_silence is not None:
            issues.append((("devices", di, "max_silence"), _SUBSCRIBED.format(device=device.id)))
    for ai, asset in enumerate(tm.assets):
        inherit: set[str] = set()  # subscribed devices whose tags would take the asset's max_silence
        for name, tag in asset.tags.items():
            server = devices.get(tag.device)
            if not isinstance(server, OpcUaDevice) or not isinstance(tag, OpcUaTag):
                continue  # a tag on a device of another protocol is reported once, by cross_check
            loc: Loc = ("assets", ai, "tags", name)
            if server.mode == "subscribe":
                if tag.max_silence is not None:
                    issues.append(((*loc, "max_silence"), _SUBSCRIBED.format(device=server.id)))
                else:
                    inherit.add(server.id)
            if server.deadband_type == "percent" and tag.deadband is not None:
                issues.append(((*loc, "deadband"), f"device {server.id!r} has deadband_type percent (of the "
                                                   "node's EURange): give deadband_percent, with min and max as "
                                                   "the EURange"))
        if asset.max_silence is not None:
            issues += [(("assets", ai, "max_silence"), _SUBSCRIBED.format(device=d)) for d in sorted(inherit)]
    return issues


def _check_mqtt_files(mqtt: MqttConfig) -> list[tuple[Loc, str]]:
    """The broker's files are read now, so that a missing or wrong file stops the start, not the first connect."""
    issues: list[tuple[Loc, str]] = []
    if mqtt.password_file is not None:
        try:
            mqtt.password_file.read_text(encoding="utf-8")
        except (OSError, UnicodeError) as exc:
            issues.append((("mqtt", "password_file"),
                           f"{mqtt.password_file}: cannot read it: {getattr(exc, 'strerror', None) or exc}"))
    if mqtt.tls is not None:
        try:
            client_context(mqtt.tls)
        except TlsFileError as exc:
            issues.append((("mqtt", "tls", exc.field), str(exc)))
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


def _check_batch(asset: Asset, ai: int) -> list[tuple[Loc, str]]:
    """A batch context reads tags of its asset; its phases are names the phase tag can hold; its critical
    parameters are numbers."""
    spec = asset.batch
    if spec is None:
        return []
    loc: Loc = ("assets", ai, "batch")
    names = {**asset.tags, **asset.derived}
    issues = _section_tags(asset, loc, spec, ("id", "recipe", "phase", "progress"), enum_tag=spec.phase,
                           name_fields=("running", "ending"), noun="phase")
    for both in sorted(set(spec.running) & set(spec.ending)):
        issues.append(((*loc, "ending"), f"{both!r} is both a running and an ending phase"))
    critical = critical_tags(spec, asset.rules)
    if not critical:
        issues.append(((*loc, "critical"), "no critical parameter: name them, or give the asset limit or target "
                                           "rules"))
    for i, name in enumerate(spec.critical or ()):
        tag = names.get(name)
        where: Loc = (*loc, "critical", i)
        if tag is None:
            issues.append((where, f"{name!r} is not a tag of {asset.id!r}"))
        elif name in asset.tags and not _numeric(asset.tags[name]):
            issues.append((where, f"{name!r} holds {asset.tags[name]._holds()}: a critical parameter is a number"))
    return issues


def _check_production(asset: Asset, ai: int) -> list[tuple[Loc, str]]:
    """A production section reads tags of its asset; its statuses are names its status tag can hold."""
    spec = asset.production
    if spec is None:
        return []
    return _section_tags(asset, ("assets", ai, "production"), spec,
                         ("counter", "rejects", "errors", "status", "target"), enum_tag=spec.status,
                         name_fields=("running", "downtime"), noun="status")


def _section_tags(asset: Asset, loc: Loc, spec: object, tag_fields: tuple[str, ...], *, enum_tag: str,
                  name_fields: tuple[str, ...], noun: str) -> list[tuple[Loc, str]]:
    """An asset's section (batch, production) names tags of the asset in ``tag_fields``, and values of
    the enum tag ``enum_tag`` in the lists ``name_fields``."""
    issues: list[tuple[Loc, str]] = []
    names = {**asset.tags, **asset.derived}
    for field in tag_fields:
        name = getattr(spec, field)
        if name is not None and name not in names:
            issues.append(((*loc, field), f"{name!r} is not a tag of {asset.id!r} (tags: {', '.join(names)})"))
    tag = asset.tags.get(enum_tag)
    if tag is not None and tag.enum is not None:
        known = set(tag.enum.values())
        for field in name_fields:
            for i, name in enumerate(getattr(spec, field)):
                if name not in known:
                    issues.append(((*loc, field, i), f"{name!r} is not a {noun} of {enum_tag!r} "
                                                     f"(its enum: {', '.join(tag.enum.values())})"))
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
