"""Sparkplug B (Eclipse Sparkplug 3.0) output: topics and payloads, no MQTT I/O.

Mapping of the gateway onto Sparkplug
-------------------------------------

- The gateway is one **edge node**: ``spBv1.0/{group_id}/.../{edge_node_id}`` (the session layer
  chooses group and edge node ids, e.g. the site and ``gateway.id``).
- Each **asset** of the tag map is a Sparkplug **device**: ``device_id`` is the asset id
  (``spBv1.0/{group_id}/DDATA/{edge_node_id}/reactor-a``).
- Each **tag** of an asset is a **metric** named as the tag (``temperature``), and so is each
  derived value (``counted_units_per_hour``). Tag names are lowercase, so they never collide with the
  capitalised folders below.
- Each **rule** of an asset adds two Boolean metrics: ``Alarms/<rule_id>/Active`` (the condition,
  after delays and hysteresis) and ``Alarms/<rule_id>/Acked`` (false while the alarm awaits an
  acknowledgement: ``active_unacked``, ``cleared_unacked``). Writing ``Acked`` true in a DCMD is an
  acknowledgement.
- The edge node's own metrics are ``bdSeq`` (Int64) and ``Node Control/Rebirth`` (Boolean, false;
  an NCMD writing it true asks for a rebirth).
- Aliases are numbered 1, 2, 3, ... over all of the node's metrics sorted by (device id, name), node
  metrics first: unique across the edge node, and the same for the same tag map (see ``catalog``).
- Datatypes come from the tag declarations, as births need them before any value: bool -> Boolean,
  float or scaled -> Double, enum and string -> String, uint64 -> UInt64, other integers -> Int64
  (Int64 for every int, never "Int32 while it fits": a birth fixes the type for the session);
  derived values are Double, ``daily_count`` Int64; alarm flags Boolean.
- Metric timestamps are the device's source timestamp when it has one (OPC-UA), else when the gateway
  read the value (Modbus); payload timestamps are when the message was built. UTC milliseconds.
- Replayed (buffered) values go out in DDATA with ``is_historical`` true.

Units and quality as metric properties (PropertySet)
----------------------------------------------------

==============  =======  ===========================================================================
key             type     value
==============  =======  ===========================================================================
``engUnit``     String   the tag's ``unit``; DBIRTH only, for tags that have one
``Quality``     Int32    the specification's quality code (section 6.4.9.1, which allows only these):
                         good -> 192, uncertain -> 500 (STALE), bad -> 0
``StatusCode``  UInt32   the same three levels as an OPC-UA StatusCode severity:
                         good -> 0x00000000, uncertain -> 0x40000000, bad -> 0x80000000
``Reason``      String   why the value is not good (timeout, Modbus exception, ...); only then
==============  =======  ===========================================================================

``Quality`` and ``StatusCode`` are on every tag, derived and alarm metric of every DBIRTH and DDATA.
``Quality`` cannot carry OPC-UA codes itself: Sparkplug hosts read 0 there as BAD, and the
specification requires Int32 with 0, 192 or 500. A bad value is sent with ``is_null`` true and no
value; an uncertain one with its value. A value the metric's datatype cannot hold (say, a string
from an OPC-UA node declared ``float``) is sent as null with quality bad and the reason.

Modules: ``topics`` (topic names), ``catalog`` (metrics, aliases, datatypes), ``payload`` (encode,
decode, NBIRTH/NDEATH/DBIRTH/DDATA/DDEATH builders, NCMD/DCMD and STATE decoding), ``schema``
(the protobuf messages of the specification); ``session`` (the edge node's MQTT session, the only
one with I/O; not imported here).
"""

from .catalog import (
    BD_SEQ,
    REBIRTH,
    Catalog,
    DeviceDef,
    MetricDef,
    MetricKind,
    MetricSpec,
    UnknownMetric,
    alarm_metric_names,
    datatype_of,
    tag_datatype,
)
from .payload import (
    AlarmFlags,
    Command,
    CommandError,
    HostState,
    Metric,
    Payload,
    PayloadError,
    PropertyValue,
    Seq,
    Write,
    dbirth,
    ddata,
    ddeath,
    decode,
    decode_command,
    decode_state,
    encode,
    nbirth,
    ndeath,
    next_bd_seq,
)
from .schema import DataType
from .topics import MessageType, StateTopic, Topic, TopicError, device_topic, node_topic, parse_topic, state_topic

__all__ = ["BD_SEQ", "REBIRTH", "AlarmFlags", "Catalog", "Command", "CommandError", "DataType", "DeviceDef",
           "HostState", "MessageType", "Metric", "MetricDef", "MetricKind", "MetricSpec", "Payload", "PayloadError",
           "PropertyValue", "Seq", "StateTopic", "Topic", "TopicError", "UnknownMetric", "Write",
           "alarm_metric_names", "datatype_of", "dbirth", "ddata", "ddeath", "decode", "decode_command",
           "decode_state", "device_topic", "encode", "nbirth", "ndeath", "next_bd_seq", "node_topic", "parse_topic",
           "state_topic", "tag_datatype"]
