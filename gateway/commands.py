"""Operator commands from central services: parsed strictly, answered always (pure, no I/O).

A command arrives on ``{prefix}/gateways/{gateway_id}/cmd/{name}`` as a JSON object and is answered
on ``.../cmd/reply`` with the same ``request_id``. Anything that is not a known command with valid
fields is refused with a reason and changes nothing.

Commands are off unless the tag map's ``commands:`` turns them on: ``alarms`` (acknowledge, shelve,
unshelve, out_of_service, in_service) and ``writes`` (``write``: set a PLC tag marked ``writable``,
within its ``min``/``max``, in engineering units). ``users`` restricts who may send them. Who may
publish on the command topic at all is the broker's ACL (README: Broker security).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

import orjson
from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from .codec import alarm_view
from .fields import Duration, Frozen, Identifier, TagName
from .model import iso_ms
from .rules import MAX_SHELVE

if TYPE_CHECKING:
    from .tagmap import Tag, TagMap

MAX_PAYLOAD = 16 * 1024


class _Alarm(Frozen):
    request_id: Annotated[str, Field(max_length=128)] | None = None
    alarm_id: Annotated[str, Field(min_length=1, max_length=200)]
    user: Annotated[str, Field(max_length=128)] | None = None
    comment: Annotated[str, Field(max_length=1000)] | None = None


class _Shelve(_Alarm):
    duration: Annotated[Duration, Field(gt=0, le=MAX_SHELVE)]


class _Write(Frozen):
    request_id: Annotated[str, Field(max_length=128)] | None = None
    user: Annotated[str, Field(min_length=1, max_length=128)]  # who, for the audit trail
    comment: Annotated[str, Field(max_length=1000)] | None = None
    asset: Identifier
    tag: TagName
    value: StrictBool | StrictInt | StrictFloat | Annotated[StrictStr, Field(max_length=256)]


ALARM_COMMANDS: dict[str, type[_Alarm]] = {
    "acknowledge": _Alarm,
    "shelve": _Shelve,
    "unshelve": _Alarm,
    "out_of_service": _Alarm,
    "in_service": _Alarm,
}
SCHEMAS: dict[str, type[Frozen]] = {**ALARM_COMMANDS, "write": _Write}


class Rejected(Exception):
    """A command refused before it reached the alarms."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


@dataclass
class Command:
    name: str
    alarm_id: str
    request_id: str | None = None
    user: str | None = None
    comment: str | None = None
    duration: float | None = None
    reply: asyncio.Future[bytes] | None = field(default=None, compare=False)


@dataclass
class Write:
    """A write to a PLC tag; ``old``/``error`` are filled in once the device has been asked."""

    asset: str
    tag: str
    value: bool | int | float | str
    user: str
    request_id: str | None = None
    comment: str | None = None
    name: str = "write"
    old: object = None
    error: str | None = None
    ts: float = 0.0  # when the device answered
    reply: asyncio.Future[bytes] | None = field(default=None, compare=False)


def parse(name: str, payload: bytes) -> Command | Write:
    """The command ``name`` (the topic's last level) with its JSON ``payload``, or :class:`Rejected`."""
    if len(payload) > MAX_PAYLOAD:
        raise Rejected(f"payload of {len(payload)} bytes is over {MAX_PAYLOAD}")
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise Rejected(f"payload is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise Rejected("payload must be a JSON object")
    rid = body.get("request_id")
    request_id = rid if isinstance(rid, str) and len(rid) <= 128 else None
    schema = SCHEMAS.get(name)
    if schema is None:
        raise Rejected(f"unknown command {name[:64]!r} (known: {', '.join(SCHEMAS)})", request_id)
    try:
        cmd = schema.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}"
                             for e in exc.errors())
        raise Rejected(problems, request_id) from None
    if isinstance(cmd, _Write):
        return Write(asset=cmd.asset, tag=cmd.tag, value=cmd.value, user=cmd.user, request_id=cmd.request_id,
                     comment=cmd.comment)
    assert isinstance(cmd, _Alarm)
    return Command(name=name, alarm_id=cmd.alarm_id, request_id=cmd.request_id, user=cmd.user,
                   comment=cmd.comment, duration=getattr(cmd, "duration", None))


def refuse(tag_map: TagMap, command: Command | Write) -> str | None:
    """Why the gateway's policy refuses ``command`` (None: it may go ahead). Pure."""
    policy = tag_map.commands
    if isinstance(command, Write):
        if not policy.writes:
            return "writes are disabled on this gateway (tag map: commands.writes)"
    elif not policy.alarms:
        return "alarm commands are disabled on this gateway (tag map: commands.alarms)"
    if policy.users is not None and command.user not in policy.users:
        return f"user {(command.user or '')[:128]!r} may not send commands to this gateway"
    if isinstance(command, Write):
        return check_write(tag_map, command)
    return None


def check_write(tag_map: TagMap, w: Write) -> str | None:
    """Why ``w`` may not be written (None: the tag is writable and the value fits). Pure."""
    asset = next((a for a in tag_map.assets if a.id == w.asset), None)
    if asset is None:
        return f"unknown asset {w.asset!r}"
    tag = asset.tags.get(w.tag)
    if tag is None:
        return f"asset {w.asset!r} has no tag {w.tag!r}"
    if not tag.writable:
        return f"{w.asset}/{w.tag} is not writable (tag map: writable)"
    return check_value(tag, w.value)


def check_value(tag: Tag, value: object) -> str | None:
    """The value's type against the tag's, and its range against ``min``/``max``."""
    kind = tag_kind(tag)
    if kind == "enum":
        names = list((tag.enum or {}).values())
        return None if value in names else f"value must be one of {names}, not {value!r}"
    if kind == "bool":
        return None if isinstance(value, bool) else f"value must be true or false, not {value!r}"
    if kind == "string":
        return None if isinstance(value, str) else f"value must be a string, not {value!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"value must be a number, not {value!r}"
    if not math.isfinite(value):
        return "value must be a finite number"
    if kind == "int" and tag.scale == 1.0 and tag.offset == 0.0 and not float(value).is_integer():
        return f"value must be a whole number, not {value!r}"
    if tag.min is not None and value < tag.min:
        return f"value {value} is below the tag's min {tag.min}"
    if tag.max is not None and value > tag.max:
        return f"value {value} is above the tag's max {tag.max}"
    return None


def tag_kind(tag: Tag) -> str:
    """enum, bool, string, int or float: what a tag's engineering value is."""
    if tag.enum is not None:
        return "enum"
    kind = getattr(tag.type, "value", tag.type)  # a Modbus DataType or an OPC-UA type name
    if kind in ("bool", "string"):
        return str(kind)
    if kind is None or kind == "float" or str(kind).startswith("float"):
        return "float"
    return "int"


def reply(*, gateway_id: str, command: str | None, request_id: str | None, ts: float, error: str | None = None,
          changed: bool = False, alarm: dict[str, object] | None = None, write: Write | None = None) -> bytes:
    return orjson.dumps({
        "gateway_id": gateway_id,
        "request_id": request_id,
        "command": command,
        "ok": error is None,
        "error": error,
        "changed": changed,
        "alarm": alarm_view(alarm) if alarm is not None else None,
        "write": None if write is None else {"asset_id": write.asset, "tag": write.tag, "old": write.old,
                                             "new": write.value},
        "ts": iso_ms(ts),
    })
