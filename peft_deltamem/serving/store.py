"""`SessionStore`: the server's sessions in an embedded SQLite database (standard library, WAL mode).

A session is an owner (the API key that created it, as a hash), a transcript of write groups (docs/design.md §8, see
:mod:`~peft_deltamem.serving.window`) and, for every group, the hash chaining it to the groups before and the memory
snapshot right after it was written (the file :meth:`MemoryState.save` writes, a few KB). A session may also hold a
*base* memory (imported with ``PUT /v1/sessions/{id}/memory``): the snapshot before its first group.

Every change is one SQLite transaction: the groups a request writes (and the rewound groups it drops) are committed
together with their snapshots, or not at all; with ``synchronous=FULL`` a committed transaction survives a crash.
The store is safe to use from several threads (one connection behind a lock).
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..memory.state import MemoryState

__all__ = ["SessionInfo", "SessionStore", "WrittenGroup", "memory_from_bytes", "memory_to_bytes"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    base_snapshot BLOB
);
CREATE TABLE IF NOT EXISTS groups (
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    hash TEXT NOT NULL,
    messages TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    snapshot BLOB NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (session_id, idx)
);
"""


def memory_to_bytes(memory: MemoryState) -> bytes:
    """The bytes of the file ``memory.save`` writes (safetensors + a header naming the adapter layout)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "memory.safetensors"
        memory.save(path)
        return path.read_bytes()


def memory_from_bytes(data: bytes, device: Any = "cpu") -> MemoryState:
    """A memory from the bytes of a file :meth:`MemoryState.save` wrote; ``ValueError`` if they are not one."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "memory.safetensors"
        path.write_bytes(data)
        return MemoryState.load(path, device=device)


@dataclass(frozen=True)
class WrittenGroup:
    """One write group as stored: its chained hash, messages, tokens written and the snapshot after it."""

    hash: str
    messages: list[dict[str, Any]]
    tokens: int
    snapshot: bytes


@dataclass(frozen=True)
class SessionInfo:
    """What the store knows of a session, without its snapshots."""

    id: str
    owner: str
    created: float
    updated: float
    groups: int
    messages: int
    tokens_written: int
    has_base_memory: bool

    def as_dict(self) -> dict[str, Any]:
        """The public fields (the owner stays private)."""
        return {
            "id": self.id,
            "object": "session",
            "created": int(self.created),
            "updated": int(self.updated),
            "write_groups": self.groups,
            "messages_in_memory": self.messages,
            "tokens_written": self.tokens_written,
            "imported_memory": self.has_base_memory,
        }


class SessionStore:
    """Sessions in a SQLite file (``":memory:"`` for a throwaway store). Thread-safe."""

    def __init__(self, path: str | os.PathLike = ":memory:") -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database (WAL checkpointed by SQLite)."""
        with self._lock:
            self._db.close()

    # ----- reading -------------------------------------------------------------------------------------------------
    def info(self, session_id: str, owner: str) -> SessionInfo | None:
        """The session ``session_id`` if it exists and belongs to ``owner``, else None."""
        with self._lock:
            row = self._db.execute(
                "SELECT s.id, s.owner, s.created, s.updated, COUNT(g.idx), "
                "COALESCE(SUM(json_array_length(g.messages)), 0), COALESCE(SUM(g.tokens), 0), "
                "s.base_snapshot IS NOT NULL FROM sessions s LEFT JOIN groups g ON g.session_id = s.id "
                "WHERE s.id = ? GROUP BY s.id",
                (session_id,),
            ).fetchone()
        if row is None or row[1] != owner:
            return None
        return SessionInfo(*row[:7], has_base_memory=bool(row[7]))

    def exists(self, session_id: str) -> bool:
        """Whether any owner has a session of that id."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone() is not None

    def list(self, owner: str) -> list[SessionInfo]:
        """The owner's sessions, most recently updated first."""
        with self._lock:
            ids = [
                r[0]
                for r in self._db.execute("SELECT id FROM sessions WHERE owner = ? ORDER BY updated DESC", (owner,))
            ]
        return [info for info in (self.info(i, owner) for i in ids) if info is not None]

    def chain(self, session_id: str) -> list[str]:
        """The hashes of the session's write groups, in order."""
        with self._lock:
            rows = self._db.execute("SELECT hash FROM groups WHERE session_id = ? ORDER BY idx", (session_id,))
            return [r[0] for r in rows]

    def groups(self, session_id: str) -> list[WrittenGroup]:
        """The session's write groups with their snapshots, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT hash, messages, tokens, snapshot FROM groups WHERE session_id = ? ORDER BY idx", (session_id,)
            ).fetchall()
        return [WrittenGroup(h, json.loads(m), t, s) for h, m, t, s in rows]

    def snapshot(self, session_id: str, after: int | None = None) -> bytes | None:
        """The memory after the first ``after`` groups (default: all): a group's snapshot, the base memory (``after``
        0) or None for an empty memory."""
        with self._lock:
            if after is None:
                row = self._db.execute(
                    "SELECT snapshot FROM groups WHERE session_id = ? ORDER BY idx DESC LIMIT 1", (session_id,)
                ).fetchone()
            elif after > 0:
                row = self._db.execute(
                    "SELECT snapshot FROM groups WHERE session_id = ? AND idx = ?", (session_id, after - 1)
                ).fetchone()
            else:
                row = None
            if row is None:
                base = self._db.execute("SELECT base_snapshot FROM sessions WHERE id = ?", (session_id,)).fetchone()
                return base[0] if base else None
            return row[0]

    # ----- writing -------------------------------------------------------------------------------------------------
    def commit(self, session_id: str, owner: str, keep: int, new: Sequence[WrittenGroup]) -> None:
        """In one transaction: create the session if needed, drop its groups after the first ``keep`` (a rewind), and
        append ``new``. ``PermissionError`` if the session belongs to another owner (nothing changes)."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT owner FROM sessions WHERE id = ?", (session_id,)).fetchone()
                if row is None:
                    self._db.execute(
                        "INSERT INTO sessions (id, owner, created, updated) VALUES (?, ?, ?, ?)",
                        (session_id, owner, now, now),
                    )
                elif row[0] != owner:
                    raise PermissionError(session_id)
                else:
                    self._db.execute("UPDATE sessions SET updated = ? WHERE id = ?", (now, session_id))
                self._db.execute("DELETE FROM groups WHERE session_id = ? AND idx >= ?", (session_id, keep))
                self._db.executemany(
                    "INSERT INTO groups (session_id, idx, hash, messages, tokens, snapshot, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            session_id,
                            keep + i,
                            g.hash,
                            json.dumps(g.messages, ensure_ascii=False),
                            g.tokens,
                            g.snapshot,
                            now,
                        )
                        for i, g in enumerate(new)
                    ],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def import_memory(self, session_id: str, owner: str, snapshot: bytes) -> None:
        """Make ``snapshot`` the session's base memory and forget its transcript (one transaction; creates the
        session if needed). ``PermissionError`` if the session belongs to another owner."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT owner FROM sessions WHERE id = ?", (session_id,)).fetchone()
                if row is not None and row[0] != owner:
                    raise PermissionError(session_id)
                self._db.execute(
                    "INSERT INTO sessions (id, owner, created, updated, base_snapshot) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET updated = excluded.updated, base_snapshot = excluded.base_snapshot",
                    (session_id, owner, now, now, snapshot),
                )
                self._db.execute("DELETE FROM groups WHERE session_id = ?", (session_id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def delete(self, session_id: str, owner: str) -> bool:
        """Forget the session (transcript and snapshots); False if the owner has no such session."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute("DELETE FROM sessions WHERE id = ? AND owner = ?", (session_id, owner))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return cur.rowcount > 0

    def count(self) -> int:
        """Number of sessions of all owners."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0])

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` (``"ok"`` when the file is sound)."""
        with self._lock:
            return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])
