import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.corpus import _strip_nested, split_documents, strip_wiki_markup, text_files, windows_from_token_lists


def test_strip_wiki_markup():
    raw = ("{{Infobox|name={{nested|x}}}}'''Foo''' is a [[bar (thing)|bar]] in [[Baz]].<ref>cite</ref>\n"
           "== History ==\n{| class=wikitable\n|a\n|}\n* item &amp;nbsp;one [[File:x.png|thumb|a [[link]]]]")
    text = strip_wiki_markup(raw)
    assert text == "Foo is a bar in Baz.\nHistory\n\nitem \xa0one"


def strip_nested_oracle(text: str, open_: str, close: str) -> str:
    """The definition, one character at a time: an ``open_`` starts a span (nesting), a ``close`` ends one."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth, i = depth + 1, i + len(open_)
        elif depth and text.startswith(close, i):
            depth, i = depth - 1, i + len(close)
        else:
            out.append("" if depth else text[i])
            i += 1
    return "".join(out)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="{}|ab\n", max_size=40), st.sampled_from([("{{", "}}"), ("{|", "|}")]))
def test_strip_nested_equals_the_character_loop(text, tokens):
    assert _strip_nested(text, *tokens) == strip_nested_oracle(text, *tokens)


def test_shipped_articles_are_clean_prose():
    from pipelines import assets
    from pipelines.corpus import wiki_articles

    arts = wiki_articles(assets.fetch(assets.ENWIKI_BZ2))
    assert len(arts) > 80
    body = "".join(t for _, t in arts)
    for junk in ("{{", "}}", "[[", "<ref", "&amp;", "'''"):
        assert body.count(junk) < len(arts), f"markup {junk!r} survived"


def test_split_and_windows():
    cal, hold = split_documents(12, 5)
    assert hold == [4, 9] and set(cal) | set(hold) == set(range(12)) and not set(cal) & set(hold)
    w = windows_from_token_lists([[1, 2, 3], [4, 5]], window=3, max_windows=5, sep_id=0, prefix=[])
    assert w.tolist() == [[1, 2, 3], [0, 4, 5]]  # the trailing separator does not make a partial window
    assert windows_from_token_lists([[1]], 4, 3, 0, prefix=[]).shape == (0, 4)
    with pytest.raises(ValueError, match="at least 2"):
        split_documents(1, 5)


def test_text_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        text_files(tmp_path / "missing")
    with pytest.raises(ValueError, match="no .txt"):
        text_files(tmp_path)
