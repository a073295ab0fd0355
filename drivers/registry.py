"""``protocol:`` name -> driver, built from the tag map. Construction never touches the network."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.model import Transform
from gateway.tagmap import ModbusTag

from . import Driver
from .modbus.decode import TagSpec, register_format
from .modbus.driver import ModbusTcpDriver
from .modbus.planner import Limits

if TYPE_CHECKING:
    from gateway.tagmap import ModbusTcpDevice, TagMap


def build_driver(tag_map: TagMap, device_id: str) -> Driver:
    device = tag_map.device(device_id)
    builders = {"modbus_tcp": _modbus_tcp}
    return builders[device.protocol](tag_map, device)


def _modbus_tcp(tag_map: TagMap, device: ModbusTcpDevice) -> ModbusTcpDriver:
    specs = []
    for asset, name, tag in tag_map.bindings(device.id):
        assert isinstance(tag, ModbusTag)  # cross_check guarantees a Modbus device has Modbus tags
        fmt = register_format(
            tag.type, tag.count, tag.byte_order or device.byte_order,
            tag.word_order or device.word_order, tag.bit,
        )
        specs.append(TagSpec(
            asset=asset.id, tag=name,
            unit=tag.unit_id if tag.unit_id is not None else device.unit,
            table=tag.table, address=tag.address, fmt=fmt,
            transform=Transform(tag.scale, tag.offset, tag.enum),
        ))
    return ModbusTcpDriver(
        device_id=device.id, host=device.host, port=device.port, timeout=device.timeout,
        tags=specs, limits=Limits(device.max_gap, device.max_registers, device.max_bits),
    )
