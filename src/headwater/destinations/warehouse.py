"""Segment's warehouse layout: the tables, columns and values an event becomes.

This module knows nothing about a database; ``headwater.destinations.postgres``
creates what it describes and loads it.

Tables
    ``tracks`` (every track call: the common columns, ``event`` (the name of
    the event's table) and ``event_text`` (the name as sent)); one table per
    track event, named after the event (``Order Completed`` ->
    ``order_completed``), with the tracks columns plus the properties;
    ``identifies`` (common columns plus the traits); ``users`` (one row per
    ``userId``: a trait from a newer identify, by ``received_at``, replaces the
    stored one, an older identify only fills traits still missing);
    ``pages`` and ``screens`` (plus ``name``, ``category`` and the
    properties); ``groups`` (plus ``group_id`` and the traits); ``aliases``
    (plus ``previous_id``); and ``discards`` (``table_name``,
    ``column_name``, ``column_value``, ``reason``, ``message_id``,
    ``received_at``, ``uuid_ts``: values that were not stored, and why).

Common columns
    ``id`` (the messageId; the primary key), ``received_at``, ``sent_at``,
    ``timestamp``, ``original_timestamp``, ``user_id``, ``anonymous_id``,
    ``uuid_ts`` (when the row was loaded) and ``context_*``: the context object
    flattened with a ``context_`` prefix.  ``type``, ``channel``, ``version``
    and ``integrations`` are not stored, as in Segment's warehouses.  The
    ``users`` table has ``id`` (the userId), ``received_at`` and ``uuid_ts``.

Names
    1. Snake case as Segment does (``segmentio/go-snakecase``): only ASCII
       letters and digits count, every other character separates words, a word
       is a run of capitals or digits followed by a run of lower case or digits
       (``accountType`` -> ``account_type``, ``Base64Encode`` ->
       ``base64_encode``, ``userID`` -> ``user_id``), and words are joined by
       ``_`` in lower case.  A name already in snake case is kept as it is,
       a single leading ``_`` included.
    2. Nested keys are joined with ``_`` (``address.street`` ->
       ``address_street``).
    3. A name that starts with a digit, or is a PostgreSQL reserved word
       (``select``, ``user``, ``order``...), gets a ``_`` prefix; so does an
       event table named like one of the tables above (``users`` ->
       ``_users``) and a schema starting with ``pg_``.
    4. A name with no ASCII letter or digit becomes ``_`` plus 8 hex digits of
       a BLAKE2b hash of the original name.
    5. A name longer than 63 bytes (PostgreSQL's limit, which would otherwise
       truncate silently) keeps its first 54 characters, then ``_`` and 8 hex
       digits of a hash of the whole name.
    6. When two keys of one event give the same column (``orderId`` and
       ``order_id``), the key already spelt like the column wins, else the
       key whose dotted path sorts first; the others are written to
       ``discards`` with the reason.  Across events such keys share a column.

Reserved columns (field case BC-22)
    A property or trait whose column is one of the table's own columns
    (``id``, ``user_id``, ``received_at``, ``event``...) or starts with
    ``context_`` never overwrites it.  It is dropped, as Segment's schema
    documentation says, and recorded in ``discards`` (reason ``reserved
    column``) unless it held the same value as the column.

Nesting
    Objects are flattened up to ``max_depth`` levels of keys (default 4:
    ``a.b.c.d`` becomes ``a_b_c_d``; ``context.`` is not counted).  An object
    still nested below that is stored as JSON text in the column of its path,
    so any depth loads.  Arrays are stored as JSON text.  Null values and empty
    objects make no column.

Types
    A column's type is set by the first non-null value that reaches it (in
    batch order): boolean -> ``boolean``, an integer -> ``bigint`` (beyond 64
    bits: ``numeric``), another number -> ``double precision``, a string with
    an ISO-8601 date and time -> ``timestamptz`` (no offset means UTC), any
    other string, array or deep object -> ``text``.  The type never changes
    afterwards.  A later value of another type is cast when nothing is lost:
    anything to ``text`` (JSON text for arrays and objects, ``true``/``false``
    for booleans), an integer to ``double precision`` (up to 2**53) or
    ``numeric``, a whole float to ``bigint``, an ISO-8601 string to
    ``timestamptz``.  Anything else (``9.99`` into ``bigint``, ``"abc"`` into
    ``timestamptz``, a number into ``boolean``) is stored as NULL and
    recorded in ``discards`` with the table, column, original value and
    reason; the load itself never fails.

Text
    U+0000 becomes U+FFFD in keys and values, as the gateway does (BC-01).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

from headwater.spec.message import NUL, REPLACEMENT

MAX_NAME_BYTES: Final = 63
DEFAULT_MAX_DEPTH: Final = 4

# Column kinds.  The loader maps them to and from its database's types.
BOOLEAN: Final = "boolean"
INTEGER: Final = "bigint"
FLOAT: Final = "double precision"
NUMERIC: Final = "numeric"
TIMESTAMP: Final = "timestamptz"
TEXT: Final = "text"

COMMON_COLUMNS: Final = (
    "id",
    "received_at",
    "sent_at",
    "timestamp",
    "original_timestamp",
    "user_id",
    "anonymous_id",
)
TYPE_TABLES: Final = {
    "track": "tracks",
    "identify": "identifies",
    "page": "pages",
    "screen": "screens",
    "group": "groups",
    "alias": "aliases",
}
# Columns each table has besides COMMON_COLUMNS and uuid_ts.
TABLE_COLUMNS: Final[dict[str, tuple[str, ...]]] = {
    "tracks": ("event", "event_text"),
    "identifies": (),
    "pages": ("name", "category"),
    "screens": ("name", "category"),
    "groups": ("group_id",),
    "aliases": ("previous_id",),
}
USERS: Final = "users"
DISCARDS: Final = "discards"
USERS_COLUMNS: Final = ("id", "received_at")
LOADED_AT: Final = "uuid_ts"
TABLE_NAMES: Final = frozenset(
    {*TABLE_COLUMNS, USERS, DISCARDS, "accounts"}  # accounts: Segment's, kept free
)

# PostgreSQL's reserved key words, including those allowed as function or type names.
_RESERVED_TEXT: Final = """
    all analyse analyze and any array as asc asymmetric authorization binary both case
    cast check collate collation column concurrently constraint create cross
    current_catalog current_date current_role current_schema current_time
    current_timestamp current_user default deferrable desc distinct do else end except
    false fetch for foreign freeze from full grant group having ilike in initially inner
    intersect into is isnull join lateral leading left like limit localtime
    localtimestamp natural not notnull null offset on only or order outer overlaps
    placing primary references returning right select session_user similar some
    symmetric system_user table tablesample then to trailing true union unique user
    using variadic verbose when where window with
"""
RESERVED_WORDS: Final = frozenset(_RESERVED_TEXT.split())

_SNAKE: Final = re.compile(r"_?[a-z0-9]+(?:_[a-z0-9]+)*")
_WORD: Final = re.compile(r"[A-Z0-9]*[a-z0-9]*")
_ALNUM_RUNS: Final = re.compile(r"[A-Za-z0-9]+")
_ISO_TIME: Final = re.compile(
    r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(?::\d\d(?:\.\d{1,9})?)?(?:Z|[+-]\d\d(?::?\d\d)?)?"
)
_LONG_FRACTION: Final = re.compile(r"(\.\d{6})\d+")
_MIN_UTC: Final = datetime(1, 1, 1, tzinfo=UTC)
_INT64: Final = 2**63
_EXACT_FLOAT_INT: Final = 2**53
_json_encode = msgspec.json.Encoder().encode


def snake_case(name: str) -> str:
    """Segment's snake case (see the module docstring); may return ``""``."""
    if _SNAKE.fullmatch(name):
        return name
    words: list[str] = []
    for run in _ALNUM_RUNS.findall(name):
        words.extend(w for w in _WORD.findall(run) if w)
    return "_".join(words).lower()


def _digest(text: str, size: int = 4) -> str:
    return hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=size).hexdigest()


def finish_name(snake: str, original: str) -> str:
    """Rules 3 to 5 of the module docstring for a snake-cased name."""
    if not snake:
        return "_" + _digest(original)
    if snake[0].isdigit() or snake in RESERVED_WORDS:
        snake = "_" + snake
    if len(snake) > MAX_NAME_BYTES:
        snake = snake[: MAX_NAME_BYTES - 9] + "_" + _digest(snake)
    return snake


def table_name(event: str) -> str:
    name = finish_name(snake_case(event), event)
    return "_" + name if name in TABLE_NAMES else name


def schema_name(source: str) -> str:
    name = finish_name(snake_case(source), source)
    return "_" + name if name.startswith("pg_") else name


def json_text(value: Any) -> str:
    try:
        return _json_encode(value).decode()
    except (TypeError, ValueError, RecursionError):
        return str(value)


def timestamp_text(value: str) -> str | None:
    """An ISO-8601 date and time as text PostgreSQL reads as that instant, or None.

    A time without an offset is UTC; the instant must fall in years 1 to 9999 UTC.
    """
    if not _ISO_TIME.fullmatch(value):
        return None
    candidate = _LONG_FRACTION.sub(r"\1", value, count=1) if len(value) > 26 else value
    try:
        parsed = datetime.fromisoformat(candidate)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return value + "Z"
    try:
        parsed.astimezone(UTC)
    except OverflowError:
        return None
    if parsed.year == 1 and parsed < _MIN_UTC:
        return None
    return value


def infer_kind(value: Any) -> str:
    """The column kind a first value sets."""
    kind = type(value)
    if kind is bool:
        return BOOLEAN
    if kind is int:
        return INTEGER if -_INT64 <= value < _INT64 else NUMERIC
    if kind is float:
        return FLOAT
    if kind is str and timestamp_text(value) is not None:
        return TIMESTAMP
    return TEXT


class _Discard:
    """Marks a value that does not fit its column."""


DISCARD: Final = _Discard()


def _to_text(value: Any) -> Any:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if type(value) in (int, float):
        return value
    return json_text(value) if not isinstance(value, str) else value


def _to_float(value: Any) -> Any:
    kind = type(value)
    if kind is float:
        return value
    if kind is int and -_EXACT_FLOAT_INT <= value <= _EXACT_FLOAT_INT:
        return value
    return DISCARD


def _to_numeric(value: Any) -> Any:
    kind = type(value)
    if kind is int:
        return value
    if kind is float:
        return repr(value) if math.isfinite(value) else DISCARD
    return DISCARD


def _to_boolean(value: Any) -> Any:
    return value if type(value) is bool else DISCARD


def _to_timestamp(value: Any) -> Any:
    if type(value) is str:
        text = timestamp_text(value)
        if text is not None:
            return text
    return DISCARD


def _to_utc_wall_time(value: Any) -> Any:
    # For ``timestamp without time zone`` columns, which would ignore an offset.
    text = _to_timestamp(value)
    if text is DISCARD:
        return DISCARD
    parsed = datetime.fromisoformat(_LONG_FRACTION.sub(r"\1", text, count=1).replace("Z", "+00:00"))
    return parsed.astimezone(UTC).replace(tzinfo=None).isoformat()


def _to_json(value: Any) -> Any:
    return json_text(value)


def _integer_cast(bits: int) -> Callable[[Any], Any]:
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1)

    def cast(value: Any) -> Any:
        kind = type(value)
        if kind is float and value.is_integer():
            value = int(value)
        elif kind is not int:
            return DISCARD
        return value if low <= value < high else DISCARD

    return cast


def _limited_text_cast(limit: int) -> Callable[[Any], Any]:
    def cast(value: Any) -> Any:
        text = _to_text(value)
        return text if len(str(text)) <= limit else DISCARD

    return cast


CASTS: Final[dict[str, Callable[[Any], Any]]] = {
    BOOLEAN: _to_boolean,
    "smallint": _integer_cast(16),
    "integer": _integer_cast(32),
    INTEGER: _integer_cast(64),
    FLOAT: _to_float,
    "real": _to_float,
    NUMERIC: _to_numeric,
    TIMESTAMP: _to_timestamp,
    "timestamp with time zone": _to_timestamp,
    "timestamp without time zone": _to_utc_wall_time,
    TEXT: _to_text,
    "character varying": _to_text,
    "json": _to_json,
    "jsonb": _to_json,
}
# The Python type each kind takes as it is, without a cast.
AS_IS: Final[dict[str, type]] = {BOOLEAN: bool, FLOAT: float, TEXT: str, "character varying": str}
_VARCHAR: Final = re.compile(r"character varying\((\d+)\)")


def cast_for(kind: str) -> Callable[[Any], Any] | None:
    """How values are made to fit a column of this kind; None if headwater cannot."""
    cast = CASTS.get(kind)
    if cast is None and (match := _VARCHAR.fullmatch(kind)):
        cast = _limited_text_cast(int(match.group(1)))
    return cast


@dataclass(slots=True)
class Discard:
    table: str
    column: str
    value: str
    reason: str
    message_id: str
    received_at: str | None  # timestamp text, or None


@dataclass(slots=True)
class Table:
    """The rows one batch adds to one table: column -> value, nulls left out."""

    name: str
    fixed: dict[str, str]  # the table's own columns and their kinds
    rows: list[dict[str, Any]] = field(default_factory=list)
    # The messageId behind each row, when the row's id is not one (users).
    message_ids: list[str] | None = None
    _ids: set[str] = field(default_factory=set)

    def append(self, row: dict[str, Any]) -> None:
        """Add a row keyed by messageId; the first row of an id in a batch wins."""
        if row["id"] not in self._ids:
            self._ids.add(row["id"])
            self.rows.append(row)

    def append_from(self, message_id: str, row: dict[str, Any]) -> None:
        """Add a row that is not keyed by messageId (users), remembering the message."""
        if self.message_ids is None:
            self.message_ids = [r["id"] for r in self.rows]
        self.message_ids.append(message_id)
        self.rows.append(row)

    def message_id(self, index: int) -> str:
        return self.message_ids[index] if self.message_ids is not None else self.rows[index]["id"]

    def first_values(self, known: Iterable[str]) -> dict[str, Any]:
        """For every column not in ``known``, the first value it gets in this batch."""
        known = set(known)
        first: dict[str, Any] = {}
        for row in self.rows:
            if known.issuperset(row):
                continue
            for column, value in row.items():
                if column not in known and column not in first and value is not None:
                    first[column] = value
        return first


def _fixed(columns: Iterable[str]) -> dict[str, str]:
    times = {"received_at", "sent_at", "timestamp", "original_timestamp"}
    return {c: TIMESTAMP if c in times else TEXT for c in columns}


FIXED_COLUMNS: Final[dict[str, dict[str, str]]] = {
    table: _fixed((*COMMON_COLUMNS, *extra)) for table, extra in TABLE_COLUMNS.items()
}
USERS_FIXED: Final = _fixed(USERS_COLUMNS)


@dataclass(slots=True)
class Batch:
    """A batch of events laid out as warehouse rows."""

    tables: dict[str, Table] = field(default_factory=dict)
    # Candidate users rows, one per identify with a userId, in batch order.
    users: Table = field(default_factory=lambda: Table(USERS, USERS_FIXED))
    discards: list[Discard] = field(default_factory=list)

    def table(self, name: str, fixed: dict[str, str]) -> Table:
        table = self.tables.get(name)
        if table is None:
            table = self.tables[name] = Table(name, fixed)
        return table


class _Collision(Exception):
    """Two keys of one object map to one column; take the careful path."""


def _scrub(value: str) -> str:
    return value.replace(NUL, REPLACEMENT) if NUL in value else value


def _text_or_none(value: Any) -> str | None:
    if value is None:
        return None
    return _scrub(value) if isinstance(value, str) else json_text(value)


def _text(value: Any) -> str:
    if type(value) is str:
        return value.replace(NUL, REPLACEMENT) if NUL in value else value
    return json_text(value)


def _instant(value: Any) -> str | None:
    return timestamp_text(value) if isinstance(value, str) else None


def instant(value: Any) -> str | None:
    """``timestamp_text`` with a fast path for the pipeline's own format."""
    if type(value) is not str:
        return None
    if len(value) == 24 and value[23] == "Z" and value[10] == "T" and value[19] == ".":
        try:
            datetime.fromisoformat(value)
        except ValueError:
            return None
        return value
    return timestamp_text(value)


@dataclass(slots=True)
class _Message:
    """What discards need to know about the event being laid out."""

    message_id: str
    received_at: str | None
    discards: list[Discard]

    def discard(self, table: str, column: str, value: Any, reason: str) -> None:
        text = _text_or_none(value) or ""
        self.discards.append(
            Discard(table, column, text, reason, self.message_id, self.received_at)
        )


class Layout:
    """Turns Segment events into warehouse rows; remembers names it has worked out."""

    def __init__(self, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        self.max_depth = max(1, max_depth)
        # (parent joined name, key) -> (joined name, finished column name)
        self._names: dict[tuple[str, str], tuple[str, str]] = {}
        self._tables: dict[str, str] = {}
        # Column names starting with context_, which properties may not produce.
        self._context_names: set[str] = set()

    def build(self, events: list[dict[str, Any]]) -> Batch:
        batch = Batch()
        for event in events:
            self._add(batch, event)
        return batch

    def event_table(self, event: str) -> str:
        name = self._tables.get(event)
        if name is None:
            name = table_name(_scrub(event))
            if len(self._tables) < 100_000:
                self._tables[event] = name
        return name

    # Step 1: the columns every table of this event shares.
    def _add(self, batch: Batch, event: dict[str, Any]) -> None:
        kind = event.get("type")
        table = TYPE_TABLES.get(kind) if type(kind) is str else None
        if table is None:
            return
        message_id = event.get("messageId")
        if type(message_id) is not str or not message_id or NUL in message_id:
            message_id = _text_or_none(message_id) or "hw-" + _digest(json_text(event), 16)
        message = _Message(message_id, None, batch.discards)
        base: dict[str, Any] = {"id": message_id}
        for column, key in _TIME_KEYS:
            value = event.get(key)
            if value is not None:
                text = instant(value)
                if text is None:
                    message.discard(table, column, value, "not an ISO-8601 date and time")
                base[column] = text
        message.received_at = base.get("received_at")
        for column, key in _ID_KEYS:
            value = event.get(key)
            if value is not None:
                base[column] = value if type(value) is str and NUL not in value else _text(value)
        context = event.get("context")
        if type(context) is dict and context:
            base.update(self._flat(context, "context", message, table))
        if table == "tracks":
            self._add_track(batch, event, base, message)
            return
        extra = TABLE_COLUMNS[table]
        for column, key in _EXTRA_KEYS:
            value = event.get(key)
            if value is not None and column in extra:
                base[column] = _text(value)
        payload = event.get("properties" if table in ("pages", "screens") else "traits")
        values = self._payload(base, payload, table, table, message)
        batch.table(table, FIXED_COLUMNS[table]).append({**base, **values})
        user_id = base.get("user_id")
        if table == "identifies" and user_id is not None:
            user = {**values, "id": user_id, "received_at": message.received_at}
            batch.users.append_from(message_id, user)

    # Step 2: tracks gets the common columns, the event's own table the properties too.
    def _add_track(
        self, batch: Batch, event: dict[str, Any], base: dict[str, Any], message: _Message
    ) -> None:
        name = event.get("event")
        text = _text(name) if name is not None else ""
        if text:
            base["event_text"] = text
            base["event"] = self.event_table(text)
        batch.table("tracks", FIXED_COLUMNS["tracks"]).append(base)
        if not text:
            return
        values = self._payload(base, event.get("properties"), "tracks", base["event"], message)
        batch.table(base["event"], FIXED_COLUMNS["tracks"]).append({**base, **values})

    # Step 3: properties or traits, without the columns they may not overwrite.
    def _payload(
        self, base: dict[str, Any], payload: Any, layout: str, table: str, message: _Message
    ) -> dict[str, Any]:
        if type(payload) is not dict or not payload:
            return {}
        values = self._flat(payload, "", message, table)
        if _RESERVED[layout].isdisjoint(values) and self._context_names.isdisjoint(values):
            return values
        for column in [c for c in values if c in _RESERVED[layout] or c[:8] == "context_"]:
            value = values.pop(column)
            if not _same(base.get(column), value):
                message.discard(table, column, value, "reserved column: a property may not set it")
        return values

    def _flat(
        self, obj: dict[str, Any], prefix: str, message: _Message, table: str
    ) -> dict[str, Any]:
        values: dict[str, Any] = {}
        try:
            self._flatten(values, obj, prefix, 1)
        except _Collision:
            values = self._flatten_careful(obj, prefix, message, table)
        return values

    def _column(self, parent: str, key: str) -> tuple[str, str]:
        names = self._names.get((parent, key))
        if names is None:
            clean = _scrub(key)
            part = snake_case(clean) or finish_name("", clean)
            joined = f"{parent}_{part}" if parent else part
            names = (joined, finish_name(joined, joined))
            if names[1].startswith("context_"):
                self._context_names.add(names[1])
            if len(self._names) < 100_000:
                self._names[(parent, key)] = names
        return names

    def _flatten(self, out: dict[str, Any], obj: dict[str, Any], parent: str, depth: int) -> None:
        names = self._names
        for key, value in obj.items():
            kind = type(value)
            if kind is str:
                if NUL in value:
                    value = value.replace(NUL, REPLACEMENT)
            elif value is None:
                continue
            elif kind is dict:
                if depth < self.max_depth:
                    self._flatten(
                        out,
                        value,
                        (names.get((parent, key)) or self._column(parent, key))[0],
                        depth + 1,
                    )
                    continue
                if not value:
                    continue
                value = json_text(value)
            elif kind is not int and kind is not float and kind is not bool:
                value = json_text(value)
            column = (names.get((parent, key)) or self._column(parent, key))[1]
            if column in out:
                raise _Collision
            out[column] = value

    def _flatten_careful(
        self, obj: dict[str, Any], parent: str, message: _Message, table: str
    ) -> dict[str, Any]:
        """Like ``_flatten``, resolving collisions by rule 6 of the module docstring."""
        found: dict[str, list[tuple[tuple[str, ...], Any]]] = {}
        self._leaves(found, obj, parent, (), 1)
        out: dict[str, Any] = {}
        for column, candidates in found.items():
            # The key spelt like the column first, then fewer levels, then key order.
            ranked = sorted(candidates, key=lambda c: ("_".join(c[0]) != column, len(c[0]), c[0]))
            winner = ".".join(ranked[0][0])
            out[column] = ranked[0][1]
            for path, value in ranked[1:]:
                reason = f"name collision: {'.'.join(path)!r} and {winner!r} map to one column"
                message.discard(table, column, value, reason)
        return out

    def _leaves(
        self,
        found: dict[str, list[tuple[tuple[str, ...], Any]]],
        obj: dict[str, Any],
        parent: str,
        path: tuple[str, ...],
        depth: int,
    ) -> None:
        for key, value in obj.items():
            joined, column = self._column(parent, key)
            where = (*path, _scrub(key))
            if type(value) is dict and depth < self.max_depth:
                self._leaves(found, value, joined, where, depth + 1)
                continue
            single: dict[str, Any] = {}
            self._flatten(single, {key: value}, parent, self.max_depth)
            for leaf in single.values():
                found.setdefault(column, []).append((where, leaf))


_TIME_KEYS: Final = (
    ("received_at", "receivedAt"),
    ("sent_at", "sentAt"),
    ("timestamp", "timestamp"),
    ("original_timestamp", "originalTimestamp"),
)
_ID_KEYS: Final = (("user_id", "userId"), ("anonymous_id", "anonymousId"))
_EXTRA_KEYS: Final = (
    ("name", "name"),
    ("category", "category"),
    ("group_id", "groupId"),
    ("previous_id", "previousId"),
)
# Per layout, the columns that properties and traits may not set.
_RESERVED: Final = {table: frozenset({*fixed, LOADED_AT}) for table, fixed in FIXED_COLUMNS.items()}


def _same(current: Any, value: Any) -> bool:
    return current is not None and str(current) == str(value)


def cast_rows(table: Table, kinds: dict[str, str], discards: list[Discard]) -> None:
    """Make every value of ``table`` fit its column's kind, in place.

    ``kinds`` holds the kind of each existing column; a column missing from it
    could not be created, and its values are discarded.
    """
    as_is = {c: AS_IS.get(k) for c, k in kinds.items()}
    # The layout already made the table's own columns fit the kinds it gave them.
    as_is.update((c, str) for c, k in table.fixed.items() if kinds.get(c) == k)
    casts = {c: cast_for(k) for c, k in kinds.items()}
    for index, row in enumerate(table.rows):
        for column, value in row.items():
            if value is None or type(value) is as_is.get(column, _Discard):
                continue
            cast = casts.get(column)
            result = cast(value) if cast is not None else DISCARD
            if result is not DISCARD:
                row[column] = result
                continue
            row[column] = None
            kind = kinds.get(column)
            if kind is None:
                reason = "the column could not be created (column limit)"
            elif cast is None:
                reason = f"the column's type {kind} is not one headwater writes"
            else:
                reason = f"a {_type_name(value)} value does not fit a {kind} column without loss"
            received = _instant(row.get("received_at"))
            text = _text_or_none(value) or ""
            discards.append(
                Discard(table.name, column, text, reason, table.message_id(index), received)
            )


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "timestamp string" if timestamp_text(value) else "string"
    return type(value).__name__
