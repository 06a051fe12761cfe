"""Which events reach which destination, and in what shape.

Order of decisions for one event and one destination:
1. bots, when the destination excludes them;
2. consent (``context.consent.categoryPreferences``), before everything else
   the sender controls: a destination mapped to categories receives the event
   only if every one of them is true; no consent object means no enforcement;
3. the ``integrations`` object: ``All`` covers unnamed destinations, names are
   case-sensitive, objects count as enabled, warehouses ignore ``All: false``;
4. the destination's filters, in order: ``drop``, ``allow``, ``sample`` and
   ``drop_properties``, each with an optional condition on event fields.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

from headwater.destinations.base import ConfigurationError, DestinationConfig

FILTER_ACTIONS = frozenset({"drop", "allow", "sample", "drop_properties"})
OPERATORS = frozenset(
    {"eq", "ne", "in", "not_in", "contains", "starts_with", "exists", "not_exists", "gt", "lt"}
)


def field_value(event: dict[str, Any], path: str) -> Any:
    node: Any = event
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _compare(op: str, actual: Any, expected: Any) -> bool:
    if op == "exists":
        return actual is not None
    if op == "not_exists":
        return actual is None
    if op == "eq":
        return bool(actual == expected)
    if op == "ne":
        return bool(actual != expected)
    if op == "in":
        return actual in expected
    if op == "not_in":
        return actual not in expected
    if op == "contains":
        return isinstance(actual, str | list) and expected in actual
    if op == "starts_with":
        return isinstance(actual, str) and actual.startswith(expected)
    if isinstance(actual, int | float) and isinstance(expected, int | float):
        return actual > expected if op == "gt" else actual < expected
    return False


def matches(event: dict[str, Any], condition: dict[str, Any] | None) -> bool:
    """``{"field": "properties.plan", "op": "eq", "value": "pro"}``, or
    ``{"all": [...]}`` / ``{"any": [...]}`` / ``{"not": {...}}``; none matches all."""
    if not condition:
        return True
    if "all" in condition:
        return all(matches(event, c) for c in condition["all"])
    if "any" in condition:
        return any(matches(event, c) for c in condition["any"])
    if "not" in condition:
        return not matches(event, condition["not"])
    return _compare(
        condition.get("op", "eq"), field_value(event, condition["field"]), condition.get("value")
    )


def _check_condition(condition: Any, where: str) -> None:
    if condition is None:
        return
    if not isinstance(condition, dict):
        raise ConfigurationError(f"{where}: a condition must be a table")
    for key in ("all", "any"):
        if key in condition:
            for i, part in enumerate(condition[key]):
                _check_condition(part, f"{where}.{key}[{i}]")
            return
    if "not" in condition:
        _check_condition(condition["not"], f"{where}.not")
        return
    if not isinstance(condition.get("field"), str):
        raise ConfigurationError(f"{where}.field: required (a dotted event path)")
    if condition.get("op", "eq") not in OPERATORS:
        raise ConfigurationError(
            f"{where}.op: {condition.get('op')!r} is not one of {', '.join(sorted(OPERATORS))}"
        )


def validate_filters(config: DestinationConfig) -> None:
    for index, rule in enumerate(config.filters):
        where = f"destinations.{config.name}.filters[{index}]"
        action = rule.get("action")
        if action not in FILTER_ACTIONS:
            raise ConfigurationError(
                f"{where}.action: {action!r} is not one of {', '.join(sorted(FILTER_ACTIONS))}"
            )
        _check_condition(rule.get("if"), f"{where}.if")
        if action == "sample":
            rate = rule.get("rate")
            if not isinstance(rate, int | float) or not 0 <= rate <= 1:
                raise ConfigurationError(f"{where}.rate: a number between 0 and 1 is required")
        if action == "drop_properties" and not isinstance(rule.get("properties"), list):
            raise ConfigurationError(f"{where}.properties: a list of property names is required")


def _sampled(message_id: str, rate: float) -> bool:
    digest = hashlib.blake2b(message_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < rate


class Router:
    def __init__(self, config: DestinationConfig, is_warehouse: bool) -> None:
        self.config = config
        self.is_warehouse = is_warehouse
        self.integration_name = config.integration_name or config.name
        self.categories = config.consent_categories

    def route(self, item: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
        """The event to send (possibly reshaped), or None and the filter reason."""
        event: dict[str, Any] = item["event"]
        if self.config.exclude_bots and item.get("bot"):
            return None, "bot"
        if not self._consented(event):
            return None, "consent"
        if not self._enabled(event.get("integrations")):
            return None, "integrations"
        for index, rule in enumerate(self.config.filters):
            if not matches(event, rule.get("if")):
                if rule["action"] == "allow":
                    return None, f"filter[{index}]:allow"
                continue
            action = rule["action"]
            if action == "drop":
                return None, f"filter[{index}]:drop"
            if action == "sample" and not _sampled(str(event.get("messageId")), rule["rate"]):
                return None, f"filter[{index}]:sample"
            if action == "drop_properties":
                event = _without_properties(event, rule["properties"])
        return event, ""

    def _consented(self, event: dict[str, Any]) -> bool:
        consent = field_value(event, "context.consent")
        if not isinstance(consent, dict) or "categoryPreferences" not in consent:
            return True
        preferences = consent.get("categoryPreferences")
        if not isinstance(preferences, dict):
            return True
        return all(preferences.get(category) is True for category in self.categories)

    def _enabled(self, integrations: Any) -> bool:
        if not isinstance(integrations, dict):
            return True
        if self.integration_name in integrations:
            return integrations[self.integration_name] is not False
        if self.is_warehouse:
            return True
        return integrations.get("All", True) is not False


def _without_properties(event: dict[str, Any], names: list[str]) -> dict[str, Any]:
    event = copy.copy(event)
    for key in ("properties", "traits"):
        if isinstance(event.get(key), dict):
            event[key] = {k: v for k, v in event[key].items() if k not in names}
    return event
