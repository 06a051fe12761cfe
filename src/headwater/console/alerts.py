"""Anomaly alerts: checked every minute, posted once each to an optional webhook.

The console shows the anomalies of the current report; this loop also sends
each new one (by kind and subject, once per hour it persists) to
``report.alert_webhook`` as JSON.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

log = logging.getLogger("headwater.alerts")


class AlertLoop:
    def __init__(
        self,
        find: Callable[[], list[dict[str, Any]]],
        webhook: str,
        stop: threading.Event,
        interval_s: float = 60.0,
    ) -> None:
        self.find = find
        self.webhook = webhook
        self.stop = stop
        self.interval_s = interval_s
        self.sent: dict[tuple[str, str], int] = {}
        self.active: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self.run, name="alerts", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def check(self) -> list[dict[str, Any]]:
        """Find anomalies; post the new ones; return what was posted."""
        self.active = self.find()
        hour = time.time_ns() // 3_600_000_000_000
        fresh = [a for a in self.active if self.sent.get((a["kind"], a["subject"])) != hour]
        if fresh and self.webhook:
            try:
                response = httpx.post(self.webhook, json={"alerts": fresh}, timeout=10)
                response.raise_for_status()
            except httpx.HTTPError as exc:
                log.warning("alert webhook failed: %s", exc)
                return []
        for alert in fresh:
            self.sent[(alert["kind"], alert["subject"])] = hour
        return fresh

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:
                log.exception("anomaly check failed")
