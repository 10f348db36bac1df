"""Read the objects of an R lazy-load database (``.rdb`` + ``.rdx``) without R.

Debian's ``r-cran-janeaustenr`` keeps Jane Austen's novels as character vectors in ``data/Rdata.rdb``. The index
``.rdx`` is a gzip-compressed R serialization of a list whose ``variables`` entry maps each object name to
``(offset, length)`` in the ``.rdb``; each ``.rdb`` record is a 4-byte big-endian uncompressed size followed by a
zlib stream holding one serialized object.

:func:`unserialize` covers the subset of R's XDR serialization format (versions 2 and 3) that plain data uses:
NULL, pairlists, symbols, character/integer/double/logical vectors, lists, attributes and back-references.
Anything else (closures, environments, ALTREP, bytecode) raises ``ValueError`` naming the SEXP type.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

# SEXP type codes (R internals, "Serialization Formats")
NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 0, 1, 2, 9, 10, 13, 14, 16, 19
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP = 255, 254, 253, 242, 241
_NA_INT = -(2**31)
_SINGLETONS = {NILVALUE_SXP: None, GLOBALENV_SXP: "<globalenv>", EMPTYENV_SXP: "<emptyenv>",
               BASEENV_SXP: "<baseenv>"}


class RVector(list):
    """An R vector: a Python list plus R attributes (``names``, ``class``, ...)."""

    def __init__(self, items=(), attributes: dict | None = None):
        super().__init__(items)
        self.attributes = attributes or {}


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"R serialization truncated at byte {self.pos} (wanted {n} more)")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def header(self) -> None:
        fmt = self.take(2)
        if fmt != b"X\n":
            raise ValueError(f"not an XDR R serialization (format bytes {fmt!r})")
        version = self.int()
        self.int(), self.int()  # writer R version, minimal reader version
        if version == 3:
            self.take(self.int())  # native encoding name
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")

    def item(self):
        flags = self.int()
        sexp, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if sexp in _SINGLETONS:
            return _SINGLETONS[sexp]
        if sexp == REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if sexp == SYMSXP:
            name = self.item()  # a CHARSXP
            self.refs.append(name)
            return name
        if sexp == LISTSXP:  # pairlist: attributes, tag, car, cdr -> a dict (R uses these for attributes)
            out = {}
            while True:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else None
                out[tag if tag is not None else len(out)] = self.item()
                flags = self.int()
                sexp, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
                if sexp == NILVALUE_SXP:
                    return out
                if sexp != LISTSXP:
                    raise ValueError(f"pairlist continues with SEXP type {sexp}, expected a pairlist or NULL")
        if sexp == CHARSXP:
            n = self.int()
            return None if n == -1 else self.take(n).decode("utf-8", errors="replace")
        if sexp in (LGLSXP, INTSXP):
            n = self.length()
            vals = struct.unpack(f">{n}i", self.take(4 * n))
            items = [None if v == _NA_INT else (bool(v) if sexp == LGLSXP else v) for v in vals]
        elif sexp == REALSXP:
            n = self.length()
            items = list(struct.unpack(f">{n}d", self.take(8 * n)))
        elif sexp in (STRSXP, VECSXP):
            items = [self.item() for _ in range(self.length())]
        else:
            raise ValueError(f"R object of SEXP type {sexp} is not supported (plain data only)")
        attributes = self.item() if has_attr else None
        return RVector(items, attributes)


def unserialize(data: bytes):
    """Decode one R object serialized in XDR format (``saveRDS`` / lazy-load records, uncompressed)."""
    r = _Reader(data)
    r.header()
    return r.item()


def read_lazyload_db(rdb: str | Path) -> dict:
    """Every object of a lazy-load database: ``{name: object}``; ``rdb`` is the ``.rdb`` path (``.rdx`` beside)."""
    rdb = Path(rdb)
    rdx = rdb.with_suffix(".rdx")
    for p in (rdb, rdx):
        if not p.is_file():
            raise FileNotFoundError(f"R lazy-load database file {p} is missing")
    index = unserialize(gzip.decompress(rdx.read_bytes()))
    names = index.attributes.get("names", []) if isinstance(index, RVector) else []
    if "variables" not in names:
        raise ValueError(f"{rdx} is not a lazy-load index (no 'variables' entry)")
    variables = index[names.index("variables")]
    blob = rdb.read_bytes()
    out = {}
    for name, (offset, length) in zip(variables.attributes["names"], variables):
        record = blob[offset : offset + length]
        if len(record) != length:
            raise ValueError(f"{rdb} is truncated: {name} needs bytes {offset}..{offset + length}")
        size = struct.unpack(">I", record[:4])[0]
        raw = zlib.decompress(record[4:])
        if len(raw) != size:
            raise ValueError(f"{rdb}: {name} decompressed to {len(raw)} bytes, header says {size}")
        out[name] = unserialize(raw)
    return out
