"""Usage/audit records and the in-memory policy of the audit pipeline (no I/O here).

A worker builds one ``UsageRecord`` per request and hands it to
``proxy.net.audit_sink.AuditSink``, which keeps them in an ``AuditBuffer`` and writes
batches to PostgreSQL in the background, spilling to JSON-lines files on disk
(``encode_lines`` / ``decode_lines``) when PostgreSQL cannot take them.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections import deque
from collections.abc import Iterable

import msgspec


def _new_process_prefix() -> str:
    return os.urandom(8).hex()


_prefix = _new_process_prefix()
_counter = itertools.count()


def _after_fork() -> None:
    global _prefix, _counter
    _prefix, _counter = _new_process_prefix(), itertools.count()


os.register_at_fork(after_in_child=_after_fork)


def new_record_key() -> str:
    """A fresh idempotency key: 32 hex digits (a UUID as PostgreSQL reads it), 64 random
    bits drawn once per process then a counter, so keys never repeat across workers,
    hosts and restarts (two processes share a prefix with odds of about n²/2⁶⁵) and
    making one costs a counter step, not a random draw."""
    return f"{_prefix}{next(_counter):016x}"


def legacy_record_key(file_name: str, line: int) -> str:
    """The key of a record read from a spill file written before records carried keys:
    derived from the file's name and the line, so replaying that file twice still
    inserts each of its records once."""
    return hashlib.sha256(f"{file_name}:{line}".encode()).hexdigest()[:32]


class UsageRecord(msgspec.Struct, frozen=True, array_like=True):
    """One request, as stored in ``usage_records``.

    ``array_like``: a spill-file line is a bare JSON array in field order, so new fields
    must be appended at the end with defaults for old files to keep decoding.
    """

    ts: float
    """Unix time the request started."""
    key_id: int | None
    tenant_id: int | None
    route: str
    method: str
    """The JSON-RPC method on MCP routes, else the HTTP method."""
    tool: str | None
    status: int
    bytes_in: int
    bytes_out: int
    duration_ms: float
    key: str = msgspec.field(default_factory=new_record_key)
    """The idempotency key, made with the record: ``usage_records.record_key`` is unique,
    so a batch written twice (a retry after a lost commit reply, a replayed spill file)
    inserts each record once."""


def clean_text(value: str) -> str:
    """``value`` as PostgreSQL text and UTF-8 can hold it: NUL bytes and lone surrogates
    (from undecodable paths or client JSON) would make a whole batch fail forever."""
    if value.isascii() and "\x00" not in value:
        return value
    return value.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")


def cleaned(record: UsageRecord) -> UsageRecord:
    """``record`` with every text field passed through ``clean_text``."""
    return msgspec.structs.replace(
        record,
        route=clean_text(record.route),
        method=clean_text(record.method),
        tool=None if record.tool is None else clean_text(record.tool),
    )


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(UsageRecord)


def encode_lines(records: Iterable[UsageRecord]) -> bytes:
    """JSON lines, one record per line, each line ending in a newline."""
    out = bytearray()
    for record in records:
        try:
            line = _encoder.encode(record)
        except UnicodeEncodeError:
            line = _encoder.encode(cleaned(record))
        out += line
        out += b"\n"
    return bytes(out)


def decode_lines(data: bytes, file_name: str = "") -> tuple[list[UsageRecord], int]:
    """The records of a spill file and how many lines could not be decoded (a line torn
    by a crash mid-write); blank lines are ignored. Lines written before records had
    keys (their last element is a number, not the key string) get ``legacy_record_key``
    of ``file_name`` and their line number."""
    records: list[UsageRecord] = []
    bad = 0
    for number, line in enumerate(data.splitlines()):
        stripped = line.strip()
        if not stripped:
            continue
        try:
            record = _decoder.decode(stripped)
        except msgspec.DecodeError:
            bad += 1
            continue
        if not stripped.endswith(b'"]'):
            record = msgspec.structs.replace(record, key=legacy_record_key(file_name, number))
        records.append(record)
    return records, bad


class AuditBuffer:
    """Records waiting to be written, oldest first.

    ``add`` never blocks and never refuses a record. Past ``max_records`` it returns
    False: the caller must then ``take_overflow()`` and spill those records to disk.
    Only past ``hard_limit`` (the spill itself is failing: disk full, unwritable dir)
    is the oldest record discarded, and every such record is counted in ``dropped`` for
    the caller to report, because unbounded memory would take the whole worker down.
    """

    def __init__(self, max_records: int, hard_limit: int | None = None) -> None:
        if max_records < 1:
            raise ValueError("max_records must be at least 1")
        self.max_records = max_records
        self.hard_limit = max(hard_limit or 4 * max_records, max_records)
        self.dropped = 0
        self._records: deque[UsageRecord] = deque()

    def __len__(self) -> int:
        return len(self._records)

    def add(self, record: UsageRecord) -> bool:
        """Keep ``record``; False when the buffer is over ``max_records`` (spill now)."""
        self._records.append(record)
        if len(self._records) > self.hard_limit:
            self._records.popleft()
            self.dropped += 1
        return len(self._records) <= self.max_records

    def take(self, n: int) -> list[UsageRecord]:
        """Remove and return up to ``n`` of the oldest records."""
        count = min(n, len(self._records))
        return [self._records.popleft() for _ in range(count)]

    def take_all(self) -> list[UsageRecord]:
        records = list(self._records)
        self._records.clear()
        return records

    def take_overflow(self) -> list[UsageRecord]:
        """The oldest records to spill once over ``max_records``: down to half of it, so a
        steady overload makes a few large spill files, not one per new record."""
        if len(self._records) <= self.max_records:
            return []
        return self.take(len(self._records) - self.max_records // 2)

    def restore(self, records: Iterable[UsageRecord]) -> None:
        """Put records taken earlier back at the front, in their order (a write or spill
        that did not happen). Never discards: a later ``add`` enforces ``hard_limit``."""
        self._records.extendleft(reversed(list(records)))

    def take_dropped(self) -> int:
        """How many records were discarded since the last call."""
        dropped, self.dropped = self.dropped, 0
        return dropped
