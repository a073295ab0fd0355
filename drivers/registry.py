"""``protocol:`` name -> driver, built from the tag map. Construction never touches the network."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.model import Transform
from gateway.settings import Settings
from gateway.tagmap import ModbusTag, OpcUaDevice, OpcUaTag

from . import Driver
from .modbus.decode import TagSpec, register_format
from .modbus.driver import ModbusTcpDriver
from .modbus.planner import Limits

if TYPE_CHECKING:
    from gateway.tagmap import ModbusTcpDevice, TagMap

    from .opcua import OpcUaDriver


def build_driver(tag_map: TagMap, device_id: str, settings: Settings | None = None) -> Driver:
    device = tag_map.device(device_id)
    if isinstance(device, OpcUaDevice):
        return _opcua(tag_map, device, settings or Settings())
    return _modbus_tcp(tag_map, device)


def _opcua(tag_map: TagMap, device: OpcUaDevice, settings: Settings) -> OpcUaDriver:
    from .opcua import OpcTagSpec, OpcUaDriver, Security

    specs = []
    for asset, name, tag in tag_map.bindings(device.id):
        assert isinstance(tag, OpcUaTag)  # cross_check guarantees an OPC-UA device has OPC-UA tags
        specs.append(OpcTagSpec(asset=asset.id, tag=name, node=tag.node,
                                transform=Transform(tag.scale, tag.offset, tag.enum),
                                expected=tag.type,
                                # the server's filter: a percent of the node's EURange, or an absolute band
                                deadband=tag.deadband_percent if device.deadband_type == "percent" else tag.deadband))
    password = None
    if settings.opcua_password is not None:
        password = settings.opcua_password.get_secret_value()
    elif device.password_file is not None:
        password = device.password_file.read_text(encoding="utf-8").strip()
    sec = device.security
    return OpcUaDriver(
        device_id=device.id, endpoint=device.endpoint, mode=device.mode, interval=device.interval,
        timeout=device.timeout, tags=specs, sampling_interval=device.sampling_interval,
        queue_size=device.queue_size, deadband_type=device.deadband_type,
        max_nodes_per_read=device.max_nodes_per_read, recheck=device.recheck,
        username=device.username, password=password,
        security=Security(sec.mode, sec.policy, sec.certificate, sec.private_key, sec.server_certificate,
                          sec.application_uri),
    )


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
