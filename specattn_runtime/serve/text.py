"""Tokens to streamed text: incremental detokenisation with stop strings checked on the decoded text.

A token may end in the middle of a UTF-8 character (the decode then ends in U+FFFD) and a stop string may straddle
two steps, so a stream holds back a tail until it is settled: an unfinished character, or a suffix that could be the
start of a stop string. What it has released is never taken back, and the concatenation of every delta is the text
of the whole generation cut before the first stop string -- the text a non-streaming response returns.
"""

from __future__ import annotations


class TextStream:
    """Decode a growing list of token ids into text deltas, cut at the first of ``stop``.

    ``tokenizer``: anything with ``decode(ids, skip_special_tokens=True)``. After a stop string, :attr:`stopped`
    is set and :attr:`n_tokens` counts the tokens it took to reach it (the ``usage`` of the response).
    """

    def __init__(self, tokenizer, stop: list[str] | tuple = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # decoded so far, cut at the stop string once one is found
        self.sent = 0  # characters of ``text`` released
        self.stopped = False
        self.n_tokens = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, new: list[int]) -> str:
        """Take one step's tokens; returns the text that is now settled (possibly empty)."""
        if self.stopped:
            return ""
        before = len(self.ids)
        self.ids.extend(new)
        self.n_tokens = len(self.ids)
        text = self._decode(self.ids)
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped, self.text = True, text[:cut]
            self.n_tokens = self._tokens_to(cut, before)
            return self._release(cut)
        self.text = text
        settled = len(text.rstrip("\ufffd"))  # an unfinished UTF-8 character decodes as U+FFFD
        for s in self.stop:  # the longest suffix that begins a stop string waits for the next step
            for j in range(min(len(s) - 1, settled), 0, -1):
                if text[settled - j : settled] == s[:j]:
                    settled -= j
                    break
        return self._release(settled)

    def finish(self) -> str:
        """The rest, at the end of the generation (a held-back tail that never became a stop string)."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : upto], upto
        return delta

    def _first_stop(self, text: str) -> int | None:
        start = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _tokens_to(self, cut: int, before: int) -> int:
        """Tokens needed for the decoded text to reach a stop string ending past ``cut``: at least one new token."""
        for n in range(before + 1, len(self.ids) + 1):
            if self._first_stop(self._decode(self.ids[:n])) is not None:
                return n
        return len(self.ids)
