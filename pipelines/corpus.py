"""Calibration text: Wikipedia articles to plain text, documents to token windows.

The default corpus is the 106 full Wikipedia articles that ship in the gensim wheel (a MediaWiki XML dump,
bz2-compressed). :func:`wiki_articles` strips the markup well enough for attention statistics: templates, tables,
references and file links go; link labels and prose stay. Users can pass their own text instead: a ``.txt`` file
or a directory of them, one document per file.

A window is what the model reads, made as its inputs are made at generation time (``tokenizer(prompt)``): the
tokenizer's own special-token prefix (``<bos>`` for Gemma, Llama, Mistral; nothing for SmolLM2 and Qwen), then
running text. :func:`model_window` is the one place a window is made; calibration, holdout and evaluation windows
all come from it.
"""

from __future__ import annotations

import bz2
import html
import re
from collections.abc import Sequence
from pathlib import Path

import torch

_PAGE = re.compile(r"<page>.*?<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>.*?</page>", re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_FILE_LINK = re.compile(r"\[\[(?:File|Image|Category|Media):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I)
_WIKILINK = re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]")
_EXTLINK = re.compile(r"\[https?://[^\s\]]+\s?([^\]]*)\]")
_HEADING = re.compile(r"^=+[ \t]*(.*?)[ \t]*=+[ \t]*$", re.M)
_EMPH = re.compile(r"'{2,}")
_LIST = re.compile(r"^[*#:;]+\s*", re.M)
_BLANKS = re.compile(r"\n{3,}")


def _strip_nested(text: str, open_: str, close: str) -> str:
    """Remove balanced ``open_ ... close`` spans (templates ``{{ }}`` and tables ``{| |}`` nest).

    Jumps from token to token with a regex (a per-character loop took seconds on the shipped dump, which every
    calibration and many tests read); a ``close`` outside any span is text."""
    token = re.compile(f"{re.escape(open_)}|{re.escape(close)}")
    out, depth, i = [], 0, 0
    while m := token.search(text, i):
        if depth == 0:
            out.append(text[i : m.start()])
        if m.group() == open_:
            depth, i = depth + 1, m.end()
        elif depth:
            depth, i = depth - 1, m.end()
        else:  # a close at depth 0 is text: keep its first character, look again from the next one
            out.append(text[m.start()])
            i = m.start() + 1
    if depth == 0:
        out.append(text[i:])
    return "".join(out)


def strip_wiki_markup(text: str) -> str:
    text = html.unescape(text)
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    text = _FILE_LINK.sub("", text)
    text = _WIKILINK.sub(r"\1", text)
    text = _EXTLINK.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = _HEADING.sub(r"\1", text)
    text = _EMPH.sub("", text)
    text = _LIST.sub("", text)
    text = html.unescape(text)  # dumps escape twice (&amp;nbsp;): the first pass left entities behind
    return _BLANKS.sub("\n\n", text).strip()


def wiki_articles(dump_path: str | Path, min_chars: int = 2000) -> list[tuple[str, str]]:
    """``(title, plain text)`` of every article in a MediaWiki XML dump (``.bz2`` or plain), redirects dropped."""
    path = Path(dump_path)
    raw = (bz2.open(path) if path.suffix == ".bz2" else open(path, "rb")).read().decode("utf-8")
    articles = []
    for title, body in _PAGE.findall(raw):
        if body.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = strip_wiki_markup(body)
        if len(text) >= min_chars:
            articles.append((html.unescape(title), text))
    return articles


def text_files(path: str | Path) -> list[Path]:
    """The ``.txt`` documents at ``path`` (a file or a directory), sorted; errors name what is wrong."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"corpus path {p} does not exist")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*.txt") if f.is_file())
    if not files:
        raise ValueError(f"corpus directory {p} holds no .txt files")
    return files


def split_documents(n_docs: int, holdout_every: int) -> tuple[list[int], list[int]]:
    """Deterministic document-level split: every ``holdout_every``-th document is held out.

    Splitting by document (not by window) keeps holdout text out of calibration entirely.
    """
    if n_docs < 2:
        raise ValueError(f"the corpus has {n_docs} document(s); at least 2 are needed (calibration + holdout)")
    hold = [i for i in range(n_docs) if i % holdout_every == holdout_every - 1] or [n_docs - 1]
    cal = [i for i in range(n_docs) if i not in set(hold)]
    return cal, hold


def text_per_window(n_tokens: int, prefix: Sequence[int]) -> int:
    """Text tokens in a window of ``n_tokens`` that starts with ``prefix``."""
    if n_tokens <= len(prefix):
        raise ValueError(f"a window of {n_tokens} tokens leaves no room for text after the tokenizer's "
                         f"{len(prefix)} special token(s) {list(prefix)}; use longer windows")
    return n_tokens - len(prefix)


def model_window(prefix: Sequence[int], ids: Sequence[int], start: int, n_tokens: int) -> list[int]:
    """One model input of ``n_tokens`` ids: ``prefix`` (``specattn_runtime.models.special_prefix``), then the text
    tokens ``ids[start : start + n_tokens - len(prefix)]``; raises if ``ids`` ends before the window is full.

    With a BOS prefix the window of a text's start is ``tokenizer(text).input_ids[:n_tokens]``: the model is
    measured in the state generation puts it in (for Gemma-style models the first token is the attention sink).
    """
    body = text_per_window(n_tokens, prefix)
    piece = list(ids[start : start + body])
    if len(piece) < body:
        raise ValueError(f"a window of {body} text tokens from position {start} needs {start + body} tokens; "
                         f"the text has {len(ids)}")
    return [*prefix, *piece]


def windows_from_token_lists(docs: list[list[int]], window: int, max_windows: int, sep_id: int, *,
                             prefix: Sequence[int]) -> torch.Tensor:
    """Concatenate documents (separated by ``sep_id``) and cut the stream into at most ``max_windows`` full
    windows of ``window`` tokens, each :func:`model_window` (``prefix`` then ``window - len(prefix)`` text tokens).

    Returns int64 ``[n_windows, window]``; never pads, so every position is real text (or the prefix). With an
    empty prefix the windows are the stream cut into consecutive pieces.
    """
    body = text_per_window(window, prefix)
    stream: list[int] = []
    need = body * max_windows
    for ids in docs:
        stream.extend(ids)
        stream.append(sep_id)
        if len(stream) >= need:
            break
    n = min(len(stream) // body, max_windows)
    rows = [model_window(prefix, stream, i * body, window) for i in range(n)]
    return torch.tensor(rows, dtype=torch.int64).view(n, window)
