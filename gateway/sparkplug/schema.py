"""The Sparkplug B payload schema (Eclipse Sparkplug 3.0, section 6.4.1, ``sparkplug_b.proto``).

The messages are declared here as protobuf descriptors, field by field from the specification, and
compiled by the Google protobuf runtime. So the wire format itself (varints, fixed 32/64-bit floats,
length-delimited strings and messages, presence of proto2 optionals, oneofs, skipping unknown and
extension fields, rejecting truncated or corrupt input) is the reference implementation's, the one
Sparkplug hosts parse with; only the schema is written by hand, and the tests check it against the
specification's field table, payload bytes written from the specification and a wire reader of
their own.

The descriptors live in a private pool: another library registering ``org.eclipse.tahu.protobuf`` in
the default pool cannot clash with them.

Only ``gateway.sparkplug.payload`` uses these messages; everything else sees its dataclasses.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory  # type: ignore[import-untyped]
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

PACKAGE = "org.eclipse.tahu.protobuf"
FILE_NAME = "sparkplug_b.proto"
MAX_FIELD = 536_870_912  # ``extensions N to max``: field numbers end below 2**29 (exclusive end)


class DataType(IntEnum):
    """``enum DataType`` of the specification (section 6.4.16): metric, property and parameter types."""

    UNKNOWN = 0
    # basic types
    INT8 = 1
    INT16 = 2
    INT32 = 3
    INT64 = 4
    UINT8 = 5
    UINT16 = 6
    UINT32 = 7
    UINT64 = 8
    FLOAT = 9
    DOUBLE = 10
    BOOLEAN = 11
    STRING = 12
    DATETIME = 13
    TEXT = 14
    # additional metric types
    UUID = 15
    DATASET = 16
    BYTES = 17
    FILE = 18
    TEMPLATE = 19
    # additional property value types
    PROPERTYSET = 20
    PROPERTYSETLIST = 21
    # array types (little-endian packed in bytes_value)
    INT8_ARRAY = 22
    INT16_ARRAY = 23
    INT32_ARRAY = 24
    INT64_ARRAY = 25
    UINT8_ARRAY = 26
    UINT16_ARRAY = 27
    UINT32_ARRAY = 28
    UINT64_ARRAY = 29
    FLOAT_ARRAY = 30
    DOUBLE_ARRAY = 31
    BOOLEAN_ARRAY = 32
    STRING_ARRAY = 33
    DATETIME_ARRAY = 34

    @property
    def label(self) -> str:
        """The specification's name: ``Int64``, ``UInt32``, ``Boolean``, ``DateTime``, ..."""
        return _ENUM_NAMES[self]


# The spec's enum names, as the descriptor spells them (UpperCamelCase).
_ENUM_NAMES = {
    DataType.UNKNOWN: "Unknown", DataType.INT8: "Int8", DataType.INT16: "Int16", DataType.INT32: "Int32",
    DataType.INT64: "Int64", DataType.UINT8: "UInt8", DataType.UINT16: "UInt16", DataType.UINT32: "UInt32",
    DataType.UINT64: "UInt64", DataType.FLOAT: "Float", DataType.DOUBLE: "Double", DataType.BOOLEAN: "Boolean",
    DataType.STRING: "String", DataType.DATETIME: "DateTime", DataType.TEXT: "Text", DataType.UUID: "UUID",
    DataType.DATASET: "DataSet", DataType.BYTES: "Bytes", DataType.FILE: "File", DataType.TEMPLATE: "Template",
    DataType.PROPERTYSET: "PropertySet", DataType.PROPERTYSETLIST: "PropertySetList",
    DataType.INT8_ARRAY: "Int8Array", DataType.INT16_ARRAY: "Int16Array", DataType.INT32_ARRAY: "Int32Array",
    DataType.INT64_ARRAY: "Int64Array", DataType.UINT8_ARRAY: "UInt8Array", DataType.UINT16_ARRAY: "UInt16Array",
    DataType.UINT32_ARRAY: "UInt32Array", DataType.UINT64_ARRAY: "UInt64Array", DataType.FLOAT_ARRAY: "FloatArray",
    DataType.DOUBLE_ARRAY: "DoubleArray", DataType.BOOLEAN_ARRAY: "BooleanArray",
    DataType.STRING_ARRAY: "StringArray", DataType.DATETIME_ARRAY: "DateTimeArray",
}

_F = descriptor_pb2.FieldDescriptorProto
OPTIONAL, REPEATED = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
UINT32, UINT64, FLOAT, DOUBLE = _F.TYPE_UINT32, _F.TYPE_UINT64, _F.TYPE_FLOAT, _F.TYPE_DOUBLE
BOOL, STRING, BYTES, MESSAGE = _F.TYPE_BOOL, _F.TYPE_STRING, _F.TYPE_BYTES, _F.TYPE_MESSAGE

# A field: (name, number, label, type, message type relative to Payload or None, in the oneof ``value``).
Field = tuple[str, int, int, int, str | None, bool]


# A message: its fields, the start of its ``extensions N to max`` (None: none), its nested messages.
MessageSpec = tuple[list[Field], int | None, dict[str, "MessageSpec"]]


def _scalar(name: str, number: int, type_: int, *, label: int = OPTIONAL, oneof: bool = False) -> Field:
    return (name, number, label, type_, None, oneof)


def _message(name: str, number: int, type_name: str, *, label: int = OPTIONAL, oneof: bool = False) -> Field:
    return (name, number, label, MESSAGE, type_name, oneof)


# Names, numbers, labels and types as in the specification; ``oneof value`` members are marked.
_TEMPLATE_PARAMETER: MessageSpec = ([
    _scalar("name", 1, STRING),
    _scalar("type", 2, UINT32),
    _scalar("int_value", 3, UINT32, oneof=True),
    _scalar("long_value", 4, UINT64, oneof=True),
    _scalar("float_value", 5, FLOAT, oneof=True),
    _scalar("double_value", 6, DOUBLE, oneof=True),
    _scalar("boolean_value", 7, BOOL, oneof=True),
    _scalar("string_value", 8, STRING, oneof=True),
    _message("extension_value", 9, "Template.Parameter.ParameterValueExtension", oneof=True),
], None, {"ParameterValueExtension": ([], 1, {})})

_TEMPLATE: MessageSpec = ([
    _scalar("version", 1, STRING),
    _message("metrics", 2, "Metric", label=REPEATED),
    _message("parameters", 3, "Template.Parameter", label=REPEATED),
    _scalar("template_ref", 4, STRING),
    _scalar("is_definition", 5, BOOL),
], 6, {"Parameter": _TEMPLATE_PARAMETER})

_DATASET: MessageSpec = ([
    _scalar("num_of_columns", 1, UINT64),
    _scalar("columns", 2, STRING, label=REPEATED),
    _scalar("types", 3, UINT32, label=REPEATED),
    _message("rows", 4, "DataSet.Row", label=REPEATED),
], 5, {
    "DataSetValue": ([
        _scalar("int_value", 1, UINT32, oneof=True),
        _scalar("long_value", 2, UINT64, oneof=True),
        _scalar("float_value", 3, FLOAT, oneof=True),
        _scalar("double_value", 4, DOUBLE, oneof=True),
        _scalar("boolean_value", 5, BOOL, oneof=True),
        _scalar("string_value", 6, STRING, oneof=True),
        _message("extension_value", 7, "DataSet.DataSetValue.DataSetValueExtension", oneof=True),
    ], None, {"DataSetValueExtension": ([], 1, {})}),
    "Row": ([_message("elements", 1, "DataSet.DataSetValue", label=REPEATED)], 2, {}),
})

_PROPERTY_VALUE: MessageSpec = ([
    _scalar("type", 1, UINT32),
    _scalar("is_null", 2, BOOL),
    _scalar("int_value", 3, UINT32, oneof=True),
    _scalar("long_value", 4, UINT64, oneof=True),
    _scalar("float_value", 5, FLOAT, oneof=True),
    _scalar("double_value", 6, DOUBLE, oneof=True),
    _scalar("boolean_value", 7, BOOL, oneof=True),
    _scalar("string_value", 8, STRING, oneof=True),
    _message("propertyset_value", 9, "PropertySet", oneof=True),
    _message("propertysets_value", 10, "PropertySetList", oneof=True),
    _message("extension_value", 11, "PropertyValue.PropertyValueExtension", oneof=True),
], None, {"PropertyValueExtension": ([], 1, {})})

_PROPERTY_SET: MessageSpec = ([
    _scalar("keys", 1, STRING, label=REPEATED),
    _message("values", 2, "PropertyValue", label=REPEATED),
], 3, {})

_PROPERTY_SET_LIST: MessageSpec = ([_message("propertyset", 1, "PropertySet", label=REPEATED)], 2, {})

_METADATA: MessageSpec = ([
    _scalar("is_multi_part", 1, BOOL),
    _scalar("content_type", 2, STRING),
    _scalar("size", 3, UINT64),
    _scalar("seq", 4, UINT64),
    _scalar("file_name", 5, STRING),
    _scalar("file_type", 6, STRING),
    _scalar("md5", 7, STRING),
    _scalar("description", 8, STRING),
], 9, {})

_METRIC: MessageSpec = ([
    _scalar("name", 1, STRING),
    _scalar("alias", 2, UINT64),
    _scalar("timestamp", 3, UINT64),
    _scalar("datatype", 4, UINT32),
    _scalar("is_historical", 5, BOOL),
    _scalar("is_transient", 6, BOOL),
    _scalar("is_null", 7, BOOL),
    _message("metadata", 8, "MetaData"),
    _message("properties", 9, "PropertySet"),
    _scalar("int_value", 10, UINT32, oneof=True),
    _scalar("long_value", 11, UINT64, oneof=True),
    _scalar("float_value", 12, FLOAT, oneof=True),
    _scalar("double_value", 13, DOUBLE, oneof=True),
    _scalar("boolean_value", 14, BOOL, oneof=True),
    _scalar("string_value", 15, STRING, oneof=True),
    _scalar("bytes_value", 16, BYTES, oneof=True),
    _message("dataset_value", 17, "DataSet", oneof=True),
    _message("template_value", 18, "Template", oneof=True),
    _message("extension_value", 19, "Metric.MetricValueExtension", oneof=True),
], None, {"MetricValueExtension": ([], 1, {})})

_PAYLOAD: MessageSpec = ([
    _scalar("timestamp", 1, UINT64),
    _message("metrics", 2, "Metric", label=REPEATED),
    _scalar("seq", 3, UINT64),
    _scalar("uuid", 4, STRING),
    _scalar("body", 5, BYTES),
], 6, {
    "Template": _TEMPLATE,
    "DataSet": _DATASET,
    "PropertyValue": _PROPERTY_VALUE,
    "PropertySet": _PROPERTY_SET,
    "PropertySetList": _PROPERTY_SET_LIST,
    "MetaData": _METADATA,
    "Metric": _METRIC,
})


def _add_message(into: Any, name: str, spec: MessageSpec) -> None:
    fields, extensions_from, nested = spec
    msg = into.add(name=name)
    if any(f[5] for f in fields):
        msg.oneof_decl.add(name="value")
    for field_name, number, label, type_, type_name, oneof in fields:
        field = msg.field.add(name=field_name, number=number, label=label, type=type_)
        if type_name is not None:
            field.type_name = f".{PACKAGE}.Payload.{type_name}"
        if oneof:
            field.oneof_index = 0
    if extensions_from is not None:
        msg.extension_range.add(start=extensions_from, end=MAX_FIELD)
    for nested_name, nested_spec in nested.items():
        _add_message(msg.nested_type, nested_name, nested_spec)


def file_descriptor() -> Any:
    """``sparkplug_b.proto`` as a ``FileDescriptorProto``."""
    fd = descriptor_pb2.FileDescriptorProto(name=FILE_NAME, package=PACKAGE, syntax="proto2")
    enum = fd.enum_type.add(name="DataType")
    for member in DataType:
        enum.value.add(name=_ENUM_NAMES[member], number=member.value)
    _add_message(fd.message_type, "Payload", _PAYLOAD)
    return fd


POOL: Any = descriptor_pool.DescriptorPool()
POOL.Add(file_descriptor())


def _class(name: str) -> Any:
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


Payload: Any = _class("Payload")
Metric: Any = _class("Payload.Metric")
PropertySet: Any = _class("Payload.PropertySet")
PropertySetList: Any = _class("Payload.PropertySetList")
PropertyValue: Any = _class("Payload.PropertyValue")
MetaData: Any = _class("Payload.MetaData")
DataSet: Any = _class("Payload.DataSet")
Template: Any = _class("Payload.Template")

__all__ = ["POOL", "DataSet", "DataType", "DecodeError", "MetaData", "Metric", "Payload", "PropertySet",
           "PropertySetList", "PropertyValue", "Template", "file_descriptor"]
