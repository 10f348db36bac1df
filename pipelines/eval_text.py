"""Evaluation text: long-form books, different from the calibration corpus (the paper uses PG-19).

The default is Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` (Project Gutenberg texts stored as R
data; read by :mod:`pipelines.rdata`, no R needed). Users can pass their own ``.txt`` books instead.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from . import assets
from .corpus import text_files
from .rdata import read_lazyload_db

AUSTEN_NAME = "janeaustenr-1.0.0 (Jane Austen's six novels, Project Gutenberg text)"
_FIRST_CHAPTER = re.compile(r"^\s*chapter\s+(1|i)\.?\s*$", re.I | re.M)


def lines_to_text(lines: list[str | None]) -> str:
    """Hard-wrapped book lines -> paragraphs: lines joined by spaces, paragraphs by a blank line."""
    paragraphs, current = [], []
    for line in lines:
        line = (line or "").strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def from_first_chapter(text: str) -> str:
    """Drop title pages and prefaces: start at the first "Chapter 1" / "CHAPTER I" heading if there is one."""
    m = _FIRST_CHAPTER.search(text)
    return text[m.start():].lstrip() if m else text


def austen_novels() -> dict[str, str]:
    """``{novel: text from chapter 1}`` for the six novels (fetched, verified and unpacked once)."""
    deb = assets.fetch_deb(assets.JANEAUSTENR_DEB)
    root = assets.extract_deb(deb, assets.cache_dir() / "janeaustenr")
    rdb = root / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
    return {name: from_first_chapter(lines_to_text(lines)) for name, lines in sorted(read_lazyload_db(rdb).items())}


def load_books(path: str | None) -> tuple[str, dict[str, str]]:
    """``(corpus name, {book: text})``: the Austen novels, or every ``.txt`` file at ``path``."""
    if path is None:
        return AUSTEN_NAME, austen_novels()
    files = text_files(path)
    books = {f.stem: f.read_text(encoding="utf-8", errors="replace") for f in files}
    books = {k: v for k, v in books.items() if v.strip()}
    if not books:
        raise ValueError(f"evaluation text {path} is empty: no non-blank .txt files")
    return Path(path).name, books


def book_windows(token_lists: dict[str, list[int]], n_tokens: int, num_texts: int) -> tuple[torch.Tensor, list[str]]:
    """Cut ``num_texts`` windows of ``n_tokens`` tokens, taking books in turn (window w of a book starts at
    ``w * n_tokens``), so six windows are the opening 2,048 tokens of each of six novels.

    Returns int64 ``[num_texts, n_tokens]`` and a label per window; raises if the books are too short.
    """
    names = sorted(token_lists)
    capacity = {k: len(token_lists[k]) // n_tokens for k in names}
    if sum(capacity.values()) < num_texts:
        raise ValueError(f"the evaluation books hold {sum(capacity.values())} windows of {n_tokens} tokens, "
                         f"{num_texts} requested; use shorter windows, fewer texts, or longer books")
    windows, labels, w = [], [], 0
    while len(windows) < num_texts:
        for k in names:
            if w < capacity[k] and len(windows) < num_texts:
                windows.append(token_lists[k][w * n_tokens : (w + 1) * n_tokens])
                labels.append(f"{k}[{w}]")
        w += 1
    return torch.tensor(windows, dtype=torch.int64), labels
