"""Exact de-duplication by (source, messageId) over a time window.

The window is kept in memory and rebuilt from the store at start: the store
writes events and its log offset in one transaction, so what it holds is
exactly what has been accepted as new.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class DedupWindow:
    def __init__(self, window_ms: int) -> None:
        self.window_ms = window_ms
        self._seen: dict[str, int] = {}
        self._order: deque[tuple[int, str]] = deque()

    @staticmethod
    def key(source: str, message_id: str) -> str:
        return f"{source}\x1f{message_id}"

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, key: str) -> bool:
        return key in self._seen

    def add(self, key: str, received_ms: int) -> None:
        if key not in self._seen:
            self._seen[key] = received_ms
            self._order.append((received_ms, key))

    def load(self, keys: Iterable[tuple[str, str, int]]) -> None:
        for source, message_id, received_ms in keys:
            self.add(self.key(source, message_id), received_ms)

    def expire(self, now_ms: int) -> None:
        horizon = now_ms - self.window_ms
        order = self._order
        while order and order[0][0] < horizon:
            _, key = order.popleft()
            if self._seen.get(key, horizon) < horizon:
                del self._seen[key]
