"""Every metric of the gateway, on a registry of its own (one gateway per registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from . import __version__


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.polls = Counter("gateway_device_polls", "Poll cycles completed", ["device"], registry=r)
        self.poll_errors = Counter(
            "gateway_device_errors", "Device failures by kind (unreachable, timeout, exception, bad_reply, "
            "bad_value, ...)", ["device", "kind"], registry=r
        )
        self.poll_latency = Histogram(
            "gateway_device_poll_duration_seconds", "Time to read all of a device's tags",
            ["device"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )
        self.poll_overruns = Counter(
            "gateway_device_poll_overruns", "Cycles skipped because a poll outlasted its interval",
            ["device"], registry=r,
        )
        self.internal_errors = Counter(
            "gateway_internal_errors", "Unexpected exceptions contained in one part of the gateway (a device's "
            "poller, the pipeline, an output); the traceback is logged once per outage", ["component"], registry=r,
        )
        self.device_connected = Gauge(
            "gateway_device_connected", "1 while the device connection is up", ["device"], registry=r
        )
        self.readings = Counter(
            "gateway_readings", "Readings taken, by quality", ["asset", "quality"], registry=r
        )
        self.buffer_rows = Gauge("gateway_buffer_rows", "Messages waiting in the buffer", registry=r)
        self.buffer_bytes = Gauge("gateway_buffer_bytes", "Payload bytes waiting in the buffer", registry=r)
        self.buffer_oldest_age = Gauge("gateway_buffer_oldest_age_seconds", "Age of the oldest waiting message",
                                       registry=r)
        self.buffer_disk_free = Gauge("gateway_buffer_disk_free_bytes", "Free bytes on the buffer's filesystem",
                                      registry=r)
        self.buffer_limit = Gauge("gateway_buffer_limit_bytes", "Bytes the buffer's database may take, by limit: "
                                  "the configured cap (max_size) and what the disk can hold", ["limit"], registry=r)
        self.buffer_limited_by = Gauge("gateway_buffer_limited_by", "1 for the limit in force (the smaller of cap "
                                       "and disk), 0 for the other", ["limit"], registry=r)
        self.buffer_files = Gauge("gateway_buffer_file_bytes", "Bytes the buffer's files take on the disk, by file "
                                  "(database, wal, reserve)", ["file"], registry=r)
        self.alarms_active = Gauge("gateway_alarms_active", "Alarms not in normal state, by severity",
                                   ["severity"], registry=r)
        for severity in ("low", "medium", "high", "critical"):
            self.alarms_active.labels(severity).set(0)
        self.alarm_transitions = Counter("gateway_alarm_transitions", "Alarm state changes, by new state",
                                         ["severity", "state"], registry=r)
        self.commands = Counter("gateway_commands", "Operator commands, by result (ok, refused, rejected)",
                                ["command", "result"], registry=r)
        self.buffer_errors = Counter(
            "gateway_buffer_errors", "Buffer writes or deletes that failed", ["op"], registry=r
        )
        self.drops = Counter("gateway_buffer_drops", "Messages dropped, by reason (cap, disk_full, buffer_error) "
                             "and kind (telemetry, event, alert)", ["reason", "kind"], registry=r)
        self.publishes = Counter("gateway_mqtt_publishes", "Messages acknowledged by the broker",
                                 ["kind"], registry=r)
        self.inflight = Gauge("gateway_mqtt_inflight", "QoS 1 messages awaiting PUBACK", registry=r)
        self.broker_connected = Gauge("gateway_mqtt_connected", "1 while connected", registry=r)
        self.reconnects = Counter("gateway_mqtt_reconnects", "Broker connection attempts that failed",
                                  registry=r)
        self.delivery_latency = Histogram(
            "gateway_delivery_latency_seconds", "Buffer commit to PUBACK, per message", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 300, 3600),
        )
        Info("gateway_build", "Build information", registry=r).info({"version": __version__})
