"""Edge gateway: shop-floor PLCs to MQTT with a durable local buffer."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edge-gateway")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
