"""Sparkplug topic namespace (Eclipse Sparkplug 3.0, section 4.1): build and parse, no I/O.

::

    spBv1.0/{group_id}/{NBIRTH|NDEATH|NDATA|NCMD}/{edge_node_id}
    spBv1.0/{group_id}/{DBIRTH|DDEATH|DDATA|DCMD}/{edge_node_id}/{device_id}
    spBv1.0/STATE/{host_id}

Group, edge node, device and host ids are non-empty UTF-8 strings without the reserved ``+``, ``/``
and ``#`` (tck-id-topic-structure-namespace-valid-*); NUL is refused too, as MQTT topic names may not
hold it. The device id is required by exactly the device message types and refused by the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

NAMESPACE = "spBv1.0"
STATE = "STATE"
_RESERVED = ("+", "/", "#", "\x00")
_MAX_TOPIC_BYTES = 65535  # MQTT: a topic name is a length-prefixed UTF-8 string


class MessageType(StrEnum):
    NBIRTH = "NBIRTH"
    NDEATH = "NDEATH"
    DBIRTH = "DBIRTH"
    DDEATH = "DDEATH"
    NDATA = "NDATA"
    DDATA = "DDATA"
    NCMD = "NCMD"
    DCMD = "DCMD"

    @property
    def is_device(self) -> bool:
        """DBIRTH, DDEATH, DDATA and DCMD topics end with a device id; the others must not."""
        return self in _DEVICE_TYPES


_DEVICE_TYPES = frozenset({MessageType.DBIRTH, MessageType.DDEATH, MessageType.DDATA, MessageType.DCMD})


class TopicError(ValueError):
    """A topic, or an id for one, that the Sparkplug namespace does not allow."""


def check_id(value: str, what: str = "id") -> str:
    """``value`` if it can be a group, edge node, device or host id; TopicError saying why not."""
    if not isinstance(value, str):
        raise TopicError(f"{what} must be a string, not {type(value).__name__}")
    if not value:
        raise TopicError(f"{what} is empty")
    for char in _RESERVED:
        if char in value:
            shown = "NUL" if char == "\x00" else repr(char)
            raise TopicError(f"{what} {value!r} contains {shown} (reserved in Sparkplug topics)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise TopicError(f"{what} {value!r} is not valid UTF-8 (lone surrogate)") from None
    return value


@dataclass(frozen=True, slots=True)
class Topic:
    """An edge node or device topic. ``str(topic)`` is the MQTT topic name."""

    group_id: str
    message_type: MessageType
    edge_node_id: str
    device_id: str | None = None

    def __post_init__(self) -> None:
        check_id(self.group_id, "group_id")
        object.__setattr__(self, "message_type", _message_type(self.message_type))
        check_id(self.edge_node_id, "edge_node_id")
        if self.message_type.is_device:
            if self.device_id is None:
                raise TopicError(f"{self.message_type} topics need a device_id")
            check_id(self.device_id, "device_id")
        elif self.device_id is not None:
            raise TopicError(f"{self.message_type} topics take no device_id")
        _check_length(str(self))

    def __str__(self) -> str:
        base = f"{NAMESPACE}/{self.group_id}/{self.message_type}/{self.edge_node_id}"
        return base if self.device_id is None else f"{base}/{self.device_id}"


@dataclass(frozen=True, slots=True)
class StateTopic:
    """A Host Application's STATE topic (retained ``{"online": ..., "timestamp": ...}`` JSON)."""

    host_id: str

    def __post_init__(self) -> None:
        check_id(self.host_id, "host_id")
        _check_length(str(self))

    def __str__(self) -> str:
        return f"{NAMESPACE}/{STATE}/{self.host_id}"


def _check_length(topic: str) -> None:
    if len(topic.encode("utf-8")) > _MAX_TOPIC_BYTES:
        raise TopicError(f"topic is longer than {_MAX_TOPIC_BYTES} bytes")


def node_topic(group_id: str, message_type: MessageType | str, edge_node_id: str) -> str:
    """``spBv1.0/{group_id}/{NBIRTH|NDEATH|NDATA|NCMD}/{edge_node_id}``."""
    return str(Topic(group_id, _message_type(message_type), edge_node_id))


def device_topic(group_id: str, message_type: MessageType | str, edge_node_id: str, device_id: str) -> str:
    """``spBv1.0/{group_id}/{DBIRTH|DDEATH|DDATA|DCMD}/{edge_node_id}/{device_id}``."""
    return str(Topic(group_id, _message_type(message_type), edge_node_id, device_id))


def state_topic(host_id: str) -> str:
    """``spBv1.0/STATE/{host_id}``: where an edge node learns whether its primary host is online."""
    return str(StateTopic(host_id))


def command_filters(group_id: str, edge_node_id: str) -> tuple[str, str]:
    """The subscriptions an edge node needs for its commands: its NCMD topic and all its devices' DCMD."""
    check_id(group_id, "group_id")
    check_id(edge_node_id, "edge_node_id")
    return (f"{NAMESPACE}/{group_id}/{MessageType.NCMD}/{edge_node_id}",
            f"{NAMESPACE}/{group_id}/{MessageType.DCMD}/{edge_node_id}/+")


def parse_topic(topic: str) -> Topic | StateTopic:
    """The parts of a Sparkplug B topic; TopicError for anything else (other namespaces, wrong shape)."""
    if not isinstance(topic, str):
        raise TopicError(f"a topic is a string, not {type(topic).__name__}")
    parts = topic.split("/")
    if parts[0] != NAMESPACE:
        raise TopicError(f"{topic!r} is not in the {NAMESPACE} namespace")
    if len(parts) == 3 and parts[1] == STATE:
        return StateTopic(parts[2])
    if len(parts) not in (4, 5):
        raise TopicError(f"{topic!r}: expected {NAMESPACE}/group_id/message_type/edge_node_id[/device_id]")
    try:
        message_type = MessageType(parts[2])
    except ValueError:
        raise TopicError(f"{topic!r}: unknown message type {parts[2]!r} "
                         f"(known: {', '.join(MessageType)})") from None
    device_id = parts[4] if len(parts) == 5 else None
    return Topic(parts[1], message_type, parts[3], device_id)


def _message_type(value: MessageType | str) -> MessageType:
    try:
        return MessageType(value)
    except ValueError:
        raise TopicError(f"unknown message type {value!r} (known: {', '.join(MessageType)})") from None


__all__ = ["NAMESPACE", "MessageType", "StateTopic", "Topic", "TopicError", "check_id", "command_filters",
           "device_topic", "node_topic", "parse_topic", "state_topic"]
