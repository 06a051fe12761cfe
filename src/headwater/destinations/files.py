"""Files destination: an archive of every event as Parquet or JSON Lines.

Layout::

    {path}/date=YYYY-MM-DD/event=<name>/part-<digest>.<ext>

``date`` is the day of the event's ``timestamp`` in UTC (``receivedAt`` if
the timestamp is missing, ``unknown`` if neither parses).  ``<name>`` is the
track event's name, or the message type for other calls, normalised: NFKC,
case-folded, every run of characters other than letters and digits turned
into ``_`` (so ``Order Completed`` becomes ``order_completed``); an empty or
very long name gets a short digest of the original so that it stays unique.
A track event named like a type (``page``) shares that type's directory; the
``type`` column tells them apart.

One batch becomes one file per partition it touches.  A file's name is a
digest of the ``messageId`` and ``receivedAt`` of the events in it, in order,
so a batch delivered again after a crash (delivery is at least once) replaces
its own file instead of adding a second copy of its events.  Every file is
written to a hidden temporary file in its directory, fsynced, renamed into
place and the directory fsynced, so a reader never sees half a file; newly
created directories are fsynced into their parents too.

Formats:

``jsonl``
    One event per line, exactly the JSON the destination received
    (compression ``none`` or ``gzip``; extension ``.jsonl`` or ``.jsonl.gz``).

``parquet``
    One row per event (compression ``zstd`` by default; also ``snappy``,
    ``gzip``, ``brotli``, ``lz4`` or ``none``).  The top-level Segment fields
    are columns under their Segment names: ``messageId``, ``type``, ``event``,
    ``name``, ``userId``, ``anonymousId``, ``groupId`` and ``previousId`` as
    strings; ``timestamp``, ``originalTimestamp``, ``sentAt`` and
    ``receivedAt`` as ``timestamp[ms, UTC]``.  ``properties``, ``traits``,
    ``context`` and ``integrations`` are JSON text: their shape differs from
    event to event and changes over time, which a fixed Parquet schema cannot
    follow without files that disagree with each other, and JSON text keeps
    what typed columns would not (integers beyond 64 bits, mixed types under
    one key, any key name).  Every other top-level key, and any value that
    does not fit its column's type, goes into ``extra`` as a JSON object, so
    the columns together hold the whole event.

Readers: the file column ``event`` holds the exact name, the directory only
the normalised one.  DuckDB reads ``date=``/``event=`` directories as Hive
partitions by default and then *replaces* the ``event`` column with the
directory's value, so read with ``hive_partitioning = false``; likewise, with
pyarrow use ``pyarrow.dataset.dataset(path, format="parquet")`` (no Hive
partitioning) rather than ``pyarrow.parquet.read_table(path)``.

``path`` must be absolute (``~`` is expanded); it is created when missing.
A full disk, a missing permission or any other error of the file system is
reported as retryable, so the delivery loop retries and in the end
dead-letters the batch.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import re
import threading
import unicodedata
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from headwater.destinations.base import ConfigurationError, DestinationConfig, Outcome
from headwater.spec.timestamps import format_ms, parse_ms

_encode = msgspec.json.Encoder().encode
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

FORMATS = {
    "parquet": ("zstd", "snappy", "gzip", "brotli", "lz4", "none"),
    "jsonl": ("none", "gzip"),
}
STRING_COLUMNS = (
    "messageId",
    "type",
    "event",
    "name",
    "userId",
    "anonymousId",
    "groupId",
    "previousId",
)
TIME_COLUMNS = ("timestamp", "originalTimestamp", "sentAt", "receivedAt")
JSON_COLUMNS = ("properties", "traits", "context", "integrations")
COLUMNS = frozenset(STRING_COLUMNS + TIME_COLUMNS + JSON_COLUMNS)
TIME_TYPE = pa.timestamp("ms", tz="UTC")
SCHEMA = pa.schema(
    [pa.field(c, pa.string()) for c in STRING_COLUMNS]
    + [pa.field(c, TIME_TYPE) for c in TIME_COLUMNS]
    + [pa.field(c, pa.string()) for c in JSON_COLUMNS]
    + [pa.field("extra", pa.string())]
)
MAX_NAME_BYTES = 100
_SEPARATORS = re.compile(r"[\W_]+")
_TEMP = re.compile(r"^\.part-.+\.(\d+)\.\d+\.tmp$")


class FilesSettings(msgspec.Struct, forbid_unknown_fields=True):
    path: str
    format: str = "parquet"
    compression: str = ""  # empty: zstd for parquet, none for jsonl


def _digest(text: str, size: int) -> str:
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()


def partition_name(event: dict[str, Any]) -> str:
    """The ``event=`` directory of an event: its normalised name, or its type."""
    kind = event.get("type")
    raw = event.get("event") if kind == "track" else kind
    if not isinstance(raw, str):
        raw = kind if isinstance(kind, str) else ""
    name = _SEPARATORS.sub("_", unicodedata.normalize("NFKC", raw).casefold()).strip("_")
    if name and len(name.encode()) <= MAX_NAME_BYTES:
        return name
    name = name.encode()[: MAX_NAME_BYTES - 9].decode("utf-8", "ignore")
    return f"{name.rstrip('_') or 'event'}_{_digest(raw, 4)}"


def partition_date(event: dict[str, Any]) -> str:
    """``YYYY-MM-DD`` of the event's timestamp in UTC (else receivedAt, else unknown)."""
    for key in ("timestamp", "receivedAt"):
        value = event.get(key)
        ms = parse_ms(value) if isinstance(value, str) else None
        if ms is not None:
            try:
                day = _EPOCH + timedelta(milliseconds=ms)
            except OverflowError:
                continue
            return f"{day.year:04d}-{day.month:02d}-{day.day:02d}"
    return "unknown"


def file_stem(events: list[dict[str, Any]]) -> str:
    """``part-<digest>`` from the messageIds and receivedAt of the events, in order."""
    ids = "\n".join(f"{e.get('messageId')}\t{e.get('receivedAt')}" for e in events)
    return "part-" + _digest(ids, 16)


def _time_ms(value: Any) -> int | None:
    """Milliseconds of a canonical ``YYYY-MM-DDTHH:MM:SS.sssZ`` string, else None."""
    if not isinstance(value, str):
        return None
    ms = parse_ms(value)
    if ms is None or format_ms(ms) != value:
        return None
    return ms


def parquet_table(events: list[dict[str, Any]]) -> pa.Table:
    columns: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
    for event in events:
        row: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in event.items():
            if key not in COLUMNS:
                extra[key] = value
            elif key in JSON_COLUMNS:
                row[key] = _encode(value).decode()
            elif key in TIME_COLUMNS:
                ms = _time_ms(value)
                if ms is None:
                    extra[key] = value
                else:
                    row[key] = ms
            elif isinstance(value, str):
                row[key] = value
            else:
                extra[key] = value
        row["extra"] = _encode(extra).decode() if extra else None
        for name, values in columns.items():
            values.append(row.get(name))
    return pa.table(columns, schema=SCHEMA)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(directory: Path) -> None:
    """Create a directory and its missing parents, each fsynced into its parent."""
    if directory.is_dir():
        return
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
        _fsync_dir(path.parent)


def write_atomic(directory: Path, name: str, data: bytes) -> None:
    """Write ``directory/name`` through a temporary file, fsync and rename."""
    temp = directory / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_dir(directory)


def sweep_temporary(directory: Path) -> None:
    """Remove temporary files that another (crashed) process left in a directory."""
    pid = str(os.getpid())
    with os.scandir(directory) as entries:
        for entry in entries:
            match = _TEMP.match(entry.name)
            if match and match.group(1) != pid:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


class Files:
    is_warehouse = True

    def __init__(self, config: DestinationConfig, data_dir: Path | None = None) -> None:
        self.config = config
        where = f"destinations.{config.name}.settings"
        try:
            self.settings = msgspec.convert(config.settings, FilesSettings)
        except msgspec.ValidationError as exc:
            raise ConfigurationError(f"{where}: {exc}") from None
        settings = self.settings
        if settings.format not in FORMATS:
            raise ConfigurationError(f"{where}.format: parquet or jsonl")
        allowed = FORMATS[settings.format]
        self.compression = settings.compression or allowed[0]
        if self.compression not in allowed:
            raise ConfigurationError(
                f"{where}.compression: for {settings.format}, one of {', '.join(allowed)}"
            )
        if not settings.path:
            raise ConfigurationError(f"{where}.path: a directory is required")
        root = Path(settings.path).expanduser()
        if not root.is_absolute():
            if data_dir is None:
                raise ConfigurationError(f"{where}.path: an absolute directory is required")
            root = data_dir / root
        self.root = root
        if settings.format == "jsonl":
            self.extension = "jsonl.gz" if self.compression == "gzip" else "jsonl"
        else:
            self.extension = "parquet"
        self._swept: set[Path] = set()

    def check(self) -> None:
        probe = self.root / f".part-check.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            ensure_dir(self.root)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigurationError(
                f"destinations.{self.config.name}: cannot write to {self.root}: {exc}"
            ) from None

    def encode(self, events: list[dict[str, Any]]) -> bytes:
        """The bytes of one file holding these events."""
        if self.settings.format == "jsonl":
            data = b"".join(_encode(event) + b"\n" for event in events)
            if self.compression == "gzip":
                data = gzip.compress(data, compresslevel=6, mtime=0)
            return data
        sink = pa.BufferOutputStream()
        pq.write_table(parquet_table(events), sink, compression=self.compression)
        result: bytes = sink.getvalue().to_pybytes()
        return result

    def partitions(self, events: list[dict[str, Any]]) -> dict[Path, list[dict[str, Any]]]:
        groups: dict[Path, list[dict[str, Any]]] = {}
        for event in events:
            directory = (
                self.root / f"date={partition_date(event)}" / f"event={partition_name(event)}"
            )
            groups.setdefault(directory, []).append(event)
        return groups

    def deliver(self, events: list[dict[str, Any]]) -> Outcome:
        try:
            for directory, group in self.partitions(events).items():
                data = self.encode(group)
                ensure_dir(directory)
                if directory not in self._swept:
                    sweep_temporary(directory)
                    if len(self._swept) >= 10_000:
                        self._swept.clear()
                    self._swept.add(directory)
                write_atomic(directory, f"{file_stem(group)}.{self.extension}", data)
        except OSError as exc:
            return Outcome("retryable", 0, f"{type(exc).__name__}: {exc}")
        return Outcome.delivered()

    def close(self) -> None:
        pass
