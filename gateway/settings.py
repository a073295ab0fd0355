"""Process settings from the environment (prefix EDGE_GATEWAY_); secrets never live in the tag map."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGE_GATEWAY_", extra="ignore")

    config: Path = Path("config/plant.yaml")
    mqtt_password: SecretStr | None = None
    opcua_password: SecretStr | None = None
    buffer_path: Path | None = None
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    http_address: str = "127.0.0.1:9108"  # /metrics and /healthz; "off" disables
    event_loop: Literal["auto", "asyncio", "uvloop"] = "asyncio"  # uvloop: the optional [speed] extra

    def default_buffer_path(self) -> Path:
        """systemd's StateDirectory= when set, else ./var next to where the gateway runs."""
        state = os.environ.get("STATE_DIRECTORY")
        base = Path(state.split(":")[0]) if state else Path("var")
        return base / "buffer.sqlite"
