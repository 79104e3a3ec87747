"""Counting private values in what reached the cloud, complete or cut short.

`count_private_spans(text, values)` is for the side of the wire the guard does not control (a
recorder placed between the guard and the back end, a test): it counts each value that occurs in
`text` (its letters and digits in order from the start of a word, however spaced, cased or
disguised; see `normalize`) and whether `text` ends in a non-empty proper prefix of a value (the
start of a span that the next tokens would complete: `Contact: Mira Okaf`, `+1 (555) 014-`,
followed by nothing but characters of the value itself, or an incomplete character U+FFFD).
It is deliberately simpler than the detectors, so that it does not share their blind spots: it
does not know a name's other variants (`Okafor, Mira`), only the values it is given.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from collections.abc import Iterable

from floe_jax.inference.privacy.normalize import normalize, skeleton


@dataclasses.dataclass(frozen=True)
class SpanCount:
    """Private values found in one text: `complete` occurrences, `partial` (0 or 1: the text
    ends in a proper prefix of a value), and the values seen (complete or partial)."""

    complete: int
    partial: int
    values: tuple[str, ...]

    @property
    def total(self) -> int:
        return self.complete + self.partial


def count_private_spans(text: str, values: Iterable[str]) -> SpanCount:
    """Counts the private `values` in `text`, complete and as a trailing prefix."""
    norm = normalize(text.rstrip("\ufffd")).text  # an incomplete last character may be a digit
    skel, starts, where = [], [], []  # letters and digits; which start a word; where in `norm`
    prev_alnum = False
    for j, c in enumerate(norm):
        if c.isalnum():
            starts.append(not prev_alnum)
            skel.append(c)
            where.append(j)
        prev_alnum = c.isalnum()
    s = "".join(skel)
    word_starts = [i for i, f in enumerate(starts) if f]
    at_word = set(word_starts)
    complete, partial, seen = 0, 0, []
    for v in dict.fromkeys(values):
        k, loose_v = _keys(v)
        if not k:
            continue
        hits, j = 0, s.find(k)
        while j >= 0:  # every occurrence of the skeleton that starts a word
            hits += j in at_word
            j = s.find(k, j + 1)
        # a prefix still open: the text from a word start to its end is the start of the value,
        # separators aside ("Mira Okaf", "+1 (555) 014-"), but not `d@@` for "dara@x.org"
        tail = any(
            k.startswith(s[i:]) and loose_v.startswith(_loose(norm[where[i] :]))
            for i in word_starts[bisect.bisect_right(word_starts, len(s) - len(k)) :]
        )
        complete += hits
        if hits or tail:
            seen.append(v)
        partial = partial or int(tail)
    return SpanCount(complete, partial, tuple(seen))


_SEPARATORS = frozenset(" \t\n-().,/+'_")


@functools.lru_cache(maxsize=4096)
def _keys(value: str) -> tuple[str, str]:
    """A value's skeleton and its loose spelling (`_loose`), once per value: a recorder checks
    every request against the same values."""
    return skeleton(value), _loose(normalize(value).text)


def _loose(text: str) -> str:
    """`text` without the separators that names and numbers are written with (spaces, dashes,
    brackets, dots, slashes): what must match, in order, for a text to be a value's start."""
    return "".join(c for c in text if c not in _SEPARATORS)
