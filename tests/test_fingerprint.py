"""Weight hashes remembered by file stat: a weight file is read once, and hashed again whenever it may have changed."""

import hashlib
import json
import os
import time

import pytest

from specattn_runtime import fingerprint as F


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty SpecAttn cache folder of this test's own."""
    monkeypatch.setenv("SPECATTN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def settled(path, data: bytes):
    """Write ``data`` and wait until the file is older than the freshness margin (so it may be remembered)."""
    path.write_bytes(data)
    time.sleep(F.FRESH_NS / 1e9 + 0.05)
    return path


def stored(cache) -> dict:
    return json.loads((cache / F.HASH_STORE).read_text())


def test_a_remembered_hash_is_served_from_the_store(cache, tmp_path):
    f = settled(tmp_path / "w.safetensors", os.urandom(4096))
    want = F.file_sha256(f)
    assert F.remembered_file_sha256(f) == want
    entry = stored(cache)[str(f.resolve())]
    assert entry["sha256"] == want
    # the store, not the bytes, answers now: a planted value comes back while the stat is unchanged
    entry["sha256"] = "0" * 64
    (cache / F.HASH_STORE).write_text(json.dumps({str(f.resolve()): entry}))
    assert F.remembered_file_sha256(f) == "0" * 64


@pytest.mark.parametrize("change", ["rewrite_same_size_same_mtime", "replace_with_another_file", "append"])
def test_a_changed_file_is_hashed_again(cache, tmp_path, change):
    f = settled(tmp_path / "w.safetensors", b"a" * 4096)
    old = F.remembered_file_sha256(f)
    st = os.stat(f)
    if change == "rewrite_same_size_same_mtime":  # the modification time put back: the change time still moves
        f.write_bytes(b"b" * 4096)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif change == "replace_with_another_file":
        other = tmp_path / "other"
        other.write_bytes(b"c" * 4096)
        os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(other, f)
    else:
        with open(f, "ab") as fh:
            fh.write(b"d")
    assert F.remembered_file_sha256(f) == F.file_sha256(f) != old  # the new bytes' hash


def test_a_fresh_file_is_not_remembered(cache, tmp_path):
    """Changed within the margin: a same-size rewrite in the same timestamp tick could keep its stat, so no entry."""
    f = tmp_path / "w.safetensors"
    f.write_bytes(os.urandom(256))
    assert F.remembered_file_sha256(f) == F.file_sha256(f)
    assert not (cache / F.HASH_STORE).exists()


def test_a_corrupt_or_unwritable_store_still_gives_the_right_hash(cache, tmp_path, monkeypatch):
    f = settled(tmp_path / "w.safetensors", os.urandom(1024))
    cache.mkdir()
    (cache / F.HASH_STORE).write_text('{"truncated": ')
    assert F.remembered_file_sha256(f) == F.file_sha256(f)
    assert stored(cache)[str(f.resolve())]["sha256"] == F.file_sha256(f)  # rewritten whole
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("SPECATTN_CACHE", str(blocker / "cache"))  # cannot be created: hashed, not remembered
    assert F.remembered_file_sha256(f) == F.file_sha256(f)


def test_weights_hash_is_unchanged_by_remembering(cache, tmp_path):
    """The same value as hashing every file (artifacts written before the store exist must still match)."""
    d = tmp_path / "model"
    d.mkdir()
    for name in ("model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors"):
        (d / name).write_bytes(os.urandom(2048))
    time.sleep(F.FRESH_NS / 1e9 + 0.05)
    h = hashlib.sha256()
    for f in sorted(d.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(bytes.fromhex(F.file_sha256(f)))
    assert F.weights_hash(d) == h.hexdigest()  # hashed
    assert len(stored(cache)) == 2
    assert F.weights_hash(d) == h.hexdigest()  # remembered
    (d / "model-00001-of-00002.safetensors").unlink()
    (d / "model-00002-of-00002.safetensors").rename(d / "model.safetensors")
    time.sleep(F.FRESH_NS / 1e9 + 0.05)
    F.weights_hash(d)
    assert list(stored(cache)) == [str((d / "model.safetensors").resolve())]  # files that are gone are forgotten
