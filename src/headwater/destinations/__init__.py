"""Destinations: where events go after the pipeline."""

from __future__ import annotations

import importlib
from pathlib import Path

from headwater.destinations.base import (
    BatchSettings,
    ConfigurationError,
    Destination,
    DestinationConfig,
)
from headwater.destinations.routing import validate_filters

__all__ = [
    "KINDS",
    "WAREHOUSE_KINDS",
    "ConfigurationError",
    "Destination",
    "DestinationConfig",
    "build",
]

# kind -> (module, class, the default name in a message's integrations object)
KINDS: dict[str, tuple[str, str, str]] = {
    "webhook": ("headwater.destinations.webhook", "Webhook", "Webhooks"),
    "postgres": ("headwater.destinations.postgres", "Postgres", "Postgres"),
    "mixpanel": ("headwater.destinations.mixpanel", "Mixpanel", "Mixpanel"),
    "amplitude": ("headwater.destinations.amplitude", "Amplitude", "Amplitude"),
    "kafka": ("headwater.destinations.kafka", "Kafka", "Kafka"),
    "files": ("headwater.destinations.files", "Files", "Files"),
}


# Kinds whose settings may hold paths relative to the data directory.
FILE_KINDS = frozenset({"files"})

# Kinds that receive events even when a message's integrations say All: false.
WAREHOUSE_KINDS = frozenset({"postgres", "files"})


def build(config: DestinationConfig, data_dir: Path | None = None) -> Destination:
    """A destination from its configuration; ``ConfigurationError`` names the setting.

    Kinds that keep files resolve relative paths against ``data_dir``.
    """
    if config.kind not in KINDS:
        raise ConfigurationError(
            f"destinations.{config.name}.kind: {config.kind!r} is not one of"
            f" {', '.join(sorted(KINDS))}"
        )
    module_name, class_name, integration_name = KINDS[config.kind]
    if not config.integration_name:
        config.integration_name = integration_name
    validate_filters(config)
    module = importlib.import_module(module_name)
    factory = getattr(module, class_name)
    # A kind may batch differently by default (warehouses load thousands at once);
    # batch settings left at the general defaults take the kind's.
    kind_batch = getattr(factory, "default_batch", None)
    if kind_batch is not None and config.batch == BatchSettings():
        config.batch = kind_batch
    if config.kind in FILE_KINDS:
        destination: Destination = factory(config, data_dir)
    else:
        destination = factory(config)
    return destination
