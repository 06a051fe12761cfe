"""Recording refused requests off the request path.

Handlers hand a refusal to ``RejectionRecorder.add`` and answer at once; a
thread writes what is queued to the rejection log a few times a second.  The
queue is bounded: under a flood of bad requests the oldest unrecorded ones
are dropped (and counted) rather than growing memory.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from headwater.log.rejections import Rejected
from headwater.state.base import RejectionStore

log = logging.getLogger("headwater.gateway")


class RejectionRecorder:
    def __init__(self, open_log: Callable[[], RejectionStore], capacity: int = 1000) -> None:
        self.open_log = open_log
        self._queue: deque[Rejected] = deque(maxlen=capacity)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rejections", daemon=True)
        self.dropped = 0

    def start(self) -> None:
        self._thread.start()

    def add(self, rejected: Rejected) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(rejected)
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        rejections: RejectionStore | None = None
        try:
            while not self._stop.is_set() or self._queue:
                self._wake.wait(0.25)
                self._wake.clear()
                batch = []
                while self._queue:
                    batch.append(self._queue.popleft())
                if not batch:
                    continue
                try:
                    if rejections is None:
                        rejections = self.open_log()
                    rejections.record(batch)
                except Exception as exc:  # a full disk must not take the gateway down
                    log.warning("could not record %d refused requests: %s", len(batch), exc)
        finally:
            if rejections is not None:
                rejections.close()
