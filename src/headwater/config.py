"""Settings: one TOML file in the data directory, overridden by the environment.

The file is ``headwater.toml`` inside the data directory.  Any setting can be
overridden with ``HEADWATER_<SECTION>_<NAME>`` (for example
``HEADWATER_SERVER_PORT=9000``); list settings take comma-separated values.
Settings are validated when loaded, and every error names the setting.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import tomli_w

from headwater.destinations.base import DestinationConfig

CONFIG_NAME = "headwater.toml"
DATA_DIR_ENV = "HEADWATER_DATA_DIR"
DEFAULT_DATA_DIR = "./headwater-data"


class ConfigError(Exception):
    """A setting is missing or invalid; the message names it."""


class ServerSettings(msgspec.Struct, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8088
    workers: int = 2
    trusted_proxies: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])
    # Bytes of requests waiting for the log before the gateway answers 503.
    max_pending_bytes: int = 64 * 1024 * 1024


class LimitSettings(msgspec.Struct, forbid_unknown_fields=True):
    max_message_bytes: int = 32 * 1024
    max_request_bytes: int = 500 * 1024
    max_batch_messages: int = 2500
    max_message_id_chars: int = 100
    # Event times later than receivedAt plus this many seconds are clamped.
    future_tolerance_seconds: int = 3600


class LogSettings(msgspec.Struct, forbid_unknown_fields=True):
    backend: str = "sqlite"
    # Log records older than this, and read by every consumer, are pruned.
    retention_hours: int = 168


class StoreSettings(msgspec.Struct, forbid_unknown_fields=True):
    backend: str = "duckdb"


class PipelineSettings(msgspec.Struct, forbid_unknown_fields=True):
    dedup_window_hours: int = 24
    batch_max_events: int = 20000
    idle_poll_ms: int = 20
    bot_detection: bool = True


class Source(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    write_key: str
    enabled: bool = True


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    limits: LimitSettings = msgspec.field(default_factory=LimitSettings)
    log: LogSettings = msgspec.field(default_factory=LogSettings)
    store: StoreSettings = msgspec.field(default_factory=StoreSettings)
    pipeline: PipelineSettings = msgspec.field(default_factory=PipelineSettings)
    sources: list[Source] = msgspec.field(default_factory=list)
    destinations: list[DestinationConfig] = msgspec.field(default_factory=list)

    def source_for_key(self, write_key: str) -> Source | None:
        for source in self.sources:
            if source.write_key == write_key:
                return source
        return None


_SECTIONS = ("server", "limits", "log", "store", "pipeline")
_BACKENDS = {"log.backend": ("sqlite",), "store.backend": ("duckdb",)}


def resolve_data_dir(explicit: str | None = None) -> Path:
    raw = explicit or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(raw).expanduser().resolve()


def config_path(data_dir: Path) -> Path:
    return data_dir / CONFIG_NAME


def new_write_key() -> str:
    return secrets.token_urlsafe(24)


def _env_overrides(raw: dict[str, Any], environ: dict[str, str]) -> None:
    defaults = msgspec.to_builtins(Settings())
    for section in _SECTIONS:
        for name, default in defaults[section].items():
            var = f"HEADWATER_{section}_{name}".upper()
            if var not in environ:
                continue
            text = environ[var]
            value: Any
            if isinstance(default, bool):
                if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ConfigError(f"{var}: expected true or false, got {text!r}")
                value = text.lower() in ("1", "true", "yes")
            elif isinstance(default, int):
                try:
                    value = int(text)
                except ValueError:
                    raise ConfigError(f"{var}: expected an integer, got {text!r}") from None
            elif isinstance(default, list):
                value = [part.strip() for part in text.split(",") if part.strip()]
            else:
                value = text
            raw.setdefault(section, {})[name] = value


def _validate(settings: Settings) -> None:
    for setting, allowed in _BACKENDS.items():
        section, name = setting.split(".")
        value = getattr(getattr(settings, section), name)
        if value not in allowed:
            raise ConfigError(f"{setting}: {value!r} is not one of {', '.join(allowed)}")
    if not 0 < settings.server.port < 65536:
        raise ConfigError(f"server.port: {settings.server.port} is not a TCP port")
    if settings.server.workers < 1:
        raise ConfigError("server.workers: must be at least 1")
    for index, cidr in enumerate(settings.server.trusted_proxies):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(
                f"server.trusted_proxies[{index}]: {cidr!r} is not an IP network"
            ) from None
    positive = {
        "limits.max_message_bytes": settings.limits.max_message_bytes,
        "limits.max_request_bytes": settings.limits.max_request_bytes,
        "limits.max_batch_messages": settings.limits.max_batch_messages,
        "pipeline.batch_max_events": settings.pipeline.batch_max_events,
        "pipeline.dedup_window_hours": settings.pipeline.dedup_window_hours,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name}: must be positive, got {value}")
    if settings.pipeline.dedup_window_hours < 24:
        raise ConfigError("pipeline.dedup_window_hours: must be at least 24")
    names: set[str] = set()
    keys: set[str] = set()
    for index, source in enumerate(settings.sources):
        if not source.name or source.name in names:
            raise ConfigError(f"sources[{index}].name: empty or repeated ({source.name!r})")
        if not source.write_key or source.write_key in keys:
            raise ConfigError(f"sources[{index}].write_key: empty or repeated")
        names.add(source.name)
        keys.add(source.write_key)
    destinations: set[str] = set()
    for index, destination in enumerate(settings.destinations):
        if not destination.name or destination.name in destinations:
            raise ConfigError(
                f"destinations[{index}].name: empty or repeated ({destination.name!r})"
            )
        destinations.add(destination.name)


def load(data_dir: Path, environ: dict[str, str] | None = None) -> Settings:
    """Read the settings file (defaults if absent), apply the environment, validate."""
    path = config_path(data_dir)
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path.name}: not valid TOML: {exc}") from None
    _env_overrides(raw, dict(os.environ) if environ is None else environ)
    try:
        settings = msgspec.convert(raw, Settings)
    except msgspec.ValidationError as exc:
        raise ConfigError(_name_setting(str(exc))) from None
    _validate(settings)
    return settings


def _name_setting(message: str) -> str:
    # msgspec reports paths as "... - at `$.server.port`"; name the setting plainly.
    text, _, where = message.partition(" - at `")
    if where:
        setting = where.rstrip("`").removeprefix("$.").removeprefix("$")
        return f"{setting or 'settings'}: {text}"
    return f"settings: {text}"


def save(data_dir: Path, settings: Settings) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = config_path(data_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(tomli_w.dumps(msgspec.to_builtins(settings)), encoding="utf-8")
    os.replace(tmp, path)


def init(data_dir: Path, source_name: str = "default") -> Settings:
    """Write a starter configuration with one source and a fresh write key."""
    if config_path(data_dir).exists():
        raise ConfigError(f"{config_path(data_dir)} already exists")
    settings = Settings(sources=[Source(name=source_name, write_key=new_write_key())])
    save(data_dir, settings)
    return settings
