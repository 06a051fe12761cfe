"""Group commit: requests waiting on the log share one durable transaction.

Handlers call ``await committer.append(entry)``.  A single writer thread takes
everything queued since its last commit, appends it in one transaction and
then wakes every waiting handler at once.  The bytes waiting are bounded:
past the bound ``append`` raises ``Overloaded`` at once, so memory stays flat
and the client is told to retry.  While appends fail (a full disk), the idle
writer probes the log about once a second, so readiness comes back by itself.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable

from headwater.log.base import Entry, EventLogWriter, LogFull

PROBE_SECONDS = 1.0


class Overloaded(Exception):
    """Too much is waiting for the log; retry later."""


class Committer:
    def __init__(
        self,
        open_writer: Callable[[], EventLogWriter],
        max_pending_bytes: int,
        max_group: int = 2000,
    ) -> None:
        self._open_writer = open_writer
        self._max_pending = max_pending_bytes
        self._max_group = max_group
        self._queue: deque[tuple[Entry, asyncio.Future[None]]] = deque()
        self._pending_bytes = 0
        self._waiting = False
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.healthy = True
        self.last_error = ""

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    async def append(self, entry: Entry) -> None:
        assert self._loop is not None
        size = len(entry.payload)
        future: asyncio.Future[None] = self._loop.create_future()
        with self._cond:
            if self._closing:
                raise Overloaded("shutting down")
            if self._pending_bytes + size > self._max_pending and self._queue:
                raise Overloaded("too much waiting for the log")
            self._pending_bytes += size
            self._queue.append((entry, future))
            if self._waiting:  # the writer is idle; while it writes, it takes the queue after
                self._cond.notify()
        await future

    def close(self) -> None:
        """Finish everything queued, then stop the writer."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def _next_group(self) -> list[tuple[Entry, asyncio.Future[None]]] | None:
        """Wait for work; None once closed, an empty group when it is time to probe."""
        with self._cond:
            while not self._queue and not self._closing:
                # While appends fail, readiness must come back without traffic.
                timeout = None if self.healthy else PROBE_SECONDS
                self._waiting = True
                try:
                    woken = self._cond.wait(timeout)
                finally:
                    self._waiting = False
                if not woken and not self._queue:
                    return []
            group: list[tuple[Entry, asyncio.Future[None]]] = []
            while self._queue and len(group) < self._max_group:
                group.append(self._queue.popleft())
            return group or None

    def _run(self) -> None:
        while True:
            try:
                writer = self._open_writer()
                break
            except Exception as exc:  # the log cannot even be opened: fail requests, retry
                self.healthy = False
                self.last_error = f"cannot open the log: {exc}"
                group = self._next_group()
                if group is None:
                    return
                self._finish(group, LogFull(self.last_error))
                time.sleep(PROBE_SECONDS)
        try:
            while (group := self._next_group()) is not None:
                if not group:
                    try:
                        writer.probe()
                        self.healthy = True
                    except LogFull as exc:
                        self.last_error = str(exc)
                    continue
                error: Exception | None = None
                try:
                    writer.append([entry for entry, _ in group])
                    self.healthy = True
                except Exception as exc:  # LogFull, or anything unexpected: never hang
                    error = exc
                    self.healthy = False
                    self.last_error = str(exc)
                self._finish(group, error)
        finally:
            writer.close()

    def _finish(
        self, group: list[tuple[Entry, asyncio.Future[None]]], error: Exception | None
    ) -> None:
        with self._cond:
            self._pending_bytes -= sum(len(entry.payload) for entry, _ in group)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_settle, [f for _, f in group], error)


def _settle(futures: list[asyncio.Future[None]], error: Exception | None) -> None:
    for future in futures:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(LogFull(str(error)))
