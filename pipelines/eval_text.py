"""Evaluation text: long-form books, different from the calibration corpus (the paper uses PG-19).

The default is Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` (Project Gutenberg texts stored as R
data; read by :mod:`pipelines.rdata`, no R needed). Users can pass their own ``.txt`` books instead.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from specattn_runtime.models import special_prefix

from . import assets
from .corpus import model_window, text_files, text_per_window
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


def book_windows(token_lists: dict[str, list[int]], n_tokens: int, num_texts: int, *,
                 prefix: Sequence[int]) -> tuple[torch.Tensor, list[str]]:
    """Cut ``num_texts`` windows of ``n_tokens`` tokens from books' text tokens (tokenized without special
    tokens), taking books in turn; each window is :func:`pipelines.corpus.model_window`: ``prefix`` (the
    tokenizer's special-token prefix), then text. Window w of a book holds its text tokens from
    ``w * (n_tokens - len(prefix))``, so six windows are the openings of six novels as ``tokenizer(novel)`` begins.

    Returns int64 ``[num_texts, n_tokens]`` and a label per window; raises if the books are too short.
    """
    body = text_per_window(n_tokens, prefix)
    names = sorted(token_lists)
    capacity = {k: len(token_lists[k]) // body for k in names}
    if sum(capacity.values()) < num_texts:
        raise ValueError(f"the evaluation books hold {sum(capacity.values())} windows of {n_tokens} tokens, "
                         f"{num_texts} requested; use shorter windows, fewer texts, or longer books")
    windows, labels, w = [], [], 0
    while len(windows) < num_texts:
        for k in names:
            if w < capacity[k] and len(windows) < num_texts:
                windows.append(model_window(prefix, token_lists[k], w * body, n_tokens))
                labels.append(f"{k}[{w}]")
        w += 1
    return torch.tensor(windows, dtype=torch.int64), labels


def evaluation_windows(books: dict[str, str], tokenizer, n_tokens: int,
                       num_texts: int) -> tuple[torch.Tensor, list[str], list[int]]:
    """The evaluation's texts: :func:`book_windows` of the books tokenized by ``tokenizer``, each window starting
    with the tokenizer's special-token prefix. Returns ``(windows [num_texts, n_tokens] int64, labels, prefix)``."""
    prefix = special_prefix(tokenizer)
    # Only as much of each book as the windows can use: tokenizing whole novels costs seconds each.
    chars = 8 * n_tokens * (num_texts // len(books) + 1)
    ids = {k: tokenizer(v[:chars], add_special_tokens=False).input_ids for k, v in books.items()}
    windows, labels = book_windows(ids, n_tokens, num_texts, prefix=prefix)
    return windows, labels, prefix
