"""The R lazy-load reader on hand-built bytes and on the real Debian package; book windows."""

import gzip
import struct
import zlib

import pytest
import torch

from pipelines.eval_text import austen_novels, book_windows, lines_to_text
from pipelines.rdata import read_lazyload_db, unserialize

i32 = lambda v: struct.pack(">i", v)  # noqa: E731


def charsxp(s):
    if s is None:
        return i32(9) + i32(-1)
    b = s.encode()
    return i32(9 | (1 << 15)) + i32(len(b)) + b  # flag bits above the type byte (encoding) are ignored


def strsxp(items, names=None):
    flags = 16 | ((1 << 9) if names else 0)
    out = i32(flags) + i32(len(items)) + b"".join(charsxp(s) for s in items)
    if names:
        out += names
    return out


def names_attr(names, first_time=True):
    sym = i32(1) + charsxp("names") if first_time else i32((1 << 8) | 255)  # symbol, or back-reference 1
    return i32(2 | (1 << 10)) + sym + strsxp(names) + i32(254)


HEADER = b"X\n" + i32(2) + i32(0x040200) + i32(0x020300)


def test_unserialize_vectors_attributes_refs_and_na():
    inner1 = strsxp(["a", None, "ü"], names_attr(["x", "y", "z"]))
    inner2 = i32(13 | (1 << 9)) + i32(2) + i32(7) + i32(-(2**31)) + names_attr(["u", "v"], first_time=False)
    blob = HEADER + i32(19) + i32(2) + inner1 + inner2
    obj = unserialize(blob)
    assert obj[0] == ["a", None, "ü"] and obj[0].attributes == {"names": ["x", "y", "z"]}
    assert obj[1] == [7, None] and obj[1].attributes["names"] == ["u", "v"]


def test_unserialize_refuses_garbage_and_truncation():
    with pytest.raises(ValueError, match="XDR"):
        unserialize(b"RDX2\n")
    with pytest.raises(ValueError, match="truncated"):
        unserialize(HEADER + strsxp(["abc"])[:-2])
    with pytest.raises(ValueError, match="SEXP type 3"):
        unserialize(HEADER + i32(3))  # a closure


def test_lazyload_db_round_trip(tmp_path):
    obj = HEADER + strsxp(["line one", "", "line two"])
    record = struct.pack(">I", len(obj)) + zlib.compress(obj)
    (tmp_path / "d.rdb").write_bytes(b"junk" + record)
    offsets = i32(13) + i32(2) + i32(4) + i32(len(record))
    variables = i32(19 | (1 << 9)) + i32(1) + offsets + names_attr(["book"])
    index = HEADER + i32(19 | (1 << 9)) + i32(1) + variables + names_attr(["variables"], first_time=False)
    (tmp_path / "d.rdx").write_bytes(gzip.compress(index))
    assert read_lazyload_db(tmp_path / "d.rdb") == {"book": ["line one", "", "line two"]}
    (tmp_path / "d.rdb").write_bytes(b"junk" + record[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_lazyload_db(tmp_path / "d.rdb")
    with pytest.raises(FileNotFoundError, match="missing"):
        read_lazyload_db(tmp_path / "nothing.rdb")


def test_lines_to_text_joins_paragraphs():
    assert lines_to_text(["Chapter 1", "", "It is a truth", "universally known.", "", "", "Next."]) == \
        "Chapter 1\n\nIt is a truth universally known.\n\nNext."


@pytest.mark.slow
def test_the_six_novels_load_from_the_debian_package():
    books = austen_novels()
    assert len(books) == 6
    for name, text in books.items():
        assert text.lower().startswith("chapter") and len(text) > 400_000, name
    assert "It is a truth universally acknowledged" in books["prideprejudice"][:200]


def test_book_windows_round_robin_and_short_books():
    ids = {"a": list(range(100)), "b": list(range(1000, 1025))}
    w, labels = book_windows(ids, 20, 3, prefix=[])
    assert labels == ["a[0]", "b[0]", "a[1]"] and torch.equal(w[2], torch.arange(20, 40))
    with pytest.raises(ValueError, match="hold 6 windows"):
        book_windows(ids, 20, 7, prefix=[])
