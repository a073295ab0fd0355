"""Operator commands from central services: parsed strictly, answered always (pure, no I/O).

A command arrives on ``{prefix}/gateways/{gateway_id}/cmd/{name}`` as a JSON object and is answered
on ``.../cmd/reply`` with the same ``request_id``. Anything that is not a known command with valid
fields is refused with a reason and changes nothing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Annotated

import orjson
from pydantic import Field, ValidationError

from .codec import alarm_view
from .fields import Duration, Frozen
from .model import iso_ms
from .rules import MAX_SHELVE

MAX_PAYLOAD = 16 * 1024


class _Alarm(Frozen):
    request_id: Annotated[str, Field(max_length=128)] | None = None
    alarm_id: Annotated[str, Field(min_length=1, max_length=200)]
    user: Annotated[str, Field(max_length=128)] | None = None
    comment: Annotated[str, Field(max_length=1000)] | None = None


class _Shelve(_Alarm):
    duration: Annotated[Duration, Field(gt=0, le=MAX_SHELVE)]


SCHEMAS: dict[str, type[_Alarm]] = {
    "acknowledge": _Alarm,
    "shelve": _Shelve,
    "unshelve": _Alarm,
    "out_of_service": _Alarm,
    "in_service": _Alarm,
}


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


def parse(name: str, payload: bytes) -> Command:
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
    return Command(name=name, alarm_id=cmd.alarm_id, request_id=cmd.request_id, user=cmd.user,
                   comment=cmd.comment, duration=getattr(cmd, "duration", None))


def reply(*, gateway_id: str, command: str | None, request_id: str | None, ts: float, error: str | None = None,
          changed: bool = False, alarm: dict[str, object] | None = None) -> bytes:
    return orjson.dumps({
        "gateway_id": gateway_id,
        "request_id": request_id,
        "command": command,
        "ok": error is None,
        "error": error,
        "changed": changed,
        "alarm": alarm_view(alarm) if alarm is not None else None,
        "ts": iso_ms(ts),
    })
