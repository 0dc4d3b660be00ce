"""The result cache's store (cache.ResultCache) and keys, on real files and a real SQLite index."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading

import pytest

from geomgen import cache
from geomgen.cache import ResultCache


def _key(n: int) -> str:
    return f"{n:064x}"


def test_put_then_get_returns_the_same_bytes(tmp_path):
    store = ResultCache(tmp_path / "c", max_bytes=10_000)
    assert store.get(_key(1)) is None
    assert store.put(_key(1), b"abc" * 10)
    assert store.get(_key(1)) == b"abc" * 10
    assert store.summary()["entries"] == 1 and store.summary()["bytes"] == 30
    assert (store.counters.hits, store.counters.misses, store.counters.writes) == (1, 1, 1)


def test_eviction_drops_least_recently_used_first(tmp_path):
    store = ResultCache(tmp_path, max_bytes=3000)
    for n in (1, 2, 3):
        assert store.put(_key(n), bytes([n]) * 1000)
    assert store.get(_key(1)) is not None  # 1 is now the most recently used; 2 the least
    assert store.put(_key(4), b"\x04" * 1000)
    assert store.get(_key(2)) is None
    assert store.keys_by_use() == [_key(3), _key(1), _key(4)]
    assert store.usage() == (3, 3000)
    assert store.counters.evictions == 1
    assert not (tmp_path / "entries" / _key(2)[:2] / _key(2)).exists()


def test_a_big_entry_evicts_as_many_as_it_needs_and_no_more(tmp_path):
    store = ResultCache(tmp_path, max_bytes=4000)
    for n in range(4):
        store.put(_key(n), b"x" * 1000)
    store.put(_key(9), b"y" * 2500)
    assert store.keys_by_use() == [_key(3), _key(9)]
    assert store.usage() == (2, 3500)


def test_entry_over_the_entry_limit_is_not_stored(tmp_path):
    store = ResultCache(tmp_path, max_bytes=10_000, max_entry_bytes=100)
    assert not store.put(_key(1), b"z" * 101)
    assert store.get(_key(1)) is None
    assert store.counters.skipped == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_entry_is_a_miss_and_is_dropped(tmp_path, damage):
    store = ResultCache(tmp_path, max_bytes=10_000)
    store.put(_key(5), b"payload-" * 50)
    path = tmp_path / "entries" / _key(5)[:2] / _key(5)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:10])
    elif damage == "flip":
        data = bytearray(path.read_bytes())
        data[3] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    assert store.get(_key(5)) is None
    assert store.counters.corrupt == 1
    assert store.usage() == (0, 0)
    assert store.put(_key(5), b"again")
    assert store.get(_key(5)) == b"again"


def test_entries_survive_reopening_and_another_process_sees_them(tmp_path):
    store = ResultCache(tmp_path, max_bytes=10_000)
    store.put(_key(7), b"persisted")
    store.close()
    code = ("import sys; from geomgen.cache import ResultCache; "
            f"sys.stdout.write(ResultCache({str(tmp_path)!r}, 10_000).get({_key(7)!r}).decode())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout == "persisted"
    assert ResultCache(tmp_path, max_bytes=10_000).get(_key(7)) == b"persisted"


def test_a_broken_index_starts_an_empty_cache(tmp_path):
    store = ResultCache(tmp_path, max_bytes=10_000)
    store.put(_key(1), b"one")
    store.close()
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"index.sqlite3{suffix}").unlink(missing_ok=True)
    (tmp_path / "index.sqlite3").write_bytes(b"this is not an sqlite database" * 100)
    reopened = ResultCache(tmp_path, max_bytes=10_000)
    assert reopened.get(_key(1)) is None
    assert reopened.put(_key(1), b"one")
    assert reopened.get(_key(1)) == b"one"


def test_temporaries_of_a_crashed_writer_are_swept(tmp_path):
    ResultCache(tmp_path, max_bytes=10_000).put(_key(1), b"one")
    leftover = tmp_path / "entries" / _key(1)[:2] / ".tmp-crashed"
    leftover.write_bytes(b"half")
    ResultCache(tmp_path, max_bytes=10_000)
    assert not leftover.exists()


def test_a_failing_write_is_a_miss_not_an_error(tmp_path):
    store = ResultCache(tmp_path, max_bytes=10_000)
    store.put(_key(1), b"one")
    blocked = tmp_path / "entries" / _key(2)[:2] / _key(2)
    blocked.mkdir(parents=True)  # a folder where the entry's file must go: the rename fails
    assert not store.put(_key(2), b"two")
    assert store.counters.errors == 1
    assert store.get(_key(2)) is None
    assert store.get(_key(1)) == b"one"
    assert not list(blocked.parent.glob(".tmp-*"))


def test_put_soon_answers_from_memory_until_written_and_close_waits(tmp_path):
    store = ResultCache(tmp_path, max_bytes=10_000)
    release = threading.Event()

    def make() -> bytes:
        release.wait(30)  # the writer thread holds here: the entry stays queued
        return b"late" * 10

    assert store.put_soon(_key(1), 40, make)
    assert store.pending() == 1
    release.set()
    assert store.get(_key(1)) == b"late" * 10  # from memory, or from disk if the writer was quick
    store.close()
    reopened = ResultCache(tmp_path, max_bytes=10_000)
    assert reopened.get(_key(1)) == b"late" * 10
    assert reopened.pending() == 0


def test_put_soon_refuses_beyond_its_queue(tmp_path):
    store = ResultCache(tmp_path, max_bytes=10_000, max_pending_bytes=100)
    gate = threading.Event()
    assert store.put_soon(_key(1), 80, lambda: gate.wait(30) and b"a" * 80)
    assert not store.put_soon(_key(2), 40, lambda: b"b" * 40)  # 120 bytes would be queued
    assert store.counters.skipped == 1
    gate.set()
    store.close()
    assert ResultCache(tmp_path, max_bytes=10_000).usage() == (1, 80)


def test_keys_change_with_every_part_of_what_made_the_result():
    digest = cache.bytes_digest(b"image")
    base = {"backend": "silhouette", "model_identity": "silhouette geomgen 1", "options": {"height_m": 1.0},
            "input_name": "a.png", "prompt": None, "debug": False}
    key = cache.generate_key(digest, **base)
    assert key == cache.generate_key(digest, **{**base, "input_name": "b.PNG"})  # only the suffix counts
    for change in ({"backend": "mesh"}, {"model_identity": "silhouette geomgen 2"}, {"options": {"height_m": 2.0}},
                   {"input_name": "a.jpg"}, {"prompt": "a chair"}, {"debug": True}):
        assert cache.generate_key(digest, **{**base, **change}) != key, change
    assert cache.generate_key(cache.bytes_digest(b"other"), **base) != key
    convert = cache.convert_key(digest, name="chair", convert={"collision": "coacd"})
    assert convert != cache.convert_key(digest, name="chair", convert={"collision": "hull"})
    assert convert != cache.convert_key(digest, name="table", convert={"collision": "coacd"})


def test_entry_codecs_refuse_what_they_did_not_write():
    entry = cache.GeneratedEntry(b"glTF", {"faces": 3}, {})
    assert cache.unpack_generated(cache.pack_generated(entry)) == entry
    assert cache.unpack_generated(b"\xc1garbage") is None
    package = cache.ConvertedEntry({"a/a.sdf": b"<sdf/>"}, "a/a.sdf", {"mass_kg": 1.0})
    assert cache.unpack_converted(cache.pack_converted(package)) == package
    assert cache.unpack_converted(cache.pack_converted(cache.ConvertedEntry({"x": b""}, "missing.sdf", {}))) is None


@pytest.mark.parametrize("text,expected", [("10G", 10 * 1024**3), ("512M", 512 * 1024**2), ("1.5GiB", int(1.5 * 1024**3)),
                                           ("64k", 65536), ("1000", 1000)])
def test_parse_size(text, expected):
    assert cache.parse_size(text) == expected


@pytest.mark.parametrize("text", ["ten", "0", "-5M", "", "nanG"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(ValueError, match="cache size"):
        cache.parse_size(text)


def test_default_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GEOMGEN_CACHE_DIR", str(tmp_path / "mine"))
    assert cache.default_folder() == tmp_path / "mine"
    monkeypatch.delenv("GEOMGEN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.default_folder() == tmp_path / "xdg" / "geomgen" / "results"


def test_index_is_sqlite_with_exact_sizes(tmp_path):
    store = ResultCache(tmp_path, max_bytes=10_000)
    store.put(_key(1), b"12345")
    store.close()
    rows = sqlite3.connect(tmp_path / "index.sqlite3").execute("SELECT key, size FROM entries").fetchall()
    assert rows == [(_key(1), 5)]
