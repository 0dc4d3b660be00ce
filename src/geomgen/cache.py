"""The result cache: a content-addressed, size-bounded store on disk with
least-recently-used eviction, so that geomgen never computes the same thing twice.

An entry is a byte string under a key (a SHA-256 hex digest of what made it,
see :func:`generate_key` and :func:`convert_key`). Each entry is one file
under ``FOLDER/entries/`` written to a temporary name and renamed into place
(atomic on POSIX); an SQLite index (``FOLDER/index.sqlite3``) holds each
entry's size, BLAKE2b digest and last use. Reads check the size and the
digest: an entry that is missing, truncated or corrupt is a miss (and is
dropped), never an error. After a write the least recently used entries go
until the total is within ``max_bytes``; the total counts entry files only.

Why SQLite (standard library) and not diskcache: diskcache culls ten entries
at a time and counts its own database file against the size limit, so a
small ``--cache-size`` evicts more than it must; the index here is one table
with exact sizes, and SQLite's locking lets two processes (a ``serve`` and a
``generate`` of the same user) share one folder.

``put_soon`` hands a write to one writer thread (packing, hashing, writing
the file and the index row happen there), so a broker's loop never waits on
the disk for a store; what is queued is bounded by ``max_pending_bytes`` and
answered from memory until written.

Every failure of the store (disk full, a locked or broken index) is logged
and counted; the caller then simply computes the result. Nothing here raises
to the broker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from geomgen import __version__, defaults

log = logging.getLogger("geomgen.cache")

INDEX_NAME = "index.sqlite3"
ENTRIES_NAME = "entries"
SCHEMA_VERSION = 1  # bump when the entry format changes; an index of another version is started afresh
LOCK_TIMEOUT_S = 0.5  # how long a read or write waits for another process's lock before it counts as a miss
CLOSE_WAIT_S = 30.0  # how long close() waits for the writer thread to store what is queued


def default_folder() -> Path:
    """The per-user cache folder: ``$GEOMGEN_CACHE_DIR``, else the platform's
    user cache folder (``$XDG_CACHE_HOME/geomgen/results``, by default
    ``~/.cache/geomgen/results`` on Linux)."""
    override = os.environ.get("GEOMGEN_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("geomgen")) / "results"


def parse_size(text: str | int) -> int:
    """A size in bytes from ``10G``, ``512M``, ``64k``, ``1.5GiB`` or a plain
    number of bytes; ValueError with a sentence for anything else."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = float(text)
    else:
        raw = str(text).strip().lower().replace(" ", "")
        number = raw.rstrip("bi")  # 10GiB, 10GB, 10G, 10 -> the number and its multiplier letter
        units = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
        multiplier = 1
        if number and number[-1] in units:
            multiplier, number = units[number[-1]], number[:-1]
        try:
            value = float(number) * multiplier
        except ValueError:
            raise ValueError(f"cache size {text!r} is not a size; give bytes or a number with K, M, G or T "
                             "(e.g. 10G)") from None
    if not value >= 1:  # also refuses nan
        raise ValueError(f"cache size {text!r} must be at least 1 byte")
    return int(value)


# --- keys ---------------------------------------------------------------------


def _digest(parts: Mapping[str, Any], payload_digest: bytes) -> str:
    """SHA-256 over the canonical JSON of ``parts`` and a payload's digest."""
    meta = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=repr).encode()
    hasher = hashlib.sha256()
    hasher.update(len(meta).to_bytes(8, "big"))
    hasher.update(meta)
    hasher.update(payload_digest)
    return hasher.hexdigest()


def bytes_digest(data: bytes) -> bytes:
    """SHA-256 of ``data`` (the input's or the GLB's bytes), computed once per job."""
    return hashlib.sha256(data).digest()


def generate_key(input_digest: bytes, *, backend: str, model_identity: str, options: Mapping[str, Any],
                 input_name: str, prompt: str | None, debug: bool) -> str:
    """The key of a GPU result: the input's bytes (``input_digest``), the
    backend, its model identity (weights, worker-wide options), this request's
    resolved options, the prompt, the input's suffix (it selects the reader)
    and whether debug files were asked for."""
    suffix = Path(input_name).suffix.lower()
    parts = {"kind": "generate", "schema": SCHEMA_VERSION, "backend": backend, "model": model_identity,
             "options": dict(options), "suffix": suffix, "prompt": prompt, "debug": bool(debug)}
    return _digest(parts, input_digest)


def convert_key(glb_digest: bytes, *, name: str, convert: Mapping[str, Any]) -> str:
    """The key of a conversion result: the GLB's bytes (``glb_digest``), the
    package name (it names the files), the checked conversion options and
    geomgen's version (the converter is geomgen's own code)."""
    parts = {"kind": "convert", "schema": SCHEMA_VERSION, "geomgen": __version__, "name": name,
             "convert": dict(convert)}
    return _digest(parts, glb_digest)


# --- entries --------------------------------------------------------------------


@dataclass
class GeneratedEntry:
    """A cached GPU result."""

    glb: bytes
    info: dict
    debug_files: dict


@dataclass
class ConvertedEntry:
    """A cached conversion result (an SDF package)."""

    files: dict
    sdf_file: str | None
    info: dict


def pack_generated(entry: GeneratedEntry) -> bytes:
    return msgpack.packb({"glb": entry.glb, "info": entry.info, "debug_files": entry.debug_files},
                         use_bin_type=True)


def unpack_generated(payload: bytes) -> GeneratedEntry | None:
    data = _unpack(payload)
    if data is None or not isinstance(data.get("glb"), bytes) or not data["glb"]:
        return None
    info, debug_files = data.get("info"), data.get("debug_files")
    return GeneratedEntry(data["glb"], info if isinstance(info, dict) else {},
                          debug_files if isinstance(debug_files, dict) else {})


def pack_converted(entry: ConvertedEntry) -> bytes:
    return msgpack.packb({"files": entry.files, "sdf_file": entry.sdf_file, "info": entry.info}, use_bin_type=True)


def unpack_converted(payload: bytes) -> ConvertedEntry | None:
    data = _unpack(payload)
    if data is None or not isinstance(data.get("files"), dict) or not data["files"]:
        return None
    sdf_file, info = data.get("sdf_file"), data.get("info")
    if sdf_file is not None and (not isinstance(sdf_file, str) or sdf_file not in data["files"]):
        return None
    return ConvertedEntry(data["files"], sdf_file, info if isinstance(info, dict) else {})


def _unpack(payload: bytes) -> dict | None:
    try:
        data = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception:  # noqa: BLE001 - msgpack raises several unrelated types; a bad entry is a miss
        return None
    return data if isinstance(data, dict) else None


# --- the store ------------------------------------------------------------------


@dataclass
class CacheCounters:
    """What the store did since it was opened (this process only)."""

    hits: int = 0
    misses: int = 0
    writes: int = 0
    evictions: int = 0
    corrupt: int = 0  # entries found missing, truncated or altered (each also a miss)
    errors: int = 0  # reads or writes that failed (disk, lock): the result was computed instead
    skipped: int = 0  # results not stored: larger than max_entry_bytes


class ResultCache:
    """A size-bounded LRU store of byte strings in ``folder``.

    ``max_bytes`` bounds the entries' total size; ``max_entry_bytes`` the size
    of one entry (a larger one is not stored). ``put`` writes now;
    ``put_soon`` hands the write to one writer thread, holding at most
    ``max_pending_bytes`` queued (``get`` answers a queued entry from memory).
    One owner thread besides the writer; other processes may share the folder.
    """

    def __init__(self, folder: str | os.PathLike, max_bytes: int = defaults.CACHE_SIZE_BYTES,
                 max_entry_bytes: int = defaults.CACHE_MAX_ENTRY_BYTES,
                 max_pending_bytes: int = defaults.CACHE_PENDING_BYTES) -> None:
        if max_bytes < 1 or max_entry_bytes < 1:
            raise ValueError("the cache's max_bytes and max_entry_bytes must be positive")
        self.folder = Path(folder).expanduser()
        self.max_bytes = int(max_bytes)
        self.max_entry_bytes = int(max_entry_bytes)
        self.max_pending_bytes = int(max_pending_bytes)
        self.counters = CacheCounters()
        self._lock = threading.RLock()  # the index connection and the counters, shared with the writer thread
        self._pending: dict[str, tuple[int, Callable[[], bytes]]] = {}  # key -> (size, payload maker), queued
        self._pending_bytes = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._entries = self.folder / ENTRIES_NAME
        try:
            self._entries.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(f"cannot create the cache folder {self.folder} ({exc.strerror or exc}); choose another "
                          "with --cache-dir or run without a cache (--no-cache)") from None
        self._last_use_ns = 0
        self._db = self._open_index()
        self._sweep_temporaries()

    # --- life cycle -------------------------------------------------------------

    def _open_index(self) -> sqlite3.Connection:
        path = self.folder / INDEX_NAME
        for fresh in (False, True):
            if fresh:  # unreadable or of another schema: start afresh, entries and all
                log.warning("the cache index %s is unreadable or of another version; starting an empty cache", path)
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
                shutil.rmtree(self._entries, ignore_errors=True)
                self._entries.mkdir(parents=True, exist_ok=True)
            try:
                db = sqlite3.connect(path, timeout=LOCK_TIMEOUT_S, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")  # a crash may lose the last writes, never corrupt
                db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
                db.execute("CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, size INTEGER NOT NULL, "
                           "digest TEXT NOT NULL, used INTEGER NOT NULL)")
                db.execute("CREATE INDEX IF NOT EXISTS entries_used ON entries (used)")
                row = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
                if row is None:
                    db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                elif row[0] != str(SCHEMA_VERSION):
                    db.close()
                    if fresh:
                        break
                    continue
                return db
            except sqlite3.DatabaseError:
                if fresh:
                    break
        raise OSError(f"cannot open the cache index {path}; remove the folder {self.folder} or choose another "
                      "with --cache-dir")

    def _sweep_temporaries(self) -> None:
        """Remove temporary files a crashed writer left behind."""
        for path in self._entries.glob("*/.tmp-*"):
            path.unlink(missing_ok=True)

    def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """Store what is queued (waiting up to ``wait_s``), then close the index."""
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(wait_s)
            if self._writer.is_alive():
                log.warning("result cache: %d queued entries not written within %g s; they are lost",
                            len(self._pending), wait_s)
            self._writer = None
        with self._lock:
            self._db.close()

    # --- writing in the background ------------------------------------------------

    def put_soon(self, key: str, size_bytes: int, make: Callable[[], bytes]) -> bool:
        """Queue ``make()`` (about ``size_bytes``) for the writer thread to
        store under ``key``; until then ``get(key)`` answers it from memory.
        False when not queued: over the entry limit, or the queue already
        holds ``max_pending_bytes`` (the result is simply not cached)."""
        if size_bytes > min(self.max_entry_bytes, self.max_bytes):
            self._count("skipped")
            return False
        with self._lock:
            old = self._pending.get(key)
            queued = self._pending_bytes - (old[0] if old else 0)
            if queued + size_bytes > self.max_pending_bytes:
                self.counters.skipped += 1
                log.debug("result cache writer busy (%d bytes queued); %s not stored", queued, key[:16])
                return False
            self._pending[key] = (size_bytes, make)
            self._pending_bytes = queued + size_bytes
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_queued, name="geomgen-cache-writer", daemon=True)
                self._writer.start()
        self._queue.put(key)
        return True

    def _write_queued(self) -> None:
        while True:
            key = self._queue.get()
            if key is None:
                return
            with self._lock:
                item = self._pending.get(key)
            if item is None:  # written already (queued twice)
                continue
            try:
                payload = item[1]()
            except Exception:
                log.exception("result cache: could not build entry %s; not stored", key[:16])
                payload = None
            if payload is not None:
                self.put(key, payload)
            with self._lock:
                if self._pending.get(key) is item:
                    del self._pending[key]
                    self._pending_bytes -= item[0]

    def pending(self) -> int:
        """Entries queued for the writer thread."""
        with self._lock:
            return len(self._pending)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self.counters, name, getattr(self.counters, name) + n)

    # --- reading and writing ------------------------------------------------------

    def _now_ns(self) -> int:
        """Wall-clock nanoseconds for an entry's last use, strictly increasing in
        this process (a coarse clock must not make two uses tie)."""
        self._last_use_ns = max(time.time_ns(), self._last_use_ns + 1)
        return self._last_use_ns

    def _path(self, key: str) -> Path:
        return self._entries / key[:2] / key

    def get(self, key: str) -> bytes | None:
        """The entry under ``key``, or None (a miss: absent, corrupt or unreadable)."""
        with self._lock:
            item = self._pending.get(key)
        if item is not None:  # queued for the writer: answered from memory
            try:
                payload = item[1]()
            except Exception:  # noqa: BLE001 - as in the writer: not cached
                payload = None
            if payload is not None:
                self._count("hits")
                return payload
        try:
            with self._lock:
                row = self._db.execute("SELECT size, digest FROM entries WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as exc:
            self._failed("read", exc)
            return None
        if row is None:
            self._count("misses")
            return None
        size, digest = row
        try:
            with open(self._path(key), "rb") as handle:
                payload = handle.read(self.max_entry_bytes + 1)
        except OSError:
            payload = None
        if payload is None or len(payload) != size or hashlib.blake2b(payload).hexdigest() != digest:
            self._count("corrupt")
            self._count("misses")
            log.warning("cache entry %s is missing or corrupt; dropped it (the result is computed again)", key[:16])
            self._drop([key])
            return None
        try:
            with self._lock:
                self._db.execute("UPDATE entries SET used = ? WHERE key = ?", (self._now_ns(), key))
        except sqlite3.Error as exc:  # the hit stands; only its recency was not recorded
            log.debug("could not record the use of cache entry %s: %s", key[:16], exc)
        self._count("hits")
        return payload

    def put(self, key: str, payload: bytes) -> bool:
        """Store ``payload`` under ``key`` (atomically), then evict the least
        recently used entries beyond ``max_bytes``. False when not stored."""
        size = len(payload)
        if size > self.max_entry_bytes or size > self.max_bytes:
            self._count("skipped")
            log.debug("cache entry %s of %d bytes not stored: over the %d-byte entry limit", key[:16], size,
                      min(self.max_entry_bytes, self.max_bytes))
            return False
        target = self._path(key)
        temporary = None
        try:
            target.parent.mkdir(exist_ok=True)
            fd, temporary = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
            os.replace(temporary, target)  # readers see the old entry or the whole new one
            temporary = None
            digest = hashlib.blake2b(payload).hexdigest()
            with self._lock:
                self._db.execute("INSERT OR REPLACE INTO entries (key, size, digest, used) VALUES (?, ?, ?, ?)",
                                 (key, size, digest, self._now_ns()))
        except (OSError, sqlite3.Error) as exc:
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)
            self._failed("write", exc)
            return False
        self._count("writes")
        self._evict()
        return True

    def _evict(self) -> None:
        """Drop least recently used entries until the total fits in max_bytes."""
        try:
            with self._lock:
                total = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM entries").fetchone()[0]
                if total <= self.max_bytes:
                    return
                victims = []
                for key, size in self._db.execute("SELECT key, size FROM entries ORDER BY used, key"):
                    if total <= self.max_bytes:
                        break
                    victims.append(key)
                    total -= size
        except sqlite3.Error as exc:
            self._failed("evict", exc)
            return
        self._count("evictions", len(victims))
        self._drop(victims)

    def _drop(self, keys: list[str]) -> None:
        if not keys:
            return
        try:
            with self._lock:
                self._db.executemany("DELETE FROM entries WHERE key = ?", [(k,) for k in keys])
        except sqlite3.Error as exc:
            self._failed("drop", exc)
            return
        for key in keys:
            try:
                self._path(key).unlink(missing_ok=True)
            except OSError as exc:
                log.debug("could not remove cache file of %s: %s", key[:16], exc)

    def _failed(self, what: str, exc: Exception) -> None:
        self._count("errors")
        if self.counters.errors in (1, 10, 100) or self.counters.errors % 1000 == 0:
            log.warning("result cache %s failed in %s (%s); computing instead (%d failures so far)", what,
                        self.folder, exc, self.counters.errors)

    # --- reporting --------------------------------------------------------------------

    def usage(self) -> tuple[int, int]:
        """(entries, bytes) in the store now, every process's writes included."""
        try:
            with self._lock:
                count, total = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries").fetchone()
            return int(count), int(total)
        except sqlite3.Error:
            return -1, -1

    def keys_by_use(self) -> list[str]:
        """Keys from least to most recently used (for tests and inspection)."""
        with self._lock:
            return [row[0] for row in self._db.execute("SELECT key FROM entries ORDER BY used, key")]

    def summary(self) -> dict:
        """The health reply's ``cache`` map."""
        entries, total = self.usage()
        c = self.counters
        return {"enabled": True, "dir": str(self.folder), "max_bytes": self.max_bytes, "entries": entries,
                "bytes": total, "pending_writes": self.pending(), "hits": c.hits, "misses": c.misses, "writes": c.writes, "evictions": c.evictions,
                "corrupt": c.corrupt, "errors": c.errors, "skipped": c.skipped}


def open_cache(folder: str | os.PathLike | None, size_bytes: int = defaults.CACHE_SIZE_BYTES,
               enabled: bool = True) -> ResultCache | None:
    """The cache a broker uses: ``folder`` (None: :func:`default_folder`)
    bounded to ``size_bytes``, or None when not ``enabled``. Raises OSError with
    a sentence when the folder cannot be used."""
    if not enabled:
        return None
    store = ResultCache(default_folder() if folder is None else folder, size_bytes)
    log.info("result cache in %s (at most %d bytes)", store.folder, store.max_bytes)
    return store
